"""The batched augmentation (ssl_runtime.augment) against upstream's PIL pipelines.

Two claims are checked. (1) The same transformation: for given parameters every colour step,
and the whole view, gives PIL's pixels. Pillow computes in 8-bit integers and float32 / double
expressions that we reproduce operation by operation; the one expression a compiler may fuse
into a multiply-add (aarch64 builds do: the float32 blend `a + f * (x - a)` before its
truncation, and hue's double `v * (1 - s * (1 - f))` before rounding) can change the last bit
before an 8-bit truncation, hence a tolerance of one 8-bit level per step. (2) The same
parameter distributions: parameters drawn by our sampler and recorded from torchvision's
transforms (spies on the calls) pass two-sample tests at a false-alarm rate of 1e-6 each, with
critical values from the sample sizes (Kolmogorov-Smirnov for continuous draws, a z-test for
frequencies). Every generator is seeded, so the outcome is the same on every machine.
"""

from __future__ import annotations

import math
import random

import numpy as np
import PIL.ImageFilter
import PIL.ImageOps
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import default_collate
from torchvision import transforms
from torchvision.transforms import functional as TF

from dino.augment import DataAugmentationDINO, dino_view_specs
from moby.data import moby_view_specs, ssl_transforms
from ssl_runtime import augment
from ssl_runtime.augment import (BLUR, FACTORS, GRAY, JITTER, ORDER, SOLARIZE, BatchedViews, ViewSpec,
                                 draw_view, sample_crop)
from tests.test_moby_data import cpu_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LEVEL = 1.0  # one 8-bit level: see the module docstring
ALPHA = 1e-6  # false-alarm rate of each statistical comparison
Z_CRITICAL = 4.89  # two-sided normal quantile for ALPHA


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()).float()


def colour_images(count: int, height: int = 20, width: int = 24, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]
    # saturated, grey and extreme pixels, where the 8-bit HSV and the clipping have corner cases
    corners = np.array([0, 1, 127, 128, 254, 255], dtype=np.uint8)
    grid = np.stack(np.meshgrid(corners, corners, corners, indexing="ij"), -1).reshape(-1, 3)
    images.append(Image.fromarray(np.resize(grid, (height * width, 3)).reshape(height, width, 3)))
    return images


def float32(values) -> list[float]:
    """Factors as the float32 values both pipelines compute with (torchvision draws float32)."""
    return [float(np.float32(v)) for v in values]


# ---------------------------------------------------------------- (1) the same transformation

STEPS = [
    ("brightness", TF.adjust_brightness, augment.adjust_brightness, (0.0, 2.0)),
    ("contrast", TF.adjust_contrast, augment.adjust_contrast, (0.0, 2.0)),
    ("saturation", TF.adjust_saturation, augment.adjust_saturation, (0.0, 2.0)),
    ("hue", TF.adjust_hue, augment.adjust_hue, (-0.5, 0.5)),
]


@pytest.mark.parametrize("name,pil_step,tensor_step,bounds", STEPS, ids=[s[0] for s in STEPS])
def test_each_jitter_step_gives_pils_pixels(name, pil_step, tensor_step, bounds):
    images = colour_images(40)
    factors = float32(np.random.default_rng(1).uniform(*bounds, len(images)))
    expected = torch.stack([as_tensor(pil_step(image, f)) for image, f in zip(images, factors)])
    got = tensor_step(torch.stack([as_tensor(i) for i in images]), torch.tensor(factors).view(-1, 1, 1, 1))
    assert (got - expected).abs().max() <= LEVEL


def test_grayscale_solarize_and_blur_give_pils_pixels():
    images = colour_images(30, 9, 13)
    batch = torch.stack([as_tensor(i) for i in images])
    grey = torch.stack([as_tensor(TF.rgb_to_grayscale(i, 3)) for i in images])
    assert torch.equal(augment.luma(batch).expand(-1, 3, -1, -1), grey)  # integer arithmetic
    solarized = torch.stack([as_tensor(ImageOps.solarize(i)) for i in images])
    assert torch.equal(augment.solarize(batch), solarized)
    radii = float32(np.random.default_rng(2).uniform(0.1, 6.0, len(images)))  # upstream 0.1-2
    blurred = torch.stack([as_tensor(i.filter(ImageFilter.GaussianBlur(r))) for i, r in zip(images, radii)])
    assert torch.equal(augment.gaussian_blur(batch, torch.tensor(radii)), blurred)  # integer arithmetic


