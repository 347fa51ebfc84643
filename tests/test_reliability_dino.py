"""DINO under interruptions, corrupt checkpoints, full disks, bad data, bad flags and NaN losses."""

from __future__ import annotations

import builtins
import errno
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dino import eval_knn, eval_linear, main_dino, nearest_neighbors
from ssl_runtime import checkpoint as ckpt_io
from ssl_runtime.checkpoint import load_checkpoint, previous_path
from tests.conftest import make_imagefolder
from tests.reliability_helpers import (ROOT, SIGKILL, SIGTERM, assert_same_tensors, run, run_and_signal,
                                       saved_epoch_step)

ARCH = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--device", "cpu"]
TRAIN = ARCH + ["--local_crop_size", "16", "--local_crops_number", "2", "--out_dim", "64",
                "--batch_size_per_gpu", "4", "--warmup_epochs", "1", "--use_fp16", "false"]


@pytest.fixture(autouse=True)
def restore_print(monkeypatch):
    monkeypatch.setattr(builtins, "print", builtins.print)


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-u", str(ROOT / "dino" / "main_dino.py"), *TRAIN, "--data_path", str(data),
            "--output_dir", str(out), *extra]


def assert_same_run(a: dict, b: dict) -> None:
    """Everything a run carries forward: weights, centre, optimizer (incl. lr / wd positions),
    epoch, and the generators."""
    for key in ("student", "teacher", "dino_loss", "optimizer", "epoch", "epoch_step"):
        assert_same_tensors(a[key], b[key], key)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


# ---------------------------------------------------------------- 1. interruptions

@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=8)
    flags = ("--epochs", "3", "--saveckp_steps", "2",  # and a teacher temperature still warming up
             "--warmup_teacher_temp", "0.03", "--warmup_teacher_temp_epochs", "2")
    reference = run(command(data, tmp_path / "ref", *flags, "--num_workers", "0"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "run"
    cmd = command(data, out, *flags, "--num_workers", "2")  # workers must not change the result

    def mid_epoch_checkpoint_in_epoch_1(text: str) -> bool:
        saved = saved_epoch_step(out / "checkpoint.pth") if "Epoch: [1/3]" in text else None
        return saved is not None and saved[0] == 1 and saved[1] > 0

    code, text = run_and_signal(cmd, mid_epoch_checkpoint_in_epoch_1, SIGKILL)
    assert code == -9, text[-2000:]
    killed_at = saved_epoch_step(out / "checkpoint.pth")
    code, text = run_and_signal(cmd, lambda t: "Starting DINO training" in t, SIGTERM)
    assert code == 143, text[-3000:]
    assert f"at epoch 1, step {killed_at[1]}" in text  # resumed inside the epoch
    match = re.search(r"received signal 15: saved a checkpoint after step (\d)/6 of epoch (\d)", text)
    assert match, text[-3000:]
    finished = run(cmd)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "Throughput:" in finished.stdout

    assert_same_run(load_checkpoint(tmp_path / "ref" / "checkpoint.pth"), load_checkpoint(out / "checkpoint.pth"))
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 3


def test_num_steps_cut_resumes_at_the_same_batch(tmp_path, tiny_imagefolder, capsys):
    main_dino.main(TRAIN + ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path / "a"),
                            "--epochs", "1", "--num_workers", "0"])
    for steps in ("2", "5"):  # 2 steps, then the remaining 4 from batch 2 on
        main_dino.main(TRAIN + ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path / "b"),
                                "--epochs", "1", "--num_workers", "0", "--num_steps", steps])
    assert "at epoch 0, step 2" in capsys.readouterr().out
    assert_same_run(load_checkpoint(tmp_path / "a" / "checkpoint.pth"),
                    load_checkpoint(tmp_path / "b" / "checkpoint.pth"))


# ---------------------------------------------------------------- 2. checkpoints

def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_imagefolder, capsys):
    args = TRAIN + ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path), "--num_workers", "0"]
    main_dino.main(args + ["--epochs", "2"])
    latest = tmp_path / "checkpoint.pth"
    assert load_checkpoint(previous_path(latest))["epoch"] == 1  # kept when epoch 2's was written
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a crash of the file system
    capsys.readouterr()
    main_dino.main(args + ["--epochs", "3"])
    text = capsys.readouterr().out
    assert f"warning: checkpoint {latest} is truncated or corrupt" in text
    assert f"falling back to {previous_path(latest)}" in text and "at epoch 1" in text
    assert "Epoch: [1/3]" in text and load_checkpoint(latest)["epoch"] == 3

    for path in tmp_path.glob("checkpoint*.pth"):
        path.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as info:
        main_dino.main(args + ["--epochs", "4"])
    assert info.value.code == 2
    assert "none of the checkpoints in" in capsys.readouterr().err


