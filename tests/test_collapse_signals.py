"""Collapse signals against hand-computed values, the once-only collapse warning on synthetic
collapsed and healthy runs, and the train lines that carry the signals still parsing."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from dino.loss import COLLAPSE_KL_FRACTION, DINOLoss, collapse_kind
from dino.main_dino import dino_collapse_diagnosis
from moby.engine import log_train_line
from moby.model import contrastive_terms, similarity_signals
from moby.monitoring import SIM_GAP_FLOOR_IN_TEMPERATURES, moby_collapse_diagnosis
from ssl_runtime import plot_log, report
from ssl_runtime.collapse import CollapseWatch
from ssl_runtime.meters import MetricLogger, SmoothedValue


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def kl(p: list[float], q: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(p, q) if x > 0)


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


# ---------------------------------------------------------------- DINO's signals

def test_dino_signals_by_hand():
    # out_dim 2, one image, two crops, zero centre, teacher temperature 0.5, student temperature 1
    loss_fn = DINOLoss(2, 2, 0.5, 0.5, 0, 1, student_temp=1.0).double()
    teacher = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64)
    student = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    p0, p1 = softmax([0.0, 1.0]), softmax([1.0, 0.0])  # (t - 0) / 0.5
    q0, q1 = softmax([2.0, 0.0]), softmax([0.0, 0.0])
    loss = loss_fn(student, teacher, 0)
    assert loss_fn.teacher_entropy.item() == pytest.approx((entropy(p0) + entropy(p1)) / 2, rel=1e-12)
    # the loss pairs teacher view 0 with student view 1 and teacher view 1 with student view 0
    assert loss_fn.kl.item() == pytest.approx((kl(p0, q1) + kl(p1, q0)) / 2, rel=1e-12)
    assert loss.item() == pytest.approx(loss_fn.teacher_entropy.item() + loss_fn.kl.item(), rel=1e-12)
    assert loss_fn.max_entropy == pytest.approx(math.log(2))
    assert loss_fn.teacher_entropy.requires_grad is False and loss_fn.kl.requires_grad is False


def test_dino_signals_are_the_entropy_and_kl_of_each_pair_with_multi_crop():
    torch.manual_seed(0)
    ncrops, batch, out_dim = 4, 3, 5
    loss_fn = DINOLoss(out_dim, ncrops, 0.04, 0.04, 0, 1).double()
    loss_fn.center.copy_(torch.randn(1, out_dim) * 0.1)
    center = loss_fn.center.clone()
    student = torch.randn(ncrops * batch, out_dim, dtype=torch.float64)
    teacher = torch.randn(2 * batch, out_dim, dtype=torch.float64)
    loss_fn(student, teacher, 0)
    p = F.softmax((teacher - center) / 0.04, dim=-1).chunk(2)
    q = F.softmax(student / 0.1, dim=-1).chunk(ncrops)
    entropies, kls = [], []
    for t in range(2):
        for b in range(batch):
            entropies.append(entropy(p[t][b].tolist()))
            kls += [kl(p[t][b].tolist(), q[s][b].tolist()) for s in range(ncrops) if s != t]
    assert loss_fn.teacher_entropy.item() == pytest.approx(sum(entropies) / len(entropies), rel=1e-10)
    assert loss_fn.kl.item() == pytest.approx(sum(kls) / len(kls), rel=1e-10)


def test_dino_signals_of_the_two_collapses():
    out_dim = 16
    uniform = DINOLoss(out_dim, 2, 0.04, 0.04, 0, 1)
    uniform(torch.zeros(2, out_dim), torch.zeros(2, out_dim), 0)  # constant output: uniform teacher
    assert uniform.teacher_entropy.item() == pytest.approx(math.log(out_dim), rel=1e-6)
    assert abs(uniform.kl.item()) < 1e-5  # float32 roundoff of ln 16 = 2.77
    assert collapse_kind(uniform.teacher_entropy.item(), uniform.kl.item(), math.log(out_dim)) == "uniform"
    # no centring (the centre never moves) and one dominant dimension: a one-hot teacher
    one_hot = DINOLoss(out_dim, 2, 0.04, 0.04, 0, 1, center_momentum=1.0)
    peaked = torch.zeros(2, out_dim)
    peaked[:, 3] = 5.0
    one_hot(peaked, peaked, 0)
    assert one_hot.teacher_entropy.item() < 1e-6 and abs(one_hot.kl.item()) < 1e-6
    kind = collapse_kind(one_hot.teacher_entropy.item(), one_hot.kl.item(), math.log(out_dim))
    assert kind == "one dimension"


def test_collapse_kind_thresholds():
    ln_k = math.log(4096)
    limit = COLLAPSE_KL_FRACTION * ln_k
    assert collapse_kind(0.9 * ln_k, limit * 1.001, ln_k) is None  # the KL decides
    assert collapse_kind(0.9 * ln_k, limit * 0.999, ln_k) == "uniform"
    assert collapse_kind(0.1 * ln_k, limit * 0.999, ln_k) == "one dimension"
    assert collapse_kind(0.1 * ln_k, float("nan"), ln_k) is None


# ---------------------------------------------------------------- MoBY's signals

def test_moby_similarities_by_hand():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    key = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    queue = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)  # columns are keys
    terms = contrastive_terms(query, key, queue, 0.2)
    assert terms.positive_similarity.item() == pytest.approx((0.6 + 1.0) / 2)
    # query 0 against the queue: 1, 0, -1; query 1: 0, 1, 0
    assert terms.negative_similarity.item() == pytest.approx((1 + 0 - 1 + 0 + 1 + 0) / 6)
    other = contrastive_terms(key, query, queue, 0.2)  # positive 0.6, 1; negatives 0.6, 0.8, -0.6, 0, 1, 0
    signals = similarity_signals([terms, other])
    assert signals["pos_sim"].item() == pytest.approx(0.8)
    assert signals["neg_sim"].item() == pytest.approx((1 / 6 + 1.8 / 6) / 2)
    assert signals["sim_gap"].item() == pytest.approx(0.8 - (1 / 6 + 1.8 / 6) / 2)


# ---------------------------------------------------------------- the watch

def test_watch_waits_for_warmup_and_patience_then_warns_once():
    said = []
    watch = CollapseWatch(lambda v: "bad" if v["x"] < 0 else None, start_step=20, patience=3, log=said.append)
    for step in (0, 10):
        assert watch.observe(step, {"x": -1}) is None  # warm-up: not watched
    assert watch.observe(20, {"x": -1}) is None and watch.observe(30, {"x": -1}) is None
    assert watch.observe(40, {"x": 1}) is None  # a healthy reading resets the count
    for step in (50, 60):
        assert watch.observe(step, {"x": -1}) is None
    warning = watch.observe(70, {"x": -1})
    assert warning == "WARNING: training may have collapsed (steps 50-70, 3 checks in a row): bad"
    assert said == [warning]
    assert watch.observe(80, {"x": -1}) is None and said == [warning]  # only once


def run_dino_watch(outputs, center_momentum: float = 0.9, checks: int = 12) -> list[str]:
    """A synthetic DINO run: `outputs()` gives (student, teacher) outputs per step, the loss's
    signals feed a watch at every step as the training loop feeds it at print steps."""
    out_dim = 64
    loss_fn = DINOLoss(out_dim, 2, 0.04, 0.04, 0, 1, center_momentum=center_momentum)
    said: list[str] = []
    watch = CollapseWatch(dino_collapse_diagnosis(loss_fn.max_entropy), start_step=2, patience=5,
                          log=said.append)
    for step in range(checks):
        student, teacher = outputs(out_dim)
        loss_fn(student, teacher, 0)
        watch.observe(step, {"teacher_entropy": loss_fn.teacher_entropy.item(), "kl": loss_fn.kl.item()})
    return said


def test_dino_watch_warns_on_constant_outputs_only():
    said = run_dino_watch(lambda k: (torch.zeros(4, k), torch.full((4, k), 0.3)))
    assert len(said) == 1
    assert "(100% of ln(out_dim))" in said[0] and "close to uniform" in said[0]
    assert "--teacher_temp" in said[0] and "--momentum_teacher" in said[0] and "--out_dim" in said[0]

    def one_hot(k):
        peaked = torch.zeros(4, k)
        peaked[:, 0] = 5.0
        return peaked, peaked
    said = run_dino_watch(one_hot, center_momentum=1.0)  # no centring
    assert len(said) == 1 and "sits on one dimension" in said[0] and "(0% of ln(out_dim))" in said[0]

    generator = torch.Generator().manual_seed(0)
    assert run_dino_watch(lambda k: (torch.randn(4, k, generator=generator),
                                     torch.randn(4, k, generator=generator))) == []


def run_moby_watch(keys, queue) -> list[str]:
    said: list[str] = []
    watch = CollapseWatch(moby_collapse_diagnosis(0.2), start_step=0, patience=5, log=said.append)
    for step in range(8):
        terms = [contrastive_terms(keys, keys, queue, 0.2)] * 2
        watch.observe(step, {name: value.item() for name, value in similarity_signals(terms).items()})
    return said


def test_moby_watch_warns_when_all_keys_are_alike_only():
    point = F.normalize(torch.ones(8, 16), dim=1)  # every image mapped to one point
    said = run_moby_watch(point, point[0].repeat(32, 1).T)
    assert len(said) == 1 and "sim_gap 0.0000" in said[0] and "CONTRAST_MOMENTUM" in said[0]
    assert f"{SIM_GAP_FLOOR_IN_TEMPERATURES * 0.2:.4f}" in said[0]
    generator = torch.Generator().manual_seed(0)
    spread = F.normalize(torch.randn(8, 16, generator=generator), dim=1)
    queue = F.normalize(torch.randn(16, 32, generator=generator), dim=0)
    assert run_moby_watch(spread, queue) == []


# ---------------------------------------------------------------- the lines still parse

def test_dino_line_with_signals_keeps_upstreams_fields_first(capsys):
    logger = MetricLogger(delimiter="  ")
    for _ in logger.log_every(range(1), 10, "Epoch: [0/100]"):
        logger.update(loss=torch.tensor(7.5), lr=0.001, wd=0.04,
                      teacher_entropy=torch.tensor(7.25), kl=torch.tensor(0.25))
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("Epoch: [0/100]  [0/1]  eta: 0:00:00  loss: 7.500000 (7.500000)  lr: 0.001000 "
                           "(0.001000)  wd: 0.040000 (0.040000)  teacher_entropy: 7.250000 (7.250000)  "
                           "kl: 0.250000 (0.250000)  time: ")
    assert report.DINO_LOSS.findall(line) == ["7.500000"]


def test_moby_line_with_signals_appends_them_after_upstreams(tmp_path):
    lines: list[str] = []
    state = types.SimpleNamespace(optimizer=types.SimpleNamespace(param_groups=[{"lr": 0.001}]),
                                  ctx=types.SimpleNamespace(device=torch.device("cpu")),
                                  logger=types.SimpleNamespace(info=lines.append))
    config = types.SimpleNamespace(TRAIN=types.SimpleNamespace(EPOCHS=100))
    meters = {name: SmoothedValue() for name in ("loss", "norm", "pos_sim", "neg_sim", "sim_gap")}
    values = {"loss": 16.5, "norm": 2.0, "pos_sim": 0.75, "neg_sim": 0.25, "sim_gap": 0.5}
    for name, value in values.items():
        meters[name].update(torch.tensor(value))
    batch_time = types.SimpleNamespace(val=0.1, avg=0.2)
    signals = {name: meters[name] for name in ("pos_sim", "neg_sim", "sim_gap")}
    log_train_line(config, 0, 10, 312, batch_time, state, meters["loss"], meters["norm"], signals)
    log_train_line(config, 0, 10, 312, batch_time, state, meters["loss"], meters["norm"])  # linear eval
    assert lines[0] == lines[1] + ("\tpos_sim 0.7500 (0.7500)\tneg_sim 0.2500 (0.2500)"
                                   "\tsim_gap 0.5000 (0.5000)")
    assert lines[1] == ("Train: [0/100][10/312]\teta 0:01:00 lr 0.001000\ttime 0.1000 (0.2000)\t"
                        "loss 16.5000 (16.5000)\tgrad_norm 2.0000 (2.0000)\tmem 0MB")
    throughput = "Throughput: 1.0 images/s (1.0 s/step over 1 steps"
    (tmp_path / "log_rank0.txt").write_text(f"{lines[0]}\n{throughput}\n")
    assert report.parse_train_log(tmp_path / "log_rank0.txt").loss == "16.5000"
    record = plot_log.read_log(tmp_path / "log_rank0.txt")[0]
    assert record == {"epoch": pytest.approx(10 / 312), "train_lr": 0.001, "train_loss": 16.5,
                      "train_pos_sim": 0.75, "train_neg_sim": 0.25, "train_sim_gap": 0.5}


def test_plot_draws_signal_panels(tmp_path):
    records = [{"epoch": e, "train_loss": 8.0 - e, "train_lr": 1e-3, "train_teacher_entropy": 7.0,
                "train_kl": 0.5 + e, "ln_out_dim": math.log(4096)} for e in range(3)]
    assert plot_log.panels_of(records) == {"loss": ["train_loss"], "learning rate": ["train_lr"],
                                           plot_log.ENTROPY_PANEL: ["train_kl", "train_teacher_entropy"]}
    moby = [{"epoch": 0.5, "train_loss": 9.0, "train_sim_gap": 0.1, "train_pos_sim": 0.5,
             "train_neg_sim": 0.4}]
    assert plot_log.panels_of(moby)["similarity (cosine)"] == ["train_neg_sim", "train_pos_sim",
                                                               "train_sim_gap"]
    png = plot_log.plot_logs({"run": records}, tmp_path / "log.png")
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (3 * 400, 320)



# ---------------------------------------------------------------- the k-NN probe

def test_knn_probe_on_raw_pixels(tiny_imagefolder, cpu_ctx):
    from dino.augment import eval_transform
    from ssl_runtime.data import SafeImageFolder
    from ssl_runtime.knn import KnnProbe

    transform = eval_transform(32)
    probe = KnnProbe(SafeImageFolder(tiny_imagefolder / "train", transform=transform),
                     SafeImageFolder(tiny_imagefolder / "val", transform=transform), 2, cpu_ctx,
                     batch_size=8, num_workers=0)
    assert [probe.due(epoch) for epoch in range(4)] == [False, True, False, True]
    backbone = torch.nn.Flatten().train()
    # raw pixels separate the classes (which third of the image is bright): every neighbour agrees
    assert probe(backbone) == 100.0
    assert backbone.training  # the probe puts the backbone back in training mode
    assert probe.line(1, 100.0, "raw pixels") == ("k-NN probe after epoch 1: 20-NN top-1 100.00 % "
                                                  "(raw pixels; 24 train / 24 val images)")


def test_dino_knn_probe_needs_val_beside_the_training_folder(tmp_path, cpu_ctx):
    from dino.main_dino import build_knn_probe, get_args_parser
    from ssl_runtime.errors import UserError
    from tests.conftest import make_imagefolder

    root = make_imagefolder(tmp_path / "data", splits=("train",))
    args = get_args_parser().parse_args(["--knn_every", "1"])
    with pytest.raises(UserError, match=r"--knn_every needs labelled validation images in .*val"):
        build_knn_probe(args, root / "train", cpu_ctx)
    assert build_knn_probe(get_args_parser().parse_args([]), root / "train", cpu_ctx) is None
