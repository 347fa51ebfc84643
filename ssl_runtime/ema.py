"""Exponential moving average of parameters (DINO teacher, MoBY target encoder)."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def ema_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * online, for all tensors in one fused call.

    A foreach lerp replaces upstream's per-parameter Python loop; the arithmetic is the same.
    """
    target, online = list(target), [p.detach() for p in online]
    if len(target) != len(online):
        raise ValueError(f"EMA needs matching parameter lists, got {len(target)} and {len(online)}")
    if target:
        torch._foreach_lerp_(target, online, 1.0 - momentum)
