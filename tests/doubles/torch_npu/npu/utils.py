"""torch_npu.npu.utils: what the chip supports. The emulated chip has no inf/nan mode (as Atlas
training chips before the 910B), so torch_npu's GradScaler agrees on overflows across ranks;
NPU_EMULATOR_INF_NAN=1 emulates a 910B's inf/nan mode instead."""

import os


def is_support_inf_nan() -> bool:
    return os.environ.get("NPU_EMULATOR_INF_NAN", "0") == "1"


def is_bf16_supported() -> bool:
    return True
