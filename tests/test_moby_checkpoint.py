"""MoBY checkpoints: upstream key layout, round trip and resume, official (upstream-Swin) layout."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import pytest
import torch

from moby.checkpoint import (auto_resume_path, from_upstream_layout, load_pretrained_encoder, resume,
                             save_checkpoint, to_upstream_layout)
from moby.config import get_config, set_values
from moby.model import build_linear_classifier, build_moby
from moby.optimization import build_optimizer, build_scheduler
from ssl_runtime.amp import NullScaler
from ssl_runtime.checkpoint import load_state_dict_checked
from ssl_runtime.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_SWIN = ["MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS", "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]",
             "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "16", "MODEL.NUM_CLASSES", "3"]
LOG = logging.getLogger("test_moby_checkpoint")


def tiny_config(output: Path | str = ""):
    return get_config(argparse.Namespace(cfg=str(CONFIGS / "moby_swin_cpu.yaml"), opts=TINY_SWIN,
                                         output=str(output), tag="t"))


def trained_moby(config, seed=0):
    """A tiny MoBY after one optimizer step (so optimizer state and queues are non-trivial)."""
    torch.manual_seed(seed)
    model = build_moby(config, steps_per_epoch=4)
    optimizer = build_optimizer(config, model, "cpu")
    scheduler = build_scheduler(config, optimizer, 4)
    x = torch.randn(4, 3, 32, 32)
    model(x, x.flip(-1)).backward()
    optimizer.step()
    scheduler.step_update(1)
    return model, optimizer, scheduler


def to_upstream_swin_layout(state: dict, prefix: str) -> dict:
    """Rewrite timm-layout encoder keys the way upstream's Swin names them: each stage's patch
    merging sits at the END of the previous stage, and relative_position_index / attn_mask
    buffers are stored."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            key = re.sub(r"layers\.(\d+)\.downsample",
                         lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
            if key.endswith("attn.relative_position_bias_table"):
                base = key[: -len("relative_position_bias_table")]
                out[base + "relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
                out[key.replace("attn.relative_position_bias_table", "attn_mask")] = torch.zeros(4, 16, 16)
        out[key] = value
    return out


def test_checkpoint_layout_round_trip_and_resume(tmp_path):
    config = tiny_config(tmp_path)
    os.makedirs(config.OUTPUT)
    model, optimizer, scheduler = trained_moby(config)
    save_checkpoint(config, 3, model, 0.5, optimizer, scheduler, NullScaler(), LOG)
    out = Path(config.OUTPUT)
    assert (out / "ckpt_epoch_3.pth").is_file() and (out / "checkpoint.pth").is_file()
    saved = torch.load(out / "checkpoint.pth", weights_only=True)  # plain values only
    # upstream's keys, plus ours for an exact (also mid-epoch) resume
    assert set(saved) == {"model", "optimizer", "lr_scheduler", "max_accuracy", "epoch", "config", "amp",
                          "epoch_step", "rng"}
    prefixes = {k.split(".")[0] for k in saved["model"]}
    assert prefixes == {"encoder", "encoder_k", "projector", "projector_k", "predictor",
                        "queue1", "queue2", "queue_ptr"}
    assert saved["epoch"] == 3 and saved["config"]["MODEL"]["NAME"] == config.MODEL.NAME

    fresh_config = tiny_config(tmp_path)
    set_values(fresh_config, **{"MODEL.RESUME": str(out / "checkpoint.pth")})
    fresh, fresh_opt, fresh_sched = trained_moby(fresh_config, seed=1)
    max_acc = resume(fresh_config, fresh, fresh_opt, fresh_sched, NullScaler(), LOG)
    assert max_acc == 0.5 and fresh_config.TRAIN.START_EPOCH == 4
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    state_a, state_b = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(state_a[i]["exp_avg"], state_b[i]["exp_avg"]) for i in state_a)


