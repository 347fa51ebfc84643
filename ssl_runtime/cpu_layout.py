"""How a run shares the host's cores between the training step and the data pipeline.

On CPU both compete for the same cores, and an OpenMP region waits for its slowest thread: a
data worker that takes a core from one of torch's threads stalls the whole step. So on CPU the
worker processes and torch's threads are planned together, per process:

* a light pipeline (the batched augmentation, the CPU default of pretraining, see
  ssl_runtime.augment; the evaluations' resize-and-crop): the per-image work is small next to
  the model's, so no worker processes: the loader runs in the main process between steps and
  torch's threads take every core;
* the PIL augmentation pipeline: half of the cores (at least one) for workers, torch's threads
  on the rest.

An explicit worker count (DINO `--num_workers N`, MoBY `DATA.NUM_WORKERS N`, N >= 0) is kept, and
torch's threads then take the cores it leaves; OMP_NUM_THREADS, when set, decides the threads.
On NPU/GPU AUTO_WORKERS keeps upstream's worker counts and the threads are left alone.
"""

from __future__ import annotations

import os

import torch

AUTO_WORKERS = -1  # the value of --num_workers / DATA.NUM_WORKERS that asks for this plan


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), shared among the node's ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(cores // max(ranks, 1), 1)


def plan_workers(requested: int, device_kind: str, accelerator_default: int, light_pipeline: bool,
                 cores: int | None = None) -> int:
    """Data-loader worker processes: `requested` when >= 0, else the plan above."""
    if requested >= 0:
        return requested
    if device_kind != "cpu":
        return accelerator_default
    if light_pipeline:
        return 0
    return max((usable_cores() if cores is None else cores) // 2, 1)


def lay_out(requested: int, device_kind: str, accelerator_default: int, light_pipeline: bool
            ) -> tuple[int, str]:
    """plan_workers then set_cpu_threads: (the worker count, the layout's line for the log)."""
    workers = plan_workers(requested, device_kind, accelerator_default, light_pipeline)
    return workers, set_cpu_threads(device_kind, workers)


def set_cpu_threads(device_kind: str, workers: int, cores: int | None = None) -> str:
    """On CPU give torch the cores the workers leave (unless OMP_NUM_THREADS is set); returns a
    one-line description of the layout for the log."""
    if device_kind != "cpu":
        return f"{workers} data workers per process"
    cores = usable_cores() if cores is None else cores
    if os.environ.get("OMP_NUM_THREADS"):
        source = "OMP_NUM_THREADS"
    else:
        torch.set_num_threads(max(cores - workers, 1))
        source = "cores - workers"
    where = "in the main process between steps" if workers == 0 else f"in {workers} worker processes"
    return (f"CPU layout: {cores} cores, {torch.get_num_threads()} torch threads ({source}), "
            f"data pipeline {where}")
