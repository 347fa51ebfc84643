"""torch_npu.utils: the tensor-combining helper of the fused optimizers."""

from .optim import combine_tensors as npu_combine_tensors  # noqa: F401