def test_resume_reads_scaler_state_under_either_name(tmp_path):
    config = tiny_config(tmp_path)
    model, optimizer, scheduler = trained_moby(config)

    class RecordingScaler(NullScaler):
        loaded = None

        def load_state_dict(self, state):
            self.loaded = state

    for key in ("amp", "scaler"):
        path = tmp_path / f"{key}.pth"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict(), "epoch": 0, key: {"scale": 1024.0}}, path)
        set_values(config, **{"MODEL.RESUME": str(path)})
        scaler = RecordingScaler()
        resume(config, model, optimizer, scheduler, scaler, LOG)
        assert scaler.loaded == {"scale": 1024.0}


def test_auto_resume_prefers_checkpoint_pth_then_newest(tmp_path):
    assert auto_resume_path(tmp_path) is None
    (tmp_path / "ckpt_epoch_0.pth").write_bytes(b"x")
    newer = tmp_path / "ckpt_epoch_1.pth"
    newer.write_bytes(b"x")
    past = time.time() - 100
    os.utime(tmp_path / "ckpt_epoch_0.pth", (past, past))
    assert auto_resume_path(tmp_path) == newer
    (tmp_path / "checkpoint.pth").write_bytes(b"x")
    assert auto_resume_path(tmp_path) == tmp_path / "checkpoint.pth"


def test_official_layout_loads_into_moby_and_linear_classifier(tmp_path):
    config = tiny_config(tmp_path)
    model, _, _ = trained_moby(config)
    official = to_upstream_swin_layout(to_upstream_swin_layout(model.state_dict(), "encoder."), "encoder_k.")
    assert "encoder.layers.0.downsample.reduction.weight" in official  # really the upstream layout
    with pytest.raises(UserError):  # it does not load as is
        load_state_dict_checked(build_moby(config, 4), official, "raw")

    fresh = build_moby(config, 4)
    load_state_dict_checked(fresh, from_upstream_layout(official, fresh), "converted")
    x = torch.randn(2, 3, 32, 32)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(model.encoder(x), fresh.encoder(x))
        assert torch.allclose(model.encoder_k(x), fresh.encoder_k(x))
    assert torch.equal(model.queue1, fresh.queue1)

    # resuming from it restores the weights only: its optimizer state follows upstream's order
    path = tmp_path / "moby_official.pth"
    model_opt = build_optimizer(config, model, "cpu")
    torch.save({"model": official, "optimizer": model_opt.state_dict(), "epoch": 7,
                "lr_scheduler": build_scheduler(config, model_opt, 4).state_dict()}, path)
    set_values(config, **{"MODEL.RESUME": str(path)})
    again = build_moby(config, 4)
    again_opt = build_optimizer(config, again, "cpu")
    resume(config, again, again_opt, build_scheduler(config, again_opt, 4), NullScaler(), LOG)
    assert config.TRAIN.START_EPOCH == 0 and torch.equal(again.queue2, model.queue2)

    classifier = build_linear_classifier(config, drop_path_rate=0.0).eval()
    head_before = classifier.head.fc.weight.clone()
    load_pretrained_encoder(classifier, path, LOG)
    with torch.no_grad():
        assert torch.allclose(classifier.forward_head(classifier.forward_features(x), pre_logits=True),
                              model.encoder(x))
    assert torch.equal(classifier.head.fc.weight, head_before)  # the head is not taken from the file


def test_pretrained_encoder_errors(tmp_path):
    config = tiny_config(tmp_path)
    classifier = build_linear_classifier(config, drop_path_rate=0.0)
    empty = tmp_path / "empty.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, empty)
    with pytest.raises(UserError, match="no 'encoder.' weights"):
        load_pretrained_encoder(classifier, empty, LOG)
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_encoder(classifier, tmp_path / "missing.pth", LOG)
    other = get_config(argparse.Namespace(cfg=str(CONFIGS / "moby_swin_cpu.yaml"), opts=None))
    wrong = tmp_path / "wrong_arch.pth"
    torch.save({"model": build_moby(other, 1).state_dict()}, wrong)
    with pytest.raises(UserError, match="does not match"):
        load_pretrained_encoder(classifier, wrong, LOG)