@pytest.mark.parametrize("height,width", [(1, 1), (1, 6), (5, 2), (3, 3)])
def test_blur_repeats_the_edge_pixels_of_tiny_images(height, width):
    images = colour_images(6, height, width, seed=height * 10 + width)
    batch = torch.stack([as_tensor(i) for i in images])
    for radius in (0.1, 1.3, 2.0, 4.5):
        blurred = torch.stack([as_tensor(i.filter(ImageFilter.GaussianBlur(radius))) for i in images])
        assert torch.equal(augment.gaussian_blur(batch, torch.full((len(images),), radius)), blurred)


def pil_view(pixels: torch.Tensor, params: list[float]) -> torch.Tensor:
    """The PIL pipeline's colour steps applied with given parameters, then ToTensor + Normalize."""
    image = Image.fromarray(pixels.numpy())
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if params[JITTER]:
        for position in range(4):
            op = int(params[ORDER + position])
            image = adjust[op](image, params[FACTORS + op])
    if params[GRAY]:
        image = TF.rgb_to_grayscale(image, 3)
    if params[BLUR]:
        image = image.filter(ImageFilter.GaussianBlur(params[BLUR]))
    if params[SOLARIZE]:
        image = ImageOps.solarize(image)
    return TF.normalize(TF.to_tensor(image), MEAN, STD)


@pytest.mark.parametrize("grey_images", [False, True], ids=["colour", "grey"])
def test_whole_views_are_the_pil_pipelines_for_the_drawn_parameters(grey_images):
    images = colour_images(48, 30, 26)
    if grey_images:  # processed as one channel: the steps must keep R = G = B exactly
        images = [image.convert("L").convert("RGB") for image in images]
    specs = dino_view_specs((0.4, 1.0), (0.05, 0.4), 2, 24, 12)
    specs = [ViewSpec(s.size, s.scale, s.interpolation, blur_p=0.5, solarize_p=0.5) for s in specs]
    views = BatchedViews(specs, MEAN, STD)
    random.seed(3)
    batch = default_collate([views(image) for image in images])
    got = views.finish(batch, "cpu")
    level = LEVEL / 255 / min(STD)
    for (pixels, params), result in zip(batch, got):
        assert result.shape == (len(images), 3, pixels.shape[1], pixels.shape[2])
        assert result.is_contiguous()
        for i in range(len(images)):
            assert (result[i] - pil_view(pixels[i], params[i].tolist())).abs().max() <= level * 1.0001


def test_the_crops_are_torchvisions_crops():
    """Geometry stays in PIL with torchvision's calls: the same box gives the same pixels."""
    image = colour_images(1, 30, 26)[0]
    spec = ViewSpec(16, (0.05, 0.4), "bicubic", 0.0, 0.0)
    random.seed(4)
    for _ in range(20):
        draw = draw_view(spec, image.height, image.width)
        expected = TF.resized_crop(image, draw.top, draw.left, draw.height, draw.width, [16, 16],
                                   transforms.InterpolationMode.BICUBIC)
        if draw.flip:
            expected = TF.hflip(expected)
        assert np.array_equal(np.asarray(augment.crop_and_flip(image, spec, draw)), np.asarray(expected))


# ---------------------------------------------------------------- (2) the same distributions

def ks_critical(n: int, m: int) -> float:
    """Two-sample Kolmogorov-Smirnov critical distance at ALPHA (asymptotic, conservative for
    discrete values)."""
    return math.sqrt(-0.5 * math.log(ALPHA / 2)) * math.sqrt((n + m) / (n * m))


def ks_distance(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    points = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, points, "right") / len(a)
                        - np.searchsorted(b, points, "right") / len(b)).max())


def assert_same_distribution(name: str, ours, theirs) -> None:
    distance, critical = ks_distance(ours, theirs), ks_critical(len(ours), len(theirs))
    assert distance <= critical, f"{name}: KS distance {distance:.4f} > {critical:.4f}"


def assert_same_frequency(name: str, ours: list[bool], theirs: list[bool]) -> None:
    n, m = len(ours), len(theirs)
    p, q = float(np.mean(ours)), float(np.mean(theirs))
    pooled = (p * n + q * m) / (n + m)
    spread = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n + 1 / m))
    assert abs(p - q) <= Z_CRITICAL * spread, f"{name}: {p:.4f} vs torchvision's {q:.4f}"


