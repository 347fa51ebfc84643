"""Dataset paths, broken images, odd image modes and loaders."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from ssl_runtime import data
from ssl_runtime.distributed import DistContext
from ssl_runtime.errors import UserError, main_entry, user_message


def test_valid_layout_is_accepted(tiny_imagefolder):
    assert data.resolve_data_path(tiny_imagefolder, need=("train", "val")) == tiny_imagefolder


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist.*ImageFolder"):
        data.resolve_data_path(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    target = tmp_path / "train.tar"
    target.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        data.resolve_data_path(target)


def test_layout_without_train_or_val(tiny_imagefolder, tmp_path):
    (tmp_path / "flat" / "cats").mkdir(parents=True)
    with pytest.raises(UserError, match="no train/ folder"):
        data.resolve_data_path(tmp_path / "flat")
    import shutil
    shutil.rmtree(tiny_imagefolder / "val")
    assert data.resolve_data_path(tiny_imagefolder, need=("train",))
    with pytest.raises(UserError, match="no val/ folder"):
        data.resolve_data_path(tiny_imagefolder, need=("train", "val"))


def test_empty_train_folder(tmp_path):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="contains no images"):
        data.resolve_data_path(tmp_path / "d")


def test_no_path_means_default_dataset(monkeypatch, tiny_imagefolder):
    monkeypatch.setattr(data, "default_dataset_root", lambda: tiny_imagefolder)
    assert data.resolve_data_path(None) == tiny_imagefolder


def _write_broken_files(folder):
    (folder / "zero.png").write_bytes(b"")
    good = folder / "000.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:40])
    (folder / "notes.jpg").write_text("not an image")


def test_broken_images_are_skipped_with_a_warning(tiny_imagefolder, capsys):
    _write_broken_files(tiny_imagefolder / "train" / "class_0")
    dataset = data.SafeImageFolder(tiny_imagefolder / "train", max_bad_fraction=1.0)
    images = [dataset[i][0] for i in range(len(dataset))]
    assert all(img.mode == "RGB" and img.size == (32, 32) for img in images)
    assert len(dataset.bad_files) == 3
    out = capsys.readouterr().out
    assert "skipping unreadable image" in out and "zero.png" in out and "notes.jpg" in out


# An Encapsulated PostScript file: Pillow hands PostScript to Ghostscript to render it.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 setgray 0 0 8 8 rectfill\nshowpage\n"
       b"%%EOF\n")


def test_postscript_named_png_is_unreadable_and_never_reaches_ghostscript(tiny_imagefolder, monkeypatch,
                                                                          capsys):
    from PIL import EpsImagePlugin

    calls = []

    def ghostscript(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript was started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    (tiny_imagefolder / "train" / "class_0" / "000.png").write_bytes(EPS)
    with pytest.raises(UnidentifiedImageError):
        data.load_rgb(str(tiny_imagefolder / "train" / "class_0" / "000.png"))
    dataset = data.SafeImageFolder(tiny_imagefolder / "train")
    assert dataset[0][1] == 0 and len(dataset.bad_files) == 1  # skipped: the next image of class_0
    assert "skipping unreadable image" in capsys.readouterr().out and not calls


def test_a_non_utf8_file_name_is_printed_escaped(tiny_imagefolder, monkeypatch):
    """File names are bytes; Python holds the non-UTF-8 ones with surrogates, which a strict UTF-8
    stdout (PYTHONIOENCODING=utf-8, most loggers) cannot encode."""
    folder = os.fsencode(tiny_imagefolder / "train" / "class_0")
    with open(os.path.join(folder, b"caf\xe9.png"), "wb"):
        pass  # empty: unreadable
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    dataset = data.SafeImageFolder(tiny_imagefolder / "train")
    index = next(i for i, (path, _) in enumerate(dataset.samples) if "caf" in path)
    dataset[index]  # skipped for the next image
    stdout.flush()
    assert b"skipping unreadable image " in stdout.buffer.getvalue()
    assert b"caf\\xe9.png" in stdout.buffer.getvalue()


def test_a_small_dataset_full_of_broken_files_stops_at_its_third(tmp_path):
    """Until 200 images were tried, the 1 % is of 200: 2 unreadable images are skipped, a third
    stops the run (before, a dataset under 200 images per worker never stopped on the fraction
    and trained on its readable images repeated)."""
    folder = tmp_path / "d" / "train" / "c"
    folder.mkdir(parents=True)
    for i in range(10):
        Image.new("L", (8, 8), i).save(folder / f"good{i}.png")
        if i % 2:
            (folder / f"good{i}_bad.png").write_bytes(b"")  # 5 of 15 unreadable
    dataset = data.SafeImageFolder(tmp_path / "d" / "train")
    with pytest.raises(UserError, match=r"3 of \d+ images could not be read .*at most 1% of the images "
                                        r"tried, counted as at least 200"):
        for i in range(len(dataset)):
            dataset[i]
    assert len(dataset.bad_files) == 3


def test_the_fraction_rule_after_200_images_is_unchanged(tiny_imagefolder):
    """From 200 images tried on, more than 1 % of those tried stops the run, as before."""
    dataset = data.SafeImageFolder(tiny_imagefolder / "train")
    error = OSError("broken")
    dataset.tried = 400
    for i in range(4):
        dataset._record_bad(f"bad{i}.png", error)  # 4 of 400: 1 %, not more
    with pytest.raises(UserError, match="5 of 400 images"):
        dataset._record_bad("bad4.png", error)


def test_too_many_broken_images_stop_with_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "d" / "train" / "c"
    folder.mkdir(parents=True)
    Image.new("L", (8, 8)).save(folder / "good.png")
    for i in range(5):
        (folder / f"bad{i}.png").write_bytes(b"")
    monkeypatch.setattr(data, "MIN_SEEN_FOR_RATIO", 3)
    dataset = data.SafeImageFolder(tmp_path / "d" / "train")
    with pytest.raises(UserError, match="could not be read"):
        for i in range(len(dataset)):
            dataset[i]


def test_only_broken_images_is_an_error_not_a_hang(tmp_path):
    folder = tmp_path / "d" / "train" / "c"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"bad{i}.png").write_bytes(b"")
    dataset = data.SafeImageFolder(tmp_path / "d" / "train", max_bad_fraction=1.0)
    with pytest.raises(UserError, match="unreadable images in a row"):
        dataset[0]


def test_odd_image_modes_become_rgb(tmp_path):
    folder = tmp_path / "d" / "train" / "c"
    folder.mkdir(parents=True)
    Image.new("L", (4, 4), 128).save(folder / "gray.png")
    Image.new("P", (4, 4), 3).save(folder / "palette.png")
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    ramp = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    Image.fromarray(ramp).save(folder / "deep.png")  # 16-bit grayscale
    dataset = data.SafeImageFolder(tmp_path / "d" / "train")
    images = {p.split("/")[-1]: dataset[i][0] for i, (p, _) in enumerate(dataset.samples)}
    assert {img.mode for img in images.values()} == {"RGB"}
    deep = np.asarray(images["deep.png"])[..., 0]
    assert deep.min() == 0 and deep.max() == 255  # rescaled, not clipped to white
    assert np.asarray(images["gray.png"])[0, 0].tolist() == [128, 128, 128]


def test_empty_class_folder_is_a_warning(tiny_imagefolder):
    (tiny_imagefolder / "train" / "class_9").mkdir()
    with pytest.warns(UserWarning, match="class_9"):
        dataset = data.SafeImageFolder(tiny_imagefolder / "train")
    assert len(dataset.classes) == 4 and len(dataset) == 24


def _ctx(rank=0, world=1):
    return DistContext(rank, world, rank, torch.device("cpu"), "cpu", "gloo", world > 1)


def test_loader_batches_and_shards(tiny_imagefolder):
    import torchvision.transforms as T
    dataset = data.SafeImageFolder(tiny_imagefolder / "train", transform=T.ToTensor())
    loader = data.build_loader(dataset, batch_size=5, num_workers=0, ctx=_ctx())
    batches = list(loader)
    assert len(batches) == 4 and batches[0][0].shape == (5, 3, 32, 32)
    sharded = data.build_loader(dataset, batch_size=4, num_workers=0, ctx=_ctx(1, 2), shuffle=False)
    assert isinstance(sharded.sampler, torch.utils.data.DistributedSampler)
    assert list(sharded.sampler) == list(range(1, 24, 2))
    data.set_loader_epoch(sharded, 3)
    assert sharded.sampler.epoch == 3


def test_loader_rejects_batches_larger_than_the_dataset(tiny_imagefolder):
    dataset = data.SafeImageFolder(tiny_imagefolder / "train")
    with pytest.raises(UserError, match="fewer than one global batch"):
        data.build_loader(dataset, batch_size=20, num_workers=0, ctx=_ctx(0, 2))
    with pytest.raises(UserError, match="batch size must be positive"):
        data.build_loader(dataset, batch_size=0, num_workers=0, ctx=_ctx())


def test_errors_raised_in_workers_reach_the_user_as_one_line():
    wrapped = UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most "
                        "recent call last):\n  File x\nssl_runtime.errors.UserError: 9 of 10 bad\n")
    assert user_message(wrapped) == "9 of 10 bad"


def test_main_entry_exits_2_with_the_message():
    code = ("from ssl_runtime.errors import main_entry, UserError\n"
            "@main_entry\ndef main():\n    raise UserError('bad flag; use --x')\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: bad flag; use --x"
    assert "Traceback" not in proc.stderr
    assert callable(main_entry)


class _Draws(torch.utils.data.Dataset):
    """Item i: what Python's, numpy's and torch's CPU generators give right after seeding."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        import random
        return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))], dtype=torch.float64)


def _generator_states():
    import random
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def test_a_seeded_batch_draws_per_sample_and_keeps_the_global_generators(monkeypatch):
    """The main-process loader seeds every sample from (seed, epoch, index), as item-by-item
    access does, leaves the global generators as they were, and saves and restores them once per
    batch, not once per sample (numpy's state costs about 0.1 ms each way)."""
    loader = data.build_loader(_Draws(), batch_size=4, num_workers=0, ctx=_ctx(), seed=3)
    seeded = loader.dataset
    before = _generator_states()
    saves = []
    real_get_state = np.random.get_state
    monkeypatch.setattr(np.random, "get_state", lambda: saves.append(1) or real_get_state())
    batches = list(loader)
    monkeypatch.undo()
    after = _generator_states()
    assert after[0] == before[0] and after[1] == before[1] and torch.equal(after[2], before[2])
    assert len(saves) == len(batches) == 3  # one save per batch of 4
    keys = list(loader.sampler)
    one_by_one = torch.stack([seeded[key] for key in keys])
    assert torch.equal(torch.cat(batches), one_by_one)
    assert len({tuple(row.tolist()) for row in one_by_one}) == 12  # every sample drew its own values
