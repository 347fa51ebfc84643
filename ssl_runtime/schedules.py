"""Per-iteration schedules, precomputed as arrays indexed by the global step (easy to resume)."""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Linear warm-up from start_warmup_value to base_value, then cosine decay to final_value.

    Same values as upstream DINO's cosine_scheduler: one entry per iteration, epochs * niter_per_ep.
    """
    warmup_iters = int(warmup_epochs * niter_per_ep)
    total = int(epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    steps = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total, "schedule length must equal epochs * iterations per epoch"
    return schedule


def cosine_momentum(base_momentum: float, step: int, total_steps: int) -> float:
    """MoBY's momentum: rises from base_momentum to 1 along a half cosine over total_steps."""
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * step / total_steps) + 1) / 2
