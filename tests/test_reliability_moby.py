"""MoBY under interruptions, corrupt checkpoints, full disks, bad data, bad configs and NaN losses."""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path

import pytest
import torch

from moby import eval_knn, main_linear, main_moby
from ssl_runtime import checkpoint as ckpt_io
from ssl_runtime.checkpoint import load_checkpoint, previous_path
from tests.conftest import make_imagefolder
from tests.reliability_helpers import ROOT, SIGKILL, SIGTERM, assert_same_tensors, run, run_and_signal
from tests.test_reliability_dino import BROKEN, make_broken_dataset, make_empty, make_file, write_odd_images

from tests.test_moby_train import CPU_CFG, NAME, QUEUE, TINY  # noqa: E402  (the tiny MoBY set-up)


def args(data: Path, out: Path, *extra: str, opts: tuple[str, ...] = ()) -> list[str]:
    return ["--cfg", CPU_CFG, "--data-path", str(data), "--batch-size", "8", "--output", str(out),
            "--tag", "t", "--device", "cpu", *extra, "--opts", *TINY, *opts]


def run_dir(out: Path) -> Path:
    return out / NAME / "t"


def assert_same_run(a: dict, b: dict) -> None:
    """Weights, queues and their pointer, optimizer, lr schedule, scaler, epoch and generators."""
    assert "queue1" in a["model"] and "queue_ptr" in a["model"]
    for key in ("model", "optimizer", "lr_scheduler", "amp", "epoch", "epoch_step"):
        assert_same_tensors(a[key], b[key], key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


# ---------------------------------------------------------------- 1. interruptions

@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=16)  # 6 iterations per epoch
    script = [sys.executable, "-u", str(ROOT / "moby" / "main_moby.py")]
    opts = ("TRAIN.SAVE_STEPS", "2")
    reference = run(script + args(data, tmp_path / "ref", "--epochs", "3", opts=opts))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "run"
    cmd = script + args(data, out, "--epochs", "3", opts=opts + ("DATA.NUM_WORKERS", "2"))
    code, text = run_and_signal(cmd, lambda t: "Train: [1/3][3/6]" in t, SIGKILL)
    assert code == -9, text[-2000:]
    code, text = run_and_signal(cmd, lambda t: "Start self-supervised pre-training" in t, SIGTERM)
    assert code == 143, text[-3000:]
    assert "resuming inside epoch 1 after 4 iterations" in text
    assert re.search(r"received signal 15: saved a checkpoint after step \d/6 of epoch \d", text), text[-3000:]
    finished = run(cmd)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "Throughput:" in finished.stdout

    final = load_checkpoint(run_dir(out) / "checkpoint.pth")
    assert_same_run(load_checkpoint(run_dir(tmp_path / "ref") / "checkpoint.pth"), final)
    assert final["epoch"] == 2 and final["epoch_step"] == 0


# ---------------------------------------------------------------- 2. checkpoints

def test_corrupt_checkpoint_falls_back_to_the_previous_epoch(tmp_path, tiny_imagefolder, capsys):
    main_moby.main(args(tiny_imagefolder, tmp_path, "--epochs", "2"))
    folder = run_dir(tmp_path)
    latest = folder / "checkpoint.pth"
    assert load_checkpoint(previous_path(latest))["epoch"] == 0
    latest.write_bytes(latest.read_bytes()[:1000])
    (folder / "ckpt_epoch_1.pth").write_bytes(b"")  # the same epoch's copy is broken too
    capsys.readouterr()
    main_moby.main(args(tiny_imagefolder, tmp_path, "--epochs", "3"))
    text = capsys.readouterr().out
    assert f"checkpoint {latest} is truncated or corrupt" in text
    assert f"auto resuming from {previous_path(latest)}" in text
    assert "Train: [1/3][0/3]" in text and load_checkpoint(latest)["epoch"] == 2


