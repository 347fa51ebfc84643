"""Which accelerator to run on, and the few device-specific calls the project needs.

Order of preference: Ascend NPU (when torch_npu imports and sees a device), then CUDA, then CPU.
`--device` or the SSL_DEVICE environment variable override the automatic choice.
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

import torch

from .errors import UserError

DEVICE_ENV = "SSL_DEVICE"
DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES,
        help=f"accelerator to use; 'auto' picks npu, then cuda, then cpu (env {DEVICE_ENV} overrides auto)",
    )


def _import_torch_npu() -> Any | None:
    """torch_npu is optional: it exists only on Ascend machines with CANN installed."""
    try:
        return importlib.import_module("torch_npu")
    except Exception:  # ImportError, or CANN libraries missing at load time
        return None


def npu_available() -> bool:
    if _import_torch_npu() is None:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available() and npu.device_count() > 0)


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def resolve_device(requested: str | None = None) -> str:
    """Return 'npu', 'cuda' or 'cpu' for a request of auto/None/npu/cuda/cpu."""
    request = (requested or "auto").lower()
    if request == "auto":
        request = os.environ.get(DEVICE_ENV, "auto").lower() or "auto"
    if request not in DEVICE_CHOICES:
        raise UserError(f"unknown device {request!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if request == "auto":
        if npu_available():
            return "npu"
        return "cuda" if cuda_available() else "cpu"
    if request == "npu" and not npu_available():
        raise UserError("--device npu was asked for but torch_npu is not installed or sees no NPU: "
                        "install torch_npu with CANN, or use --device cuda/cpu")
    if request == "cuda" and not cuda_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return request


def backend_for(kind: str) -> str:
    """The torch.distributed backend that matches a device kind."""
    return BACKENDS[kind]


def bind_device(kind: str, local_rank: int) -> torch.device:
    """Bind this process to its accelerator (one per local rank) and return the torch.device."""
    if kind == "cpu":
        return torch.device("cpu")
    count = _module(kind).device_count()
    if local_rank >= count:
        raise UserError(f"local rank {local_rank} has no {kind} device (only {count} visible): "
                        f"launch at most {count} processes per node")
    _module(kind).set_device(local_rank)
    return torch.device(kind, local_rank)


def _module(kind: str) -> Any:
    return torch.npu if kind == "npu" else torch.cuda  # type: ignore[attr-defined]


def device_kind(device: torch.device | str) -> str:
    """'cuda' for torch.device('cuda', 1) or 'cuda:1'; works for 'npu' before torch_npu is loaded."""
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def synchronize(device: torch.device | str) -> None:
    kind = device_kind(device)
    if kind in ("cuda", "npu"):
        _module(kind).synchronize()


def max_memory_mb(device: torch.device | str) -> float:
    """Peak memory allocated on the device since start (0 on CPU, where torch does not track it)."""
    kind = device_kind(device)
    if kind in ("cuda", "npu"):
        return _module(kind).max_memory_allocated() / 2**20
    return 0.0


def reset_peak_memory(device: torch.device | str) -> None:
    kind = device_kind(device)
    if kind in ("cuda", "npu"):
        _module(kind).reset_peak_memory_stats()


def loader_kwargs(device: torch.device | str) -> dict:
    """DataLoader settings for fast host-to-device copies (pinned memory on the right device)."""
    kind = device_kind(device)
    if kind == "cpu":
        return {"pin_memory": False}
    if kind == "npu":
        return {"pin_memory": True, "pin_memory_device": "npu"}
    return {"pin_memory": True}


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move a tensor or a (nested) list/tuple/dict of tensors, without blocking the host."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def exact_float_dtype(kind: str) -> torch.dtype:
    """float64 where the device computes it (CPU, CUDA); float32 on NPU, whose kernels mostly
    lack double precision. The batched augmentation emulates C's double arithmetic with it."""
    return torch.float32 if kind == "npu" else torch.float64


def set_fast_math(kind: str) -> None:
    """Allow TF32 matmuls on CUDA (what upstream's cudnn.benchmark runs get); nothing elsewhere."""
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def compile_module(module: torch.nn.Module, kind: str) -> bool:
    """torch.compile a module in place (its state-dict keys stay the same); one graph per input
    shape, since multi-crop training feeds a fixed set of resolutions. Not on NPU, where
    torch_npu's compiler support varies by release: a warning, and the module runs eagerly."""
    if kind == "npu":
        import warnings

        warnings.warn("--compile is ignored on NPU: the model runs eagerly", stacklevel=2)
        return False
    module.compile(dynamic=False)
    return True


def describe(kind: str) -> str:
    if kind == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return f"{kind}: {_module(kind).get_device_name()} x{_module(kind).device_count()}"
