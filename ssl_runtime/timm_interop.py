"""Speaking timm's language: the timm model name (+ kwargs) of a backbone, and timm baselines.

Both trees build their backbones from timm classes, so a backbone's state dict already has timm's
key layout; what a user still needs is the `timm.create_model(...)` call that rebuilds the same
architecture. `TimmSpec` holds it: a registered model name (the standard sizes map 1:1, e.g.
DINO ViT-S/16 is `vit_small_patch16_224.dino`) plus the keyword arguments that turn the nearest
registered model into a non-standard one (e.g. our 2-block CPU ViT).

`timm:<model name>` is the one spelling, in both trees, for "evaluate a randomly initialised timm
model" (a baseline beside every accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .errors import UserError

TIMM_PREFIX = "timm:"

# Width, depth and heads implied by timm's size names.
VIT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    "small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
    "large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)},
}


@dataclass
class TimmSpec:
    """`timm.create_model(name, num_classes=0, **kwargs)` rebuilds the backbone."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def create(self, file: str | None = None) -> nn.Module:
        """The timm model; with `file`, through timm's own pretrained loader (no key fix-ups)."""
        import timm

        if file is None:
            return timm.create_model(self.name, pretrained=False, num_classes=0, **self.kwargs)
        return timm.create_model(self.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)),
                                 num_classes=0, **self.kwargs)

    def python_call(self, file: str) -> str:
        """The exact line a user pastes to load an exported file."""
        extra = "".join(f", {k}={_literal(v)}" for k, v in self.kwargs.items())
        return (f"timm.create_model({self.name!r}, pretrained=True, "
                f"pretrained_cfg_overlay=dict(file={str(file)!r}), num_classes=0{extra})")


def _literal(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def _registered(name: str) -> bool:
    import timm

    return name.split(".")[0] in timm.list_models(name.split(".")[0])


def _with_tag(name: str, tag: str | None) -> str:
    """`name.tag` when timm has pretrained weights under that tag (its data config then matches)."""
    import timm

    if tag and f"{name}.{tag}" in timm.list_pretrained(f"{name}.{tag}"):
        return f"{name}.{tag}"
    return name


def _size_of(sizes: Mapping[str, Mapping[str, Any]], arch: Mapping[str, Any]) -> str | None:
    for size, values in sizes.items():
        if all(_same(arch[k], v) for k, v in values.items()):
            return size
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def _spec(prefix: str, sizes: Mapping[str, Mapping[str, Any]], grid: dict[str, Any],
          default_grid: dict[str, Any], suffix: str, arch: dict[str, Any], extra: dict[str, Any],
          tag: str | None) -> TimmSpec:
    """The registered name closest to `arch` and the kwargs that make up the difference.

    `grid` holds the values spelled in the name (patch, window, image size), `default_grid` those
    of the fallback name; `extra` holds options with timm defaults (only differences are kept).
    """
    size = _size_of(sizes, arch)
    kwargs: dict[str, Any] = {}
    if size is None:
        size = next(iter(sizes))
        kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
    exact = f"{prefix}_{size}_{suffix.format(**grid)}"
    if _registered(exact):
        name = exact
    else:
        name = f"{prefix}_{size}_{suffix.format(**default_grid)}"
        kwargs.update({k: v for k, v in grid.items() if v != default_grid[k]})
    kwargs.update(extra)
    return TimmSpec(_with_tag(name, tag) if not kwargs else name, kwargs)


def vit_spec(embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
             mlp_ratio: float = 4.0, qkv_bias: bool = True, family: str = "vit",
             tag: str | None = None) -> TimmSpec:
    """timm name of a ViT (`family` 'vit') or DeiT ('deit'; no 'large' size)."""
    sizes = VIT_SIZES if family == "vit" else {k: v for k, v in VIT_SIZES.items() if k != "large"}
    extra = {}
    if mlp_ratio != 4.0:
        extra["mlp_ratio"] = mlp_ratio
    if not qkv_bias:
        extra["qkv_bias"] = False
    return _spec(family, sizes, {"patch_size": patch_size, "img_size": img_size},
                 {"patch_size": 16, "img_size": 224}, "patch{patch_size}_{img_size}",
                 {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}, extra, tag)


def swin_spec(embed_dim: int, depths, num_heads, patch_size: int, window_size: int, img_size: int,
              mlp_ratio: float = 4.0, qkv_bias: bool = True) -> TimmSpec:
    extra = {}
    if mlp_ratio != 4.0:
        extra["mlp_ratio"] = mlp_ratio
    if not qkv_bias:
        extra["qkv_bias"] = False
    return _spec("swin", SWIN_SIZES,
                 {"patch_size": patch_size, "window_size": window_size, "img_size": img_size},
                 {"patch_size": 4, "window_size": 7, "img_size": 224},
                 "patch{patch_size}_window{window_size}_{img_size}",
                 {"embed_dim": embed_dim, "depths": tuple(depths), "num_heads": tuple(num_heads)},
                 extra, None)


# ---------------------------------------------------------------- random timm baselines

def timm_model_name(reference: str | None) -> str | None:
    """'timm:vit_small_patch16_224' -> 'vit_small_patch16_224'; anything else -> None."""
    if reference and reference.startswith(TIMM_PREFIX):
        name = reference[len(TIMM_PREFIX):].strip()
        if not name:
            raise UserError(f"{reference!r} names no model: write timm:<model name>, "
                            "e.g. timm:vit_small_patch16_224")
        return name
    return None


def create_timm_baseline(name: str, img_size: int | None = None, num_classes: int = 0) -> nn.Module:
    """A randomly initialised timm model (no download): the baseline an accuracy is compared with.

    ViTs and Swins are built for `img_size` (any input size for ViTs); CNNs take any size anyway.
    """
    import timm

    if not timm.list_models(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
        raise UserError(f"timm has no model {name!r}" +
                        (f" (similar: {', '.join(close)})" if close else "") +
                        "; see timm.list_models()")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if img_size:
        kwargs["img_size"] = img_size
        if name.startswith(("vit_", "deit_")):
            kwargs["dynamic_img_size"] = True
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError:  # a CNN: no img_size argument
        kwargs.pop("img_size", None)
        kwargs.pop("dynamic_img_size", None)
        model = timm.create_model(name, pretrained=False, **kwargs)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"timm baseline: randomly initialised {name} ({millions:.1f}M parameters), no pretrained weights",
          flush=True)
    return model


def classifier_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of a timm model's classifier (`head`, `head.fc`, `fc`, ...)."""
    return list(model.get_classifier().parameters())


def vit_spec_of(model: nn.Module, family: str = "vit", tag: str | None = None) -> TimmSpec:
    """vit_spec of a built timm VisionTransformer (sizes read from its modules)."""
    block = model.blocks[0]
    return vit_spec(embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
                    patch_size=model.patch_embed.patch_size[0], img_size=model.patch_embed.img_size[0],
                    mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
                    qkv_bias=block.attn.qkv.bias is not None, family=family, tag=tag)
