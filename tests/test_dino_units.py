"""DINO building blocks against hand-computed values: loss, centre, schedules, head, wrapper, step pieces."""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dino.augment import DataAugmentationDINO, eval_transform
from dino.loss import DINOLoss, teacher_temperature_schedule
from dino.main_dino import (NonFiniteLossGuard, build_schedules, clip_gradients, frozen_last_layer,
                            get_args_parser, validate_args)
from dino.models import DINOHead, MultiCropWrapper, WeightNormLinear, build_backbone, resolution_groups
from ssl_runtime.ema import ema_update_
from ssl_runtime.errors import UserError
from ssl_runtime.optim import held_still


def loop_dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """Upstream's formulation, written as an explicit loop over view pairs and samples."""
    batch = teacher.shape[0] // 2
    s_chunks = (student / student_temp).chunk(ncrops)
    t_chunks = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(t_chunks):
        for v, s in enumerate(s_chunks):
            if v == iq:
                continue
            per_sample = [-(q[b] * F.log_softmax(s[b], dim=-1)).sum() for b in range(batch)]
            total += sum(per_sample) / batch
            terms += 1
    return total / terms


# The loss tests run in float64: its roundoff (1.1e-16 per operation), amplified by logits up to
# |t| / 0.04 ~ 1e2 and sums of ~1e2 terms, stays below 1e-12 relative on any CPU; a formula slip
# (a missing pair, the centre after the update) moves the loss by 1e-3 or more.
LOSS_RTOL = 1e-10


def float64_loss(*args, **kwargs) -> DINOLoss:
    return DINOLoss(*args, **kwargs).double()


@pytest.mark.parametrize("ncrops", [2, 3, 5])
def test_loss_matches_pairwise_loop(ncrops):
    torch.manual_seed(0)
    out_dim, batch = 7, 3
    loss_fn = float64_loss(out_dim, ncrops, 0.04, 0.04, 0, 1)
    loss_fn.center.copy_(torch.randn(1, out_dim) * 0.1)
    student = torch.randn(ncrops * batch, out_dim, dtype=torch.float64)
    teacher = torch.randn(2 * batch, out_dim, dtype=torch.float64)
    expected = loop_dino_loss(student, teacher, loss_fn.center.clone(), ncrops, 0.1, 0.04)
    assert loss_fn(student, teacher, epoch=0).item() == pytest.approx(float(expected), rel=LOSS_RTOL)


def test_loss_hand_value_two_classes():
    # One sample, two crops, out_dim 2, zero centre: the loss is the mean of two cross-entropies.
    loss_fn = float64_loss(2, 2, 0.5, 0.5, 0, 1, student_temp=1.0)
    teacher = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64)  # views 0 and 1
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p0 = [1 / (1 + math.e), math.e / (1 + math.e)]  # softmax([0, 1])
    p1 = p0[::-1]
    log_s0 = [math.log(1 / (1 + math.exp(-1))), math.log(1 / (1 + math.e))]  # log_softmax([1, 0])
    log_s1 = log_s0[::-1]
    ce_01 = -(p0[0] * log_s1[0] + p0[1] * log_s1[1])  # teacher view 0 vs student view 1
    ce_10 = -(p1[0] * log_s0[0] + p1[1] * log_s0[1])
    assert loss_fn(student, teacher, 0).item() == pytest.approx((ce_01 + ce_10) / 2, rel=LOSS_RTOL)


def test_center_update_is_ema_of_batch_mean():
    loss_fn = DINOLoss(3, 2, 0.04, 0.04, 0, 1)
    loss_fn.center.fill_(1.0)
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    loss_fn(torch.zeros(2, 3), teacher, 0)
    expected = 0.9 * torch.ones(1, 3) + 0.1 * torch.tensor([[2.0, 3.0, 4.0]])
    assert torch.allclose(loss_fn.center, expected)
    assert "center" in loss_fn.state_dict()


def test_loss_uses_center_before_updating_it():
    loss_fn = float64_loss(4, 2, 0.04, 0.04, 0, 1)
    student = torch.randn(2, 4, dtype=torch.float64)
    teacher = torch.randn(2, 4, dtype=torch.float64) * 3
    expected = loop_dino_loss(student, teacher, torch.zeros(1, 4, dtype=torch.float64), 2, 0.1, 0.04)
    assert loss_fn(student, teacher, 0).item() == pytest.approx(float(expected), rel=LOSS_RTOL)


def test_teacher_temperature_warmup_then_constant():
    temps = teacher_temperature_schedule(0.04, 0.07, 4, 10)
    assert len(temps) == 10
    assert temps[0] == pytest.approx(0.04) and temps[3] == pytest.approx(0.07)
    assert temps[1] == pytest.approx(0.05) and temps[9] == pytest.approx(0.07)


def schedule_args(**overrides):
    args = get_args_parser().parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_schedules_at_chosen_iterations():
    args = schedule_args(lr=5e-4, min_lr=1e-6, batch_size_per_gpu=64, epochs=4, warmup_epochs=2,
                         weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996)
    lr, wd, momentum = build_schedules(args, niter_per_ep=10, world_size=2)
    peak = 5e-4 * 128 / 256
    assert len(lr) == len(wd) == len(momentum) == 40
    assert lr[0] == 0.0
    assert lr[19] == pytest.approx(peak)  # end of the linear warm-up
    assert lr[9] == pytest.approx(peak * 9 / 19)
    assert lr[20] == pytest.approx(peak)  # cosine starts at the peak
    assert lr[30] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 10 / 20)))
    assert wd[0] == pytest.approx(0.04) and wd[20] == pytest.approx(0.22)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(momentum) >= 0)


