"""Time MoBY's training step and its two-view data pipeline.

Takes main_moby.py's config and flags (--cfg, --batch-size, --opts, --amp-dtype, --device,
--compile) plus the --bench_* flags. The step is engine.train_step itself (both views through
the online and target encoders, queues, loss, backward, clipping, optimizer, lr schedule) on random
views already on the device, once per --bench_precision (default: fp32 and the automatic
mixed-precision choice, side by side); the data pipeline is timed apart, on the dataset's images.

    python moby/benchmark.py --cfg configs/moby_swin_tiny.yaml --batch-size 8 \
        --bench_json out/moby_swin_tiny.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python moby/benchmark.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from moby.cli import UPSTREAM_WORKERS, add_pretrain_limits, base_parser, parse_config  # noqa: E402
from moby.config import set_values  # noqa: E402
from moby.data import batch_preparer, two_view_dataset  # noqa: E402
from moby.engine import TrainState, train_step  # noqa: E402
from moby.main_moby import moby_loss  # noqa: E402
from moby.model import build_moby, check_queue_size, maybe_compile_encoders  # noqa: E402
from moby.optimization import build_optimizer, build_scheduler  # noqa: E402
from ssl_runtime import bench  # noqa: E402
from ssl_runtime.amp import MixedPrecision  # noqa: E402
from ssl_runtime.augment import use_batched  # noqa: E402
from ssl_runtime.cpu_layout import plan_workers  # noqa: E402
from ssl_runtime.data import SafeImageFolder  # noqa: E402
from ssl_runtime.device import set_fast_math  # noqa: E402
from ssl_runtime.distributed import single_process_context  # noqa: E402
from ssl_runtime.errors import main_entry  # noqa: E402
from ssl_runtime.meters import ThroughputMeter  # noqa: E402
from ssl_runtime.misc import seed_everything  # noqa: E402

STEPS_PER_EPOCH = 1000  # only positions the schedules; nothing is trained for that long


def default_name(config: CfgNode, device_type: str) -> str:
    model = config.MODEL
    encoder = f"swin C{model.SWIN.EMBED_DIM} {'-'.join(map(str, model.SWIN.DEPTHS))} patch " \
              f"{model.SWIN.PATCH_SIZE} window {model.SWIN.WINDOW_SIZE}" \
        if model.MOBY.ENCODER == "swin" else model.MOBY.ENCODER
    return (f"moby {encoder} {config.DATA.IMG_SIZE}px queue {model.MOBY.CONTRAST_NUM_NEGATIVE} batch "
            f"{config.DATA.BATCH_SIZE} {device_type}")


def build_moby_step(config: CfgNode, ctx, seed: int, mp: MixedPrecision) -> Callable[[], torch.Tensor]:
    """engine.train_step plus the lr-schedule update on fixed random views, built as in training
    (the same weights on every call: the seed is set first)."""
    seed_everything(seed)
    moby = build_moby(config, STEPS_PER_EPOCH).to(ctx.device)
    maybe_compile_encoders(config, moby, ctx.device_type)
    optimizer = build_optimizer(config, moby, ctx.device_type)
    moby, optimizer = mp.prepare(moby, optimizer)
    scheduler = build_scheduler(config, optimizer, STEPS_PER_EPOCH)
    state = TrainState(optimizer, scheduler, mp, ctx, logging.getLogger("moby.benchmark"),
                       ThroughputMeter(config.DATA.BATCH_SIZE))
    moby.train()
    params = [p for p in moby.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    shape = (config.DATA.BATCH_SIZE, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    batch = (torch.randn(shape, generator=generator).to(ctx.device),
             torch.randn(shape, generator=generator).to(ctx.device), None)
    iteration = [config.TRAIN.WARMUP_EPOCHS * STEPS_PER_EPOCH]  # past the warm-up: a full-lr step

    def step() -> torch.Tensor:
        loss, _ = train_step(moby, batch, state, moby_loss, params, config.TRAIN.CLIP_GRAD)
        scheduler.step_update(iteration[0])
        iteration[0] += 1
        return loss

    return step


def time_moby_steps(config: CfgNode, ctx, seed: int, precisions: dict[str, MixedPrecision], steps: int,
                    warmup: int) -> list[bench.StepFigures]:
    return bench.time_precisions(lambda mp: build_moby_step(config, ctx, seed, mp), precisions, ctx.device,
                                 config.DATA.BATCH_SIZE, steps, warmup)


def time_moby_pipeline(config: CfgNode, workers: list[int], batches: int, device) -> dict[int, float]:
    """Loader images/s per worker count, with the batched augmentation's per-batch part (on the
    device) included when AUG.BATCHED is on, as in training."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = bench.pipeline_folder(config.DATA.DATA_PATH or None, config.DATA.IMG_SIZE, Path(scratch),
                                       flag="--data-path")
        dataset = two_view_dataset(config, SafeImageFolder(folder))
        prepare = batch_preparer(dataset, device)
        return {w: bench.time_data_pipeline(dataset, config.DATA.BATCH_SIZE, w, batches,
                                            finish=prepare, device=device) for w in workers}


@main_entry
def main(argv: list[str] | None = None) -> None:
    parser = base_parser("MoBY benchmark")
    add_pretrain_limits(parser)
    bench.add_benchmark_args(parser)
    args, config = parse_config(parser, argv)
    bench.check_benchmark_args(args)
    ctx = single_process_context(config.DEVICE)
    set_fast_math(ctx.device_type)
    batched = use_batched(config.AUG.BATCHED, ctx.device_type)
    workers = plan_workers(config.DATA.NUM_WORKERS, ctx.device_type, UPSTREAM_WORKERS, batched)
    set_values(config, **{"AUG.BATCHED": batched, "DATA.NUM_WORKERS": workers})  # see dino/benchmark.py
    set_values(config, **{"TRAIN.EPOCHS": max(config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS + 1)})
    check_queue_size(config, ctx.world_size)
    precisions = {choice: bench.mixed_precision(choice, ctx.device_type, config.AMP_DTYPE, use_apex=None)
                  for choice in args.bench_precision}
    name = args.bench_name or default_name(config, ctx.device_type)
    steps = [] if args.bench_skip_step else \
        time_moby_steps(config, ctx, config.SEED, precisions, args.bench_steps, args.bench_warmup)
    rates = time_moby_pipeline(config, bench.worker_counts(args, config.DATA.NUM_WORKERS), args.bench_batches,
                               ctx.device)
    summary = {"method": "moby", "encoder": config.MODEL.MOBY.ENCODER, "model": config.MODEL.NAME,
               "img_size": config.DATA.IMG_SIZE, "queue": config.MODEL.MOBY.CONTRAST_NUM_NEGATIVE,
               "batch": config.DATA.BATCH_SIZE, "compile": config.TRAIN.COMPILE,
               "batched_aug": config.AUG.BATCHED, "threads": torch.get_num_threads()}
    bench.report(name, summary, ctx.device, steps, rates, args.bench_json)


if __name__ == "__main__":
    main()