def test_crop_boxes_follow_random_resized_crop_including_the_fallback():
    """Tall images with a wide aspect range often exhaust the 10 tries: the centre fallback too."""
    n, height, width = 3000, 60, 12
    scale, ratio = (0.3, 1.0), (1.0, 2.5)
    torch.manual_seed(0)
    theirs = np.array([transforms.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale),
                                                               list(ratio)) for _ in range(n)])
    random.seed(0)
    ours = np.array([sample_crop(height, width, scale, ratio) for _ in range(4 * n)])
    fallback = (width, int(round(width / min(ratio))))
    assert np.mean([(w, h) == fallback for _, _, h, w in theirs]) > 0.05  # the fallback is exercised
    for column, name in enumerate(["top", "left", "height", "width"]):
        assert_same_distribution(name, ours[:, column], theirs[:, column])


class Recorder:
    """Spies on the PIL pipeline's random steps; one record per call of a view's pipeline."""

    def __init__(self, monkeypatch):
        self.records: list[dict] = []
        crop_params = transforms.RandomResizedCrop.get_params
        jitter_params = transforms.ColorJitter.get_params
        hflip, grey, solarize = TF.hflip, TF.rgb_to_grayscale, PIL.ImageOps.solarize
        recorder = self

        def crop(img, scale, ratio):
            top, left, h, w = crop_params(img, scale, ratio)
            recorder.current["crop"] = (top, left, h, w)
            return top, left, h, w

        def jitter(*ranges):
            order, *factors = jitter_params(*ranges)
            recorder.current["jitter"] = (order.tolist(), factors)
            return (order, *factors)

        class Blur(PIL.ImageFilter.GaussianBlur):
            def __init__(self, radius=2):
                recorder.current["blur"] = radius
                super().__init__(radius)

        def mark(key, function):
            def wrapped(*args, **kwargs):
                recorder.current[key] = True
                return function(*args, **kwargs)
            return wrapped

        monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(crop))
        monkeypatch.setattr(transforms.ColorJitter, "get_params", staticmethod(jitter))
        monkeypatch.setattr(TF, "hflip", mark("flip", hflip))
        monkeypatch.setattr(TF, "rgb_to_grayscale", mark("grey", grey))
        monkeypatch.setattr(PIL.ImageOps, "solarize", mark("solarize", solarize))
        monkeypatch.setattr(PIL.ImageFilter, "GaussianBlur", Blur)

    def run(self, pipeline, image: Image.Image, count: int) -> list[dict]:
        records = []
        for _ in range(count):
            self.current = {}
            pipeline(image)
            records.append(self.current)
        return records


def summary_of_pil(records: list[dict], height: int, width: int) -> dict[str, list]:
    jittered = [r["jitter"] for r in records if "jitter" in r]
    return {
        "area": [r["crop"][2] * r["crop"][3] / (height * width) for r in records],
        "aspect": [r["crop"][3] / r["crop"][2] for r in records],
        "top": [(r["crop"][0] + 0.5) / (height - r["crop"][2] + 1) for r in records],
        "left": [(r["crop"][1] + 0.5) / (width - r["crop"][3] + 1) for r in records],
        "flip": ["flip" in r for r in records], "jitter": ["jitter" in r for r in records],
        "grey": ["grey" in r for r in records], "blur": ["blur" in r for r in records],
        "solarize": ["solarize" in r for r in records],
        "radius": [r["blur"] for r in records if "blur" in r],
        "first step": [order[0] for order, _ in jittered], "last step": [order[3] for order, _ in jittered],
        **{name: [factors[i] for _, factors in jittered]
           for i, name in enumerate(["brightness", "contrast", "saturation", "hue"])},
    }


def summary_of_ours(spec: ViewSpec, height: int, width: int, count: int) -> dict[str, list]:
    draws = [draw_view(spec, height, width) for _ in range(count)]
    jittered = [d.colour for d in draws if d.colour[JITTER]]
    return {
        "area": [d.height * d.width / (height * width) for d in draws],
        "aspect": [d.width / d.height for d in draws],
        "top": [(d.top + 0.5) / (height - d.height + 1) for d in draws],
        "left": [(d.left + 0.5) / (width - d.width + 1) for d in draws],
        "flip": [d.flip for d in draws], "jitter": [bool(d.colour[JITTER]) for d in draws],
        "grey": [bool(d.colour[GRAY]) for d in draws], "blur": [d.colour[BLUR] > 0 for d in draws],
        "solarize": [bool(d.colour[SOLARIZE]) for d in draws],
        "radius": [d.colour[BLUR] for d in draws if d.colour[BLUR] > 0],
        "first step": [c[ORDER] for c in jittered], "last step": [c[ORDER + 3] for c in jittered],
        **{name: [c[FACTORS + i] for c in jittered]
           for i, name in enumerate(["brightness", "contrast", "saturation", "hue"])},
    }


