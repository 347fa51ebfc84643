"""Loading weights safely: no entry point runs code stored in a checkpoint unless trusted.

A planted checkpoint (a pickle whose unpickling would create a marker folder) is handed to every
entry point that reads weights or checkpoints; each one stops with the name of what it met and
the flag to pass for a trusted file, and the marker never appears. Checkpoints in the previous
format (argparse Namespace / yacs CfgNode / numpy generator state, timm keys) load with the flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dino import eval_knn as dino_knn
from dino import eval_linear, main_dino, nearest_neighbors, visualize_attention
from dino import export as dino_export
from dino.checkpoints import load_pretrained_backbone
from dino.models import build_backbone
from moby import eval_knn as moby_knn
from moby import export as moby_export
from moby import main_linear, main_moby
from moby import nearest_neighbors as moby_neighbors
from moby.backbones import build_encoder
from moby.checkpoint import from_upstream_layout, load_pretrained_encoder, to_upstream_layout
from moby.config import config_from_checkpoint
from moby.model import build_moby
from ssl_runtime.checkpoint import (UntrustedCheckpoint, load_checkpoint, pickle_concern, require_state_dict,
                                    unsafe_globals)
from ssl_runtime.errors import UserError
from tests.conftest import run_entry_quietly
from tests.test_moby_train import CPU_CFG, NAME, TINY

ROOT = Path(__file__).resolve().parents[1]
DINO_ARCH = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--device", "cpu"]
LINEAR = ["--n_last_blocks", "2", "--num_workers", "0"]
DINO_TRAIN = DINO_ARCH + ["--local_crop_size", "16", "--local_crops_number", "2", "--out_dim", "64",
                          "--batch_size_per_gpu", "4", "--warmup_epochs", "0", "--num_workers", "0",
                          "--use_fp16", "false"]
PLANTED_CALL = f"{os.mkdir.__module__}.mkdir"  # posix.mkdir on Linux


class Planted:
    """Unpickling this calls os.mkdir(marker): what an attacker's __reduce__ would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path: Path, marker: Path) -> Path:
    """A checkpoint whose every entry an entry point might read carries the planted call."""
    payload = Planted(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: payload for key in ("model", "student", "teacher", "state_dict", "config", "args")},
               path)
    return path


def moby_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--cfg", CPU_CFG, "--data-path", str(data), "--batch-size", "8", "--output", str(out),
            "--tag", "t", "--device", "cpu", *extra, "--opts", *TINY]


