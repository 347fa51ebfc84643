"""Which torch stacks the code supports, checked without importing torch.

The code needs torch >= 2.1 (it calls torch.autocast(device_type=...), DataLoader(pin_memory_device=
...), torch._foreach_lerp_ / _foreach_norm, Module.register_load_state_dict_post_hook, ...). On
Ascend, torch_npu pins the torch it was built for, and CANN pins torch_npu; the pairs below are
the ones our requirement files install (read from the torch_npu wheels' metadata and READMEs).

    python -m ssl_runtime       # prints what this interpreter lacks and the pip command that
                                # adds it without touching torch (ssl_runtime/__main__.py)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys

MIN_TORCH = (2, 1)
# What the programs import; torch_npu is optional (Ascend only).
REQUIRED_MODULES = ("torch", "torchvision", "timm", "yacs")
# pip names of the modules that are not torch's own (installing them never touches torch)
PIP_NAMES = {"timm": "timm>=1.0.9,<2", "yacs": "yacs==0.1.8"}

# torch_npu release -> (torch, torchvision, CANN, our requirement file)
NPU_STACKS = {
    "2.1.0.post17": ("2.1.0", "0.16.0", "CANN 8.3.RC1", "test/requirements_npu_2.1.txt"),
    "2.14.0": ("2.14.0", "0.29.0", "the CANN release in torch_npu 2.14.0's compatibility table",
               "test/requirements_npu_2.14.txt"),
}


def installed_version(distribution: str) -> str | None:
    """The version pip installed (from its metadata), or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def major_minor(version: str) -> tuple[int, int] | None:
    """(2, 1) for '2.1.0+cpu' or '2.1.0a0+git1234'; None when it does not start with X.Y."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def stacks_text() -> str:
    """One line per supported torch_npu stack."""
    return "; ".join(f"torch_npu {npu} with torch {torch_v} and torchvision {vision} ({cann}; {path})"
                     for npu, (torch_v, vision, cann, path) in NPU_STACKS.items())


def torch_problem(version: str | None) -> str | None:
    """Why this torch cannot run the code, or None when it can (or is not installed: importing it
    then says so itself)."""
    parsed = major_minor(version) if version else None
    if parsed is None or parsed >= MIN_TORCH:
        return None
    return (f"torch {version} is installed, but this code needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
            f"(torch 1.x and 2.0 lack APIs it calls). Install a supported stack: requirements.txt "
            f"(PyPI), or on Ascend {stacks_text()}. 1.8_requirements.txt and 1.11_requirements.txt "
            f"explain why older Ascend stacks are not supported.")


def require_supported_torch() -> None:
    """Stop with one clear line when the installed torch is too old (called on import of the
    package, before any module that needs torch >= 2.1 is loaded)."""
    problem = torch_problem(installed_version("torch"))
    if problem:
        sys.stderr.write(f"error: {problem}\n")
        raise SystemExit(2)


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision release series built for a torch 2.x release ('0.16.*' for torch 2.1)."""
    parsed = major_minor(torch_version)
    if parsed is None or parsed[0] != 2:
        return None
    return f"0.{parsed[1] + 15}.*"


def missing_modules(names=REQUIRED_MODULES) -> list[str]:
    """The modules this interpreter cannot find (found, not imported: importing torch is slow)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def install_advice(python: str, missing: list[str]) -> str:
    """What to run so that `python` gets the missing packages while its torch stays as it is."""
    torch_version = installed_version("torch")
    npu_version = installed_version("torch_npu") or installed_version("torch-npu")
    have = f"torch {torch_version}" + (f" and torch_npu {npu_version}" if npu_version else "")
    packages = []
    for name in missing:
        if name == "torchvision":
            series = matching_torchvision(torch_version or "")
            packages.append(f"torchvision=={series}" if series else "torchvision")
        else:
            packages.append(PIP_NAMES.get(name, name))
    # Naming the installed torch in the same command keeps pip from replacing it.
    pin = f"torch=={torch_version}" if torch_version else ""
    command = " ".join(f"'{p}'" for p in [*packages, pin] if p)
    lines = [f"{python} has {have} but lacks {', '.join(missing)}.",
             "The launch scripts never replace an environment's torch or torch_npu. Add the missing "
             "packages to it, keeping its torch:",
             f"    {python} -m pip install {command}"]
    if "torchvision" in missing and npu_version and torch_version and "+cpu" in torch_version:
        lines.append("    (x86 with torch_npu: take torchvision's +cpu build from PyTorch's CPU index, as "
                     "torch_npu's README does for torch)")
    lines.append("Or name another interpreter with SSL_PYTHON=/path/to/python.")
    return "\n".join(lines)
