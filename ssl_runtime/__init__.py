"""Shared runtime for the MoBY and DINO trees.

Everything that depends on the accelerator (device choice, process groups, mixed precision,
fused optimizers, pinned memory) lives here, so that model code never names a device.
"""

from .torch_stack import require_supported_torch

__version__ = "0.1.0"

# One check for every program: a torch older than the code needs stops here with one clear line
# instead of an AttributeError from deep inside (read from pip's metadata: torch is not imported).
require_supported_torch()
