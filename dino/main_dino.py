"""DINO self-supervised pretraining (facebookresearch/dino main_dino.py) on NPU, GPU or CPU.

Run from the repository root:
    python dino/main_dino.py --data_path /path/to/imagenet --output_dir out [flags]
    torchrun --nproc_per_node=8 dino/main_dino.py ...
Rerunning the same command resumes from <output_dir>/checkpoint.pth.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dino/main_dino.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dino.augment import build_dino_augmentation, eval_transform  # noqa: E402
from dino.checkpoints import load_training_state  # noqa: E402
from dino.loss import COLLAPSE_KL_FRACTION, DINOLoss, collapse_kind  # noqa: E402
from dino.models import build_dino_networks, canonical_arch, is_vit  # noqa: E402
from ssl_runtime.amp import AMP_DTYPES, MixedPrecision, load_scaler_state  # noqa: E402
from ssl_runtime.augment import use_batched, views_to_device  # noqa: E402
from ssl_runtime.collapse import CollapseWatch  # noqa: E402
from ssl_runtime.checkpoint import (add_trust_arg, load_first_readable, prepare_output_dir, previous_path,  # noqa: E402
                                    require_entries, save_atomic)
from ssl_runtime.cpu_layout import AUTO_WORKERS, lay_out  # noqa: E402
from ssl_runtime.data import (SafeImageFolder, build_loader, check_same_classes, limit_images,  # noqa: E402
                              resolve_data_path, set_loader_epoch)
from ssl_runtime.device import add_device_arg, compile_module  # noqa: E402
from ssl_runtime.distributed import (DistContext, add_launcher_args, convert_sync_batchnorm,  # noqa: E402
                                     init_distributed, unwrap, wrap_ddp)
from ssl_runtime.ema import ema_update_  # noqa: E402
from ssl_runtime.errors import UserError, main_entry  # noqa: E402
from ssl_runtime.logs import silence_non_main  # noqa: E402
from ssl_runtime.meters import MetricLogger, ThroughputMeter  # noqa: E402
from ssl_runtime.misc import bool_flag, fix_random_seeds  # noqa: E402
from ssl_runtime.resilience import (StepCheckpointer, StepHealth, StopSignal, restore_rng_state,  # noqa: E402
                                    rng_state, skip_batches)
from ssl_runtime.knn import KnnProbe  # noqa: E402
from ssl_runtime.monitor import TENSORBOARD_DIR, TrainingMonitor  # noqa: E402
from ssl_runtime.profiling import StepProfiler, add_profile_arg  # noqa: E402
from ssl_runtime.optim import (OPTIMIZERS, build_optimizer, clear_gradients, held_still,  # noqa: E402
                               in_own_groups, param_groups_weight_decay)
from ssl_runtime.schedules import cosine_schedule  # noqa: E402

PRINT_FREQ = 10
UPSTREAM_WORKERS = 10  # upstream's --num_workers, what AUTO_WORKERS means on NPU/GPU


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO", add_help=False)

    # Model parameters
    parser.add_argument("--arch", default="vit_small", type=str,
                        help="vit_tiny, vit_small, vit_base (deit_* accepted), resnet50, or the "
                             "small CPU ViT vit_pico (2 blocks, width 96)")
    parser.add_argument("--patch_size", default=16, type=int,
                        help="ViT patch size in pixels; below 16 consider --use_fp16 false")
    parser.add_argument("--out_dim", default=65536, type=int, help="dimension of the DINO head output")
    parser.add_argument("--norm_last_layer", default=True, type=bool_flag,
                        help="weight-normalise the head's last layer with a frozen unit norm")
    parser.add_argument("--momentum_teacher", default=0.996, type=float,
                        help="base EMA momentum of the teacher, raised to 1 along a cosine")
    parser.add_argument("--use_bn_in_head", default=False, type=bool_flag,
                        help="use batch normalisation in the projection head")

    # Teacher temperature
    parser.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                        help="initial teacher temperature")
    parser.add_argument("--teacher_temp", default=0.04, type=float,
                        help="teacher temperature after the warm-up")
    parser.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                        help="epochs of linear teacher-temperature warm-up")

    # Training / optimisation
    parser.add_argument("--use_fp16", type=bool_flag, default=True,
                        help="mixed precision: on NPU/GPU autocast to --amp_dtype (fp16 with loss "
                             "scaling by default); on CPU bf16 autocast where the CPU has native bf16 "
                             "(AVX512-BF16, AMX, Arm BF16), else fp32 (env SSL_CPU_AMP=fp32|bf16 "
                             "decides instead). The run prints which and why")
    parser.add_argument("--amp_dtype", default="fp16", choices=AMP_DTYPES,
                        help="(ours) NPU/GPU autocast type of --use_fp16: fp16 (upstream's, with a "
                             "GradScaler) or bf16 (no loss scaling; the remedy for NaN losses under "
                             "fp16). On CPU the CPU's own choice applies (see --use_fp16)")
    parser.add_argument("--amp", action="store_true",
                        help="Ascend-port alias: same as --use_fp16 true")
    parser.add_argument("--use_color_jitter_opti", action="store_true",
                        help="Ascend-port flag, accepted and ignored (a warning says so): the port's "
                             "approximate colour jitter for weak CPUs; torchvision's exact one runs")
    parser.add_argument("--weight_decay", type=float, default=0.04, help="initial weight decay")
    parser.add_argument("--weight_decay_end", type=float, default=0.4, help="final weight decay (cosine)")
    parser.add_argument("--clip_grad", type=float, default=3.0,
                        help="per-parameter gradient norm limit; 0 disables clipping")
    parser.add_argument("--batch_size_per_gpu", default=64, type=int,
                        help="images per device (per process)")
    parser.add_argument("--epochs", default=100, type=int, help="number of training epochs")
    parser.add_argument("--freeze_last_layer", default=1, type=int,
                        help="epochs during which the head's last layer is not updated")
    parser.add_argument("--lr", default=0.0005, type=float,
                        help="peak learning rate for a global batch of 256 (scaled linearly)")
    parser.add_argument("--warmup_epochs", default=10, type=int, help="epochs of linear lr warm-up")
    parser.add_argument("--min_lr", type=float, default=1e-6, help="final learning rate (cosine)")
    parser.add_argument("--optimizer", default="adamw", type=str, choices=list(OPTIMIZERS),
                        help="adamw for ViTs; sgd or lars for convnets; npufusedadamw: torch_npu's "
                             "NpuFusedAdamW (Ascend only)")
    parser.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth rate")
    parser.add_argument("--num_steps", type=int, default=None,
                        help="stop after this many optimizer steps (performance runs)")

    # Multi-crop
    parser.add_argument("--global_crops_scale", type=float, nargs="+", default=(0.4, 1.0),
                        help="area range of the global crops")
    parser.add_argument("--local_crops_number", type=int, default=8,
                        help="number of local crops; 0 disables multi-crop")
    parser.add_argument("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4),
                        help="area range of the local crops")
    parser.add_argument("--img_size", type=int, default=224, help="side of the global crops")
    parser.add_argument("--local_crop_size", type=int, default=96, help="side of the local crops")
    parser.add_argument("--batched_aug", type=bool_flag, default=None,
                        help="(ours) draw each image's augmentation parameters and crop it on the data "
                             "workers, and apply the colour jitter, grayscale, blur and solarisation to "
                             "whole batches as tensor ops where the model runs: the same distributions "
                             "and pixels as the PIL pipeline, several times cheaper on the host. Default: "
                             "true on CPU, false on NPU/GPU")

    # Misc
    parser.add_argument("--data_path", default=None, type=str,
                        help="ImageFolder training images (the folder itself, or a root holding "
                             "train/); default: the bundled Fashion-MNIST")
    parser.add_argument("--max_train_images", default=0, type=int,
                        help="train on a fixed random subset of this many images (0: all; short CPU runs)")
    parser.add_argument("--output_dir", default=".", type=str, help="where logs and checkpoints go")
    parser.add_argument("--saveckp_freq", default=20, type=int, help="save checkpointNNNN.pth every x epochs")
    parser.add_argument("--saveckp_steps", default=0, type=int,
                        help="(ours) also save checkpoint.pth every x steps inside an epoch, so an "
                             "interrupted run loses at most x steps (0: only at epoch ends)")
    parser.add_argument("--seed", default=0, type=int, help="random seed")
    parser.add_argument("--compile", default=False, type=bool_flag,
                        help="torch.compile the student and teacher backbones (CUDA, CPU; not NPU)")
    parser.add_argument("--num_workers", default=AUTO_WORKERS, type=int,
                        help="data loading workers per process; -1 (default): upstream's 10 on NPU/GPU, "
                             "on CPU planned with the torch threads (ssl_runtime/cpu_layout.py)")
    parser.add_argument("--knn_every", default=0, type=int,
                        help="(ours) every N epochs, a quick 20-NN top-1 of the teacher's backbone on "
                             "fixed 5,000 train / 1,000 val images (val/ beside the training folder), "
                             "to see the features improve while training runs; 0: off")
    parser.add_argument("--tensorboard", default=True, type=bool_flag,
                        help="write TensorBoard scalars to <output_dir>/tensorboard (rank 0, when the "
                             "tensorboard package is installed)")
    add_trust_arg(parser)  # (ours) resuming from a checkpoint the safe loader refuses
    add_profile_arg(parser)
    add_launcher_args(parser)
    add_device_arg(parser)
    return parser


def _check_scale(name: str, values) -> None:
    if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
        raise UserError(f"--{name} needs two numbers 0 < min <= max <= 1, got {list(values)}")


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad settings before any data or model is touched."""
    args.arch = canonical_arch(args.arch)
    if args.amp:
        args.use_fp16 = True
    if args.use_color_jitter_opti and os.environ.get("RANK", "0") == "0":
        print("warning: --use_color_jitter_opti is ignored: the exact torchvision ColorJitter runs "
              "(the Ascend port's approximation is not ported)", file=sys.stderr)
    positive = {"epochs": args.epochs, "batch_size_per_gpu": args.batch_size_per_gpu,
                "out_dim": args.out_dim, "img_size": args.img_size,
                "local_crop_size": args.local_crop_size, "patch_size": args.patch_size}
    for name, value in positive.items():
        if value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    if args.num_steps is not None and args.num_steps <= 0:
        raise UserError(f"--num_steps must be positive, got {args.num_steps}")
    if args.local_crops_number < 0:
        raise UserError(f"--local_crops_number must be >= 0, got {args.local_crops_number}")
    if args.local_crop_size > args.img_size:
        raise UserError(f"--local_crop_size {args.local_crop_size} is larger than --img_size "
                        f"{args.img_size}: local crops must not exceed the global crops")
    if is_vit(args.arch):
        for name in ("img_size", "local_crop_size"):
            if getattr(args, name) % args.patch_size:
                raise UserError(f"--patch_size {args.patch_size} does not divide --{name} "
                                f"{getattr(args, name)}: choose sizes that are multiples of the patch")
    for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):
        if not 0 <= getattr(args, name) <= args.epochs:
            raise UserError(f"--{name} {getattr(args, name)} must be between 0 and --epochs {args.epochs}")
    _check_scale("global_crops_scale", args.global_crops_scale)
    _check_scale("local_crops_scale", args.local_crops_scale)
    if args.num_workers < AUTO_WORKERS:
        raise UserError(f"--num_workers must be >= 0 (or -1: automatic), got {args.num_workers}")
    if min(args.clip_grad, args.freeze_last_layer, args.saveckp_freq, args.max_train_images,
           args.saveckp_steps, args.knn_every) < 0:
        raise UserError("--clip_grad, --freeze_last_layer, --saveckp_freq, --saveckp_steps, "
                        "--max_train_images and --knn_every must be >= 0")


