"""DINO end to end on a tiny ImageFolder: train, resume, k-NN, linear probe, attention maps."""

from __future__ import annotations

import builtins
import io
import json
import math
import re
from contextlib import redirect_stdout

import pytest
import torch
from PIL import Image

from dino import eval_knn, eval_linear, main_dino, visualize_attention
from dino.loss import DINOLoss
from ssl_runtime import amp, report
from ssl_runtime.checkpoint import load_checkpoint
from ssl_runtime.optim import OPTIMIZERS
from tests.conftest import make_imagefolder, run_entry_quietly

ARCH = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--device", "cpu"]
TRAIN = ARCH + ["--local_crop_size", "16", "--local_crops_number", "2", "--out_dim", "64",
                "--batch_size_per_gpu", "4", "--warmup_epochs", "0", "--num_workers", "0",
                "--use_fp16", "false"]


@pytest.fixture(autouse=True)
def restore_print(monkeypatch):
    # the entry points silence print() on non-main ranks by wrapping it: undo after each test
    monkeypatch.setattr(builtins, "print", builtins.print)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch, then the same command with --epochs 2 (a resume); returns (data, out, logs)."""
    root = tmp_path_factory.mktemp("dino")
    data = make_imagefolder(root / "data", classes=3, per_class=8)
    out = root / "out"
    logs = []
    for epochs in ("1", "2"):
        saved_print = builtins.print
        buffer = io.StringIO()
        try:
            with redirect_stdout(buffer):
                main_dino.main(TRAIN + ["--data_path", str(data), "--output_dir", str(out),
                                        "--epochs", epochs, "--knn_every", "1"])
        finally:
            builtins.print = saved_print
        logs.append(buffer.getvalue())
    return data, out, logs


def test_training_writes_checkpoint_log_and_throughput(trained):
    _, out, logs = trained
    first = logs[0]
    assert re.search(r"Epoch: \[0/1\]\s+\[0/6\]\s+eta: .*loss: [\d.]+ \([\d.]+\)", first)
    # the collapse signals follow all of upstream's fields (Huawei's collectors count them to `time`)
    assert re.search(r"  wd: [\d.]+ \([\d.]+\)  time: [\d.]+  data: [\d.]+  teacher_entropy: [\d.]+ "
                     r"\([\d.]+\)  kl: -?[\d.]+ \([\d.]+\)$", first, re.MULTILINE)
    # ActualLoss is the epoch's running average, as Huawei's scripts read it
    averaged = re.search(r"Averaged stats: loss: [\d.]+ \(([\d.]+)\)", first).group(1)
    (out / "first.log").write_text(first)
    assert report.parse_train_log(out / "first.log").loss == averaged
    assert re.search(r"k-NN probe after epoch 0: 20-NN top-1 [\d.]+ % \(teacher backbone; "
                     r"24 train / 24 val", first)
    assert re.search(r"Throughput: [\d.]+ images/s \([\d.]+ s/step over \d+ steps", first)
    assert (out / "checkpoint0000.pth").is_file()  # saveckp_freq 20 keeps epoch 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    # upstream's keys, plus ours for an exact (also mid-epoch) resume
    assert set(ckpt) == {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", "epoch_step", "rng"}
    assert ckpt["dino_loss"]["center"].abs().sum() > 0  # the centre moved
    assert "head.last_layer.weight_g" in ckpt["teacher"] and "head.last_layer.weight_v" in ckpt["student"]


def test_rerun_resumes_from_next_epoch(trained):
    _, out, logs = trained
    assert "resumed student, teacher, optimizer, dino_loss" in logs[1] and "at epoch 1" in logs[1]
    assert "Epoch: [0/2]" not in logs[1] and "Epoch: [1/2]" in logs[1]
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert {"train_loss", "train_lr", "train_wd", "train_teacher_entropy", "train_kl"} <= set(lines[0])
    assert lines[0]["ln_out_dim"] == pytest.approx(math.log(64))
    assert 0 < lines[0]["train_teacher_entropy"] <= math.log(64)
    assert all(0 <= line["test_knn_probe_acc1"] <= 100 for line in lines)  # --knn_every 1
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 2
    teacher, student = ckpt["teacher"], ckpt["student"]
    # the teacher follows the student by EMA: close but not equal after training
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(teacher[key], student[key])


def test_num_steps_stops_early_and_saves(tmp_path, tiny_imagefolder, capsys):
    out = tmp_path / "perf"
    main_dino.main(TRAIN + ["--data_path", str(tiny_imagefolder), "--output_dir", str(out),
                            "--epochs", "2", "--num_steps", "3"])
    text = capsys.readouterr().out
    assert "[2/3]" in text and "Epoch: [1/2]" not in text
    assert "Throughput:" in text
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0  # the cut epoch is redone on resume


def test_knn_on_trained_checkpoint(trained, tmp_path, capsys):
    data, out, _ = trained
    eval_knn.main(ARCH + ["--data_path", str(data), "--pretrained_weights", str(out / "checkpoint.pth"),
                          "--num_workers", "0", "--nb_knn", "1", "20", "--dump_features", str(tmp_path)])
    text = capsys.readouterr().out
    assert torch.load(tmp_path / "trainfeat.pth").shape == (24, 96)
    assert torch.load(tmp_path / "testlabels.pth").tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert "Take key teacher in provided checkpoint dict" in text
    match = re.search(r"20-NN classifier result: Top1: ([\d.]+), Top5: ([\d.]+)", text)
    assert match and 0.0 <= float(match.group(1)) <= 100.0 and float(match.group(2)) == 100.0
    assert "1-NN classifier result" in text


def test_knn_random_init_warns(trained, capsys):
    data, _, _ = trained
    eval_knn.main(ARCH + ["--data_path", str(data), "--num_workers", "0", "--nb_knn", "5"])
    text = capsys.readouterr().out
    assert "warning: no --pretrained_weights given" in text and "5-NN classifier result" in text


def test_linear_probe_trains_and_reports(trained, tmp_path, capsys):
    data, out, _ = trained
    lin = tmp_path / "linear"
    args = ARCH + ["--data_path", str(data), "--pretrained_weights", str(out / "checkpoint.pth"),
                   "--num_workers", "0", "--epochs", "2", "--n_last_blocks", "2", "--num_labels", "3",
                   "--batch_size_per_gpu", "8", "--output_dir", str(lin)]
    eval_linear.main(args)
    text = capsys.readouterr().out
    assert re.search(r"\* Acc@1 [\d.]+ loss [\d.]+", text)  # 3 labels: no top-5
    assert "Max accuracy so far:" in text and "Top-1 test accuracy:" in text
    assert load_checkpoint(lin / "checkpoint.pth.tar")["epoch"] == 2
    eval_linear.main(args + ["--evaluate"])
    assert "Accuracy of the network on the 24 test images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:  # too few outputs for the dataset's classes
        eval_linear.main(args[:-2] + ["--output_dir", str(tmp_path / "l2"), "--num_labels", "2"])
    assert info.value.code == 2


def test_visualize_attention_writes_pngs(trained, tmp_path):
    data, out, _ = trained
    image = next((data / "val").rglob("*.png"))
    vis = tmp_path / "vis"
    visualize_attention.main(ARCH + ["--pretrained_weights", str(out / "checkpoint.pth"),
                                     "--image_path", str(image), "--image_size", "48", "48",
                                     "--output_dir", str(vis), "--threshold", "0.6"])
    names = sorted(p.name for p in vis.iterdir())
    assert names == ["attn-head0.png", "attn-head1.png", "attn-head2.png", "img.png",
                     "mask_th0.6_head0.png", "mask_th0.6_head1.png", "mask_th0.6_head2.png"]
    assert Image.open(vis / "attn-head0.png").size == (48, 48)


def test_bad_input_exits_with_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main_dino.main(TRAIN + ["--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        visualize_attention.main(ARCH + ["--image_path", str(tmp_path / "none.png")])
    assert info.value.code == 2


def test_max_train_images_uses_a_fixed_subset(tmp_path, tiny_imagefolder, capsys):
    main_dino.main(TRAIN + ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path),
                            "--epochs", "1", "--max_train_images", "8"])
    text = capsys.readouterr().out
    assert "there are 8 images" in text and "Epoch: [0/1]  [0/2]" in text


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_crosses_the_frozen_epoch_straight_and_on_resume(fake_torch_npu, tmp_path,
                                                                         tiny_imagefolder, optimizer):
    """--freeze_last_layer 1, 6 steps per epoch: a straight 2-epoch run, and the same run stopped
    after 3 and 6 steps and resumed each time, end with the same weights. (sgd crashed in
    torch._fused_sgd_ at the first step after the freeze; npufusedadamw: torch_npu's test double on
    the emulated NPU.)"""
    train = TRAIN + ["--data_path", str(tiny_imagefolder), "--optimizer", optimizer, "--epochs", "2",
                     "--freeze_last_layer", "1", "--lr", "0.01"]
    if optimizer == "npufusedadamw":  # torch_npu's optimizers take NPU tensors only: the emulated NPU
        train += ["--device", "npu"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_entry_quietly(main_dino.main, train + ["--output_dir", str(straight)])
    students = []
    for steps in (["--num_steps", "3"], ["--num_steps", "3"], []):
        run_entry_quietly(main_dino.main, train + ["--output_dir", str(resumed), *steps])
        students.append(load_checkpoint(resumed / "checkpoint.pth")["student"])
    last = [key for key in students[0] if "last_layer" in key and "weight_g" not in key]
    assert last and all(torch.equal(students[0][k], students[1][k]) for k in last), "moved while frozen"
    assert all(not torch.equal(students[1][k], students[2][k]) for k in last), "not trained after the freeze"
    final = load_checkpoint(straight / "checkpoint.pth")
    assert final["epoch"] == 2
    for key, value in final["student"].items():
        assert torch.equal(value, students[2][key]), key


def test_mixed_precision_on_a_cpu_with_native_bf16_trains_in_bf16(tmp_path, tiny_imagefolder, capsys,
                                                                   monkeypatch):
    """No precision flag (--use_fp16 true, upstream's default) on a CPU with avx512_bf16: bf16
    autocast, said in one line; the checkpoint keeps upstream's fp32 weights and no loss scaler."""
    monkeypatch.setattr(amp, "_host_cpuinfo", lambda: "flags\t\t: avx2 avx512f avx512_bf16\n")
    monkeypatch.delenv("SSL_CPU_AMP")
    seen = []
    forward = DINOLoss.forward
    monkeypatch.setattr(DINOLoss, "forward", lambda self, s, t, e: seen.append(s.dtype) or forward(self, s, t, e))
    flags = [f for f in TRAIN if f not in ("--use_fp16", "false")]
    main_dino.main(flags + ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path),
                            "--epochs", "1", "--num_steps", "2", "--amp_dtype", "fp16"])
    text = capsys.readouterr().out
    assert ("precision: bf16 autocast on cpu (the CPU has avx512_bf16; SSL_CPU_AMP=fp32 to turn it off)"
            in text.splitlines())
    assert seen == [torch.bfloat16] * 2  # the student's outputs, under autocast
    assert re.search(r"loss: \d+\.\d+", text) and "nan" not in text
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert "fp16_scaler" not in ckpt
    assert all(v.dtype == torch.float32 for v in ckpt["student"].values() if v.is_floating_point())
