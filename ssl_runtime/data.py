"""Dataset paths, ImageFolder loading that survives broken files, and distributed loaders."""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from . import device as devices
from .compat import samples_allowing_empty_classes
from .distributed import DistContext
from .errors import UserError
from .resilience import PerSampleSeeded, ResumableSampler

MAX_BAD_FRACTION = 0.01  # more unreadable images than this is a broken dataset, not bad luck
MIN_SEEN_FOR_RATIO = 200  # until this many images were tried, the fraction is of this many
MAX_CONSECUTIVE_BAD = 50
# Pillow's raster formats of the files ImageFolder accepts (.jpg .jpeg .png .ppm .bmp .pgm .tif
# .tiff .webp) plus GIF. Pillow picks a format by the file's content, not its name: unrestricted, a
# PostScript file named .png would be handed to Ghostscript (an interpreter).
RASTER_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")


def default_dataset_root() -> Path:
    """The bundled default: Fashion-MNIST in ImageFolder layout, converted on first use."""
    from .fashion_mnist import ensure_fashion_mnist

    return ensure_fashion_mnist()


def _has_images(folder: Path) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def resolve_data_path(path: str | os.PathLike | None, need: Sequence[str] = ("train",),
                      flag: str = "--data_path") -> Path:
    """Check a dataset root before any expensive work; None means the default dataset."""
    if path is None or str(path) == "":
        root = default_dataset_root()
    else:
        root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"{flag} {root} does not exist: point it at an ImageFolder dataset root "
                        f"that holds {' and '.join(f'{n}/' for n in need)}<class>/<image> "
                        "(or leave it out to use the default Fashion-MNIST)")
    if not root.is_dir():
        raise UserError(f"{flag} {root} is a file, not a folder: pass the dataset root folder "
                        f"that contains {' and '.join(f'{n}/' for n in need)}")
    for split in need:
        folder = root / split
        if not folder.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())[:8]
            raise UserError(f"{flag} {root} has no {split}/ folder (found: {found or 'nothing'}): "
                            f"the layout must be {root}/{split}/<class>/<image>")
        if not _has_images(folder):
            raise UserError(f"{folder} contains no images ({', '.join(IMG_EXTENSIONS[:4])}, ...): "
                            f"put class folders with images under it")
    return root


def load_rgb(path: str) -> Image.Image:
    """Open a raster image (RASTER_FORMATS) as 8-bit RGB (grayscale, palette, CMYK and 16-bit
    included); any other content raises UnidentifiedImageError, as an unreadable file does."""
    with open(path, "rb") as handle:
        image = Image.open(handle, formats=RASTER_FORMATS)
        image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # convert('RGB') would clip 16-bit / float values; rescale to 0..255 first
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    return image.convert("RGB")


