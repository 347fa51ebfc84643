"""Fashion-MNIST, the project's default real dataset, as an ImageFolder tree.

Debian/Ubuntu ship Fashion-MNIST in the package ``dataset-fashion-mnist`` as four gzipped IDX
files.  The training and evaluation code reads ImageFolder trees (the layout ImageNet uses), so
this module converts the IDX files once into

    <cache>/train/<class_name>/<index:05d>.png   (60,000 images, 6,000 per class)
    <cache>/val/<class_name>/<index:05d>.png     (10,000 images, 1,000 per class)

The conversion writes into a temporary sibling folder and renames it into place at the end, with
a marker file inside, so an interrupted conversion is redone and a finished one is reused at once.
A file lock lets many ranks call ``ensure_fashion_mnist`` together: one converts, the others wait.

Command line: ``python -m ssl_runtime.fashion_mnist [--cache DIR] [--source DIR]`` prints the path.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import json
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_runtime.errors import UserError, main_entry

# Folder names start with the label so that ImageFolder's sorted order equals label order.
CLASS_NAMES: tuple[str, ...] = (
    "0_tshirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
)

DEFAULT_SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE_DIR = Path("~/.cache/ssl_runtime/fashion-mnist")

# ImageFolder split name -> prefix of the IDX files in the Debian package.
SPLIT_FILES = {"train": "train", "val": "t10k"}

MARKER_NAME = ".fashion_mnist_complete.json"
MARKER_VERSION = 1

_IDX_UINT8 = 0x08  # the only element type Fashion-MNIST uses
_APT_HINT = (
    "install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) "
    "or pass --data_path to an ImageFolder dataset"
)


def default_cache_dir() -> Path:
    """Where the converted tree lives: env SSL_DATA_CACHE, else ~/.cache/ssl_runtime/fashion-mnist."""
    return Path(os.environ.get("SSL_DATA_CACHE") or DEFAULT_CACHE_DIR).expanduser()


def default_source_dir() -> Path:
    """Where the IDX files are read from: env FASHION_MNIST_DIR, else the Debian package's folder."""
    return Path(os.environ.get("FASHION_MNIST_DIR") or DEFAULT_SOURCE_DIR).expanduser()


def idx_path(source_dir: Path, split: str, kind: str) -> Path:
    """Path of one IDX file; kind is 'images' or 'labels'."""
    suffix = "images-idx3-ubyte.gz" if kind == "images" else "labels-idx1-ubyte.gz"
    return source_dir / f"{SPLIT_FILES[split]}-{suffix}"


