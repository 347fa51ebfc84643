"""The training loop shared by pre-training and linear evaluation (upstream train_one_epoch),
resuming, and the throughput test."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from ssl_runtime import device as devices
from ssl_runtime.amp import MixedPrecision
from ssl_runtime.distributed import DistContext
from ssl_runtime.checkpoint import load_first_readable
from ssl_runtime.meters import AverageMeter, SmoothedValue, ThroughputMeter
from ssl_runtime.optim import clear_gradients
from ssl_runtime.profiling import StepProfiler
from ssl_runtime.resilience import StepCheckpointer, StepHealth, restore_rng_state
from ssl_runtime.monitor import TrainingMonitor
from ssl_runtime.collapse import CollapseWatch

from .checkpoint import TRUST_FLAG, auto_resume_candidates, read_checkpoint, resume
from .config import set_values

THROUGHPUT_WARMUP_STEPS = 20  # the Ascend port also times only from the 20th iteration on


@dataclass
class TrainState:
    """What the loop needs besides the model: optimizer, schedule, precision, budget, meters."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    mp: MixedPrecision
    ctx: DistContext
    logger: logging.Logger
    throughput: ThroughputMeter
    iterations_left: int = 0
    # (ours) reliability: batches of the first epoch already done (a mid-epoch resume), the
    # NaN / loss-scale watch and the periodic / SIGTERM checkpoints; see ssl_runtime.resilience
    resume_step: int = 0
    health: StepHealth | None = None
    checkpointer: StepCheckpointer | None = None
    monitor: TrainingMonitor = field(default_factory=TrainingMonitor.disabled)  # TensorBoard, epoch means
    # (ours) TRAIN.SKIP_NON_FINITE: skip a step whose gradient is NaN/inf instead of stopping
    skip_non_finite: bool = False
    # (ours) per-step signals of the model (device tensors, e.g. MoBY's similarity gap) appended to
    # the train line, TensorBoard and log.txt, and the watch that warns when they show a collapse
    signals: Callable[[], dict[str, torch.Tensor]] | None = None
    collapse: CollapseWatch | None = None
    # (ours) a loaded batch -> the model's inputs on the device (the batched augmentation's
    # colour steps, moby.data.batch_preparer); None: a plain copy
    prepare_batch: Callable[[tuple], tuple] | None = None
    # (ours) --profile: a few iterations under torch.profiler (ssl_runtime.profiling)
    profiler: StepProfiler = field(default_factory=StepProfiler.disabled)


def mixed_precision(config: CfgNode, device_type: str) -> MixedPrecision:
    """AMP_OPT_LEVEL and AMP_DTYPE on this device (see ssl_runtime.amp)."""
    return MixedPrecision.from_level(config.AMP_OPT_LEVEL or "O0", device_type, amp_dtype=config.AMP_DTYPE)


def last_epoch(config: CfgNode) -> int:
    """One past the last epoch to train: EPOCHS, or MAX_EPOCHS when it truncates the schedule."""
    if config.TRAIN.MAX_EPOCHS > 0:
        return min(config.TRAIN.EPOCHS, config.TRAIN.MAX_EPOCHS)
    return config.TRAIN.EPOCHS


def planned_iterations(config: CfgNode, steps_per_epoch: int, resume_step: int = 0) -> int:
    """Iterations this run will do: the remaining epochs (up to MAX_EPOCHS), capped by STEPS."""
    iterations = (last_epoch(config) - config.TRAIN.START_EPOCH) * steps_per_epoch - resume_step
    if config.TRAIN.STEPS > 0:
        iterations = min(iterations, config.TRAIN.STEPS)
    return max(iterations, 0)


def accumulation_steps(config: CfgNode) -> int:
    """Iterations per optimizer step. Linear evaluation accumulates gradients over
    ACCUMULATION_STEPS iterations, as upstream's moby_linear.py. Pre-training does only with
    TRAIN.REAL_ACCUMULATION (ours): upstream's moby_main.py steps every iteration and lets
    ACCUMULATION_STEPS scale the learning rates only, which is our default too."""
    steps = max(config.TRAIN.ACCUMULATION_STEPS, 1)
    return steps if config.MODEL.TYPE == "linear" or config.TRAIN.REAL_ACCUMULATION else 1