def test_the_planted_checkpoint_really_runs_code_when_fully_unpickled(tmp_path):
    marker = tmp_path / "marker"
    torch.load(plant(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.is_dir()  # so the tests below would notice if a loader ran it


# (name, entry point, argv given the planted file, the data folder and an output folder, flag)
def _dino_features(evil, data, out):
    for name in dino_knn.FEATURE_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(evil.read_bytes())
    return ["--load_features", str(out), "--device", "cpu"]


def _at(evil: Path, path: Path, argv: list[str]) -> list[str]:
    """Put the planted file where the entry point looks for its own checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(evil.read_bytes())
    return argv


ENTRY_POINTS = [
    ("dino eval_knn", dino_knn.main,
     lambda evil, data, out: DINO_ARCH + ["--pretrained_weights", str(evil), "--data_path", str(data),
                                          "--num_workers", "0"], "--trust_checkpoint"),
    ("dino eval_knn --load_features", dino_knn.main, _dino_features, "--trust_checkpoint"),
    ("dino eval_linear", eval_linear.main,
     lambda evil, data, out: DINO_ARCH + ["--pretrained_weights", str(evil), "--data_path", str(data),
                                          "--output_dir", str(out), *LINEAR], "--trust_checkpoint"),
    ("dino eval_linear resume", eval_linear.main,
     lambda evil, data, out: _at(evil, out / eval_linear.CHECKPOINT_NAME, DINO_ARCH + [
         "--data_path", str(data), "--output_dir", str(out), *LINEAR]), "--trust_checkpoint"),
    ("dino visualize_attention", visualize_attention.main,
     lambda evil, data, out: DINO_ARCH + ["--pretrained_weights", str(evil), "--output_dir", str(out),
                                          "--image_path", str(next((data / "val").glob("*/*.png")))],
     "--trust_checkpoint"),
    ("dino nearest_neighbors", nearest_neighbors.main,
     lambda evil, data, out: DINO_ARCH + ["--pretrained_weights", str(evil), "--data_path", str(data),
                                          "--num_workers", "0", "--png", str(out / "nn.png")],
     "--trust_checkpoint"),
    ("dino export", dino_export.main,
     lambda evil, data, out: ["--pretrained_weights", str(evil), "--output", str(out / "x")],
     "--trust_checkpoint"),
    ("dino resume", main_dino.main,
     lambda evil, data, out: _at(evil, out / "checkpoint.pth", DINO_TRAIN + [
         "--data_path", str(data), "--output_dir", str(out), "--epochs", "1"]), "--trust_checkpoint"),
    ("moby --resume", main_moby.main,
     lambda evil, data, out: moby_args(data, out, "--resume", str(evil)), "--trust-checkpoint"),
    ("moby auto-resume", main_moby.main,
     lambda evil, data, out: _at(evil, out / NAME / "t" / "checkpoint.pth", moby_args(data, out)),
     "--trust-checkpoint"),
    ("moby linear --pretrained", main_linear.main,
     lambda evil, data, out: moby_args(data, out, "--pretrained", str(evil)), "--trust-checkpoint"),
    ("moby linear auto-resume", main_linear.main,
     lambda evil, data, out: _at(evil, out / NAME / "t" / "linear" / "checkpoint.pth",
                                 moby_args(data, out, "--random-init")), "--trust-checkpoint"),
    ("moby eval_knn", moby_knn.main,
     lambda evil, data, out: moby_args(data, out, "--pretrained", str(evil)), "--trust-checkpoint"),
    ("moby nearest_neighbors", moby_neighbors.main,
     lambda evil, data, out: moby_args(data, out, "--pretrained", str(evil), "--png", str(out / "nn.png")),
     "--trust-checkpoint"),
    ("moby export", moby_export.main,
     lambda evil, data, out: ["--pretrained", str(evil), "--output", str(out / "x")], "--trust-checkpoint"),
    ("moby export --cfg", moby_export.main,
     lambda evil, data, out: ["--pretrained", str(evil), "--cfg", CPU_CFG, "--opts", *TINY,
                              "--output", str(out / "x")], "--trust-checkpoint"),
]


@pytest.mark.parametrize("name, entry, argv, flag", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_planted_checkpoint_is_refused_by_every_entry_point(name, entry, argv, flag, tmp_path,
                                                            tiny_imagefolder, capsys):
    marker = tmp_path / "marker"
    evil = plant(tmp_path / "evil.pth", marker)
    with pytest.raises(SystemExit) as info:
        run_entry_quietly(entry, argv(evil, tiny_imagefolder, tmp_path / "out"))
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert f"holds objects the safe loader does not rebuild ({PLANTED_CALL})" in err and flag in err
    assert not marker.exists()


WRONG_FILES = {
    "a list": [torch.ones(2), 3],
    "a dict of other entries": {"weights": torch.ones(2), "step": 3},
    # every entry our readers look up, each holding the wrong kind of thing
    "known entries of the wrong types": {
        "model": [torch.ones(2)], "student": ["weights"], "teacher": {1: torch.ones(2)},
        "optimizer": {}, "dino_loss": {}, "epoch": 1, "args": ["vit_pico"], "config": 3,
        "state_dict": ["w"], "scheduler": {}, "best_acc": 0.0, "encoder.x": torch.ones(2)},
    "training arguments of the wrong types": {
        "args": {"arch": 5, "patch_size": "4", "img_size": 32}, "teacher": {"cls_token": 1.0},
        "model": {"encoder.layers.0.x": 2}},
}


@pytest.mark.parametrize("kind", list(WRONG_FILES))
@pytest.mark.parametrize("name, entry, argv, flag", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_a_file_holding_something_else_is_a_one_line_error(name, entry, argv, flag, kind, tmp_path,
                                                           tiny_imagefolder, capsys):
    """Raw KeyError ('student', 'state_dict'), TypeError or AttributeError (a list) before."""
    path = tmp_path / "other.pth"
    torch.save(WRONG_FILES[kind], path)
    with pytest.raises(SystemExit) as info:
        run_entry_quietly(entry, argv(path, tiny_imagefolder, tmp_path / "out"))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and err.startswith("error: "), err


@pytest.mark.parametrize("state, found", [
    ([torch.ones(1)], "it is a list"), ({}, "it is an empty dict"),
    ({"a": torch.ones(1), "b": 2}, "it is a dict whose entry 'b' is not a tensor but int"),
    ({"a": torch.ones(1), 3: torch.ones(1)}, "it is a dict with the key 3 (int), not a parameter name")])
def test_require_state_dict_says_what_it_found(state, found):
    with pytest.raises(UserError) as info:
        require_state_dict(state, "'model' in f.pth", "the fix")
    assert str(info.value) == f"'model' in f.pth is not a state dict of tensors ({found}): the fix"
    good = {"a": torch.ones(1)}
    assert require_state_dict(good, "x", "y") is good


@pytest.mark.parametrize("entry, argv", [
    (dino_knn.main, lambda path, data: DINO_ARCH + ["--pretrained_weights", str(path), "--data_path", str(data),
                                                    "--num_workers", "0"]),
    (moby_knn.main, lambda path, data: moby_args(data, data.parent / "out", "--pretrained", str(path)))])
def test_truncated_safetensors_and_pickles_named_safetensors(entry, argv, tmp_path, tiny_imagefolder, capsys):
    """Both reached safetensors' own reader (torch.load also picks it by the name): SafetensorError."""
    whole = tmp_path / "whole.safetensors"
    save_file({"w": torch.ones(64)}, whole)
    (tmp_path / "truncated.safetensors").write_bytes(whole.read_bytes()[:-100])
    torch.save({"w": torch.ones(2)}, tmp_path / "pickle.safetensors")
    for name, message in (("truncated", "is truncated or corrupt"),
                          ("pickle", "is named .safetensors but is not a safetensors file")):
        with pytest.raises(SystemExit) as info:
            run_entry_quietly(entry, argv(tmp_path / f"{name}.safetensors", tiny_imagefolder))
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and "Traceback" not in err


MOBY_TRUSTING = [("main_moby", main_moby.main, ("--resume",)),
                 ("main_linear", main_linear.main, ("--pretrained",)),
                 ("eval_knn", moby_knn.main, ("--pretrained",))]


@pytest.mark.parametrize("name, entry, flag", MOBY_TRUSTING, ids=[e[0] for e in MOBY_TRUSTING])
def test_a_config_file_cannot_switch_trust_on(name, entry, flag, tmp_path, tiny_imagefolder, capsys):
    marker = tmp_path / "marker"
    evil = plant(tmp_path / "evil.pth", marker)
    cfg = tmp_path / "trusting.yaml"
    cfg.write_text(f"BASE: ['{CPU_CFG}']\nMODEL:\n  TRUST_CHECKPOINT: True\n")
    argv = moby_args(tiny_imagefolder, tmp_path / "out", *flag, str(evil))
    argv[argv.index(CPU_CFG)] = str(cfg)
    with pytest.raises(SystemExit) as info:
        run_entry_quietly(entry, argv)
    assert info.value.code == 2 and not marker.exists()
    assert f"MODEL.TRUST_CHECKPOINT is set in config file {cfg}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the scanner

@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("zipped", [True, False])
def test_unsafe_globals_are_named_without_unpickling(tmp_path, protocol, zipped):
    marker, path = tmp_path / "marker", tmp_path / "f.pth"
    torch.save({"a": Planted(marker), "b": argparse.Namespace(x=1), "c": torch.zeros(2)}, path,
               pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
    assert unsafe_globals(path) == [PLANTED_CALL, "argparse.Namespace"]
    with pytest.raises(UntrustedCheckpoint):
        load_checkpoint(path)
    assert not marker.exists()


def with_data_pkl(path: Path, pickled: bytes) -> Path:
    """A torch.save zip whose data.pkl is replaced by `pickled`."""
    torch.save({"w": torch.ones(1)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, pickled if name.endswith("/data.pkl") else data)
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("zipped", [True, False])
def test_a_weak_torch_check_never_sees_a_refused_file(tmp_path, monkeypatch, zipped):
    """torch's weights-only check could be bypassed before torch 2.6 (CVE-2025-32434): stand-in, a
    torch.load that ignores weights_only. The file is refused by our scan before it gets there."""
    marker = tmp_path / "marker"
    torch.save({"model": Planted(marker)}, tmp_path / "evil.pth", _use_new_zipfile_serialization=zipped)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: real_load(*a, **{**kw, "weights_only": False}))
    with pytest.raises(UntrustedCheckpoint, match=PLANTED_CALL):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_legacy_format_is_refused_even_when_it_holds_only_tensors(tmp_path, capsys):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UntrustedCheckpoint, match=r"legacy \(non-zip\) format.*pass --trust_checkpoint"):
        load_checkpoint(path)
    assert torch.equal(load_checkpoint(path, trust=True)["w"], torch.arange(3.0))
    assert "legacy (non-zip) format" in capsys.readouterr().out  # the warning


def test_every_import_opcode_is_checked(tmp_path):
    """INST (protocol 0) imports and calls like GLOBAL + REDUCE; torch's zip reader takes any
    pickle in data.pkl. Extension codes import through copyreg's registry."""
    marker = tmp_path / "marker"
    inst = with_data_pkl(tmp_path / "inst.pth", b"(S'" + str(marker).encode() + b"'\ni"
                         + PLANTED_CALL.replace(".", "\n").encode() + b"\n.")
    with pytest.raises(UntrustedCheckpoint, match=rf"\({PLANTED_CALL}\)"):
        load_checkpoint(inst)
    ext = with_data_pkl(tmp_path / "ext.pth", b"\x80\x02\x82\x07)R.")  # EXT1 7, (), REDUCE
    with pytest.raises(UntrustedCheckpoint, match="extension code 7"):
        load_checkpoint(ext)
    assert not marker.exists()


def test_torchscript_archives_are_refused(tmp_path):
    """torch.load hands a TorchScript archive to torch.jit.load (torch 2.1 even under weights_only)."""
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pth")
    with pytest.raises(UntrustedCheckpoint, match="TorchScript archive"):
        load_checkpoint(tmp_path / "scripted.pth")


def test_what_the_scan_allows_is_what_our_writers_and_official_weights_need(tmp_path):
    tensors = {str(dtype): torch.zeros(2, dtype=dtype) for dtype in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64)}
    torch.save({"model": OrderedDict(tensors), "p": torch.nn.Parameter(torch.ones(2)), "epoch": 3,
                "args": {"lr": 0.1, "sizes": (1, 2)}}, tmp_path / "ok.pth")
    assert pickle_concern(tmp_path / "ok.pth") is None
    loaded = load_checkpoint(tmp_path / "ok.pth")
    assert all(loaded["model"][k].dtype == v.dtype for k, v in tensors.items()) and loaded["epoch"] == 3


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_and_damaged_files(tmp_path):
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"m": Planted(tmp_path / "marker")}, protocol=5))
    with pytest.raises(UntrustedCheckpoint, match=PLANTED_CALL):
        load_checkpoint(raw)
    damaged = tmp_path / "damaged.pth"
    torch.save({"w": torch.ones(3)}, damaged)
    data = bytearray(damaged.read_bytes())
    start = data.index(b"data.pkl") + 30  # inside the pickle: garbage opcodes
    data[start:start + 8] = b"\x00" * 8
    damaged.write_bytes(bytes(data))
    with pytest.raises(Exception) as info:
        load_checkpoint(damaged)
    assert not isinstance(info.value, UntrustedCheckpoint) and "truncated or corrupt" in str(info.value)
    assert not (tmp_path / "marker").exists()


