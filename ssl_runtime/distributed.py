"""Process-group set-up and collective helpers that are correct at world size 1 and N.

Launch styles understood, in this order:
  * torchrun / torch.distributed.launch: RANK, WORLD_SIZE, LOCAL_RANK in the environment;
  * SLURM (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID;
  * a plain `python script.py` (optionally with the legacy --local_rank N): world size 1 and no
    process group at all (upstream DINO refuses to run like this; we don't).
The backend follows the device: hccl on NPU, nccl on CUDA, gloo on CPU.

This module is the only place that calls torch.distributed collectives. What it hands them follows
the rule NCCL and HCCL impose (gloo would accept more, so CPU runs would hide a violation): every
tensor lives on the training device and is float32 or narrower (HCCL has no float64 on most chips;
torch_npu registers hccl for NPU tensors only, NCCL serves CUDA tensors only); integers go as
int32, so no reduction depends on a backend's 64-bit support. A tensor that breaks the rule stops
the run here with a message saying so, on every backend.
The one deliberate exception is any_rank_true: a separate gloo group on the host (CPU int32), so
that asking about SIGTERM never waits behind the accelerator's queue.

Every tensor handed to a collective also stays referenced here for a while after the call (see
_hand_over): on torch < 2.8 that is what lets shutdown() destroy the group without hanging.
shutdown() ends the group and its backend threads for real, whatever the program still holds (see there).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import os
import subprocess
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import device as devices
from .errors import UserError, at_entry_point_end

TIMEOUT_ENV = "SSL_DIST_TIMEOUT_MIN"


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    device_type: str
    backend: str
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """The legacy launcher flags (both spellings) and upstream DINO's --dist_url."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                        help="set by torch.distributed.launch; torchrun uses LOCAL_RANK instead")
    parser.add_argument("--dist_url", default="env://",
                        help="url used to set up distributed training (env:// reads MASTER_ADDR/PORT)")


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0].split("[")[0]


def launch_environment(local_rank_flag: int = -1) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local = int(env.get("LOCAL_RANK", local_rank_flag if local_rank_flag >= 0 else 0))
        return int(env["RANK"]), int(env["WORLD_SIZE"]), local
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", "29500")
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, max(local_rank_flag, 0)


def process_group_timeout() -> datetime.timedelta:
    """How long a collective may wait for a silent rank before the job fails (default 30 min;
    SSL_DIST_TIMEOUT_MIN, fractions allowed: 0.5 is 30 s)."""
    text = os.environ.get(TIMEOUT_ENV, "30")
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise UserError(f"{TIMEOUT_ENV}={text!r} is not a positive number of minutes: e.g. "
                        f"{TIMEOUT_ENV}=30 (or 0.5 for 30 seconds)")
    return datetime.timedelta(minutes=minutes)


def init_distributed(device_request: str | None = "auto", local_rank: int = -1,
                     dist_url: str = "env://") -> DistContext:
    """Pick the device, bind this rank to it and join the process group when world size > 1."""
    kind = devices.resolve_device(device_request)
    rank, world_size, local = launch_environment(local_rank)
    device = devices.bind_device(kind, local)
    backend = devices.backend_for(kind)
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        if dist_url == "env://" and "MASTER_ADDR" not in os.environ:
            raise UserError("world size > 1 but MASTER_ADDR is not set: launch with torchrun "
                            "(e.g. torchrun --nproc_per_node=8 ...) or set MASTER_ADDR/MASTER_PORT")
        _import_group_defaults_while_no_group_exists()
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size,
                                rank=rank, timeout=process_group_timeout())
    _set_collective_device(device)
    barrier()
    devices.set_fast_math(kind)
    return DistContext(rank, world_size, local, device, kind, backend, distributed)


def _import_group_defaults_while_no_group_exists() -> None:
    """torch.distributed.nn's functions take `group=group.WORLD` as a default argument, evaluated at
    their first import. DDP's constructor imports them (through torch._dynamo on torch 2.14): after
    init_process_group, those defaults pin the world group for the life of the interpreter, so
    destroy_process_group cannot end it (see shutdown). Imported before, the defaults are None."""
    import torch.distributed.nn  # noqa: F401


