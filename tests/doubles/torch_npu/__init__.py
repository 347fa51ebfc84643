"""Test double of the torch_npu package (see tests/doubles/README.md); import it with
tests/doubles on sys.path, as `import torch_npu`.

Like the real package, importing it names torch's PrivateUse1 device "npu" and installs
`torch.npu`; unlike it, there is no NPU behind (torch.npu.is_available() is False).
"""

import torch

from . import npu, optim  # noqa: F401

__version__ = "0.0.0+testdouble"

if torch._C._get_privateuse1_backend_name() != "npu":
    torch.utils.rename_privateuse1_backend("npu")  # once per process, as torch_npu does
if not hasattr(torch, "npu"):
    torch._register_device_module("npu", npu)
else:  # imported again after a test removed it from sys.modules: point torch.npu at this copy
    torch.npu = npu
