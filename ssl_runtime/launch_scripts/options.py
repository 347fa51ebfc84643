"""The launch scripts' flags: `--name=value` (and a few bare switches), as Huawei's scripts take
them. Everything is checked here, before anything starts; a bad flag is one `error:` line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import REPO
from .recipes import NETWORKS

MODES = ("full", "perf", "eval", "eval_knn", "eval_linear")

USAGE = """\
flags (all optional, --name=value):
  --data_path=DIR     ImageFolder root with train/ and val/ (default: Fashion-MNIST, converted on first use)
  --model=dino|moby   which method (default dino, with a note; --cfg= implies moby)
  --batch_size=N      batch size per device
  --epochs=N          pretraining epochs (CPU full runs with --data_path: as many as see about the
                      images of the Fashion-MNIST run)
  --steps=N           stop pretraining after N steps (performance runs default to the Ascend ports' counts)
  --device=auto|npu|cuda|cpu  accelerator (default auto: npu, then cuda, then cpu; on a machine with
                      CANN, npu or a clear stop when torch_npu does not import)
  --nproc=N           processes (devices) per node (default: 1 for *_1p.sh, 8 for *_8p.sh / *_16p.sh)
  --nnodes=N          nodes (default 1; train_full_16p.sh: 2); several nodes also need
  --node_rank=R       this node's index, 0 on the first node (default: env NODE_RANK, else 0)
  --master_addr=HOST  address of node 0 (default: env MASTER_ADDR)
  --master_port=PORT  port on node 0 (default: env MASTER_PORT, else 29680)
  --cfg=FILE          MoBY YAML config
  --checkpoint=FILE   checkpoint to evaluate (eval_knn.sh, eval_linear.sh; eval_8p.sh: default the
                      last train_full run's)
  --trust_checkpoint  read a --checkpoint the safe loader refuses (an official full checkpoint, an
                      older one of ours) with the full unpickler: only for files you trust
  --fresh             start over: the earlier run of this case is renamed (kept), not resumed
  --profile           pretraining records a few steps with the profiler (a trace in the run folder)
  --bin=True|False    NPU: binary operators (True, the default) or online compilation (False)
  --device_id=N       as ASCEND_DEVICE_ID=N: the device of 1-process runs and the output folder
  --conda_name=NAME   conda environment to activate first
  --more_path1=       accepted for compatibility with the Ascend scripts, ignored
  --dry_run           print the resolved settings and commands, run nothing
  --help              this text
A rerun of the same command resumes its run from the last checkpoint (docs/launch.md).
environment: ASCEND_DEVICE_ID (device of 1-process runs and name of the output folder, default 0),
  CANN_SET_ENV (CANN's set_env.sh), SSL_PYTHON (interpreter), SSL_TEST_OUTPUT (output root)"""

# --name=value flags and the Options field each sets; bare switches likewise.
VALUE_FLAGS = {"data_path": "data_path", "model": "model", "batch_size": "batch_size", "epochs": "epochs",
               "steps": "steps", "device": "device", "nproc": "nproc", "nnodes": "nnodes",
               "node_rank": "node_rank", "master_addr": "master_addr", "master_port": "master_port",
               "cfg": "cfg", "checkpoint": "checkpoint", "conda_name": "conda_name", "bin": "bin",
               "device_id": "device_id", "more_path1": None}
SWITCHES = {"trust_checkpoint": "trust", "dry_run": "dry_run", "fresh": "fresh", "profile": "profile"}
POSITIVE = ("batch_size", "epochs", "steps", "nproc", "nnodes", "master_port")

# Huawei's DINO port copies the XCiT torch.hub cache from --more_path1; this DINO never uses torch.hub.
IGNORED_NOTE = {"more_path1": "--more_path1 is accepted for compatibility and ignored (Huawei's DINO port "
                              "copies a torch.hub cache from it; this DINO does not use torch.hub)"}


class HelpRequested(Exception):
    """--help / -h: print USAGE and stop."""


@dataclass
class Options:
    mode: str
    default_nproc: int
    model: str = ""
    data_path: str = ""
    batch_size: str = ""
    epochs: str = ""
    steps: str = ""
    device: str = "auto"
    nproc: str = ""
    nnodes: str = ""
    node_rank: str = "0"
    master_addr: str = ""
    master_port: str = "29680"
    cfg: str = ""
    checkpoint: str = ""
    conda_name: str = ""
    bin: str = "True"
    device_id: str = "0"
    trust: bool = False
    dry_run: bool = False
    fresh: bool = False
    profile: bool = False
    bin_given: bool = False
    notes: tuple[str, ...] = ()

    @property
    def evaluation_only(self) -> bool:
        return self.mode.startswith("eval")

    def number(self, name: str) -> int | None:
        value = getattr(self, name)
        return int(value) if value else None


def parse(mode: str, default_nproc: int, argv: list[str], env: Mapping[str, str] = os.environ,
          cwd: Path | None = None) -> Options:
    """The flags of a script in `mode`, checked; relative paths are made absolute against cwd."""
    if mode not in MODES:
        raise UserError(f"internal: unknown mode {mode}")
    options = Options(mode, default_nproc, node_rank=env.get("NODE_RANK") or "0",
                      master_addr=env.get("MASTER_ADDR", ""), master_port=env.get("MASTER_PORT") or "29680",
                      device_id=env.get("ASCEND_DEVICE_ID") or "0")
    notes = []
    for arg in argv:
        if arg in ("-h", "--help"):
            raise HelpRequested
        name, has_value, value = arg[2:].partition("=") if arg.startswith("--") else ("", False, "")
        if has_value and name in VALUE_FLAGS:
            if VALUE_FLAGS[name] is None:
                notes.append(IGNORED_NOTE[name])
            else:
                setattr(options, VALUE_FLAGS[name], value)
                options.bin_given |= name == "bin"
        elif not has_value and name in SWITCHES:
            setattr(options, SWITCHES[name], True)
        else:
            raise UserError(f"unknown argument '{arg}'\n{USAGE}")
    options.notes = tuple(notes)
    _check(options, cwd or Path.cwd())
    return options


def _absolute(path: str, cwd: Path) -> str:
    return path if os.path.isabs(path) else str(cwd / path)


def _check(o: Options, cwd: Path) -> None:
    if o.model not in ("", "dino", "moby"):
        raise UserError(f"--model={o.model}: choose dino or moby")
    if o.device not in ("auto", "npu", "cuda", "cpu"):
        raise UserError(f"--device={o.device}: choose auto, npu, cuda or cpu")
    binary = {"true": "True", "1": "True", "false": "False", "0": "False"}.get(o.bin.lower())
    if binary is None:
        raise UserError(f"--bin={o.bin}: use True (binary operators) or False (online compilation)")
    o.bin = binary
    for name in POSITIVE:
        value = getattr(o, name)
        if value and not (value.isdigit() and int(value) > 0):
            raise UserError(f"--{name}={value}: expected a positive whole number")
    if not o.node_rank.isdigit():
        raise UserError(f"--node_rank={o.node_rank} (or NODE_RANK): expected 0, 1, ...")
    if not o.device_id.isdigit():
        raise UserError(f"ASCEND_DEVICE_ID={o.device_id} (or --device_id) is not a device number: "
                        "e.g. ASCEND_DEVICE_ID=0")
    if o.data_path:
        if not os.path.isdir(_absolute(o.data_path, cwd)):
            raise UserError(f"--data_path={o.data_path} is not a folder: pass an ImageFolder root holding "
                            "train/ and val/, or leave the flag out to use Fashion-MNIST")
        o.data_path = _absolute(o.data_path, cwd)
    _choose_model(o, cwd)
    if o.evaluation_only:
        if (o.nnodes or "1") != "1":
            raise UserError("evaluation runs on one node: leave --nnodes out")
        if not o.checkpoint and o.mode != "eval":
            raise UserError("--checkpoint=FILE is required: the checkpoint to evaluate")
        if o.checkpoint:
            if not os.path.isfile(_absolute(o.checkpoint, cwd)):
                raise UserError(f"--checkpoint={o.checkpoint}: no such file")
            o.checkpoint = _absolute(o.checkpoint, cwd)
        if o.profile:
            raise UserError("--profile records pretraining steps: use it with train_*.sh")
    elif o.checkpoint or o.trust:
        raise UserError("--checkpoint is for eval_knn.sh, eval_linear.sh and eval_8p.sh (--trust_checkpoint "
                        "too); training scripts start from scratch (or resume their own earlier run)")



def _choose_model(o: Options, cwd: Path) -> None:
    """--model, else MoBY when a MoBY-only flag (--cfg) says so, else DINO with a note: a
    Transformer-SSL user who leaves --model out must not train DINO unawares."""
    if o.cfg:
        if o.model == "dino":
            raise UserError("--cfg is a MoBY option: add --model=moby")
        if not o.model:
            o.notes += ("--cfg is a MoBY option: running MoBY (add --model=moby to say so)",)
        o.model = "moby"
        if os.path.isfile(_absolute(o.cfg, cwd)):
            o.cfg = _absolute(o.cfg, cwd)
        elif not (REPO / o.cfg).is_file():
            raise UserError(f"--cfg={o.cfg}: no such file (see configs/)")
    if not o.model:
        o.model = "dino"
        o.notes += (f"no --model given: running DINO ({NETWORKS['dino']}); add --model=moby for MoBY "
                    f"({NETWORKS['moby']})",)
