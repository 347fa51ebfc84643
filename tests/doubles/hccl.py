"""An "hccl" process-group backend for the emulated NPU, with HCCL's rules, recording every call.

torch_npu registers hccl for "npu" tensors only; this double does the same (the torch_npu double
registers it at import) and refuses what ProcessGroupHCCL refuses (read in Ascend/pytorch's
ProcessGroupHCCL.cpp and HCCLUtils), with its messages:
  * a tensor that is not on the NPU, or sparse: "Tensors must be NPU and dense";
  * a non-contiguous tensor: "Tensors must be contiguous";
  * reductions (all_reduce, reduce, reduce_scatter) take int8/16/32/64, float16/32 and bfloat16
    only ("HCCL allreduce: Unsupported data type at::kDouble"; float64 is reduced on the newest
    chips only, uint8/bool not at all); all_gather and broadcast take every type HCCL maps,
    float64, uint8 and bool included.
The data then travel through a gloo group on host copies, and the results are copied back into
the NPU tensors. Every call is appended to CALLS (this process) and, when HCCL_DOUBLE_LOG names a
file, to that file as one JSON line (all ranks of a run, for tests to assert on).
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

BACKEND = "hccl"
LOG_ENV = "HCCL_DOUBLE_LOG"
CALLS: list[dict] = []

_TYPE_NAMES = {torch.uint8: "at::kByte/at::kBool", torch.bool: "at::kByte/at::kBool", torch.int8: "at::kChar",
               torch.int16: "at::kShort", torch.int32: "at::kInt", torch.int64: "at::kLong",
               torch.float16: "at::kHalf", torch.float32: "at::kFloat", torch.float64: "at::kDouble",
               torch.bfloat16: "at::kBFloat16"}
_REDUCIBLE = (torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.bfloat16)


def _record(rank: int, operation: str, tensor: torch.Tensor, refused: str | None) -> None:
    call = {"rank": rank, "op": operation, "dtype": str(tensor.dtype).replace("torch.", ""),
            "device": str(tensor.device), "shape": list(tensor.shape), "refused": refused}
    CALLS.append(call)
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(call) + "\n")


def refusal(operation: str, tensor: torch.Tensor, reduces: bool) -> str | None:
    """HCCL's message for a tensor it refuses in `operation`, or None."""
    if tensor.device.type != "npu" or tensor.is_sparse:
        return "Tensors must be NPU and dense"
    if not (tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)):
        return "Tensors must be contiguous"
    if tensor.dtype not in _TYPE_NAMES:
        return "Unsupported data type for HCCL process group"
    if reduces and tensor.dtype not in _REDUCIBLE:
        return f"HCCL {operation}: Unsupported data type {_TYPE_NAMES[tensor.dtype]}"
    return None


def _flat(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        else:
            yield from _flat(value)


class HcclGroup(dist.ProcessGroup):
    def __init__(self, store, rank: int, size: int, timeout):
        super().__init__(rank, size)
        self._gloo = dist.ProcessGroupGloo(store, rank, size, timeout)

    def _check(self, operation: str, *tensors, reduces: bool = False) -> None:
        for tensor in _flat(tensors):
            refused = refusal(operation, tensor, reduces)
            _record(self.rank(), operation, tensor, refused)
            if refused:
                raise RuntimeError(refused)

    @staticmethod
    def _done(outputs: list[torch.Tensor]):
        future = torch.futures.Future(devices=[outputs[0].device])
        future.set_result(outputs)
        return _create_work_from_future(future)

    def _reduce_options(self, opts) -> dist.AllreduceOptions:
        options = dist.AllreduceOptions()
        options.reduceOp = opts.reduceOp
        return options

    def _allreduce_host(self, tensors: list[torch.Tensor], opts) -> None:
        # bfloat16 summed as float32 on the host (torch 2.1's gloo has no bfloat16 reductions)
        host = [t.cpu().float() if t.dtype == torch.bfloat16 else t.cpu() for t in tensors]
        self._gloo.allreduce(host, self._reduce_options(opts)).wait()
        for tensor, value in zip(tensors, host):
            tensor.copy_(value)

    def allreduce(self, tensors, opts=None):
        opts = opts or dist.AllreduceOptions()
        self._check("allreduce", tensors, reduces=True)
        self._allreduce_host(tensors, opts)
        return self._done(tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        self._check("allreduce_coalesced", tensors, reduces=True)
        self._allreduce_host(tensors, opts or dist.AllreduceCoalescedOptions())
        return self._done(tensors)

    def reduce(self, tensors, opts=None):
        opts = opts or dist.ReduceOptions()
        self._check("reduce", tensors, reduces=True)
        host = [t.cpu() for t in tensors]
        self._gloo.reduce(host, opts).wait()
        if self.rank() == opts.rootRank:
            tensors[0].copy_(host[0])
        return self._done(tensors)

    def broadcast(self, tensors, opts=None):
        self._check("broadcast", tensors)
        host = [t.cpu() for t in tensors]
        self._gloo.broadcast(host, opts or dist.BroadcastOptions()).wait()
        for tensor, value in zip(tensors, host):
            tensor.copy_(value)
        return self._done(tensors)

    def _gather_host(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        host = tensor.cpu()
        parts = [torch.empty_like(host) for _ in range(self.size())]
        self._gloo.allgather([parts], [host]).wait()
        return parts

    def allgather(self, output_lists, inputs, opts=None):
        self._check("allgather", output_lists, inputs)
        for outputs, tensor in zip(output_lists, inputs):
            for output, part in zip(outputs, self._gather_host(tensor)):
                output.copy_(part)
        return self._done([t for outputs in output_lists for t in outputs])

    def _allgather_base(self, output, tensor, opts=None):
        self._check("_allgather_base", output, tensor)
        output.copy_(torch.cat([p.reshape(-1) for p in self._gather_host(tensor)]).reshape(output.shape))
        return self._done([output])

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        for output, tensor in zip(outputs, inputs):
            self._allgather_base(output, tensor, opts)
        return self._done(outputs)

    def _reduce_scatter_base(self, output, tensor, opts=None):
        self._check("_reduce_scatter_base", output, tensor, reduces=True)
        summed = tensor.clone()
        self._allreduce_host([summed], opts or dist.ReduceScatterOptions())
        output.copy_(summed.reshape(self.size(), -1)[self.rank()].reshape(output.shape))
        return self._done([output])

    def reduce_scatter(self, outputs, input_lists, opts=None):
        self._check("reduce_scatter", outputs, input_lists, reduces=True)
        for output, parts in zip(outputs, input_lists):
            summed = [p.clone() for p in parts]
            self._allreduce_host(summed, opts or dist.ReduceScatterOptions())
            output.copy_(summed[self.rank()])
        return self._done(outputs)

    # torch 2.14 names of the single-tensor collectives
    all_gather_single = _allgather_base
    all_gather_single_coalesced = allgather_into_tensor_coalesced
    reduce_scatter_single = _reduce_scatter_base

    def barrier(self, opts=None):
        _record(self.rank(), "barrier", torch.empty(0, device="npu"), None)
        return self._gloo.barrier(opts or dist.BarrierOptions())

    def getBackendName(self) -> str:
        return BACKEND


def _create(store, rank: int, size: int, timeout):
    return HcclGroup(store, rank, size, timeout)


def register() -> None:
    """Make init_process_group(backend="hccl") build the double, for NPU tensors (once a process)."""
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, _create, devices=["npu"])


def read_log(path) -> list[dict]:
    """The calls every rank of a run appended to the HCCL_DOUBLE_LOG file."""
    with open(path) as log:
        return [json.loads(line) for line in log]