def training_folder(data_path: str | None) -> Path:
    """Upstream points --data_path at the train/ folder itself; a dataset root holding train/ works too."""
    root = resolve_data_path(data_path, need=())
    return root / "train" if (root / "train").is_dir() else root


def build_knn_probe(args, data_folder: Path, ctx: DistContext) -> KnnProbe | None:
    """--knn_every: the probe's train images from the training folder, val images from val/ beside it."""
    if not args.knn_every:
        return None
    val_folder = data_folder.parent / "val"
    if not val_folder.is_dir():
        raise UserError(f"--knn_every needs labelled validation images in {val_folder} (beside the "
                        f"training folder {data_folder}): add them, or leave --knn_every at 0")
    transform = eval_transform(args.img_size)
    train_set = SafeImageFolder(data_folder, transform=transform)
    val_set = SafeImageFolder(val_folder, transform=transform)
    check_same_classes(train_set, val_set)
    return KnnProbe(train_set, val_set, args.knn_every, ctx, args.batch_size_per_gpu, args.num_workers,
                    args.seed)


# ---------------------------------------------------------------- one optimisation step's pieces

@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> list[torch.Tensor]:
    """Upstream's per-parameter clipping (each gradient scaled to norm <= clip), without host syncs."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads)
    coefs = (clip / (torch.stack(norms) + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind(0)))
    return norms


def frozen_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> list[nn.Parameter]:
    """The head's last-layer parameters while they are kept fixed (the first `freeze_last_layer`
    epochs; stabilises the start), else none. Upstream sets their gradients to None; the step
    holds them still with ssl_runtime.optim.held_still, which does that on every optimizer that
    can skip a parameter (see there for torch_npu's fused ones)."""
    if epoch >= freeze_last_layer:
        return []
    return last_layer_parameters(model)


def last_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [param for name, param in model.named_parameters() if "last_layer" in name]


DINO_ADVICE = "--amp_dtype bf16 (NPU/GPU), --use_fp16 false, a lower --lr or a higher --clip_grad"


COLLAPSE_ADVICE = {
    "uniform": ("the teacher's output is close to uniform (too little sharpening). Usual remedies: a "
                "lower --teacher_temp / --warmup_teacher_temp (0.04), a higher --momentum_teacher "
                "(0.9995 for small batches), a smaller --out_dim, --use_bn_in_head true, a lower --lr"),
    "one dimension": ("the teacher's output sits on one dimension (too little centring). Usual "
                      "remedies: a lower --lr, a higher --momentum_teacher, a smaller --out_dim, "
                      "--freeze_last_layer 1 or more, --teacher_temp up to 0.07 after a "
                      "--warmup_teacher_temp_epochs warm-up"),
}


def dino_collapse_diagnosis(max_entropy: float):
    """The CollapseWatch diagnosis of DINO's signals (teacher_entropy, kl; see dino.loss)."""
    def diagnose(values) -> str | None:
        entropy, kl = values["teacher_entropy"], values["kl"]
        kind = collapse_kind(entropy, kl, max_entropy)
        if kind is None:
            return None
        return (f"the KL between teacher and student is {kl:.4f}, below "
                f"{COLLAPSE_KL_FRACTION:.0%} of ln(out_dim) = {max_entropy:.3f}, and the teacher's "
                f"entropy is {entropy:.3f} ({entropy / max_entropy:.0%} of ln(out_dim)): "
                f"{COLLAPSE_ADVICE[kind]}")
    return diagnose


class NonFiniteLossGuard(StepHealth):
    """Stops on a NaN/inf loss and logs fp16 loss-scale drops (see ssl_runtime.resilience)."""

    def __init__(self, device: torch.device, scaler=None):
        super().__init__(device, DINO_ADVICE, scaler)


# ---------------------------------------------------------------- training

def train_step(student, teacher, dino_loss, images: list[torch.Tensor], optimizer, mp, epoch: int,
               momentum: float, args, params: tuple[list, list]) -> torch.Tensor:
    """One optimisation step on a batch of crops already on the device; returns the loss tensor.

    Never waits for the device: the training loop and dino/benchmark.py both call it.
    """
    student_params, teacher_params = params
    with mp.autocast():
        with torch.no_grad():
            teacher_output = teacher(images[:2])  # the teacher sees the 2 global views only
        student_output = student(images)
        loss = dino_loss(student_output, teacher_output, epoch)

    clear_gradients(optimizer)
    mp.scaler.scale(loss).backward()
    if args.clip_grad:
        mp.scaler.unscale_(optimizer)
        clip_gradients(student, args.clip_grad)
    with held_still(optimizer, frozen_last_layer(epoch, student, args.freeze_last_layer)):
        mp.scaler.step(optimizer)
    mp.scaler.update()

    ema_update_(teacher_params, student_params, momentum)
    return loss.detach()


def set_schedule_values(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(lr)  # a Python number (the schedules are numpy): safe to unpickle
        if i == 0 or group.get("split_from") == 0:  # only the first group is regularised
            group["weight_decay"] = float(wd)


def train_one_epoch(student, teacher, dino_loss, data_loader, optimizer, mp, schedules, epoch,
                    args, ctx: DistContext, throughput: ThroughputMeter, guard: NonFiniteLossGuard,
                    steps_left: int | None, start_step: int = 0,
                    checkpointer: StepCheckpointer | None = None,
                    monitor: TrainingMonitor = TrainingMonitor.disabled(),
                    collapse: CollapseWatch | None = None,
                    prepare_views=None,
                    profiler: StepProfiler = StepProfiler.disabled()) -> tuple[dict, int, bool]:
    """One pass over the data (or fewer steps) from batch `start_step` on (a mid-epoch resume);
    returns (stats, steps done, epoch completed). prepare_views turns a loaded batch of views
    into the crops on the device (ssl_runtime.augment.views_to_device)."""
    lr_schedule, wd_schedule, momentum_schedule = schedules
    prepare_views = prepare_views or views_to_device(None, ctx.device)
    params = (list(unwrap(student).parameters()), list(teacher.parameters()))
    metric_logger = MetricLogger(delimiter="  ", device=ctx.device)
    header = f"Epoch: [{epoch}/{args.epochs}]"
    steps, loss = 0, torch.zeros(())
    total = len(data_loader) - start_step
    total = total if steps_left is None else min(total, steps_left)
    batches = itertools.islice(data_loader, total)  # a --num_steps run may end mid-epoch
    for it, (images, _) in enumerate(metric_logger.log_every(batches, PRINT_FREQ, header, total=total),
                                     start=start_step):
        global_it = len(data_loader) * epoch + it
        set_schedule_values(optimizer, lr_schedule[global_it], wd_schedule[global_it])
        images = prepare_views(images)
        loss = train_step(student, teacher, dino_loss, images, optimizer, mp, epoch,
                          float(momentum_schedule[global_it]), args, params)
        guard.record(loss)
        if it % PRINT_FREQ == 0:
            guard.check(global_it, loss)

        metric_logger.update(loss=loss)
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        metric_logger.update(wd=optimizer.param_groups[0]["weight_decay"])
        # (ours) the collapse signals, after upstream's fields
        signals = {"teacher_entropy": dino_loss.teacher_entropy, "kl": dino_loss.kl}
        metric_logger.update_extra(**signals)
        if collapse is not None and it % PRINT_FREQ == 0:  # read when the line is printed anyway
            collapse.observe(global_it, {name: metric_logger.meters[name].median for name in signals})
        throughput.step()
        profiler.step()
        steps += 1
        monitor.step(global_it, loss=loss, lr=optimizer.param_groups[0]["lr"],
                     wd=optimizer.param_groups[0]["weight_decay"], momentum=momentum_schedule[global_it],
                     teacher_temp=dino_loss.teacher_temp_schedule[epoch], **signals)
        if checkpointer is not None:
            checkpointer.after_step(epoch, it + 1, len(data_loader))
    guard.check(len(data_loader) * epoch + start_step + steps - 1, loss)
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger, flush=True)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    return stats, steps, start_step + steps == len(data_loader)


def build_student_teacher(args, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """The student (in DDP when distributed) and a teacher starting from the very same weights."""
    student, teacher, _ = build_dino_networks(args)
    student = convert_sync_batchnorm(student.to(ctx.device), ctx)
    teacher = convert_sync_batchnorm(teacher.to(ctx.device), ctx)
    student = wrap_ddp(student, ctx)  # DDP broadcasts rank 0's weights to every rank...
    teacher.load_state_dict(unwrap(student).state_dict())  # ...so copy them only afterwards
    for p in teacher.parameters():
        p.requires_grad = False  # the teacher only follows the student's EMA
    if getattr(args, "compile", False):
        compile_module(unwrap(student).backbone, ctx.device_type)
        compile_module(teacher.backbone, ctx.device_type)
    return student, teacher


def resume_candidates(output_dir: Path) -> list[Path]:
    """checkpoint.pth, then the one it replaced, then the periodic checkpointNNNN.pth, newest first."""
    periodic = sorted(output_dir.glob("checkpoint[0-9][0-9][0-9][0-9].pth"), reverse=True)
    latest = output_dir / "checkpoint.pth"
    return [latest, previous_path(latest), *periodic]


def restart_from_checkpoint(output_dir: Path, student, teacher, optimizer, mp, dino_loss,
                            device_type: str = "cpu", trust: bool = False) -> tuple[int, int]:
    """Resume everything from the newest readable checkpoint in output_dir (checkpoint.pth
    normally); returns (epoch, batches of that epoch already done)."""
    found = load_first_readable(resume_candidates(output_dir), trust=trust)
    if found is None:
        return 0, 0
    checkpoint, path = found
    print(f"Found checkpoint at {path}")
    require_entries(checkpoint, path, ("student", "teacher", "optimizer", "dino_loss", "epoch"),
                    "it is not a training checkpoint of main_dino.py; move it out of --output_dir, or "
                    "choose another --output_dir")
    load_training_state(unwrap(student), checkpoint["student"], f"'student' in {path}")
    load_training_state(teacher, checkpoint["teacher"], f"'teacher' in {path}")
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UserError(f"the optimizer state in {path} does not fit this run ({exc}): the "
                        "checkpoint was written with other model/optimizer settings; use another "
                        "--output_dir or the original flags") from None
    dino_loss.load_state_dict(checkpoint["dino_loss"])
    if checkpoint.get("fp16_scaler"):
        load_scaler_state(mp.scaler, checkpoint["fp16_scaler"])
    restore_rng_state(checkpoint.get("rng"), device_type)
    step = int(checkpoint.get("epoch_step", 0))
    where = f"epoch {checkpoint['epoch']}" + (f", step {step}" if step else "")
    print(f"=> resumed student, teacher, optimizer, dino_loss from {path} at {where}")
    return int(checkpoint["epoch"]), step


def build_schedules(args, niter_per_ep: int, world_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-iteration learning rate, weight decay and teacher momentum, as upstream."""
    peak_lr = args.lr * args.batch_size_per_gpu * world_size / 256.0  # linear scaling rule
    return (
        cosine_schedule(peak_lr, args.min_lr, args.epochs, niter_per_ep, warmup_epochs=args.warmup_epochs),
        cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_ep),
        cosine_schedule(args.momentum_teacher, 1.0, args.epochs, niter_per_ep),
    )


def mixed_precision(args, device_type: str) -> MixedPrecision:
    """--use_fp16 and --amp_dtype on this device (see ssl_runtime.amp)."""
    return MixedPrecision.from_flag(args.use_fp16, device_type, amp_dtype=args.amp_dtype)


def build_optimizer_for(student: nn.Module, args, ctx: DistContext) -> torch.optim.Optimizer:
    groups = param_groups_weight_decay(unwrap(student), args.weight_decay)
    if args.optimizer == "npufusedadamw":  # its freeze restarts whole groups (see held_still)
        groups = in_own_groups(groups, last_layer_parameters(unwrap(student)))
    # the lr and the group-0 weight decay are overwritten by the schedules at every step
    return build_optimizer(args.optimizer, groups, ctx.device_type, lr=0.0, momentum=0.9)


def save_checkpoint(args, epoch_to_resume: int, student, teacher, optimizer, mp, dino_loss,
                    epoch: int, ctx: DistContext, epoch_step: int = 0) -> None:
    """checkpoint.pth (the one it replaces kept as checkpoint.previous.pth) and, every
    --saveckp_freq epochs, checkpointNNNN.pth. epoch_step > 0: saved inside an epoch, after
    that many of its batches (no checkpointNNNN.pth then)."""
    if not ctx.is_main:
        return
    # The student is saved without the DDP `module.` prefix, so a checkpoint from N processes
    # resumes on M; loading accepts both spellings (official full checkpoints carry it).
    save_dict = {
        "student": unwrap(student).state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch_to_resume,
        "args": dict(vars(args)),  # a plain dict (upstream: the Namespace), for the safe loader
        "dino_loss": dino_loss.state_dict(),
        "epoch_step": epoch_step,  # (ours) batches of `epoch` already done: a mid-epoch resume
        "rng": rng_state(ctx.device_type),  # (ours) so a resumed run draws what it would have
    }
    if mp.scaler.is_enabled():
        save_dict["fp16_scaler"] = mp.scaler.state_dict()
    out = Path(args.output_dir)
    save_atomic(save_dict, out / "checkpoint.pth", keep_previous=True)
    if not epoch_step and args.saveckp_freq and epoch % args.saveckp_freq == 0:
        save_atomic(save_dict, out / f"checkpoint{epoch:04}.pth")


def train_dino(args: argparse.Namespace) -> None:
    validate_args(args)
    data_folder = training_folder(args.data_path)
    ctx = init_distributed(args.device, args.local_rank, args.dist_url)
    silence_non_main(ctx.is_main)
    fix_random_seeds(args.seed)
    args.batched_aug = use_batched(args.batched_aug, ctx.device_type)
    args.num_workers, layout = lay_out(args.num_workers, ctx.device_type, UPSTREAM_WORKERS, args.batched_aug)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    print(layout)
    prepare_output_dir(args.output_dir)

    # ============ data ============
    transform = build_dino_augmentation(args.global_crops_scale, args.local_crops_scale,
                                        args.local_crops_number, args.img_size, args.local_crop_size,
                                        args.batched_aug)
    dataset = limit_images(SafeImageFolder(data_folder, transform=transform), args.max_train_images, args.seed)
    data_loader = build_loader(dataset, args.batch_size_per_gpu, args.num_workers, ctx,
                               shuffle=True, drop_last=True, seed=args.seed)
    print(f"Data loaded: there are {len(dataset)} images.")
    knn_probe = build_knn_probe(args, data_folder, ctx)

    # ============ student and teacher ============
    student, teacher = build_student_teacher(args, ctx)
    print(f"Student and Teacher are built: they are both {args.arch} network.")

    # ============ loss, optimizer, schedules ============
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs).to(ctx.device)
    optimizer = build_optimizer_for(student, args, ctx)
    mp = mixed_precision(args, ctx.device_type)
    niter = len(data_loader)
    schedules = build_schedules(args, niter, ctx.world_size)
    print(f"Loss, optimizer and schedulers ready ({mp.describe()}).")
    print(mp.precision_line())

    # ============ resume ============
    start_epoch, start_step = restart_from_checkpoint(Path(args.output_dir), student, teacher,
                                                      optimizer, mp, dino_loss, ctx.device_type,
                                                      args.trust_checkpoint)
    skip_batches(data_loader, start_step)

    def save_at(epoch_to_resume: int, epoch_step: int) -> None:
        guard.check(niter * epoch_to_resume + epoch_step - 1)  # never save a diverged state
        save_checkpoint(args, epoch_to_resume, student, teacher, optimizer, mp, dino_loss,
                        epoch_to_resume if epoch_step else epoch_to_resume - 1, ctx, epoch_step)

    checkpointer = StepCheckpointer(save_at, args.saveckp_steps, StopSignal(), check_every=PRINT_FREQ)

    remaining = (args.epochs - start_epoch) * niter - start_step
    budget = remaining if args.num_steps is None else min(args.num_steps, remaining)
    throughput = ThroughputMeter(args.batch_size_per_gpu * ctx.world_size, total_steps=budget,
                                 device=ctx.device)
    guard = NonFiniteLossGuard(ctx.device, mp.scaler)
    monitor = TrainingMonitor(Path(args.output_dir) / TENSORBOARD_DIR, ctx.is_main, every=PRINT_FREQ,
                              images_per_step=args.batch_size_per_gpu * ctx.world_size,
                              enabled=args.tensorboard, epoch_means=False)  # MetricLogger has them
    # watched from the end of the lr warm-up on; 5 checks in a row = 50 steps of 20-step medians
    collapse = CollapseWatch(dino_collapse_diagnosis(dino_loss.max_entropy),
                             start_step=args.warmup_epochs * niter, patience=5)
    profiler = StepProfiler(args.profile, args.output_dir, ctx.device_type, enabled=ctx.is_main)
    start_time = time.time()
    print("Starting DINO training !")
    steps_done = 0
    for epoch in range(start_epoch, args.epochs):
        if steps_done >= budget:
            break
        set_loader_epoch(data_loader, epoch)
        stats, steps, completed = train_one_epoch(
            student, teacher, dino_loss, data_loader, optimizer, mp, schedules, epoch, args, ctx,
            throughput, guard, None if args.num_steps is None else budget - steps_done,
            start_step if epoch == start_epoch else 0, checkpointer, monitor, collapse,
            views_to_device(transform, ctx.device), profiler)
        monitor.scalars(epoch, "epoch", stats)
        steps_done += steps
        # an epoch cut short by --num_steps resumes at the batch where it stopped
        cut_at = 0 if completed else steps + (start_step if epoch == start_epoch else 0)
        save_checkpoint(args, epoch + 1 if completed else epoch, student, teacher, optimizer, mp,
                        dino_loss, epoch, ctx, cut_at)
        record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                  "ln_out_dim": dino_loss.max_entropy}
        if knn_probe is not None and completed and knn_probe.due(epoch):
            top1 = knn_probe(teacher.backbone)
            print(knn_probe.line(epoch, top1, "teacher backbone"), flush=True)
            monitor.scalars(epoch, "val", {"knn_probe_acc1": top1})
            record["test_knn_probe_acc1"] = top1
        if ctx.is_main:
            with (Path(args.output_dir) / "log.txt").open("a") as f:
                f.write(json.dumps(record) + "\n")
    checkpointer.close()
    monitor.close()
    profiler.close()
    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total_time}")
    if steps_done == 0:
        print(f"Nothing to train: the checkpoint in {args.output_dir} is already at epoch {start_epoch}.")
    else:
        print(throughput.summary_line(), flush=True)


@main_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("DINO", parents=[get_args_parser()])
    train_dino(parser.parse_args(argv))


if __name__ == "__main__":
    main()
