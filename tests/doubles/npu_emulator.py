"""Build (once per torch release and source version, cached) and load the emulated NPU device of
npu_emulator.cpp.

`load()` compiles the C++ file with torch.utils.cpp_extension (g++, about 25 s on two cores) into
.build/npu-emulator/torch-<version>/ at the top of the repository (NPU_EMULATOR_BUILD_DIR names
another folder), and later loads that build directly while the source is unchanged. Call it
after torch.utils.rename_privateuse1_backend("npu") (the torch_npu double does both).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("npu_emulator.cpp")
ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR_ENV = "NPU_EMULATOR_BUILD_DIR"
DEVICES_ENV = "NPU_EMULATOR_DEVICES"  # devices per process, 2 unless set (read by the C++ side)
NAME = "npu_emulator"


def build_dir() -> Path:
    base = Path(os.environ.get(BUILD_DIR_ENV) or ROOT / ".build" / "npu-emulator")
    return base / f"torch-{torch.__version__.replace('+', '-')}"


def _fingerprint() -> str:
    return hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()


def build() -> Path:
    """The shared library for this torch, compiled now unless an up-to-date build exists."""
    folder = build_dir()
    stamp = folder / "built.txt"  # the source's fingerprint, then the library's path
    if stamp.is_file():
        fingerprint, _, library = stamp.read_text().partition("\n")
        if fingerprint == _fingerprint() and Path(library).is_file():
            return Path(library)
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"the emulated NPU is a C++ extension built on first use, and {' and '.join(missing)} "
                           "is not on PATH: install a C++ compiler and ninja (Debian: apt-get install g++ "
                           "ninja-build; or pip install ninja)")
    folder.mkdir(parents=True, exist_ok=True)
    # cpp_extension warns at import that this machine has no CUDA runtime: irrelevant here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    # a plain shared library (no Python module): its static registrations do the work
    cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=str(folder),
                       is_python_module=False, extra_cflags=["-O1"], verbose=False)
    library = folder / f"{NAME}.so"  # the name of a first build in a process (later ones get _vN)
    stamp.write_text(f"{_fingerprint()}\n{library}")
    return library


def load():
    """The emulator's operators (torch.ops.npu_emulator), built and loaded on first use."""
    if not _loaded():
        torch.ops.load_library(str(build()))
    return torch.ops.npu_emulator


def _loaded() -> bool:
    try:
        torch.ops.npu_emulator.device_count
    except (AttributeError, RuntimeError):
        return False
    return True