def prepare_budget(config: CfgNode, state: TrainState, steps_per_epoch: int) -> None:
    """Set the iteration budget and tell the throughput meter when the run ends."""
    state.iterations_left = planned_iterations(config, steps_per_epoch, state.resume_step)
    meter = state.throughput
    meter.total_steps = state.iterations_left // accumulation_steps(config)
    meter.warmup_steps = max(min(THROUGHPUT_WARMUP_STEPS, meter.total_steps // 2), 1)


def optimizer_step(params: list[torch.Tensor], state: TrainState, clip_grad: float) -> torch.Tensor:
    """Unscale, clip (or only measure) the gradient norm, step, clear gradients; no host sync."""
    scaler = state.mp.scaler
    scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else math.inf)
    if _step_allowed(state, grad_norm):
        scaler.step(state.optimizer)
    scaler.update()
    clear_gradients(state.optimizer)
    state.throughput.step()
    return grad_norm.detach()


def _step_allowed(state: TrainState, grad_norm: torch.Tensor) -> bool:
    """False for a NaN/inf gradient under TRAIN.SKIP_NON_FINITE. A loss scaler (fp16, apex)
    skips those steps itself; without one the norm is read, one host sync per step."""
    if not state.skip_non_finite or state.mp.scaler.is_enabled():
        return True
    return bool(torch.isfinite(grad_norm))


LossFn = Callable[[torch.nn.Module, tuple], torch.Tensor]


def train_step(model: torch.nn.Module, batch: tuple, state: TrainState, compute_loss: LossFn,
               params: list[torch.Tensor], clip_grad: float, accumulation: int = 1,
               boundary: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward, scaled backward and, at an accumulation boundary, the optimizer step.

    Returns (loss, gradient norm or None) as device tensors: nothing here waits for the device.
    The training loop and moby/benchmark.py both call it.
    """
    # Between optimizer steps DDP need not all-reduce gradients.
    quiet = model.no_sync() if not boundary and hasattr(model, "no_sync") else contextlib.nullcontext()
    with quiet:
        with state.mp.autocast():
            loss = compute_loss(model, batch)
        state.mp.scaler.scale(loss / accumulation).backward()
    grad_norm = optimizer_step(params, state, clip_grad) if boundary else None
    return loss.detach(), grad_norm


def train_one_epoch(config: CfgNode, model: torch.nn.Module, loader: DataLoader, epoch: int,
                    state: TrainState, compute_loss: LossFn) -> bool:
    """One epoch of compute_loss(model, batch) -> backward -> clipped step -> per-step lr update.

    When gradients are accumulated (accumulation_steps > 1) the loss is divided by their number
    and the optimizer steps every that many iterations (upstream clips at every micro-step;
    clipping the summed gradient once is what the clip is meant to do). Returns True when the
    iteration budget (--steps) ran out.
    """
    model.train()
    clear_gradients(state.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    accumulation = accumulation_steps(config)
    num_steps = len(loader)
    batch_time = AverageMeter()
    # device tensors, read (one host sync) only when a line is printed
    losses, norms = SmoothedValue(), SmoothedValue()
    signal_meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
    start = end = time.time()
    first, state.resume_step = state.resume_step, 0  # the loader already skips those batches
    for idx, batch in enumerate(loader, start=first):
        if state.iterations_left <= 0:
            return True
        state.iterations_left -= 1
        if state.prepare_batch is not None:
            batch = state.prepare_batch(batch)
        else:
            batch = devices.to_device(batch, state.ctx.device)
        boundary = (idx + 1) % accumulation == 0 or idx + 1 == num_steps
        loss, grad_norm = train_step(model, batch, state, compute_loss, params, config.TRAIN.CLIP_GRAD,
                                     accumulation, boundary)
        state.profiler.step()
        if state.health is not None:
            state.health.record(loss)
        signals = state.signals() if state.signals is not None else {}
        for name, value in signals.items():
            signal_meters[name].update(value)
        if grad_norm is not None:
            norms.update(grad_norm)
            state.lr_scheduler.step_update(epoch * num_steps + idx)
            group = state.optimizer.param_groups[0]
            state.monitor.step(epoch * num_steps + idx, loss=loss, lr=group["lr"], wd=group["weight_decay"],
                               **signals)
            if state.checkpointer is not None:
                state.checkpointer.after_step(epoch, idx + 1, num_steps)
        losses.update(loss.float())
        batch_time.update(time.time() - end)
        end = time.time()
        if idx % config.PRINT_FREQ == 0:
            if state.health is not None:
                state.health.check(epoch * num_steps + idx)
            log_train_line(config, epoch, idx, num_steps, batch_time, state, losses, norms, signal_meters)
            if state.collapse is not None and signal_meters:
                state.collapse.observe(epoch * num_steps + idx,
                                       {name: meter.median for name, meter in signal_meters.items()})
    if state.health is not None:
        state.health.check((epoch + 1) * num_steps - 1)
    state.logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(time.time() - start))}")
    return False


def log_train_line(config: CfgNode, epoch: int, idx: int, num_steps: int, batch_time: AverageMeter,
                   state: TrainState, losses: SmoothedValue, norms: SmoothedValue,
                   signals: dict[str, SmoothedValue] | None = None) -> None:
    """Upstream's line, field for field (the launch scripts parse `time` and `loss` from it);
    (ours) the model's signals follow as `\tname value (average)`."""
    lr = state.optimizer.param_groups[0]["lr"]
    memory = devices.max_memory_mb(state.ctx.device)
    eta = batch_time.avg * (num_steps - idx)
    loss, loss_avg = losses.value, losses.global_avg
    norm, norm_avg = norms.value, norms.global_avg
    extra = "".join(f"\t{name} {meter.value:.4f} ({meter.global_avg:.4f})"
                    for name, meter in (signals or {}).items())
    state.logger.info(
        f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
        f"eta {datetime.timedelta(seconds=int(eta))} lr {lr:.6f}\t"
        f"time {batch_time.val:.4f} ({batch_time.avg:.4f})\t"
        f"loss {loss:.4f} ({loss_avg:.4f})\t"
        f"grad_norm {norm:.4f} ({norm_avg:.4f})\t"
        f"mem {memory:.0f}MB{extra}")


def maybe_resume(config: CfgNode, model: torch.nn.Module, state: TrainState) -> float:
    """AUTO_RESUME from the output folder (it wins over --resume, as upstream), then resume.

    The newest readable checkpoint is used: an unreadable one is reported and skipped.
    """
    logger = state.logger
    checkpoint = None
    if config.TRAIN.AUTO_RESUME:
        found = load_first_readable(auto_resume_candidates(config.OUTPUT), warn=logger.warning,
                                    trust=config.MODEL.TRUST_CHECKPOINT, trust_flag=TRUST_FLAG)
        if found:
            checkpoint, path = found
            if config.MODEL.RESUME:
                logger.warning(f"auto-resume changing resume file from {config.MODEL.RESUME} to {path}")
            set_values(config, **{"MODEL.RESUME": str(path)})
            logger.info(f"auto resuming from {path}")
        else:
            logger.info(f"no checkpoint found in {config.OUTPUT}, ignoring auto resume")
    if not config.MODEL.RESUME:
        return 0.0
    if checkpoint is None:
        checkpoint = read_checkpoint(config.MODEL.RESUME, config.MODEL.TRUST_CHECKPOINT)
    max_accuracy = resume(config, model, state.optimizer, state.lr_scheduler, state.mp.scaler, logger,
                          checkpoint)
    if not config.EVAL_MODE and "optimizer" in checkpoint:
        state.resume_step = int(checkpoint.get("epoch_step", 0))
        restore_rng_state(checkpoint.get("rng"), state.ctx.device_type)
        if state.resume_step:
            logger.info(f"resuming inside epoch {config.TRAIN.START_EPOCH} after {state.resume_step} iterations")
    return max_accuracy


@torch.no_grad()
def measure_throughput(loader: DataLoader, model: torch.nn.Module, ctx: DistContext,
                       logger: logging.Logger, prepare: Callable[[tuple], tuple] | None = None) -> float:
    """Upstream's throughput test: 50 warm-up and 30 timed forwards of one batch, eval mode."""
    model.eval()
    batch = next(iter(loader))
    images = prepare(batch)[0] if prepare else batch[0].to(ctx.device, non_blocking=True)
    batch_size = images.shape[0]
    for _ in range(50):
        model(images)
    devices.synchronize(ctx.device)
    logger.info("throughput averaged with 30 times")
    tic = time.time()
    for _ in range(30):
        model(images)
    devices.synchronize(ctx.device)
    throughput = 30 * batch_size / (time.time() - tic)
    logger.info(f"batch_size {batch_size} throughput {throughput}")
    return throughput
