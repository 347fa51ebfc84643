"""The torch (and torchvision) APIs newer than torch 2.1 that the project uses, with their torch 2.1
equivalents.

torch 2.1 is what torch_npu 2.1.0.postN (still the most deployed Ascend stack) is built on; the
project runs on torch 2.1 through the newest release (tests/requirements-torch2.1.txt, `.ci/run`).
Everything version-dependent goes through this module, so the rest of the code reads as plain
current torch.
"""

from __future__ import annotations

from typing import Any

import torch


def device_module(kind: str) -> Any:
    """torch.cuda / torch.npu / torch.cpu for a device kind (torch.get_device_module is newer than 2.1)."""
    getter = getattr(torch, "get_device_module", None)
    if getter is not None:
        return getter(kind)
    module = getattr(torch, kind, None)
    if module is None:
        raise RuntimeError(f"torch has no device module {kind!r} (for 'npu', import torch_npu first)")
    return module


def grad_scaler(device_type: str, **kwargs) -> Any:
    """torch.amp.GradScaler(device), newer than torch 2.1; torch.cuda.amp.GradScaler there (CUDA only)."""
    amp_scaler = getattr(torch.amp, "GradScaler", None)
    if amp_scaler is not None:
        return amp_scaler(device_type, **kwargs)
    if device_type != "cuda":
        raise RuntimeError(f"this torch ({torch.__version__}) has no GradScaler for {device_type!r}")
    return torch.cuda.amp.GradScaler(**kwargs)


def fused_optimizer_devices() -> tuple[str, ...]:
    """Device kinds with a fused AdamW kernel in this torch (no CPU in torch 2.1, where AdamW(fused=True)
    on CPU tensors builds fine and fails at its first step)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older than every release we support; say "none" rather than guess
        return ()
    return tuple(_get_fused_kernels_supported_devices())


def compile_in_place(module: torch.nn.Module, **kwargs) -> None:
    """Compile a module without renaming its state-dict keys: nn.Module.compile where torch has it,
    else the forward method alone (the module object and its parameters stay the same)."""
    if hasattr(module, "compile"):
        module.compile(**kwargs)
    else:
        module.forward = torch.compile(module.forward, **kwargs)


def samples_allowing_empty_classes(directory: str, class_to_idx: dict, extensions=None,
                                   is_valid_file=None, allow_empty: bool = True) -> list:
    """torchvision's make_dataset with allow_empty=True (newer than torchvision 0.16, the one of torch
    2.1, which refuses a class folder without images): the same samples in the same order, every
    class keeping its index. FileNotFoundError only when no class has an image."""
    from torchvision.datasets.folder import make_dataset

    samples = []
    for name in sorted(class_to_idx):
        try:
            samples += make_dataset(directory, {name: class_to_idx[name]}, extensions, is_valid_file)
        except FileNotFoundError:
            continue
    if not samples:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(class_to_idx))}")
    return samples


def _math_sdpa_switch():
    """torch.nn.attention's kernel switch (torch >= 2.3), else the global switches torch 2.1 keeps
    under torch.backends.cuda, which its CPU kernel choice reads too. Looked up once: the context
    is entered at every training step."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return lambda: torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True,
                                                      enable_mem_efficient=False)
    return lambda: sdpa_kernel([SDPBackend.MATH])


_MATH_SDPA = _math_sdpa_switch()


def sdpa_math_only():
    """A context in which scaled_dot_product_attention runs torch's math kernels (torch 2.1's CPU
    flash attention's bf16 backward crashed: double free)."""
    return _MATH_SDPA()
