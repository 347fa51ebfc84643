"""Where a run's files go, as the Ascend scripts put them (ID = $ASCEND_DEVICE_ID, 0 when unset):

    test/output/ID/train_ID.log                 pretraining output (rank 0)
    test/output/ID/test_ID.log (DINO), eval_ID.log (MoBY)   evaluation output
    test/output/ID/<CaseName>.log               the case file (Network = ..., ActualFPS = ...)
    test/output/ID/train_<CaseName>_loss.txt    one loss per logged step
    test/output/ID/<CaseName>/                  checkpoints and the programs' own logs

with CaseName = <Network>_bs<batch per device>_<devices>p_<acc|perf|eval|eval_knn|eval_linear>.
The output root can be moved with env SSL_TEST_OUTPUT (the tests use this).
"""

from __future__ import annotations

import os
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
