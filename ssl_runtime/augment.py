"""Upstream's BYOL-style view augmentation (DINO and MoBY), with the colour work done per batch.

Both methods build every view as torchvision's RandomResizedCrop -> RandomHorizontalFlip ->
ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, in a random order of its four adjustments ->
RandomGrayscale(0.2) -> PIL Gaussian blur (radius 0.1-2.0) with a per-view probability ->
solarisation at 128 with a per-view probability -> ToTensor -> Normalize. Done image by image in
PIL, this costs several times the small CPU models' training step. `BatchedViews` splits it:

* per image, where the dataset is read (data workers, or the main process): every random
  parameter, drawn from the same distributions as torchvision's transforms draw them, from the
  `random` module (which ssl_runtime.resilience seeds per (seed, epoch, index)), and the crop,
  resize and flip in PIL (upstream's geometry, pixel for pixel); the view leaves as uint8 pixels
  plus a small vector of its colour parameters;
* per batch, wherever the batch goes (the main process on CPU, the device on NPU/GPU): jitter,
  grayscale, blur, solarisation and normalisation as tensor ops on all images at once, each
  reproducing Pillow's 8-bit arithmetic (truncating blends, ITU-R 601-2 luma, 8-bit HSV, the
  three-pass extended box blur PIL uses for its Gaussian blur), so a view is upstream's up to
  the last bit of a float product (tests/test_batched_augment.py checks both claims).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from . import device as devices

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
FLIP_LEFT_RIGHT = getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT

# Layout of a view's colour-parameter vector.
JITTER, ORDER, FACTORS, GRAY, BLUR, SOLARIZE = 0, 1, 5, 9, 10, 11
NUM_PARAMS = 12
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision's indices in ColorJitter's order
BOX_PASSES = 3  # PIL's Gaussian blur: three box blurs per direction


@dataclass(frozen=True)
class ViewSpec:
    """One view of the pipeline: the crop and the per-view probabilities (upstream's values
    elsewhere: flip 0.5, jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, blur radius 0.1-2)."""

    size: int
    scale: tuple[float, float]
    interpolation: str  # "bicubic" (DINO) or "bilinear" (MoBY: RandomResizedCrop's default)
    blur_p: float
    solarize_p: float
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_p: float = 0.2
    blur_radius: tuple[float, float] = (0.1, 2.0)

    def factor_ranges(self) -> list[tuple[float, float]]:
        """ColorJitter's ranges: [max(0, 1 - v), 1 + v] for brightness, contrast and saturation,
        [-v, v] for hue."""
        b, c, s, h = self.jitter
        return [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]


# ---------------------------------------------------------------- per image (data workers)

def sample_crop(height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
                ) -> tuple[int, int, int, int]:
    """(top, left, h, w) as RandomResizedCrop.get_params draws them: up to 10 tries of a uniform
    area fraction and a log-uniform aspect ratio, else the largest centred crop within `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(scale[0], scale[1])
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_colour(spec: ViewSpec) -> list[float]:
    """The colour parameters of one view, drawn as upstream's transforms draw them."""
    params = [0.0] * NUM_PARAMS
    params[FACTORS:FACTORS + 4] = [1.0, 1.0, 1.0, 0.0]
    if random.random() < spec.jitter_p:  # RandomApply(ColorJitter)
        order = list(range(4))
        random.shuffle(order)  # ColorJitter: a uniformly random order of the four adjustments
        params[JITTER] = 1.0
        params[ORDER:ORDER + 4] = order
        params[FACTORS:FACTORS + 4] = [random.uniform(low, high) for low, high in spec.factor_ranges()]
    params[GRAY] = float(random.random() < spec.grayscale_p)
    if random.random() < spec.blur_p:
        params[BLUR] = random.uniform(*spec.blur_radius)  # 0 means no blur (radii are >= 0.1)
    params[SOLARIZE] = float(random.random() < spec.solarize_p)
    return params


class ViewDraw(NamedTuple):
    """Everything random about one view: the crop box, the flip and the colour parameters."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    colour: list[float]


def draw_view(spec: ViewSpec, height: int, width: int) -> ViewDraw:
    """One view's parameters for an image of height x width, in upstream's order of steps."""
    top, left, h, w = sample_crop(height, width, spec.scale, spec.ratio)
    flip = random.random() < spec.flip_p  # RandomHorizontalFlip
    return ViewDraw(top, left, h, w, flip, sample_colour(spec))


def crop_and_flip(image: Image.Image, spec: ViewSpec, draw: ViewDraw) -> Image.Image:
    """RandomResizedCrop then RandomHorizontalFlip, with torchvision's PIL calls."""
    box = (draw.left, draw.top, draw.left + draw.width, draw.top + draw.height)
    view = image.crop(box).resize((spec.size, spec.size), RESAMPLE[spec.interpolation])
    return view.transpose(FLIP_LEFT_RIGHT) if draw.flip else view


class BatchedViews:
    """Dataset transform (per image) plus `finish` (per batch): see the module docstring.

    Item: one (uint8 pixels (S, S, 3), float32 colour parameters) pair of numpy arrays per view
    (numpy: the cheapest to make per image), which the default collate turns into per-view pairs
    of batched tensors; `finish` turns those into the normalised float views (N, 3, S, S) on the
    device, in the same order.
    """

    def __init__(self, specs: Sequence[ViewSpec], mean: Sequence[float], std: Sequence[float]):
        self.specs = list(specs)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Image.Image) -> list[tuple[np.ndarray, np.ndarray]]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        views = []
        for spec in self.specs:
            draw = draw_view(spec, image.height, image.width)
            views.append((np.array(crop_and_flip(image, spec, draw), dtype=np.uint8),
                          np.array(draw.colour, dtype=np.float32)))
        return views

    def finish(self, views: Sequence[Sequence[torch.Tensor]], device: torch.device | str
               ) -> list[torch.Tensor]:
        """Collated [(pixels, params), ...] per view -> normalised float views on `device`."""
        out: list[torch.Tensor | None] = [None] * len(views)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, (pixels, _) in enumerate(views):
            by_size.setdefault(tuple(pixels.shape[1:3]), []).append(i)
        for members in by_size.values():  # views of one size are augmented together
            pixels = torch.cat([views[i][0] for i in members])
            params = torch.cat([views[i][1] for i in members])
            images = normalize(colour_augment(pixels, params, device), self.mean, self.std).contiguous()
            for i, chunk in zip(members, images.split([len(views[i][0]) for i in members])):
                out[i] = chunk
        return out  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"BatchedViews({len(self.specs)} views: {', '.join(str(s.size) for s in self.specs)} px)"


def views_to_device(transform: object, device: torch.device | str
                    ) -> Callable[[Sequence], list[torch.Tensor]]:
    """What the training loop applies to a batch of views: BatchedViews.finish, or (for a PIL
    pipeline whose views are final) a plain copy to the device."""
    if isinstance(transform, BatchedViews):
        return lambda views: transform.finish(views, device)
    return lambda views: [view.to(device, non_blocking=True) for view in views]


def use_batched(flag: bool | None, device_kind: str) -> bool:
    """The batched pipeline unless told otherwise on CPU (where the PIL pipeline costs more than
    the small models' step); the PIL pipeline on NPU/GPU unless asked for (the data workers
    usually keep up there, and the device's time goes to the model)."""
    return (device_kind == "cpu") if flag is None else bool(flag)


# ---------------------------------------------------------------- per batch (where it trains)

def colour_augment(pixels: torch.Tensor, params: torch.Tensor, device: torch.device | str | None = None
                   ) -> torch.Tensor:
    """Jitter (in each image's order), grayscale, blur and solarisation of uint8 images
    (N, H, W, 3) on the host with their parameter rows (N, NUM_PARAMS); returns float32 images
    (N, 3, H, W) on `device` holding the 8-bit values PIL would produce. Each step runs only on the images it
    applies to. A batch of grey images (R = G = B everywhere, e.g. Fashion-MNIST) is processed
    as one channel: every step keeps R = G = B, and saturation, hue and grayscale leave grey
    pixels exactly as they are in PIL too."""
    device = pixels.device if device is None else device
    params = params.cpu()
    if is_grey(pixels):
        pixels = pixels[..., :1]
    x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()

    def rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The images a step applies to: (host index, device index), or None when none."""
        index = mask.nonzero().flatten()
        return (index, index.to(device, non_blocking=True)) if len(index) else None

    def column(index: torch.Tensor, which: int) -> torch.Tensor:
        return params[index, which].to(device, non_blocking=True).view(-1, 1, 1, 1)

    def apply(found, step: Callable[..., torch.Tensor], *args) -> None:
        if found is not None:
            x.index_copy_(0, found[1], step(x.index_select(0, found[1]), *args))

    adjustments = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    jittered = params[:, JITTER] > 0
    for position in range(4):
        for op, adjust in enumerate(adjustments):
            if x.shape[1] == 1 and op in (SATURATION, HUE):
                continue  # identities on grey images
            found = rows(jittered & (params[:, ORDER + position] == op))
            if found is not None:
                apply(found, adjust, column(found[0], FACTORS + op))
    if x.shape[1] == 3:
        apply(rows(params[:, GRAY] > 0), lambda images: luma(images).expand(-1, 3, -1, -1))
    found = rows(params[:, BLUR] > 0)
    if found is not None:
        apply(found, gaussian_blur, params[found[0], BLUR])
    apply(rows(params[:, SOLARIZE] > 0), solarize)
    return x.expand(-1, 3, -1, -1)


def is_grey(pixels: torch.Tensor) -> bool:
    """Whether every image of a host uint8 batch (N, H, W, 3) has R = G = B everywhere."""
    return bool(torch.equal(pixels[..., 0], pixels[..., 1]) and torch.equal(pixels[..., 1], pixels[..., 2]))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """ToTensor's division by 255 and Normalize, the same float32 operations."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.div(255).sub_(mean_t).div_(std_t)


def _blend(base: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(base, x, alpha) on 8-bit data: base + alpha * (x - base) in float32,
    truncated, clipped to 0..255 (the C code's own order of operations)."""
    return torch.floor(base + alpha * (x - base)).clamp_(0, 255)


def luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, exact in float32 (< 2**24)."""
    if x.shape[1] == 1:
        return x  # a grey pixel's luma is its value: (65536 v + 0x8000) >> 16 = v
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: a blend with black."""
    return _blend(torch.zeros_like(x), x, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: a blend with the image's mean luma, rounded to an integer."""
    wide = devices.exact_float_dtype(devices.device_kind(x.device))
    total = luma(x).to(wide).sum(dim=(1, 2, 3))  # exact: a sum of integers below 2**53
    count = x.shape[-1] * x.shape[-2]
    mean = torch.floor((2 * total + count) / (2 * count))  # int(mean + 0.5)
    return _blend(mean.to(x.dtype).view(-1, 1, 1, 1), x, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: a blend with the image's luma."""
    return _blend(luma(x), x, factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's PIL adjust_hue: to PIL's 8-bit HSV, hue += int(factor * 255) modulo 256,
    back to RGB. Pillow's conversions mix float and double; `wide` stands for double."""
    wide = devices.exact_float_dtype(devices.device_kind(x.device))
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    span = maxc - minc
    grey = span == 0
    span_safe = torch.where(grey, torch.ones_like(span), span)
    sat = span / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = ((maxc - c) / span_safe for c in (r, g, b))
    hue = torch.where(r == maxc, bc - gc,
                      torch.where(g == maxc, ((2.0 + rc.to(wide)) - bc.to(wide)).float(),
                                  ((4.0 + gc.to(wide)) - rc.to(wide)).float()))
    hue = hue.to(wide) / 6.0 + 1.0  # in [5/6, 11/6]: fmod(hue, 1) is one exact subtraction
    hue = torch.where(hue >= 1.0, hue - 1.0, hue).float()
    h8 = torch.trunc(hue.to(wide) * 255.0).clamp_(0, 255)
    s8 = torch.trunc(sat.to(wide) * 255.0).clamp_(0, 255)
    h8 = torch.where(grey, torch.zeros_like(h8), h8)
    s8 = torch.where(grey, torch.zeros_like(s8), s8)
    # the shift: numpy's int32(factor * 255) in double, added to uint8 with wrap-around
    shift = torch.trunc(factor.view(-1, 1, 1).to(wide) * 255.0)
    h8 = torch.remainder(h8 + shift, 256)
    return _hsv_to_rgb(h8, s8, maxc, wide)


_SECTORS = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def _hsv_to_rgb(h8: torch.Tensor, s8: torch.Tensor, v: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """Pillow's hsv2rgb on 8-bit h, s, v (rounding half away from zero, as C's round)."""
    scaled = h8 * 6.0 / 255.0  # in `wide`: h8 came out of double arithmetic
    sector = torch.floor(scaled)
    frac = (scaled - sector).float()
    fs = (s8 / 255.0).float()
    vw = v.to(wide)

    def round8(value: torch.Tensor) -> torch.Tensor:
        return torch.floor(value + 0.5).clamp_(0, 255).float()

    p = round8(vw * (1.0 - fs.to(wide)))
    q = round8(vw * (1.0 - (fs * frac).to(wide)))
    t = round8(vw * (1.0 - fs.to(wide) * (1.0 - frac.to(wide))))
    candidates = torch.stack([v, p, q, t], dim=1)  # (N, 4, H, W)
    pick = _SECTORS.to(v.device)[sector.long() % 6]  # (N, H, W, 3): which candidate per channel
    rgb = candidates.gather(1, pick.permute(0, 3, 1, 2))
    return torch.where((s8 == 0).unsqueeze(1), v.unsqueeze(1).expand_as(rgb), rgb)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize(threshold=128): every value >= 128 inverted."""
    return torch.where(x >= 128, 255 - x, x)


# ---------------------------------------------------------------- PIL's Gaussian blur

def box_taps(radii: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per radius of PIL's GaussianBlur: (integer box radius r, weight of the 2r+1 inner taps,
    weight of the two outer taps), the weights in units of 2**-24. The box radius is the extended
    box blur's (Gwosdek et al.) for BOX_PASSES passes, the weights ImagingHorizontalBoxBlur's,
    both in the float32 arithmetic of PIL's C code (numpy's float32 arrays round every operation
    as C's floats do)."""
    f32 = np.float32
    sigma = np.asarray(radii, dtype=f32)
    sigma2 = sigma * sigma / f32(BOX_PASSES)
    length = np.sqrt(12.0 * sigma2.astype(np.float64) + 1.0).astype(f32)  # C: sqrt() in double
    whole = np.floor((length.astype(np.float64) - 1.0) / 2.0).astype(f32)
    frac = (f32(2) * whole + f32(1)) * (whole * (whole + f32(1)) - f32(3) * sigma2)
    radius = whole + frac / (f32(6) * (sigma2 - (whole + f32(1)) * (whole + f32(1))))
    reach = radius.astype(np.int64)  # C's (int) truncation; radii are positive
    inner = (f32(1 << 24) / (radius * f32(2) + f32(1))).astype(np.int64)
    outer = ((1 << 24) - (reach * 2 + 1) * inner) // 2
    return reach, inner, outer


def gaussian_blur(x: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """PIL's GaussianBlur(radius) per image: three box-blur passes along x, then three along y,
    each rounding to 8 bits, with edge pixels repeated. The weights are PIL's integers times
    2**-24, so in double precision every product and sum is exact, as in PIL's integer code."""
    wide = devices.exact_float_dtype(devices.device_kind(x.device))
    whole, inner, outer = (column[:, None] for column in box_taps(radii.cpu().numpy()))
    reach = int(whole.max()) + 1
    distance = np.abs(np.arange(-reach, reach + 1))[None, :]
    kernel = np.where(distance <= whole, inner, np.where(distance == whole + 1, outer, 0)) * 2.0 ** -24
    kernel = torch.from_numpy(kernel).to(x.device, wide, non_blocking=True)
    kernel = [kernel[:, k].view(-1, 1, 1, 1) for k in range(2 * reach + 1)]
    values = x.to(wide)
    for dim in (3, 2):  # width first, as PIL
        for _ in range(BOX_PASSES):
            values = _box_pass(values, kernel, reach, dim)
    return values.to(x.dtype)


def _box_pass(values: torch.Tensor, kernel: list[torch.Tensor], reach: int, dim: int) -> torch.Tensor:
    length = values.shape[dim]
    index = torch.arange(-reach, length + reach, device=values.device).clamp_(0, length - 1)
    padded = values.index_select(dim, index)  # edge pixels repeated
    total = kernel[0] * padded.narrow(dim, 0, length)
    for k in range(1, len(kernel)):
        total += kernel[k] * padded.narrow(dim, k, length)
    return torch.floor(total + 0.5)  # PIL: (sum + 2**23) >> 24
