"""Watching a run: TensorBoard scalars (optional dependency) and per-epoch JSON-lines logs.

`TrainingMonitor` is handed every optimizer step's scalars (loss as a device tensor, lr, ...). It
keeps epoch means without synchronising the device, and on rank 0 writes TensorBoard scalars every
`every` steps (the only moment it reads device values) plus images/s between those writes. Without
the `tensorboard` package, or when disabled, it says so once and writes nothing, so training never
depends on it.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping

import torch

from .meters import SmoothedValue

TENSORBOARD_DIR = "tensorboard"


def open_summary_writer(log_dir: str | os.PathLike, log: Callable[[str], None] = print):
    """torch's SummaryWriter on `log_dir`, or None (with one line saying why) without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("TensorBoard: the tensorboard package is not installed, no scalars are written "
            "(pip install tensorboard to watch training)")
        return None
    log(f"TensorBoard: scalars in {log_dir} (view them with: tensorboard --logdir {log_dir})")
    return SummaryWriter(log_dir=str(log_dir))


class TrainingMonitor:
    def __init__(self, log_dir: str | os.PathLike | None = None, is_main: bool = True, every: int = 10,
                 images_per_step: int = 0, enabled: bool = True, log: Callable[[str], None] = print,
                 epoch_means: bool = True):
        self.is_main = is_main
        self.epoch_means = epoch_means  # False: the caller keeps them (DINO's MetricLogger)
        self.every = max(int(every), 1)
        self.images_per_step = images_per_step
        self.writer = open_summary_writer(log_dir, log) if enabled and is_main and log_dir else None
        self._sources: list[Callable[[], Mapping[str, float]]] = []
        self._epoch: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self._last_write: tuple[int, float] | None = None

    @classmethod
    def disabled(cls) -> "TrainingMonitor":
        return cls(None, is_main=False, enabled=False)

    def add_source(self, source: Callable[[], Mapping[str, float]]) -> None:
        """Extra scalars read only at write steps (e.g. a momentum computed from a counter)."""
        self._sources.append(source)

    def step(self, step: int, **scalars) -> None:
        """Call once per optimizer step; tensors are read only every `every` steps."""
        if not self.is_main:
            return
        if self.epoch_means:
            for name, value in scalars.items():
                self._epoch[name].update(value.detach() if isinstance(value, torch.Tensor) else float(value))
        if self.writer is None or step % self.every:
            return
        values = {name: float(value) for name, value in scalars.items()}  # the one host sync
        for source in self._sources:
            values.update(source())
        now = time.perf_counter()
        if self._last_write is not None and step > self._last_write[0] and self.images_per_step:
            steps, seconds = step - self._last_write[0], now - self._last_write[1]
            values["images_per_sec"] = self.images_per_step * steps / max(seconds, 1e-9)
        self._last_write = (step, now)
        self.scalars(step, "train", values)

    def scalars(self, step: int, prefix: str, values: Mapping[str, float]) -> None:
        """`prefix/name` scalars at `step` (epoch summaries, validation accuracy, k-NN results)."""
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float, torch.Tensor)):
                self.writer.add_scalar(f"{prefix}/{name}", float(value), step)
        if prefix != "train":  # step scalars reach the file with the writer's own periodic flush
            self.writer.flush()

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Means over the epoch's steps (this rank), also written as `epoch/<name>`; then reset."""
        means = {name: meter.global_avg for name, meter in self._epoch.items()}
        self._epoch.clear()
        self.scalars(epoch, "epoch", means)
        return means

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def append_json_line(path: str | os.PathLike, record: Mapping) -> None:
    """One JSON object per line (DINO's log.txt format, which the plot command reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(dict(record)) + "\n")
