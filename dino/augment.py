"""DINO's multi-crop augmentation (upstream DataAugmentationDINO), with configurable crop sizes.

Two global views and N local views of one image, each a random-resized crop followed by the
BYOL-style photometric pipeline. The probabilities are upstream's: global view 1 is always
blurred, global view 2 rarely blurred but sometimes solarized, local views blurred half the time.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from ssl_runtime.augment import BatchedViews, ViewSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """Blur a PIL image with probability p, radius drawn uniformly from [radius_min, radius_max]."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        radius = random.uniform(self.radius_min, self.radius_max)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class Solarization:
    """Invert the pixels above 128 with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def normalize_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class DataAugmentationDINO:
    """Callable turning one PIL image into [global1, global2, local1, ..., localN] tensors."""

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_size: int = 224, local_size: int = 96):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        bicubic = transforms.InterpolationMode.BICUBIC

        def crop(size: int, scale: Sequence[float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic)

        self.global_transfo1 = transforms.Compose([
            crop(global_size, global_crops_scale), flip_and_color_jitter, GaussianBlur(1.0),
            normalize_transform(),
        ])
        self.global_transfo2 = transforms.Compose([
            crop(global_size, global_crops_scale), flip_and_color_jitter, GaussianBlur(0.1),
            Solarization(0.2), normalize_transform(),
        ])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            crop(local_size, local_crops_scale), flip_and_color_jitter, GaussianBlur(p=0.5),
            normalize_transform(),
        ])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops


def dino_view_specs(global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                    local_crops_number: int, global_size: int = 224, local_size: int = 96) -> list[ViewSpec]:
    """DataAugmentationDINO's views for the batched pipeline (ssl_runtime.augment): the same crops
    and probabilities (global 1: blur always; global 2: blur 0.1, solarize 0.2; local: blur 0.5)."""
    scale_g, scale_l = tuple(global_crops_scale), tuple(local_crops_scale)
    return [ViewSpec(global_size, scale_g, "bicubic", blur_p=1.0, solarize_p=0.0),
            ViewSpec(global_size, scale_g, "bicubic", blur_p=0.1, solarize_p=0.2),
            *[ViewSpec(local_size, scale_l, "bicubic", blur_p=0.5, solarize_p=0.0)] * local_crops_number]


def build_dino_augmentation(global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                            local_crops_number: int, global_size: int, local_size: int,
                            batched: bool) -> DataAugmentationDINO | BatchedViews:
    """Upstream's PIL pipeline, or its batched equivalent (same distributions and pixels)."""
    if batched:
        return BatchedViews(dino_view_specs(global_crops_scale, local_crops_scale, local_crops_number,
                                            global_size, local_size), IMAGENET_MEAN, IMAGENET_STD)
    return DataAugmentationDINO(global_crops_scale, local_crops_scale, local_crops_number,
                                global_size, local_size)


def eval_transform(img_size: int = 224) -> transforms.Compose:
    """Upstream's evaluation preprocessing, Resize(256) + CenterCrop(224), scaled for other sizes."""
    resize = int(img_size * 256 / 224)
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        normalize_transform(),
    ])
