"""--profile: a few training steps under torch.profiler (torch_npu's profiler on NPU).

As the Ascend ports' PROFILE_TYPE / PROFILE_START_STEP switch does, after a warm-up: by default
steps 10-14 of the run (counted from its first step, a resumed run included). The trace goes to
<output>/profile/, readable by TensorBoard (`tensorboard --logdir <output>/profile`, with the
torch-tb-profiler plugin, or torch-tb-profiler-ascend for NPU traces) and by Perfetto
(ui.perfetto.dev, open the .pt.trace.json; on NPU the trace_view.json under ASCEND_PROFILER_OUTPUT).
Then the operators with the most self time are printed (15 rows). The profiled steps run slower
than the others, which the run's images/s includes. Only the main process (rank 0) records.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

PROFILE_DIR = "profile"
DEFAULT_STEPS = "10-14"
TABLE_ROWS = 15
# NPU: torch_npu's analysis writes one row per device kernel, with its duration, to this file
NPU_KERNEL_TABLE = "kernel_details.csv"


def profile_steps(text: str) -> tuple[int, int]:
    """'10-14' -> (10, 14); '12' -> (12, 12). The argparse type of --profile."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if match is None or int(match[2] or match[1]) < int(match[1]):
        raise argparse.ArgumentTypeError(f"{text!r}: give the steps to record as FIRST-LAST "
                                         f"(0-based, e.g. {DEFAULT_STEPS}) or one step number")
    return int(match[1]), int(match[2] or match[1])


def add_profile_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile", nargs="?", const=profile_steps(DEFAULT_STEPS), default=None, type=profile_steps,
        metavar="FIRST-LAST",
        help=f"(ours; the Ascend ports' PROFILE_TYPE) record training steps FIRST-LAST of this run "
             f"(default {DEFAULT_STEPS}, after a warm-up) with torch.profiler (torch_npu's on NPU): a "
             f"trace for TensorBoard / Perfetto in <output>/{PROFILE_DIR}/ and the {TABLE_ROWS} "
             f"operators with the most self time printed")


class StepProfiler:
    """Call step() after every training step and close() at the end of training."""

    def __init__(self, steps: tuple[int, int] | None, output_dir: str | Path, device_type: str,
                 enabled: bool = True, print_fn: Callable[[str], None] = print):
        self.window = steps
        self.folder = Path(output_dir) / PROFILE_DIR
        self.device_type = device_type
        self.print = print_fn
        self.steps_done = 0
        self.finished = False
        self._profiler = None
        if steps is not None and enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            # made before the profiler starts: torch_npu's records into the folder it names
            self._write_trace = _handler(device_type, self.folder)
            self._profiler = _start_profiler(steps, device_type, self._report)

    @classmethod
    def disabled(cls) -> "StepProfiler":
        return cls(None, ".", "cpu")

    def step(self) -> None:
        if self._profiler is None or self.finished:
            return
        self.steps_done += 1
        self._profiler.step()
        if self.steps_done > self.window[1]:  # the trace was written at this step
            self._stop()

    def close(self) -> None:
        """End of training: a window the run ended inside is written; one it never reached is said so."""
        if self._profiler is None or self.finished:
            return
        first, last = self.window
        if self.steps_done <= first:
            self.print(f"--profile: the run ended after {self.steps_done} steps, before step {first}: "
                       f"nothing was recorded (give an earlier window, e.g. --profile 1-2)")
        else:
            self.print(f"--profile: the run ended after {self.steps_done} steps, inside steps "
                       f"{first}-{last}: writing what was recorded")
        self._stop()

    def _stop(self) -> None:
        self.finished = True
        self._profiler.stop()  # writes the trace if it was recording (then calls _report)
        self._profiler = None  # the recorded events can go

    def _report(self, profiler: Any) -> None:
        """on_trace_ready: the trace file(s), then the table of the top operators."""
        first = self.window[0]
        if self.steps_done <= first:  # stopped before its first recorded step ended
            return
        last = min(self.window[1], self.steps_done - 1)
        self._write_trace(profiler)
        self.print(f"--profile: steps {first}-{last} recorded; trace in {self.folder} (TensorBoard: "
                   f"tensorboard --logdir {self.folder}; Perfetto: ui.perfetto.dev, open the trace JSON)")
        self.print(top_operators(profiler, self.device_type, self.folder))


