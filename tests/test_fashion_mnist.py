"""Fashion-MNIST IDX -> ImageFolder conversion, on tiny IDX files written by the tests."""

from __future__ import annotations

import fcntl
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_runtime import fashion_mnist as fm
from ssl_runtime.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 1


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> None:
    """Write an IDX file: two zero bytes, dtype 0x08, ndim, big-endian uint32 dims, data."""
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_split(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    return images, labels


@pytest.fixture
def tiny_source(tmp_path: Path) -> dict:
    """30 train and 10 val images in the Debian package's file layout."""
    source = tmp_path / "idx"
    source.mkdir()
    data = {}
    for split, prefix, per_class, seed in (("train", "train", TRAIN_PER_CLASS, 0),
                                           ("val", "t10k", VAL_PER_CLASS, 1)):
        images, labels = make_split(per_class, seed)
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[split] = (images, labels)
    data["dir"] = source
    return data


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def test_conversion_counts_and_pixels(tiny_source, tmp_path):
    root = fm.ensure_fashion_mnist(tmp_path / "cache", tiny_source["dir"])
    assert root == (tmp_path / "cache").absolute()
    assert sorted(p.name for p in (root / "train").iterdir()) == list(fm.CLASS_NAMES)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        assert len(pngs(root / split)) == 10 * per_class
        for name in fm.CLASS_NAMES:
            assert len(list((root / split / name).glob("*.png"))) == per_class
        images, labels = tiny_source[split]
        for index in (0, len(labels) - 1):
            path = root / split / fm.CLASS_NAMES[labels[index]] / f"{index:05d}.png"
            with Image.open(path) as image:
                assert image.mode == "L"
                np.testing.assert_array_equal(np.asarray(image), images[index])
    marker = fm.read_marker(root)
    assert marker["counts"]["train"]["total"] == 30
    assert marker["counts"]["val"]["per_class"]["9_ankle_boot"] == 1
    assert not (tmp_path / "cache.partial").exists()


def test_class_folders_sort_in_label_order():
    assert list(fm.CLASS_NAMES) == sorted(fm.CLASS_NAMES)
    assert fm.CLASS_NAMES[0] == "0_tshirt_top" and fm.CLASS_NAMES[9] == "9_ankle_boot"


def test_finished_cache_is_reused_without_rewriting(tiny_source, tmp_path):
    root = fm.ensure_fashion_mnist(tmp_path / "cache", tiny_source["dir"])
    first = pngs(root)[0]
    before = first.stat().st_mtime_ns
    os.utime(first, ns=(before - 10**9, before - 10**9))  # an old mtime a rewrite would change
    old = first.stat().st_mtime_ns
    # Even with the source gone, the marker alone makes the second call return at once.
    for path in tiny_source["dir"].iterdir():
        path.unlink()
    assert fm.ensure_fashion_mnist(tmp_path / "cache", tiny_source["dir"]) == root
    assert first.stat().st_mtime_ns == old


def test_interrupted_conversion_is_redone(tiny_source, tmp_path):
    # An interrupted run leaves a half-written temporary folder and no final folder.
    partial = tmp_path / "cache.partial"
    (partial / "train" / "junk").mkdir(parents=True)
    (partial / "train" / "junk" / "x.png").write_bytes(b"not a png")
    root = fm.ensure_fashion_mnist(tmp_path / "cache", tiny_source["dir"])
    assert len(pngs(root)) == 40
    assert not (root / "train" / "junk").exists()
    assert not partial.exists()


def test_env_variables_choose_folders(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_DATA_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tiny_source["dir"]))
    assert fm.ensure_fashion_mnist() == (tmp_path / "envcache").absolute()
    assert len(pngs(tmp_path / "envcache" / "val")) == 10


def test_bad_magic_is_a_user_error(tiny_source, tmp_path):
    images, _ = tiny_source["train"]
    write_idx(tiny_source["dir"] / "train-images-idx3-ubyte.gz", images, magic=b"\x08\x03\x00\x00")
    with pytest.raises(UserError, match="bad magic"):
        fm.ensure_fashion_mnist(tmp_path / "cache", tiny_source["dir"])
    assert not (tmp_path / "cache").exists()


def test_wrong_dtype_and_truncated_data_are_user_errors(tmp_path):
    path = tmp_path / "x.gz"
    write_idx(path, np.zeros((2, 4, 4)), magic=bytes([0, 0, 0x0D, 3]))
    with pytest.raises(UserError, match="0x0d"):
        fm.read_idx(path)
    with gzip.open(path, "wb") as handle:  # header says 2x4x4 = 32 bytes, 5 follow
        handle.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 4, 4) + bytes(5))
    with pytest.raises(UserError, match="32 bytes"):
        fm.read_idx(path)
    path.write_bytes(b"plain text, not gzip")
    with pytest.raises(UserError, match="not a readable gzip"):
        fm.read_idx(path)


def test_image_label_count_mismatch_is_a_user_error(tiny_source, tmp_path):
    write_idx(tiny_source["dir"] / "t10k-labels-idx1-ubyte.gz", np.arange(9) % 10)
    with pytest.raises(UserError, match="10 images but 9 labels"):
        fm.ensure_fashion_mnist(tmp_path / "cache", tiny_source["dir"])


def test_missing_source_names_the_apt_package(tmp_path):
    with pytest.raises(UserError) as info:
        fm.ensure_fashion_mnist(tmp_path / "cache", tmp_path / "nowhere")
    message = str(info.value)
    assert message.startswith(f"Fashion-MNIST not found in {tmp_path / 'nowhere'}")
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "--data_path" in message


def test_foreign_folder_is_not_overwritten(tiny_source, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "precious.txt").write_text("user data")
    with pytest.raises(UserError, match="not a finished Fashion-MNIST conversion"):
        fm.ensure_fashion_mnist(cache, tiny_source["dir"])
    assert (cache / "precious.txt").read_text() == "user data"


def test_second_process_waits_for_the_conversion_lock(tiny_source, tmp_path):
    """While one process holds the lock, another neither converts nor returns; then it reuses."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "ssl_runtime.fashion_mnist", "--cache", str(tmp_path / "c"),
               "--source", str(tiny_source["dir"])]
    with open(tmp_path / "c.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        waiter = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=3)
        assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
        fcntl.flock(lock_file, fcntl.LOCK_UN)
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0
    assert out.strip() == str(tmp_path / "c")
    assert len(pngs(tmp_path / "c")) == 40


def test_command_line_prints_the_path(tiny_source, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "ssl_runtime.fashion_mnist", "--cache", str(tmp_path / "c"),
         "--source", str(tiny_source["dir"])],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str((tmp_path / "c").absolute())
    missing = subprocess.run(
        [sys.executable, "-m", "ssl_runtime.fashion_mnist", "--cache", str(tmp_path / "d"),
         "--source", str(tmp_path / "none")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: Fashion-MNIST not found in")


@pytest.mark.slow
@pytest.mark.skipif(not fm.DEFAULT_SOURCE_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_debian_dataset(tmp_path):
    root = fm.ensure_fashion_mnist(tmp_path / "fmnist", fm.DEFAULT_SOURCE_DIR)
    for split, per_class in (("train", 6000), ("val", 1000)):
        for name in fm.CLASS_NAMES:
            assert sum(1 for _ in (root / split / name).iterdir()) == per_class
    with Image.open(root / "train" / fm.CLASS_NAMES[9] / "00000.png") as image:
        assert image.size == (28, 28)  # the first training image is an ankle boot
