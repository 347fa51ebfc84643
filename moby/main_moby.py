"""MoBY self-supervised pre-training (upstream Transformer-SSL moby_main.py).

    python moby/main_moby.py --cfg configs/moby_swin_tiny.yaml --data-path <imagenet> --batch-size 64
    torchrun --nproc_per_node=8 moby/main_moby.py --cfg configs/moby_swin_tiny.yaml ...

Output folder: <--output>/<MODEL.NAME>/<--tag>, holding config.json, log_rank{r}.txt,
ckpt_epoch_{e}.pth and checkpoint.pth; a rerun with the same folder resumes from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datetime  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from moby.checkpoint import save_checkpoint  # noqa: E402
from moby.cli import add_pretrain_limits, base_parser, open_output, parse_config, start_run  # noqa: E402
from moby.config import set_values  # noqa: E402
from moby.data import BICUBIC, batch_preparer, build_labelled_datasets, build_pretrain_dataset, eval_transform  # noqa: E402
from moby.engine import (THROUGHPUT_WARMUP_STEPS, TrainState, accumulation_steps, last_epoch,  # noqa: E402
                         maybe_resume, measure_throughput, mixed_precision, prepare_budget,
                         train_one_epoch)
from moby.model import build_moby, check_queue_size, maybe_compile_encoders  # noqa: E402
from moby.monitoring import attach_monitor, collapse_watch, log_epoch, momentum_source  # noqa: E402
from moby.optimization import build_optimizer, build_scheduler, scale_learning_rates  # noqa: E402
from ssl_runtime.data import build_loader, set_loader_epoch  # noqa: E402
from ssl_runtime.distributed import DistContext, convert_sync_batchnorm, wrap_ddp  # noqa: E402
from ssl_runtime.errors import main_entry  # noqa: E402
from ssl_runtime.knn import KnnProbe  # noqa: E402
from ssl_runtime.meters import ThroughputMeter  # noqa: E402
from ssl_runtime.profiling import StepProfiler, add_profile_arg  # noqa: E402
from ssl_runtime.resilience import StepCheckpointer, StepHealth, StopSignal, skip_batches  # noqa: E402


def moby_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    view_1, view_2, _labels = batch
    return model(view_1, view_2)


MOBY_ADVICE = ("--amp-dtype bf16 (NPU/GPU), --amp-opt-level O0, a lower TRAIN.BASE_LR or "
               "TRAIN.CLIP_GRAD, or --opts TRAIN.SKIP_NON_FINITE True to skip such steps as upstream "
               "does under apex")


def step_checkpointer(config: CfgNode, moby: torch.nn.Module, state: TrainState,
                      steps_per_epoch: int) -> StepCheckpointer:
    """checkpoint.pth every TRAIN.SAVE_STEPS iterations inside an epoch, and on SIGTERM."""

    def save_at(epoch: int, epoch_step: int) -> None:
        state.health.check(epoch * steps_per_epoch + epoch_step - 1)  # never save a diverged state
        if state.ctx.is_main:
            # an epoch-boundary save (epoch_step 0) names the epoch just finished
            save_checkpoint(config, epoch if epoch_step else epoch - 1, moby, 0.0, state.optimizer,
                            state.lr_scheduler, state.mp.scaler, state.logger, epoch_step,
                            state.ctx.device_type)

    return StepCheckpointer(save_at, config.TRAIN.SAVE_STEPS, StopSignal(), state.logger.info,
                            check_every=config.PRINT_FREQ)


def build_knn_probe(config: CfgNode, ctx: DistContext) -> KnnProbe | None:
    """TRAIN.KNN_EVERY / --knn_every: the probe over DATA_PATH's train/ and val/ (eval transform)."""
    if not config.TRAIN.KNN_EVERY:
        return None
    transform = eval_transform(config, interpolation=BICUBIC)
    train, val = build_labelled_datasets(config, transform, transform)
    return KnnProbe(train, val, config.TRAIN.KNN_EVERY, ctx, config.DATA.BATCH_SIZE,
                    config.DATA.NUM_WORKERS, config.SEED)