def test_full_disk_while_saving_keeps_the_last_checkpoint(tmp_path, tiny_imagefolder, monkeypatch, capsys):
    args = TRAIN + ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path), "--num_workers", "0"]
    main_dino.main(args + ["--epochs", "1"])
    before = (tmp_path / "checkpoint.pth").read_bytes()

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", no_space)
    with pytest.raises(SystemExit) as info:
        main_dino.main(args + ["--epochs", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: could not write checkpoint" in err and "No space left on device" in err
    assert "previous checkpoint is untouched" in err
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))


def read_only_mounts_work(folder: Path) -> bool:
    """A read-only file system mounted by this user (a user and mount namespace, no privileges)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs '{folder}'"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def test_a_read_only_output_folder_stops_at_start(tmp_path, tiny_imagefolder):
    """It trained a whole epoch, then died with a raw OSError raised by the cleanup of the failed save."""
    out = tmp_path / "read_only"
    out.mkdir()
    if not read_only_mounts_work(out):
        pytest.skip("unshare cannot mount a read-only file system here")
    mount_then_run = 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"'
    result = run(["unshare", "-rm", "sh", "-c", mount_then_run, str(out),
                  *command(tiny_imagefolder, out, "--epochs", "1", "--num_workers", "0")])
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: cannot write into the output folder {out} (Read-only file system): choose another " \
           "--output_dir" in result.stderr
    assert "Epoch: [0/1]" not in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("entry", ["main_dino", "eval_linear"])
def test_an_output_folder_under_a_file_is_a_one_line_error(tmp_path, tiny_imagefolder, entry, capsys):
    (tmp_path / "file").write_text("x")
    argv = {"main_dino": (main_dino.main, TRAIN + ["--epochs", "1", "--num_workers", "0"]),
            "eval_linear": (eval_linear.main, ARCH + ["--num_workers", "0", "--n_last_blocks", "2"])}
    main, args = argv[entry]
    with pytest.raises(SystemExit) as info:
        main(args + ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path / "file" / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "cannot write into the output folder" in err and "Traceback" not in err


def test_a_rerun_removes_the_temporary_file_of_a_killed_write(tmp_path, tiny_imagefolder, capsys):
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # a writer that is gone
    child.wait()
    stale = tmp_path / f".checkpoint.pth.tmp-{child.pid}"
    stale.write_bytes(b"half a checkpoint")
    main_dino.main(TRAIN + ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path),
                            "--epochs", "1", "--num_workers", "0"])
    assert not stale.exists() and f"removed {stale}, left by a checkpoint write that was killed" in \
        capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob(".*")) == []


# ---------------------------------------------------------------- 3. bad data

# Unreadable files the tiny datasets hold: up to 2 are skipped, a third stops the run (the 1 % of
# at least 200 images). Empty files are in tests/test_runtime_data.py.
BROKEN = ("truncated.jpg", "postscript.png")


def write_odd_images(train: Path) -> None:
    """Convertible images of every odd mode, and broken files, next to the normal ones."""
    odd = train / "class_0"
    rgb = Image.new("RGB", (40, 30), (200, 30, 30))
    rgb.convert("L").save(odd / "gray.png")
    rgb.convert("CMYK").save(odd / "cmyk.jpg")
    Image.new("I;16", (32, 32), 40000).save(odd / "sixteen.png")
    rgb.convert("P").save(odd / "palette.png")
    rgb.save(odd / "full.jpg")
    (odd / "truncated.jpg").write_bytes((odd / "full.jpg").read_bytes()[:200])
    (odd / "postscript.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    (train / "class_empty").mkdir()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_odd_and_broken_images_train_with_warnings(tmp_path, workers, capfd):
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=6, splits=("train",))
    write_odd_images(data / "train")
    with pytest.warns(UserWarning, match=r"class folder\(s\) without images: class_empty"):
        main_dino.main(TRAIN + ["--data_path", str(data), "--output_dir", str(tmp_path / "out"),
                                "--epochs", "1", "--num_workers", workers])
    out, _ = capfd.readouterr()
    for name in BROKEN:
        assert re.search(rf"warning: skipping unreadable image \S*{name}", out), name
    for name in ("gray.png", "cmyk.jpg", "sixteen.png", "palette.png", "full.jpg"):
        assert not re.search(rf"unreadable image \S*{name}", out), name
    assert "Throughput:" in out and load_checkpoint(tmp_path / "out" / "checkpoint.pth")["epoch"] == 1


def make_file(root: Path) -> Path:
    root.write_text("x")
    return root


def make_empty(root: Path) -> Path:
    root.mkdir()
    return root


def make_broken_dataset(root: Path) -> Path:
    folder = root / "class_a"
    folder.mkdir(parents=True)
    for i in range(60):
        (folder / f"{i}.jpg").write_bytes(b"")
    return root


@pytest.mark.parametrize("make, message", [
    (make_file, "is a file, not a folder"),
    (make_empty, "contains no images"),
    (make_broken_dataset, "3 of 3 images could not be read"),
])
def test_unusable_data_paths_are_one_line_errors(tmp_path, make, message, capsys):
    data = make(tmp_path / "data")
    with pytest.raises(SystemExit) as info:
        main_dino.main(TRAIN + ["--data_path", str(data), "--output_dir", str(tmp_path / "o"),
                                "--epochs", "1", "--num_workers", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_val_folder_for_evaluation(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=4, splits=("train",))
    with pytest.raises(SystemExit) as info:
        eval_knn.main(ARCH + ["--data_path", str(data), "--num_workers", "0"])
    assert info.value.code == 2 and "has no val/ folder" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["eval_knn", "eval_linear", "nearest_neighbors", "main_dino --knn_every"])
def test_train_and_val_with_other_class_folders_are_refused(tmp_path, entry, capsys):
    """val/ lacking train/'s first class: every val label would be off by one (Top1 0 instead of 100)."""
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=2)
    for image in (data / "val" / "class_0").iterdir():
        image.unlink()
    (data / "val" / "class_0").rmdir()
    argv = {"eval_knn": (eval_knn.main, ARCH + ["--num_workers", "0"]),
            "eval_linear": (eval_linear.main, ARCH + ["--num_workers", "0", "--n_last_blocks", "2",
                                                      "--output_dir", str(tmp_path / "lin")]),
            "nearest_neighbors": (nearest_neighbors.main, ARCH + ["--num_workers", "0",
                                                                  "--png", str(tmp_path / "nn.png")]),
            "main_dino --knn_every": (main_dino.main, TRAIN + ["--num_workers", "0", "--knn_every", "1",
                                                               "--epochs", "1",
                                                               "--output_dir", str(tmp_path / "out")])}
    main, args = argv[entry]
    with pytest.raises(SystemExit) as info:
        main(args + ["--data_path", str(data / "train" if entry.startswith("main_dino") else data)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "have different class folders (3 vs 2; only in train/: ['class_0']" in err
    assert "an empty folder is allowed" in err and "Traceback" not in err


# ---------------------------------------------------------------- 4. bad arguments

@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu must be positive"),
    (["--patch_size", "5"], "--patch_size 5 does not divide --img_size 32"),
    (["--local_crop_size", "48"], "--local_crop_size 48 is larger than --img_size 32"),
    (["--arch", "vit_gigantic"], "unknown --arch 'vit_gigantic'"),
    (["--saveckp_steps", "-2"], "--saveckp_steps"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
])
def test_bad_flags_stop_before_any_work(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main_dino.main(TRAIN + ["--data_path", str(tmp_path / "never-read"), "--epochs", "2", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_pretrained_weights_of_another_arch_or_key(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=4)
    main_dino.main(TRAIN + ["--data_path", str(data), "--output_dir", str(tmp_path / "o"), "--epochs", "1",
                            "--num_workers", "0"])
    weights = str(tmp_path / "o" / "checkpoint.pth")
    cases = [(["--arch", "vit_tiny"], "does not match the model"),
             (["--checkpoint_key", "teacherz"], "nor holds --checkpoint_key 'teacherz'")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as info:
            eval_knn.main(ARCH + ["--data_path", str(data), "--num_workers", "0",
                                  "--pretrained_weights", weights, *flags])
        assert info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- 5. numerical faults

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_imagefolder, capsys, monkeypatch):
    args = TRAIN + ["--data_path", str(tiny_imagefolder), "--output_dir", str(tmp_path), "--num_workers", "0"]
    main_dino.main(args + ["--epochs", "1"])
    good = (tmp_path / "checkpoint.pth").read_bytes()
    forward = main_dino.DINOLoss.forward
    monkeypatch.setattr(main_dino.DINOLoss, "forward", lambda *a, **k: forward(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as info:
        main_dino.main(args + ["--epochs", "2", "--saveckp_steps", "1"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Loss is nan (non-finite at or before iteration 6)" in err and "--use_fp16 false" in err
    assert (tmp_path / "checkpoint.pth").read_bytes() == good
