"""--profile on both entry points: the steps it records, the trace it writes (a Chrome trace that
TensorBoard and Perfetto read) and the table of top operators; the NPU kernel table."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_entry_quietly
from dino import main_dino
from moby import main_moby
from ssl_runtime.profiling import TABLE_ROWS, StepProfiler, add_profile_arg, npu_kernel_table, profile_steps

ROOT = Path(__file__).resolve().parents[1]
DINO_TINY = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--local_crop_size", "16",
             "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4", "--epochs", "1",
             "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu"]
MOBY_TINY = ["MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS", "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]",
             "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "16", "DATA.NUM_WORKERS", "0"]


def trace_of(folder: Path) -> dict:
    """The one Chrome trace torch wrote into folder (rank0.<time>.pt.trace.json)."""
    traces = list(folder.glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, traces
    return json.loads(traces[0].read_text())


def recorded_steps(trace: dict) -> int:
    """How many ProfilerStep#N annotations torch.profiler put around recorded steps (torch 2.1 and
    2.14 number them differently)."""
    return len({e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")})


def table_rows(printed: str) -> list[str]:
    """The operator rows of the printed table (between its second and third rule lines)."""
    text = printed[printed.index("top 15 operators by self_cpu_time_total:"):]
    rules = [i for i, line in enumerate(text.splitlines()) if re.fullmatch(r"[- ]{20,}", line)]
    return text.splitlines()[rules[1] + 1:rules[2]]


def test_profile_flag_takes_a_window_of_steps():
    parser = argparse.ArgumentParser()
    add_profile_arg(parser)
    assert parser.parse_args([]).profile is None
    assert parser.parse_args(["--profile"]).profile == (10, 14)  # after a warm-up, as the Ascend ports
    assert parser.parse_args(["--profile", "3-4"]).profile == (3, 4)
    assert profile_steps("7") == (7, 7)
    for bad in ("4-3", "x", "-1", "2-"):
        with pytest.raises(argparse.ArgumentTypeError, match="FIRST-LAST"):
            profile_steps(bad)


def test_dino_profile_writes_a_trace_of_the_chosen_steps_and_prints_the_top_operators(tiny_imagefolder,
                                                                                       tmp_path):
    out = tmp_path / "dino"
    printed = run_entry_quietly(main_dino.main, DINO_TINY + [
        "--data_path", str(tiny_imagefolder), "--output_dir", str(out), "--profile", "2-3"])
    trace = trace_of(out / "profile")
    assert recorded_steps(trace) == 2  # of the epoch's 6 steps
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"aten::linear", "aten::mm"} <= names  # real operators, forward and backward
    assert "--profile: steps 2-3 recorded; trace in " in printed
    rows = table_rows(printed)
    assert len(rows) == TABLE_ROWS
    self_share = [float(re.search(r"\s([\d.]+)%\s", row).group(1)) for row in rows]  # "Self CPU %"
    assert self_share == sorted(self_share, reverse=True)  # ordered by self time
    assert "Throughput:" in printed  # the run went on to its end


def test_moby_profile_writes_a_trace_and_says_when_the_run_is_too_short(tiny_imagefolder, tmp_path):
    def pretrain(out: Path, *profile: str) -> str:
        return run_entry_quietly(main_moby.main, [
            "--cfg", str(ROOT / "configs" / "moby_swin_cpu.yaml"), "--data-path", str(tiny_imagefolder),
            "--batch-size", "4", "--output", str(out), "--tag", "t", "--device", "cpu", "--epochs", "1",
            *profile, "--opts", *MOBY_TINY])

    printed = pretrain(tmp_path / "a", "--profile", "4-8")  # 6 steps: ends inside the window
    folder = next((tmp_path / "a").glob("*/t"))
    assert "--profile: the run ended after 6 steps, inside steps 4-8: writing what was recorded" in printed
    # steps 4 and 5, and the annotation torch opens for the next step before the run stops it
    assert recorded_steps(trace_of(folder / "profile")) == 3
    assert "--profile: steps 4-5 recorded" in printed and "top 15 operators by self_cpu_time_total:" in printed

    printed = pretrain(tmp_path / "b", "--profile")  # the default window starts at step 10
    assert "the run ended after 6 steps, before step 10: nothing was recorded" in printed
    assert not list(next((tmp_path / "b").glob("*/t")).glob("profile/*.json"))


def test_the_window_is_the_steps_recorded(tmp_path):
    """Step i of a loop marked by an annotation of its own: steps 3-5 of 8 are in the trace."""
    printed = []
    profiler = StepProfiler((3, 5), tmp_path, "cpu", print_fn=printed.append)
    for i in range(8):
        with torch.profiler.record_function(f"loop step {i}"):
            torch.ones(4).sum()
        profiler.step()
    profiler.close()
    names = {e.get("name") for e in trace_of(tmp_path / "profile")["traceEvents"]}
    assert sorted(n for n in names if n and n.startswith("loop step")) == [f"loop step {i}" for i in (3, 4, 5)]
    assert printed[0].startswith("--profile: steps 3-5 recorded; trace in ")


def test_profiler_off_records_nothing(tmp_path):
    profiler = StepProfiler(None, tmp_path, "cpu")
    for _ in range(3):
        profiler.step()
    profiler.close()
    assert not (tmp_path / "profile").exists()
    assert not torch.autograd.profiler._is_profiler_enabled


def test_npu_kernel_table_sums_device_time_per_kernel(tmp_path):
    """torch_npu has no key_averages: the table comes from its kernel_details.csv."""
    folder = tmp_path / "profile" / "rank0_1_ascend_pt" / "ASCEND_PROFILER_OUTPUT"
    folder.mkdir(parents=True)
    (folder / "kernel_details.csv").write_text(
        "Device_id,Name,Type,Accelerator Core,Start Time(us),Duration(us),Wait Time(us),Block Num\n"
        "0,MatMulV2,MatMul,AI_CORE,1.0,300.0,0,8\n"
        "0,Add,Add,AI_VECTOR_CORE,2.0,50.0,0,8\n"
        "0,MatMulV2,MatMul,AI_CORE,3.0,500.0,0,8\n"
        "0,SoftmaxV2,Softmax,AI_VECTOR_CORE,4.0,150.0,0,8\n")
    lines = npu_kernel_table(tmp_path / "profile", rows=2).splitlines()
    assert lines[0].startswith("top 2 NPU kernels by device time")
    assert lines[2].split() == ["MatMulV2", "0.800ms", "80.0%", "2"]
    assert lines[3].split() == ["SoftmaxV2", "0.150ms", "15.0%", "1"]
    assert len(lines) == 4
    assert "no kernel_details.csv" in npu_kernel_table(tmp_path / "elsewhere")


class _FakeNpuProfiler:
    """torch_npu.profiler's interface as ssl_runtime.profiling uses it, recording the calls: its
    tensorboard_trace_handler names the folder the profile records into, so it must come first."""

    def __init__(self):
        self.calls = []
        self.ProfilerActivity = argparse.Namespace(CPU="CPU", NPU="NPU")
        self.ProfilerLevel = argparse.Namespace(Level1="Level1")

    def _ExperimentalConfig(self, profiler_level):
        return {"profiler_level": profiler_level}

    def schedule(self, **kwargs):
        self.calls.append(("schedule", kwargs))
        return kwargs

    def tensorboard_trace_handler(self, dir_name, worker_name=None):
        self.calls.append(("handler", dir_name))
        return lambda prof: self.calls.append(("analyse", dir_name))

    def profile(self, **kwargs):
        fake = self

        class Profile:
            def start(self):
                fake.calls.append(("start", kwargs["activities"], kwargs["experimental_config"]))

            def step(self):
                fake.calls.append(("step",))

            def stop(self):
                fake.calls.append(("stop",))
                kwargs["on_trace_ready"](self)
        return Profile()


def test_npu_runs_use_torch_npus_profiler_with_its_folder_named_first(tmp_path, monkeypatch):
    from ssl_runtime import profiling

    fake = _FakeNpuProfiler()
    monkeypatch.setattr(profiling, "_profiler_module", lambda device_type: fake)
    printed = []
    profiler = StepProfiler((1, 1), tmp_path, "npu", print_fn=printed.append)
    profiler.step()
    profiler.step()  # steps 0 and 1 done: past the window (this fake does not call on_trace_ready itself)
    names = [call[0] for call in fake.calls]
    assert names[:3] == ["handler", "schedule", "start"]
    assert fake.calls[0][1] == str(tmp_path / "profile")
    assert fake.calls[1][1] == {"wait": 0, "warmup": 1, "active": 1, "repeat": 1}
    assert fake.calls[2][1:] == (["CPU", "NPU"], {"profiler_level": "Level1"})
    assert names[3:] == ["step", "step", "stop", "analyse"]
    assert printed[0].startswith("--profile: steps 1-1 recorded") and "no kernel_details.csv" in printed[1]
