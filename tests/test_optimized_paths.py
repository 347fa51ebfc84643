"""The optimised training steps against plain, upstream-style steps on the same small inputs.

DINO: train_step (vectorised loss, one backbone pass per resolution, foreach clipping and EMA,
fused AdamW) against a pairwise-loop loss, one backbone pass per crop, per-parameter clipping and
EMA loops and torch's reference AdamW loop. MoBY: engine.train_step (foreach EMA, fused AdamW,
no host sync) against upstream's per-parameter EMA loop and torch's reference loop. Same loss,
same weights, centre and queues afterwards.

Both sides run in float64, so that the comparison holds on any CPU, BLAS and thread count: the
two sides sum in different orders, and Adam divides by sqrt(v) + eps, which turns a gradient's
roundoff into a weight difference up to lr / eps times larger. In float32 that noise (~1e-7 of the
largest gradient) reaches the size of a whole step on gradients whose true value is about zero;
in float64 it stays far below the bound derived in `roundoff_bound`, while a 1 % change of the
EMA rate or of Adam's eps moves the weights far above it (the negative controls).
"""

from __future__ import annotations

import argparse
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

from dino.loss import DINOLoss
from dino.main_dino import build_optimizer_for, get_args_parser, set_schedule_values, train_step
from dino.models import build_dino_networks
from moby.engine import TrainState, train_step as moby_train_step
from moby.model import build_moby, contrastive_loss
from moby.optimization import build_optimizer as build_moby_optimizer
from ssl_runtime.amp import MixedPrecision
from ssl_runtime.compat import fused_optimizer_devices
from ssl_runtime.distributed import single_process_context
from ssl_runtime.meters import ThroughputMeter
from ssl_runtime.optim import param_groups_weight_decay
from tests.test_dino_units import loop_dino_loss
from tests.test_moby_model import tiny_config

FUSED_ON_CPU = "cpu" in fused_optimizer_devices()  # not in torch 2.1: the foreach kernel there

LR, WD, MOMENTUM, STEPS = 0.01, 0.04, 0.9, 3

# Relative roundoff of a float64 sum of up to 2**14 terms (the widest reductions in these tiny
# models: the DINO head's 2048 hidden units times a few crops, MoBY's 4096-wide MLPs).
ROUNDOFF = 2 ** 14 * torch.finfo(torch.float64).eps  # 3.6e-12
# Losses, centre, queues and BatchNorm statistics are compared to half of float64's digits: the
# two orders of summation leave them equal to ~1e-12 (measured), while a formula slip moves them
# at the 1e-3 .. 1e-8 level (see the negative controls).
HALF_DIGITS = math.sqrt(torch.finfo(torch.float64).eps)  # 1.5e-8

PERTURBATIONS = {"ema_rate": {"ema_rate_scale": 1.01}, "adam_eps": {"eps_scale": 1.01}}


def roundoff_bound(lr: float, eps: float, steps: int, grad_max: float) -> float:
    """How far float64 roundoff alone can move one weight apart between the two sides.

    A gradient computed in another order differs by at most ROUNDOFF * grad_max (grad_max: the
    largest gradient the optimizer is given, after clipping); Adam's update
    m / (sqrt(v) + eps) has a slope of at most 1 / eps in each gradient it holds, and after
    `steps` steps the moments hold `steps` gradients: at most steps**2 * lr * ROUNDOFF * grad_max / eps.
    (Here: DINO 9.5e-7, measured 2.9e-13; MoBY 2.5e-6, measured 2.2e-11.)
    """
    return steps * steps * lr * ROUNDOFF * grad_max / eps


def max_abs_grad(model: torch.nn.Module) -> float:
    return max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)


def mismatched_updates(model, reference, start: dict, bound: float) -> list[str]:
    """Parameters whose move from `start` differs between the two sides by more than `bound`
    (plus the roundoff of the weight itself), with the size of the difference."""
    reference_params = dict(reference.named_parameters())
    bad = []
    for name, param in model.named_parameters():
        ours = param.detach() - start[name]
        theirs = reference_params[name].detach() - start[name]
        allowed = bound + ROUNDOFF * float(start[name].abs().max())
        difference = float((ours - theirs).abs().max())
        if not difference <= allowed:
            bad.append(f"{name}: {difference:.3g} > {allowed:.3g}")
    return bad


