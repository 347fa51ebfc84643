"""Collective helpers at world size 1 and in a real 2-process gloo group."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_runtime import distributed as dist_utils
from ssl_runtime.errors import main_entry
from ssl_runtime.resilience import Interrupted
from conftest import free_port
from tests.reliability_helpers import start_ranks


def test_helpers_are_identities_at_world_size_one():
    t = torch.tensor([1.0, 2.0])
    assert dist_utils.get_world_size() == 1 and dist_utils.get_rank() == 0
    assert torch.equal(dist_utils.all_reduce_sum_(t.clone()), t)
    assert torch.equal(dist_utils.all_reduce_mean_(t.clone()), t)
    assert dist_utils.all_gather_cat(t) is t
    assert torch.equal(dist_utils.all_gather_uneven(t), t)
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}]
    model = torch.nn.Linear(2, 2)
    ctx = dist_utils.single_process_context("cpu")
    assert dist_utils.wrap_ddp(model, ctx) is model
    assert dist_utils.convert_sync_batchnorm(model, ctx) is model



def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = dist_utils.init_distributed("cpu")
    results = {"ctx": (ctx.rank, ctx.world_size, ctx.distributed, ctx.backend)}
    results["sum"] = dist_utils.all_reduce_sum_(torch.tensor([rank + 1.0])).item()
    results["mean"] = dist_utils.all_reduce_mean_(torch.tensor([rank * 4.0])).item()
    results["cat"] = dist_utils.all_gather_cat(torch.full((2, 1), float(rank))).flatten().tolist()
    # bf16 (MoBY's keys under CPU bf16 autocast): torch 2.1's gloo has no bfloat16
    third = torch.tensor([1 / 3 + rank], dtype=torch.bfloat16)
    results["cat_bf16"] = dist_utils.all_gather_cat(third)
    results["sum_bf16"] = dist_utils.all_reduce_sum_(third.clone())
    uneven = torch.arange(rank + 1, dtype=torch.float32) + 10 * rank
    results["uneven"] = dist_utils.all_gather_uneven(uneven).tolist()
    results["objects"] = dist_utils.all_gather_object(f"r{rank}")
    model = dist_utils.wrap_ddp(torch.nn.Linear(1, 1, bias=False), ctx)
    with torch.no_grad():
        model.module.weight.fill_(1.0)
    model(torch.tensor([[float(rank + 1)]])).sum().backward()
    results["ddp_grad"] = model.module.weight.grad.item()  # DDP averages: (1 + 2) / 2
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist_utils.shutdown()


def test_collectives_in_a_real_two_process_gloo_group(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["ctx"] == (rank, 2, True, "gloo")
        assert r["sum"] == 3.0
        assert r["mean"] == 2.0
        assert r["cat"] == [0.0, 0.0, 1.0, 1.0]
        bf16 = [torch.tensor([1 / 3 + k], dtype=torch.bfloat16) for k in (0, 1)]
        assert r["cat_bf16"].dtype == torch.bfloat16 and torch.equal(r["cat_bf16"], torch.cat(bf16))
        assert r["sum_bf16"].dtype == torch.bfloat16 and torch.equal(r["sum_bf16"], (bf16[0] + bf16[1]))
        assert r["uneven"] == [0.0, 10.0, 11.0]
        assert r["objects"] == ["r0", "r1"]
        assert r["ddp_grad"] == 1.5


def _entry_point_worker(rank: int, port: int, stop: bool, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)

    @main_entry
    def entry_point():
        dist_utils.init_distributed("cpu")
        if stop:
            raise Interrupted()  # what a SIGTERM agreed on by every rank ends in
        return dist.get_world_size()

    try:
        seen = {"returned": entry_point()}
    except SystemExit as exc:
        seen = {"exit_code": exc.code}
    seen["alive_after"] = dist.is_initialized()
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("stop", [False, True], ids=["returns", "sigterm"])
def test_an_entry_point_leaves_its_process_group_before_interpreter_exit(tmp_path, stop):
    """Left to interpreter exit, gloo's teardown aborts about one 2-process run in four (SIGABRT),
    so a finished or SIGTERM-stopped entry point destroys the group itself. One group per pair of
    processes, as in a real job (re-joining after a destroy is not something the project does)."""
    mp.spawn(_entry_point_worker, args=(free_port(), stop, str(tmp_path)), nprocs=2, join=True)
    expected = {"exit_code": 143} if stop else {"returned": 2}
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == {**expected, "alive_after": False}


# A collective that the backend's thread still holds when the caller drops its tensor and the
# entry point shuts down: NCCL/HCCL calls return before the collective ran, and gloo's worker
# releases its work a moment after the caller resumes. Rank 0 emulates that with an async
# all-reduce that rank 1 joins 2 s later. On torch < 2.8 the destroy held the GIL while joining
# the worker, which needed the GIL to free the dropped tensor: rank 0 hung for ever.
LATE_RELEASE_RANK = """
import os, time, weakref
import torch, torch.distributed as dist
from ssl_runtime import distributed
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
distributed.init_distributed("cpu")
seen = {}
if rank == 0:
    handed = torch.ones(1)
    ref = weakref.ref(handed)
    distributed.all_reduce_sum_(handed)
    del handed
    seen["held_after_the_call"] = ref() is not None
    issue = dist.all_reduce
    dist.all_reduce = lambda tensor, **kwargs: issue(tensor, async_op=True, **kwargs) and None
    distributed.all_reduce_sum_(torch.ones(1))  # returns at once; dropped at once
    dist.all_reduce = issue
else:
    distributed.all_reduce_sum_(torch.ones(1))
    time.sleep(2)
    distributed.all_reduce_sum_(torch.ones(1))
