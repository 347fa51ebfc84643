"""Test double of the torch_npu package (see tests/doubles/README.md); import it with
tests/doubles on sys.path, as `import torch_npu`.

Like the real package, importing it names torch's PrivateUse1 device "npu", installs `torch.npu`
and registers the "hccl" process-group backend for NPU tensors. Behind it is the emulated device
of tests/doubles/npu_emulator.cpp: torch.npu.is_available() is True, tensors live on npu:0,
npu:1 (host memory, torch's CPU kernels), and hccl is the rule-checking double of
tests/doubles/hccl.py.
"""

import torch

# siblings in tests/doubles, on sys.path wherever this double is importable
import hccl
import npu_emulator

if torch._C._get_privateuse1_backend_name() != "npu":
    torch.utils.rename_privateuse1_backend("npu")  # once per process, as torch_npu does
npu_emulator.load()

from . import npu, optim, utils  # noqa: E402,F401

__version__ = "0.0.0+emulated"

torch._register_device_module("npu", npu)
# Tensor.npu(), Tensor.is_npu, Module.npu(), storage.npu(): what torch_npu adds too
torch.utils.generate_methods_for_privateuse1_backend(for_tensor=True, for_module=True, for_storage=True)
hccl.register()
