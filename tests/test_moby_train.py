"""End-to-end MoBY runs on a tiny ImageFolder: pre-training, resume, --steps, linear evaluation,
k-NN evaluation and user errors (the 2-process run is in tests/test_accelerator_paths.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moby import eval_knn, main_linear, main_moby, nearest_neighbors
from moby import model as model_module
from ssl_runtime import amp, report

ROOT = Path(__file__).resolve().parents[1]
CPU_CFG = str(ROOT / "configs" / "moby_swin_cpu.yaml")
QUEUE = 32
TINY = ["MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS", "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]",
        "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", str(QUEUE), "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1",
        "TRAIN.WARMUP_EPOCHS", "1"]
NAME = "moby__swin_cpu__patch2_window4_32__odpr01_tdpr0_cm098_ct02_queue256_proj2_pred2"


def pretrain_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--cfg", CPU_CFG, "--data-path", str(data), "--batch-size", "8", "--output", str(out),
            "--tag", "t", "--device", "cpu", *extra, "--opts", *TINY]


def run_dir(out: Path) -> Path:
    return out / NAME / "t"


def test_pretrain_then_resume_with_more_epochs(tiny_imagefolder, tmp_path, capsys):
    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path, "--epochs", "1", "--knn_every", "1"))
    folder = run_dir(tmp_path)
    for name in ("config.json", "log_rank0.txt", "checkpoint.pth", "ckpt_epoch_0.pth"):
        assert (folder / name).is_file(), name
    stdout = capsys.readouterr().out
    assert "Train: [0/1][0/3]\teta " in stdout and "\tloss " in stdout and "\tgrad_norm " in stdout
    # the similarity signals come after upstream's last field
    assert re.search(r"\tmem \d+MB\tpos_sim -?[\d.]+ \(-?[\d.]+\)\tneg_sim -?[\d.]+ \(-?[\d.]+\)"
                     r"\tsim_gap -?[\d.]+ \(-?[\d.]+\)", stdout)
    last_loss = re.findall(r"\tloss ([\d.]+) \(", stdout)[-1]
    assert report.parse_train_log(folder / "log_rank0.txt").loss == last_loss
    assert re.search(r"k-NN probe after epoch 0: 20-NN top-1 [\d.]+ % \(online encoder; 24 train / 24 val",
                     stdout)
    record = json.loads((folder / "log.txt").read_text().splitlines()[0])
    assert {"train_pos_sim", "train_neg_sim", "train_sim_gap"} <= set(record)
    # epoch means of float32 values <= 2: the mean of the gaps is the gap of the means to 1e-6
    assert record["train_sim_gap"] == pytest.approx(record["train_pos_sim"] - record["train_neg_sim"],
                                                    abs=1e-6)
    assert 0 <= record["test_knn_probe_acc1"] <= 100
    assert "Throughput: " in stdout and "images/s" in stdout
    first = torch.load(folder / "checkpoint.pth", weights_only=True)
    assert first["epoch"] == 0
    # one 3-step epoch of 8 images per step filled 24 of the 32 queue slots
    assert int(first["model"]["queue_ptr"]) == 24

    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path, "--epochs", "2"))
    stdout = capsys.readouterr().out
    assert "auto resuming from" in stdout
    assert "Train: [1/2][0/3]" in stdout and "Train: [0/2]" not in stdout
    second = torch.load(folder / "checkpoint.pth", weights_only=True)
    assert second["epoch"] == 1 and (folder / "ckpt_epoch_1.pth").is_file()
    assert int(second["model"]["queue_ptr"]) == (24 + 24) % QUEUE
    changed = [k for k in first["model"] if k.startswith("encoder.")
               and not torch.equal(first["model"][k], second["model"][k])]
    assert changed  # the second run trained


def test_steps_and_max_epochs_limit_the_run(tiny_imagefolder, tmp_path, capsys):
    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path / "a", "--steps", "2", "--epochs", "5"))
    out = capsys.readouterr().out
    assert "stopped after 2 iterations" in out and "Train: [0/5][1/3]" in out and "[0/5][2/3]" not in out
    saved = torch.load(run_dir(tmp_path / "a") / "checkpoint.pth", weights_only=True)
    assert int(saved["model"]["queue_ptr"]) == 16

    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path / "b", "--epochs", "5", "--max_epochs", "1"))
    out = capsys.readouterr().out
    assert "Train: [0/5][2/3]" in out and "Train: [1/5]" not in out
    assert sorted(p.name for p in run_dir(tmp_path / "b").glob("ckpt_*")) == ["ckpt_epoch_0.pth"]

    # one step is all warm-up: the Throughput line still comes (nan), so the launch scripts can say why
    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path / "c", "--steps", "1", "--epochs", "5"))
    assert "Throughput: nan images/s (nan s/step over 0 steps after 1 warm-up" in capsys.readouterr().out


@pytest.mark.parametrize("cfg,opts", [
    ("moby_deit_cpu.yaml", ["MODEL.DEIT.EMBED_DIM", "24", "MODEL.DEIT.DEPTH", "1",
                            "MODEL.DEIT.NUM_HEADS", "2"]),
    ("moby_swin_cpu.yaml", TINY[:6] + ["MODEL.SWIN.NORM_BEFORE_MLP", "bn"]),
])
def test_deit_and_bn_variants_train(tiny_imagefolder, tmp_path, cfg, opts):
    args = ["--cfg", str(ROOT / "configs" / cfg), "--data-path", str(tiny_imagefolder), "--batch-size", "8",
            "--output", str(tmp_path), "--tag", "v", "--device", "cpu", "--opts", *opts,
            "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", str(QUEUE), "DATA.NUM_WORKERS", "0"]
    main_moby.main(args)
    saved = torch.load(next(tmp_path.glob("*/v/checkpoint.pth")), weights_only=True)
    assert int(saved["model"]["queue_ptr"]) == 24
    if "bn" in opts:
        assert any(k.endswith("norm2.bn.running_mean") for k in saved["model"])


def test_accumulation_steps_and_throughput_mode(tiny_imagefolder, tmp_path, capsys):
    # upstream's moby_main.py: a step every iteration, the lr scaled by 3 x 8 / 512 all the same
    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path / "a", "--epochs", "1", "--accumulation-steps", "3"))
    saved = torch.load(run_dir(tmp_path / "a") / "checkpoint.pth", weights_only=True)
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {3}
    assert saved["config"]["TRAIN"]["BASE_LR"] == pytest.approx(0.001 * 8 / 512 * 3)
    # TRAIN.REAL_ACCUMULATION: 3 iterations accumulated into a single AdamW step, same lr
    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path / "r", "--epochs", "1", "--accumulation-steps", "3")
                   + ["TRAIN.REAL_ACCUMULATION", "True"])
    saved = torch.load(run_dir(tmp_path / "r") / "checkpoint.pth", weights_only=True)
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {1}
    assert saved["config"]["TRAIN"]["BASE_LR"] == pytest.approx(0.001 * 8 / 512 * 3)
    assert int(saved["model"]["queue_ptr"]) == 24  # the EMA/queue update still runs every forward
    capsys.readouterr()
    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path / "tp", "--throughput"))
    out = capsys.readouterr().out
    assert "throughput averaged with 30 times" in out and "batch_size 8 throughput " in out
    assert "Start self-supervised pre-training" not in out


def test_linear_and_knn_evaluation(tiny_imagefolder, tmp_path, capsys):
    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path, "--epochs", "1"))
    checkpoint = run_dir(tmp_path) / "checkpoint.pth"
    capsys.readouterr()
    main_linear.main(["--cfg", str(ROOT / "configs" / "moby_swin_cpu_linear.yaml"), "--data-path",
                      str(tiny_imagefolder), "--batch-size", "8", "--output", str(tmp_path / "lin"),
                      "--tag", "t",
                      "--pretrained", str(checkpoint), "--epochs", "2", "--lr", "4.0", "--device", "cpu",
                      "--opts", *TINY])
    out = capsys.readouterr().out
    assert f"loaded pretrained checkpoint from: {checkpoint}" in out
    assert out.count(" * Acc@1 ") == 2 and "Max accuracy: " in out
    assert "Train: [1/2]" in out and "Train: [2/" not in out  # --epochs overrides LINEAR_EVAL.EPOCHS
    assert (tmp_path / "lin" / NAME / "t" / "linear" / "checkpoint.pth").is_file()
    max_accuracy = float(out.split("Max accuracy: ")[-1].split("%")[0])
    assert 0.0 <= max_accuracy <= 100.0

    eval_knn.main(["--cfg", CPU_CFG, "--data-path", str(tiny_imagefolder), "--output", str(tmp_path),
                   "--tag", "t", "--nb_knn", "5", "20", "--device", "cpu", "--opts", *TINY])
    out = capsys.readouterr().out
    for k in (5, 20):
        assert f"{k}-NN classifier result: Top1: " in out
    top1 = float(out.split("5-NN classifier result: Top1: ")[1].split(",")[0])
    assert top1 > 50.0  # the tiny classes differ by which third of the image is bright

    # --eval on the pre-training script: k-NN of the online encoder of the checkpoint it resumes
    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path, "--eval"))
    out = capsys.readouterr().out
    assert "auto resuming from" in out and "20-NN classifier result: Top1: " in out
    assert "Start self-supervised pre-training" not in out

    # the picture of nearest neighbours with the shipped configs' DATA.NUM_WORKERS -1 (automatic)
    automatic = [item for key, value in zip(TINY[::2], TINY[1::2]) if key != "DATA.NUM_WORKERS"
                 for item in (key, value)]
    png = tmp_path / "nn.png"
    nearest_neighbors.main(["--cfg", CPU_CFG, "--data-path", str(tiny_imagefolder), "--output", str(tmp_path),
                            "--tag", "t", "--device", "cpu", "--num_queries", "2", "--k", "3",
                            "--png", str(png), "--opts", *automatic])
    assert png.is_file()


def test_user_errors_exit_with_code_2(tiny_imagefolder, tmp_path, capsys):
    cases = [
        (["--zip"], "not supported"),
        (["--opts", "TRAIN.NOPE", "1"], "unknown config key TRAIN.NOPE"),
        (["--opts", "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "20"], "multiple of the global batch"),
    ]
    for extra, message in cases:
        args = ["--cfg", CPU_CFG, "--data-path", str(tiny_imagefolder), "--batch-size", "8",
                "--output", str(tmp_path), "--device", "cpu", *extra]
        with pytest.raises(SystemExit) as exit_info:
            main_moby.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_moby.main(pretrain_args(tmp_path / "missing", tmp_path))
    assert "does not exist" in capsys.readouterr().err


# The 2-process run (keys gathered into the queues, linear evaluation) is in
# tests/test_accelerator_paths.py, under the process group that refuses what NCCL/HCCL refuse.


def test_o1_on_a_cpu_with_native_bf16_trains_in_bf16_and_says_so(tiny_imagefolder, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(amp, "_host_cpuinfo", lambda: "processor\t: 0\nFeatures\t: fp asimd sve bf16\n")
    monkeypatch.delenv("SSL_CPU_AMP")
    seen = []
    monkeypatch.setattr(model_module, "contrastive_terms",
                        lambda q, *rest, f=model_module.contrastive_terms: seen.append(q.dtype) or f(q, *rest))
    main_moby.main(pretrain_args(tiny_imagefolder, tmp_path, "--steps", "2", "--epochs", "1"))
    out = capsys.readouterr().out
    assert "precision: bf16 autocast on cpu (the CPU has bf16; SSL_CPU_AMP=fp32 to turn it off)" in out
    assert seen == [torch.bfloat16] * 4  # the predictions of 2 steps x 2 directions
    saved = torch.load(run_dir(tmp_path) / "checkpoint.pth", weights_only=True)
    assert saved["amp"] == {}  # no loss scaler, as upstream's O0 layout
    assert all(v.dtype == torch.float32 for k, v in saved["model"].items()
               if k.startswith("encoder.") and v.is_floating_point())
