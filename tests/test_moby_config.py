"""MoBY's yacs configuration: defaults, YAML merge with BASE inheritance, --opts, CLI shortcuts
and clear errors for unknown keys."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from moby.cli import UPSTREAM_WORKERS, add_pretrain_limits, base_parser, parse_config
from moby.config import default_config, get_config, save_config
from ssl_runtime.cpu_layout import plan_workers
from ssl_runtime.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def args_for(cfg, opts=None, **extra) -> argparse.Namespace:
    return argparse.Namespace(cfg=str(cfg), opts=opts, **extra)


def test_defaults_match_upstream():
    c = default_config()
    assert (c.DATA.BATCH_SIZE, c.DATA.IMG_SIZE) == (64, 224)
    # NUM_WORKERS -1 (automatic) is upstream's 8 on an accelerator
    assert plan_workers(c.DATA.NUM_WORKERS, "cuda", UPSTREAM_WORKERS, light_pipeline=False) == 8
    assert c.MODEL.SWIN.DEPTHS == [2, 2, 6, 2] and c.MODEL.SWIN.NUM_HEADS == [3, 6, 12, 24]
    assert c.MODEL.SWIN.NORM_BEFORE_MLP == "ln"
    moby = c.MODEL.MOBY
    assert (moby.ONLINE_DROP_PATH_RATE, moby.TARGET_DROP_PATH_RATE) == (0.1, 0.0)
    assert (moby.CONTRAST_MOMENTUM, moby.CONTRAST_TEMPERATURE) == (0.99, 0.2)
    assert moby.CONTRAST_NUM_NEGATIVE == 4096
    t = c.TRAIN
    assert (t.EPOCHS, t.WARMUP_EPOCHS, t.WEIGHT_DECAY, t.BASE_LR, t.WARMUP_LR, t.MIN_LR, t.CLIP_GRAD) == \
        (300, 20, 0.05, 5e-4, 5e-7, 5e-6, 5.0)
    assert t.OPTIMIZER.BETAS == (0.9, 0.999) and t.LR_SCHEDULER.NAME == "cosine"
    assert (c.SAVE_FREQ, c.PRINT_FREQ, c.SEED, c.TAG) == (1, 10, 0, "default")
    # our additions have neutral defaults
    assert (t.STEPS, t.MAX_EPOCHS, c.DEVICE) == (0, 0, "auto")


def test_swin_tiny_yaml_and_output_folder(tmp_path):
    c = get_config(args_for(CONFIGS / "moby_swin_tiny.yaml", output=str(tmp_path), tag="run1"))
    assert (c.TRAIN.EPOCHS, c.TRAIN.WARMUP_EPOCHS, c.TRAIN.BASE_LR) == (300, 5, 0.001)
    assert c.AUG.SSL_AUG is True and c.MODEL.TYPE == "moby"
    assert c.MODEL.MOBY.ONLINE_DROP_PATH_RATE == 0.2
    assert c.OUTPUT == str(tmp_path / c.MODEL.NAME / "run1")
    assert c.is_frozen()
    saved = save_config(c, tmp_path)
    assert saved.name == "config.json" and "CONTRAST_NUM_NEGATIVE: 4096" in saved.read_text()


def test_base_inheritance_and_override():
    bn = get_config(args_for(CONFIGS / "moby_swin_tiny_bn.yaml"))
    tiny = get_config(args_for(CONFIGS / "moby_swin_tiny.yaml"))
    assert bn.MODEL.SWIN.NORM_BEFORE_MLP == "bn" and tiny.MODEL.SWIN.NORM_BEFORE_MLP == "ln"
    assert bn.TRAIN.BASE_LR == tiny.TRAIN.BASE_LR == 0.001  # inherited from the base file
    assert bn.MODEL.NAME != tiny.MODEL.NAME and "_bn_" in bn.MODEL.NAME


def test_nested_base_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("TRAIN:\n  EPOCHS: 7\n  BASE_LR: 0.5\n")
    (tmp_path / "b.yaml").write_text("BASE: ['a.yaml']\nTRAIN:\n  EPOCHS: 9\n")
    c = get_config(args_for(tmp_path / "b.yaml"))
    assert (c.TRAIN.EPOCHS, c.TRAIN.BASE_LR) == (9, 0.5)


def test_opts_then_cli_shortcuts_win():
    parser = base_parser("t")
    add_pretrain_limits(parser)
    args, c = parse_config(parser, ["--cfg", str(CONFIGS / "moby_swin_cpu.yaml"),
                                    "--opts", "TRAIN.EPOCHS", "3", "MODEL.SWIN.DEPTHS", "[1, 1]",
                                    "DATA.BATCH_SIZE", "16",
                                    "--batch-size", "32", "--steps", "5", "--max_epochs", "2",
                                    "--accumulation-steps", "2", "--use-checkpoint", "--tag", "x",
                                    "--local-rank", "1", "--device", "cpu"])
    assert c.TRAIN.EPOCHS == 3 and c.MODEL.SWIN.DEPTHS == [1, 1]
    assert c.DATA.BATCH_SIZE == 32  # --batch-size is applied after --opts, as upstream
    assert (c.TRAIN.STEPS, c.TRAIN.MAX_EPOCHS, c.TRAIN.ACCUMULATION_STEPS) == (5, 2, 2)
    assert c.TRAIN.USE_CHECKPOINT is True and c.TAG == "x" and c.LOCAL_RANK == 1
    assert c.DEVICE == "cpu" and c.AMP_OPT_LEVEL == "O1"  # upstream's default level
    args, c = parse_config(parser, ["--cfg", str(CONFIGS / "moby_swin_cpu.yaml"), "--epochs", "4"])
    assert c.TRAIN.EPOCHS == 4 and c.DEVICE == "auto" and c.LOCAL_RANK == 0


def test_amp_dtype_key_and_flag():
    parser = base_parser("t")
    cfg = str(CONFIGS / "moby_swin_cpu.yaml")
    assert parse_config(parser, ["--cfg", cfg])[1].AMP_DTYPE == "fp16"  # upstream's fp16 by default
    assert parse_config(parser, ["--cfg", cfg, "--amp-dtype", "bf16"])[1].AMP_DTYPE == "bf16"
    assert parse_config(parser, ["--cfg", cfg, "--opts", "AMP_DTYPE", "bf16"])[1].AMP_DTYPE == "bf16"
    with pytest.raises(UserError, match="AMP_DTYPE is 'fp8': use one of fp16, bf16"):
        parse_config(parser, ["--cfg", cfg, "--opts", "AMP_DTYPE", "fp8"])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("TRAIN:\n  EPOCHZ: 3\n")
    with pytest.raises(UserError) as err:
        get_config(args_for(bad))
    assert "TRAIN.EPOCHZ" in str(err.value) and str(bad) in str(err.value)


def test_unknown_key_in_base_file_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_text("MODEL:\n  MOBY:\n    QUEUE: 3\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\n")
    with pytest.raises(UserError) as err:
        get_config(args_for(tmp_path / "child.yaml"))
    assert "MODEL.MOBY.QUEUE" in str(err.value) and "base.yaml" in str(err.value)


def test_unknown_key_and_bad_pairs_in_opts():
    with pytest.raises(UserError, match=r"TRAIN\.EPOCHZ in --opts"):
        get_config(args_for(CONFIGS / "moby_swin_cpu.yaml", opts=["TRAIN.EPOCHZ", "3"]))
    with pytest.raises(UserError, match="KEY VALUE pairs"):
        get_config(args_for(CONFIGS / "moby_swin_cpu.yaml", opts=["TRAIN.EPOCHS"]))
    with pytest.raises(UserError, match="--opts"):
        get_config(args_for(CONFIGS / "moby_swin_cpu.yaml", opts=["TRAIN.EPOCHS", "'many'"]))


def test_trust_comes_from_the_command_line_only(tmp_path):
    """MODEL.TRUST_CHECKPOINT switches on the unpickler that runs code: refused in a YAML file (also
    one inherited through BASE) and in --opts; the flag still sets it. False (as config.json
    records a run without the flag) changes nothing and is accepted."""
    (tmp_path / "trusting.yaml").write_text(f"BASE: ['{CONFIGS / 'moby_swin_cpu.yaml'}']\n"
                                            "MODEL:\n  TRUST_CHECKPOINT: True\n")
    (tmp_path / "child.yaml").write_text("BASE: ['trusting.yaml']\n")
    for name in ("trusting.yaml", "child.yaml"):
        with pytest.raises(UserError, match=r"MODEL.TRUST_CHECKPOINT is set in config file .*trusting.yaml: "
                                            r".* pass --trust-checkpoint"):
            get_config(args_for(tmp_path / name))
    for value in ("True", "False"):
        with pytest.raises(UserError, match=r"MODEL.TRUST_CHECKPOINT is set in --opts"):
            get_config(args_for(CONFIGS / "moby_swin_cpu.yaml", opts=["MODEL.TRUST_CHECKPOINT", value]))
    assert get_config(args_for(CONFIGS / "moby_swin_cpu.yaml", trust_checkpoint=True)).MODEL.TRUST_CHECKPOINT
    saved = save_config(get_config(args_for(CONFIGS / "moby_swin_cpu.yaml")), tmp_path)
    assert "TRUST_CHECKPOINT: false" in saved.read_text()
    assert get_config(args_for(saved)).MODEL.TRUST_CHECKPOINT is False
    # a run made with the flag records False too, so its config.json can be passed back as --cfg
    trusted_run = tmp_path / "trusted_run"
    trusted_run.mkdir()
    saved = save_config(get_config(args_for(CONFIGS / "moby_swin_cpu.yaml", trust_checkpoint=True)), trusted_run)
    assert get_config(args_for(saved)).MODEL.TRUST_CHECKPOINT is False


def test_base_cycles_and_non_utf8_files_are_named(tmp_path):
    """A RecursionError and a UnicodeDecodeError before."""
    (tmp_path / "self.yaml").write_text("BASE: ['self.yaml']\n")
    (tmp_path / "a.yaml").write_text("BASE: ['b.yaml']\n")
    (tmp_path / "b.yaml").write_text("BASE: ['a.yaml']\n")
    with pytest.raises(UserError, match=r"self.yaml inherits from itself through BASE \(self.yaml -> self.yaml\)"):
        get_config(args_for(tmp_path / "self.yaml"))
    with pytest.raises(UserError, match=r"a.yaml inherits from itself through BASE \(a.yaml -> b.yaml -> a.yaml\)"):
        get_config(args_for(tmp_path / "a.yaml"))
    (tmp_path / "diamond.yaml").write_text("BASE: ['left.yaml', 'right.yaml']\n")
    for side in ("left", "right"):
        (tmp_path / f"{side}.yaml").write_text("BASE: ['root.yaml']\n")
    (tmp_path / "root.yaml").write_text("TRAIN:\n  EPOCHS: 7\n")
    assert get_config(args_for(tmp_path / "diamond.yaml")).TRAIN.EPOCHS == 7  # shared, not a cycle
    (tmp_path / "latin1.yaml").write_bytes("TAG: 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        get_config(args_for(tmp_path / "latin1.yaml"))
    (tmp_path / "utf8.yaml").write_bytes("TAG: 'caf\u00e9'\n".encode("utf-8-sig"))  # with a byte-order mark
    assert get_config(args_for(tmp_path / "utf8.yaml")).TAG == "caf\u00e9"


def test_missing_config_file_and_zip_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        get_config(args_for(tmp_path / "nope.yaml"))
    parser = base_parser("t")
    for flag in (["--zip"], ["--cache-mode", "full"]):
        with pytest.raises(UserError, match="not supported"):
            parse_config(parser, ["--cfg", str(CONFIGS / "moby_swin_cpu.yaml"), *flag])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("moby_*.yaml")))
def test_every_shipped_config_loads(name):
    c = get_config(args_for(CONFIGS / name))
    assert c.MODEL.TYPE == "moby" and c.AUG.SSL_AUG
    if name.endswith("_linear.yaml"):
        assert c.LINEAR_EVAL.EPOCHS > 0
