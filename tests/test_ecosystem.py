"""Export to timm, TensorBoard scalars, log plots, neighbour grids, attention grids, timm baselines.

Two short real runs (DINO and MoBY on a tiny ImageFolder) are shared by the module's tests.
"""

from __future__ import annotations

import argparse
import builtins
import copy
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml

from dino import export as dino_export
from dino import main_dino
from dino.checkpoints import load_pretrained_backbone
from dino.models import build_backbone
from moby import export as moby_export
from moby import main_moby
from moby.backbones import build_encoder
from moby.checkpoint import load_pretrained_encoder
from moby.config import config_from_checkpoint, config_to_dict, get_config
from moby.model import build_moby
from ssl_runtime.monitor import TrainingMonitor
from ssl_runtime.timm_interop import swin_spec, vit_spec
from tests.conftest import make_imagefolder, run_entry_quietly

ROOT = Path(__file__).resolve().parents[1]
DINO_ARCH = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32"]
DINO_TRAIN = DINO_ARCH + ["--device", "cpu", "--local_crop_size", "16", "--local_crops_number", "2",
                          "--out_dim", "64", "--batch_size_per_gpu", "4", "--warmup_epochs", "0",
                          "--num_workers", "0", "--use_fp16", "false", "--epochs", "2"]
MOBY_CFG = str(ROOT / "configs" / "moby_swin_cpu.yaml")
MOBY_TINY = ["MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS", "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]",
             "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "32", "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1",
             "TRAIN.WARMUP_EPOCHS", "0"]


@pytest.fixture(autouse=True)
def restore_print(monkeypatch):
    # the entry points silence print() on non-main ranks by wrapping it: undo after each test
    monkeypatch.setattr(builtins, "print", builtins.print)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("eco") / "data", classes=3, per_class=8)


