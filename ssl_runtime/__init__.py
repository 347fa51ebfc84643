"""Shared runtime for the MoBY and DINO trees.

Everything that depends on the accelerator (device choice, process groups, mixed precision,
fused optimizers, pinned memory) lives here, so that model code never names a device.
"""

__version__ = "0.1.0"