def printable(text: str) -> str:
    """`text` with what a strict UTF-8 stream cannot write (a file name's non-UTF-8 bytes, which
    Python holds as surrogates) as backslash escapes, e.g. \\xff."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


class SafeImageFolder(ImageFolder):
    """ImageFolder that skips unreadable files with a one-line warning instead of dying.

    A skipped sample is replaced by the next readable one, so batches keep their size. Too many
    broken files (over MAX_BAD_FRACTION of those tried) stop the run with a clear error.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 max_bad_fraction: float = MAX_BAD_FRACTION):
        kwargs = {"loader": load_rgb}
        if "allow_empty" in inspect.signature(ImageFolder.__init__).parameters:
            kwargs["allow_empty"] = True  # an empty class folder is legal; warned about below
        else:  # torchvision 0.16 (with torch 2.1): the same, one class folder at a time
            self.make_dataset = samples_allowing_empty_classes
        try:
            super().__init__(str(root), transform=transform, **kwargs)
        except FileNotFoundError as exc:
            raise UserError(f"{root} contains no images in class folders ({exc}): the layout must "
                            f"be {root}/<class>/<image>") from None
        empty = sorted(set(self.classes) - {self.classes[t] for t in set(self.targets)})
        if empty:
            warnings.warn(f"{root}: class folder(s) without images: {', '.join(empty[:10])}")
        if not self.samples:
            raise UserError(f"{root} contains no images: put class folders with images under it")
        self.max_bad_fraction = max_bad_fraction
        self.bad_files: set[str] = set()
        self.tried = 0

    def __getitem__(self, index: int):
        for attempt in range(MAX_CONSECUTIVE_BAD):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            if path in self.bad_files:
                continue
            self.tried += 1
            try:
                image = self.loader(path)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                self._record_bad(path, exc)
                continue
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target
        raise UserError(f"{MAX_CONSECUTIVE_BAD} unreadable images in a row near {path}: "
                        f"the dataset under {self.root} looks broken; check or re-extract it")

    def _record_bad(self, path: str, exc: Exception) -> None:
        self.bad_files.add(path)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].split(" <_io")[0][:120]
        print(printable(f"warning: skipping unreadable image {path} ({reason}); "
                        f"{len(self.bad_files)} skipped so far"), flush=True)
        # Until MIN_SEEN_FOR_RATIO images were tried the fraction is of that many, so a small dataset
        # (or the start of any) stops at its third unreadable image instead of training on the
        # readable ones repeated; from then on it is the fraction of the images tried.
        if len(self.bad_files) > self.max_bad_fraction * max(self.tried, MIN_SEEN_FOR_RATIO):
            raise UserError(f"{len(self.bad_files)} of {self.tried} images could not be read under "
                            f"{self.root} (at most {self.max_bad_fraction:.0%} of the images tried, "
                            f"counted as at least {MIN_SEEN_FOR_RATIO}, may be): the dataset looks "
                            "broken; check or re-extract it")


def check_same_classes(train: ImageFolder, val: ImageFolder) -> None:
    """Labels are indices into the sorted class folders, so train/ and val/ must hold the same
    folders: one missing or extra folder shifts every later label and the accuracy is silently
    wrong (0 % instead of 100 % on identical images)."""
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    raise UserError(f"{train.root} and {val.root} have different class folders ({len(train.classes)} vs "
                    f"{len(val.classes)}; only in train/: {only_train[:5] or 'none'}, only in val/: "
                    f"{only_val[:5] or 'none'}): labels are class-folder indices, so they must match. "
                    "Give both the same class folders (an empty folder is allowed)")


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, ctx: DistContext,
                 shuffle: bool = True, drop_last: bool = True, collate_fn: Callable | None = None,
                 prefetch_factor: int = 2, seed: int | None = None) -> DataLoader:
    """A DataLoader sharded across ranks, with pinned memory and persistent workers.

    With a seed (training loaders) the sample order and every augmentation are a function of
    (seed, epoch, sample) only, and a pass can start mid-epoch: see ssl_runtime.resilience.
    """
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"number of data workers must be >= 0, got {num_workers}")
    if drop_last and len(dataset) < batch_size * ctx.world_size:  # type: ignore[arg-type]
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch "  # type: ignore[arg-type]
                        f"({batch_size} x {ctx.world_size} ranks): lower the batch size")
    generator = None
    if seed is not None:
        sampler = ResumableSampler(dataset, ctx.world_size, ctx.rank, shuffle=shuffle, seed=seed)
        dataset = PerSampleSeeded(dataset, seed)
        # the loader draws its worker seed from this generator, not from the global one
        generator = torch.Generator().manual_seed(seed)
    elif ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle)
    else:
        sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, collate_fn=collate_fn, generator=generator,
                      **devices.loader_kwargs(ctx.device), **extra)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a distributed sampler for a new epoch (a no-op for plain samplers)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]


def class_count(dataset: Dataset) -> int:
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise UserError("the dataset does not expose its classes")
    return len(classes)



def limit_images(folder: ImageFolder, max_images: int, seed: int = 0) -> ImageFolder:
    """Keep a fixed random subset of max_images samples (in folder order); 0 keeps everything.

    The subset depends on `seed` only, so every rank (and a resumed run) sees the same images.
    """
    if 0 < max_images < len(folder.samples):
        keep = torch.randperm(len(folder.samples), generator=torch.Generator().manual_seed(seed))[:max_images]
        folder.samples = [folder.samples[i] for i in sorted(keep.tolist())]
        folder.imgs = folder.samples
        folder.targets = [target for _, target in folder.samples]
    return folder
