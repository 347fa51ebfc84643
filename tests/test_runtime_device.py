"""Device and launcher choice, with accelerator availability mocked."""

from __future__ import annotations

import pytest
import torch

from ssl_runtime import device as devices
from ssl_runtime import distributed as dist_utils
from ssl_runtime.errors import UserError


@pytest.fixture
def fake_hardware(monkeypatch):
    def set_available(npu: bool, cuda: bool):
        monkeypatch.setattr(devices, "npu_available", lambda: npu)
        monkeypatch.setattr(devices, "cuda_available", lambda: cuda)
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    return set_available


@pytest.mark.parametrize("npu,cuda,expected", [(True, True, "npu"), (False, True, "cuda"), (False, False, "cpu")])
def test_auto_prefers_npu_then_cuda_then_cpu(fake_hardware, npu, cuda, expected):
    fake_hardware(npu, cuda)
    assert devices.resolve_device("auto") == expected
    assert devices.resolve_device(None) == expected


def test_flag_and_environment_override_auto(fake_hardware, monkeypatch):
    fake_hardware(True, True)
    assert devices.resolve_device("cpu") == "cpu"
    monkeypatch.setenv(devices.DEVICE_ENV, "cuda")
    assert devices.resolve_device("auto") == "cuda"
    assert devices.resolve_device("cpu") == "cpu"  # an explicit flag beats the environment


def test_asking_for_a_missing_accelerator_is_a_clear_error(fake_hardware):
    fake_hardware(False, False)
    with pytest.raises(UserError, match="torch_npu"):
        devices.resolve_device("npu")
    with pytest.raises(UserError, match="--device cpu"):
        devices.resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device"):
        devices.resolve_device("tpu")


def test_backend_follows_device():
    assert [devices.backend_for(k) for k in ("npu", "cuda", "cpu")] == ["hccl", "nccl", "gloo"]


def test_pinned_memory_only_for_accelerators():
    assert devices.loader_kwargs("cpu") == {"pin_memory": False}
    assert devices.loader_kwargs(torch.device("cuda", 0)) == {"pin_memory": True}
    # torch < 2.6 must be told the device; newer ones pin for the current accelerator and warn
    # that pin_memory_device is deprecated
    told = {} if hasattr(torch, "accelerator") else {"pin_memory_device": "npu"}
    assert devices.loader_kwargs("npu") == {"pin_memory": True, **told}


def test_to_device_moves_nested_structures():
    batch = {"a": [torch.ones(1), (torch.zeros(2),)], "b": 3}
    moved = devices.to_device(batch, "cpu")
    assert moved["b"] == 3 and torch.equal(moved["a"][1][0], torch.zeros(2))


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
               "SLURM_NODELIST", "SLURM_JOB_NODELIST", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_plain_python_is_world_size_one(clean_env):
    assert dist_utils.launch_environment() == (0, 1, 0)
    assert dist_utils.launch_environment(local_rank_flag=3) == (0, 1, 3)


def test_torchrun_environment(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    assert dist_utils.launch_environment() == (5, 8, 1)


def test_legacy_launcher_local_rank_flag(clean_env):
    clean_env.setenv("RANK", "2")
    clean_env.setenv("WORLD_SIZE", "4")
    assert dist_utils.launch_environment(local_rank_flag=2) == (2, 4, 2)


def test_slurm_environment(clean_env):
    clean_env.setenv("SLURM_PROCID", "9")
    clean_env.setenv("SLURM_NTASKS", "16")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_NODELIST", "node7")
    assert dist_utils.launch_environment() == (9, 16, 1)
    import os
    assert os.environ["MASTER_ADDR"] == "node7" and os.environ["MASTER_PORT"] == "29500"


def test_both_local_rank_spellings_parse():
    import argparse
    parser = argparse.ArgumentParser()
    dist_utils.add_launcher_args(parser)
    assert parser.parse_args(["--local_rank", "3"]).local_rank == 3
    assert parser.parse_args(["--local-rank=4"]).local_rank == 4
    assert parser.parse_args([]).local_rank == -1


def test_init_without_launcher_runs_single_process(clean_env):
    ctx = dist_utils.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.backend) == (0, 1, False, "gloo")
    assert ctx.is_main and ctx.device == torch.device("cpu")


def test_world_size_above_one_needs_a_rendezvous(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="MASTER_ADDR"):
        dist_utils.init_distributed("cpu")
