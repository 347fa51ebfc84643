"""Benchmark harness shared by dino/benchmark.py and moby/benchmark.py.

Times a training step on inputs already on the device (data loading excluded), once per precision
(--bench_precision, default fp32 and the automatic mixed-precision choice side by side) and,
separately, the data pipeline (decoding + augmentation + collation) per worker count; prints one
line per figure and writes everything to JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from . import device as devices
from .amp import MixedPrecision
from .data import resolve_data_path
from .errors import UserError

# fp32: mixed precision off. auto: on, as a training run chooses it (CPU: bf16 where the CPU has
# it natively, else fp32, or SSL_CPU_AMP; NPU/GPU: the run's AMP dtype, fp16 by default).
# bf16 / fp16: autocast to that type (fp16 on NPU/GPU only).
PRECISION_CHOICES = ("fp32", "auto", "bf16", "fp16")
DEFAULT_PRECISIONS = "fp32,auto"


def precision_list(text: str) -> list[str]:
    """--bench_precision 'fp32,auto' -> ['fp32', 'auto'] (argparse type)."""
    choices = [part.strip().lower() for part in text.split(",") if part.strip()]
    bad = [c for c in choices if c not in PRECISION_CHOICES]
    if bad or not choices:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of "
                                         f"{', '.join(PRECISION_CHOICES)}")
    return list(dict.fromkeys(choices))


def add_benchmark_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark")
    group.add_argument("--bench_steps", type=int, default=20, help="timed training steps")
    group.add_argument("--bench_precision", type=precision_list, default=precision_list(DEFAULT_PRECISIONS),
                       metavar="LIST",
                       help=f"precisions to time the step in, one row each (default {DEFAULT_PRECISIONS}; "
                            f"they replace --use_fp16 / --amp-opt-level): fp32; auto, the mixed "
                            f"precision a training run would use here (CPU: bf16 where the CPU has "
                            f"native bf16, else fp32; NPU/GPU: the run's AMP dtype); bf16; fp16 (NPU/GPU)")
    group.add_argument("--bench_warmup", type=int, default=5,
                       help="untimed steps first (allocations, kernel selection, compilation)")
    group.add_argument("--bench_workers", type=int, nargs="*", default=None,
                       help="data-loader worker counts to time the data pipeline with "
                            "(default: 0 and the run's --num_workers; none: skip it)")
    group.add_argument("--bench_batches", type=int, default=10,
                       help="timed batches per worker count for the data pipeline")
    group.add_argument("--bench_skip_step", action="store_true", help="time only the data pipeline")
    group.add_argument("--bench_json", type=str, default="", help="also write the figures to this JSON file")
    group.add_argument("--bench_name", type=str, default="", help="label for the printed lines and JSON")


def check_benchmark_args(args: argparse.Namespace) -> None:
    if args.bench_steps <= 0 or args.bench_warmup < 0 or args.bench_batches <= 0:
        raise UserError("--bench_steps and --bench_batches must be positive and --bench_warmup >= 0")
    if any(w < 0 for w in args.bench_workers or ()):
        raise UserError(f"--bench_workers must be >= 0, got {args.bench_workers}")
    if getattr(args, "profile", None):
        raise UserError("--profile records a training run: pass it to dino/main_dino.py or "
                        "moby/main_moby.py, not to the benchmark")


def mixed_precision(choice: str, device_type: str, amp_dtype: str = "fp16",
                    use_apex: bool | None = False) -> MixedPrecision:
    """The MixedPrecision of a --bench_precision entry (see PRECISION_CHOICES)."""
    if choice == "fp32":
        return MixedPrecision.from_level("O0", device_type)
    if choice == "auto":
        return MixedPrecision.from_level("O1", device_type, use_apex=use_apex, amp_dtype=amp_dtype)
    if device_type == "cpu":
        if choice == "fp16":
            raise UserError("--bench_precision fp16 is not available on CPU (no CPU computes fp16 "
                            "natively): use fp32, auto or bf16")
        return MixedPrecision.from_level("O1", "cpu", cpu_dtype="bf16")
    return MixedPrecision.from_level("O1", device_type, use_apex=False, amp_dtype=choice)


def precision_label(choice: str, precision: MixedPrecision) -> str:
    """'fp32', 'bf16', or 'bf16 (auto)' for the automatic choice."""
    return f"{precision.precision} (auto)" if choice == "auto" else precision.precision


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the device's statistics, or on Linux the process's peak RSS (writing 5 to
    /proc/self/clear_refs), so that each precision's row reports its own peak."""
    devices.reset_peak_memory(device)
    if devices.device_kind(device) == "cpu":
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:  # not Linux: the rows report the process's peak so far
            pass


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak device memory allocated by torch on an accelerator; the process's peak RSS on CPU."""
    if devices.device_kind(device) == "cpu":
        try:
            return int(re.search(r"VmHWM:\s*(\d+) kB", _STATUS.read_text()).group(1)) / 1024, "peak RSS"
        except (OSError, AttributeError):  # not Linux
            scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "peak RSS"
    return devices.max_memory_mb(device), "peak allocated"