def test_last_layer_is_frozen_only_during_the_first_epochs():
    head = DINOHead(8, 16, norm_last_layer=False, hidden_dim=12, bottleneck_dim=4)
    last = {id(head.last_layer.weight_v), id(head.last_layer.weight_g)}
    assert {id(p) for p in frozen_last_layer(0, head, freeze_last_layer=1)} == last
    assert frozen_last_layer(1, head, freeze_last_layer=1) == []
    assert frozen_last_layer(0, head, freeze_last_layer=0) == []
    # held still the upstream way on torch's optimizers: no gradient, so AdamW never touches it
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1)
    head(torch.randn(5, 8)).sum().backward()
    with held_still(optimizer, frozen_last_layer(0, head, freeze_last_layer=1)):
        assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
        assert head.mlp[0].weight.grad is not None


def test_head_layout_matches_official_checkpoint():
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4)
    assert list(head.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                       "mlp.4.weight", "mlp.4.bias", "last_layer.weight_g",
                                       "last_layer.weight_v"]
    assert torch.all(head.last_layer.weight_g == 1) and not head.last_layer.weight_g.requires_grad
    bn_head = DINOHead(8, 32, use_bn=True, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    assert isinstance(bn_head.mlp[1], nn.BatchNorm1d) and bn_head.last_layer.weight_g.requires_grad
    # an official-layout state dict (same names, other values) loads strictly
    official = {k: torch.randn_like(v) for k, v in head.state_dict().items()}
    head.load_state_dict(official, strict=True)
    assert torch.equal(head.last_layer.weight_v, official["last_layer.weight_v"])


def test_weight_norm_linear_equals_torch_weight_norm():
    torch.manual_seed(0)
    ours = WeightNormLinear(4, 6).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = nn.utils.weight_norm(nn.Linear(4, 6, bias=False).double())
    with torch.no_grad():
        reference.weight_v.copy_(ours.weight_v)
        reference.weight_g.copy_(torch.rand(6, 1) + 0.5)
        ours.weight_g.copy_(reference.weight_g)
    x = torch.randn(3, 4, dtype=torch.float64)
    # float64, sums of 4 terms: a few 1e-16 apart; another formula (no g, no norm) differs by O(1)
    assert torch.allclose(ours(x), reference(x), rtol=0, atol=1e-12)
    assert torch.allclose(ours.weight.norm(dim=1), ours.weight_g.squeeze(1), rtol=0, atol=1e-12)


class CountingBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))


def test_multicrop_wrapper_one_pass_per_resolution():
    crops = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4),
             torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    assert resolution_groups(crops) == [(0, 2), (2, 5)]
    backbone = CountingBackbone()
    out = MultiCropWrapper(backbone, nn.Identity())(crops)
    assert backbone.calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    expected = torch.cat([c.mean(dim=(2, 3)) for c in crops])
    assert torch.allclose(out, expected)


def test_vit_backbone_native_and_local_sizes():
    model = build_backbone("vit_pico", patch_size=4, img_size=32)
    assert model.pos_embed.shape == (1, 65, 96)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 96)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 96)


def test_clip_gradients_matches_upstream_per_parameter_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model(torch.randn(8, 4) * 10).sum().backward()
    expected = []
    for p in model.parameters():
        norm = p.grad.norm(2)
        coef = 0.5 / (norm + 1e-6)
        expected.append(p.grad * coef if coef < 1 else p.grad.clone())
    norms = clip_gradients(model, 0.5)
    assert len(norms) == 4
    for p, want in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, want)
        assert p.grad.norm() <= 0.5 + 1e-5


def test_teacher_ema_formula():
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(list(teacher.parameters()), list(student.parameters()), 0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s)


def test_non_finite_guard_exits_with_code_1():
    guard = NonFiniteLossGuard(torch.device("cpu"))
    guard.record(torch.tensor(1.0))
    guard.check(0, torch.tensor(1.0))  # finite: nothing happens
    guard.record(torch.tensor(float("nan")))
    guard.record(torch.tensor(2.0))  # a later finite loss does not hide the earlier NaN
    with pytest.raises(SystemExit) as info:
        guard.check(5, torch.tensor(2.0))
    assert info.value.code == 1


def test_multicrop_augmentation_shapes():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).convert("RGB")
    crops = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 3, global_size=32, local_size=16)(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert tuple(eval_transform(32)(image).shape) == (3, 32, 32)


@pytest.mark.parametrize("flags, message", [
    (["--arch", "xcit_small_12_p16"], "unknown --arch"),
    (["--patch_size", "5", "--img_size", "32", "--local_crop_size", "16"], "does not divide"),
    (["--local_crop_size", "256"], "larger than --img_size"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu must be positive"),
    (["--epochs", "3"], "--warmup_epochs 10 must be between"),
    (["--global_crops_scale", "0.4"], "global_crops_scale"),
])
def test_bad_flags_are_user_errors(flags, message):
    args = get_args_parser().parse_args(flags)
    with pytest.raises(UserError, match=message):
        validate_args(args)


def test_amp_alias_and_deit_spelling():
    args = get_args_parser().parse_args(["--use_fp16", "false", "--amp", "--arch", "deit_small"])
    validate_args(args)
    assert args.use_fp16 is True and args.arch == "vit_small"
    assert get_args_parser().parse_args(["--use_fp16", "off"]).use_fp16 is False
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--use_fp16", "maybe"])
    assert isinstance(get_args_parser().parse_args(["--local-rank", "3"]), argparse.Namespace)
