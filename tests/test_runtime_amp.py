"""AMP level mapping onto torch.autocast and the device's GradScaler."""

from __future__ import annotations

import pytest
import torch

from ssl_runtime import amp
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


# /proc/cpuinfo excerpts: x86 flags lines (abridged) and an Arm Features line
ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8 avx512_bf16\n"
SKYLAKE_X = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd aes sha2 crc32 atomics sve bf16 i8mm\nCPU implementer\t: 0x41\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd aes sha2 crc32 atomics asimddp\n"


def on_cpu(monkeypatch, cpuinfo: str | None) -> None:
    """This host's /proc/cpuinfo replaced by `cpuinfo` (None: no such file), SSL_CPU_AMP unset."""
    monkeypatch.setattr(amp, "_host_cpuinfo", lambda: cpuinfo)
    monkeypatch.delenv("SSL_CPU_AMP", raising=False)


@pytest.mark.parametrize("cpuinfo, feature", [(ZEN4, "avx512_bf16"), (SAPPHIRE_RAPIDS, "amx_bf16"),
                                              (GRAVITON3, "bf16"), (SKYLAKE_X, None), (GRAVITON2, None),
                                              ("", None)])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, feature):
    assert amp.native_bf16_feature(cpuinfo) == feature


def test_this_hosts_cpuinfo_is_what_decides_by_default():
    text = amp.CPU_INFO.read_text() if amp.CPU_INFO.exists() else None
    if text is None:
        pytest.skip("no /proc/cpuinfo on this system")
    expected = next((f for f in amp.NATIVE_BF16_FEATURES if f in amp.cpu_features(text)), None)
    assert amp.native_bf16_feature() == expected


def test_mixed_precision_on_a_bf16_cpu_is_bf16_autocast_and_says_why(monkeypatch):
    on_cpu(monkeypatch, ZEN4)
    for mp in (MixedPrecision.from_level("O1", "cpu"), MixedPrecision.from_level("O2", "cpu"),
               MixedPrecision.from_flag(True, "cpu")):  # DINO's default: --use_fp16 true, --amp_dtype fp16
        assert mp.dtype == torch.bfloat16 and mp.enabled and isinstance(mp.scaler, NullScaler)
    assert mp.precision_line() == ("precision: bf16 autocast on cpu (the CPU has avx512_bf16; "
                                   "SSL_CPU_AMP=fp32 to turn it off)")


def test_mixed_precision_on_a_cpu_without_bf16_stays_fp32_and_says_why(monkeypatch):
    on_cpu(monkeypatch, SKYLAKE_X)
    mp = MixedPrecision.from_level("O1", "cpu")
    assert mp.dtype == torch.float32 and not mp.enabled
    assert mp.precision_line().startswith("precision: fp32 on cpu (no native bf16 on this CPU (none of "
                                          "amx_bf16, avx512_bf16, bf16)")
    assert "SSL_CPU_AMP=bf16 to use it anyway" in mp.precision_line()
    on_cpu(monkeypatch, None)  # no /proc/cpuinfo: torch's x86 probe, where this torch has one
    assert MixedPrecision.from_level("O1", "cpu").dtype in (torch.float32, torch.bfloat16)


