"""Start the processes of a run the way Huawei's Ascend scripts do, on top of torchrun.

    python -m ssl_runtime.launch --nproc_per_node=8 PROGRAM [ARGS...]
    python -m ssl_runtime.launch --nproc_per_node=8 --nnodes=2 --node_rank=R \\
        --master_addr=HOST --master_port=PORT PROGRAM [ARGS...]

Each process (rank) gets what the Ascend scripts' launch loop exports: RANK, LOCAL_RANK and
WORLD_SIZE (from torchrun), RANK_ID (the global rank), RANK_SIZE (the number of ranks; Huawei's
16-device script exports 8, its ranks per node), ASCEND_DEVICE_ID (the device it drives: its local
rank) and OMP_NUM_THREADS=1; on aarch64 servers with enough cores each is bound to its
own block of cores (the scripts' `taskset -c`, nproc / 8 cores per process on 8 devices).

- One process: no torchrun; the program runs on device $ASCEND_DEVICE_ID (default 0).
- Several on one node: `torchrun --standalone` (it picks a free port, so two jobs never collide).
- Several nodes: torchrun's static rendezvous at MASTER_ADDR:MASTER_PORT, node_rank 0 .. nnodes-1.
Every rank starts as `python -m ssl_runtime.launch --as_rank PROGRAM ...`, which sets the
variables above and binds the cores, then replaces itself with the program (same process id,
so torchrun's failure handling still sees it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Mapping

from .errors import UserError, main_entry

# 1: always bind each rank to its block of cores, 0: never; unset: on aarch64 when every rank
# gets at least MIN_CORES_PER_RANK cores (room for its data-loading workers).
CORE_BINDING_ENV = "SSL_CORE_BINDING"
MIN_CORES_PER_RANK = 4


def core_block(cpus: list[int], local_rank: int, local_world_size: int) -> list[int]:
    """The contiguous share of `cpus` for one rank (the Ascend scripts' PID_START..PID_END)."""
    per_rank = len(cpus) // local_world_size
    return sorted(cpus)[local_rank * per_rank:(local_rank + 1) * per_rank]


def should_bind(machine: str, cores_per_rank: int, setting: str | None) -> bool:
    if setting not in (None, "", "0", "1"):
        raise UserError(f"{CORE_BINDING_ENV}={setting!r}: use 1 (bind), 0 (do not bind) or leave it unset")
    if cores_per_rank < 1:
        return False
    if setting in ("0", "1"):
        return setting == "1"
    return machine == "aarch64" and cores_per_rank >= MIN_CORES_PER_RANK


def rank_variables(env: Mapping[str, str]) -> dict[str, str]:
    """The Ascend scripts' per-rank variables, from torchrun's RANK, LOCAL_RANK and WORLD_SIZE."""
    return {"RANK_ID": env["RANK"], "RANK_SIZE": env["WORLD_SIZE"], "ASCEND_DEVICE_ID": env["LOCAL_RANK"],
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}


def single_process_variables(env: Mapping[str, str]) -> dict[str, str]:
    """A one-process run: world size 1 on device $ASCEND_DEVICE_ID (0 when unset)."""
    device = env.get("ASCEND_DEVICE_ID", "") or "0"
    if not device.isdigit():
        raise UserError(f"ASCEND_DEVICE_ID={device!r} is not a device number: e.g. ASCEND_DEVICE_ID=0")
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": device, "LOCAL_WORLD_SIZE": "1",
            "RANK_ID": "0", "RANK_SIZE": "1", "ASCEND_DEVICE_ID": device}


def torchrun_command(python: str, nproc_per_node: int, nnodes: int, node_rank: int,
                     master_addr: str | None, master_port: int, program: list[str]) -> list[str]:
    """The torchrun command line that starts every rank of this node through --as_rank."""
    command = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if nnodes == 1:
        command.append("--standalone")
    else:
        command += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                    f"--master_port={master_port}"]
    return command + ["-m", "ssl_runtime.launch", "--as_rank", *program]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Start a run's processes as the Ascend scripts do.")
    parser.add_argument("--nproc_per_node", type=int, default=1, help="processes (devices) on this node")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--node_rank", type=int, default=0, help="this node's index, 0 .. nnodes-1")
    parser.add_argument("--master_addr", default=None, help="address of node 0 (several nodes)")
    parser.add_argument("--master_port", type=int, default=29680, help="port on node 0 (several nodes)")
    parser.add_argument("--as_rank", action="store_true", help="(internal) set up one rank started by torchrun")
    parser.add_argument("program", help="the Python program to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def _check(args: argparse.Namespace) -> None:
    if args.nproc_per_node < 1 or args.nnodes < 1:
        raise UserError("--nproc_per_node and --nnodes must be at least 1")
    if args.nnodes > 1:
        if not args.master_addr:
            raise UserError("several nodes need the address of node 0: set MASTER_ADDR (the launch "
                            "scripts) or --master_addr")
        if not 0 <= args.node_rank < args.nnodes:
            raise UserError(f"node rank {args.node_rank} is not in 0..{args.nnodes - 1}: set NODE_RANK "
                            f"to 0 on the first node, 1 on the second, ...")


def _bind_cores(env: Mapping[str, str]) -> None:
    if not hasattr(os, "sched_setaffinity"):  # not Linux: nothing to bind with
        return
    cpus = sorted(os.sched_getaffinity(0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(env["LOCAL_RANK"])
    if not should_bind(platform.machine(), len(cpus) // local_world, env.get(CORE_BINDING_ENV)):
        return
    block = core_block(cpus, local_rank, local_world)
    os.sched_setaffinity(0, block)  # inherited by the program and its data-loading workers
    if local_rank == 0:
        print(f"core binding: {len(block)} cores per process (local rank 0: cores "
              f"{block[0]}-{block[-1]})", flush=True)


def _exec(program: list[str]) -> None:
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-u", *program])


@main_entry
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    program = [args.program, *args.args]
    if args.as_rank:  # inside torchrun
        os.environ.update(rank_variables(os.environ))
        _bind_cores(os.environ)
        _exec(program)
    _check(args)
    if args.nproc_per_node * args.nnodes == 1:
        os.environ.update(single_process_variables(os.environ))
        _exec(program)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the Ascend scripts export it (and quiets torchrun)
    command = torchrun_command(sys.executable, args.nproc_per_node, args.nnodes, args.node_rank,
                               args.master_addr, args.master_port, program)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
