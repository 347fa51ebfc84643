"""ssl_runtime.launch: the Ascend scripts' per-rank variables, core binding and torchrun, for one
node and for two nodes joined by torchrun's rendezvous (both simulated on this machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from ssl_runtime import launch
from ssl_runtime.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# A rank that reports what it was given, then proves the ranks form one process group.
REPORTING_PROGRAM = """\
import json, os, sys
import torch
import torch.distributed as dist
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK_ID", "RANK_SIZE", "ASCEND_DEVICE_ID", "OMP_NUM_THREADS")
seen = {k: os.environ.get(k) for k in keys}
seen["cores"] = sorted(os.sched_getaffinity(0))
seen["argv"] = sys.argv[1:]
if int(os.environ["WORLD_SIZE"]) > 1:
    dist.init_process_group("gloo")
    value = torch.tensor([float(os.environ["RANK"]) + 1.0])
    dist.all_reduce(value)
    seen["sum"] = value.item()
    dist.destroy_process_group()
out = os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json")
with open(out, "w") as f:
    json.dump(seen, f)
"""


def run_launcher(tmp_path: Path, *flags: str, env: dict | None = None) -> subprocess.Popen:
    program = tmp_path / "report_rank.py"
    program.write_text(REPORTING_PROGRAM)
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK_ID", "RANK_SIZE", "ASCEND_DEVICE_ID", "MASTER_ADDR",
                 "MASTER_PORT", "OMP_NUM_THREADS"):
        if env is None or name not in env:
            environment.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "ssl_runtime.launch", *flags, str(program),
                             str(tmp_path), "--some_flag", "x"], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 180) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


def read_ranks(folder: Path, world: int) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def test_core_blocks_split_the_cores_as_the_ascend_scripts_do():
    cores = list(range(192))  # a Kunpeng server: 24 cores per device
    assert launch.core_block(cores, 0, 8) == list(range(0, 24))
    assert launch.core_block(cores, 7, 8) == list(range(168, 192))
    assert launch.core_block([5, 1, 3, 7], 1, 2) == [5, 7]


@pytest.mark.parametrize("machine, per_rank, setting, expected", [
    ("aarch64", 24, None, True),
    ("aarch64", 2, None, False),   # too few cores for a rank's data-loading workers
    ("x86_64", 24, None, False),   # the scripts bind on aarch64 only
    ("x86_64", 1, "1", True),
    ("aarch64", 24, "0", False),
    ("aarch64", 0, "1", False),    # more ranks than cores: nothing to bind to
])
def test_when_to_bind_cores(machine, per_rank, setting, expected):
    assert launch.should_bind(machine, per_rank, setting) is expected


def test_bad_core_binding_setting_is_a_user_error():
    with pytest.raises(UserError, match="SSL_CORE_BINDING"):
        launch.should_bind("aarch64", 8, "yes")


def test_rank_and_single_process_variables():
    assert launch.rank_variables({"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16"}) == {
        "RANK_ID": "9", "RANK_SIZE": "16", "ASCEND_DEVICE_ID": "1", "OMP_NUM_THREADS": "1"}
    single = launch.single_process_variables({"ASCEND_DEVICE_ID": "3"})
    assert single["LOCAL_RANK"] == "3" and single["WORLD_SIZE"] == "1" and single["RANK_ID"] == "0"
    assert single["RANK_SIZE"] == "1"  # Huawei's ports export RANK_SIZE to every process
    assert launch.single_process_variables({})["ASCEND_DEVICE_ID"] == "0"
    with pytest.raises(UserError, match="ASCEND_DEVICE_ID"):
        launch.single_process_variables({"ASCEND_DEVICE_ID": "npu1"})


def test_torchrun_commands_for_one_and_two_nodes():
    one = launch.torchrun_command("py", 8, 1, 0, None, 29680, ["p.py", "--x"])
    assert one == ["py", "-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone",
                   "-m", "ssl_runtime.launch", "--as_rank", "p.py", "--x"]
    two = launch.torchrun_command("py", 8, 2, 1, "10.0.0.1", 29680, ["p.py"])
    assert two[3:8] == ["--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
                        "--master_port=29680"]


def test_several_nodes_need_the_master_address_and_a_valid_node_rank(tmp_path):
    done = run_launcher(tmp_path, "--nproc_per_node=1", "--nnodes=2")
    out = finish_failing(done)
    assert "MASTER_ADDR" in out
    done = run_launcher(tmp_path, "--nnodes=2", "--node_rank=2", "--master_addr=127.0.0.1")
    assert "node rank 2 is not in 0..1" in finish_failing(done)


def finish_failing(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2, out
    return out


def test_one_process_runs_on_ascend_device_id_without_torchrun(tmp_path):
    finish(run_launcher(tmp_path, "--nproc_per_node=1", env={"ASCEND_DEVICE_ID": "3"}))
    (rank,) = read_ranks(tmp_path, 1)
    assert (rank["RANK"], rank["WORLD_SIZE"], rank["LOCAL_RANK"]) == ("0", "1", "3")
    assert (rank["RANK_ID"], rank["ASCEND_DEVICE_ID"], rank["RANK_SIZE"]) == ("0", "3", "1")
    assert rank["argv"] == [str(tmp_path), "--some_flag", "x"]


@pytest.mark.slow
def test_two_processes_get_the_ascend_variables_and_their_own_cores(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    finish(run_launcher(tmp_path, "--nproc_per_node=2", env={launch.CORE_BINDING_ENV: "1"}))
    ranks = read_ranks(tmp_path, 2)
    for r, rank in enumerate(ranks):
        assert rank["RANK"] == rank["LOCAL_RANK"] == rank["RANK_ID"] == rank["ASCEND_DEVICE_ID"] == str(r)
        assert rank["WORLD_SIZE"] == rank["RANK_SIZE"] == "2" and rank["OMP_NUM_THREADS"] == "1"
        assert rank["sum"] == 3.0  # 1 + 2: both ranks joined one process group
        assert len(rank["cores"]) == len(os.sched_getaffinity(0)) // 2
    assert not set(ranks[0]["cores"]) & set(ranks[1]["cores"])


@pytest.mark.slow
def test_two_nodes_rendezvous_through_torchrun(tmp_path):
    """2 simulated nodes of 1 process each: node_rank 0 and 1 meet at 127.0.0.1:<port>."""
    port = str(free_port())
    nodes = [run_launcher(tmp_path, "--nproc_per_node=1", "--nnodes=2", f"--node_rank={node}",
                          "--master_addr=127.0.0.1", f"--master_port={port}") for node in (0, 1)]
    for node in nodes:
        finish(node)
    ranks = read_ranks(tmp_path, 2)
    assert [rank["RANK"] for rank in ranks] == ["0", "1"]
    assert [rank["LOCAL_RANK"] for rank in ranks] == ["0", "0"]  # one device on each node
    assert [rank["RANK_ID"] for rank in ranks] == ["0", "1"]
    assert all(rank["WORLD_SIZE"] == rank["RANK_SIZE"] == "2" and rank["sum"] == 3.0 for rank in ranks)
