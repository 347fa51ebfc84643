"""Where a run's files go, as the Ascend scripts put them (ID = $ASCEND_DEVICE_ID, 0 when unset):

    test/output/ID/train_ID.log                 pretraining output (rank 0)
    test/output/ID/test_ID.log (DINO), eval_ID.log (MoBY)   evaluation output
    test/output/ID/<CaseName>.log               the case file (Network = ..., ActualFPS = ...)
    test/output/ID/train_<CaseName>_loss.txt    one loss per logged step
    test/output/ID/<CaseName>/                  checkpoints and the programs' own logs

with CaseName = <Network>_bs<batch per device>_<devices>p_<acc|perf|eval|eval_knn|eval_linear>.
The output root can be moved with env SSL_TEST_OUTPUT (the tests use this). A run folder also
holds launch.json (the command it runs, the stages done) and pretraining.log (a copy of its
pretraining output), from which a rerun resumes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import REPO


@dataclass(frozen=True)
class Layout:
    log_dir: Path
    train_log: Path
    eval_log: Path
    loss_file: Path
    case_file: Path
    run_dir: Path


def case_name(network: str, batch_size: int, world: int, mode: str) -> str:
    kind = {"full": "acc", "perf": "perf"}.get(mode, mode)
    return f"{network}_bs{batch_size}_{world}p_{kind}"


def output_root(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("SSL_TEST_OUTPUT") or REPO / "test" / "output")


def layout(root: Path, device_id: str, case: str, eval_prefix: str) -> Layout:
    log_dir = root / device_id
    return Layout(log_dir=log_dir, train_log=log_dir / f"train_{device_id}.log",
                  eval_log=log_dir / f"{eval_prefix}_{device_id}.log",
                  loss_file=log_dir / f"train_{case}_loss.txt", case_file=log_dir / f"{case}.log",
                  run_dir=log_dir / case)


def newest(paths) -> Path | None:
    found = sorted(paths, key=lambda path: path.stat().st_mtime, reverse=True)
    return found[0] if found else None


def pretrained_checkpoint(run_dir: Path, model: str) -> Path | None:
    """The checkpoint pretraining wrote in a run folder: DINO's checkpoint.pth, MoBY's
    <MODEL.NAME>/pretrain/checkpoint.pth."""
    if model == "dino":
        path = run_dir / "checkpoint.pth"
        return path if path.is_file() else None
    return newest(run_dir.glob("*/pretrain/checkpoint.pth"))


def last_full_checkpoint(log_dir: Path, network: str, world: int, model: str) -> Path | None:
    """The checkpoint of the newest train_full run with this network and number of devices."""
    runs = log_dir.glob(f"{network}_bs*_{world}p_acc")
    return newest(filter(None, (pretrained_checkpoint(run, model) for run in runs if run.is_dir())))


# ------------------------------------------------------------------------------------------------
# Earlier attempts. Nothing here deletes a file: a rerun of the same command resumes the run of
# its case; anything else (--fresh, other settings, a finished run, a folder these scripts did not
# start) moves the earlier run folder aside, and each attempt's logs are rotated, not overwritten.

STATE_FILE = "launch.json"  # in the run folder: the command it runs and the stages done so far
PRETRAINING_LOG = "pretraining.log"  # in the run folder: a copy of the pretraining stage's log


@dataclass(frozen=True)
class Attempt:
    action: str  # "new", "resume" or "move_aside"
    why: str = ""
    done: tuple[str, ...] = ()  # stages an earlier attempt of this run finished


def read_state(run_dir: Path) -> dict | None:
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("command"), list) else None


def write_state(run_dir: Path, command: list[str], done: list[str] | tuple[str, ...]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / f".{STATE_FILE}.{os.getpid()}"
    partial.write_text(json.dumps({"command": command, "done": list(done)}, indent=1) + "\n")
    os.replace(partial, run_dir / STATE_FILE)  # atomic: a killed launcher leaves the old state


def flag_changes(old: list[str], new: list[str]) -> list[str]:
    """What differs between two command lines, flag by flag (`--epochs 1 -> 3`)."""
    def flags(words: list[str]) -> dict[str, str]:
        found, key = {"program": ""}, "program"
        for word in words:
            if word.startswith("--"):
                key = word
                found[key] = ""
            else:
                found[key] = f"{found[key]} {word}".strip()
        return found

    before, after = flags(old), flags(new)
    changes = []
    for key in dict.fromkeys([*before, *after]):
        if key not in after:
            changes.append(f"{key} dropped")
        elif key not in before:
            changes.append(f"{key} added")
        elif before[key] != after[key]:
            changes.append(f"{key} {before[key] or '(set)'} -> {after[key]}")
    return changes


def decide(run_dir: Path, command: list[str], fresh: bool) -> Attempt:
    """What a new attempt does with an earlier one in run_dir (see above)."""
    if not run_dir.exists():
        return Attempt("new")
    if fresh:
        return Attempt("move_aside", "--fresh was given")
    state = read_state(run_dir)
    if state is None:
        return Attempt("move_aside", f"it has no {STATE_FILE}: these scripts did not start it, or an older "
                                     "version did")
    if state["command"] != command:
        changes = "; ".join(flag_changes(state["command"], command))
        return Attempt("move_aside", f"it was started with other settings ({changes})")
    done = tuple(state.get("done") or ())
    if "complete" in done:
        return Attempt("move_aside", "it finished")
    return Attempt("resume", done=done)


def move_aside(path: Path) -> Path | None:
    """Rename a file or folder to <name>.<time of its last change>, never over another one."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    target, count = path.with_name(f"{path.name}.{stamp}"), 1
    while target.exists():
        count += 1
        target = path.with_name(f"{path.name}.{stamp}-{count}")
    path.rename(target)
    return target


def resume_point(model: str, checkpoint: Path) -> tuple[int, int] | None:
    """(epoch, batch) where a run resumes from `checkpoint`, as its log lines count them; None when
    the file cannot be read here (the program says why when it resumes). DINO saves the epoch to
    resume at, MoBY the last finished one; both the batches of that next epoch already done."""
    try:
        import torch

        # mmap: the tensors stay on disk (torch 2.1 takes a str path only for it)
        saved = torch.load(str(checkpoint), map_location="cpu", weights_only=True, mmap=True)
        epoch, batch = int(saved["epoch"]), int(saved.get("epoch_step", 0))
    except Exception:  # noqa: BLE001 - only a message depends on it
        return None
    return (epoch, batch) if model == "dino" else (epoch + 1, batch)