# ----------------------------------------------------------------------------- upstream's key layout

UPSTREAM = json.loads((Path(__file__).with_name("upstream_moby_layout.json")).read_text())


def layout(state: dict) -> dict:
    return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state.items()}


def buffer_hashes(state: dict, tag: str = "") -> dict:
    return {tag + k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in state.items() if k.endswith(("relative_position_index", "attn_mask"))}


def assert_upstream_layout(ours: dict, expected: dict) -> None:
    """What upstream's load_state_dict(strict=True) demands: the same keys, each of the same shape."""
    assert sorted(set(expected) - set(ours)) == [], "keys upstream's model has and ours lacks"
    assert sorted(set(ours) - set(expected)) == [], "keys upstream's model would reject"
    assert layout(ours) == expected


def test_saved_checkpoints_load_into_upstreams_models_strictly(tmp_path):
    """A MoBY and a linear-evaluation checkpoint of ours, read back through the safe loader, hold
    exactly the keys, shapes and buffer values of upstream's models (moby_swin_cpu: shifted and
    unshifted windows, a window clamped to the last stage's 4x4 tokens)."""
    expected = UPSTREAM["moby_swin_cpu"]
    # the fixture was generated with the YAML's earlier queue of 4096 keys (the queues' shapes)
    config = get_config(argparse.Namespace(cfg=str(CONFIGS / "moby_swin_cpu.yaml"), output=str(tmp_path),
                                           opts=["MODEL.NUM_CLASSES", str(expected["num_classes"]),
                                                 "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "4096"]))
    model = build_moby(config, 4)
    optimizer = build_optimizer(config, model, "cpu")
    save_checkpoint(config, 0, model, 0.0, optimizer, build_scheduler(config, optimizer, 4), NullScaler(), LOG)
    saved = torch.load(Path(config.OUTPUT) / "checkpoint.pth", weights_only=True)["model"]
    assert_upstream_layout(saved, expected["moby"])

    set_values(config, OUTPUT=str(tmp_path / "linear"))
    classifier = build_linear_classifier(config, 0.1)
    optimizer = build_optimizer(config, classifier, "cpu")
    save_checkpoint(config, 0, classifier, 0.0, optimizer, build_scheduler(config, optimizer, 4), NullScaler(), LOG)
    linear = torch.load(tmp_path / "linear" / "checkpoint.pth", weights_only=True)["model"]
    assert_upstream_layout(linear, expected["linear"])
    assert {**buffer_hashes(saved), **buffer_hashes(linear, "linear:")} == expected["buffer_sha256"]


@pytest.mark.parametrize("name", ["moby_swin_tiny", "moby_deit_small"])
def test_full_size_layouts_match_upstream(name):
    """Swin-T and DeiT-S as configured for ImageNet (built on the meta device: names and shapes)."""
    expected = UPSTREAM[name]
    config = get_config(argparse.Namespace(cfg=str(CONFIGS / f"{name}.yaml"),
                                           opts=["MODEL.NUM_CLASSES", str(expected["num_classes"])]))
    with torch.device("meta"):
        model, classifier = build_moby(config, 4), build_linear_classifier(config, 0.1)
    ours = to_upstream_layout(model.state_dict(), model)
    linear = to_upstream_layout(classifier.state_dict(), classifier)
    assert_upstream_layout(ours, expected["moby"])
    assert_upstream_layout(linear, expected["linear"])
    assert {**buffer_hashes(ours), **buffer_hashes(linear, "linear:")} == expected["buffer_sha256"]


def test_upstream_layout_round_trip_is_exact():
    config = tiny_config()
    model, _, _ = trained_moby(config)
    state = model.state_dict()
    back = from_upstream_layout(to_upstream_layout(state, model), model)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