def test_trusted_flag_on_a_safe_file_changes_nothing(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "ok.pth")
    assert load_checkpoint(tmp_path / "ok.pth", trust=True)["epoch"] == 3
    assert "warning" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- previous format, trusted

def test_previous_dino_format_resumes_only_with_the_trust_flag(tmp_path, tiny_imagefolder, capsys):
    out = tmp_path / "out"
    train = DINO_TRAIN + ["--data_path", str(tiny_imagefolder), "--output_dir", str(out)]
    run_entry_quietly(main_dino.main, train + ["--epochs", "1"])
    checkpoint = load_checkpoint(out / "checkpoint.pth")  # the new format reads safely
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["arch"] == "vit_pico"
    # what earlier versions (and upstream, for `args`) wrote: a Namespace, numpy's generator state
    checkpoint["args"] = argparse.Namespace(**checkpoint["args"])
    checkpoint["rng"]["numpy"] = np.random.get_state()
    torch.save(checkpoint, out / "checkpoint.pth")
    capsys.readouterr()

    with pytest.raises(SystemExit):
        run_entry_quietly(main_dino.main, train + ["--epochs", "2"])
    err = capsys.readouterr().err
    assert "argparse.Namespace" in err and "numpy" in err and "--trust_checkpoint" in err
    text = run_entry_quietly(main_dino.main, train + ["--epochs", "2", "--trust_checkpoint"])
    assert "reading it with the full unpickler because --trust_checkpoint was given" in text
    assert "resumed student, teacher, optimizer, dino_loss" in text and "Epoch: [1/2]" in text
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 2  # written back in the new format
    # an official full checkpoint (args as a Namespace) evaluates with the flag
    torch.save({"teacher": checkpoint["teacher"], "args": checkpoint["args"]}, tmp_path / "full.pth")
    model = build_backbone("vit_pico", 4, 32)
    with pytest.raises(UntrustedCheckpoint, match="argparse.Namespace"):
        load_pretrained_backbone(model, str(tmp_path / "full.pth"), "teacher")
    load_pretrained_backbone(model, str(tmp_path / "full.pth"), "teacher", trust=True)