@pytest.fixture(scope="module")
def dino_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dino_run")
    run_entry_quietly(main_dino.main, DINO_TRAIN + ["--data_path", str(data), "--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def moby_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moby_run")
    run_entry_quietly(main_moby.main, ["--cfg", MOBY_CFG, "--data-path", str(data), "--batch-size", "8",
                                 "--output", str(out), "--tag", "t", "--device", "cpu", "--epochs", "2",
                                 "--opts", *MOBY_TINY])
    (folder,) = [p.parent for p in out.glob("*/t/checkpoint.pth")]
    return folder


def scalar_tags(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("events.out.tfevents.*")), f"no events file in {folder}"
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------- TensorBoard and log.txt

def test_dino_training_writes_tensorboard_scalars(dino_run):
    scalars = scalar_tags(dino_run / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/wd", "train/momentum", "train/teacher_temp",
                "train/images_per_sec", "epoch/loss"):
        assert tag in scalars, sorted(scalars)
    # 2 epochs of 6 steps, written every 10 steps: steps 0 and 10; one epoch summary per epoch
    assert [s.step for s in scalars["train/loss"]] == [0, 10]
    assert [s.step for s in scalars["epoch/loss"]] == [0, 1]
    assert scalars["train/teacher_temp"][0].value == pytest.approx(0.04)
    assert scalars["train/momentum"][0].value == pytest.approx(0.996)
    lines = [json.loads(line) for line in (dino_run / "log.txt").read_text().splitlines()]
    assert scalars["epoch/loss"][1].value == pytest.approx(lines[1]["train_loss"], rel=1e-5)


def test_moby_training_writes_tensorboard_scalars_and_json_log(moby_run):
    scalars = scalar_tags(moby_run / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/wd", "train/momentum", "train/images_per_sec", "epoch/loss"):
        assert tag in scalars, sorted(scalars)
    assert [s.step for s in scalars["train/loss"]] == list(range(6))  # PRINT_FREQ 1, 3 steps x 2 epochs
    start = yaml.safe_load(Path(MOBY_CFG).read_text())["MODEL"]["MOBY"]["CONTRAST_MOMENTUM"]
    assert scalars["train/momentum"][0].value == pytest.approx(start)  # the schedule's first value
    lines = [json.loads(line) for line in (moby_run / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert {"train_loss", "train_lr", "train_wd"} <= set(lines[0])


def test_monitor_without_tensorboard_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if missing
    monitor = TrainingMonitor(tmp_path / "tb", every=1)
    assert "tensorboard package is not installed" in capsys.readouterr().out
    for step, loss in enumerate((1.0, 2.0, 6.0)):
        monitor.step(step, loss=torch.tensor(loss), lr=0.5)
    assert monitor.end_epoch(0) == {"loss": 3.0, "lr": 0.5}
    monitor.close()
    assert not (tmp_path / "tb").exists()


def test_monitor_is_silent_off_rank_zero(tmp_path):
    monitor = TrainingMonitor(tmp_path / "tb", is_main=False)
    monitor.step(0, loss=torch.tensor(1.0))
    assert monitor.end_epoch(0) == {} and monitor.writer is None
    assert not (tmp_path / "tb").exists()


# ---------------------------------------------------------------- export to timm

def _printed_call(output: str) -> str:
    return next(line.strip()[len("model = "):] for line in output.splitlines()
                if line.strip().startswith("model = timm.create_model("))


def _assert_same_features(ours: torch.nn.Module, theirs: torch.nn.Module, size: int) -> None:
    """Same features in float64, where two builds of one network agree to ~1e-15 on any CPU (sums
    of < 2**14 terms per layer); a missing or misplaced weight changes them by 1e-2 or more."""
    torch.manual_seed(1)
    images = torch.randn(3, 3, size, size, dtype=torch.float64)
    ours, theirs = copy.deepcopy(ours).eval().double(), copy.deepcopy(theirs).eval().double()
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(images), theirs.forward_features(images),
                              rtol=0, atol=1e-9)
        assert torch.allclose(ours(images), theirs(images), rtol=0, atol=1e-9)


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_dino_checkpoint_exports_to_timm(dino_run, tmp_path, key):
    output = run_entry_quietly(dino_export.main, ["--pretrained_weights", str(dino_run / "checkpoint.pth"),
                                           "--checkpoint_key", key, "--output", str(tmp_path / key)])
    assert "timm model: vit_tiny_patch16_224" in output
    ours = build_backbone("vit_pico", 4, 32)
    load_pretrained_backbone(ours, str(dino_run / "checkpoint.pth"), key)
    call = _printed_call(output)
    for fmt in ("safetensors", "pth"):
        path = tmp_path / f"{key}.{fmt}"
        assert path.is_file()
        # the printed line itself, pointed at each file, is what a user runs
        theirs = eval(call.replace(str(tmp_path / f"{key}.safetensors"), str(path)), {"timm": timm})
        _assert_same_features(ours, theirs, 32)
    teacher_vs_student = torch.load(tmp_path / f"{key}.pth")["blocks.0.attn.qkv.weight"]
    assert torch.equal(teacher_vs_student, ours.state_dict()["blocks.0.attn.qkv.weight"])


def test_dino_official_resnet50_exports_to_timm(tmp_path):
    """DINO's ResNet-50 is torchvision's; its keys and network are timm's resnet50 as well."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    reference.fc = torch.nn.Identity()
    with torch.no_grad():  # trained-like BN statistics, so that eval-mode features depend on them
        for bn in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "dino_resnet50_pretrain.pth")
    output = run_entry_quietly(dino_export.main, [
        "--pretrained_weights", str(tmp_path / "dino_resnet50_pretrain.pth"), "--arch", "resnet50",
        "--img_size", "64", "--formats", "safetensors", "--output", str(tmp_path / "r50")])
    assert "timm model: resnet50" in output
    theirs = eval(_printed_call(output), {"timm": timm}).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(theirs(images), reference.eval()(images), atol=1e-5, rtol=1e-4)


def _moby_config(cfg: str, *opts: str):
    return get_config(argparse.Namespace(cfg=str(ROOT / "configs" / cfg), opts=list(opts)))


def _assert_moby_roundtrip(checkpoint: Path, key: str, out: Path, size: int, expected_name: str) -> None:
    output = run_entry_quietly(moby_export.main, ["--pretrained", str(checkpoint), "--checkpoint_key", key,
                                           "--output", str(out)])
    assert f"timm model: {expected_name}" in output
    config = config_from_checkpoint(torch.load(checkpoint, weights_only=True)["config"], str(checkpoint))
    ours = build_encoder(config, num_classes=0)
    load_pretrained_encoder(ours, checkpoint, __import__("logging").getLogger("t"), prefix=key + ".")
    call = _printed_call(output)
    for fmt in ("safetensors", "pth"):
        path = out.with_name(f"{out.name}.{fmt}")
        theirs = eval(call.replace(str(out.with_name(out.name + ".safetensors")), str(path)), {"timm": timm})
        assert set(theirs.state_dict()) == set(ours.state_dict())
        _assert_same_features(ours, theirs, size)


@pytest.mark.parametrize("key", ["encoder", "encoder_k"])
def test_moby_swin_checkpoint_exports_to_timm(moby_run, tmp_path, key):
    _assert_moby_roundtrip(moby_run / "checkpoint.pth", key, tmp_path / key, 32, "swin_tiny_patch4_window7_224")


def test_moby_deit_checkpoint_exports_to_timm(tmp_path):
    config = _moby_config("moby_deit_cpu.yaml", "MODEL.DEIT.DEPTH", "2", "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "32")
    torch.manual_seed(0)
    moby = build_moby(config, steps_per_epoch=1)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": moby.state_dict(), "config": config_to_dict(config), "epoch": 0}, checkpoint)
    _assert_moby_roundtrip(checkpoint, "encoder", tmp_path / "deit", 32, "deit_tiny_patch16_224")


def test_export_refuses_swin_with_batchnorm_before_mlp(tmp_path, capsys):
    config = _moby_config("moby_swin_cpu.yaml", "MODEL.SWIN.NORM_BEFORE_MLP", "bn", "MODEL.SWIN.DEPTHS", "[1, 1]",
                          "MODEL.SWIN.NUM_HEADS", "[1, 2]", "MODEL.SWIN.EMBED_DIM", "12",
                          "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "32")
    torch.save({"model": build_moby(config, 1).state_dict(), "config": config_to_dict(config)}, tmp_path / "bn.pth")
    with pytest.raises(SystemExit) as exit_info:
        moby_export.main(["--pretrained", str(tmp_path / "bn.pth"), "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "NORM_BEFORE_MLP 'bn'" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


def test_timm_names_of_standard_and_custom_sizes():
    assert vit_spec(384, 12, 6, 16, 224, tag="dino").name == "vit_small_patch16_224.dino"
    assert vit_spec(384, 12, 6, 8, 224, tag="dino").name == "vit_small_patch8_224.dino"
    assert vit_spec(768, 12, 12, 16, 224, tag="dino").name == "vit_base_patch16_224.dino"
    assert vit_spec(384, 12, 6, 16, 224, family="deit").name == "deit_small_patch16_224"
    pico = vit_spec(96, 2, 3, 4, 32, tag="dino")
    assert pico.name == "vit_tiny_patch16_224"  # no .dino weights for custom sizes
    assert pico.kwargs == {"embed_dim": 96, "depth": 2, "num_heads": 3, "patch_size": 4, "img_size": 32}
    assert "num_classes=0, embed_dim=96, depth=2" in pico.python_call("x.safetensors")
    tiny = swin_spec(96, [2, 2, 6, 2], [3, 6, 12, 24], 4, 7, 224)
    assert (tiny.name, tiny.kwargs) == ("swin_tiny_patch4_window7_224", {})
    base384 = swin_spec(128, [2, 2, 18, 2], [4, 8, 16, 32], 4, 12, 384)
    assert (base384.name, base384.kwargs) == ("swin_base_patch4_window12_384", {})


# ---------------------------------------------------------------- plots and pictures

def png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here
        return image.size


@pytest.fixture(scope="module")
def fashion_mnist() -> Path:
    from ssl_runtime.data import resolve_data_path
    from ssl_runtime.errors import UserError

    try:
        return resolve_data_path(None, need=("train", "val"))
    except UserError as exc:  # CI installs the Debian package; a bare machine may lack it
        pytest.skip(f"default dataset unavailable: {exc}")


def test_plot_dino_and_moby_logs(dino_run, moby_run, tmp_path):
    from ssl_runtime import plot_log

    run_entry_quietly(plot_log.main, [str(dino_run / "log.txt"), "--png", str(tmp_path / "dino.png")])
    # loss, lr and collapse-signal (teacher entropy, KL) panels, 400 x 320 each
    assert png_size(tmp_path / "dino.png") == (1200, 320)
    # MoBY: the JSON log.txt, and the text log of a run without one (several series in one picture)
    run_entry_quietly(plot_log.main,
                      [str(moby_run), str(moby_run / "log_rank0.txt"), "--png", str(tmp_path / "m.png")])
    assert png_size(tmp_path / "m.png") == (1200, 320)  # loss, lr, similarities
    steps = plot_log.read_log(moby_run / "log_rank0.txt")
    assert len(steps) == 6 and steps[1]["epoch"] == pytest.approx(1 / 3)  # PRINT_FREQ 1: every step
    assert {"train_pos_sim", "train_neg_sim", "train_sim_gap"} <= set(steps[1])


def test_plot_includes_accuracy_panel(tmp_path):
    from ssl_runtime import plot_log

    log = tmp_path / "linear" / "log.txt"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"train_loss": 2.0 - e, "train_lr": 0.1, "test_acc1": 50.0 + e,
                                       "epoch": e}) + "\n" for e in range(3)))
    written = plot_log.plot_main(plot_log.get_args_parser().parse_args([str(log.parent)]))
    assert written == log.parent / "log.png" and png_size(written) == (1200, 320)
    assert plot_log.panels_of(plot_log.read_log(log)) == {
        "loss": ["train_loss"], "learning rate": ["train_lr"], "accuracy (%)": ["test_acc1"]}


def test_plot_rejects_a_file_that_is_not_a_log(tmp_path, capsys):
    from ssl_runtime import plot_log

    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(SystemExit) as exit_info:
        plot_log.main([str(tmp_path / "notes.txt")])
    assert exit_info.value.code == 2 and "nothing to plot" in capsys.readouterr().err


def test_dino_nearest_neighbour_grid_on_fashion_mnist(dino_run, fashion_mnist, tmp_path):
    from dino import nearest_neighbors

    png = tmp_path / "nn.png"
    output = run_entry_quietly(nearest_neighbors.main, DINO_ARCH + [
        "--pretrained_weights", str(dino_run / "checkpoint.pth"), "--device", "cpu", "--num_workers", "0",
        "--max_train_images", "200", "--num_queries", "3", "--k", "4", "--cell", "32", "--png", str(png)])
    # 3 rows of query + 4 neighbours: slot 38, width 4 + 5 * 42 + 8, height 4 + 3 * (38 + 12 + 4)
    assert png_size(png) == (222, 166)
    assert "3 queries x 4 neighbours among 200 training images" in output


def test_moby_nearest_neighbour_grid_on_fashion_mnist(moby_run, fashion_mnist, tmp_path):
    from moby import nearest_neighbors

    png = tmp_path / "nn.png"
    run_entry_quietly(nearest_neighbors.main, [
        "--cfg", MOBY_CFG, "--pretrained", str(moby_run / "checkpoint.pth"), "--device", "cpu",
        "--num_queries", "2", "--k", "3", "--png", str(png), "--batch-size", "64",
        "--opts", *MOBY_TINY, "DATA.MAX_TRAIN_IMAGES", "100"])
    assert png_size(png) == (4 + 4 * 74 + 8, 4 + 2 * 86)  # default 64-px cells


def test_attention_grid_for_a_batch_of_fashion_mnist_images(dino_run, fashion_mnist, tmp_path):
    from dino import visualize_attention

    output = run_entry_quietly(visualize_attention.main, DINO_ARCH + [
        "--pretrained_weights", str(dino_run / "checkpoint.pth"), "--device", "cpu", "--num_images", "4",
        "--image_size", "32", "--cell", "48", "--output_dir", str(tmp_path)])
    # 4 rows of image, mean and 3 heads (vit_pico): slot 54, width 4 + 5 * 58, height 4 + 4 * 70
    assert png_size(tmp_path / "attention_grid.png") == (294, 284)
    assert "4 images x (image, mean, 3 heads) of 8x8 patches" in output


def test_attention_grid_from_a_folder(dino_run, data, tmp_path):
    from dino import visualize_attention

    run_entry_quietly(visualize_attention.main, DINO_ARCH + [
        "--pretrained_weights", str(dino_run / "checkpoint.pth"), "--device", "cpu",
        "--image_path", str(data / "val" / "class_0"), "--image_size", "16", "--cell", "16",
        "--output_dir", str(tmp_path)])
    assert png_size(tmp_path / "attention_grid.png") == (4 + 5 * 26, 4 + 8 * 38)  # 8 images


# ---------------------------------------------------------------- timm baselines

def test_dino_knn_of_a_random_timm_model(data, capsys):
    from dino import eval_knn

    results = eval_knn.eval_knn(eval_knn.get_args_parser().parse_args([
        "--pretrained_weights", "timm:vit_tiny_patch16_224", "--img_size", "32", "--data_path", str(data),
        "--device", "cpu", "--num_workers", "0", "--nb_knn", "1", "5", "--batch_size_per_gpu", "8"]))
    out = capsys.readouterr().out
    assert "randomly initialised vit_tiny_patch16_224" in out
    assert "1-NN classifier result: Top1:" in out and set(results) == {1, 5}
    assert all(0.0 <= top1 <= 100.0 for top1, _ in results.values())


def test_dino_linear_of_a_random_timm_model(data, tmp_path, capsys):
    from dino import eval_linear

    eval_linear.main(["--pretrained_weights", "timm:vit_tiny_patch16_224", "--img_size", "32",
                      "--n_last_blocks", "2", "--data_path", str(data), "--device", "cpu", "--num_workers", "0",
                      "--epochs", "1", "--num_labels", "3", "--batch_size_per_gpu", "8",
                      "--output_dir", str(tmp_path)])
    assert "Top-1 test accuracy:" in capsys.readouterr().out
    assert "test_acc1" in json.loads((tmp_path / "log.txt").read_text().splitlines()[0])
    assert "val/acc1" in scalar_tags(tmp_path / "tensorboard")


def test_moby_knn_and_linear_of_random_timm_models(data, tmp_path, capsys):
    from moby import eval_knn, main_linear

    common = ["--data-path", str(data), "--output", str(tmp_path), "--device", "cpu", "--batch-size", "8",
              "--opts", "DATA.NUM_WORKERS", "0"]
    eval_knn.main(["--cfg", MOBY_CFG, "--tag", "k", "--pretrained", "timm:resnet18", "--nb_knn", "3"] + common)
    assert "3-NN classifier result: Top1:" in capsys.readouterr().out
    main_linear.main(["--cfg", str(ROOT / "configs" / "moby_swin_cpu_linear.yaml"), "--tag", "l",
                      "--pretrained", "timm:resnet18"] + common)
    out = capsys.readouterr().out
    assert "randomly initialised resnet18" in out and "Max accuracy:" in out


def test_unknown_timm_model_is_a_user_error(data, capsys):
    from dino import eval_knn

    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(["--pretrained_weights", "timm:vit_nonexistent_patch99", "--data_path", str(data),
                       "--device", "cpu", "--num_workers", "0"])
    assert exit_info.value.code == 2 and "timm has no model 'vit_nonexistent_patch99'" in capsys.readouterr().err
