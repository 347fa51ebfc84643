"""Our DINO backbones against facebookresearch/dino, written out here from its formulas (upstream's
code is not imported): ViT features at every input size, initial weight distributions, ResNet-50.

Tolerances. The reference ViT runs in float64 on the same weights, so it is exact at the scale of
fp32; our model runs in fp32 (unit roundoff u = 2^-24 = 6e-8). Its longest sums have K = 901 terms
(attention over 1 + 30 x 30 tokens at 480 px; MLP: 4 x 96 = 384), whose rounding error is at most
K u = 5.4e-5 of the summed magnitudes and typically sqrt(K) u = 2e-6. FEATURE_RTOL = 2e-4 of the
feature scale covers that worst case through the two blocks; what it guards against (timm's
antialiased resampling, a transposed grid, a misplaced [CLS] entry) moves features by 1e-3 to 1e-1.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dino.checkpoints import load_pretrained_backbone
from dino.models import DINOHead, build_backbone
from dino.visualize_attention import last_self_attention

DIM, DEPTH, HEADS, PATCH = 96, 2, 3, 16  # vit_pico at upstream's 224 / 16 geometry
FEATURE_RTOL = 2e-4
SIZES = [(224, 224), (96, 96), (480, 480), (480, 320), (112, 448)]  # last: 7 x 28 = 14 x 14 patches


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights in facebookresearch/dino's key layout, scaled like a trained ViT (O(1) activations),
    with a position embedding of unit size so that how it is resampled shows in the features."""
    g = torch.Generator().manual_seed(seed)

    def weight(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(math.prod(shape[1:]))

    def vec(n, centre=0.0):
        return centre + 0.1 * torch.randn(n, generator=g)

    state = {"cls_token": torch.randn(1, 1, DIM, generator=g),
             "pos_embed": torch.randn(1, 1 + 14 * 14, DIM, generator=g),
             "patch_embed.proj.weight": weight(DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": vec(DIM)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": vec(DIM, 1.0), b + "norm1.bias": vec(DIM),
            b + "attn.qkv.weight": weight(3 * DIM, DIM), b + "attn.qkv.bias": vec(3 * DIM),
            b + "attn.proj.weight": weight(DIM, DIM), b + "attn.proj.bias": vec(DIM),
            b + "norm2.weight": vec(DIM, 1.0), b + "norm2.bias": vec(DIM),
            b + "mlp.fc1.weight": weight(4 * DIM, DIM), b + "mlp.fc1.bias": vec(4 * DIM),
            b + "mlp.fc2.weight": weight(DIM, 4 * DIM), b + "mlp.fc2.bias": vec(DIM),
        })
    state.update({"norm.weight": vec(DIM, 1.0), "norm.bias": vec(DIM)})
    return state


# ------------------------------------------------------------------ the reference, from the formulas

def cubic(d: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    d = abs(d)
    if d <= 1:
        return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return 0.0


def bicubic_matrix(n_out: int, n_in: int, scale: float) -> torch.Tensor:
    """1-D bicubic resampling by the factor `scale`, without antialiasing: output i reads the input at
    (i + 1/2) / scale - 1/2 (half-pixel centres) from its 4 neighbours, indices clamped to the border."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            m[i, min(max(j, 0), n_in - 1)] += cubic(src - j)
    return m


def upstream_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """interpolate_pos_encoding: as is for the native square grid, else the [CLS] entry unchanged and
    the patch grid scaled by (n + 0.1) / sqrt(N) per axis."""
    n = pos_embed.shape[1] - 1
    if rows == cols and rows * cols == n:
        return pos_embed
    side = math.isqrt(n)
    grid = pos_embed[0, 1:].reshape(side, side, -1)
    resized = torch.einsum("ra,abc,sb->rsc", bicubic_matrix(rows, side, (rows + 0.1) / math.sqrt(n)), grid,
                           bicubic_matrix(cols, side, (cols + 0.1) / math.sqrt(n)))
    return torch.cat((pos_embed[:, :1], resized.reshape(1, rows * cols, -1)), dim=1)


def upstream_forward(state: dict, images: torch.Tensor):
    """Upstream's VisionTransformer in float64: the final-norm tokens after every block, and the last
    block's attention weights."""
    s = {k: v.double() for k, v in state.items()}
    x = F.conv2d(images.double(), s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=PATCH)
    batch, _, rows, cols = x.shape
    x = torch.cat((s["cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)), dim=1)
    x = x + upstream_pos_embed(s["pos_embed"], rows, cols)
    tokens = x.shape[1]
    outputs = []
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (DIM,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (DIM // HEADS) ** -0.5).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(batch, tokens, DIM)
        x = x + F.linear(y, s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        h = F.layer_norm(x, (DIM,), s[b + "norm2.weight"], s[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])),
                     s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
        x = x + h
        outputs.append(F.layer_norm(x, (DIM,), s["norm.weight"], s["norm.bias"], eps=1e-6))
    return outputs, attn


def assert_close(ours: torch.Tensor, expected: torch.Tensor, rtol: float = FEATURE_RTOL) -> None:
    scale = expected.abs().max().item()
    error = (ours.double() - expected).abs().max().item()
    assert error <= rtol * scale, f"max |difference| {error:.3g} > {rtol:g} x feature scale {scale:.3g}"


def images_of(size, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ ViT features at every size

def vit_pico_and_upstream(size):
    """Our vit_pico with the official-layout weights, the images, and upstream's outputs on them."""
    state = official_state()
    model = build_backbone("vit_pico", PATCH, 224).eval()
    model.load_state_dict(state)
    images = images_of(size)
    return model, images, *upstream_forward(state, images)


def assert_features_close(model, images, expected, rtol: float) -> None:
    """The [CLS] feature, and eval_linear's path: final-norm tokens of the last blocks."""
    with torch.no_grad():
        assert_close(model(images), expected[-1][:, 0], rtol)
        layers = model.get_intermediate_layers(images, n=DEPTH, return_prefix_tokens=True, norm=True)
    for (patches, prefix), want in zip(layers, expected):
        assert_close(prefix[:, 0], want[:, 0], rtol)
        assert_close(patches, want[:, 1:], rtol)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_vit_features_equal_upstream_at_every_size(size):
    model, images, expected, expected_attention = vit_pico_and_upstream(size)
    assert_features_close(model, images, expected, FEATURE_RTOL)
    # visualize_attention's path (the weights are probabilities: an absolute bound)
    assert_close(last_self_attention(model, images), expected_attention, rtol=1e-5 / expected_attention.max())


# bf16 autocast: what mixed precision computes on a CPU with native bf16, and with --amp_dtype bf16 on
# NPU/GPU. bf16 keeps 8 significant bits, so each rounding to bf16 errs by at most u = 2^-8 = 0.0039
# of the value rounded. On the path to a feature autocast rounds the two operands and the result of
# every matrix product: the patch convolution, and per block qkv, q @ k^T, attention @ v, proj, fc1
# and fc2, 13 products and N = 39 roundings (their sums accumulate in fp32, whose 2^-24 is negligible
# here; LayerNorm, softmax and the residual sums see the rounded values but add no bf16 rounding of
# their own). The LayerNorms keep every rounded value at about the scale of the features, so each
# rounding moves a feature by at most ~u of that scale; N independent errors, uniform in [-u, u]
# (standard deviation u / sqrt(3)), add up to sqrt(N / 3) u = 3.6 u. BF16_FEATURE_RTOL = 4 u covers
# that; the worst case N u = 0.15 would let a misplaced [CLS] entry or a transposed grid through.
# (Measured: at most 1.1 u at every size.)
BF16_UNIT_ROUNDOFF = 2.0 ** -8
BF16_FEATURE_RTOL = 4 * BF16_UNIT_ROUNDOFF


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_vit_features_in_bf16_equal_upstream_to_bf16_precision(size):
    model, images, expected, _ = vit_pico_and_upstream(size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_features_close(model, images, expected, BF16_FEATURE_RTOL)
        # and it did compute in bf16: further from the reference than fp32 ever is
        with pytest.raises(AssertionError):
            assert_features_close(model, images, expected, FEATURE_RTOL)


def test_native_size_is_timms_own_computation():
    """At the size the model is built for, nothing is resampled: bit for bit timm's ViT."""
    state = official_state()
    ours = build_backbone("vit_pico", PATCH, 224).eval()
    timms = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, embed_dim=DIM,
                              depth=DEPTH, num_heads=HEADS, dynamic_img_size=True).eval()
    ours.load_state_dict(state)
    timms.load_state_dict(state)
    images = images_of((224, 224))
    with torch.no_grad():
        assert torch.equal(ours(images), timms(images))
        pairs = zip(ours.get_intermediate_layers(images, n=2), timms.get_intermediate_layers(images, n=2))
        assert all(torch.equal(a, b) for a, b in pairs)


def test_official_224_weights_evaluated_at_another_img_size(tmp_path):
    """A model built for 96 px loading 224-px weights resamples them as upstream does at 96 px."""
    state = official_state()
    torch.save(state, tmp_path / "official.pth")
    model = build_backbone("vit_pico", PATCH, 96).eval()
    load_pretrained_backbone(model, str(tmp_path / "official.pth"))
    images = images_of((96, 96))
    with torch.no_grad():
        assert_close(model(images), upstream_forward(state, images)[0][-1][:, 0])


# ------------------------------------------------------------------ initial weights

def assert_std(values: torch.Tensor, std: float, what: str) -> None:
    """Sample mean and std of N draws: their standard errors are std / sqrt(N) and at most
    std / sqrt(2N) (normal; uniform: 0.45 std / sqrt(N)); 6 / sqrt(N) leaves more than 6 of them."""
    n = values.numel()
    assert abs(values.mean().item()) <= 6 * std / math.sqrt(n), what
    sample_std = values.std().item()
    assert abs(sample_std / std - 1) <= 6 / math.sqrt(n), f"{what}: std {sample_std:.3g} != {std:g}"


def assert_trunc_normal(values: torch.Tensor, std: float, what: str) -> None:
    """trunc_normal_(std, a=-2, b=2). Its inverse-CDF sampler (upstream's, timm's and torch's) maps a
    uniform draw of exactly +-1 to +-inf, clamped to +-2: about one such value per 10^7 draws, a
    100-sigma outlier that would dominate the sample std, so values at the bounds are left out."""
    assert values.abs().max() <= 2.0, what
    assert_std(values[values.abs() < 2.0], std, what)


def test_vit_initialisation_is_upstreams():
    """vision_transformer.py: cls_token and pos_embed trunc_normal(0.02); every Linear trunc_normal(0.02)
    with zero bias; LayerNorm 1 / 0; the patch convolution keeps PyTorch's default U(+-1/sqrt(fan_in))."""
    torch.manual_seed(0)
    model = build_backbone("vit_small", 16, 224, drop_path_rate=0.1)
    assert_trunc_normal(model.cls_token, 0.02, "cls_token")
    assert_trunc_normal(model.pos_embed, 0.02, "pos_embed")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 12 * 4
    for layer in linears:
        assert_trunc_normal(layer.weight, 0.02, "Linear weight")
        assert torch.all(layer.bias == 0)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 12 * 2 + 1
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-6 for m in norms)
    conv = model.patch_embed.proj
    bound = 1 / math.sqrt(3 * 16 * 16)
    assert conv.weight.abs().max() <= bound and conv.bias.abs().max() <= bound
    assert_std(conv.weight, bound / math.sqrt(3), "patch_embed.proj.weight")


def test_dino_head_initialisation_is_upstreams():
    torch.manual_seed(0)
    head = DINOHead(384, 4096, use_bn=True)
    for layer in (m for m in head.mlp if isinstance(m, nn.Linear)):
        assert_trunc_normal(layer.weight, 0.02, "head Linear weight")
        assert torch.all(layer.bias == 0)
    batch_norms = [m for m in head.mlp if isinstance(m, nn.BatchNorm1d)]
    assert len(batch_norms) == 2
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in batch_norms)
    # the prototypes keep nn.Linear's default U(+-1/sqrt(fan_in)) directions, with unit norms
    bound = 1 / math.sqrt(256)
    assert head.last_layer.weight_v.abs().max() <= bound
    assert_std(head.last_layer.weight_v, bound / math.sqrt(3), "last_layer.weight_v")
    assert torch.all(head.last_layer.weight_g == 1)


# ------------------------------------------------------------------ ResNet-50

def test_resnet50_is_torchvisions_network():
    """Upstream trains torchvision's resnet50() with fc replaced by identity: same modules, no
    stochastic depth whatever --drop_path_rate says, default init (every BN 1 / 0, none zeroed)."""
    torch.manual_seed(0)
    ours = build_backbone("resnet50", drop_path_rate=0.1)
    reference = torchvision.models.resnet50()
    reference.fc = nn.Identity()
    assert repr(ours) == repr(reference)
    assert ours.num_features == 2048
    def shapes(model):
        return {k: v.shape for k, v in model.state_dict().items()}

    assert shapes(ours) == shapes(reference)
    batch_norms = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in batch_norms)
    for name, conv in ((n, m) for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert_std(conv.weight, math.sqrt(2 / fan_out), name)  # kaiming_normal_, fan_out, relu


def test_official_resnet50_weights_load_and_give_torchvisions_features(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    reference.fc = nn.Identity()
    torch.save(reference.state_dict(), tmp_path / "dino_resnet50_pretrain.pth")
    ours = build_backbone("resnet50")
    load_pretrained_backbone(ours, str(tmp_path / "dino_resnet50_pretrain.pth"))
    images = images_of((64, 64))
    with torch.no_grad():
        assert torch.equal(ours.eval()(images), reference.eval()(images))