def compare(ours: dict[str, list], theirs: dict[str, list]) -> None:
    frequencies = ("flip", "jitter", "grey", "blur", "solarize")
    for name in frequencies:
        assert_same_frequency(name, ours[name], theirs[name])
    for op in range(4):  # ColorJitter's order: each adjustment equally likely first and last
        for position in ("first step", "last step"):
            assert_same_frequency(f"{position} {op}", [o == op for o in ours[position]],
                                  [o == op for o in theirs[position]])
    for name in set(ours) - set(frequencies) - {"first step", "last step"}:
        if theirs[name] or ours[name]:
            assert_same_distribution(name, ours[name], theirs[name])


def pil_views():
    """(name, PIL pipeline of one view, our spec of it) for DINO's three kinds of view and
    MoBY's two, at the CPU recipes' sizes."""
    dino = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, 32, 16)
    dino_specs = dino_view_specs((0.4, 1.0), (0.05, 0.4), 2, 32, 16)
    moby = ssl_transforms(cpu_config())
    moby_specs = moby_view_specs(cpu_config())
    return [("dino global 1", dino.global_transfo1, dino_specs[0]),
            ("dino global 2", dino.global_transfo2, dino_specs[1]),
            ("dino local", dino.local_transfo, dino_specs[2]),
            ("moby view 1", moby[0], moby_specs[0]), ("moby view 2", moby[1], moby_specs[1])]


PIL_DRAWS, OUR_DRAWS = 1200, 12000


@pytest.fixture(scope="module")
def pil_summaries() -> dict[str, dict[str, list]]:
    """Parameters recorded from 1200 runs of each PIL view pipeline on a 28 x 28 image."""
    image = colour_images(1, 28, 28)[0]  # Fashion-MNIST's size
    summaries = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = Recorder(monkeypatch)
        for index, (name, pipeline, _) in enumerate(pil_views()):
            torch.manual_seed(index)
            random.seed(index)
            summaries[name] = summary_of_pil(recorder.run(pipeline, image, PIL_DRAWS), 28, 28)
    return summaries


@pytest.mark.parametrize("index", range(5), ids=[name for name, _, _ in pil_views()])
def test_parameters_are_drawn_as_torchvisions_transforms_draw_them(pil_summaries, index):
    name, _, spec = pil_views()[index]
    random.seed(100 + index)
    compare(summary_of_ours(spec, 28, 28, OUR_DRAWS), pil_summaries[name])


def test_the_comparison_catches_a_wrong_probability(pil_summaries):
    """The test above is not blind: DINO's second global view with the first one's blur (1.0
    instead of 0.1) and without solarisation fails it."""
    name, _, spec = pil_views()[1]
    wrong = ViewSpec(spec.size, spec.scale, spec.interpolation, blur_p=1.0, solarize_p=0.0)
    random.seed(101)
    with pytest.raises(AssertionError, match="blur|solarize"):
        compare(summary_of_ours(wrong, 28, 28, OUR_DRAWS), pil_summaries[name])


def test_the_float32_path_of_npu_stays_within_one_hue_step(monkeypatch):
    """NPU kernels lack double precision, so C's double expressions run in float32 there. Run that
    path here: the blur's six passes may each round one level differently (6 levels), the hue may
    land one 8-bit hue step away (a step moves a channel by at most 255 * 6 / 255 = 6 levels,
    plus one for rounding); everything else is float32 arithmetic already, as in Pillow."""
    monkeypatch.setattr(augment.devices, "exact_float_dtype", lambda kind: torch.float32)
    images = colour_images(30)
    batch = torch.stack([as_tensor(i) for i in images])
    factors = float32(np.random.default_rng(5).uniform(-0.5, 0.5, len(images)))
    hue = torch.stack([as_tensor(TF.adjust_hue(i, f)) for i, f in zip(images, factors)])
    assert (augment.adjust_hue(batch, torch.tensor(factors).view(-1, 1, 1, 1)) - hue).abs().max() <= 7
    radii = float32(np.random.default_rng(6).uniform(0.1, 2.0, len(images)))
    blurred = torch.stack([as_tensor(i.filter(ImageFilter.GaussianBlur(r))) for i, r in zip(images, radii)])
    assert (augment.gaussian_blur(batch, torch.tensor(radii)) - blurred).abs().max() <= 2 * augment.BOX_PASSES
    factors = float32(np.random.default_rng(7).uniform(0.0, 2.0, len(images)))
    contrast = torch.stack([as_tensor(TF.adjust_contrast(i, f)) for i, f in zip(images, factors)])
    assert (augment.adjust_contrast(batch, torch.tensor(factors).view(-1, 1, 1, 1)) - contrast).abs().max() <= LEVEL
