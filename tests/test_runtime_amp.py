"""AMP level mapping onto torch.autocast and the device's GradScaler."""

from __future__ import annotations

import pytest
import torch

from ssl_runtime.amp import MixedPrecision, NullScaler
from ssl_runtime.errors import UserError

# torch.amp.GradScaler in recent torch, torch.cuda.amp.GradScaler in torch 2.1
CUDA_SCALER = getattr(torch.amp, "GradScaler", None) or torch.cuda.amp.GradScaler
# On machines without a GPU, torch warns that the CUDA GradScaler it builds is disabled: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*CUDA is not available")


def test_o0_is_plain_fp32():
    mp = MixedPrecision.from_level("O0", "cuda")
    assert mp.dtype == torch.float32 and not mp.enabled and isinstance(mp.scaler, NullScaler)


@pytest.mark.parametrize("level", ["O1", "O2", "o1"])
def test_o1_o2_on_gpu_use_fp16_with_grad_scaler(level):
    mp = MixedPrecision.from_level(level, "cuda")
    assert mp.dtype == torch.float16 and mp.enabled
    assert isinstance(mp.scaler, CUDA_SCALER)


def test_cpu_defaults_to_fp32_and_bf16_is_selectable(monkeypatch):
    monkeypatch.delenv("SSL_CPU_AMP", raising=False)
    assert MixedPrecision.from_level("O1", "cpu").dtype == torch.float32
    bf16 = MixedPrecision.from_level("O1", "cpu", cpu_dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and isinstance(bf16.scaler, NullScaler)
    monkeypatch.setenv("SSL_CPU_AMP", "bf16")
    assert MixedPrecision.from_level("O2", "cpu").dtype == torch.bfloat16
    with pytest.raises(UserError, match="fp32 or bf16"):
        MixedPrecision.from_level("O1", "cpu", cpu_dtype="fp16")


def test_use_fp16_flag_maps_to_o1_or_o0():
    assert MixedPrecision.from_flag(True, "cuda").dtype == torch.float16
    assert MixedPrecision.from_flag(False, "cuda").dtype == torch.float32


def test_autocast_really_changes_the_compute_dtype():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with MixedPrecision.from_level("O1", "cpu", cpu_dtype="bf16").autocast():
        assert layer(x).dtype == torch.bfloat16
    with MixedPrecision.from_level("O1", "cpu").autocast():
        assert layer(x).dtype == torch.float32


def test_bad_level_and_missing_apex_are_clear_errors():
    with pytest.raises(UserError, match="O0, O1, O2"):
        MixedPrecision.from_level("O3", "cuda")
    with pytest.raises(UserError, match="apex"):
        MixedPrecision.from_level("O1", "cuda", use_apex=True)


def test_null_scaler_steps_the_optimizer():
    param = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([param], lr=0.5)
    scaler = NullScaler()
    scaler.scale((param * 2).sum()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert param.item() == pytest.approx(0.0)
