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

from dino.loss import DINOLoss
from dino.main_dino import build_optimizer_for, get_args_parser, set_schedule_values, train_step
from dino.models import build_dino_networks
from moby.engine import TrainState, train_step as moby_train_step
from moby.model import build_moby
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
