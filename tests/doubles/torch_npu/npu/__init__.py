"""torch.npu on the emulated device (tests/doubles/npu_emulator.cpp): device queries and
selection, memory statistics, the generator state, autocast and the NPU options.

Every public name here exists in torch_npu.npu of torch_npu 2.1.0.post17 and 2.14.0 (their
__all__), with the same arguments; `_lazy_init`, `_is_in_bad_fork` and `is_initialized` are what
torch itself asks a device module for. Random kernels on the emulated device draw from torch's
CPU generator; the device generator state here (get/set_rng_state, manual_seed) is a separate
CPU generator standing in for the device's, which checkpoints save and restore.
"""

import contextlib

import torch

import npu_emulator

from . import amp, utils  # noqa: F401
from .utils import is_bf16_supported, is_support_inf_nan  # noqa: F401

_ops = npu_emulator.load()
_generator = torch.Generator()
_autocast_dtype = [torch.float16]  # torch 2.1 reads it from here (torch 2.4+ keeps its own)
options: dict = {}  # what set_option / set_compile_mode were given, for tests to read


def _index(device=None) -> int:
    if device is None:
        return current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "npu":
        raise ValueError(f"Expected an npu device, but got: {device}")
    return current_device() if device.index is None else device.index


def _lazy_init() -> None:
    pass


def init() -> None:
    pass


def is_initialized() -> bool:
    return True


def _is_in_bad_fork() -> bool:
    """Asked by torch.manual_seed, which then seeds this device too (manual_seed_all)."""
    return False


def is_available() -> bool:
    return True


def device_count() -> int:
    return int(_ops.device_count())


def set_device(device) -> None:
    _ops.set_device(_index(device))


def current_device() -> int:
    return int(_ops.current_device())


@contextlib.contextmanager
def device(device):
    previous = current_device()
    set_device(device)
    try:
        yield
    finally:
        set_device(previous)


def synchronize(device=None) -> None:
    """Kernels run synchronously on the host: nothing is ever pending."""


def get_device_name(device=None) -> str:
    if not 0 <= _index(device) < device_count():
        raise AssertionError("Invalid device id")
    return "Ascend910B (emulated)"


def memory_allocated(device=None) -> int:
    return int(_ops.memory_allocated(_index(device)))


def max_memory_allocated(device=None) -> int:
    return int(_ops.max_memory_allocated(_index(device)))


def memory_reserved(device=None) -> int:
    return memory_allocated(device)


def reset_peak_memory_stats(device=None) -> None:
    _ops.reset_peak_memory_stats(_index(device))


def empty_cache() -> None:
    pass


def get_rng_state(device="npu") -> torch.Tensor:
    return _generator.get_state()


def set_rng_state(new_state: torch.Tensor, device="npu") -> None:
    _generator.set_state(new_state)


def manual_seed(seed: int) -> None:
    _generator.manual_seed(int(seed))


def manual_seed_all(seed: int) -> None:
    manual_seed(seed)


def initial_seed() -> int:
    return _generator.initial_seed()


def get_amp_supported_dtype() -> list:
    return [torch.float16, torch.bfloat16] if is_bf16_supported() else [torch.float16]


def is_autocast_enabled() -> bool:
    return bool(_ops.autocast_enabled())


def set_autocast_enabled(enabled: bool) -> None:
    _ops.set_autocast_enabled(bool(enabled))


def get_autocast_dtype() -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):  # torch 2.4+
        return torch.get_autocast_dtype("npu")
    return _autocast_dtype[0]


def set_autocast_dtype(dtype: torch.dtype) -> None:
    _ops.set_autocast_dtype(dtype)
    _autocast_dtype[0] = dtype


def set_option(option: dict) -> None:
    if not isinstance(option, dict):
        raise TypeError("npu option must be a dict.")
    options.update(option)


def set_compile_mode(jit_compile: bool = False) -> None:
    options["jitCompile"] = "enable" if jit_compile else "disable"