def _profiler_module(device_type: str) -> Any:
    """torch.profiler, or torch_npu.profiler on NPU (same interface; it also records the NPU)."""
    if device_type == "npu":
        return importlib.import_module("torch_npu.profiler")
    return torch.profiler


def _activities(device_type: str) -> list:
    module = _profiler_module(device_type)
    activities = [module.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(module.ProfilerActivity.CUDA)
    elif device_type == "npu":
        activities.append(module.ProfilerActivity.NPU)
    return activities


def _start_profiler(steps: tuple[int, int], device_type: str, on_ready: Callable) -> Any:
    """A started profiler whose schedule skips the steps before `first` (the one just before it
    traced but discarded: the profiler's own warm-up) and records first..last."""
    first, last = steps
    module = _profiler_module(device_type)
    warmup = min(first, 1)
    kwargs: dict[str, Any] = {}
    if device_type == "npu":  # operator and kernel timings, as the Ascend ports record them
        kwargs["experimental_config"] = module._ExperimentalConfig(profiler_level=module.ProfilerLevel.Level1)
    profiler = module.profile(activities=_activities(device_type),
                              schedule=module.schedule(wait=first - warmup, warmup=warmup,
                                                       active=last - first + 1, repeat=1),
                              on_trace_ready=on_ready, **kwargs)
    profiler.start()
    return profiler


def _handler(device_type: str, folder: Path) -> Callable:
    """The module's tensorboard_trace_handler: torch writes <folder>/rank0.<time>.pt.trace.json (a
    Chrome trace), torch_npu a <folder>/*_ascend_pt/ folder it analyses in place."""
    return _profiler_module(device_type).tensorboard_trace_handler(str(folder), worker_name="rank0")


def top_operators(profiler: Any, device_type: str, folder: Path, rows: int = TABLE_ROWS) -> str:
    """The `rows` operators with the most self time: on the device (CUDA), on the host (CPU), or
    from torch_npu's kernel table (NPU, whose profiler has no key_averages)."""
    if device_type == "npu":
        return npu_kernel_table(folder, rows)
    averages = profiler.key_averages()
    if device_type == "cuda":
        # torch 2.4+ names the device columns "device", torch 2.1 "cuda"
        newer = len(averages) and hasattr(averages[0], "self_device_time_total")
        key = "self_device_time_total" if newer else "self_cuda_time_total"
    else:
        key = "self_cpu_time_total"
    return f"top {rows} operators by {key}:\n" + averages.table(sort_by=key, row_limit=rows)


def npu_kernel_table(folder: Path, rows: int = TABLE_ROWS) -> str:
    """Device time per kernel name, summed over the newest kernel_details.csv under `folder`
    (columns Name and Duration(us), as torch_npu's analysis writes them)."""
    tables = sorted(folder.rglob(NPU_KERNEL_TABLE), key=lambda p: p.stat().st_mtime)
    if not tables:
        return f"(no {NPU_KERNEL_TABLE} under {folder}: see torch_npu's analysis output there)"
    total_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    with tables[-1].open(newline="") as f:
        for record in csv.DictReader(f):
            total_us[record["Name"]] += float(record["Duration(us)"])
            calls[record["Name"]] += 1
    grand = sum(total_us.values()) or 1.0
    ranked = sorted(total_us.items(), key=lambda item: -item[1])[:rows]
    width = max([len("Name")] + [len(name) for name, _ in ranked])
    lines = [f"top {rows} NPU kernels by device time ({tables[-1]}):",
             f"{'Name':<{width}}  {'Self NPU':>12}  {'%':>6}  {'Calls':>6}"]
    lines += [f"{name:<{width}}  {us / 1000:>10.3f}ms  {100 * us / grand:>5.1f}%  {calls[name]:>6}"
              for name, us in ranked]
    return "\n".join(lines)
