"""Running an entry point as a real process, interrupting it, and comparing checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def start_ranks(cmd: list[str], world: int = 2, **extra: str) -> list[subprocess.Popen]:
    """`world` processes of cmd joining one process group on the loopback address (as torchrun's
    workers would), their output piped."""
    port = str(free_port())
    return [subprocess.Popen(cmd, env=dict(env(), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for rank in range(world)]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_and_signal(cmd: list[str], ready: Callable[[str], bool], signum: int,
                   timeout: float = 240) -> tuple[int, str]:
    """Start cmd, send `signum` once ready(output so far) is true; returns (exit code, output)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    sent, deadline = False, time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if not sent and ready("".join(lines)):
            proc.send_signal(signum)
            sent = True
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(timeout=10)
    output = "".join(lines)
    assert sent, "the run ended before it could be interrupted:\n" + output[-3000:]
    return proc.returncode, output


def saved_epoch_step(path: Path) -> tuple[int, int] | None:
    """(epoch, epoch_step) of a checkpoint being written by another process, None if absent."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError):
        return None
    return int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0))


def assert_same_tensors(a, b, what: str) -> None:
    """Equal nested dicts/lists of tensors and numbers (tensors exactly, floats too)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{what} differs (max diff {(a.float() - b.float()).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: keys differ"
        for key in a:
            assert_same_tensors(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{what}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a} != {b}"


SIGKILL, SIGTERM = signal.SIGKILL, signal.SIGTERM