def mismatched_tensors(ours: dict, theirs: dict) -> list[str]:
    """Tensors (losses, buffers) that differ by more than HALF_DIGITS relative."""
    bad = []
    for name, value in ours.items():
        value, expected = value.double(), theirs[name].double()
        difference = float((value - expected).abs().max())
        if not difference <= HALF_DIGITS * max(float(expected.abs().max()), 1.0):
            bad.append(f"{name}: {difference:.3g}")
    return bad


# ---------------------------------------------------------------- DINO

def dino_args(**overrides) -> argparse.Namespace:
    args = get_args_parser().parse_args([
        "--arch", "vit_pico", "--patch_size", "4", "--img_size", "16", "--local_crop_size", "8",
        "--local_crops_number", "2", "--out_dim", "32", "--drop_path_rate", "0", "--use_fp16", "false",
        "--clip_grad", "0.05", "--freeze_last_layer", "0"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def plain_dino_step(student, teacher, center, images, optimizer, args, temperature, momentum):
    """Upstream's step written out: crop by crop, loop loss, per-parameter clip and EMA loops.
    Returns the loss, the new centre and the largest clipped gradient."""
    teacher_out = torch.cat([teacher(im) for im in images[:2]]).detach()
    student_out = torch.cat([student(im) for im in images])
    loss = loop_dino_loss(student_out, teacher_out, center, len(images), 0.1, temperature)
    optimizer.zero_grad()
    loss.backward()
    for p in student.parameters():
        if p.grad is not None:
            coef = args.clip_grad / (p.grad.norm(2) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    grad_max = max_abs_grad(student)
    optimizer.step()
    with torch.no_grad():
        for p_s, p_t in zip(student.parameters(), teacher.parameters()):
            p_t.mul_(momentum).add_((1 - momentum) * p_s)
    new_center = center * 0.9 + teacher_out.mean(0, keepdim=True) * 0.1
    return loss.detach(), new_center, grad_max


def compare_dino_steps(ema_rate_scale: float = 1.0, eps_scale: float = 1.0) -> tuple[list, list]:
    """STEPS optimised and plain steps in float64 (the plain side's EMA rate 1 - m and Adam eps
    optionally scaled); returns what disagrees: (losses and centre, weights)."""
    args = dino_args()
    ctx = single_process_context("cpu")
    torch.manual_seed(0)
    student, teacher, _ = build_dino_networks(args)
    student, teacher = student.double(), teacher.double()
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    start = {k: v.detach().clone() for k, v in student.named_parameters()}

    optimizer = build_optimizer_for(student, args, ctx)
    assert bool(optimizer.defaults["fused"]) == FUSED_ON_CPU  # the fast kernel is the one under test
    set_schedule_values(optimizer, LR, WD)
    eps = optimizer.defaults["eps"]
    ref_optimizer = torch.optim.AdamW(param_groups_weight_decay(ref_student, WD), lr=LR,
                                      eps=eps * eps_scale, foreach=False)
    dino_loss = DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs).double()
    mp = MixedPrecision.from_flag(False, "cpu")
    params = (list(student.parameters()), list(teacher.parameters()))
    center = torch.zeros(1, args.out_dim, dtype=torch.float64)
    ref_momentum = 1 - (1 - MOMENTUM) * ema_rate_scale

    generator = torch.Generator().manual_seed(1)
    ours, theirs, grad_max = {}, {}, 0.0
    for step in range(STEPS):
        images = [torch.randn(4, 3, 16, 16, generator=generator, dtype=torch.float64) for _ in range(2)] + \
                 [torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2)]
        ours[f"loss {step}"] = train_step(student, teacher, dino_loss, images, optimizer, mp, 0, MOMENTUM,
                                          args, params)
        theirs[f"loss {step}"], center, step_grad_max = plain_dino_step(
            ref_student, ref_teacher, center, images, ref_optimizer, args, 0.04, ref_momentum)
        grad_max = max(grad_max, step_grad_max)
    ours["center"], theirs["center"] = dino_loss.center, center
    bound = roundoff_bound(LR, eps, STEPS, grad_max)
    return (mismatched_tensors(ours, theirs),
            mismatched_updates(student, ref_student, start, bound)
            + mismatched_updates(teacher, ref_teacher, start, bound))


def test_dino_step_matches_the_plain_step():
    assert compare_dino_steps() == ([], [])


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_dino_comparison_catches_a_one_percent_change(perturbation):
    """Negative control: the plain side with a 1 % larger EMA rate (1 - m) or Adam eps must fail,
    on the weights themselves (measured here: 55x and 150x the roundoff bound)."""
    _, weights = compare_dino_steps(**PERTURBATIONS[perturbation])
    assert weights != []


# ---------------------------------------------------------------- MoBY

def loop_momentum_update(model, rate_scale: float = 1.0) -> None:
    """Upstream's target update: one multiply-add per parameter, then the schedule advances."""
    m = 1 - (1 - model.momentum()) * rate_scale
    model.step += 1
    with torch.no_grad():
        for online, target in ((model.encoder, model.encoder_k), (model.projector, model.projector_k)):
            for p, p_k in zip(online.parameters(), target.parameters()):
                p_k.data = p_k.data * m + p.data * (1.0 - m)


def compare_moby_steps(ema_rate_scale: float = 1.0, eps_scale: float = 1.0) -> tuple[list, list]:
    """STEPS optimised and plain steps of the default optimizer (AdamW) in float64; returns what
    disagrees: (losses and buffers, weights)."""
    config = tiny_config("MODEL.MOBY.ONLINE_DROP_PATH_RATE", "0.0", "DATA.IMG_SIZE", "16",
                         "MODEL.SWIN.WINDOW_SIZE", "4", "TRAIN.CLIP_GRAD", "0.5", "TRAIN.BASE_LR", str(LR))
    assert config.TRAIN.OPTIMIZER.NAME == "adamw"
    torch.manual_seed(0)
    fast = build_moby(config, steps_per_epoch=10).double()
    plain = copy.deepcopy(fast)
    plain.momentum_update = types.MethodType(lambda m: loop_momentum_update(m, ema_rate_scale), plain)
    ctx = single_process_context("cpu")
    mp = MixedPrecision.from_flag(False, "cpu")
    optimizer = build_moby_optimizer(config, fast, "cpu")
    assert bool(optimizer.defaults.get("fused")) == FUSED_ON_CPU  # foreach on torch 2.1
    defaults = optimizer.defaults
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in build_moby_optimizer(config, plain, "cpu").param_groups]
    reference = torch.optim.AdamW(groups, lr=defaults["lr"], betas=defaults["betas"],
                                  eps=defaults["eps"] * eps_scale, foreach=False)
    state = TrainState(optimizer, None, mp, ctx, None, ThroughputMeter(4))
    params = [p for p in fast.parameters() if p.requires_grad]
    start = {k: v.detach().clone() for k, v in fast.named_parameters()}

    generator = torch.Generator().manual_seed(2)
    ours, theirs, grad_max = {}, {}, 0.0
    for step in range(STEPS):
        views = [torch.randn(4, 3, 16, 16, generator=generator, dtype=torch.float64) for _ in range(2)]
        batch = (*views, torch.zeros(4))
        ours[f"loss {step}"], _ = moby_train_step(fast, batch, state, lambda m, b: m(b[0], b[1]), params,
                                                  config.TRAIN.CLIP_GRAD)
        loss = plain(*views)
        reference.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in plain.parameters() if p.requires_grad],
                                       config.TRAIN.CLIP_GRAD, foreach=False)
        grad_max = max(grad_max, max_abs_grad(plain))
        reference.step()
        theirs[f"loss {step}"] = loss.detach()
    assert int(fast.queue_ptr) == 4 * STEPS % config.MODEL.MOBY.CONTRAST_NUM_NEGATIVE
    ours.update(fast.named_buffers())  # queues, queue pointer, BatchNorm statistics
    theirs.update(plain.named_buffers())
    bound = roundoff_bound(defaults["lr"], defaults["eps"], STEPS, grad_max)
    return mismatched_tensors(ours, theirs), mismatched_updates(fast, plain, start, bound)


