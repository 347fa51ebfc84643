"""Teardown stress check: repeat the 2-process runs whose exit used to abort now and then, and count
the failures per case and thread count (0 expected). Not part of .ci/run: it takes an hour or more.

    SSL_PYTHON=.venv/bin/python python3 tests/stress_teardown.py              # 50 of each, 1 and 2 threads
    SSL_PYTHON=.venv/bin/python python3 tests/stress_teardown.py --reps 5 --threads 1 --cases collective

A repetition starts two fresh rank processes of the interpreter SSL_PYTHON (default: the one running
this script) on the loopback address, as torchrun's workers would, with OMP_NUM_THREADS set, and fails
when a rank exits non-zero or by a signal (SIGABRT: "terminate called without an active exception"),
hangs past --timeout, or did not write what its case writes. Cases:
  collective     tests/test_runtime_distributed.py's 2-process collective test (a DDP model still alive
                 at shutdown)
  entry_returns  tests/test_runtime_distributed.py's entry-point test: an entry point that returns
  entry_sigterm  the same, stopped as an agreed SIGTERM stops it (SystemExit 143)
  dino_epoch     dino/main_dino.py: one epoch of a tiny ViT on tiny images, a loader worker per rank
  moby_epoch     moby/main_moby.py: the same with a tiny Swin
This script needs only the standard library; everything else runs in the rank processes.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("SSL_PYTHON") or sys.executable

DINO_TINY = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--local_crop_size", "16",
             "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4", "--epochs", "1",
             "--warmup_epochs", "0", "--use_fp16", "false", "--num_workers", "1", "--device", "cpu"]
MOBY_TINY = ["--cfg", str(ROOT / "configs" / "moby_swin_cpu.yaml"), "--batch-size", "4", "--epochs", "1",
             "--tag", "t", "--device", "cpu", "--opts", "MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS",
             "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]", "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "32",
             "DATA.NUM_WORKERS", "1", "TRAIN.WARMUP_EPOCHS", "0"]


def worker_call(function: str, *args: object) -> list[str]:
    """A rank that runs `function(rank, port, *args)` from tests/test_runtime_distributed.py."""
    code = (f"import ast, os, sys; from tests.test_runtime_distributed import {function}; "
            f"{function}(int(os.environ['RANK']), int(os.environ['MASTER_PORT']), "
            "*ast.literal_eval(sys.argv[1]))")
    return [PYTHON, "-c", code, repr(args)]


def case_command(case: str, data: Path, out: Path) -> list[str]:
    if case == "collective":
        return worker_call("_worker", str(out))
    if case in ("entry_returns", "entry_sigterm"):
        return worker_call("_entry_point_worker", case == "entry_sigterm", str(out))
    if case == "dino_epoch":
        return [PYTHON, str(ROOT / "dino" / "main_dino.py"), *DINO_TINY, "--data_path", str(data),
                "--output_dir", str(out)]
    if case == "moby_epoch":
        return [PYTHON, str(ROOT / "moby" / "main_moby.py"), "--data-path", str(data), "--output", str(out),
                *MOBY_TINY]
    raise ValueError(case)


def case_wrote(case: str, out: Path) -> bool:
    """Whether the run did its work: what rank 0 (or both ranks) write at the end."""
    if case in ("collective", "entry_returns", "entry_sigterm"):
        return all((out / f"rank{rank}.pt").exists() for rank in (0, 1))
    return any(out.rglob("checkpoint.pth"))


CASES = ("collective", "entry_returns", "entry_sigterm", "dino_epoch", "moby_epoch")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_once(case: str, threads: int, data: Path, timeout: float) -> str:
    """'' when both ranks exit cleanly having done their work, else what went wrong."""
    with tempfile.TemporaryDirectory() as out:
        port = str(free_port())
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
                   PYTHONUNBUFFERED="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        ranks = [subprocess.Popen(case_command(case, data, Path(out)), cwd=ROOT, text=True,
                                  env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for rank in (0, 1)]
        deadline, errors = time.monotonic() + timeout, []
        for rank in ranks:
            try:
                errors.append(rank.communicate(timeout=max(1.0, deadline - time.monotonic()))[1])
            except subprocess.TimeoutExpired:
                for proc in ranks:
                    proc.kill()
                return f"hung for {timeout:.0f} s"
        codes = [rank.returncode for rank in ranks]  # entry_sigterm too: its worker catches the exit
        if codes != [0, 0]:
            last = [line for text in errors for line in text.splitlines() if line.strip()][-1:]
            return f"exit codes {codes}: {last[0][:160] if last else ''}"
        if not case_wrote(case, Path(out)):
            return "exited cleanly without writing its results"
        return ""


def make_data(root: Path) -> Path:
    """16 training images of 32x32 (2 steps of 2 ranks x 4 images), written by the interpreter under test."""
    code = "import sys; from pathlib import Path; from tests.conftest import make_imagefolder; " \
           "make_imagefolder(Path(sys.argv[1]), classes=2, per_class=8)"
    subprocess.run([PYTHON, "-c", code, str(root)], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50, help="repetitions of each case (default 50)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="OMP_NUM_THREADS values (default 1 2)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before a repetition counts as hung (default 300)")
    args = parser.parse_args(argv)
    version = subprocess.run([PYTHON, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    print(f"interpreter {PYTHON}, torch {version}, {args.reps} repetitions per case", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data")
        for threads in args.threads:
            for case in args.cases:
                start, failures = time.monotonic(), 0
                for rep in range(args.reps):
                    problem = run_once(case, threads, data, args.timeout)
                    if problem:
                        failures += 1
                        print(f"  {case} threads={threads} rep {rep + 1}: {problem}", flush=True)
                    elif (rep + 1) % 10 == 0:
                        print(f"  {case} threads={threads}: {rep + 1} done", flush=True)
                seconds = (time.monotonic() - start) / max(args.reps, 1)
                results.append((case, threads, failures))
                print(f"{case:14s} threads={threads}: {failures} of {args.reps} failed "
                      f"({seconds:.1f} s each)", flush=True)
    print("\ncase            threads  failed")
    for case, threads, failures in results:
        print(f"{case:14s}  {threads:7d}  {failures}/{args.reps}")
    return 1 if any(failures for _, _, failures in results) else 0


if __name__ == "__main__":
    sys.exit(main())
