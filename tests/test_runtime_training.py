"""Schedules, EMA, weight-decay groups, optimizers, meters and loggers."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from ssl_runtime import meters
from ssl_runtime.ema import ema_update_
from ssl_runtime.logs import setup_logger
from ssl_runtime.compat import fused_optimizer_devices
from ssl_runtime.optim import LARS, build_optimizer, param_groups_weight_decay
from ssl_runtime.schedules import cosine_momentum, cosine_schedule


def test_cosine_schedule_values():
    s = cosine_schedule(1.0, 0.0, epochs=3, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.2)
    assert len(s) == 12
    assert s[:4] == pytest.approx([0.2, 0.4666667, 0.7333333, 1.0])  # linspace including the end
    assert s[4] == pytest.approx(1.0)  # cosine starts at base after warm-up
    assert s[4 + 4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))  # halfway
    assert s[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    no_warmup = cosine_schedule(0.04, 0.4, epochs=2, niter_per_ep=5)
    assert no_warmup[0] == pytest.approx(0.04) and np.all(np.diff(no_warmup) > 0)


def test_moby_momentum_rises_from_base_to_one():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)


def test_ema_matches_the_formula():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    online = [torch.nn.Parameter(torch.tensor([3.0, 4.0])), torch.nn.Parameter(torch.tensor([[10.0]]))]
    ema_update_(target, online, momentum=0.9)
    assert target[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4])
    assert target[1].item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ema_update_(target, online[:1], 0.9)


def test_weight_decay_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, plain = param_groups_weight_decay(model, 0.05)
    assert [p.shape for p in decay["params"]] == [(4, 4)]
    assert len(plain["params"]) == 4 and plain["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    decay, plain = param_groups_weight_decay(model, 0.05, skip_names={"0.weight"})
    assert decay["params"] == []


def test_optimizers_pick_device_kernels():
    params = [torch.nn.Parameter(torch.ones(2))]
    adamw = build_optimizer("adamw", [{"params": params}], "cpu", lr=0.1)
    fused_on_cpu = "cpu" in fused_optimizer_devices()  # not in torch 2.1: foreach there
    assert isinstance(adamw, torch.optim.AdamW) and bool(adamw.defaults["fused"]) == fused_on_cpu
    assert bool(adamw.defaults["foreach"]) != fused_on_cpu
    sgd = build_optimizer("sgd", [{"params": params}], "cpu", lr=0.1, nesterov=True)
    assert sgd.defaults["nesterov"] and bool(sgd.defaults.get("fused")) == fused_on_cpu  # no fused SGD in 2.1
    assert isinstance(build_optimizer("lars", [{"params": params}], "cpu"), LARS)
    from ssl_runtime.errors import UserError
    with pytest.raises(UserError, match="adamw, sgd, lars"):
        build_optimizer("adam", [{"params": params}], "cpu")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_kernels_update_like_the_plain_optimizer(name):
    """The fused CPU kernel is a speed-up only: five steps land where torch's reference loop does."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(5)]
    fast = [torch.nn.Parameter(t.clone()) for t in start]
    plain = [torch.nn.Parameter(t.clone()) for t in start]
    settings = dict(lr=0.05, weight_decay=0.1)
    fused = build_optimizer(name, [{"params": fast}], "cpu", momentum=0.9, **settings)
    reference = (torch.optim.AdamW(plain, foreach=False, **settings) if name == "adamw"
                 else torch.optim.SGD(plain, momentum=0.9, foreach=False, **settings))
    for step_grads in grads:
        for params, opt in ((fast, fused), (plain, reference)):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
    # float64: each step rounds ~10 times (1.1e-16 of |p| + lr each), 5 steps stay below 1e-14;
    # a different formula (eps placement, decoupled decay, Nesterov) moves p by 1e-4 or more
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.equal(fast[0], start[0])


def test_lars_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w, b]}], lr=1.0, weight_decay=0.0, momentum=0.9, eta=0.001)
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    opt.step()
    # trust ratio = eta * |w| / |g| = 0.001 * 5 / 2; 1-D bias gets the raw gradient
    assert w.flatten().tolist() == pytest.approx([3.0, 4.0 - 0.0025 * 2.0])
    assert b.item() == pytest.approx(0.5)


def test_smoothed_value_accepts_device_tensors_lazily():
    v = meters.SmoothedValue(window_size=3)
    for x in (1.0, torch.tensor(2.0), torch.tensor(6.0), 3.0):
        v.update(x)
    assert v.global_avg == pytest.approx(3.0) and v.median == pytest.approx(3.0)
    assert str(v) == "3.000000 (3.000000)"


def test_metric_logger_prints_upstream_lines(capsys):
    logger = meters.MetricLogger(delimiter="  ")
    for i in logger.log_every(range(3), print_freq=2, header="Epoch: [0/100]"):
        logger.update(loss=torch.tensor(float(i)), lr=0.5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"Epoch: \[0/100\]  \[0/3\]  eta: \d:\d\d:\d\d  loss: 0\.000000 \(0\.000000\)  "
                    r"lr: 0\.500000 \(0\.500000\)  time: \d+\.\d{6}  data: \d+\.\d{6}$", lines[0])
    assert lines[1].startswith("Epoch: [0/100]  [2/3]") and "loss: 1.000000 (1.000000)" in lines[1]
    assert re.match(r"Epoch: \[0/100\] Total time: 0:00:00 \(\d+\.\d{6} s / it\)", lines[2])
    assert str(logger).startswith("loss: 1.000000 (1.000000)")


def test_throughput_meter_excludes_warm_up(monkeypatch):
    clock = iter([10.0, 11.0, 12.0, 13.0, 14.0])  # step 2 starts the clock; one second per step
    monkeypatch.setattr(meters.time, "perf_counter", lambda: next(clock))
    meter = meters.ThroughputMeter(global_batch_size=64, warmup_steps=2, total_steps=6)
    for _ in range(6):
        meter.step()
    assert meter.timed_steps == 4 and meter.sec_per_step == pytest.approx(1.0)
    assert meter.summary_line() == ("Throughput: 64.00 images/s (1.0000 s/step over 4 steps after "
                                    "2 warm-up, global batch 64)")
    short = meters.ThroughputMeter(8, warmup_steps=50, total_steps=4)
    assert short.warmup_steps == 2


def test_average_meter():
    m = meters.AverageMeter()
    m.update(2.0, n=2)
    m.update(5.0)
    assert (m.val, m.avg, m.count) == (5.0, 3.0, 3)


def test_logger_console_on_rank0_and_a_file_per_rank(tmp_path, capsys):
    log0 = setup_logger("t0", str(tmp_path), rank=0)
    log1 = setup_logger("t1", str(tmp_path), rank=1)
    log0.info("from zero")
    log1.info("from one")
    out = capsys.readouterr().out
    assert "from zero" in out and "from one" not in out
    assert "from one" in (tmp_path / "log_rank1.txt").read_text()
    assert re.search(r"^\[\S+ \S+ t0\] \(test_runtime_training.py \d+\): INFO from zero$",
                     (tmp_path / "log_rank0.txt").read_text(), re.M)