def test_moby_step_matches_the_plain_step():
    assert compare_moby_steps() == ([], [])


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_moby_comparison_catches_a_one_percent_change(perturbation):
    _, weights = compare_moby_steps(**PERTURBATIONS[perturbation])  # measured: 6000x, 2300x the bound
    assert weights != []


# ---------------------------------------------------------------- bf16 autocast

# The same steps under bf16 autocast (mixed precision on a CPU with native bf16; --amp_dtype bf16 on
# NPU/GPU) against the plain float64 step, on the first step (whose weights are the same on both
# sides: later steps let Adam turn any difference in a near-zero gradient into a step of size lr).
#
# bf16 keeps 8 significant bits: a rounding to bf16 errs by at most u = 2^-8 = 0.0039 of the value.
# Autocast rounds the two operands and the result of every matrix product (sums accumulate in fp32).
# Counting products on the way to the networks' outputs: DINO's vit_pico, 13 (patch convolution; per
# block qkv, q @ k^T, attention @ v, proj, fc1, fc2) plus the head's 3 MLP layers and last layer, 17;
# MoBY's 2-block Swin, 12 + the patch convolution + the patch merging + projector (2) + predictor (2),
# 18. N = 3 x 18 = 54 roundings at most. Taken as independent errors uniform in [-u, u] (standard
# deviation u / sqrt(3)), each acting on values at the scale of the output (LayerNorms keep them
# there), every output element carries an error of standard deviation at most
# sigma = sqrt(N / 3) u = 4.2 u = 0.017 of its tensor's rms. To first order the loss moves by
# sum(dL/dy * error) over those outputs y: standard deviation sigma * sqrt(sum(|dL/dy|^2 rms(y)^2)),
# computed from the float64 side's gradients. The tolerances are 5 standard deviations (a maximum
# over thousands of elements stays below that). Measured (torch 2.14 / 2.1, whose autocast lists
# differ): DINO loss 0.3 / 1.4 standard deviations, centre 0.7 / 0.6; MoBY loss 0.06, queued keys 2.4.
BF16_U = 2.0 ** -8
BF16_SIGMA = math.sqrt(3 * 18 / 3) * BF16_U
BF16_SIGMAS = 5


