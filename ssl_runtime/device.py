"""Which accelerator to run on, and the few device-specific calls the project needs.

Order of preference: Ascend NPU (when torch_npu imports and sees a device), then CUDA, then CPU.
`--device` or the SSL_DEVICE environment variable override the automatic choice.

On an Ascend machine (CANN's environment is set, CANN is installed in its usual place, or torch_npu
is installed) a torch_npu that does not import is an error, never a silent CPU run: the message
carries the import error and the versions that go together. `--device cpu` still runs on the CPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import warnings
from typing import Any

import torch

from .compat import compile_in_place
from .errors import UserError, main_entry
from .misc import bool_flag
from .torch_stack import stacks_text

DEVICE_ENV = "SSL_DEVICE"
DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}

# Set by CANN's set_env.sh (toolkit, nnae or the newer cann layout).
ASCEND_ENV_VARS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "ASCEND_OPP_PATH")
# Where CANN installs itself when nobody sourced it.
ASCEND_INSTALL_MARKS = ("/etc/Ascend/ascend_cann_install.info", "/usr/local/Ascend/ascend-toolkit",
                        "/usr/local/Ascend/nnae", "/usr/local/Ascend/cann")

# Operator compilation on NPU (the Ascend port's --bin): 1 = binary (precompiled) operators, i.e.
# torch.npu.set_compile_mode(jit_compile=False); 0 = online compilation; unset = torch_npu's default.
NPU_BINARY_ENV = "SSL_NPU_BINARY"
# torch.npu.set_option entries the Ascend MoBY port applies; each is on unless its variable is 0.
NPU_OPTION_SWITCHES = {
    "SSL_NPU_LAYERNORM_HIGH_PERF": {"ACL_OP_SELECT_IMPL_MODE": "high_performance",
                                    "ACL_OPTYPELIST_FOR_IMPLMODE": "LayerNorm"},
    "SSL_NPU_MM_BMM_ND": {"MM_BMM_ND_ENABLE": "enable"},
}


class _BinaryOperatorsFlag(argparse.Action):
    """`--bin True|False`: stored in SSL_NPU_BINARY, which bind_device applies on NPU."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        os.environ[NPU_BINARY_ENV] = "1" if values else "0"


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES,
        help=f"accelerator to use; 'auto' picks npu, then cuda, then cpu (env {DEVICE_ENV} overrides auto)",
    )
    parser.add_argument(
        "--bin", default=None, type=bool_flag, action=_BinaryOperatorsFlag, metavar="True|False",
        help=f"(Ascend port) NPU only: True runs torch_npu's binary operators (set_compile_mode("
             f"jit_compile=False), much faster start on Atlas training chips), False compiles online; "
             f"default: torch_npu's own choice (env {NPU_BINARY_ENV}=1|0 does the same)",
    )


def _import_torch_npu() -> tuple[Any | None, BaseException | None]:
    """(torch_npu, None), or (None, the error): torch_npu exists only on Ascend machines."""
    try:
        return importlib.import_module("torch_npu"), None
    except Exception as exc:  # ImportError, or CANN libraries missing at load time
        return None, exc


def npu_problem() -> str | None:
    """None when torch_npu imports and sees an NPU; otherwise what is wrong, in words."""
    module, error = _import_torch_npu()
    if module is None:
        if isinstance(error, ModuleNotFoundError) and error.name == "torch_npu":
            return "torch_npu is not installed"
        return f"torch_npu does not import ({type(error).__name__}: {error})"
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available() or npu.device_count() == 0:
        return "torch_npu imports but sees no NPU (check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES)"
    return None


def npu_available() -> bool:
    return npu_problem() is None


def ascend_sign() -> str | None:
    """Why this looks like an Ascend machine, or None when nothing says so."""
    for name in ASCEND_ENV_VARS:
        if os.environ.get(name):
            return f"{name} is set by CANN's set_env.sh"
    for path in ASCEND_INSTALL_MARKS:
        if os.path.exists(path):
            return f"CANN is installed ({path})"
    if importlib.util.find_spec("torch_npu") is not None:
        return "torch_npu is installed"
    return None


