"""Metric meters with upstream's line formats, and a global throughput meter.

Values may be given as 0-d tensors: they are kept on the device and turned into numbers only
when a line is printed, so logging does not force a host-device synchronisation every step.
"""

from __future__ import annotations

import datetime
import time
from collections import defaultdict, deque
from typing import Iterable, Iterator

import torch

from . import device as devices
from .distributed import is_dist, sum_over_ranks


class SmoothedValue:
    """A series with a window median/average and a global average (upstream DINO's meter)."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.6f} ({global_avg:.6f})"):
        self.fmt = fmt
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self._pending: list[tuple[torch.Tensor, int]] = []

    def update(self, value, n: int = 1) -> None:
        if isinstance(value, torch.Tensor):
            self._pending.append((value.detach(), n))
            return
        self._add(float(value), n)

    def _add(self, value: float, n: int) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def _flush(self) -> None:
        if self._pending:
            values = torch.stack([v.float().reshape(()) for v, _ in self._pending]).tolist()
            for value, (_, n) in zip(values, self._pending):
                self._add(value, n)
            self._pending.clear()

    def synchronize_between_processes(self) -> None:
        """Make count and total global (the window stays local, as upstream)."""
        self._flush()
        if not is_dist():
            return
        count, self.total = sum_over_ranks([self.count, self.total])  # float32 on the device
        self.count = int(round(count))

    @property
    def median(self) -> float:
        self._flush()
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        self._flush()
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        self._flush()
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        self._flush()
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        self._flush()
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Upstream DINO's iteration logger: `header  [ i/N]  eta: ..  loss: ..  time: ..  data: ..`."""

    def __init__(self, delimiter: str = "  ", device: torch.device | str | None = None):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.extra: list[str] = []  # (ours) meters printed after upstream's fields
        self.delimiter = delimiter
        self.device = torch.device(device) if device is not None else None

    def update(self, **kwargs) -> None:
        for name, value in kwargs.items():
            if value is None:
                continue
            self.meters[name].update(value)

    def update_extra(self, **kwargs) -> None:
        """(ours) Meters printed at the end of the step line, after upstream's `time`, `data` and
        `max mem`: tools that count the fields of upstream's line (Huawei's collectors read the
        step time as field 16) still find them where upstream prints them."""
        self.extra += [name for name in kwargs if name not in self.extra]
        self.update(**kwargs)

    def _joined(self, names: Iterable[str]) -> str:
        return self.delimiter.join(f"{name}: {self.meters[name]}" for name in names)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, attr: str):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'MetricLogger' object has no attribute {attr!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def _track_memory(self) -> bool:
        return self.device is not None and self.device.type != "cpu"

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  total: int | None = None) -> Iterator:
        total = len(iterable) if total is None else total  # type: ignore[arg-type]
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.6f}"), SmoothedValue(fmt="{avg:.6f}")
        width = len(str(total))
        fields = [header, f"[{{0:>{width}}}/{{1}}]", "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        if self._track_memory():
            fields.append("max mem: {memory:.0f}")
        line = self.delimiter.join(fields)
        i = 0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                memory = devices.max_memory_mb(self.device) if self._track_memory() else 0
                upstream = [name for name in self.meters if name not in self.extra]
                text = line.format(i, total, eta=str(eta), meters=self._joined(upstream), time=str(iter_time),
                                   data=str(data_time), memory=memory)
                print(self.delimiter.join([text, self._joined(self.extra)]) if self.extra else text, flush=True)
            i += 1
            end = time.time()
        elapsed = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(elapsed))} "
              f"({elapsed / max(i, 1):.6f} s / it)", flush=True)


class AverageMeter:
    """Upstream MoBY's meter: the latest value and the running average."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.val, self.avg, self.sum, self.count = 0.0, 0.0, 0.0, 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / self.count


class ThroughputMeter:
    """Global images/s over optimizer steps, excluding the first warm-up steps.

    The device is synchronised only at the warm-up boundary and at the last expected step, never
    in between. The test/ launch scripts read FPS from summary_line(): its wording is an interface.
    """

    def __init__(self, global_batch_size: int, warmup_steps: int = 5, total_steps: int | None = None,
                 device: torch.device | str | None = None):
        if total_steps is not None:  # short runs still time at least half of their steps
            warmup_steps = min(warmup_steps, total_steps // 2)
        self.global_batch_size = global_batch_size
        self.warmup_steps = max(warmup_steps, 1)
        self.total_steps = total_steps
        self.device = device
        self.steps = 0
        self._start: float | None = None
        self._last: float | None = None

    def _now(self, sync: bool) -> float:
        if sync and self.device is not None:
            devices.synchronize(self.device)
        return time.perf_counter()

    def step(self) -> None:
        """Call once after each optimizer step."""
        self.steps += 1
        if self.steps == self.warmup_steps:
            self._start = self._now(sync=True)
        elif self.steps > self.warmup_steps:
            self._last = self._now(sync=self.steps == self.total_steps)

    @property
    def timed_steps(self) -> int:
        return self.steps - self.warmup_steps if self._last is not None else 0

    @property
    def sec_per_step(self) -> float:
        steps = self.timed_steps
        return (self._last - self._start) / steps if steps else float("nan")

    @property
    def images_per_sec(self) -> float:
        steps = self.timed_steps
        return self.global_batch_size / self.sec_per_step if steps else float("nan")

    def summary_line(self) -> str:
        return (f"Throughput: {self.images_per_sec:.2f} images/s ({self.sec_per_step:.4f} s/step over "
                f"{self.timed_steps} steps after {self.warmup_steps} warm-up, "
                f"global batch {self.global_batch_size})")
