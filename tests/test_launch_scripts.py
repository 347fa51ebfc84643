"""The Ascend-style launch scripts in test/: syntax, flag parsing, resolved commands, and the
whole flow (launch, logs, result block, exit codes) with stand-in programs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DIR = REPO / "test"
ENTRY_SCRIPTS = ["train_full_1p.sh", "train_full_8p.sh", "train_full_16p.sh", "train_performance_1p.sh",
                 "train_performance_8p.sh", "eval_knn.sh", "eval_linear.sh", "eval_8p.sh"]
SOURCED = ["common.sh", "setup_env.sh", "env_npu.sh"]


def script_env(tmp_path: Path, **extra: str) -> dict:
    env = {**os.environ, "SSL_PYTHON": sys.executable, "SSL_TEST_OUTPUT": str(tmp_path / "output"),
           "SSL_RANDOM_INIT_CACHE": str(tmp_path / "random-init")}  # never the user's cache
    # variables that choose the device, the output folder or the rendezvous (other tests may set them)
    for name in ("SSL_DEVICE", "ASCEND_DEVICE_ID", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RANK",
                 "WORLD_SIZE", "LOCAL_RANK", "CANN_SET_ENV", "SSL_NPU_BINARY"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_script(name: str, *flags: str, tmp_path: Path, timeout: int = 120,
               **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TEST_DIR / name), *flags], capture_output=True, text=True,
                          env=script_env(tmp_path, **extra), timeout=timeout)


def dry_run(name: str, *flags: str, tmp_path: Path, **extra: str) -> tuple[dict, dict]:
    """Resolved settings (KEY=value lines) and commands (PRETRAIN/EVAL: word lists)."""
    done = run_script(name, *flags, "--dry_run", tmp_path=tmp_path, **extra)
    assert done.returncode == 0, done.stderr
    settings, commands = {}, {}
    for line in done.stdout.splitlines():
        if line.startswith(("PRETRAIN: ", "EVAL: ", "RANDOM-INIT: ")):
            key, command = line.split(": ", 1)
            commands[key] = shlex.split(command)
        elif "=" in line:
            key, value = line.split("=", 1)
            settings[key] = value
    return settings, commands


def flag_value(words: list[str], flag: str) -> str:
    assert flag in words, f"{flag} missing from {words}"
    return words[words.index(flag) + 1]


def split_launch(words: list[str]) -> tuple[list[str], list[str]]:
    """(launcher, program with its flags) of a command line."""
    first = next(i for i, word in enumerate(words) if word.endswith(".py"))
    return words[:first], words[first:]


@pytest.mark.parametrize("name", ENTRY_SCRIPTS + SOURCED)
def test_scripts_are_valid_bash(name):
    done = subprocess.run(["bash", "-n", str(TEST_DIR / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ENTRY_SCRIPTS)
def test_entry_scripts_are_executable(name):
    assert os.access(TEST_DIR / name, os.X_OK)


def test_unknown_flag_fails_and_lists_the_flags(tmp_path):
    done = run_script("train_full_1p.sh", "--lr=3", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "unknown argument '--lr=3'" in done.stderr
    for flag in ("--data_path=", "--model=", "--batch_size=", "--epochs=", "--device=", "--nproc=",
                 "--cfg=", "--steps=", "--conda_name="):
        assert flag in done.stderr
    assert not (tmp_path / "output").exists()


@pytest.mark.parametrize("flags, message", [
    (["--model=simclr"], "choose dino or moby"),
    (["--device=tpu"], "choose auto, npu, cuda or cpu"),
    (["--batch_size=abc"], "--batch_size=abc: expected a positive whole number"),
    (["--nproc=0"], "--nproc=0: expected a positive whole number"),
    (["--data_path=/no/such/folder"], "--data_path=/no/such/folder is not a folder"),
    (["--model=dino", "--cfg=configs/moby_swin_cpu.yaml"], "--cfg is a MoBY option"),
    (["--model=moby", "--cfg=nope.yaml"], "--cfg=nope.yaml: no such file"),
    (["--checkpoint=x.pth"], "--checkpoint is for eval_knn.sh, eval_linear.sh and eval_8p.sh"),
])
def test_bad_values_are_rejected(tmp_path, flags, message):
    done = run_script("train_full_1p.sh", "--device=cpu", *flags, "--dry_run", tmp_path=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr


def test_eval_scripts_need_an_existing_checkpoint(tmp_path):
    done = run_script("eval_knn.sh", "--device=cpu", tmp_path=tmp_path)
    assert done.returncode == 2 and "--checkpoint=FILE is required" in done.stderr
    done = run_script("eval_linear.sh", "--device=cpu", f"--checkpoint={tmp_path}/none.pth",
                      tmp_path=tmp_path)
    assert done.returncode == 2 and "no such file" in done.stderr


def test_settings_can_be_resolved_without_running_anything(tmp_path):
    """The launcher's parse and plan give a run's settings and commands; nothing starts."""
    from ssl_runtime.launch_scripts import options, stages

    parsed = options.parse("perf", 1, ["--nproc=3", "--device=cpu", "--model=moby", "--epochs=7"], env={})
    settings = stages.plan(parsed, sys.executable, env={"SSL_TEST_OUTPUT": str(tmp_path)}).settings
    assert settings.NPROC == 3 and settings.EPOCHS == 7 and settings.STEPS == 20
    assert settings.CASE_NAME == "Transformer-SSL_ID3434_for_PyTorch_bs64_3p_perf"
    assert not tmp_path.joinpath("0").exists()


def test_full_8p_dino_defaults_on_cpu(tmp_path):
    settings, commands = dry_run("train_full_8p.sh", "--device=cpu", tmp_path=tmp_path)
    out = tmp_path / "output" / "0"
    assert settings["NPROC"] == "8" and settings["MODEL"] == "dino"
    assert settings["CASE_NAME"] == "DINO_ID3436_for_PyTorch_bs64_8p_acc"
    assert settings["CASE_FILE"] == str(out / "DINO_ID3436_for_PyTorch_bs64_8p_acc.log")
    assert settings["TRAIN_LOG"] == str(out / "train_0.log")
    (launcher, pretrain), (_, evaluation) = split_launch(commands["PRETRAIN"]), split_launch(commands["EVAL"])
    assert launcher == [sys.executable, "-m", "ssl_runtime.launch", "--nproc_per_node=8"]
    assert pretrain[0] == "dino/main_dino.py"
    assert flag_value(pretrain, "--batch_size_per_gpu") == "64"
    assert flag_value(pretrain, "--device") == "cpu"
    # the small CPU ViT is pretrained and evaluated with the same architecture flags
    assert flag_value(pretrain, "--arch") == flag_value(evaluation, "--arch") != "vit_small"
    assert flag_value(pretrain, "--patch_size") == flag_value(evaluation, "--patch_size")
    assert "--data_path" not in pretrain and "--num_steps" not in pretrain  # default dataset
    assert evaluation[0] == "dino/eval_knn.py"
    assert flag_value(evaluation, "--pretrained_weights") == settings["RUN_DIR"] + "/checkpoint.pth"
    assert flag_value(evaluation, "--checkpoint_key") == "teacher"


def test_nproc_overrides_the_number_of_processes(tmp_path, tiny_imagefolder):
    settings, commands = dry_run("train_full_1p.sh", "--device=cpu", "--nproc=2",
                                 f"--data_path={tiny_imagefolder}", tmp_path=tmp_path)
    assert settings["CASE_NAME"].endswith("_2p_acc")
    assert "--nproc_per_node=2" in commands["PRETRAIN"]
    assert flag_value(commands["PRETRAIN"], "--data_path") == str(tiny_imagefolder)
    assert flag_value(commands["EVAL"], "--data_path") == str(tiny_imagefolder)
    _, commands = dry_run("train_full_1p.sh", "--device=cpu", tmp_path=tmp_path)
    assert split_launch(commands["PRETRAIN"])[0] == [sys.executable, "-m", "ssl_runtime.launch",
                                                     "--nproc_per_node=1"]


def test_performance_runs_have_steps_and_no_evaluation(tmp_path):
    settings, commands = dry_run("train_performance_1p.sh", "--device=cuda", tmp_path=tmp_path)
    assert settings["CASE_NAME"] == "DINO_ID3436_for_PyTorch_bs64_1p_perf"
    assert flag_value(commands["PRETRAIN"], "--num_steps") == "200"
    assert flag_value(commands["PRETRAIN"], "--epochs") == "1"  # the Ascend port's schedule
    assert flag_value(commands["PRETRAIN"], "--arch") == "vit_small"
    assert "EVAL" not in commands
    _, commands = dry_run("train_performance_8p.sh", "--device=cpu", "--steps=9", tmp_path=tmp_path)
    assert flag_value(commands["PRETRAIN"], "--num_steps") == "9"


def test_moby_commands(tmp_path, tiny_imagefolder):
    settings, commands = dry_run("train_full_8p.sh", "--model=moby", "--device=npu",
                                 f"--data_path={tiny_imagefolder}", "--conda_name=ascend",
                                 "--bin=True", tmp_path=tmp_path)
    assert settings["CASE_NAME"] == "Transformer-SSL_ID3434_for_PyTorch_bs128_8p_acc"
    pretrain, linear = split_launch(commands["PRETRAIN"])[1], split_launch(commands["EVAL"])[1]
    assert pretrain[0] == "moby/main_moby.py"
    assert flag_value(pretrain, "--cfg") == "configs/moby_swin_tiny.yaml"
    assert flag_value(pretrain, "--batch-size") == "128"
    assert flag_value(pretrain, "--max_epochs") == "100"
    assert flag_value(pretrain, "--data-path") == str(tiny_imagefolder)
    assert flag_value(pretrain, "--tag") == "pretrain"
    assert linear[0] == "moby/main_linear.py"
    assert flag_value(linear, "--cfg") == "configs/moby_swin_tiny_linear.yaml"
    _, commands = dry_run("train_performance_1p.sh", "--model=moby", "--device=cpu",
                          tmp_path=tmp_path)
    assert flag_value(commands["PRETRAIN"], "--cfg") == "configs/moby_swin_cpu.yaml"
    assert flag_value(commands["PRETRAIN"], "--steps") == "20"


def test_eval_scripts_commands(tmp_path):
    checkpoint = tmp_path / "teacher.pth"
    checkpoint.write_bytes(b"x")
    _, commands = dry_run("eval_knn.sh", "--device=cpu", f"--checkpoint={checkpoint}",
                          tmp_path=tmp_path)
    assert "PRETRAIN" not in commands
    assert split_launch(commands["EVAL"])[1][0] == "dino/eval_knn.py"
    assert flag_value(commands["EVAL"], "--pretrained_weights") == str(checkpoint)
    assert "--batch_size_per_gpu" not in commands["EVAL"]  # eval_knn.py's own default applies
    _, commands = dry_run("eval_linear.sh", "--device=cpu", "--epochs=3", f"--checkpoint={checkpoint}",
                          tmp_path=tmp_path)
    assert split_launch(commands["EVAL"])[1][0] == "dino/eval_linear.py"
    assert flag_value(commands["EVAL"], "--epochs") == "3"
    _, commands = dry_run("eval_linear.sh", "--model=moby", "--device=cpu",
                          f"--checkpoint={checkpoint}", tmp_path=tmp_path)
    assert flag_value(commands["EVAL"], "--pretrained") == str(checkpoint)
    assert flag_value(commands["EVAL"], "--cfg") == "configs/moby_swin_cpu_linear.yaml"
    _, commands = dry_run("eval_knn.sh", "--model=moby", "--device=cpu", "--batch_size=32",
                          f"--checkpoint={checkpoint}", tmp_path=tmp_path)
    assert split_launch(commands["EVAL"])[1][0] == "moby/eval_knn.py"
    assert flag_value(commands["EVAL"], "--pretrained") == str(checkpoint)
    assert flag_value(commands["EVAL"], "--cfg") == "configs/moby_swin_cpu.yaml"
    assert flag_value(commands["EVAL"], "--batch-size") == "32"
    assert "--trust-checkpoint" not in commands["EVAL"]


@pytest.mark.parametrize("script", ["train_full_1p.sh", "train_performance_8p.sh"])
@pytest.mark.parametrize("model, program", [("dino", "dino/main_dino.py"), ("moby", "moby/main_moby.py")])
def test_profile_reaches_the_pretraining_program_only(tmp_path, script, model, program):
    _, commands = dry_run(script, f"--model={model}", "--device=cpu", "--profile", tmp_path=tmp_path)
    assert split_launch(commands["PRETRAIN"])[1][0] == program and commands["PRETRAIN"][-1] == "--profile"
    assert all("--profile" not in command for key, command in commands.items() if key != "PRETRAIN")
    _, commands = dry_run(script, f"--model={model}", "--device=cpu", tmp_path=tmp_path)
    assert "--profile" not in commands["PRETRAIN"]
    checkpoint = tmp_path / "w.pth"
    checkpoint.write_bytes(b"x")
    done = run_script("eval_knn.sh", f"--checkpoint={checkpoint}", "--profile", "--dry_run", tmp_path=tmp_path)
    assert done.returncode == 2 and "--profile records pretraining steps" in done.stderr


@pytest.mark.parametrize("model, flag", [("dino", "--trust_checkpoint"), ("moby", "--trust-checkpoint")])
def test_eval_scripts_pass_the_trust_flag_in_each_methods_spelling(tmp_path, model, flag):
    checkpoint = tmp_path / "official.pth"
    checkpoint.write_bytes(b"x")
    for script in ("eval_knn.sh", "eval_linear.sh"):
        _, commands = dry_run(script, f"--model={model}", "--device=cpu", f"--checkpoint={checkpoint}",
                              "--trust_checkpoint", tmp_path=tmp_path)
        assert flag in commands["EVAL"]
    done = run_script("train_full_1p.sh", "--device=cpu", "--trust_checkpoint", "--dry_run", tmp_path=tmp_path)
    assert done.returncode == 2 and "training scripts start from scratch" in done.stderr


# ------------------------------------------------------------------------------------------------
# The whole flow with stand-in programs: they print what the real ones print, instantly.

STUB_DINO_PRETRAIN = """\
import argparse, os, sys
p = argparse.ArgumentParser(); p.add_argument("--output_dir"); p.add_argument("--fail", default=None)
args, _ = p.parse_known_args()
os.makedirs(args.output_dir, exist_ok=True)
open(os.path.join(args.output_dir, "checkpoint.pth"), "wb").write(b"stub")
print("Epoch: [0/1]  [0/2]  eta: 0:00:01  loss: 8.500000 (8.500000)  lr: 0.000001 (0.000001)")
print("Epoch: [0/1]  [1/2]  eta: 0:00:00  loss: 8.250000 (8.375000)  lr: 0.000002 (0.000002)")
print("Throughput: 321.50 images/s (0.1991 s/step over 10 steps after 5 warm-up, global batch 64)")
"""

STUB_DINO_KNN = """\
import argparse, os, sys
p = argparse.ArgumentParser(); p.add_argument("--pretrained_weights")
args, _ = p.parse_known_args()
if args.pretrained_weights is None:  # the random-init baseline; counts its runs
    open(os.environ["STUB_CALLS"], "a").write("random-init\\n")
    print("10-NN classifier result: Top1: 45.25, Top5: 80.0"); sys.exit(0)
