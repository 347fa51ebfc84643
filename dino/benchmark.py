"""Time DINO's training step and its multi-crop data pipeline.

Every main_dino.py flag applies (architecture, patch and crop sizes, crop counts, batch,
--amp_dtype, optimizer...), plus the --bench_* flags. The step is main_dino.train_step itself, run
on random crops already on the device, once per --bench_precision (default: fp32 and the automatic
mixed-precision choice, side by side); the data pipeline is timed apart, on the dataset's images.

    python dino/benchmark.py --arch vit_small --patch_size 16 --local_crops_number 10 \
        --batch_size_per_gpu 8 --bench_json out/dino_vits16.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python dino/benchmark.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from dino.augment import build_dino_augmentation  # noqa: E402
from dino.loss import DINOLoss  # noqa: E402
from dino.main_dino import (UPSTREAM_WORKERS, build_optimizer_for, build_schedules,  # noqa: E402
                            build_student_teacher, get_args_parser, set_schedule_values, train_step,
                            validate_args)
from ssl_runtime import bench  # noqa: E402
from ssl_runtime.amp import MixedPrecision  # noqa: E402
from ssl_runtime.augment import use_batched, views_to_device  # noqa: E402
from ssl_runtime.cpu_layout import plan_workers  # noqa: E402
from ssl_runtime.data import SafeImageFolder  # noqa: E402
from ssl_runtime.device import set_fast_math  # noqa: E402
from ssl_runtime.distributed import single_process_context, unwrap  # noqa: E402
from ssl_runtime.errors import main_entry  # noqa: E402
from ssl_runtime.misc import fix_random_seeds  # noqa: E402


def crop_shapes(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    """(batch, 3, size, size) of the 2 global crops, then of the local crops."""
    batch = args.batch_size_per_gpu
    return [(batch, 3, args.img_size, args.img_size)] * 2 + \
        [(batch, 3, args.local_crop_size, args.local_crop_size)] * args.local_crops_number


def layout(args: argparse.Namespace) -> str:
    text = f"2x{args.img_size}"
    if args.local_crops_number:
        text += f"+{args.local_crops_number}x{args.local_crop_size}"
    return text


def default_name(args: argparse.Namespace, device_type: str) -> str:
    patch = f"/{args.patch_size}" if args.arch.startswith("vit") else ""
    return (f"dino {args.arch}{patch} {layout(args)} out_dim {args.out_dim} batch "
            f"{args.batch_size_per_gpu} {device_type}")


def build_dino_step(args: argparse.Namespace, ctx, mp: MixedPrecision) -> Callable[[], torch.Tensor]:
    """main_dino.train_step on fixed random crops, with everything it needs built as in training
    (the same weights on every call: the seed is set first)."""
    fix_random_seeds(args.seed)
    student, teacher = build_student_teacher(args, ctx)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs).to(ctx.device)
    optimizer = build_optimizer_for(student, args, ctx)
    lr, wd, momentum = (schedule[0] for schedule in build_schedules(args, 1, ctx.world_size))
    set_schedule_values(optimizer, max(float(lr), 1e-6), float(wd))  # step 0 of warm-up has lr 0
    params = (list(unwrap(student).parameters()), list(teacher.parameters()))
    generator = torch.Generator().manual_seed(args.seed)
    images = [torch.randn(shape, generator=generator).to(ctx.device) for shape in crop_shapes(args)]
    epoch = args.freeze_last_layer  # past the frozen-last-layer epochs: the full update is timed

    def step() -> torch.Tensor:
        return train_step(student, teacher, dino_loss, images, optimizer, mp, epoch, float(momentum),
                          args, params)

    return step


def time_dino_steps(args: argparse.Namespace, ctx, precisions: dict[str, MixedPrecision]) -> list[bench.StepFigures]:
    return bench.time_precisions(lambda mp: build_dino_step(args, ctx, mp), precisions, ctx.device,
                                 args.batch_size_per_gpu, args.bench_steps, args.bench_warmup)


def time_dino_pipeline(args: argparse.Namespace, workers: list[int], device) -> dict[int, float]:
    """Loader images/s per worker count, with the batched augmentation's per-batch part (on the
    device) included when it is on, as in training."""
    transform = build_dino_augmentation(args.global_crops_scale, args.local_crops_scale,
                                        args.local_crops_number, args.img_size, args.local_crop_size,
                                        args.batched_aug)
    to_device = views_to_device(transform, device)

    def finish(batch):  # (views, labels) as the training loop receives it
        return to_device(batch[0])
    with tempfile.TemporaryDirectory() as scratch:
        dataset = SafeImageFolder(bench.pipeline_folder(args.data_path, args.img_size, Path(scratch)),
                                  transform=transform)
        return {w: bench.time_data_pipeline(dataset, args.batch_size_per_gpu, w, args.bench_batches,
                                            finish=finish, device=device)
                for w in workers}


@main_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("DINO benchmark", parents=[get_args_parser()])
    bench.add_benchmark_args(parser)
    args = parser.parse_args(argv)
    validate_args(args)
    bench.check_benchmark_args(args)
    ctx = single_process_context(args.device)
    set_fast_math(ctx.device_type)
    args.batched_aug = use_batched(args.batched_aug, ctx.device_type)
    # the worker count the training would use (timed below); the step keeps torch's threads
    # (OMP_NUM_THREADS or all cores), as a training run with the pipeline in the main process
    args.num_workers = plan_workers(args.num_workers, ctx.device_type, UPSTREAM_WORKERS, args.batched_aug)
    fix_random_seeds(args.seed)
    precisions = {choice: bench.mixed_precision(choice, ctx.device_type, args.amp_dtype)
                  for choice in args.bench_precision}
    name = args.bench_name or default_name(args, ctx.device_type)
    steps = [] if args.bench_skip_step else time_dino_steps(args, ctx, precisions)
    rates = time_dino_pipeline(args, bench.worker_counts(args, args.num_workers), ctx.device)
    config = {"method": "dino", "arch": args.arch, "patch_size": args.patch_size, "crops": layout(args),
              "out_dim": args.out_dim, "batch": args.batch_size_per_gpu,
              "compile": bool(args.compile), "use_bn_in_head": args.use_bn_in_head,
              "batched_aug": args.batched_aug, "threads": torch.get_num_threads()}
    bench.report(name, config, ctx.device, steps, rates, args.bench_json)


if __name__ == "__main__":
    main()