def read_idx(path: Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read a gzipped IDX file into a uint8 array, checking the header against the data."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise UserError(f"IDX file {path} does not exist; {_APT_HINT}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path} is not a readable gzip file ({exc}); reinstall the dataset") from None

    # Header: two zero bytes, the element type code, the number of dimensions.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path} is not an IDX file (bad magic number); reinstall the dataset")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UINT8:
        raise UserError(
            f"{path}: IDX element type 0x{dtype_code:02x} is not supported (expected 0x08, uint8)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise UserError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise UserError(f"{path}: IDX header is truncated; reinstall the dataset")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected_bytes = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header_len != expected_bytes:
        raise UserError(
            f"{path}: IDX header promises {expected_bytes} bytes of data for shape {shape}, "
            f"the file holds {len(raw) - header_len}; reinstall the dataset"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def load_split(source_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, H, W] and labels [N] of one split, checked against each other."""
    images = read_idx(idx_path(source_dir, split, "images"), expected_ndim=3)
    labels = read_idx(idx_path(source_dir, split, "labels"), expected_ndim=1)
    if len(images) != len(labels):
        raise UserError(
            f"{source_dir}: {split} split has {len(images)} images but {len(labels)} labels"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise UserError(
            f"{source_dir}: {split} labels go up to {labels.max()}, Fashion-MNIST has "
            f"{len(CLASS_NAMES)} classes"
        )
    return images, labels


def read_marker(cache_dir: Path) -> dict | None:
    """The marker of a finished conversion, or None when the cache is absent or incomplete."""
    try:
        marker = json.loads((cache_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("version") != MARKER_VERSION:
        return None
    return marker


def _write_pngs(jobs: list[tuple[Path, np.ndarray]]) -> None:
    for path, pixels in jobs:
        Image.fromarray(pixels).save(path, format="PNG")


def _write_split(images: np.ndarray, labels: np.ndarray, split_dir: Path, workers: int) -> dict:
    """Write one split as PNGs; returns the per-class image counts."""
    for name in CLASS_NAMES:
        (split_dir / name).mkdir(parents=True)
    jobs = [
        (split_dir / CLASS_NAMES[label] / f"{index:05d}.png", images[index])
        for index, label in enumerate(labels.tolist())
    ]
    # PIL's PNG encoder and file writes release the GIL, so threads give real parallelism here
    # without the start-up cost (and fork hazards) of a process pool.
    chunks = [jobs[start::workers] for start in range(workers)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write_pngs, chunks))
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    return {name: int(count) for name, count in zip(CLASS_NAMES, counts)}


@contextlib.contextmanager
def _conversion_lock(cache_dir: Path) -> Iterator[None]:
    """Exclusive lock on a file beside the cache folder (held until the block ends)."""
    lock_path = cache_dir.with_name(cache_dir.name + ".lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _convert(source_dir: Path, cache_dir: Path) -> None:
    """Convert both splits into a temporary sibling folder, then rename it to cache_dir."""
    partial = cache_dir.with_name(cache_dir.name + ".partial")
    if partial.exists():  # left behind by an interrupted conversion
        shutil.rmtree(partial)
    partial.mkdir()
    workers = max(1, min(4, os.cpu_count() or 1))
    marker: dict = {"version": MARKER_VERSION, "source": str(source_dir), "counts": {}}
    for split in SPLIT_FILES:
        images, labels = load_split(source_dir, split)
        per_class = _write_split(images, labels, partial / split, workers)
        marker["counts"][split] = {"total": int(len(labels)), "per_class": per_class}
    # The marker goes in before the rename: a folder under the final name is always complete.
    with open(partial / MARKER_NAME, "w") as handle:
        json.dump(marker, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    if cache_dir.exists():
        cache_dir.rmdir()  # only an empty folder gets here (checked by the caller)
    os.rename(partial, cache_dir)


def _check_source(source_dir: Path) -> None:
    missing = [
        idx_path(source_dir, split, kind).name
        for split in SPLIT_FILES
        for kind in ("images", "labels")
        if not idx_path(source_dir, split, kind).is_file()
    ]
    if missing:
        raise UserError(f"Fashion-MNIST not found in {source_dir}: {_APT_HINT}")


def ensure_fashion_mnist(
    cache_dir: str | os.PathLike | None = None, source_dir: str | os.PathLike | None = None
) -> Path:
    """Return the Fashion-MNIST ImageFolder root (with train/ and val/), converting it on first use."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    source_dir = Path(source_dir).expanduser() if source_dir else default_source_dir()
    cache_dir = cache_dir.absolute()
    if read_marker(cache_dir) is not None:
        return cache_dir

    _check_source(source_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(cache_dir):
        if read_marker(cache_dir) is not None:  # another process finished while we waited
            return cache_dir
        if cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())):
            raise UserError(
                f"{cache_dir} exists but is not a finished Fashion-MNIST conversion; "
                "remove it or choose another folder (env SSL_DATA_CACHE)"
            )
        _convert(source_dir, cache_dir)
    return cache_dir


@main_entry
def main() -> None:
    parser = argparse.ArgumentParser(
        description="Convert Fashion-MNIST (Debian package dataset-fashion-mnist) into an "
        "ImageFolder tree once and print its path."
    )
    parser.add_argument("--cache", default=None, help="output folder (default: env "
                        "SSL_DATA_CACHE or ~/.cache/ssl_runtime/fashion-mnist)")
    parser.add_argument("--source", default=None, help="folder with the IDX .gz files (default: "
                        "env FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist)")
    args = parser.parse_args()
    print(ensure_fashion_mnist(args.cache, args.source))


if __name__ == "__main__":
    main()
