"""Mixed precision: apex-style levels and DINO's --use_fp16 on native torch.autocast.

  O0          fp32 everywhere, no loss scaling.
  O1 / O2     on NPU / GPU: autocast to the AMP dtype, fp16 (upstream's) with a GradScaler, or
              bf16 (--amp_dtype bf16, MoBY's AMP_DTYPE) without one: bf16 has fp32's exponent
              range, so gradients neither underflow nor overflow and need no loss scaling.
              Native autocast has no separate "fp16 weights with fp32 master copy" mode, so O2
              behaves as O1 unless apex is used.
  on CPU      never fp16 (no CPU computes it natively). Mixed precision means bf16 autocast where
              the CPU has bf16 instructions (x86 AVX512-BF16 or AMX, Arm BF16: several times the
              fp32 matmul rate), fp32 elsewhere (where bf16 is emulated and slower than fp32).
              SSL_CPU_AMP=fp32|bf16 overrides that choice (auto: the choice itself).
NVIDIA apex is used only when it is installed and asked for (use_apex=True / SSL_USE_APEX=1).
Every run prints one line saying which precision it uses and why (MixedPrecision.precision_line).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import compat
from .compat import grad_scaler
from .errors import UserError

LEVELS = ("O0", "O1", "O2")
AMP_DTYPES = ("fp16", "bf16")  # --amp_dtype / AMP_DTYPE on NPU and GPU
CPU_DTYPE_ENV = "SSL_CPU_AMP"
CPU_CHOICES = ("auto", "fp32", "bf16")
APEX_ENV = "SSL_USE_APEX"
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

CPU_INFO = Path("/proc/cpuinfo")
# CPU features that execute bf16 arithmetic in hardware: x86 AVX512-BF16 (Intel Cooper Lake and
# later Xeons, AMD Zen 4 and later) and AMX (Intel Sapphire Rapids and later); Arm's BF16
# extension (Neoverse V1/N2, Graviton 3 and later). Without them oneDNN emulates bf16 with fp32
# instructions plus conversions, slower than plain fp32.
NATIVE_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_features(cpuinfo: str) -> set[str]:
    """The feature names /proc/cpuinfo lists: x86 'flags', Arm 'Features' (first processor)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


@functools.lru_cache(maxsize=None)
def _host_cpuinfo() -> str | None:
    try:
        return CPU_INFO.read_text()
    except OSError:  # not Linux
        return None


