"""A process group that refuses what NCCL and HCCL refuse, for CPU machines.

gloo accepts tensors of any dtype on the CPU (and CUDA), so a CPU test run never notices a
collective that kills a GPU or NPU job. This group wraps a real gloo group and checks every
tensor first: float64 is refused (HCCL lacks it on most chips), and so is a tensor whose device
type is not the one the group serves (NCCL serves CUDA tensors only; torch_npu registers hccl for
"npu" only). DDP's own collectives (parameter broadcast, gradient buckets) go through it too.

`install(device_type)` registers it and makes `torch.distributed.init_process_group` use it
instead of the backend the code asks for. Groups created explicitly with
`new_group(backend="gloo")` stay real gloo groups: the project's one host-side group (the
SIGTERM agreement, CPU int32) is such a group and is meant to pass.

On a CPU machine the training device is the CPU, so the device check can only fire where a test
serves another device type (a GPU run: gloo also carries CUDA tensors). The project's collective
layer checks the same rule against the training device itself; tests/test_accelerator_paths.py
covers that check directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

BACKEND = "checked_gloo"
_served = {"device_type": "cpu"}
CALLS: list[tuple[str, torch.dtype, str]] = []  # (operation, dtype, device type), this process


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class DeviceCheckingGroup(dist.ProcessGroup):
    def __init__(self, inner, rank: int, size: int, device_type: str):
        super().__init__(rank, size)
        self._inner, self._device_type = inner, device_type

    def _checked(self, operation: str, *args, **kwargs):
        for tensor in _tensors(args):
            CALLS.append((operation, tensor.dtype, tensor.device.type))
            if tensor.device.type != self._device_type:
                raise RuntimeError(f"{BACKEND} (standing in for NCCL/HCCL): {operation} got a tensor on "
                                   f"{tensor.device}; this group serves {self._device_type} tensors only")
            if tensor.dtype == torch.float64:
                raise RuntimeError(f"{BACKEND} (standing in for NCCL/HCCL): {operation} got a float64 "
                                   "tensor; HCCL has no float64 on most chips")
        return getattr(self._inner, operation)(*args, **kwargs)

    def allreduce(self, *args, **kwargs):
        return self._checked("allreduce", *args, **kwargs)

    def allreduce_coalesced(self, *args, **kwargs):
        return self._checked("allreduce_coalesced", *args, **kwargs)

    def allgather(self, *args, **kwargs):
        return self._checked("allgather", *args, **kwargs)

    def _allgather_base(self, *args, **kwargs):
        return self._checked("_allgather_base", *args, **kwargs)

    def allgather_into_tensor_coalesced(self, *args, **kwargs):
        return self._checked("allgather_into_tensor_coalesced", *args, **kwargs)

    def broadcast(self, *args, **kwargs):
        return self._checked("broadcast", *args, **kwargs)

    def reduce(self, *args, **kwargs):
        return self._checked("reduce", *args, **kwargs)

    def gather(self, *args, **kwargs):
        return self._checked("gather", *args, **kwargs)

    def scatter(self, *args, **kwargs):
        return self._checked("scatter", *args, **kwargs)

    def reduce_scatter(self, *args, **kwargs):
        return self._checked("reduce_scatter", *args, **kwargs)

    def _reduce_scatter_base(self, *args, **kwargs):
        return self._checked("_reduce_scatter_base", *args, **kwargs)

    def alltoall_base(self, *args, **kwargs):
        return self._checked("alltoall_base", *args, **kwargs)

    def barrier(self, *args, **kwargs):
        return self._inner.barrier(*args, **kwargs)

    def getBackendName(self) -> str:
        return BACKEND


def _create(store, rank: int, size: int, timeout):
    inner = dist.ProcessGroupGloo(store, rank, size, timeout)
    return DeviceCheckingGroup(inner, rank, size, _served["device_type"])


def install(device_type: str = "cpu") -> None:
    """Register the checking group (serving `device_type`) and route init_process_group to it."""
    _served["device_type"] = device_type
    if BACKEND in dist.Backend.backend_list:  # installed already in this process
        return
    dist.Backend.register_backend(BACKEND, _create, devices=[device_type])
    original = dist.init_process_group

    def init_checked(*args, **kwargs):
        backend = kwargs.pop("backend", None)
        if args:
            backend, args = args[0], args[1:]  # the positional backend
        # a CPU run's gloo becomes the checking group; hccl (the emulated NPU's) stays itself
        return original(BACKEND if backend in (None, "gloo") else backend, *args, **kwargs)

    dist.init_process_group = init_checked