def test_previous_moby_format_resumes_only_with_the_trust_flag(tmp_path, tiny_imagefolder, capsys):
    main_moby.main(moby_args(tiny_imagefolder, tmp_path, "--epochs", "1"))
    path = tmp_path / NAME / "t" / "checkpoint.pth"
    checkpoint = load_checkpoint(path)
    config = config_from_checkpoint(checkpoint["config"], str(path))
    model = build_moby(config, 3)
    # earlier versions: the CfgNode itself, timm's Swin keys, numpy's generator state
    old = {**checkpoint, "config": config, "model": from_upstream_layout(checkpoint["model"], model)}
    old["rng"] = {**checkpoint["rng"], "numpy": np.random.get_state()}
    assert "encoder.layers.1.downsample.reduction.weight" in old["model"]  # really timm's layout
    torch.save(old, path)
    capsys.readouterr()

    with pytest.raises(SystemExit):
        main_moby.main(moby_args(tiny_imagefolder, tmp_path, "--epochs", "2"))
    err = capsys.readouterr().err
    assert "yacs.config.CfgNode" in err and "--trust-checkpoint" in err
    main_moby.main(moby_args(tiny_imagefolder, tmp_path, "--epochs", "2", "--trust-checkpoint"))
    out = capsys.readouterr().out
    assert "because --trust-checkpoint was given" in out and "Train: [1/2]" in out
    resumed = load_checkpoint(path)
    assert resumed["epoch"] == 1 and "encoder.layers.0.downsample.reduction.weight" in resumed["model"]
    # the same old file as --pretrained of an export, trusted
    torch.save(old, tmp_path / "old.pth")
    run_entry_quietly(moby_export.main, ["--pretrained", str(tmp_path / "old.pth"), "--trust-checkpoint",
                             "--output", str(tmp_path / "x")])
    assert (tmp_path / "x.safetensors").is_file()


