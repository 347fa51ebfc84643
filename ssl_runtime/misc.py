"""Small helpers shared by both trees."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # seeds every device type's generators too


fix_random_seeds = seed_everything


def bool_flag(value: str) -> bool:
    """argparse type accepting on/off/true/false/1/0, as upstream DINO's flags do."""
    import argparse

    lowered = str(value).lower()
    if lowered in {"on", "true", "1", "yes"}:
        return True
    if lowered in {"off", "false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid value {value!r} for a boolean flag: use true or false")
