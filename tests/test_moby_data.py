"""MoBY data: the asymmetric two-view augmentation, evaluation transforms and training subsets."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from moby.config import get_config
from moby.data import (RandomGaussianBlur, Solarize, build_labelled_datasets, build_pretrain_dataset,
                       eval_transform, linear_train_transform, moby_view_specs, ssl_transforms)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shipped_config(name: str, data: Path | str = "", *opts):
    return get_config(argparse.Namespace(cfg=str(CONFIGS / name), opts=list(opts), data_path=str(data)))


def cpu_config(data: Path | str = "", *opts):
    return shipped_config("moby_swin_cpu.yaml", data, *opts)


def applied(pipeline, kind):
    """The RandomApply probabilities of the steps of `kind` in a Compose pipeline."""
    return [step.p for step in pipeline.transforms
            if isinstance(step, transforms.RandomApply) and isinstance(step.transforms[0], kind)]


def test_two_views_follow_upstream_recipe():
    view1, view2 = ssl_transforms(shipped_config("moby_swin_tiny.yaml"))
    for view in (view1, view2):
        crop = view.transforms[0]
        assert isinstance(crop, transforms.RandomResizedCrop) and crop.size == (224, 224)
        assert crop.scale == (0.08, 1.0)
        jitter = [s for s in view.transforms if isinstance(s, transforms.RandomApply)
                  and isinstance(s.transforms[0], transforms.ColorJitter)][0]
        assert jitter.p == 0.8 and jitter.transforms[0].hue == (-0.1, 0.1)
        assert [s.p for s in view.transforms if isinstance(s, transforms.RandomGrayscale)] == [0.2]
    assert applied(view1, RandomGaussianBlur) == [1.0] and applied(view1, Solarize) == []
    assert applied(view2, RandomGaussianBlur) == [0.1] and applied(view2, Solarize) == [0.2]


def test_cpu_recipe_crops_at_least_half_of_a_32_pixel_image():
    crops = [view.transforms[0] for view in ssl_transforms(cpu_config())]
    assert [(c.size, c.scale) for c in crops] == [((32, 32), (0.5, 1.0))] * 2
    # the batched pipeline, which CPU runs use by default
    assert [(v.size, v.scale) for v in moby_view_specs(cpu_config())] == [(32, (0.5, 1.0))] * 2


def test_solarize_and_blur():
    image = Image.fromarray(np.array([[0, 100, 200, 255]], dtype=np.uint8).repeat(4, 0), mode="L")
    assert np.asarray(Solarize()(image))[0].tolist() == [0, 100, 55, 0]
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8), mode="L")
    assert np.asarray(RandomGaussianBlur(1.5, 1.5)(noisy)).std() < np.asarray(noisy).std()


def test_pretrain_dataset_returns_two_views_and_label(tiny_imagefolder):
    dataset = build_pretrain_dataset(cpu_config(tiny_imagefolder))
    view1, view2, label = dataset[5]
    assert view1.shape == view2.shape == (3, 32, 32) and not torch.equal(view1, view2)
    assert label == dataset.folder.targets[5] and len(dataset.classes) == 3


def test_subset_is_fixed_and_shared_by_evaluation(tiny_imagefolder):
    config = cpu_config(tiny_imagefolder, "DATA.MAX_TRAIN_IMAGES", "10")
    first = build_pretrain_dataset(config).folder.samples
    again = build_pretrain_dataset(config).folder.samples
    assert len(first) == 10 and first == again
    train, val = build_labelled_datasets(config, linear_train_transform(config))
    assert train.samples == first and len(train.targets) == 10
    assert len(val) == 24  # the validation split is never subsampled
    other_seed = cpu_config(tiny_imagefolder, "DATA.MAX_TRAIN_IMAGES", "10", "SEED", "1")
    assert build_pretrain_dataset(other_seed).folder.samples != first
    assert len(build_pretrain_dataset(cpu_config(tiny_imagefolder)).folder.samples) == 24


def test_eval_transform_keeps_the_whole_small_image():
    config = cpu_config()
    steps = eval_transform(config).transforms
    assert steps[0].size == 36 and steps[1].size == (32, 32)  # 32 * 256 / 224, then centre 32
    out = eval_transform(cpu_config("", "TEST.CROP", "False"))(Image.new("RGB", (28, 28)))
    assert out.shape == (3, 32, 32)