def bf16_loss_bound(outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> float:
    """BF16_SIGMAS standard deviations of the loss's first-order change (see above)."""
    variance = sum(float(g.square().sum() * y.detach().square().mean()) for y, g in zip(outputs, grads))
    return BF16_SIGMAS * BF16_SIGMA * math.sqrt(variance)


def bf16() -> MixedPrecision:
    return MixedPrecision.from_level("O1", "cpu", cpu_dtype="bf16")


def test_dino_step_in_bf16_matches_the_plain_step_to_bf16_precision():
    args = dino_args()
    ctx = single_process_context("cpu")
    torch.manual_seed(0)
    student, teacher, _ = build_dino_networks(args)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    ref_student, ref_teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    optimizer = build_optimizer_for(student, args, ctx)
    set_schedule_values(optimizer, LR, WD)
    dino_loss = DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)] + \
             [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(2)]
    loss = train_step(student, teacher, dino_loss, images, optimizer, bf16(), 0, MOMENTUM, args,
                      (list(student.parameters()), list(teacher.parameters())))

    plain = [im.double() for im in images]
    teacher_out = torch.cat([ref_teacher(im) for im in plain[:2]]).requires_grad_()
    student_out = torch.cat([ref_student(im) for im in plain])
    center = torch.zeros(1, args.out_dim, dtype=torch.float64)
    expected = loop_dino_loss(student_out, teacher_out, center, len(plain), 0.1, 0.04)
    grads = torch.autograd.grad(expected, [student_out, teacher_out])
    error = abs(float(loss) - float(expected.detach()))
    assert error <= bf16_loss_bound([student_out, teacher_out], grads), error
    assert error > HALF_DIGITS * float(expected.detach())  # it did compute in bf16
    # the centre: 0.1 x the mean of the teacher's outputs, each off by at most 5 sigma of their rms
    teacher_out = teacher_out.detach()
    center_error = float((dino_loss.center.double() - 0.1 * teacher_out.mean(0)).abs().max())
    assert center_error <= 0.1 * BF16_SIGMAS * BF16_SIGMA * float(teacher_out.square().mean().sqrt())