def _torch_cpu_features() -> set[str]:
    """Where there is no /proc/cpuinfo (macOS, Windows): what torch's own x86 probe reports
    (torch 2.3+); nothing on older torch or other architectures."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return {name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()}


def native_bf16_feature(cpuinfo: str | None = None) -> str | None:
    """The feature that makes bf16 native on this CPU ('amx_bf16', 'avx512_bf16' or Arm's 'bf16'),
    or None. `cpuinfo`: the text of /proc/cpuinfo (default: this host's).

    Read from the CPU's feature flags rather than by timing a bf16 and an fp32 matmul: the flags
    are exact, free and the same on every run, while a timing on a shared or throttled machine
    varies several-fold from run to run and would make two runs of one command pick different
    precisions."""
    text = _host_cpuinfo() if cpuinfo is None else cpuinfo
    features = cpu_features(text) if text is not None else _torch_cpu_features()
    return next((name for name in NATIVE_BF16_FEATURES if name in features), None)


def cpu_precision(cpuinfo: str | None = None) -> tuple[str, str]:
    """What mixed precision means on this CPU: ('bf16' or 'fp32', the reason in words).
    SSL_CPU_AMP=fp32|bf16 decides when set; otherwise the CPU's features (native_bf16_feature)."""
    asked = os.environ.get(CPU_DTYPE_ENV, "auto").strip().lower() or "auto"
    if asked not in CPU_CHOICES:
        raise UserError(f"{CPU_DTYPE_ENV}={asked!r} is not a CPU precision: use one of "
                        f"{', '.join(CPU_CHOICES)} (auto: bf16 where the CPU computes it natively)")
    if asked != "auto":
        return asked, f"{CPU_DTYPE_ENV}={asked}"
    feature = native_bf16_feature(cpuinfo)
    if feature is not None:
        return "bf16", f"the CPU has {feature}; {CPU_DTYPE_ENV}=fp32 to turn it off"
    return "fp32", (f"no native bf16 on this CPU (none of {', '.join(NATIVE_BF16_FEATURES)}), where "
                    f"bf16 runs slower than fp32; {CPU_DTYPE_ENV}=bf16 to use it anyway")


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
    reason: str = "AMP_OPT_LEVEL O0"  # why this precision, for precision_line

    @property
    def enabled(self) -> bool:
        return self.dtype != torch.float32 and self.apex is None

    @classmethod
    def from_level(cls, level: str, device_type: str, cpu_dtype: str | None = None,
                   use_apex: bool | None = None, amp_dtype: str = "fp16") -> "MixedPrecision":
        """The precision of an AMP level on a device. amp_dtype: the autocast type of O1/O2 on
        NPU/GPU; on CPU, cpu_dtype ('fp32' or 'bf16') or else cpu_precision() decides."""
        level = level.upper()
        if level not in LEVELS:
            raise UserError(f"unknown AMP level {level!r}: use one of {', '.join(LEVELS)}")
        amp_dtype = amp_dtype.lower()
        if amp_dtype not in AMP_DTYPES:
            raise UserError(f"unknown AMP dtype {amp_dtype!r}: use one of {', '.join(AMP_DTYPES)}")
        if level == "O0":
            return cls(device_type, level=level)
        if use_apex is None:
            use_apex = os.environ.get(APEX_ENV, "0") == "1"
        if use_apex:
            return cls._with_apex(level, device_type, amp_dtype)
        if device_type == "cpu":
            return cls._on_cpu(level, cpu_dtype)
        if amp_dtype == "bf16":
            return cls(device_type, dtype=torch.bfloat16, level=level,
                       reason="AMP dtype bf16: fp32's exponent range, no loss scaling needed")
        return cls(device_type, dtype=torch.float16, scaler=_grad_scaler(device_type), level=level,
                   reason="AMP dtype fp16, upstream's default; bf16 would need no loss scaling")

    @classmethod
    def _on_cpu(cls, level: str, cpu_dtype: str | None) -> "MixedPrecision":
        if cpu_dtype is None:
            name, reason = cpu_precision()
        else:
            name, reason = cpu_dtype.lower(), f"{cpu_dtype} asked for"
        if name not in ("fp32", "bf16"):
            raise UserError(f"CPU autocast dtype {name!r} is not supported: use fp32 or bf16")
        return cls("cpu", dtype=_DTYPES[name], level=level, reason=reason)

    @classmethod
    def from_flag(cls, use_fp16: bool, device_type: str, cpu_dtype: str | None = None,
                  amp_dtype: str = "fp16") -> "MixedPrecision":
        """DINO's --use_fp16: True is the O1 recipe (with --amp_dtype), False is fp32."""
        precision = cls.from_level("O1" if use_fp16 else "O0", device_type, cpu_dtype, use_apex=False,
                                   amp_dtype=amp_dtype)
        if not use_fp16:
            precision.reason = "--use_fp16 false"
        return precision

    @classmethod
    def _with_apex(cls, level: str, device_type: str, amp_dtype: str) -> "MixedPrecision":
        if amp_dtype != "fp16":
            raise UserError(f"apex ({APEX_ENV}=1) computes in fp16 only: unset {APEX_ENV} to use "
                            f"native bf16 autocast, or use the AMP dtype fp16")
        try:
            amp_module = importlib.import_module("apex.amp")
        except ImportError as exc:
            raise UserError(f"apex was asked for ({APEX_ENV}=1) but is not installed: "
                            "install NVIDIA apex from source or unset it to use native AMP") from exc
        return cls(device_type, dtype=torch.float16, scaler=ApexScaler(amp_module), level=level,
                   apex=amp_module, reason=f"{APEX_ENV}=1")

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
        if self.device_type == "cpu" and self.dtype == torch.bfloat16:
            return _cpu_bf16_autocast()
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

    def precision_line(self) -> str:
        """What the run computes in and why, e.g. 'precision: bf16 autocast on cpu (mixed
        precision: the CPU has avx512_bf16; SSL_CPU_AMP=fp32 to turn it off)'."""
        if self.apex is not None:
            what = f"apex {self.level} (fp16)"
        elif self.enabled:
            scaling = " with loss scaling" if self.dtype == torch.float16 else ""  # fp16 has a GradScaler
            what = f"{self.precision} autocast{scaling}"
        else:
            what = "fp32"
        return f"precision: {what} on {self.device_type} ({self.reason})"


@contextlib.contextmanager
def _cpu_bf16_autocast():
    """bf16 autocast on CPU, with attention on torch's math kernels. The CPU flash-attention
    kernel's bf16 backward is 5x slower than its fp32 one on torch 2.14 (DINO ViT-Ti/4, batch 64:
    3.0 s of a 3.5 s step, against 0.58 s in fp32) and crashed on torch 2.1 (double free); the math
    path's batched products run at bf16 GEMM speed (that step: 2.6 s)."""
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16), compat.sdpa_math_only():
        yield
