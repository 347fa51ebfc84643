"""Atomic checkpoint writes, corrupt files, and explained state-dict mismatches."""

from __future__ import annotations

import errno

import pytest
import torch

from ssl_runtime import checkpoint as ckpt
from ssl_runtime.errors import UserError


def test_round_trip_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out" / "checkpoint.pth"
    ckpt.save_atomic({"epoch": 3, "w": torch.arange(4)}, path)
    loaded = ckpt.load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt.save_atomic({"epoch": 1}, path)

    def no_space(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match="No space left.*previous checkpoint is untouched"):
        ckpt.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_truncated_and_missing_checkpoints_are_reported(tmp_path):
    path = tmp_path / "checkpoint.pth"
    ckpt.save_atomic({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)
    with pytest.raises(UserError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pth")


def test_strip_prefixes_handles_nested_wrappers():
    sd = {"module.backbone.blocks.0.w": 1, "backbone.norm.w": 2, "head.w": 3}
    assert ckpt.strip_prefixes(sd, ("module.", "backbone.")) == {"blocks.0.w": 1, "norm.w": 2, "head.w": 3}


def test_checked_load_explains_mismatches():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    good = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    ckpt.load_state_dict_checked(model, good, "weights")
    assert torch.all(model[0].weight == 1)

    partial = {k: v for k, v in good.items() if k.startswith("0.")}
    with pytest.raises(UserError, match=r"2 missing key\(s\): 1.weight, 1.bias"):
        ckpt.load_state_dict_checked(model, partial, "weights")
    assert ckpt.load_state_dict_checked(model, partial, "weights", ignore_missing=("1.",)) == ["1.weight", "1.bias"]

    extra = dict(good, **{"head.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="unexpected key.*head.weight"):
        ckpt.load_state_dict_checked(model, extra, "weights")

    wrong = dict(good, **{"0.weight": torch.zeros(5, 2)})
    with pytest.raises(UserError, match=r"shape mismatch.*0.weight \(5, 2\) vs \(3, 2\)"):
        ckpt.load_state_dict_checked(model, wrong, "weights")