def single_process_context(device_request: str | None = "cpu") -> DistContext:
    """A world-size-1 context without touching the environment (tools, tests)."""
    kind = devices.resolve_device(device_request)
    return DistContext(0, 1, 0, devices.bind_device(kind, 0), kind, devices.backend_for(kind), False)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank gets here. An all-reduce of one float32 on the training device, not
    dist.barrier(): that one guesses its device from the process's accelerator (which a stand-in
    torch_npu, or a CUDA rank bound late, gets wrong) and skips the collective-tensor rule.
    Reading the result waits for it on the host: NCCL/HCCL only queue the all-reduce on a stream,
    and a group destroyed behind a queued collective would abort it."""
    if is_dist():
        all_reduce_sum_(torch.zeros(1, device=collective_device())).item()


# ---------------------------------------------------------------- collectives

_collective_device = torch.device("cpu")  # the training device of this rank, set by init_distributed


def _set_collective_device(device: torch.device) -> None:
    global _collective_device
    _collective_device = torch.device(device)


def collective_device() -> torch.device:
    """Where tensors handed to collectives must live: this rank's training device."""
    return _collective_device


# (time handed over, what was handed over), oldest first; see _hand_over.
_handed_over: collections.deque = collections.deque()
HOLD_SECONDS = 30.0


def _hand_over(tensors):
    """`tensors` (a tensor or a list of them), kept referenced for HOLD_SECONDS (or until shutdown).

    A backend finishes with a collective's tensors on its own thread after the call returns
    (gloo's worker, NCCL's and HCCL's watchdog, which only polls). When Python dropped a tensor
    first, torch hands its Python object over to C++, and that thread then needs the GIL to free
    it. torch < 2.8 destroys a process group while holding the GIL and joins those threads: the
    job hung at exit (seen on torch 2.1 gloo: a rank waited for ever in destroy_process_group).
    Held here, the last Python reference drops on the main thread, after the backend let go."""
    now = time.monotonic()
    while _handed_over and now - _handed_over[0][0] > HOLD_SECONDS:
        _handed_over.popleft()
    _handed_over.append((now, tensors))
    return tensors