def pretrain(config: CfgNode, ctx: DistContext, logger: logging.Logger,
             profile: tuple[int, int] | None = None) -> None:
    """Pre-training; `profile`: the iterations --profile records (None: off)."""
    dataset = build_pretrain_dataset(config)
    loader = build_loader(dataset, config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS, ctx,
                          shuffle=True, drop_last=True, seed=config.SEED)
    set_values(config, **{"DATA.TRAINING_IMAGES": len(dataset), "MODEL.NUM_CLASSES": len(dataset.classes)})
    steps_per_epoch = len(loader)

    logger.info(f"Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}")
    moby = build_moby(config, steps_per_epoch)
    moby = convert_sync_batchnorm(moby, ctx).to(ctx.device)
    maybe_compile_encoders(config, moby, ctx.device_type)
    logger.info(str(moby))
    optimizer = build_optimizer(config, moby, ctx.device_type)
    mp = mixed_precision(config, ctx.device_type)
    moby, optimizer = mp.prepare(moby, optimizer)
    logger.info(f"mixed precision: {mp.describe()}")
    logger.info(mp.precision_line())
    model = wrap_ddp(moby, ctx, broadcast_buffers=False)
    logger.info(f"number of params: {sum(p.numel() for p in moby.parameters() if p.requires_grad)}")

    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    global_batch = config.DATA.BATCH_SIZE * ctx.world_size * accumulation_steps(config)
    throughput = ThroughputMeter(global_batch, warmup_steps=THROUGHPUT_WARMUP_STEPS, device=ctx.device)
    state = TrainState(optimizer, lr_scheduler, mp, ctx, logger, throughput,
                       skip_non_finite=config.TRAIN.SKIP_NON_FINITE)
    state.health = StepHealth(ctx.device, MOBY_ADVICE, mp.scaler, logger.info,
                              stop=not config.TRAIN.SKIP_NON_FINITE)
    state.prepare_batch = batch_preparer(dataset, ctx.device)
    maybe_resume(config, moby, state)
    attach_monitor(config, state, ctx, logger, global_batch).add_source(momentum_source(moby))
    state.signals = lambda: moby.signals  # (ours) pos_sim, neg_sim, sim_gap of the last forward
    state.collapse = collapse_watch(config, steps_per_epoch, ctx.world_size, logger)
    if config.MODEL.RESUME:
        # Upstream fixes the momentum position when the model is built, before the checkpoint is
        # read, so a resumed run restarts the momentum schedule from its start; we continue it.
        moby.step = config.TRAIN.START_EPOCH * steps_per_epoch + state.resume_step
    skip_batches(loader, state.resume_step)

    if config.THROUGHPUT_MODE:
        measure_throughput(loader, moby.encoder, ctx, logger, state.prepare_batch)
        return
    if config.EVAL_MODE:
        from moby.eval_knn import knn_on_encoder

        knn_on_encoder(config, moby.encoder, ctx, logger)
        return

    knn_probe = build_knn_probe(config, ctx)
    prepare_budget(config, state, steps_per_epoch)
    state.checkpointer = step_checkpointer(config, moby, state, steps_per_epoch)
    state.profiler = StepProfiler(profile, config.OUTPUT, ctx.device_type, enabled=ctx.is_main,
                                  print_fn=logger.info)
    logger.info("Start self-supervised pre-training")
    start_time = time.time()
    stopped = False
    for epoch in range(config.TRAIN.START_EPOCH, last_epoch(config)):
        if state.iterations_left <= 0:
            break
        set_loader_epoch(loader, epoch)
        stopped = train_one_epoch(config, model, loader, epoch, state, moby_loss)
        evaluation = {}
        if knn_probe is not None and not stopped and knn_probe.due(epoch):
            evaluation["knn_probe_acc1"] = knn_probe(moby.encoder)
            logger.info(knn_probe.line(epoch, evaluation["knn_probe_acc1"], "online encoder"))
        log_epoch(config, state, epoch, **evaluation)
        if stopped:
            # Ascend's --steps exits here without saving; we keep the weights for evaluation.
            logger.info(f"stopped after {config.TRAIN.STEPS} iterations (--steps) inside epoch {epoch}")
        if ctx.is_main and (stopped or epoch % config.SAVE_FREQ == 0 or epoch == last_epoch(config) - 1):
            save_checkpoint(config, epoch, moby, 0.0, optimizer, lr_scheduler, mp.scaler, logger,
                            device_type=ctx.device_type)
        if stopped:
            break

    state.checkpointer.close()
    state.monitor.close()
    state.profiler.close()
    # A run cut by Ascend's --steps or --max_epochs ends, as in the Ascend port (exit(0)), without
    # upstream's closing line: the port's collectors (grep 'INFO Train') would take it for a step line.
    if not (stopped or last_epoch(config) < config.TRAIN.EPOCHS):
        logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if throughput.steps:  # also when all were warm-up (nan): the launch scripts say so
        logger.info(throughput.summary_line())


@main_entry
def main(argv: list[str] | None = None) -> None:
    parser = base_parser("MoBY training and evaluation script")
    add_pretrain_limits(parser)
    add_profile_arg(parser)
    args, config = parse_config(parser, argv)
    ctx = start_run(config, args, pretraining=True)
    check_queue_size(config, ctx.world_size)
    scale_learning_rates(config, ctx.world_size)
    logger = open_output(config, ctx)
    pretrain(config, ctx, logger, args.profile)


if __name__ == "__main__":
    main()
