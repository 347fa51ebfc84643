"""MoBY's algorithm pieces against hand-computed values: contrastive loss, momentum schedule and
EMA, queue pointer arithmetic, BN-before-MLP, weight-decay groups, lr scaling and schedule."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from moby.backbones import TokenBatchNorm, build_encoder
from moby.config import get_config
from moby.engine import accumulation_steps
from moby.model import MoBY, MoBYMLP, build_moby, check_queue_size, contrastive_loss
from moby.optimization import build_optimizer, build_scheduler, scale_learning_rates
from ssl_runtime.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_SWIN = ["MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS", "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]",
             "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "16"]


def tiny_config(*opts):
    args = argparse.Namespace(cfg=str(CONFIGS / "moby_swin_cpu.yaml"), opts=TINY_SWIN + list(opts))
    return get_config(args)


class FlatEncoder(nn.Module):
    """A stand-in encoder: flatten, one linear layer; exposes num_features like timm models."""

    num_features = 4

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def small_moby(queue: int = 8, total_steps: int = 100) -> MoBY:
    torch.manual_seed(0)
    return MoBY(FlatEncoder(), FlatEncoder(), contrast_num_negative=queue, total_steps=total_steps)


def test_contrastive_loss_matches_explicit_loop():
    rng = np.random.default_rng(0)
    n, d, k, temp = 3, 5, 7, 0.2
    q = rng.normal(size=(n, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    key = rng.normal(size=(n, d))
    key /= np.linalg.norm(key, axis=1, keepdims=True)
    queue = rng.normal(size=(d, k))
    queue /= np.linalg.norm(queue, axis=0, keepdims=True)
    expected = 0.0
    for i in range(n):
        logits = [sum(q[i, c] * key[i, c] for c in range(d)) / temp]
        logits += [sum(q[i, c] * queue[c, j] for c in range(d)) / temp for j in range(k)]
        expected += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    expected /= n
    got = contrastive_loss(torch.tensor(q), torch.tensor(key), torch.tensor(queue), temp)
    assert got.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("step,expected", [(0, 0.99), (50, 0.995), (100, 1.0),
                                           (25, 1 - 0.01 * (1 + math.sqrt(0.5)) / 2)])
def test_momentum_schedule(step, expected):
    model = small_moby(total_steps=100)
    model.step = step
    assert model.momentum() == pytest.approx(expected, abs=1e-12)


def test_forward_applies_ema_before_target_pass_and_advances_schedule():
    model = small_moby(total_steps=100)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.fill_(1.0)
        for p in model.encoder_k.parameters():
            p.fill_(0.0)
    model.step = 50  # momentum 0.995
    x = torch.randn(4, 2, 3)
    loss = model(x, x)
    assert torch.isfinite(loss)
    for p in model.encoder_k.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.005))
    assert model.step == 51
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    assert all(not p.requires_grad for p in model.projector_k.parameters())
    # the loss depends on the online branch only through autograd: predictor gets gradients
    loss.backward()
    assert model.predictor.linear_out.weight.grad is not None
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_queue_enqueue_and_wrap_around():
    model = small_moby(queue=8)
    assert torch.allclose(model.queue1.norm(dim=0), torch.ones(8))  # L2-normalised columns
    batches = [torch.full((2, 256), float(i)) for i in range(5)]
    for i, keys in enumerate(batches):
        model.dequeue_and_enqueue(keys, -keys)
        assert int(model.queue_ptr) == (2 * (i + 1)) % 8
    # 5 batches of 2 in a queue of 8: the 5th wrapped around onto columns 0-1
    assert torch.equal(model.queue1[:, 0:2], torch.full((256, 2), 4.0))
    assert torch.equal(model.queue1[:, 2:4], torch.full((256, 2), 1.0))
    assert torch.equal(model.queue2[:, 6:8], torch.full((256, 2), -3.0))


def test_queue_pointer_is_reread_after_loading_a_state_dict():
    source = small_moby(queue=8)
    source.queue_ptr.fill_(6)
    model = small_moby(queue=8)
    model.dequeue_and_enqueue(torch.zeros(2, 256), torch.zeros(2, 256))  # host pointer now 2
    model.load_state_dict(source.state_dict())
    model.dequeue_and_enqueue(torch.ones(2, 256), torch.ones(2, 256))
    assert torch.equal(model.queue1[:, 6:8], torch.ones(256, 2)) and int(model.queue_ptr) == 0


def test_queue_size_not_multiple_of_global_batch():
    model = small_moby(queue=10)
    with pytest.raises(UserError, match="multiple of the global batch"):
        model.dequeue_and_enqueue(torch.zeros(4, 256), torch.zeros(4, 256))
    config = tiny_config("DATA.BATCH_SIZE", "8", "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "4096")
    check_queue_size(config, world_size=8)  # 4096 % 64 == 0
    with pytest.raises(UserError, match=r"4096\).*\(24 ="):
        check_queue_size(config, world_size=3)


def test_moby_mlp_layout_matches_upstream_keys():
    mlp = MoBYMLP(in_dim=10, inner_dim=16, out_dim=6, num_layers=2)
    assert sorted(mlp.state_dict()) == sorted([
        "linear_hidden.1.weight", "linear_hidden.1.bias", "linear_hidden.2.weight", "linear_hidden.2.bias",
        "linear_hidden.2.running_mean", "linear_hidden.2.running_var", "linear_hidden.2.num_batches_tracked",
        "linear_out.weight", "linear_out.bias"])
    assert mlp(torch.randn(3, 10)).shape == (3, 6)
    assert isinstance(MoBYMLP(num_layers=1).linear_out, nn.Linear)
    assert len(MoBYMLP(in_dim=4, inner_dim=8, num_layers=3).linear_hidden) == 7


def test_norm_before_mlp_bn_really_builds_batchnorm():
    ln = build_encoder(tiny_config())
    bn = build_encoder(tiny_config("MODEL.SWIN.NORM_BEFORE_MLP", "bn"))
    blocks = [b for stage in bn.layers for b in stage.blocks]
    assert blocks and all(isinstance(b.norm2, TokenBatchNorm) for b in blocks)
    assert all(isinstance(b.norm2.bn, nn.BatchNorm1d) for b in blocks)
    assert all(isinstance(b.norm2, nn.LayerNorm) for stage in ln.layers for b in stage.blocks)
    before = blocks[0].norm2.bn.running_mean.clone()
    bn.train()(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, blocks[0].norm2.bn.running_mean)  # it is used in the forward
    with pytest.raises(UserError, match="NORM_BEFORE_MLP"):
        build_encoder(tiny_config("MODEL.SWIN.NORM_BEFORE_MLP", "gn"))


def test_token_batchnorm_normalises_each_channel_over_all_tokens():
    norm = TokenBatchNorm(3).train()
    x = torch.randn(2, 5, 3) * torch.tensor([1.0, 10.0, 100.0]) + torch.tensor([5.0, -2.0, 7.0])
    y = norm(x).reshape(-1, 3)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(0, unbiased=False), torch.ones(3), atol=1e-3)


def test_encoders_and_grad_checkpointing():
    swin = build_encoder(tiny_config("TRAIN.USE_CHECKPOINT", "True"))
    assert all(stage.grad_checkpointing for stage in swin.layers)
    assert swin(torch.randn(2, 3, 32, 32)).shape == (2, swin.num_features) and swin.num_features == 24
    deit = build_encoder(get_config(argparse.Namespace(cfg=str(CONFIGS / "moby_deit_cpu.yaml"), opts=None)))
    assert deit(torch.randn(2, 3, 32, 32)).shape == (2, 96)
    with pytest.raises(UserError, match="ENCODER"):
        build_encoder(tiny_config("MODEL.MOBY.ENCODER", "resnet"))


def test_weight_decay_groups_follow_upstream():
    model = build_moby(tiny_config(), steps_per_epoch=2)
    optimizer = build_optimizer(tiny_config(), model, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    plain = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert "encoder.layers.0.blocks.0.attn.relative_position_bias_table" in decayed  # as upstream
    assert "projector.linear_hidden.1.weight" in decayed and "predictor.linear_out.weight" in decayed
    assert "encoder.layers.0.blocks.0.attn.qkv.bias" in plain and "encoder.norm.weight" in plain
    assert not any(n.startswith(("encoder_k.", "projector_k.")) for n in decayed | plain)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable and not decayed & plain


def test_learning_rates_scale_with_global_batch_and_accumulation():
    config = tiny_config("DATA.BATCH_SIZE", "64", "TRAIN.BASE_LR", "0.001")
    scale_learning_rates(config, world_size=2)
    assert config.TRAIN.BASE_LR == pytest.approx(0.001 * 128 / 512)
    assert config.TRAIN.MIN_LR == pytest.approx(5e-6 * 0.25)
    assert config.TRAIN.WARMUP_LR == pytest.approx(5e-7 * 0.25)
    config = tiny_config("DATA.BATCH_SIZE", "64", "TRAIN.ACCUMULATION_STEPS", "4")
    scale_learning_rates(config, world_size=1)
    assert config.TRAIN.BASE_LR == pytest.approx(0.001 * 64 / 512 * 4)


def test_cosine_schedule_per_step_with_warmup():
    config = tiny_config("TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.BASE_LR", "0.1",
                         "TRAIN.WARMUP_LR", "0.001", "TRAIN.MIN_LR", "0.01")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=10)

    def lr_at(step):
        scheduler.step_update(step)
        return optimizer.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(0.001)
    assert lr_at(5) == pytest.approx(0.001 + 5 * (0.1 - 0.001) / 10)
    # timm's cosine runs over all 30 steps (warm-up included), as upstream configures it
    for step in (10, 20, 29):
        assert lr_at(step) == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * step / 30)))


def test_accumulation_is_upstreams_per_script():
    """moby_main.py never accumulates (ACCUMULATION_STEPS only scales the lr); moby_linear.py does;
    TRAIN.REAL_ACCUMULATION makes pre-training accumulate too."""
    assert accumulation_steps(tiny_config("TRAIN.ACCUMULATION_STEPS", "4")) == 1
    assert accumulation_steps(tiny_config("TRAIN.ACCUMULATION_STEPS", "4", "TRAIN.REAL_ACCUMULATION", "True")) == 4
    assert accumulation_steps(tiny_config("TRAIN.ACCUMULATION_STEPS", "4", "MODEL.TYPE", "linear")) == 4
    assert accumulation_steps(tiny_config("TRAIN.ACCUMULATION_STEPS", "0", "MODEL.TYPE", "linear")) == 1