def check_collective_tensor(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The tensor itself when NCCL/HCCL would take it (see the module docstring); else a
    RuntimeError naming the rule, instead of an error from inside the backend (or none on gloo)."""
    device = collective_device() if device is None else device
    if tensor.device != device:
        raise RuntimeError(f"collective on a {tensor.device} tensor while the training device is "
                           f"{device}: NCCL and HCCL serve their own device's tensors only; create "
                           "it on the training device (distributed.collective_device())")
    if tensor.dtype in (torch.float64, torch.complex128, torch.int64):
        raise RuntimeError(f"collective on a {tensor.dtype} tensor: collectives here take 32-bit "
                           "or narrower types (HCCL has no float64 on most chips); use float32 or int32")
    return tensor


def _gloo_lacks(tensor: torch.Tensor) -> bool:
    """gloo has no bfloat16 on torch 2.1 ("Invalid scalar type" from the first collective of a
    bf16 tensor, e.g. MoBY's keys under CPU bf16 autocast); such tensors travel another way."""
    return tensor.dtype == torch.bfloat16 and dist.get_backend() == "gloo"


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place; identity at world size 1."""
    if is_dist():
        if _gloo_lacks(tensor):  # summed in float32, rounded once
            return tensor.copy_(all_reduce_sum_(tensor.float()))
        dist.all_reduce(_hand_over(check_collective_tensor(tensor)), op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average over ranks in place; identity at world size 1."""
    if is_dist():
        all_reduce_sum_(tensor).div_(dist.get_world_size())
    return tensor


def sum_over_ranks(values: list[float]) -> list[float]:
    """Sums of host numbers over ranks (meter totals), reduced as float32 on the training device."""
    if not is_dist():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float32, device=collective_device())
    return all_reduce_sum_(tensor).tolist()


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank in rank order (no gradient)."""
    if not is_dist():
        return tensor
    if _gloo_lacks(tensor):  # a gather only copies bits: bf16 travels as its bytes, exactly
        return all_gather_cat(tensor.contiguous().view(torch.uint8), dim).view(torch.bfloat16)
    tensor = check_collective_tensor(tensor.contiguous())
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(_hand_over(parts), _hand_over(tensor))
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 tensors whose first dimension differs between ranks (int64 labels
    and indices travel as int32 and come back as int64)."""
    if not is_dist():
        return tensor
    if tensor.dtype == torch.int64:
        return all_gather_uneven(tensor.int()).long()
    size = torch.tensor([tensor.shape[0]], dtype=torch.int32, device=tensor.device)
    sizes = [int(s) for s in all_gather_cat(size).tolist()]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_cat(padded)
    chunks = [gathered[i * max(sizes): i * max(sizes) + n] for i, n in enumerate(sizes)]
    return torch.cat(chunks)


_host_group = None


def any_rank_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a host-side gloo collective, so
    it never waits for the accelerator); the flag itself at world size 1."""
    global _host_group
    if not is_dist():
        return flag
    if _host_group is None:
        gloo = "gloo"
        _host_group = dist.group.WORLD if dist.get_backend() == gloo else dist.new_group(backend=gloo)
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(_hand_over(value), op=dist.ReduceOp.MAX, group=_host_group)
    return bool(value.item())


def all_gather_object(obj) -> list:
    """torch's all_gather_object (pickled bytes as uint8, their lengths as int64, on the device
    torch picks for the backend: NCCL and HCCL carry both); for tools and tests: its tensors are
    torch's own, so _hand_over cannot hold them."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_ddp_models: weakref.WeakSet = weakref.WeakSet()  # what wrap_ddp made; shutdown() detaches them


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, **kwargs) -> torch.nn.Module:
    """DistributedDataParallel when running distributed, the bare model otherwise."""
    if not ctx.distributed:
        return model
    device_ids = None if ctx.device_type == "cpu" else [ctx.local_rank]
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)
    _ddp_models.add(ddp)
    return ddp


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def convert_sync_batchnorm(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """SyncBatchNorm across ranks when distributed on an accelerator.

    torch's SyncBatchNorm has no CPU kernel, so a gloo (CPU) run keeps per-rank BatchNorm.
    """
    if ctx.distributed and ctx.device_type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def shutdown() -> None:
    """End the process group (all of its groups) and its backend's threads while the interpreter is
    whole. A DDP model from wrap_ddp still alive afterwards is only its .module (unwrap).

    Why in this order: gloo runs collectives on the group's worker threads, and a worker lets go of
    a finished collective after the caller moved on; when that frees a Python object (autograd's
    context, which the all-reduce DDP issues during backward carries on torch 2.14; a tensor Python
    dropped) the worker needs the GIL. destroy_process_group() ends the threads only if it drops the
    last reference to the group (ProcessGroupGloo's destructor joins them, without the GIL on torch
    >= 2.8). Another holder (a live DDP model's reducer; torch's own default arguments, see
    _import_group_defaults_while_no_group_exists) kept them running into interpreter exit, and a
    worker that was waiting for the GIL when Python began to finalize was ended by Python inside a
    C++ destructor: std::terminate, "terminate called without an active exception", SIGABRT after
    the job's work was done (on torch 2.1 also a hang). So DDP models let go of the group first,
    garbage is collected (a DDP model dropped in a reference cycle), and the destroy drops the last
    reference. The tensors of recent collectives are released only after it (see _hand_over).
    """
    global _host_group
    _host_group = None
    if is_dist():
        for model in list(_ddp_models):
            _detach_from_process_group(model)
        gc.collect()
        dist.destroy_process_group()
    _handed_over.clear()
    _set_collective_device(torch.device("cpu"))


def _detach_from_process_group(model: torch.nn.parallel.DistributedDataParallel) -> None:
    """Drop what holds the group in a DDP model: its reducer, the logger that holds the reducer,
    and the group itself. Done before the destroy, so the destroy still drops the last reference."""
    for name in ("reducer", "logger", "process_group"):
        model.__dict__.pop(name, None)


at_entry_point_end(shutdown)  # an entry point that ends leaves its process group itself
