"""Shared fixtures: tiny ImageFolder datasets and a CPU context."""

from __future__ import annotations

import builtins
import importlib
import io
import signal
import socket
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_runtime.distributed import single_process_context

DOUBLES = Path(__file__).resolve().parent / "doubles"


def run_entry_quietly(entry, argv: list[str]) -> str:
    """Run a program's main(argv) in this process and return what it printed. DINO's entry points
    replace builtins.print (only rank 0 prints): it is put back afterwards."""
    saved, buffer = builtins.print, io.StringIO()
    try:
        with redirect_stdout(buffer):
            entry(argv)
    finally:
        builtins.print = saved
    return buffer.getvalue()


def make_imagefolder(root: Path, classes: int = 3, per_class: int = 8, size: int = 32,
                     splits=("train", "val"), seed: int = 0) -> Path:
    """Write a small ImageFolder dataset whose classes differ in brightness pattern (learnable)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size), dtype=np.float64)
                base[:, c * size // classes:(c + 1) * size // classes] = 200.0
                noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(noisy, mode="L").save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "data")


@pytest.fixture
def cpu_ctx():
    return single_process_context("cpu")


def free_port() -> int:
    """A free TCP port on the loopback address, for the rendezvous of multi-process tests."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def fp32_on_every_cpu(monkeypatch):
    """Mixed precision on CPU follows the CPU (bf16 where it is native, ssl_runtime.amp): the suite
    pins fp32 so that its numbers are the same on every machine. Tests of the bf16 path set
    SSL_CPU_AMP themselves or inject the CPU's features."""
    monkeypatch.setenv("SSL_CPU_AMP", "fp32")


@pytest.fixture(autouse=True)
def restore_sigterm_handler():
    """A training run that stops with an exception leaves its SIGTERM handler installed: undo it."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


_TORCH_NPU_MODULES: dict = {}  # the double's modules, imported once per process


def pytest_sessionstart(session):
    """Register the emulated NPU devices before any test runs a backward pass: torch's autograd
    engine sizes its per-device queues once, at its first backward, from the devices registered
    then, and a device added later fails its first backward (INTERNAL ASSERT device_ready_queues_).
    torch.npu comes with the device, as with the real torch_npu: once an accelerator is registered,
    torch (2.14's optimizers, torch.accelerator) asks for its device module. The torch_npu double
    is imported here and then hidden: `import torch_npu` finds it only in tests that use the fixture
    below, so the product's NPU detection sees no torch_npu elsewhere."""
    sys.path.insert(0, str(DOUBLES))
    try:
        importlib.import_module("torch_npu")
    except RuntimeError as exc:  # no compiler: the tests that need the device fail with this
        _EMULATOR_ERROR.append(exc)
    finally:
        sys.path.remove(str(DOUBLES))
        _hide_torch_npu()


_EMULATOR_ERROR: list = []


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """`import torch_npu` finds the double (tests/doubles/torch_npu: the emulated NPU, see
    tests/doubles/README.md) for the test's duration; other tests find no torch_npu. The double is
    imported once per process (torch keeps its device module and the emulated device for good)."""
    if _EMULATOR_ERROR:
        pytest.fail(f"the emulated NPU could not be built: {_EMULATOR_ERROR[0]}")
    monkeypatch.syspath_prepend(str(DOUBLES))
    if _TORCH_NPU_MODULES:
        sys.modules.update(_TORCH_NPU_MODULES)
    module = importlib.import_module("torch_npu")
    yield module
    _hide_torch_npu()


def _hide_torch_npu() -> None:
    """Take the torch_npu double out of sys.modules, kept for the next fake_torch_npu."""
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        module = sys.modules.pop(name)
        if module is not None:  # None: a test's stand-in for a broken install
            _TORCH_NPU_MODULES[name] = module
