"""The benchmark command: timing statistics, JSON records, both methods, the launch script."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
import torch

from dino import benchmark as dino_benchmark
from moby import benchmark as moby_benchmark
from ssl_runtime import amp, bench
from ssl_runtime.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_time_steps_statistics_from_known_durations(monkeypatch):
    clock = [100.0]
    durations = iter([7.0, 7.0] + [0.010, 0.050, 0.020, 0.040, 0.030])  # 2 warm-up, 5 timed steps (s)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def step():
        clock[0] += next(durations)

    figures = bench.time_steps(step, torch.device("cpu"), images_per_step=16, steps=5, warmup=2)
    assert figures.steps == 5 and figures.warmup == 2
    assert figures.times_ms == pytest.approx([10, 50, 20, 40, 30])  # the warm-up is not timed
    assert figures.ms_median == pytest.approx(30) and figures.images_per_s == pytest.approx(16 * 1000 / 30)
    assert (figures.ms_min, figures.ms_p10, figures.ms_p90, figures.ms_max) == pytest.approx((10, 10, 50, 50))
    assert figures.peak_memory_mb > 0 and figures.memory_kind == "peak RSS"


def test_quantile_is_nearest_rank():
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert bench._quantile(values, 0.1) == 2.0
    assert bench._quantile(values, 0.9) == 10.0
    assert bench._quantile(values, 0.5) == 6.0


def test_data_pipeline_counts_the_images_it_delivers():
    dataset = torch.utils.data.TensorDataset(torch.arange(10.0))
    rate = bench.time_data_pipeline(dataset, batch_size=4, workers=0, batches=5)  # cycles the 10 items
    assert rate > 0
    with pytest.raises(UserError, match="fewer than one batch"):
        bench.time_data_pipeline(dataset, batch_size=16, workers=0, batches=1)


def read_record(path: Path) -> dict:
    record = json.loads(path.read_text())
    for step in record["steps"]:
        assert step["images_per_s"] == pytest.approx(step["images_per_step"] * 1000 / step["ms_median"])
        assert len(step["times_ms"]) == step["steps"]
    assert record["environment"]["torch"] == torch.__version__
    return record


def fake_cpu(monkeypatch, native_bf16: bool) -> None:
    """The CPU seen through /proc/cpuinfo: with or without avx512_bf16; SSL_CPU_AMP unset."""
    flags = "avx2 avx512f avx512_bf16" if native_bf16 else "avx2 avx512f"
    monkeypatch.setattr(amp, "_host_cpuinfo", lambda: f"flags\t\t: {flags}\n")
    monkeypatch.delenv("SSL_CPU_AMP", raising=False)


def test_dino_benchmark_writes_fp32_and_the_automatic_choice(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    """Two rows by default, whatever --use_fp16 says: fp32, and bf16 on a CPU with native bf16."""
    fake_cpu(monkeypatch, native_bf16=True)
    out = tmp_path / "dino.json"
    dino_benchmark.main([
        "--arch", "vit_pico", "--patch_size", "4", "--img_size", "16", "--local_crop_size", "8",
        "--local_crops_number", "2", "--out_dim", "32", "--batch_size_per_gpu", "4", "--use_fp16", "false",
        "--data_path", str(tiny_imagefolder), "--device", "cpu", "--bench_steps", "2", "--bench_warmup", "1",
        "--bench_workers", "0", "--bench_batches", "2", "--bench_json", str(out)])
    record = read_record(out)
    assert record["config"]["crops"] == "2x16+2x8" and record["config"]["batch"] == 4
    assert [step["precision"] for step in record["steps"]] == ["fp32", "bf16 (auto)"]
    assert all(step["images_per_step"] == 4 and step["peak_memory_mb"] > 0 for step in record["steps"])
    assert "avx512_bf16" in record["steps"][1]["precision_line"]
    assert [entry["workers"] for entry in record["data_pipeline"]] == [0]
    assert record["data_pipeline"][0]["images_per_s"] > 0
    printed = capsys.readouterr().out
    name = "[dino vit_pico/4 2x16+2x8 out_dim 32 batch 4 cpu]"
    assert f"{name} train step fp32: " in printed
    assert f"{name} precision: bf16 autocast on cpu (the CPU has avx512_bf16" in printed
    ratio = record["steps"][1]["images_per_s"] / record["steps"][0]["images_per_s"]
    assert f"{name} train step bf16 (auto): " in printed and f", {ratio:.2f}x fp32, " in printed
    assert "data pipeline: 0 workers" in printed


def test_benchmark_auto_is_fp32_on_a_cpu_without_bf16_and_precisions_can_be_chosen(monkeypatch):
    fake_cpu(monkeypatch, native_bf16=False)
    assert bench.mixed_precision("auto", "cpu").dtype == torch.float32
    assert bench.mixed_precision("bf16", "cpu").dtype == torch.bfloat16
    assert bench.mixed_precision("bf16", "cuda").dtype == torch.bfloat16
    assert bench.mixed_precision("auto", "cuda", amp_dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(UserError, match="fp16 is not available on CPU"):
        bench.mixed_precision("fp16", "cpu")
    assert bench.precision_list("fp32, AUTO,fp32") == ["fp32", "auto"]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated list of fp32, auto, bf16, fp16"):
        bench.precision_list("fp8")


def test_moby_benchmark_writes_figures(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "moby.json"
    moby_benchmark.main([
        "--cfg", str(REPO / "configs" / "moby_swin_cpu.yaml"), "--batch-size", "4", "--device", "cpu",
        "--data-path", str(tiny_imagefolder), "--opts", "MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS",
        "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]", "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "16",
        "--bench_steps", "2", "--bench_warmup", "1", "--bench_workers", "0", "--bench_batches", "2",
        "--bench_json", str(out), "--bench_precision", "bf16"])
    record = read_record(out)
    assert record["config"]["queue"] == 16 and record["config"]["img_size"] == 32
    assert record["data_pipeline"][0]["workers"] == 0
    assert [step["precision"] for step in record["steps"]] == ["bf16"]
    assert "queue 16 batch 4 cpu] train step bf16: " in capsys.readouterr().out


def test_benchmark_bad_flags_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dino_benchmark.main(["--bench_steps", "0", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--bench_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        dino_benchmark.main(["--profile", "--device", "cpu"])  # main_dino.py's flag: not timed here
    assert exit_info.value.code == 2 and "pass it to dino/main_dino.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        dino_benchmark.main(["--bench_precision", "fp64", "--device", "cpu"])
    assert exit_info.value.code == 2 and "comma-separated list" in capsys.readouterr().err


def test_launch_script_lists_the_comparison_set():
    run = subprocess.run(["bash", "test/benchmark.sh", "--configs=a b c d", "--dry_run"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 4
    assert "--arch vit_small --patch_size 16 --local_crops_number 2 --out_dim 65536" in lines[0]
    assert "--batch_size_per_gpu 8" in lines[0] and "--batch_size_per_gpu 64" in lines[1]
    assert "configs/moby_swin_tiny.yaml" in lines[2] and "--batch-size 8" in lines[2]
    assert "configs/moby_swin_cpu.yaml" in lines[3] and "--batch-size 64" in lines[3]
    assert "MODEL.MOBY.CONTRAST_NUM_NEGATIVE 4096" in lines[3]  # upstream's queue, as compared
    bad = subprocess.run(["bash", "test/benchmark.sh", "--configs=zz", "--dry_run"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown configuration 'zz'" in bad.stderr