# ----------------------------------------------------------------------------- .safetensors

def test_safetensors_weights_are_accepted(tmp_path, capsys):
    dino = build_backbone("vit_pico", 4, 32)
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, tmp_path / "dino.safetensors")
    fresh = build_backbone("vit_pico", 4, 32)
    load_pretrained_backbone(fresh, str(tmp_path / "dino.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(dino.state_dict().values(), fresh.state_dict().values()))

    config = config_from_checkpoint({"MODEL": {"SWIN": {"EMBED_DIM": 12, "DEPTHS": [1, 1], "NUM_HEADS": [1, 2],
                                                        "WINDOW_SIZE": 4, "PATCH_SIZE": 2}},
                                     "DATA": {"IMG_SIZE": 32}}, "test")
    encoder = build_encoder(config)
    # a bare encoder in timm's keys (moby/export.py) and in upstream's, as .safetensors
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, tmp_path / "timm.safetensors")
    upstream = to_upstream_layout(encoder.state_dict(), encoder)
    save_file({k: v.contiguous() for k, v in upstream.items()}, tmp_path / "upstream.safetensors")
    for name in ("timm", "upstream"):
        fresh = build_encoder(config)
        load_pretrained_encoder(fresh, tmp_path / f"{name}.safetensors", logging.getLogger("t"))
        assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), fresh.state_dict().values()))