@dataclass
class StepFigures:
    precision: str  # precision_label: 'fp32', 'bf16 (auto)', ...
    precision_line: str  # MixedPrecision.precision_line(): what and why
    images_per_step: int
    ms_median: float
    ms_p10: float
    ms_p90: float
    ms_min: float
    ms_max: float
    steps: int
    warmup: int
    images_per_s: float
    peak_memory_mb: float
    memory_kind: str
    times_ms: list[float] = field(repr=False)


def time_steps(step: Callable[[], object], device: torch.device, images_per_step: int,
               steps: int, warmup: int, precision: str = "fp32", precision_line: str = "") -> StepFigures:
    """Run `step` warmup + steps times, waiting for the device after each; per-step wall times."""
    reset_peak_memory(device)
    for _ in range(warmup):
        step()
    devices.synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        devices.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    ordered = sorted(times)
    median = statistics.median(ordered)
    memory, kind = peak_memory_mb(device)
    return StepFigures(
        precision=precision, precision_line=precision_line, images_per_step=images_per_step,
        ms_median=median,
        ms_p10=_quantile(ordered, 0.1), ms_p90=_quantile(ordered, 0.9),
        ms_min=ordered[0], ms_max=ordered[-1], steps=steps, warmup=warmup,
        images_per_s=images_per_step * 1000 / median, peak_memory_mb=memory, memory_kind=kind,
        times_ms=times)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted list."""
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def time_precisions(build_step: Callable[[MixedPrecision], Callable[[], object]],
                    precisions: dict[str, MixedPrecision], device: torch.device, images_per_step: int,
                    steps: int, warmup: int) -> list[StepFigures]:
    """One StepFigures per precision, each with a step built afresh (same seed, same weights)
    by build_step(precision); the previous one is freed first."""
    rows = []
    for choice, precision in precisions.items():
        step = build_step(precision)
        rows.append(time_steps(step, device, images_per_step, steps, warmup,
                               precision_label(choice, precision), precision.precision_line()))
        del step
        gc.collect()
    return rows


def step_line(name: str, figures: StepFigures, fp32: StepFigures | None = None) -> str:
    """One row; with the fp32 row given (and this one another precision), the speed-up over it."""
    ratio = ""
    if fp32 is not None and figures is not fp32:
        ratio = f", {figures.images_per_s / fp32.images_per_s:.2f}x fp32"
    return (f"[{name}] train step {figures.precision}: {figures.images_per_s:.2f} images/s{ratio}, "
            f"{figures.ms_median:.1f} ms/step median (p10 {figures.ms_p10:.1f}, p90 {figures.ms_p90:.1f}, "
            f"{figures.steps} steps after {figures.warmup} warm-up), {figures.memory_kind} "
            f"{figures.peak_memory_mb:.0f} MB")


def time_data_pipeline(dataset: Dataset, batch_size: int, workers: int, batches: int,
                       collate_fn: Callable | None = None, finish: Callable | None = None,
                       device: torch.device | str = "cpu") -> float:
    """Images/s delivered by a DataLoader over `dataset` (decode + augment + collate) on the host,
    then `finish` on each batch (the batched augmentation's per-batch part, on `device`).

    The first batches (worker start-up) are not timed; the dataset is cycled when it is short.
    """
    warmup = min(2, batches)
    needed = (batches + warmup) * batch_size
    if len(dataset) < batch_size:  # type: ignore[arg-type]
        raise UserError(f"the benchmark dataset has {len(dataset)} images, fewer than one batch of {batch_size}")  # type: ignore[arg-type]
    indices = [i % len(dataset) for i in range(needed)]  # type: ignore[arg-type]
    extra = {"prefetch_factor": 2} if workers > 0 else {}
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_fn, drop_last=True, **extra)
    finish = finish or (lambda batch: batch)
    iterator = iter(loader)
    for _ in range(warmup):
        finish(next(iterator))
    devices.synchronize(device)
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        finish(next(iterator))
        count += batch_size
    devices.synchronize(device)
    rate = count / (time.perf_counter() - start)
    del iterator
    return rate


def data_line(name: str, workers: int, rate: float, step_rate: float | None) -> str:
    keeps_up = ""
    if step_rate:
        keeps_up = " (keeps up with the step)" if rate >= step_rate else \
            f" (slower than the step's {step_rate:.2f} images/s: add workers)"
    return f"[{name}] data pipeline: {workers} workers, {rate:.2f} images/s{keeps_up}"


def environment(device: torch.device) -> dict:
    import timm

    return {"device": devices.describe(devices.device_kind(device)), "torch": torch.__version__,
            "timm": timm.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def report(name: str, config: dict, device: torch.device, steps: list[StepFigures],
           data_rates: dict[int, float], json_path: str) -> dict:
    """Print the figures (one train-step row per precision, each mixed precision's after the line
    saying why) and write the JSON record; returns the record."""
    fp32 = next((row for row in steps if row.precision == "fp32"), None)
    for row in steps:
        if row is not fp32:
            print(f"[{name}] {row.precision_line}", flush=True)
        print(step_line(name, row, fp32), flush=True)
    fastest = max((row.images_per_s for row in steps), default=None)
    for workers, rate in data_rates.items():
        print(data_line(name, workers, rate, fastest), flush=True)
    record = {"name": name, "config": config, "environment": environment(device),
              "steps": [asdict(row) for row in steps],
              "data_pipeline": [{"workers": w, "images_per_s": r} for w, r in data_rates.items()]}
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"[{name}] figures written to {path}", flush=True)
    return record


def worker_counts(args: argparse.Namespace, default_workers: int) -> list[int]:
    if args.bench_workers is not None:
        return list(dict.fromkeys(args.bench_workers))
    return list(dict.fromkeys([0, default_workers]))


def pipeline_folder(data_path: str | None, img_size: int, scratch: Path, flag: str = "--data_path") -> Path:
    """Images whose decoding and augmentation are timed: the dataset's train/ folder; without a
    dataset, Fashion-MNIST for small crops and synthetic ImageNet-sized JPEGs (written to
    `scratch`) for 224-pixel crops, which is what a user's ImageNet run decodes."""
    if data_path or img_size < 128:
        root = resolve_data_path(data_path, need=(), flag=flag)
        return root / "train" if (root / "train").is_dir() else root
    return synthetic_jpeg_folder(scratch)


def synthetic_jpeg_folder(root: Path, count: int = 64, size: tuple[int, int] = (500, 375)) -> Path:
    """An ImageFolder of ImageNet-sized JPEGs (smooth colour fields plus noise), for timing the
    decode and augmentation of full-size photos when no dataset is given."""
    from PIL import Image

    folder = root / "train" / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    width, height = size
    for i in range(count):
        coarse = torch.rand(3, 8, 8, generator=generator)
        field = torch.nn.functional.interpolate(coarse[None], size=(height, width), mode="bicubic",
                                                align_corners=False)[0]
        noisy = (field + 0.1 * torch.randn(3, height, width, generator=generator)).clamp(0, 1)
        pixels = (noisy * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root / "train"
