"""The optimised training steps against plain, upstream-style steps on the same small inputs.

DINO: train_step (vectorised loss, one backbone pass per resolution, foreach clipping and EMA,
fused AdamW) against a pairwise-loop loss, one backbone pass per crop, per-parameter clipping and
EMA loops and torch's reference AdamW loop. MoBY: engine.train_step (foreach EMA, fused optimizer,
no host sync) against upstream's per-parameter EMA loop and torch's reference loop. Same loss,
same weights, centre and queues afterwards.
"""

from __future__ import annotations

import argparse
import copy
import math
import types

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

LR, WD, MOMENTUM = 0.01, 0.04, 0.9


def dino_args(**overrides) -> argparse.Namespace:
    args = get_args_parser().parse_args([
        "--arch", "vit_pico", "--patch_size", "4", "--img_size", "16", "--local_crop_size", "8",
        "--local_crops_number", "2", "--out_dim", "32", "--drop_path_rate", "0", "--use_fp16", "false",
        "--clip_grad", "0.05", "--freeze_last_layer", "0"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def plain_dino_step(student, teacher, center, images, optimizer, args, temperature):
    """Upstream's step written out: crop by crop, loop loss, per-parameter clip and EMA loops."""
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
    optimizer.step()
    with torch.no_grad():
        for p_s, p_t in zip(student.parameters(), teacher.parameters()):
            p_t.mul_(MOMENTUM).add_((1 - MOMENTUM) * p_s)
    new_center = center * 0.9 + teacher_out.mean(0, keepdim=True) * 0.1
    return loss.detach(), new_center


def test_dino_step_matches_the_plain_step():
    args = dino_args()
    ctx = single_process_context("cpu")
    torch.manual_seed(0)
    student, teacher, _ = build_dino_networks(args)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    start = {k: v.detach().clone() for k, v in student.named_parameters()}

    optimizer = build_optimizer_for(student, args, ctx)
    assert bool(optimizer.defaults["fused"]) == FUSED_ON_CPU  # the fast kernel is the one under test
    set_schedule_values(optimizer, LR, WD)
    ref_optimizer = torch.optim.AdamW(param_groups_weight_decay(ref_student, WD), lr=LR, foreach=False)
    dino_loss = DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs)
    mp = MixedPrecision.from_flag(False, "cpu")
    params = (list(student.parameters()), list(teacher.parameters()))
    center = torch.zeros(1, args.out_dim)

    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        images = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)] + \
                 [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(2)]
        loss = train_step(student, teacher, dino_loss, images, optimizer, mp, 0, MOMENTUM, args, params)
        ref_loss, center = plain_dino_step(ref_student, ref_teacher, center, images, ref_optimizer, args, 0.04)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dino_loss.center, center, rtol=1e-5, atol=1e-6)
    assert_same_updates(student, ref_student, start)
    assert_same_updates(teacher, ref_teacher, start)


def assert_same_updates(model, reference, start: dict) -> None:
    """Both models moved the same way from `start`: Adam divides by sqrt(v), so float-order noise
    in tiny gradients shows in the weights; a wrong formula would differ by the step size itself."""
    moved = 0.0
    for name, param in model.named_parameters():
        ours = param.detach() - start[name]
        theirs = dict(reference.named_parameters())[name].detach() - start[name]
        assert (ours - theirs).abs().max() <= 0.01 * theirs.abs().max() + 1e-6, name  # + float rounding
        moved = max(moved, float(theirs.abs().max()))
    assert moved > 1e-3


def loop_momentum_update(model) -> None:
    """Upstream's target update: one multiply-add per parameter, then the schedule advances."""
    m = model.momentum()
    model.step += 1
    with torch.no_grad():
        for online, target in ((model.encoder, model.encoder_k), (model.projector, model.projector_k)):
            for p, p_k in zip(online.parameters(), target.parameters()):
                p_k.data = p_k.data * m + p.data * (1.0 - m)


def moby_pair():
    # SGD (fused): biases in front of BatchNorm have an exactly-zero true gradient, and Adam
    # would blow their float noise up to full-size steps; the fused AdamW has its own test.
    config = tiny_config("MODEL.MOBY.ONLINE_DROP_PATH_RATE", "0.0", "DATA.IMG_SIZE", "16",
                         "MODEL.SWIN.WINDOW_SIZE", "4", "TRAIN.CLIP_GRAD", "0.5",
                         "TRAIN.OPTIMIZER.NAME", "sgd", "TRAIN.BASE_LR", "0.5")
    torch.manual_seed(0)
    fast = build_moby(config, steps_per_epoch=10)
    plain = copy.deepcopy(fast)
    plain.momentum_update = types.MethodType(loop_momentum_update, plain)
    return config, fast, plain


def test_moby_step_matches_the_plain_step():
    config, fast, plain = moby_pair()
    ctx = single_process_context("cpu")
    mp = MixedPrecision.from_flag(False, "cpu")
    optimizer = build_moby_optimizer(config, fast, "cpu")
    assert bool(optimizer.defaults.get("fused")) == FUSED_ON_CPU  # torch 2.1 has no fused SGD
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in build_moby_optimizer(config, plain, "cpu").param_groups]
    reference = torch.optim.SGD(groups, lr=0.5, momentum=0.9, nesterov=True, foreach=False)
    state = TrainState(optimizer, None, mp, ctx, None, ThroughputMeter(4))
    params = [p for p in fast.parameters() if p.requires_grad]
    start = {k: v.detach().clone() for k, v in fast.named_parameters()}

    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        batch = (torch.randn(4, 3, 16, 16, generator=generator), torch.randn(4, 3, 16, 16, generator=generator),
                 torch.zeros(4))
        loss, _ = moby_train_step(fast, batch, state, lambda m, b: m(b[0], b[1]), params, config.TRAIN.CLIP_GRAD)
        ref_loss = plain(batch[0], batch[1])
        reference.zero_grad()
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in plain.parameters() if p.requires_grad], config.TRAIN.CLIP_GRAD,
                                       foreach=False)
        reference.step()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
        assert math.isfinite(float(loss))
    assert_same_updates(fast, plain, start)
    for name, buffer in fast.named_buffers():  # queues, queue pointer, BatchNorm statistics
        torch.testing.assert_close(buffer, dict(plain.named_buffers())[name], rtol=1e-3, atol=1e-4, msg=name)
    assert int(fast.queue_ptr) == 12 % config.MODEL.MOBY.CONTRAST_NUM_NEGATIVE
