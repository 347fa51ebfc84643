"""Mixed precision: apex-style levels and DINO's --use_fp16 on native torch.autocast.

  O0          fp32 everywhere, no loss scaling.
  O1 / O2     autocast to fp16 with a GradScaler on NPU / GPU. Native autocast has no separate
              "fp16 weights with fp32 master copy" mode, so O2 behaves as O1 unless apex is used.
  on CPU      fp32 by default (bf16 autocast is 2-4x slower on common server CPUs); bf16 is chosen
              with cpu_dtype='bf16' or SSL_CPU_AMP=bf16. bf16 needs no loss scaling.
NVIDIA apex is used only when it is installed and asked for (use_apex=True / SSL_USE_APEX=1).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .compat import grad_scaler
from .errors import UserError

LEVELS = ("O0", "O1", "O2")
CPU_DTYPE_ENV = "SSL_CPU_AMP"
APEX_ENV = "SSL_USE_APEX"
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class NullScaler:
    """GradScaler's interface for runs without loss scaling, so the step code has one shape."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass

    def get_scale(self) -> float:
        return 1.0

    def is_enabled(self) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _ApexScaledLoss:
    def __init__(self, amp_module: Any, loss: torch.Tensor, optimizer: torch.optim.Optimizer):
        self._amp, self._loss, self._optimizer = amp_module, loss, optimizer

    def backward(self) -> None:
        with self._amp.scale_loss(self._loss, self._optimizer) as scaled:
            scaled.backward()


class ApexScaler(NullScaler):
    """Routes scale/backward through apex.amp after MixedPrecision.prepare() has run."""

    def __init__(self, amp_module: Any):
        self._amp = amp_module
        self.optimizer: torch.optim.Optimizer | None = None

    def scale(self, loss):  # type: ignore[override]
        return _ApexScaledLoss(self._amp, loss, self.optimizer)

    def is_enabled(self) -> bool:
        return True

    def state_dict(self) -> dict:
        return self._amp.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._amp.load_state_dict(state)


def _grad_scaler(device_type: str):
    """torch_npu's own scaler on NPU: it knows the flat gradient buffers of torch_npu's fused
    optimizers and agrees on overflows across ranks on chips without inf/nan support."""
    if device_type == "npu":
        torch_npu = importlib.import_module("torch_npu")
        return torch_npu.npu.amp.GradScaler()
    return grad_scaler(device_type)


def load_scaler_state(scaler, state: dict) -> None:
    """Resume loss scaling from a checkpoint written on any device. torch_npu's GradScaler needs
    `dynamic` in its state (KeyError: 'dynamic' for the state of torch's GradScaler, e.g. a GPU
    run's); torch's scalers ignore the key. Scaling that a checkpoint made is always dynamic
    unless it says otherwise."""
    if state and "dynamic" not in state and type(scaler).__module__.startswith("torch_npu"):
        state = {**state, "dynamic": True}
    scaler.load_state_dict(state)


@dataclass
class MixedPrecision:
    device_type: str
    dtype: torch.dtype = torch.float32
    scaler: Any = field(default_factory=NullScaler)
    level: str = "O0"
    apex: Any = None

    @property
    def enabled(self) -> bool:
        return self.dtype != torch.float32 and self.apex is None

    @classmethod
    def from_level(cls, level: str, device_type: str, cpu_dtype: str | None = None,
                   use_apex: bool | None = None) -> "MixedPrecision":
        level = level.upper()
        if level not in LEVELS:
            raise UserError(f"unknown AMP level {level!r}: use one of {', '.join(LEVELS)}")
        if level == "O0":
            return cls(device_type, level=level)
        if use_apex is None:
            use_apex = os.environ.get(APEX_ENV, "0") == "1"
        if use_apex:
            return cls._with_apex(level, device_type)
        if device_type == "cpu":
            name = (cpu_dtype or os.environ.get(CPU_DTYPE_ENV, "fp32")).lower()
            if name not in ("fp32", "bf16"):
                raise UserError(f"CPU autocast dtype {name!r} is not supported: use fp32 or bf16")
            return cls(device_type, dtype=_DTYPES[name], level=level)
        return cls(device_type, dtype=torch.float16, scaler=_grad_scaler(device_type), level=level)

    @classmethod
    def from_flag(cls, use_fp16: bool, device_type: str, cpu_dtype: str | None = None) -> "MixedPrecision":
        """DINO's --use_fp16: True is the O1 recipe, False is fp32."""
        return cls.from_level("O1" if use_fp16 else "O0", device_type, cpu_dtype, use_apex=False)

    @classmethod
    def _with_apex(cls, level: str, device_type: str) -> "MixedPrecision":
        try:
            amp_module = importlib.import_module("apex.amp")
        except ImportError as exc:
            raise UserError(f"apex was asked for ({APEX_ENV}=1) but is not installed: "
                            "install NVIDIA apex from source or unset it to use native AMP") from exc
        return cls(device_type, dtype=torch.float16, scaler=ApexScaler(amp_module), level=level,
                   apex=amp_module)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """apex needs to wrap model and optimizer; a no-op for native autocast."""
        if self.apex is None:
            return model, optimizer
        model, optimizer = self.apex.initialize(model, optimizer, opt_level=self.level)
        self.scaler.optimizer = optimizer
        return model, optimizer

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def precision(self) -> str:
        """'fp32', 'fp16' or 'bf16': the compute type of autocast regions."""
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def describe(self) -> str:
        if self.apex is not None:
            return f"apex {self.level}"
        name = self.precision
        scaling = "with loss scaling" if self.scaler.is_enabled() else "no loss scaling"
        return f"{self.level}: {name} on {self.device_type}, {scaling}"