def test_moby_step_in_bf16_matches_the_plain_step_to_bf16_precision():
    config = tiny_config("MODEL.MOBY.ONLINE_DROP_PATH_RATE", "0.0", "DATA.IMG_SIZE", "16",
                         "MODEL.SWIN.WINDOW_SIZE", "4", "TRAIN.CLIP_GRAD", "0.5", "TRAIN.BASE_LR", str(LR))
    torch.manual_seed(0)
    fast = build_moby(config, steps_per_epoch=10)
    plain = copy.deepcopy(fast).double()
    optimizer = build_moby_optimizer(config, fast, "cpu")
    state = TrainState(optimizer, None, bf16(), single_process_context("cpu"), None, ThroughputMeter(4))
    generator = torch.Generator().manual_seed(2)
    views = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
    loss, _ = moby_train_step(fast, (*views, torch.zeros(4)), state, lambda m, b: m(b[0], b[1]),
                              [p for p in fast.parameters() if p.requires_grad], config.TRAIN.CLIP_GRAD)

    outputs = {}  # the predictor's and the target projector's outputs (before normalisation), per view

    def keep(name):
        def hook(module, inputs, output):
            outputs[f"{name} {len([k for k in outputs if k.startswith(name)]) + 1}"] = output
        return hook
    plain.predictor.register_forward_hook(keep("pred"))
    plain.projector_k.register_forward_hook(keep("key"))
    queues = plain.queue1.clone(), plain.queue2.clone()
    expected = plain(*[v.double() for v in views]).detach()
    # the loss again from those outputs, differentiable in the target's too (computed under no_grad)
    pred_1, pred_2 = outputs["pred 1"], outputs["pred 2"]
    key_1, key_2 = (outputs[f"key {i}"].detach().requires_grad_() for i in (1, 2))
    again = sum(contrastive_loss(F.normalize(pred, dim=1), F.normalize(key, dim=1), queue,
                                 config.MODEL.MOBY.CONTRAST_TEMPERATURE)
                for pred, key, queue in ((pred_1, key_2, queues[1]), (pred_2, key_1, queues[0])))
    assert float(again.detach()) == pytest.approx(float(expected), rel=1e-12)
    grads = torch.autograd.grad(again, [pred_1, pred_2, key_1, key_2])
    outputs = [pred_1, pred_2, key_1, key_2]
    error = abs(float(loss) - float(expected))
    assert error <= bf16_loss_bound(outputs, grads), error
    assert error > HALF_DIGITS * float(expected)  # it did compute in bf16
    # the keys queued: unit vectors y / |y|, whose elements move by sigma * rms(y) / |y| = sigma / sqrt(d),
    # then rounded to bf16 themselves (at most u |k|)
    keys = [(name, buffer) for name, buffer in fast.named_buffers() if name.startswith("queue") and
            buffer.is_floating_point()]
    expected_keys = dict(plain.named_buffers())
    for name, queue in keys:
        expected_queue = expected_keys[name]
        difference = float((queue.double() - expected_queue).abs().max())
        allowed = BF16_SIGMAS * BF16_SIGMA / math.sqrt(queue.shape[0]) + BF16_U * float(expected_queue.abs().max())
        assert difference <= allowed, (name, difference)
