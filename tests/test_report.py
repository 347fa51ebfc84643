"""The Ascend result block: numbers parsed from synthetic DINO and MoBY logs."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_runtime import report
from ssl_runtime.errors import UserError

REPO = Path(__file__).resolve().parents[1]

DINO_TRAIN = """\
| distributed init (rank 0): env://
Epoch: [0/100]  [  0/156]  eta: 0:10:00  loss: 11.084000 (11.084000)  lr: 0.000000 (0.000000)  wd: 0.040000 (0.040000)  time: 3.1  data: 1.0  max mem: 9000
Epoch: [0/100]  [ 10/156]  eta: 0:01:00  loss: 10.912345 (10.998000)  lr: 0.000010 (0.000005)  wd: 0.040000 (0.040000)  time: 0.4  data: 0.0  max mem: 9000
Throughput: 111.11 images/s (0.9999 s/step over 5 steps after 5 warm-up, global batch 111)
Epoch: [0/100]  [155/156]  eta: 0:00:00  loss: 9.876543 (10.500000)  lr: 0.000100 (0.000050)  wd: 0.040000 (0.040000)  time: 0.4  data: 0.0  max mem: 9000
Epoch: [0/100] Total time: 0:01:05 (0.4167 s / it)
Averaged stats: loss: 9.500000 (10.500000)  lr: 0.000050 (0.000050)
Throughput: 1393.25 images/s (0.3675 s/step over 150 steps after 5 warm-up, global batch 512)
"""

DINO_KNN = """\
Features are ready!
Start the k-NN classification.
10-NN classifier result: Top1: 69.7, Top5: 88.1
20-NN classifier result: Top1: 69.5, Top5: 89.9
100-NN classifier result: Top1: 67.2, Top5: 90.3
"""

# MoBY's console logger colours its prefix; the parser must see through the escape codes.
MOBY_TRAIN = """\
\x1b[32m[2024-01-01 00:00:00 moby]\x1b[0m\x1b[33m(main_moby.py 180)\x1b[0m: INFO Train: [0/100][0/312]\teta 1:00:00 lr 0.000001\ttime 2.0000 (2.0000)\tloss 17.1234 (17.1234)\tgrad_norm 3.0 (3.0)\tmem 9000MB
\x1b[32m[2024-01-01 00:00:10 moby]\x1b[0m\x1b[33m(main_moby.py 180)\x1b[0m: INFO Train: [0/100][10/312]\teta 0:10:00 lr 0.000010\ttime 0.1000 (0.2000)\tloss 16.5000 (16.8000)\tgrad_norm 2.0 (2.5)\tmem 9000MB
\x1b[32m[2024-01-01 00:00:20 moby]\x1b[0m\x1b[33m(main_moby.py 200)\x1b[0m: INFO Throughput: 1250.5 images/s (0.8188 s/step over 140 steps after 10 warm-up, global batch 1024)
"""

MOBY_LINEAR = """\
[..] INFO  * Acc@1 60.100 Acc@5 85.000
[..] INFO Max accuracy: 60.10%
[..] INFO  * Acc@1 68.350 Acc@5 88.000
[..] INFO Max accuracy: 68.35%
"""

DINO_LINEAR = "* Acc@1 70.000 Acc@5 88.000 loss 1.200\nTop-1 test accuracy: 74.0\n"


def run_report(tmp_path: Path, train: str | None, evaluation: str | None, case: str = "C_acc",
               extra: list[str] | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    args = ["--network", "DINO_ID3436_for_PyTorch", "--rank_size", "8", "--batch_size", "64",
            "--case_name", case, "--e2e_seconds", "4321", "--out_file", str(tmp_path / "out" / "case.log")]
    if train is not None:
        (tmp_path / "train.log").write_text(train)
        args += ["--train_log", str(tmp_path / "train.log")]
    if evaluation is not None:
        (tmp_path / "eval.log").write_text(evaluation)
        args += ["--eval_log", str(tmp_path / "eval.log")]
    done = subprocess.run([sys.executable, "-m", "ssl_runtime.report", *args, *(extra or [])],
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return done, tmp_path / "out" / "case.log"


def test_dino_accuracy_run_block_and_case_file(tmp_path):
    done, case_file = run_report(tmp_path, DINO_TRAIN, DINO_KNN, case="DINO_ID3436_for_PyTorch_bs64_8p_acc")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "------------------ Final result ------------------",
        "Final Performance images/sec : 1393.25",
        "Final Train Accuracy : 69.7",
        "E2E Training Duration sec : 4321",
    ]
    assert case_file.read_text().splitlines() == [
        "Network = DINO_ID3436_for_PyTorch",
        "RankSize = 8",
        "BatchSize = 64",
        f"DeviceType = {platform.machine()}",
        "CaseName = DINO_ID3436_for_PyTorch_bs64_8p_acc",
        "ActualFPS = 1393.25",
        "TrainingTime = 0.3675",
        "TrainAccuracy = 69.7",
        "ActualLoss = 10.500000",  # the last step line's running average, as the port's scripts take it
        "E2ETrainingTime = 4321",
    ]


def test_moby_performance_run_has_no_accuracy(tmp_path):
    done, case_file = run_report(tmp_path, MOBY_TRAIN, None, case="X_perf")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "------------------ Final result ------------------",
        "Final Performance images/sec : 1250.5",
        "E2E Training Duration sec : 4321",
    ]
    lines = case_file.read_text().splitlines()
    assert "ActualFPS = 1250.5" in lines and "TrainingTime = 0.8188" in lines
    assert "ActualLoss = 16.5000" in lines
    assert not any(line.startswith("TrainAccuracy") for line in lines)


def test_parsers_on_each_log_kind(tmp_path):
    (tmp_path / "m.log").write_text(MOBY_LINEAR)
    (tmp_path / "d.log").write_text(DINO_LINEAR)
    (tmp_path / "k.log").write_text(DINO_KNN)
    assert report.parse_accuracy(tmp_path / "m.log") == "68.35"
    assert report.parse_accuracy(tmp_path / "d.log") == "74.0"
    assert report.parse_accuracy(tmp_path / "k.log") == "69.7"
    (tmp_path / "t.log").write_text(DINO_TRAIN)
    numbers = report.parse_train_log(tmp_path / "t.log")
    assert (numbers.images_per_sec, numbers.sec_per_step, numbers.loss) == ("1393.25", "0.3675", "10.500000")
    assert numbers.losses == ["11.084000", "10.998000", "10.500000"]  # not the 'Averaged stats' line


def test_loss_file_and_compile_time(tmp_path):
    """Huawei's loss file: DINO's running averages, MoBY's step values; MoBY's 1-device
    performance case adds CompileTime, the first step's time."""
    done, case_file = run_report(tmp_path, DINO_TRAIN, None, extra=["--loss_file", str(tmp_path / "l.txt")])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "l.txt").read_text() == "11.084000\n10.998000\n10.500000\n"
    assert "CompileTime" not in case_file.read_text()
    done, case_file = run_report(tmp_path, MOBY_TRAIN, None, case="X_perf",
                                 extra=["--loss_file", str(tmp_path / "m.txt"), "--compile_time"])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.txt").read_text() == "17.1234\n16.5000\n"
    assert case_file.read_text().splitlines()[-2:] == ["E2ETrainingTime = 4321", "CompileTime = 2.0000"]


def test_missing_throughput_line_fails_naming_the_log(tmp_path):
    truncated = DINO_TRAIN.split("Throughput:")[0]
    done, case_file = run_report(tmp_path, truncated, DINO_KNN)
    assert done.returncode == 2
    assert "Throughput" in done.stderr and str(tmp_path / "train.log") in done.stderr
    assert not case_file.exists()


def test_a_run_within_its_warmup_says_why_it_has_no_fps(tmp_path):
    untimed = re.sub(r"Throughput: .*", "Throughput: nan images/s (nan s/step over 0 steps after 1 warm-up, "
                     "global batch 64)", DINO_TRAIN)
    done, case_file = run_report(tmp_path, untimed, DINO_KNN)
    assert done.returncode == 0, done.stderr
    assert "Final Performance images/sec : nan" in done.stdout
    assert "no FPS: the run ended within its warm-up steps" in done.stderr
    assert "ActualFPS = nan" in case_file.read_text()
    done, _ = run_report(tmp_path, DINO_TRAIN, DINO_KNN)
    assert "no FPS" not in done.stderr


def test_missing_accuracy_line_fails_naming_the_log(tmp_path):
    done, _ = run_report(tmp_path, DINO_TRAIN, "Features are ready!\n")
    assert done.returncode == 2
    assert str(tmp_path / "eval.log") in done.stderr


def test_missing_train_log_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        report.parse_train_log(tmp_path / "absent.log")


def test_accuracy_only_mode(tmp_path):
    done, _ = run_report(tmp_path, None, MOBY_LINEAR, extra=["--accuracy_only"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Final Train Accuracy : 68.35\n"


@pytest.mark.parametrize("value, printed", [("45.25", "45.25"), ("100.0", "100.0"), (45.5, "45.5"), (7, "7"),
                                            ("1e2", "1e2"), ("45.25\nActualFPS = 1", None), ("nan", None),
                                            ("inf", None), (" 45.25", None), ("12 %", None), ("", None),
                                            (True, None), ([45.25], None), (None, None), ("1_0", None)])
def test_only_finite_numbers_pass_as_accuracies(value, printed):
    assert report.finite_number(value) == printed


def test_random_init_accuracy_argument_must_be_a_number(tmp_path):
    done, case_file = run_report(tmp_path, DINO_TRAIN, DINO_KNN, extra=["--random_init_accuracy", "4\nActualFPS = 1"])
    assert done.returncode == 2 and "is not a number" in done.stderr and not case_file.exists()
