"""The CPU layout: data workers and torch threads planned together (ssl_runtime/cpu_layout.py)."""

from __future__ import annotations

import torch

from ssl_runtime.cpu_layout import AUTO_WORKERS, plan_workers, set_cpu_threads, usable_cores


def test_automatic_workers_per_device_and_pipeline():
    assert plan_workers(AUTO_WORKERS, "cuda", 10, light_pipeline=False) == 10  # upstream's count
    assert plan_workers(AUTO_WORKERS, "npu", 8, light_pipeline=True) == 8
    assert plan_workers(AUTO_WORKERS, "cpu", 10, light_pipeline=True, cores=8) == 0  # main process
    assert plan_workers(AUTO_WORKERS, "cpu", 10, light_pipeline=False, cores=8) == 4  # half the cores
    assert plan_workers(AUTO_WORKERS, "cpu", 10, light_pipeline=False, cores=1) == 1
    assert plan_workers(3, "cpu", 10, light_pipeline=True, cores=8) == 3  # an explicit count is kept
    assert plan_workers(0, "cuda", 10, light_pipeline=False) == 0


def test_threads_take_the_cores_the_workers_leave(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        line = set_cpu_threads("cpu", 1, cores=3)
        assert torch.get_num_threads() == 2 and "2 torch threads (cores - workers)" in line
        assert "1 worker processes" in line
        set_cpu_threads("cpu", 5, cores=3)
        assert torch.get_num_threads() == 1  # never fewer than one
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        line = set_cpu_threads("cpu", 0, cores=3)
        assert torch.get_num_threads() == 1 and "(OMP_NUM_THREADS)" in line  # the user's choice wins
        assert "main process" in line
        torch.set_num_threads(1)
        assert "workers per process" in set_cpu_threads("cuda", 4) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_ranks_of_a_node_share_its_cores(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = usable_cores()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert usable_cores() == max(alone // 2, 1)