if not os.path.isfile(args.pretrained_weights):
    sys.exit("no checkpoint at " + args.pretrained_weights)
if os.environ.get("STUB_FAIL"):
    print("Traceback: something broke", file=sys.stderr); sys.exit(3)
print("10-NN classifier result: Top1: 55.5, Top5: 90.0")
print("20-NN classifier result: Top1: 56.5, Top5: 91.0")
"""

STUB_MOBY_PRETRAIN = """\
import argparse, os
p = argparse.ArgumentParser(); p.add_argument("--output"); p.add_argument("--tag")
args, _ = p.parse_known_args()
folder = os.path.join(args.output, "moby__stub", args.tag)
os.makedirs(folder, exist_ok=True)
open(os.path.join(folder, "checkpoint.pth"), "wb").write(b"stub")
print("[x] INFO Train: [0/1][0/2]\\teta 0:00:01 lr 0.000100\\ttime 0.5 (0.5)\\tloss 16.2500 (16.2500)")
print("[x] INFO Throughput: 99.25 images/s (0.6448 s/step over 8 steps after 2 warm-up, global batch 64)")
"""

STUB_MOBY_KNN = """\
import argparse, os, sys
p = argparse.ArgumentParser(); p.add_argument("--pretrained"); p.add_argument("--random-init", action="store_true")
args, _ = p.parse_known_args()
if args.random_init:
    print("[x] INFO 10-NN classifier result: Top1: 50.5, Top5: 85.0"); sys.exit(0)
