"""Per method and device: the defaults, the CPU recipes and the program command lines.

The DINO and MoBY trees own the settings in this module: edit them when a program's flags or its
small CPU configuration change. Commands are word lists without the launcher (stages adds it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import REPO

NETWORKS = {"dino": "DINO_ID3436_for_PyTorch", "moby": "Transformer-SSL_ID3434_for_PyTorch"}
# The evaluation log's name, as each Ascend port writes it: <prefix>_<ID>.log.
EVAL_LOG_PREFIX = {"dino": "test", "moby": "eval"}
# Entry points, relative to the repository root (overridable from the environment for tests).
ENTRY_POINTS = {"DINO_PRETRAIN": "dino/main_dino.py", "DINO_EVAL_KNN": "dino/eval_knn.py",
                "DINO_EVAL_LINEAR": "dino/eval_linear.py", "MOBY_PRETRAIN": "moby/main_moby.py",
                "MOBY_LINEAR": "moby/main_linear.py", "MOBY_EVAL_KNN": "moby/eval_knn.py"}
MOBY_PLACEHOLDER = "MODEL.NAME"  # MoBY's output folder name, known once pretraining wrote it


@dataclass(frozen=True)
class Defaults:
    batch_size: int
    epochs: int
    steps: int


# Batch size per device, epochs and performance-run steps, on CPU and on NPU/GPU.
DEFAULTS = {("dino", "cpu"): Defaults(64, 1, 20), ("dino", "accelerator"): Defaults(64, 100, 200),
            ("moby", "cpu"): Defaults(64, 1, 20), ("moby", "accelerator"): Defaults(128, 100, 150)}
# Several nodes (train_full_16p.sh): the MoBY port runs 64 images per device there, the global
# batch of its 8-device run. DINO keeps its batch per device.
MULTINODE_BATCH = {"moby": 64}

# MoBY configurations (yacs YAML) on CPU and on NPU/GPU. The CPU one is a 32-px Swin that trains
# on a fixed 28,000-image subset, so that a full run (pretraining, then k-NN) takes under 10
# minutes; the head of configs/moby_swin_cpu.yaml gives its recipe and the whole train split.
MOBY_CFG = {"cpu": "configs/moby_swin_cpu.yaml", "accelerator": "configs/moby_swin_tiny.yaml"}


def entry_point(name: str, env: Mapping[str, str] = os.environ) -> str:
    return env.get(name) or ENTRY_POINTS[name]


def dino_cpu_args(epochs: int) -> list[str]:
    """DINO pretraining flags on CPU: a 2-block ViT (dim 96) on 32-px crops of Fashion-MNIST.

    BN in the head and lr 1e-3 (per 256 images) make this small model learn within a few epochs
    (upstream's ViT-S settings barely move it in that time). The teacher's EMA follows the run's
    length: upstream's 0.996 (a time constant of 250 steps) suits 125,000 steps; over the ~800
    steps of an epoch here it would leave the teacher with ~30 % of its random start, so these
    runs use 0.99 (100 steps). A 1-epoch run (the default, ~9 min on 2 cores with the evaluation)
    trains on a fixed 50,000-image subset and does not freeze the last layer (upstream freezes 1
    epoch of 100, not the whole run); measured: 10-NN teacher 66.5 % against 56.1 % at random
    initialisation. --epochs=3 trains on the whole split (~25 min; 20-NN teacher ~69.5 %).
    Warm-up: upstream's ratio (see dino_warmup_epochs).
    """
    warmup = dino_warmup_epochs(epochs)
    subset, freeze = (50000, 0) if epochs == 1 else (0, 1)
    return ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--local_crop_size", "16",
            "--local_crops_number", "2", "--out_dim", "4096", "--use_bn_in_head", "true", "--lr", "1e-3",
            "--momentum_teacher", "0.99", "--max_train_images", str(subset), "--freeze_last_layer",
            str(freeze), "--warmup_epochs", str(warmup)]


def dino_warmup_epochs(epochs: int) -> int:
    """Upstream's warm-up ratio (10 of 100 epochs), at least 1 epoch when there are several."""
    return max(epochs // 10, 1 if epochs > 1 else 0)


# upstream main_dino.py's --warmup_epochs default: a run of fewer epochs scales it (see pretrain_command)
DINO_UPSTREAM_WARMUP = 10


# The matching architecture flags for dino/eval_knn.py and dino/eval_linear.py.
DINO_EVAL_ARGS = {"cpu": ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32"],
                  "accelerator": ["--arch", "vit_small", "--patch_size", "16"]}
# DINO on NPU/GPU: upstream's ViT-S/16 recipe (main_dino.py's defaults).
DINO_ACCELERATOR_ARGS = ["--arch", "vit_small", "--patch_size", "16"]
# Performance runs follow the Ascend ports' schedules, so that their losses compare with the
# ports' logs. DINO: one epoch without warm-up, cut after the default steps.
DINO_PERF_ARGS = ["--warmup_epochs", "0"]


def default_evaluation(model: str, mode: str, device: str) -> str:
    """The evaluation of a full run and of eval_8p.sh. DINO: upstream's k-NN protocol. MoBY: on
    NPU/GPU upstream's linear evaluation; a CPU full run uses the k-NN protocol (moby/eval_knn.py,
    as DINO's: weighted 10/20-NN, T = 0.07, the full 60k/10k split), because one linear epoch, all
    a CPU run can afford, measures the linear head's training more than the encoder."""
    if mode not in ("full", "eval"):
        return mode
    if model == "dino" or (mode == "full" and device == "cpu"):
        return "eval_knn"
    return "eval_linear"


# The CPU recipes' work in images seen: the Fashion-MNIST quick start's (DINO: one epoch of its
# 50,000-image subset; MoBY, configs/moby_swin_cpu.yaml: one epoch of 28,000 images). On another
# dataset one epoch may be far less work (4,000 images: 62 steps, which learn next to nothing), so
# a CPU full run without --epochs trains as many epochs as see about as many images.
CPU_WORK_IMAGES = {"dino": 50_000, "moby": 28_000}


def epochs_for_work(model: str, train_images: int, global_batch: int) -> int | None:
    """Whole epochs closest to the recipe's work (at least one); an epoch sees its full batches
    only (drop_last). None when not one batch fits (the program says so)."""
    per_epoch = train_images // global_batch * global_batch
    return max(1, int(CPU_WORK_IMAGES[model] / per_epoch + 0.5)) if per_epoch else None


def count_images(folder: Path) -> int:
    """Image files under an ImageFolder split, as torchvision's ImageFolder counts them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sum(name.lower().endswith(IMG_EXTENSIONS)
               for _, _, names in os.walk(folder, followlinks=True) for name in names)


def moby_linear_cfg(cfg: str) -> str:
    """The linear-evaluation config of a pretraining config: foo.yaml -> foo_linear.yaml when it exists."""
    linear = cfg[:-len(".yaml")] + "_linear.yaml" if cfg.endswith(".yaml") else cfg
    if not cfg.endswith("_linear.yaml") and (REPO / linear).is_file():
        return linear
    return cfg


def moby_epochs_args(epochs: int, device: str, perf: bool, world: int) -> list[str]:
    """How --epochs=E reaches MoBY. On NPU/GPU, as the Ascend port does, --max_epochs stops
    training after E epochs while the schedules keep the YAML's length (300 epochs for Swin-T). On
    CPU the runs are short, so the schedules are fitted to the E epochs instead (--epochs).
    Performance runs on several NPU/GPU processes run two whole epochs with the schedules fitted
    to them (--epochs 2), as the port's train_performance_8p.sh."""
    if device == "cpu" or (perf and world > 1):
        return ["--epochs", str(epochs)]
    return ["--max_epochs", str(epochs)]


def moby_linear_batch(device: str, batch_size: int, nproc: int) -> int:
    """MoBY's linear-evaluation batch per device on NPU/GPU. Upstream's recipe is lr 1.0 at a
    global batch of 512 (8 GPUs x 64); main_linear.py scales --lr by batch x processes / 512, so
    keeping the global batch at 512 gives upstream's lr of 1.0 whatever the pretraining batch. The
    evaluation runs nproc processes (on node 0 only in multi-node runs). On CPU: the run's batch."""
    if device == "cpu":
        return batch_size
    return max(512 // nproc, 1)


def npu_args(model: str, binary: str) -> list[str]:
    """NPU-only flags of the pretraining programs, as the Ascend ports' scripts pass them."""
    return (["--optimizer", "npufusedadamw"] if model == "dino" else []) + ["--bin", binary]


@dataclass
class Settings:
    """A run's resolved settings (printed by --dry_run as NAME=value, in this order)."""
    MODEL: str
    NETWORK: str
    DEVICE: str
    NPROC: int
    NNODES: int
    NODE_RANK: int
    WORLD: int
    BATCH_SIZE: int
    EPOCHS: int
    STEPS: int | None
    DATA_PATH: str
    CFG: str
    CHECKPOINT: str
    CASE_NAME: str
    TRAIN_LOG: str
    EVAL_LOG: str
    LOSS_FILE: str
    CASE_FILE: str
    RUN_DIR: str
    SSL_PYTHON: str


@dataclass
class Commands:
    pretrain: list[str] = field(default_factory=list)
    evaluation: list[str] = field(default_factory=list)
    random_init: list[str] = field(default_factory=list)


def resolve_schedule(model: str, mode: str, device: str, world: int, nnodes: int,
                     batch_size: int | None, epochs: int | None, steps: int | None) -> tuple[int, int, int | None]:
    """(batch size, epochs, steps) from the flags given and the defaults. Performance runs: DINO
    one epoch cut after the default steps; MoBY the default steps, except on several NPU/GPU
    processes: two whole epochs."""
    device_class = "cpu" if device == "cpu" else "accelerator"
    defaults = DEFAULTS[model, device_class]
    default_batch = MULTINODE_BATCH.get(model, defaults.batch_size) if nnodes > 1 and device_class != "cpu" \
        else defaults.batch_size
    if mode == "perf":
        if model == "dino":
            epochs, steps = epochs or 1, steps or defaults.steps
        elif device_class != "cpu" and world > 1:
            epochs = epochs or 2
        else:
            steps = steps or defaults.steps
    return batch_size or default_batch, epochs or defaults.epochs, steps


def pretrain_command(s: Settings, perf: bool, binary: str, profile: bool,
                     env: Mapping[str, str] = os.environ) -> list[str]:
    npu = npu_args(s.MODEL, binary) if s.DEVICE == "npu" else []
    if s.MODEL == "dino":
        recipe = dino_cpu_args(s.EPOCHS) if s.DEVICE == "cpu" else DINO_ACCELERATOR_ARGS
        command = [entry_point("DINO_PRETRAIN", env), "--output_dir", s.RUN_DIR, "--batch_size_per_gpu",
                   str(s.BATCH_SIZE), "--epochs", str(s.EPOCHS), "--device", s.DEVICE, *recipe, *npu]
        if perf and not _contains(recipe, DINO_PERF_ARGS):  # the perf schedule wins over the recipe's
            command += DINO_PERF_ARGS
        elif s.DEVICE != "cpu" and s.EPOCHS < DINO_UPSTREAM_WARMUP:
            # upstream's 10 warm-up epochs do not fit a shorter run (main_dino.py refuses it): its ratio
            command += ["--warmup_epochs", str(dino_warmup_epochs(s.EPOCHS))]
        steps_flag, data_flag = "--num_steps", "--data_path"
    else:
        command = [entry_point("MOBY_PRETRAIN", env), "--cfg", s.CFG, "--batch-size", str(s.BATCH_SIZE),
                   "--output", s.RUN_DIR, "--tag", "pretrain", "--device", s.DEVICE,
                   *moby_epochs_args(s.EPOCHS, s.DEVICE, perf, s.WORLD), *npu]
        steps_flag, data_flag = "--steps", "--data-path"
    if s.STEPS:
        command += [steps_flag, str(s.STEPS)]
    if s.DATA_PATH:
        command += [data_flag, s.DATA_PATH]
    if profile:  # both programs: a few steps after warm-up under the profiler
        command.append("--profile")
    return command


def evaluation_command(s: Settings, mode: str, given_batch: bool, given_epochs: bool, trust: bool,
                       binary: str, env: Mapping[str, str] = os.environ) -> list[str]:
    evaluation = default_evaluation(s.MODEL, mode, s.DEVICE)
    if evaluation not in ("eval_knn", "eval_linear"):
        return []
    device_class = "cpu" if s.DEVICE == "cpu" else "accelerator"
    if s.MODEL == "dino":
        weights = s.CHECKPOINT or f"{s.RUN_DIR}/checkpoint.pth"
        program = entry_point("DINO_EVAL_KNN" if evaluation == "eval_knn" else "DINO_EVAL_LINEAR", env)
        command = [program, "--pretrained_weights", weights, "--checkpoint_key", "teacher"]
        if evaluation == "eval_linear":
            command += ["--output_dir", s.RUN_DIR]
        command += ["--device", s.DEVICE, *DINO_EVAL_ARGS[device_class]]
        data_flag, batch_flag, trust_flag = "--data_path", "--batch_size_per_gpu", "--trust_checkpoint"
    else:
        # MoBY writes <output>/<MODEL.NAME>/<tag>/checkpoint.pth; the name is filled in after
        # pretraining (stages.fill_moby_checkpoint).
        weights = s.CHECKPOINT or f"{s.RUN_DIR}/{MOBY_PLACEHOLDER}/pretrain/checkpoint.pth"
        if evaluation == "eval_linear":
            command = [entry_point("MOBY_LINEAR", env), "--cfg", moby_linear_cfg(s.CFG), "--output", s.RUN_DIR,
                       "--tag", "linear", "--pretrained", weights, "--device", s.DEVICE]
            # a full run's batch is the pretraining one: the linear stage gets upstream's recipe
            if mode == "full" or (s.DEVICE != "cpu" and not given_batch):
                command += ["--batch-size", str(moby_linear_batch(s.DEVICE, s.BATCH_SIZE, s.NPROC))]
        else:
            command = [entry_point("MOBY_EVAL_KNN", env), "--cfg", s.CFG, "--output", s.RUN_DIR, "--tag", "knn",
                       "--pretrained", weights, "--device", s.DEVICE]
            if mode == "full":  # the whole train split, whatever subset pretraining used
                command += ["--opts", "DATA.MAX_TRAIN_IMAGES", "0"]
        data_flag, batch_flag, trust_flag = "--data-path", "--batch-size", "--trust-checkpoint"
    if s.DATA_PATH:
        command += [data_flag, s.DATA_PATH]
    if s.DEVICE == "npu":
        command += ["--bin", binary]
    if mode.startswith("eval"):  # evaluation-only runs: the flags given for the evaluation itself
        if given_batch:
            command += [batch_flag, str(s.BATCH_SIZE)]
        if evaluation == "eval_linear" and given_epochs:
            command += ["--epochs", str(s.EPOCHS)]  # both programs spell it so
    if trust:
        command.append(trust_flag)
    return command


def random_init_command(evaluation: list[str], model: str) -> list[str]:
    """The random-initialisation baseline of a CPU full run: the run's own k-NN command without
    its weights, so it is the same evaluation of the untrained network (DINO: no weights means
    random init; MoBY says so with --random-init). Its own --tag keeps MoBY's logs apart."""
    command = [evaluation[0]] + (["--random-init"] if model == "moby" else [])
    words = iter(evaluation[1:])
    for word in words:
        if word in ("--pretrained_weights", "--pretrained"):
            next(words)
        elif word == "--tag":
            next(words)
            command += ["--tag", "random_init"]
        else:
            command.append(word)
    return command


def _contains(words: list[str], part: list[str]) -> bool:
    return any(words[i:i + len(part)] == part for i in range(len(words)))

