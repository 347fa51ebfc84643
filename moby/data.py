"""Datasets and augmentations of upstream Transformer-SSL's data/build.py, on any ImageFolder.

Pre-training sees two differently augmented views of every image (asymmetric BYOL recipe):
both views get RandomResizedCrop(IMG_SIZE, scale=(SSL_AUG_CROP, 1)), a horizontal flip, colour
jitter (0.4, 0.4, 0.2, 0.1) with p 0.8 and grayscale with p 0.2; view 1 is always blurred, view 2
is blurred with p 0.1 and solarised with p 0.2.
"""

from __future__ import annotations

import random
from typing import Callable

from PIL import Image, ImageFilter, ImageOps
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset
from torchvision import transforms
from yacs.config import CfgNode

from ssl_runtime import device as devices
from ssl_runtime.augment import BatchedViews, ViewSpec, views_to_device
from ssl_runtime.data import SafeImageFolder, check_same_classes, limit_images, resolve_data_path
from ssl_runtime.distributed import DistContext
from ssl_runtime.errors import UserError

BILINEAR = transforms.InterpolationMode.BILINEAR
BICUBIC = transforms.InterpolationMode.BICUBIC


class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from [sigma_min, sigma_max] per image."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 2.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma_min, self.sigma_max)))


class Solarize:
    """Invert every pixel above 128 (PIL's default threshold, as upstream)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image)


def _normalize() -> transforms.Normalize:
    return transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def ssl_view_transform(img_size: int, min_crop: float, blur_p: float, solarize_p: float) -> Callable:
    steps = [
        transforms.RandomResizedCrop(img_size, scale=(min_crop, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([RandomGaussianBlur()], p=blur_p),
    ]
    if solarize_p > 0:
        steps.append(transforms.RandomApply([Solarize()], p=solarize_p))
    return transforms.Compose(steps + [transforms.ToTensor(), _normalize()])


def ssl_transforms(config: CfgNode) -> tuple[Callable, Callable]:
    """The two views' pipelines (AUG.SSL_AUG_TYPE 'byol', upstream's only type)."""
    if config.AUG.SSL_AUG_TYPE != "byol":
        raise UserError(f"AUG.SSL_AUG_TYPE {config.AUG.SSL_AUG_TYPE!r} is not supported: use 'byol'")
    size, crop = config.DATA.IMG_SIZE, config.AUG.SSL_AUG_CROP
    return (ssl_view_transform(size, crop, blur_p=1.0, solarize_p=0.0),
            ssl_view_transform(size, crop, blur_p=0.1, solarize_p=0.2))


def linear_train_transform(config: CfgNode) -> Callable:
    """Linear evaluation training: random resized crop and flip only (AUG.SSL_LINEAR_AUG)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(config.DATA.IMG_SIZE),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        _normalize(),
    ])


def eval_transform(config: CfgNode, interpolation=BILINEAR) -> Callable:
    """Resize then centre-crop IMG_SIZE (or resize straight to it when TEST.CROP is False).

    Upstream's linear evaluation resizes (bilinear) to IMG_SIZE + 32: that is 256 for 224, the
    same as the 256/224 ratio used here, but for 32-px images it would keep only the central
    quarter. The k-NN protocol (DINO's) resizes with bicubic interpolation.
    """
    size = config.DATA.IMG_SIZE
    if config.TEST.CROP:
        resize = [transforms.Resize(int(size * 256 / 224), interpolation=interpolation),
                  transforms.CenterCrop(size)]
    else:
        resize = [transforms.Resize((size, size), interpolation=interpolation)]
    return transforms.Compose(resize + [transforms.ToTensor(), _normalize()])


