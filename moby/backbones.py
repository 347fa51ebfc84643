"""Encoders for MoBY, built from timm: Swin Transformer and DeiT.

Both return pooled features of size `encoder.num_features` when num_classes=0 (Swin: average of
the final tokens after the last norm; DeiT: the class token after the last norm), and a linear
classifier in a submodule named `head` otherwise, as upstream's models do.
"""

from __future__ import annotations

import re

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from yacs.config import CfgNode

from ssl_runtime.errors import UserError

NORMS_BEFORE_MLP = ("ln", "bn")


class TokenBatchNorm(nn.Module):
    """BatchNorm over the channel (last) dimension of token tensors shaped (..., C).

    timm's Swin blocks hold tokens channels-last, while nn.BatchNorm1d normalises dim 1: the
    tokens are flattened to (N, C), normalised per channel over every token of the batch, and
    reshaped back. The inner BatchNorm1d is an ordinary child, so SyncBatchNorm conversion works.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _use_bn_before_mlp(model: SwinTransformer) -> None:
    # Upstream passes `norm_befor_mlp` (typo) to its Swin, which swallows it in **kwargs, so its
    # '_bn' configs silently train LayerNorm (Transformer-SSL issue #4). We fix it: the norm
    # before every block's MLP really becomes a BatchNorm.
    for stage in model.layers:
        for block in stage.blocks:
            block.norm2 = TokenBatchNorm(block.norm2.normalized_shape[0])


def build_swin(config: CfgNode, num_classes: int, drop_path_rate: float) -> SwinTransformer:
    swin = config.MODEL.SWIN
    if swin.NORM_BEFORE_MLP not in NORMS_BEFORE_MLP:
        raise UserError(f"MODEL.SWIN.NORM_BEFORE_MLP must be 'ln' or 'bn', got {swin.NORM_BEFORE_MLP!r}")
    if swin.APE:
        raise UserError("MODEL.SWIN.APE True (absolute position embedding) is not supported by "
                        "timm's Swin Transformer: set it to False (upstream's default)")
    if swin.QK_SCALE is not None:
        raise UserError("MODEL.SWIN.QK_SCALE must be None (head_dim ** -0.5): timm's Swin has no override")
    model = SwinTransformer(
        img_size=config.DATA.IMG_SIZE,
        patch_size=swin.PATCH_SIZE,
        in_chans=swin.IN_CHANS,
        num_classes=num_classes,
        embed_dim=swin.EMBED_DIM,
        depths=tuple(swin.DEPTHS),
        num_heads=tuple(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE,
        mlp_ratio=swin.MLP_RATIO,
        qkv_bias=swin.QKV_BIAS,
        proj_drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=drop_path_rate,
    )
    if not swin.PATCH_NORM:
        model.patch_embed.norm = nn.Identity()
    if swin.NORM_BEFORE_MLP == "bn":
        _use_bn_before_mlp(model)
    return model


def build_deit(config: CfgNode, num_classes: int, drop_path_rate: float) -> VisionTransformer:
    deit = config.MODEL.DEIT
    return VisionTransformer(
        img_size=config.DATA.IMG_SIZE,
        patch_size=deit.PATCH_SIZE,
        in_chans=deit.IN_CHANS,
        num_classes=num_classes,
        embed_dim=deit.EMBED_DIM,
        depth=deit.DEPTH,
        num_heads=deit.NUM_HEADS,
        mlp_ratio=deit.MLP_RATIO,
        qkv_bias=deit.QKV_BIAS,
        drop_path_rate=drop_path_rate,
    )


def build_encoder(config: CfgNode, num_classes: int = 0, drop_path_rate: float = 0.0) -> nn.Module:
    """The encoder named by MODEL.MOBY.ENCODER; gradient checkpointing per TRAIN.USE_CHECKPOINT."""
    kind = config.MODEL.MOBY.ENCODER
    if kind == "swin":
        model = build_swin(config, num_classes, drop_path_rate)
    elif kind.startswith(("deit", "vit")):
        model = build_deit(config, num_classes, drop_path_rate)
    else:
        raise UserError(f"unknown MODEL.MOBY.ENCODER {kind!r}: use 'swin' or 'deit_small'")
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    return model


# ----------------------------------------------------------------------------- upstream's key layout
# Upstream's Swin (Transformer-SSL models/swin_transformer.py) and timm's hold the same tensors
# under different keys: upstream merges patches at the END of stage i (timm: at the start of
# stage i + 1), names the classifier `head` (timm: `head.fc`) and stores two buffers timm
# recomputes: each block's relative_position_index and, in shifted blocks, attn_mask. Upstream's
# DeiT is timm's VisionTransformer, whose keys have not changed.

def is_official_swin_layout(state_dict: dict) -> bool:
    """Upstream's Swin keys: relative_position_index buffers, downsampling at the END of a stage."""
    return any(k.endswith("relative_position_index") or k.endswith("attn_mask") for k in state_dict) \
        or "layers.0.downsample.reduction.weight" in state_dict


def _rename(key: str, stage_shift: int, head: tuple[str, str]) -> str:
    key = re.sub(r"^layers\.(\d+)\.downsample\.",
                 lambda m: f"layers.{int(m.group(1)) + stage_shift}.downsample.", key)
    return head[1] + key[len(head[0]):] if key.startswith(head[0]) else key


def convert_official_swin(state_dict: dict, model: nn.Module) -> dict:
    """Upstream's keys -> timm's (the buffers are dropped: timm recomputes them)."""
    if not isinstance(model, SwinTransformer):
        return dict(state_dict)
    return {_rename(k, +1, ("head.", "head.fc.")): v for k, v in state_dict.items()
            if not k.endswith(("relative_position_index", "attn_mask"))}


def to_official_swin(state_dict: dict, model: nn.Module) -> dict:
    """timm's keys -> upstream's, with the buffers upstream's model holds, computed as it does."""
    if not isinstance(model, SwinTransformer):
        return dict(state_dict)
    out = {_rename(k, -1, ("head.fc.", "head.")): v for k, v in state_dict.items()}
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{j}."
            out[prefix + "attn.relative_position_index"] = upstream_relative_position_index(block.window_size)
            if any(block.shift_size):
                out[prefix + "attn_mask"] = upstream_attn_mask(block.input_resolution, block.window_size,
                                                               block.shift_size)
    return out


def upstream_relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """(Wh*Ww, Wh*Ww) int64: for each (query, key) pair of a window, the row of the relative
    position bias table, (dy + Wh - 1) * (2 Ww - 1) + dx + Ww - 1, as upstream's WindowAttention."""
    wh, ww = window
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return (rows[:, None] - rows[None, :] + wh - 1) * (2 * ww - 1) + (cols[:, None] - cols[None, :] + ww - 1)


def upstream_attn_mask(resolution: tuple[int, int], window: tuple[int, int],
                       shift: tuple[int, int]) -> torch.Tensor:
    """(windows, Wh*Ww, Wh*Ww) float32 mask of a shifted block, as upstream's SwinTransformerBlock:
    after the cyclic shift a window may join up to 4 image regions; tokens attend only within
    their own region (0) and are kept apart across regions (-100)."""
    (h, w), (wh, ww) = resolution, window
    regions = torch.zeros(h, w)
    bands = [(slice(0, -size), slice(-size, -s), slice(-s, None)) for size, s in zip(window, shift)]
    for i, rows in enumerate(bands[0]):
        for j, cols in enumerate(bands[1]):
            regions[rows, cols] = 3 * i + j
    windows = regions.view(h // wh, wh, w // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, -100.0)