def test_full_disk_while_saving_keeps_the_last_checkpoint(tmp_path, tiny_imagefolder, monkeypatch, capsys):
    main_moby.main(args(tiny_imagefolder, tmp_path, "--epochs", "1"))
    latest = run_dir(tmp_path) / "checkpoint.pth"
    before = latest.read_bytes()

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", no_space)
    with pytest.raises(SystemExit) as info:
        main_moby.main(args(tiny_imagefolder, tmp_path, "--epochs", "2"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: could not write checkpoint" in err and "No space left on device" in err
    assert latest.read_bytes() == before and not (run_dir(tmp_path) / "ckpt_epoch_1.pth").exists()


# ---------------------------------------------------------------- 3. bad data

@pytest.mark.parametrize("workers", ["0", "2"])
def test_odd_and_broken_images_train_with_warnings(tmp_path, workers, capfd):
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=6, splits=("train",))
    write_odd_images(data / "train")
    with pytest.warns(UserWarning, match=r"class folder\(s\) without images: class_empty"):
        main_moby.main(args(data, tmp_path, "--epochs", "1", opts=("DATA.NUM_WORKERS", workers)))
    out, _ = capfd.readouterr()
    for name in BROKEN:
        assert re.search(rf"warning: skipping unreadable image \S*{name}", out), name
    for name in ("gray.png", "cmyk.jpg", "sixteen.png", "palette.png", "full.jpg"):
        assert not re.search(rf"unreadable image \S*{name}", out), name
    assert "Throughput:" in out and load_checkpoint(run_dir(tmp_path) / "checkpoint.pth")["epoch"] == 0


def test_an_output_folder_under_a_file_is_a_one_line_error(tmp_path, tiny_imagefolder, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as info:
        main_moby.main(args(tiny_imagefolder, tmp_path / "file", "--epochs", "1"))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "cannot write into the output folder" in err and "--output" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("make, message", [
    (make_file, "is a file, not a folder"),
    (make_empty, "has no train/ folder"),
    (lambda root: make_broken_dataset(root / "train").parent, "3 of 3 images could not be read"),
])
def test_unusable_data_paths_are_one_line_errors(tmp_path, make, message, capsys):
    data = make(tmp_path / "data")
    with pytest.raises(SystemExit) as info:
        main_moby.main(args(data, tmp_path / "o", "--epochs", "1", opts=("DATA.NUM_WORKERS", "2")))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_val_folder_for_evaluation(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=4, splits=("train",))
    with pytest.raises(SystemExit) as info:
        eval_knn.main(["--cfg", CPU_CFG, "--data-path", str(data), "--output", str(tmp_path), "--tag", "t",
                       "--device", "cpu", "--opts", *TINY])
    assert info.value.code == 2 and "has no val/ folder" in capsys.readouterr().err


# ---------------------------------------------------------------- 4. bad arguments and configs

@pytest.mark.parametrize("extra, opts, message", [
    (["--epochs", "-1"], (), "TRAIN.EPOCHS is -1, must be >= 1"),
    (["--batch-size", "0"], (), "DATA.BATCH_SIZE is 0, must be >= 1"),
    ([], ("MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "20"), "must be a multiple of the global batch size (8"),
    ([], ("MODEL.SWIN.PATCH_SIZE", "3"), "MODEL.SWIN.PATCH_SIZE 3 does not divide DATA.IMG_SIZE 32"),
    ([], ("MODEL.MOBY.ENCODER", "resnet50"), "unknown MODEL.MOBY.ENCODER 'resnet50'"),
    ([], ("TRAIN.NO_SUCH_KEY", "1"), "unknown config key TRAIN.NO_SUCH_KEY"),
    ([], ("TRAIN.EPOCHS",), "--opts needs KEY VALUE pairs"),
    ([], ("TRAIN.SAVE_STEPS", "-1"), "TRAIN.SAVE_STEPS is -1"),
    ([], ("MODEL.MOBY.CONTRAST_TEMPERATURE", "0.0"), "CONTRAST_TEMPERATURE is 0.0, must be > 0"),
])
def test_bad_configs_stop_before_any_work(tmp_path, extra, opts, message, capsys):
    with pytest.raises(SystemExit) as info:
        main_moby.main(args(tmp_path / "never-read", tmp_path, *extra, opts=opts))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / NAME).exists()  # nothing was written


def test_pretrained_weights_of_another_architecture(tmp_path, tiny_imagefolder, capsys):
    deit = ["--cfg", str(ROOT / "configs" / "moby_deit_cpu.yaml"), "--data-path", str(tiny_imagefolder),
            "--batch-size", "8", "--output", str(tmp_path), "--tag", "d", "--device", "cpu", "--epochs", "1",
            "--opts", "MODEL.DEIT.EMBED_DIM", "24", "MODEL.DEIT.DEPTH", "1", "MODEL.DEIT.NUM_HEADS", "2",
            "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", str(QUEUE), "DATA.NUM_WORKERS", "0"]
    main_moby.main(deit)
    weights = next(tmp_path.glob("*/d/checkpoint.pth"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main_linear.main(["--cfg", str(ROOT / "configs" / "moby_swin_cpu_linear.yaml"), "--data-path",
                          str(tiny_imagefolder), "--batch-size", "8", "--output", str(tmp_path / "lin"),
                          "--tag", "t", "--pretrained", str(weights), "--device", "cpu", "--opts", *TINY])
    assert info.value.code == 2
    assert "does not match the model" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. numerical faults

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_imagefolder, monkeypatch, capsys):
    main_moby.main(args(tiny_imagefolder, tmp_path, "--epochs", "1"))
    latest = run_dir(tmp_path) / "checkpoint.pth"
    good = latest.read_bytes()
    loss = main_moby.moby_loss
    monkeypatch.setattr(main_moby, "moby_loss", lambda model, batch: loss(model, batch) * float("nan"))
    with pytest.raises(SystemExit) as info:
        main_moby.main(args(tiny_imagefolder, tmp_path, "--epochs", "2", opts=("TRAIN.SAVE_STEPS", "1")))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Loss is nan (non-finite at or before iteration 3)" in err and "--amp-opt-level O0" in err
    assert latest.read_bytes() == good


def test_skip_non_finite_skips_the_step_and_goes_on(tmp_path, tiny_imagefolder, monkeypatch, capsys):
    """TRAIN.SKIP_NON_FINITE: the NaN iteration's optimizer step is skipped (as upstream's apex
    loss scaler does), the others train, the weights stay finite and the skip is logged."""
    loss, calls = main_moby.moby_loss, []

    def nan_at_second_call(model, batch):
        calls.append(1)
        return loss(model, batch) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(main_moby, "moby_loss", nan_at_second_call)
    main_moby.main(args(tiny_imagefolder, tmp_path, "--epochs", "1", opts=("TRAIN.SKIP_NON_FINITE", "True")))
    saved = load_checkpoint(run_dir(tmp_path) / "checkpoint.pth")
    assert len(calls) == 3 and {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {2}
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert "skipped 1 optimizer step(s) with a non-finite loss by iteration 1" in capsys.readouterr().out