def npu_failure(why: str) -> str:
    """The message for an NPU run that cannot start: the cause and the fix."""
    return (f"{why}, but {npu_problem()}. Fix: source CANN's set_env.sh before Python (the test/ "
            f"scripts do it; CANN_SET_ENV=/path/to/set_env.sh names another one) and install the "
            f"torch_npu built for your torch and CANN: {stacks_text()}. To run on the CPU anyway, "
            f"use --device cpu.")


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def resolve_device(requested: str | None = None) -> str:
    """Return 'npu', 'cuda' or 'cpu' for a request of auto/None/npu/cuda/cpu."""
    request = (requested or "auto").lower()
    if request == "auto":
        request = os.environ.get(DEVICE_ENV, "auto").lower() or "auto"
    if request not in DEVICE_CHOICES:
        raise UserError(f"unknown device {request!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if request == "auto":
        if npu_available():
            return "npu"
        sign = ascend_sign()
        if sign is not None:  # never a silent CPU run on an Ascend machine
            raise UserError(npu_failure(f"this is an Ascend machine ({sign})"))
        return "cuda" if cuda_available() else "cpu"
    if request == "npu" and not npu_available():
        raise UserError(npu_failure("--device npu was asked for"))
    if request == "cuda" and not cuda_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return request


def npu_options() -> dict[str, str]:
    """The torch.npu.set_option entries switched on (see NPU_OPTION_SWITCHES)."""
    options: dict[str, str] = {}
    for variable, entries in NPU_OPTION_SWITCHES.items():
        if os.environ.get(variable, "1") != "0":
            options.update(entries)
    return options


def configure_npu() -> None:
    """Operator compilation mode and NPU options, before the first operator runs (as the Ascend
    ports do at start-up). Each call is skipped when this torch_npu lacks it."""
    npu = torch.npu  # type: ignore[attr-defined]
    binary = os.environ.get(NPU_BINARY_ENV, "")
    if binary not in ("", "0", "1"):
        raise UserError(f"{NPU_BINARY_ENV}={binary!r}: use 1 (binary operators) or 0 (online compilation)")
    if binary and hasattr(npu, "set_compile_mode"):
        npu.set_compile_mode(jit_compile=binary == "0")
    options = npu_options()
    if options and hasattr(npu, "set_option"):
        with warnings.catch_warnings():
            # torch_npu 2.1-2.14 announce that the implementation-mode options may go away; they
            # are applied as the Ascend port applies them (SSL_NPU_LAYERNORM_HIGH_PERF=0 skips them)
            warnings.filterwarnings("ignore", message=".*will be deprecated.*")
            npu.set_option(options)


def backend_for(kind: str) -> str:
    """The torch.distributed backend that matches a device kind."""
    return BACKENDS[kind]


def bind_device(kind: str, local_rank: int) -> torch.device:
    """Bind this process to its accelerator (one per local rank) and return the torch.device."""
    if kind == "npu":
        configure_npu()
    elif os.environ.get(NPU_BINARY_ENV) and local_rank == 0:
        print(f"note: --bin / {NPU_BINARY_ENV} chooses NPU operator binaries; no effect on {kind}")
    if kind == "cpu":
        return torch.device("cpu")
    count = _module(kind).device_count()
    if local_rank >= count:
        raise UserError(f"local rank {local_rank} has no {kind} device (only {count} visible): "
                        f"launch at most {count} processes per node")
    _module(kind).set_device(local_rank)
    return torch.device(kind, local_rank)


def _module(kind: str) -> Any:
    return torch.npu if kind == "npu" else torch.cuda  # type: ignore[attr-defined]


def device_kind(device: torch.device | str) -> str:
    """'cuda' for torch.device('cuda', 1) or 'cuda:1'; works for 'npu' before torch_npu is loaded."""
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def synchronize(device: torch.device | str) -> None:
    kind = device_kind(device)
    if kind in ("cuda", "npu"):
        _module(kind).synchronize()


def max_memory_mb(device: torch.device | str) -> float:
    """Peak memory allocated on the device since start (0 on CPU, where torch does not track it)."""
    kind = device_kind(device)
    if kind in ("cuda", "npu"):
        return _module(kind).max_memory_allocated() / 2**20
    return 0.0


def reset_peak_memory(device: torch.device | str) -> None:
    kind = device_kind(device)
    if kind in ("cuda", "npu"):
        _module(kind).reset_peak_memory_stats()


def loader_kwargs(device: torch.device | str) -> dict:
    """DataLoader settings for fast host-to-device copies (pinned memory on the right device)."""
    kind = device_kind(device)
    if kind == "cpu":
        return {"pin_memory": False}
    if kind == "npu" and not hasattr(torch, "accelerator"):
        # torch < 2.6 pins for CUDA unless told; newer ones pin for the current accelerator and
        # deprecate pin_memory_device (a UserWarning at every epoch's loader)
        return {"pin_memory": True, "pin_memory_device": "npu"}
    return {"pin_memory": True}


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move a tensor or a (nested) list/tuple/dict of tensors, without blocking the host."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def exact_float_dtype(kind: str) -> torch.dtype:
    """float64 where the device computes it (CPU, CUDA); float32 on NPU, whose kernels mostly
    lack double precision. The batched augmentation emulates C's double arithmetic with it."""
    return torch.float32 if kind == "npu" else torch.float64


def set_fast_math(kind: str) -> None:
    """Allow TF32 matmuls on CUDA (what upstream's cudnn.benchmark runs get); nothing elsewhere."""
    if kind == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def compile_module(module: torch.nn.Module, kind: str) -> bool:
    """torch.compile a module in place (its state-dict keys stay the same); one graph per input
    shape, since multi-crop training feeds a fixed set of resolutions. Not on NPU, where
    torch_npu's compiler support varies by release: a warning, and the module runs eagerly."""
    if kind == "npu":
        import warnings

        warnings.warn("--compile is ignored on NPU: the model runs eagerly", stacklevel=2)
        return False
    compile_in_place(module, dynamic=False)
    return True


def describe(kind: str) -> str:
    if kind == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return f"{kind}: {_module(kind).get_device_name()} x{_module(kind).device_count()}"


@main_entry
def main(argv: list[str] | None = None) -> None:
    """`python -m ssl_runtime.device [--device D]`: print the device a run would use, or why it
    cannot start (exit code 2). The launch scripts ask this before starting anything."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    add_device_arg(parser)
    print(resolve_device(parser.parse_args(argv).device))


if __name__ == "__main__":
    main()
