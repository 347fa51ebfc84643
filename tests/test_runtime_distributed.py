"""Collective helpers at world size 1 and in a real 2-process gloo group."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_runtime import distributed as dist_utils
from ssl_runtime.errors import main_entry
from ssl_runtime.resilience import Interrupted
from conftest import free_port


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


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 4),
                    reason="torch 2.1's gloo: rank 0 now and then hangs in destroy_process_group "
                           "after its peer exited (seen here; not yet understood, left open)")
@pytest.mark.parametrize("stop", [False, True], ids=["returns", "sigterm"])
def test_an_entry_point_leaves_its_process_group_before_interpreter_exit(tmp_path, stop):
    """Left to interpreter exit, gloo's teardown aborts about one 2-process run in four (SIGABRT),
    so a finished or SIGTERM-stopped entry point destroys the group itself. One group per pair of
    processes, as in a real job (re-joining after a destroy is not something the project does)."""
    mp.spawn(_entry_point_worker, args=(free_port(), stop, str(tmp_path)), nprocs=2, join=True)
    expected = {"exit_code": 143} if stop else {"returned": 2}
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == {**expected, "alive_after": False}