def test_ssl_cpu_amp_and_the_flags_override_the_cpu(monkeypatch):
    on_cpu(monkeypatch, ZEN4)
    monkeypatch.setenv("SSL_CPU_AMP", "fp32")
    mp = MixedPrecision.from_level("O1", "cpu")
    assert mp.dtype == torch.float32 and mp.precision_line() == "precision: fp32 on cpu (SSL_CPU_AMP=fp32)"
    on_cpu(monkeypatch, SKYLAKE_X)
    monkeypatch.setenv("SSL_CPU_AMP", "BF16")
    assert MixedPrecision.from_level("O1", "cpu").dtype == torch.bfloat16
    # mixed precision off wins over everything
    off = MixedPrecision.from_flag(False, "cpu")
    assert off.dtype == torch.float32 and off.precision_line() == "precision: fp32 on cpu (--use_fp16 false)"
    assert MixedPrecision.from_level("O0", "cpu").precision_line() == "precision: fp32 on cpu (AMP_OPT_LEVEL O0)"
    monkeypatch.setenv("SSL_CPU_AMP", "auto")
    assert MixedPrecision.from_level("O1", "cpu").dtype == torch.float32  # auto: the Skylake CPU's choice
    monkeypatch.setenv("SSL_CPU_AMP", "fp16")
    with pytest.raises(UserError, match="SSL_CPU_AMP='fp16' is not a CPU precision: use one of auto, fp32, bf16"):
        MixedPrecision.from_level("O1", "cpu")
    bf16 = MixedPrecision.from_level("O1", "cpu", cpu_dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and isinstance(bf16.scaler, NullScaler)
    with pytest.raises(UserError, match="fp32 or bf16"):
        MixedPrecision.from_level("O1", "cpu", cpu_dtype="fp16")


def test_cpu_never_autocasts_to_fp16(monkeypatch):
    """--amp_dtype / AMP_DTYPE choose the NPU/GPU type; on a CPU only the CPU's choice counts."""
    on_cpu(monkeypatch, SKYLAKE_X)
    assert MixedPrecision.from_level("O1", "cpu", amp_dtype="fp16").dtype == torch.float32
    on_cpu(monkeypatch, GRAVITON3)
    assert MixedPrecision.from_level("O1", "cpu", amp_dtype="fp16").dtype == torch.bfloat16
    assert MixedPrecision.from_level("O1", "cpu", amp_dtype="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_bf16_on_gpu_has_no_loss_scaling(level):
    mp = MixedPrecision.from_level(level, "cuda", amp_dtype="bf16")
    assert mp.dtype == torch.bfloat16 and mp.enabled
    assert isinstance(mp.scaler, NullScaler) and not mp.scaler.is_enabled()
    assert mp.precision_line().startswith("precision: bf16 autocast on cuda (AMP dtype bf16")
    fp16 = MixedPrecision.from_flag(True, "cuda")
    assert fp16.precision_line().startswith("precision: fp16 autocast with loss scaling on cuda")
    with pytest.raises(UserError, match="unknown AMP dtype 'fp8': use one of fp16, bf16"):
        MixedPrecision.from_level(level, "cuda", amp_dtype="fp8")
    with pytest.raises(UserError, match="apex .* fp16 only"):
        MixedPrecision.from_level(level, "cuda", use_apex=True, amp_dtype="bf16")


def test_use_fp16_flag_maps_to_o1_or_o0():
    assert MixedPrecision.from_flag(True, "cuda").dtype == torch.float16
    assert MixedPrecision.from_flag(False, "cuda").dtype == torch.float32


def test_autocast_really_changes_the_compute_dtype():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with MixedPrecision.from_level("O1", "cpu", cpu_dtype="bf16").autocast():
        assert layer(x).dtype == torch.bfloat16
    with MixedPrecision.from_level("O1", "cpu", cpu_dtype="fp32").autocast():
        assert layer(x).dtype == torch.float32


def test_cpu_bf16_attention_runs_the_math_kernels():
    """CPU flash attention in bf16: its backward is 5x slower than fp32's on torch 2.14 and crashed
    on torch 2.1 (double free); under CPU bf16 autocast attention runs as batched products."""
    torch.manual_seed(0)
    qkv, x = torch.nn.Linear(8, 24), torch.randn(2, 3, 17, 8)

    def attention(precision: MixedPrecision) -> tuple[set[str], torch.Tensor]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with precision.autocast():
                out = torch.nn.functional.scaled_dot_product_attention(*qkv(x).chunk(3, dim=-1))
            out.float().sum().backward()
        return {event.key for event in prof.key_averages()}, out

    ops, out = attention(MixedPrecision.from_level("O1", "cpu", cpu_dtype="bf16"))
    assert out.dtype == torch.bfloat16 and "aten::bmm" in ops
    assert not [op for op in ops if "flash" in op], ops
    plain_ops, exact = attention(MixedPrecision.from_level("O0", "cpu"))
    # bf16 rounds q, k, v and the products (2^-8 relative): a few such errors on values of order 1
    assert torch.allclose(out.float(), exact, atol=8 * 2.0 ** -8 * exact.abs().max().item())
    fp32_ops, _ = attention(MixedPrecision.from_level("O1", "cpu", cpu_dtype="fp32"))
    assert fp32_ops == plain_ops  # fp32 keeps torch's own choice of kernel


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