assert os.path.isfile(args.pretrained), args.pretrained
print("[x] INFO 10-NN classifier result: Top1: 62.75, Top5: 93.0")
"""

STUB_MOBY_LINEAR = """\
import argparse, os, sys
p = argparse.ArgumentParser(); p.add_argument("--pretrained")
args, _ = p.parse_known_args()
assert os.path.isfile(args.pretrained), args.pretrained
print("[x] INFO Max accuracy: 61.25%")
"""


@pytest.fixture
def stubs(tmp_path: Path) -> dict:
    folder = tmp_path / "stubs"
    folder.mkdir()
    paths = {}
    for name, text in (("DINO_PRETRAIN", STUB_DINO_PRETRAIN), ("DINO_EVAL_KNN", STUB_DINO_KNN),
                       ("MOBY_PRETRAIN", STUB_MOBY_PRETRAIN), ("MOBY_LINEAR", STUB_MOBY_LINEAR),
                       ("MOBY_EVAL_KNN", STUB_MOBY_KNN)):
        path = folder / f"{name.lower()}.py"
        path.write_text(text)
        paths[name] = str(path)
    paths["STUB_CALLS"] = str(tmp_path / "calls.txt")
    return paths


def test_full_run_prints_the_result_block_and_writes_the_case_file(tmp_path, stubs, tiny_imagefolder):
    done = run_script("train_full_1p.sh", "--device=cpu", f"--data_path={tiny_imagefolder}",
                      tmp_path=tmp_path, **stubs)
    assert done.returncode == 0, done.stdout + done.stderr
    block = done.stdout.splitlines()[-5:]
    assert block[:4] == ["------------------ Final result ------------------",
                         "Final Performance images/sec : 321.50", "Final Train Accuracy : 55.5",
                         "Random-init Accuracy : 45.25 (the same evaluation of the untrained network)"]
    assert block[4].startswith("E2E Training Duration sec : ")
    out = tmp_path / "output" / "0"
    case = (out / "DINO_ID3436_for_PyTorch_bs64_1p_acc.log").read_text().splitlines()
    assert case[0] == "Network = DINO_ID3436_for_PyTorch"
    assert "RankSize = 1" in case and "BatchSize = 64" in case
    assert "TrainAccuracy = 55.5" in case and "ActualLoss = 8.375000" in case
    assert "RandomInitAccuracy = 45.25" in case
    assert "TrainingTime = 0.1991" in case
    assert "Throughput" in (out / "train_0.log").read_text()
    assert "10-NN" in (out / "test_0.log").read_text()


def test_failing_stage_exits_non_zero_naming_its_log(tmp_path, stubs, tiny_imagefolder):
    done = run_script("train_full_1p.sh", "--device=cpu", f"--data_path={tiny_imagefolder}",
                      tmp_path=tmp_path, STUB_FAIL="1", **stubs)
    eval_log = tmp_path / "output" / "0" / "test_0.log"
    assert done.returncode == 3
    assert f"evaluation failed (exit 3); read {eval_log}" in done.stderr
    assert "something broke" in done.stderr  # the log's last lines are shown
    assert "Final result" not in done.stdout


def test_random_init_baseline_is_measured_once_per_recipe(tmp_path, stubs, tiny_imagefolder):
    for _ in range(2):
        done = run_script("train_full_1p.sh", "--device=cpu", f"--data_path={tiny_imagefolder}",
                          tmp_path=tmp_path, **stubs)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Random-init Accuracy : 45.25" in done.stdout
    assert Path(stubs["STUB_CALLS"]).read_text() == "random-init\n"  # the second run used the cache
    cached = list((tmp_path / "random-init").glob("*.json"))  # SSL_RANDOM_INIT_CACHE (script_env)
    assert len(cached) == 1 and '"accuracy": "45.25"' in cached[0].read_text()
    # another recipe (here: another dataset) is measured on its own
    other = tmp_path / "other_data"
    other.symlink_to(tiny_imagefolder, target_is_directory=True)
    done = run_script("train_full_1p.sh", "--device=cpu", f"--data_path={other}", tmp_path=tmp_path, **stubs)
    assert done.returncode == 0 and Path(stubs["STUB_CALLS"]).read_text().count("random-init") == 2
    # accelerator runs have no baseline stage
    _, commands = dry_run("train_full_1p.sh", "--device=cuda", tmp_path=tmp_path)
    assert "RANDOM-INIT" not in commands


@pytest.mark.parametrize("planted", ['"45.25\\nActualFPS = 1"', "[45.25]"])  # more: test_report.py
def test_a_bad_random_init_cache_entry_is_measured_again(tmp_path, stubs, tiny_imagefolder, planted):
    """A cache entry whose accuracy is not a finite number (here one with a newline, which would
    add a second ActualFPS line to the case file) is measured again, with a note."""
    flags = ("--device=cpu", f"--data_path={tiny_imagefolder}")
    assert run_script("train_full_1p.sh", *flags, tmp_path=tmp_path, **stubs).returncode == 0
    (entry,) = (tmp_path / "random-init").glob("*.json")
    entry.write_text(entry.read_text().replace('"45.25"', planted))
    done = run_script("train_full_1p.sh", *flags, tmp_path=tmp_path, **stubs)
    assert done.returncode == 0, done.stdout + done.stderr
    case = (tmp_path / "output" / "0" / "DINO_ID3436_for_PyTorch_bs64_1p_acc.log").read_text().splitlines()
    assert sum(line.startswith("ActualFPS") for line in case) == 1 and "RandomInitAccuracy = 45.25" in case
    assert Path(stubs["STUB_CALLS"]).read_text().count("random-init") == 2  # measured again
    assert f"{entry} holds" in done.stderr and "not a number" in done.stderr
    assert '"accuracy": "45.25"' in entry.read_text()  # the entry is good again


def test_moby_full_run_on_cpu_evaluates_with_knn(tmp_path, stubs, tiny_imagefolder):
    done = run_script("train_full_1p.sh", "--model=moby", "--device=cpu",
                      f"--data_path={tiny_imagefolder}", tmp_path=tmp_path, **stubs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Final Performance images/sec : 99.25" in done.stdout
    assert "Final Train Accuracy : 62.75" in done.stdout
    assert "Random-init Accuracy : 50.5" in done.stdout
    _, commands = dry_run("train_full_1p.sh", "--model=moby", "--device=cpu", tmp_path=tmp_path)
    assert split_launch(commands["EVAL"])[1][0] == "moby/eval_knn.py"
    assert split_launch(commands["RANDOM-INIT"])[1][0] == "moby/eval_knn.py"
    assert "--random-init" in commands["RANDOM-INIT"]
    for command in (commands["EVAL"], commands["RANDOM-INIT"]):  # k-NN on the whole train split
        assert flag_value(command, "--opts") == "DATA.MAX_TRAIN_IMAGES" and command[-1] == "0"
    case = tmp_path / "output" / "0" / "Transformer-SSL_ID3434_for_PyTorch_bs64_1p_acc.log"
    assert "ActualLoss = 16.2500" in case.read_text()


def test_performance_run_without_throughput_line_fails(tmp_path, stubs, tiny_imagefolder):
    silent = tmp_path / "stubs" / "silent.py"
    silent.write_text("print('Epoch: [0/1]  [0/2]  loss: 1.0 (1.0)')\n")
    done = run_script("train_performance_1p.sh", "--device=cpu", f"--data_path={tiny_imagefolder}",
                      tmp_path=tmp_path, **{**stubs, "DINO_PRETRAIN": str(silent)})
    assert done.returncode == 2
    assert f"read {tmp_path / 'output' / '0' / 'train_0.log'}" in done.stderr


def test_eval_script_starts_fresh_and_prints_the_accuracy(tmp_path, stubs, tiny_imagefolder):
    checkpoint = tmp_path / "pretrained.pth"
    checkpoint.write_bytes(b"stub")
    settings, _ = dry_run("eval_linear.sh", "--model=moby", "--device=cpu",
                          f"--checkpoint={checkpoint}", tmp_path=tmp_path)
    stale = Path(settings["RUN_DIR"]) / "linear" / "checkpoint.pth"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old linear head")
    done = run_script("eval_linear.sh", "--model=moby", "--device=cpu", f"--checkpoint={checkpoint}",
                      f"--data_path={tiny_imagefolder}", tmp_path=tmp_path, **stubs)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "Final Train Accuracy : 61.25"
    assert not stale.exists()


# ------------------------------------------------------------------------------------------------
# Reruns: the same command resumes its run; nothing the scripts write is deleted.

# A pretraining stand-in that resumes as DINO does (from checkpoint.pth in its output folder) and
# stops as it would when preempted: STUB_STOP=exit exits 143 after its checkpoint, STUB_STOP=term
# waits for SIGTERM (its ready file tells when), then saves and exits 143.
STUB_RESUMABLE_PRETRAIN = """\
import argparse, os, signal, sys, time
p = argparse.ArgumentParser(); p.add_argument("--output_dir")
args, _ = p.parse_known_args()
checkpoint = os.path.join(args.output_dir, "checkpoint.pth")
print("resumed" if os.path.isfile(checkpoint) else "started", flush=True)
open(os.environ["STUB_CALLS"], "a").write("pretraining\\n")
os.makedirs(args.output_dir, exist_ok=True)
stop = os.environ.get("STUB_STOP")
def save_and_stop(signum, frame):
    import torch
    torch.save({"epoch": 1, "epoch_step": 3}, checkpoint)
    print(f"received signal {signum}", flush=True)
    sys.exit(143)
