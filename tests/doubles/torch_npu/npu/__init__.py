"""torch.npu as the runtime uses it: device queries, memory statistics, the generator state.

Every name here exists in torch_npu.npu of torch_npu 2.1.0.post17 and 2.14.0 (their __all__, and the
private _is_in_bad_fork that torch.manual_seed asks for).
No NPU is attached: is_available() is False and device_count() is 0; the RNG state belongs to a
CPU generator standing in for the device's.
"""

import torch

from . import amp  # noqa: F401

_generator = torch.Generator()
_current = 0
_peak_bytes = 0


def is_available() -> bool:
    return False


def device_count() -> int:
    return 0


def set_device(device) -> None:
    global _current
    _current = torch.device(device).index if not isinstance(device, int) else device


def current_device() -> int:
    return _current


def synchronize(device=None) -> None:
    pass


def get_device_name(device=None) -> str:
    return "NPU test double"


def max_memory_allocated(device=None) -> int:
    return _peak_bytes


def reset_peak_memory_stats(device=None) -> None:
    global _peak_bytes
    _peak_bytes = 0


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


def _is_in_bad_fork() -> bool:
    """Asked by torch.manual_seed, which then seeds this device too (manual_seed_all)."""
    return False