distributed.shutdown()
if rank == 0:
    seen["freed_after_shutdown"] = ref() is None
print(seen, flush=True)
"""


def run_two_ranks(cmd: list[str], hang: str) -> list[str]:
    """Both ranks' output; fails with `hang` when one does not end, or when one exits non-zero."""
    ranks = start_ranks(cmd)
    try:
        outs = ["".join(rank.communicate(timeout=120)) for rank in ranks]
    except subprocess.TimeoutExpired:
        for rank in ranks:
            rank.kill()
        pytest.fail(hang)
    assert [rank.returncode for rank in ranks] == [0, 0], outs
    return outs


def test_shutdown_does_not_hang_on_a_collective_the_backend_still_holds(tmp_path):
    script = tmp_path / "late_release_rank.py"
    script.write_text(LATE_RELEASE_RANK)
    outs = run_two_ranks([sys.executable, str(script)],
                         hang="a rank hung in shutdown() behind a collective its backend still held")
    assert "{'held_after_the_call': True, 'freed_after_shutdown': True}" in outs[0], outs[0]


def test_collective_tensors_are_held_for_hold_seconds_then_let_go(monkeypatch):
    """Held long enough for any backend thread, but not for the whole run: DINO all-reduces a
    (1, out_dim) center every step."""
    clock = types.SimpleNamespace(now=100.0)
    monkeypatch.setattr(dist_utils, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(dist_utils, "_handed_over", collections.deque())
    first, second, third = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    assert dist_utils._hand_over(first) is first
    clock.now += dist_utils.HOLD_SECONDS  # exactly HOLD_SECONDS old: still held
    dist_utils._hand_over(second)
    assert [held.numel() for _, held in dist_utils._handed_over] == [1, 2]
    clock.now += 0.5
    dist_utils._hand_over(third)
    assert [held.numel() for _, held in dist_utils._handed_over] == [2, 3]  # first let go


# What a job may still hold when it ends, dropped in some order: DDP models (each reducer holds the
# group, and with it gloo's worker threads), a loader with a worker process, and a collective that
# the backend finishes after the caller moved on: rank 0 issues its last all-reduce during a backward
# pass (on torch 2.14 the work then carries autograd's thread-local context, a Python object, and the
# gloo worker that drops the work takes the GIL) and rank 1 joins it 1 s later, while rank 0 keeps
# the GIL in its last exit handler (a busy loop, forced switches off); a finaliser lets go of the GIL
# after Python began to finalize. Before the fix the group's threads outlived shutdown(): the worker,
# waiting for the GIL, woke up in a finalizing interpreter, which ends such a thread, here inside a
# C++ destructor: SIGABRT, "terminate called without an active exception" (on torch 2.1, where the
# Python object is the tensor, some orders hung instead). Each rank also counts the threads started
# since init_distributed that are still there after shutdown().
TEARDOWN_RANK = """
import atexit, gc, os, sys, time

def keep_the_gil():  # registered first, so it runs last at exit, right before Python finalizes
    sys.setswitchinterval(1000)  # no forced hand-over of the GIL to a thread waiting for it
    while time.monotonic() < issued + 1.5:
        pass

atexit.register(keep_the_gil)
import torch, torch.distributed as dist
from ssl_runtime import distributed
torch.set_num_threads(1)
order, rank = sys.argv[1], int(os.environ["RANK"])

def threads():
    return set(os.listdir("/proc/self/task"))

class WaitsAtExit:  # lets go of the GIL during interpreter exit, as a loader joining its workers does
    def __del__(self, sleep=time.sleep):
        sleep(0.5)

freed_at_exit = WaitsAtExit()
loader = iter(torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1))
next(loader)
threads_before = threads()
ctx = distributed.init_distributed("cpu")

def trained_ddp_model():
    model = distributed.wrap_ddp(torch.nn.Linear(2, 1), ctx)
    model(torch.ones(4, 2)).sum().backward()
    return model

models = [trained_ddp_model() for _ in range(3)]

def all_reduce_without_waiting(grad):
    issue = dist.all_reduce
    dist.all_reduce = lambda tensor, **kwargs: issue(tensor, async_op=True, **kwargs) and None
    distributed.all_reduce_sum_(torch.ones(1))
    dist.all_reduce = issue

def backward_that_all_reduces():
    y = torch.ones(1, requires_grad=True) * 2
    y.register_hook(all_reduce_without_waiting)
    y.sum().backward()

issued = time.monotonic()
if rank == 0:
    backward_that_all_reduces()
else:
    time.sleep(1)
    distributed.all_reduce_sum_(torch.ones(1))
if order == "dropped_before":  # as in an entry point: its locals are gone when main_entry shuts down
    del models, loader
if order == "cycle":  # dropped before shutdown, but only the garbage collector can free them
    cycle = [models, loader]
    cycle.append(cycle)
    del cycle, models, loader
distributed.shutdown()
print({"group_threads_left": len(threads() - threads_before)}, flush=True)
if order == "dropped_after":
    del models, loader
    gc.collect()
# "alive": the models and the loader live until interpreter exit
"""


@pytest.mark.parametrize("order", ["dropped_before", "cycle", "dropped_after", "alive"])
def test_shutdown_ends_the_group_threads_whatever_the_job_still_holds(tmp_path, order):
    script = tmp_path / "teardown_rank.py"
    script.write_text(TEARDOWN_RANK)
    outs = run_two_ranks([sys.executable, str(script), order], hang="a rank hung at teardown")
    assert all("{'group_threads_left': 0}" in out for out in outs), outs