if stop == "term":
    signal.signal(signal.SIGTERM, save_and_stop)
    open(os.environ["STUB_READY"], "w").close()
    time.sleep(120)
if stop == "exit":
    save_and_stop(0, None)
open(checkpoint, "wb").write(b"final")
print("Epoch: [1/2]  [1/2]  eta: 0:00:00  loss: 7.000000 (7.500000)  lr: 0.000002 (0.000002)")
print("Throughput: 123.00 images/s (0.5000 s/step over 10 steps after 5 warm-up, global batch 64)")
"""


@pytest.fixture
def resumable(stubs, tmp_path) -> dict:
    path = tmp_path / "stubs" / "resumable.py"
    path.write_text(STUB_RESUMABLE_PRETRAIN)
    return {**stubs, "DINO_PRETRAIN": str(path), "STUB_READY": str(tmp_path / "ready")}


def pretraining_calls(stubs: dict) -> int:
    calls = Path(stubs["STUB_CALLS"])
    return calls.read_text().count("pretraining") if calls.exists() else 0


def test_a_rerun_resumes_and_keeps_the_earlier_logs(tmp_path, resumable, tiny_imagefolder):
    flags = ("--device=cpu", f"--data_path={tiny_imagefolder}")
    out = tmp_path / "output" / "0"
    run_dir = out / "DINO_ID3436_for_PyTorch_bs64_1p_acc"
    first = run_script("train_full_1p.sh", *flags, tmp_path=tmp_path, STUB_STOP="exit", **resumable)
    assert first.returncode == 143
    assert "rerun the same command to resume from the last checkpoint" in first.stderr
    second = run_script("train_full_1p.sh", *flags, tmp_path=tmp_path, **resumable)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming from {run_dir / 'checkpoint.pth'} (epoch 1, batch 3); --fresh to start over" in second.stdout
    assert "resumed" in (out / "train_0.log").read_text()  # the program found its checkpoint
    earlier = [path for path in out.glob("train_0.log.*")]  # the first attempt's log, renamed
    assert len(earlier) == 1 and "received signal 0" in earlier[0].read_text()
    assert "Final Train Accuracy : 55.5" in second.stdout
    assert list(out.glob(f"{run_dir.name}.2*")) == []  # resumed in place, nothing moved aside


def test_a_finished_run_is_kept_and_a_rerun_starts_a_new_one(tmp_path, resumable, tiny_imagefolder):
    flags = ("--device=cpu", f"--data_path={tiny_imagefolder}")
    out = tmp_path / "output" / "0"
    run_dir = out / "DINO_ID3436_for_PyTorch_bs64_1p_perf"
    assert run_script("train_performance_1p.sh", *flags, tmp_path=tmp_path, **resumable).returncode == 0
    case_file = out / f"{run_dir.name}.log"
    case_file.write_text(case_file.read_text() + "# first\n")
    again = run_script("train_performance_1p.sh", *flags, tmp_path=tmp_path, **resumable)
    assert again.returncode == 0, again.stdout + again.stderr
    (kept,) = out.glob(f"{run_dir.name}.2*")  # the finished run, renamed with its time
    assert (kept / "checkpoint.pth").is_file() and "it finished" in again.stdout and str(kept) in again.stdout
    assert "started" in (out / "train_0.log").read_text()  # a new run, from scratch
    (earlier_case,) = out.glob(f"{run_dir.name}.log.*")
    assert earlier_case.read_text().endswith("# first\n")  # the earlier result, kept
    assert "# first" not in case_file.read_text()


def test_fresh_or_other_settings_move_an_unfinished_run_aside(tmp_path, resumable, tiny_imagefolder):
    flags = ("--device=cpu", f"--data_path={tiny_imagefolder}")
    out = tmp_path / "output" / "0"
    name = "DINO_ID3436_for_PyTorch_bs64_1p_perf"
    assert run_script("train_performance_1p.sh", *flags, tmp_path=tmp_path, STUB_STOP="exit", **resumable).returncode == 143
    fresh = run_script("train_performance_1p.sh", *flags, "--fresh", tmp_path=tmp_path, **resumable)
    assert fresh.returncode == 0 and "--fresh was given" in fresh.stdout
    assert "started" in (out / "train_0.log").read_text()
    assert run_script("train_performance_1p.sh", *flags, tmp_path=tmp_path, STUB_STOP="exit", **resumable).returncode == 143
    other = run_script("train_performance_1p.sh", *flags, "--epochs=2", tmp_path=tmp_path, **resumable)
    assert other.returncode == 0, other.stdout + other.stderr
    assert "it was started with other settings (--epochs 1 -> 2" in other.stdout
    # kept, renamed: the unfinished run (--fresh), the finished fresh one, the run with other settings
    assert len(list(out.glob(f"{name}.2*"))) == 3


def test_a_rerun_after_a_failed_evaluation_evaluates_without_pretraining_again(tmp_path, resumable,
                                                                            tiny_imagefolder):
    flags = ("--device=cpu", f"--data_path={tiny_imagefolder}")
    failed = run_script("train_full_1p.sh", *flags, tmp_path=tmp_path, STUB_FAIL="1", **resumable)
    assert failed.returncode == 3 and pretraining_calls(resumable) == 1
    (tmp_path / "output" / "0" / "train_0.log").write_text("another case's log\n")
    again = run_script("train_full_1p.sh", *flags, tmp_path=tmp_path, **resumable)
    assert again.returncode == 0, again.stdout + again.stderr
    assert pretraining_calls(resumable) == 1 and "pretraining in " in again.stdout
    assert "Final Performance images/sec : 123.00" in again.stdout  # from the kept pretraining log
    assert "Throughput" in (tmp_path / "output" / "0" / "train_0.log").read_text()


def test_sigterm_reaches_the_training_which_saves_and_the_script_says_how_to_resume(tmp_path, resumable,
                                                                                   tiny_imagefolder):
    script = subprocess.Popen(["bash", str(TEST_DIR / "train_full_1p.sh"), "--device=cpu",
                               f"--data_path={tiny_imagefolder}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=script_env(tmp_path, STUB_STOP="term", **resumable))
    ready = Path(resumable["STUB_READY"])
    for _ in range(1200):
        if ready.exists() or script.poll() is not None:
            break
        time.sleep(0.05)
    script.send_signal(signal.SIGTERM)  # to the script only, as a scheduler sends it
    out, err = script.communicate(timeout=120)
    assert script.returncode == 143, out + err
    assert "rerun the same command to resume from the last checkpoint" in err
    assert "received signal 15" in (tmp_path / "output" / "0" / "train_0.log").read_text()


def test_setup_env_prefers_a_ready_venv_and_honours_overrides(tmp_path):
    """Choice of interpreter without installing anything: a fake repository with a stamped .venv."""
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / "requirements.txt").write_text("torch\n")
    fake_python = repo / ".venv" / "bin" / "python"
    fake_python.write_text("#!/bin/sh\nexit 0\n")
    fake_python.chmod(0o755)
    no_torch = tmp_path / "bin"  # a python3 on PATH that has none of the requirements
    no_torch.mkdir()
    (no_torch / "python3").write_text("#!/bin/sh\nexit 1\n")
    (no_torch / "python3").chmod(0o755)
    code = ('source test/setup_env.sh; '
            '(cd "$1" && sha256sum requirements.txt | cut -d" " -f1 > .venv/.requirements.sha256); '
            'ssl_setup_env "$1" && echo "$SSL_PYTHON"')
    env = {**os.environ, "PATH": f"{no_torch}:{os.environ['PATH']}"}
    env.pop("SSL_PYTHON", None)
    env.pop("SSL_NO_VENV", None)
    done = subprocess.run(["bash", "-c", code, "bash", str(repo)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(fake_python)
    assert "installing" not in done.stderr
    done = subprocess.run(["bash", "-c", code, "bash", str(repo)], capture_output=True, text=True,
                          cwd=REPO, env={**env, "SSL_NO_VENV": "1"}, timeout=60)
    assert done.stdout.strip() == str(no_torch / "python3")
    done = subprocess.run(["bash", "-c", code, "bash", str(repo)], capture_output=True, text=True,
                          cwd=REPO, env={**env, "SSL_PYTHON": "/opt/py"}, timeout=60)
    assert done.stdout.strip() == "/opt/py"


def test_dataset_check_finds_the_idx_files(tmp_path):
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        (tmp_path / f"{name}-ubyte.gz").write_bytes(b"")
    code = "source test/setup_env.sh && ssl_fashion_mnist_present && echo present"
    done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "FASHION_MNIST_DIR": str(tmp_path)})
    assert done.stdout.strip() == "present"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "FASHION_MNIST_DIR": str(tmp_path)})
    assert done.returncode == 1 and done.stdout == ""


# ------------------------------------------------------------------------------------------------
# The real programs, as small as they go: the contract between the scripts and the two trees.

@pytest.mark.slow
@pytest.mark.parametrize("model", ["dino", "moby"])
def test_real_full_run_on_a_tiny_dataset(tmp_path, tiny_imagefolder, model):
    done = run_script("train_full_1p.sh", f"--model={model}", "--device=cpu", "--steps=2",
                      "--batch_size=8", f"--data_path={tiny_imagefolder}", tmp_path=tmp_path,
                      timeout=600, OMP_NUM_THREADS="1")
    out = tmp_path / "output" / "0"
    assert done.returncode == 0, done.stdout + done.stderr + (out / "train_0.log").read_text()[-3000:]
    network = "DINO_ID3436_for_PyTorch" if model == "dino" else "Transformer-SSL_ID3434_for_PyTorch"
    case = dict(line.split(" = ", 1)
                for line in (out / f"{network}_bs8_1p_acc.log").read_text().splitlines())
    assert float(case["ActualFPS"]) > 0 and float(case["TrainingTime"]) > 0
    assert 0 <= float(case["TrainAccuracy"]) <= 100
    assert float(case["ActualLoss"]) > 0
    assert f"Final Train Accuracy : {case['TrainAccuracy']}" in done.stdout


def test_dino_cpu_recipe_follows_the_runs_length(tmp_path):
    from dino import main_dino

    def pretrain_args(*flags):
        _, commands = dry_run("train_full_1p.sh", "--device=cpu", *flags, tmp_path=tmp_path)
        program = split_launch(commands["PRETRAIN"])[1]
        args = main_dino.get_args_parser().parse_args(program[1:])
        main_dino.validate_args(args)  # the recipe is one main_dino.py accepts
        return args

    quick = pretrain_args()  # the quick start: one epoch
    assert (quick.epochs, quick.max_train_images, quick.freeze_last_layer, quick.warmup_epochs) == (1, 50000, 0, 0)
    assert quick.momentum_teacher == 0.99 and quick.num_workers == -1  # workers: the CPU layout's choice
    longer = pretrain_args("--epochs=3")  # the whole split, upstream's freeze and a warm-up epoch
    assert (longer.epochs, longer.max_train_images, longer.freeze_last_layer, longer.warmup_epochs) == (3, 0, 1, 1)
    assert longer.momentum_teacher == 0.99


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dino", "moby"])
def test_a_killed_full_run_rerun_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, model):
    """train_full_1p.sh killed (SIGKILL to it and everything it started, as when a node goes
    down) after its first checkpoint, then rerun with the same command. Both programs save the
    generators and seed each sample's augmentations by (seed, epoch, index), so the resumed run
    draws what the uninterrupted one drew: with the same thread count the weights match exactly."""
    from conftest import make_imagefolder

    from ssl_runtime.checkpoint import load_checkpoint
    from tests.reliability_helpers import assert_same_tensors, saved_epoch_step

    data = make_imagefolder(tmp_path / "data", classes=3, per_class=32)  # 12 steps of 8 images an epoch
    flags = (f"--model={model}", "--device=cpu", "--epochs=3", "--batch_size=8", f"--data_path={data}")
    extra = {"OMP_NUM_THREADS": "1", "SSL_RANDOM_INIT_CACHE": str(tmp_path / "random-init")}
    network = "DINO_ID3436_for_PyTorch" if model == "dino" else "Transformer-SSL_ID3434_for_PyTorch"
    inside = "checkpoint.pth" if model == "dino" else "*/pretrain/checkpoint.pth"

    def final_checkpoint(root: Path) -> Path:
        found = list((root / "output" / "0" / f"{network}_bs8_1p_acc").glob(inside))
        return found[0] if found else root / "none"

    reference = run_script("train_full_1p.sh", *flags, tmp_path=tmp_path / "ref", timeout=900, **extra)
    assert reference.returncode == 0, reference.stdout + reference.stderr

    script = subprocess.Popen(["bash", str(TEST_DIR / "train_full_1p.sh"), *flags], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=script_env(tmp_path / "run", **extra),
                              start_new_session=True)
    saved = None
    while script.poll() is None and not (saved and saved[0] >= (1 if model == "dino" else 0)):
        time.sleep(0.05)
        saved = saved_epoch_step(final_checkpoint(tmp_path / "run"))
    os.killpg(script.pid, signal.SIGKILL)
    assert script.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    resume_at = (saved[0], 0) if model == "dino" else (saved[0] + 1, 0)  # the epoch the logs show next

    rerun = run_script("train_full_1p.sh", *flags, tmp_path=tmp_path / "run", timeout=900, **extra)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    checkpoint = final_checkpoint(tmp_path / "run")
    assert f"resuming from {checkpoint} (epoch {resume_at[0]}, batch 0)" in rerun.stdout
    a, b = load_checkpoint(final_checkpoint(tmp_path / "ref")), load_checkpoint(checkpoint)
    for key in ("student", "teacher", "dino_loss", "optimizer", "epoch") if model == "dino" else (
            "model", "optimizer", "lr_scheduler", "epoch"):
        assert_same_tensors(a[key], b[key], key)
    accuracy = [line for line in reference.stdout.splitlines() if line.startswith("Final Train Accuracy")]
    assert accuracy and accuracy[0] in rerun.stdout  # the same weights evaluate the same


def test_benchmark_script_passes_its_arguments_through(tmp_path):
    """test/benchmark.sh hands everything to ssl_runtime.launch_scripts.benchmark, which passes the
    flags it does not know to every benchmark program (a precision flag, say)."""
    def lines(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(TEST_DIR / "benchmark.sh"), *flags], capture_output=True, text=True,
                              env=script_env(tmp_path), timeout=60)

    done = lines("--configs=dino_cpu moby_cpu", "--steps=5", "--workers=none", "--made_up=1", "--dry_run")
    assert done.returncode == 0, done.stderr
    dino, moby = (line.split() for line in done.stdout.splitlines())
    assert dino[:2] == ["python", "dino/benchmark.py"] and moby[:2] == ["python", "moby/benchmark.py"]
    for words, name in ((dino, "dino_cpu"), (moby, "moby_cpu")):
        assert words[-2:] == ["--bench_workers", "--made_up=1"] and flag_value(words, "--bench_steps") == "5"
        assert flag_value(words, "--bench_json") == str(tmp_path / "output" / "benchmark" / f"{name}.json")
    precisions = [lines("--configs=b d", *flags, "--dry_run").stdout.split("\n")[:2]
                  for flags in ((), ("--precision=fp32,bf16",), ("--amp",))]
    def given(words: list[str]) -> str | None:
        return flag_value(words, "--bench_precision") if "--bench_precision" in words else None
    assert [[given(line.split()) for line in pair] for pair in precisions] == [
        [None, None], ["fp32,bf16"] * 2, ["auto"] * 2]  # the programs' default: fp32 and auto
    assert not any("--use_fp16" in line or "--amp-opt-level" in line for pair in precisions for line in pair)
    done = lines("--steps=0", "--dry_run")
    assert done.returncode == 2 and "--steps must be a positive integer, got '0'" in done.stderr
    assert "Configurations" in lines("--help").stdout