def moby_view_specs(config: CfgNode) -> list[ViewSpec]:
    """ssl_transforms' two views for the batched pipeline (ssl_runtime.augment): the same crop
    (RandomResizedCrop's default bilinear resampling) and probabilities."""
    if config.AUG.SSL_AUG_TYPE != "byol":
        raise UserError(f"AUG.SSL_AUG_TYPE {config.AUG.SSL_AUG_TYPE!r} is not supported: use 'byol'")
    size, scale = config.DATA.IMG_SIZE, (config.AUG.SSL_AUG_CROP, 1.0)
    return [ViewSpec(size, scale, "bilinear", blur_p=1.0, solarize_p=0.0),
            ViewSpec(size, scale, "bilinear", blur_p=0.1, solarize_p=0.2)]


class TwoViewDataset(Dataset):
    """Wraps an ImageFolder: item i is (view1, view2, label), each view from its own pipeline, or
    from one BatchedViews producing both (then each view is a (pixels, parameters) pair)."""

    def __init__(self, folder: SafeImageFolder, view1: Callable, view2: Callable | None = None):
        self.folder = folder
        self.view1, self.view2 = view1, view2
        folder.transform = None
        self.classes = folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image, label = self.folder[index]
        if self.view2 is None:
            return (*self.view1(image), label)
        return self.view1(image), self.view2(image), label


def dataset_root(config: CfgNode, need: tuple[str, ...]):
    """DATA.DATA_PATH checked (empty: the default Fashion-MNIST); zip/cache modes refused."""
    if config.DATA.ZIP_MODE:
        raise UserError("--zip (zipped ImageNet with *_map.txt) is not supported: extract the data "
                        "and pass an ImageFolder root with --data-path")
    return resolve_data_path(config.DATA.DATA_PATH or None, need=need, flag="--data-path")


def train_folder(config: CfgNode, root, transform: Callable | None = None) -> SafeImageFolder:
    folder = SafeImageFolder(root / "train", transform=transform)
    return limit_images(folder, config.DATA.MAX_TRAIN_IMAGES, config.SEED)


def two_view_dataset(config: CfgNode, folder: SafeImageFolder) -> TwoViewDataset:
    """Upstream's PIL pipelines, or with AUG.BATCHED (resolved to True or False by cli.start_run)
    one BatchedViews whose colour steps the training loop applies per batch (batch_preparer)."""
    if config.AUG.BATCHED:
        views = BatchedViews(moby_view_specs(config), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        return TwoViewDataset(folder, views)
    view1, view2 = ssl_transforms(config)
    return TwoViewDataset(folder, view1, view2)


def build_pretrain_dataset(config: CfgNode) -> TwoViewDataset:
    return two_view_dataset(config, train_folder(config, dataset_root(config, ("train",))))


def batch_preparer(dataset: TwoViewDataset, device) -> Callable[[tuple], tuple]:
    """What the training loop applies to a loaded (view1, view2, labels) batch."""
    finish = views_to_device(dataset.view1 if dataset.view2 is None else None, device)

    def prepare(batch: tuple) -> tuple:
        view_1, view_2, labels = batch
        return (*finish([view_1, view_2]), labels.to(device, non_blocking=True))

    return prepare


def build_labelled_datasets(config: CfgNode, train_transform: Callable,
                            val_transform: Callable | None = None) -> tuple[SafeImageFolder, SafeImageFolder]:
    """(train, val) ImageFolders for linear / k-NN evaluation (val: eval_transform by default)."""
    root = dataset_root(config, ("train", "val"))
    train = train_folder(config, root, train_transform)
    val = SafeImageFolder(root / "val", transform=val_transform or eval_transform(config))
    check_same_classes(train, val)
    return train, val


def sharded_eval_loader(dataset: Dataset, batch_size: int, num_workers: int, ctx: DistContext) -> DataLoader:
    """Each rank reads every world_size-th image (no padding), so summed counts are exact."""
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))  # type: ignore[arg-type]
    return DataLoader(shard, batch_size=batch_size, sampler=SequentialSampler(shard),
                      num_workers=num_workers, drop_last=False, **devices.loader_kwargs(ctx.device))
