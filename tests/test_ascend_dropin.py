"""The launch scripts as a drop-in for Huawei's Ascend ModelZoo scripts, tested with a fake Ascend
install: a folder with CANN's set_env.sh that puts a fake torch_npu on PYTHONPATH, which imports
(8 NPUs) or fails as torch_npu fails without CANN's libraries."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet

from conftest import free_port
from ssl_runtime import device as devices
from ssl_runtime import report
from ssl_runtime import torch_stack
from ssl_runtime.errors import UserError
from test_launch_scripts import dry_run, flag_value, run_script, stubs  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]

FAKE_TORCH_NPU = {
    "ok": ("import sys, types, torch\n"
           "npu = types.ModuleType('torch.npu')\n"
           "npu.is_available = lambda: True\n"
           "npu.device_count = lambda: 8\n"
           "torch.npu = npu\n"
           "sys.modules['torch.npu'] = npu\n"),
    "broken": "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')\n",
}
LIBHCCL = "libhccl.so: cannot open shared object file"


def fake_cann(root: Path, torch_npu: str | None, layout: str = "ascend-toolkit") -> Path:
    """A CANN install under root/<layout> whose set_env.sh sets CANN's variables and, when asked,
    puts a fake torch_npu on PYTHONPATH. Returns the set_env.sh."""
    home = root / layout
    (home / "latest").mkdir(parents=True)
    site = root / "site-packages"
    site.mkdir()
    if torch_npu is not None:
        (site / "torch_npu").mkdir()
        (site / "torch_npu" / "__init__.py").write_text(FAKE_TORCH_NPU[torch_npu])
    set_env = home / "set_env.sh"
    set_env.write_text(f"export ASCEND_TOOLKIT_HOME={home}/latest\n"
                       f"export PYTHONPATH={site}${{PYTHONPATH:+:$PYTHONPATH}}\n")
    return set_env


def ascend_env(root: Path, **extra: str) -> dict:
    """Script environment on a machine whose CANN lives under root (the default place)."""
    return {"SSL_ASCEND_ROOT": str(root), "SSL_CANN_INSTALL_INFO": str(root / "no_info"), **extra}


def clean_pythonpath() -> dict:
    """PYTHONPATH without entries of an outer fake (the scripts add the repository themselves)."""
    return {"PYTHONPATH": ""}


# ------------------------------------------------------------------------------------------------
# 1. No silent CPU runs on an NPU server.

@pytest.mark.parametrize("layout", ["ascend-toolkit", "nnae", "cann", "CANN_SET_ENV", "install_info"])
def test_ascend_environment_is_sourced_before_the_device_is_chosen(tmp_path, layout):
    root = tmp_path / "Ascend"
    set_env = fake_cann(root, "ok", layout if layout in ("ascend-toolkit", "nnae", "cann") else "custom")
    env = ascend_env(root, **clean_pythonpath())
    if layout == "CANN_SET_ENV":
        env["CANN_SET_ENV"] = str(set_env)
    elif layout == "install_info":  # /etc/Ascend/ascend_cann_install.info names another root
        other = tmp_path / "elsewhere"
        fake_cann(other, "ok")
        info = tmp_path / "ascend_cann_install.info"
        info.write_text(f"Install_Path={other}\n")
        env.update(SSL_CANN_INSTALL_INFO=str(info), SSL_ASCEND_ROOT=str(tmp_path / "nothing"))
    settings, commands = dry_run("train_full_8p.sh", tmp_path=tmp_path, **env)
    assert settings["DEVICE"] == "npu"
    pretrain = commands["PRETRAIN"]
    assert flag_value(pretrain, "--optimizer") == "npufusedadamw" and flag_value(pretrain, "--bin") == "True"
    assert flag_value(pretrain, "--arch") == "vit_small"  # upstream's recipe, not the CPU one


def test_broken_torch_npu_stops_the_run_with_the_error_and_the_fix(tmp_path, stubs, tiny_imagefolder):
    root = tmp_path / "Ascend"
    fake_cann(root, "broken")
    done = run_script("train_full_1p.sh", f"--data_path={tiny_imagefolder}", tmp_path=tmp_path,
                      **stubs, **ascend_env(root, **clean_pythonpath()))
    assert done.returncode == 2, done.stdout + done.stderr
    assert LIBHCCL in done.stderr
    assert "torch_npu 2.1.0.post17 with torch 2.1.0" in done.stderr and "--device cpu" in done.stderr
    assert "Final result" not in done.stdout and "Final Performance" not in done.stdout
    assert not (tmp_path / "output" / "0" / "train_0.log").exists()  # nothing was started


def test_ascend_install_without_torch_npu_stops(tmp_path, stubs, tiny_imagefolder):
    root = tmp_path / "Ascend"
    fake_cann(root, None)
    done = run_script("train_performance_1p.sh", f"--data_path={tiny_imagefolder}", tmp_path=tmp_path,
                      **stubs, **ascend_env(root, **clean_pythonpath()))
    assert done.returncode == 2
    assert "(ASCEND_TOOLKIT_HOME is set by CANN's set_env.sh), but torch_npu is not installed" in done.stderr
    assert "Final result" not in done.stdout


def test_cpu_stays_possible_on_an_ascend_machine(tmp_path, stubs, tiny_imagefolder):
    root = tmp_path / "Ascend"
    fake_cann(root, "broken")
    done = run_script("train_full_1p.sh", "--device=cpu", f"--data_path={tiny_imagefolder}",
                      tmp_path=tmp_path, **stubs, **ascend_env(root, **clean_pythonpath()))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Final Train Accuracy : 55.5" in done.stdout


def test_cuda_without_cuda_stops_before_training(tmp_path, stubs, tiny_imagefolder):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run_script("train_full_1p.sh", "--device=cuda", f"--data_path={tiny_imagefolder}",
                      tmp_path=tmp_path, **stubs)
    assert done.returncode == 2
    assert "no CUDA GPU is visible" in done.stderr
    assert not (tmp_path / "output" / "0" / "train_0.log").exists()


def test_a_wrong_cann_set_env_is_an_error(tmp_path):
    done = run_script("train_full_1p.sh", "--dry_run", tmp_path=tmp_path,
                      CANN_SET_ENV=str(tmp_path / "no" / "set_env.sh"))
    assert done.returncode == 2
    assert f"CANN_SET_ENV={tmp_path / 'no' / 'set_env.sh'} does not exist" in done.stderr


def put_fake_torch_npu(monkeypatch, tmp_path: Path, kind: str) -> None:
    folder = tmp_path / f"site_{kind}"
    (folder / "torch_npu").mkdir(parents=True)
    (folder / "torch_npu" / "__init__.py").write_text(FAKE_TORCH_NPU[kind])
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)


def test_device_module_reports_the_import_error_instead_of_choosing_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    put_fake_torch_npu(monkeypatch, tmp_path, "broken")
    with pytest.raises(UserError, match=LIBHCCL) as raised:  # torch_npu installed: an Ascend machine
        devices.resolve_device("auto")
    assert "torch_npu is installed" in str(raised.value)
    with pytest.raises(UserError, match=LIBHCCL):
        devices.resolve_device("npu")
    assert devices.resolve_device("cpu") == "cpu"


def test_cann_environment_without_torch_npu_is_not_a_cpu_machine(monkeypatch):
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", "/usr/local/Ascend/ascend-toolkit/latest")
    with pytest.raises(UserError, match="torch_npu is not installed"):
        devices.resolve_device("auto")


# ------------------------------------------------------------------------------------------------
# 2. Installing never replaces an environment's torch / torch_npu.

def test_an_environment_with_its_own_torch_is_never_replaced(tmp_path):
    """python3 has torch 2.1.0+cpu and torch_npu but no timm / yacs / torchvision: the scripts
    stop with the pip command that keeps that torch; no .venv with another torch is made."""
    site = tmp_path / "site"
    for name, version in (("torch", "2.1.0+cpu"), ("torch_npu", "2.1.0.post17")):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"  # an interpreter without the test environment's packages
    python3.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python3.chmod(0o755)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "ssl_runtime").symlink_to(REPO / "ssl_runtime")
    (repo / "requirements.txt").write_text("# nothing to install\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(site)}
    env.pop("SSL_PYTHON", None)
    env.pop("SSL_NO_VENV", None)
    done = subprocess.run(["bash", "-c", 'source test/setup_env.sh; ssl_setup_env "$1"', "bash", str(repo)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert not (repo / ".venv").exists()
    assert "has torch 2.1.0+cpu and torch_npu 2.1.0.post17 but lacks torchvision, timm, yacs" in done.stderr
    # sys.executable: the interpreter behind the fake python3
    assert f"{sys.executable} -m pip install 'torchvision==0.16.*' 'timm>=1.0.9,<2' 'yacs==0.1.8' " \
           "'torch==2.1.0+cpu'" in done.stderr


def test_torchvision_series_follows_torch():
    assert torch_stack.matching_torchvision("2.1.0+cpu") == "0.16.*"
    assert torch_stack.matching_torchvision("2.14.0") == "0.29.*"
    assert torch_stack.matching_torchvision("1.11.0") is None


# The torch requirement in each torch_npu wheel's METADATA (read from the wheels on PyPI:
# 2.1.0.post17 for x86_64 and aarch64, 2.14.0).
TORCH_NPU_REQUIRES = {"2.1.0.post17": ["==2.1.0+cpu", "==2.1.0"], "2.14.0": ["==2.14.0.*"]}


def requirement_pins(path: Path) -> dict:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip() or line
    return pins


@pytest.mark.parametrize("npu_version", sorted(torch_stack.NPU_STACKS))
def test_npu_requirement_files_agree_with_torch_npu(npu_version):
    torch_version, vision, _, path = torch_stack.NPU_STACKS[npu_version]
    pins = requirement_pins(REPO / path)
    assert pins["torch_npu"] == npu_version
    assert (pins["torch"], pins["torchvision"]) == (torch_version, vision)
    assert torch_stack.matching_torchvision(torch_version) == vision.rsplit(".", 1)[0] + ".*"
    # the file's torch pin admits the build torch_npu requires (x86_64: the +cpu build)
    for requirement in TORCH_NPU_REQUIRES[npu_version]:
        build = requirement[2:].replace(".*", "")
        assert build in SpecifierSet(requirement) and build in SpecifierSet(f"=={pins['torch']}")


# ------------------------------------------------------------------------------------------------
# 3. Huawei's command lines.

HUAWEI_DINO_8P = ("--arch vit_small --data_path /imagenet --output_dir ./output --amp --epochs 100 "
                  "--num_workers 32 --batch_size 64 --use_color_jitter_opti --bin True").split()
HUAWEI_DINO_PERF = HUAWEI_DINO_8P[:-2] + "--warmup_epochs 0 --num_steps 200 --bin False".split()


def test_huawei_dino_command_lines_parse(monkeypatch, capsys):
    from dino.main_dino import get_args_parser, validate_args

    monkeypatch.setenv(devices.NPU_BINARY_ENV, "")  # restored after the test: --bin writes it
    args = get_args_parser().parse_args(HUAWEI_DINO_8P)
    assert (args.batch_size_per_gpu, args.num_workers, args.bin, args.amp) == (64, 32, True, True)
    assert os.environ[devices.NPU_BINARY_ENV] == "1"
    validate_args(args)
    assert "--use_color_jitter_opti is ignored" in capsys.readouterr().err
    args = get_args_parser().parse_args(HUAWEI_DINO_PERF)
    assert (args.warmup_epochs, args.num_steps, args.bin) == (0, 200, False)
    assert os.environ[devices.NPU_BINARY_ENV] == "0"


class FakeNpu(types.SimpleNamespace):
    """torch.npu as far as bind_device uses it; records the calls."""

    def __init__(self):
        super().__init__(calls=[])
        self.device_count = lambda: 8
        self.set_device = lambda index: self.calls.append(("set_device", index))
        self.set_compile_mode = lambda jit_compile: self.calls.append(("set_compile_mode", jit_compile))
        self.set_option = lambda option: self.calls.append(("set_option", dict(option)))


@pytest.fixture
def fake_npu(monkeypatch) -> FakeNpu:
    """torch.npu replaced by a recorder; torch.device('npu', i) stands for itself (this torch
    knows no 'npu' device type without torch_npu)."""
    fake = FakeNpu()
    monkeypatch.setattr(torch, "npu", fake, raising=False)
    monkeypatch.setattr(devices.torch, "device", lambda *args: args)
    return fake


@pytest.mark.parametrize("flag, jit_compile", [("True", False), ("False", True)])
def test_bin_flag_selects_binary_operators_on_npu(monkeypatch, fake_npu, flag, jit_compile):
    import argparse

    fake = fake_npu
    monkeypatch.setenv(devices.NPU_BINARY_ENV, "")  # restored after the test: --bin writes it
    for variable in devices.NPU_OPTION_SWITCHES:
        monkeypatch.delenv(variable, raising=False)
    parser = argparse.ArgumentParser()
    devices.add_device_arg(parser)
    parser.parse_args(["--device", "npu", "--bin", flag])
    assert devices.bind_device("npu", 3) == ("npu", 3)
    assert fake.calls == [
        ("set_compile_mode", jit_compile),
        ("set_option", {"ACL_OP_SELECT_IMPL_MODE": "high_performance",
                        "ACL_OPTYPELIST_FOR_IMPLMODE": "LayerNorm", "MM_BMM_ND_ENABLE": "enable"}),
        ("set_device", 3),
    ]


def test_npu_options_can_be_switched_off(monkeypatch, fake_npu):
    fake = fake_npu
    monkeypatch.delenv(devices.NPU_BINARY_ENV, raising=False)  # torch_npu's own compile mode
    monkeypatch.setenv("SSL_NPU_LAYERNORM_HIGH_PERF", "0")
    devices.bind_device("npu", 0)
    assert fake.calls == [("set_option", {"MM_BMM_ND_ENABLE": "enable"}), ("set_device", 0)]
    fake.calls.clear()
    monkeypatch.setenv("SSL_NPU_MM_BMM_ND", "0")
    devices.bind_device("npu", 0)
    assert fake.calls == [("set_device", 0)]


def test_bin_on_another_device_is_a_note(monkeypatch, capsys):
    monkeypatch.setenv(devices.NPU_BINARY_ENV, "1")
    assert devices.bind_device("cpu", 0) == torch.device("cpu")
    assert "no effect on cpu" in capsys.readouterr().out


def test_scripts_pass_the_ascend_flags_on_npu_only(tmp_path):
    _, commands = dry_run("train_performance_8p.sh", "--device=npu", "--bin=False", tmp_path=tmp_path)
    assert flag_value(commands["PRETRAIN"], "--optimizer") == "npufusedadamw"
    assert flag_value(commands["PRETRAIN"], "--bin") == "False"
    _, commands = dry_run("train_full_8p.sh", "--device=npu", "--model=moby", tmp_path=tmp_path)
    assert flag_value(commands["PRETRAIN"], "--bin") == "True" and "--optimizer" not in commands["PRETRAIN"]
    assert flag_value(commands["EVAL"], "--bin") == "True"
    done = run_script("train_full_8p.sh", "--device=cpu", "--bin=True", "--dry_run", tmp_path=tmp_path)
    assert "--bin" not in done.stdout and "--bin chooses NPU operator binaries: ignored on cpu" in done.stderr
    done = run_script("train_full_8p.sh", "--device=cpu", "--bin=maybe", "--dry_run", tmp_path=tmp_path)
    assert done.returncode == 2 and "--bin=maybe" in done.stderr


def test_without_model_the_scripts_say_they_run_dino_and_cfg_means_moby(tmp_path):
    """Huawei's Transformer-SSL scripts need no --model: ours default to DINO, so they say so, and
    a MoBY-only flag (--cfg) chooses MoBY."""
    done = run_script("train_full_8p.sh", "--device=cpu", "--dry_run", tmp_path=tmp_path)
    assert done.returncode == 0
    assert ("note: no --model given: running DINO (DINO_ID3436_for_PyTorch); add --model=moby for MoBY "
            "(Transformer-SSL_ID3434_for_PyTorch)") in done.stderr
    settings, commands = dry_run("train_full_8p.sh", "--device=npu", "--cfg=configs/moby_swin_tiny.yaml",
                                 tmp_path=tmp_path)
    assert settings["MODEL"] == "moby" and settings["CASE_NAME"].startswith("Transformer-SSL_ID3434_for_PyTorch")
    assert commands["PRETRAIN"][4] == "moby/main_moby.py"
    done = run_script("train_full_8p.sh", "--device=cpu", "--model=moby", "--dry_run", tmp_path=tmp_path)
    assert "note:" not in done.stderr


def test_huaweis_flags_are_accepted_or_ignored_with_a_note(tmp_path, tiny_imagefolder):
    """Every flag of Huawei's DINO / Transformer-SSL scripts: --data_path, --conda_name, --bin and
    --more_path1, and --device_id (as ASCEND_DEVICE_ID) of other ModelZoo scripts."""
    done = run_script("train_performance_1p.sh", f"--data_path={tiny_imagefolder}", "--conda_name=pt", "--bin=False",
                      f"--more_path1={tmp_path / 'xcit'}", "--device_id=3", "--device=npu", "--dry_run", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--more_path1 is accepted for compatibility and ignored" in done.stderr
    assert "conda environment 'pt' not activated" in done.stderr  # a dry run activates nothing
    assert f"TRAIN_LOG={tmp_path / 'output' / '3' / 'train_3.log'}" in done.stdout
    assert "--bin False" in done.stdout
    done = run_script("train_full_8p.sh", "--precision_mode=allow_mix", "--dry_run", tmp_path=tmp_path)
    assert done.returncode == 2 and "unknown argument '--precision_mode=allow_mix'" in done.stderr


def test_each_rank_gets_rank_size_and_device_id_chooses_the_device(tmp_path, stubs, tiny_imagefolder):
    world_stub = tmp_path / "stubs" / "world.py"
    world_stub.write_text(STUB_WORLD_PRETRAIN)
    done = run_script("train_performance_1p.sh", "--device=cpu", "--device_id=3", f"--data_path={tiny_imagefolder}",
                      tmp_path=tmp_path, **{**stubs, "DINO_PRETRAIN": str(world_stub)})
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "output" / "3" / "train_3.log").read_text()
    assert "RANK=0 WORLD_SIZE=1 RANK_ID=0 RANK_SIZE=1 ASCEND_DEVICE_ID=3" in log


# ------------------------------------------------------------------------------------------------
# 4. Launch and files.

def test_output_files_follow_ascend_device_id(tmp_path):
    settings, commands = dry_run("train_full_1p.sh", "--device=cpu", tmp_path=tmp_path, ASCEND_DEVICE_ID="3")
    out = tmp_path / "output" / "3"
    case = "DINO_ID3436_for_PyTorch_bs64_1p_acc"
    assert settings["TRAIN_LOG"] == str(out / "train_3.log")
    assert settings["EVAL_LOG"] == str(out / "test_3.log")  # DINO's port: test_<ID>.log
    assert settings["LOSS_FILE"] == str(out / f"train_{case}_loss.txt")
    assert settings["CASE_FILE"] == str(out / f"{case}.log")
    assert commands["PRETRAIN"][1:4] == ["-m", "ssl_runtime.launch", "--nproc_per_node=1"]
    settings, _ = dry_run("train_full_8p.sh", "--device=cpu", "--model=moby", tmp_path=tmp_path)
    assert settings["EVAL_LOG"] == str(tmp_path / "output" / "0" / "eval_0.log")  # MoBY's: eval_<ID>.log


def read_case(path: Path) -> dict:
    return dict(line.split(" = ", 1) for line in path.read_text().splitlines())


def test_full_run_writes_the_loss_file_and_every_case_key(tmp_path, stubs, tiny_imagefolder):
    done = run_script("train_full_1p.sh", "--device=cpu", f"--data_path={tiny_imagefolder}",
                      tmp_path=tmp_path, **stubs)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "output" / "0"
    case = "DINO_ID3436_for_PyTorch_bs64_1p_acc"
    # DINO: the running average of each step line, as the port's awk takes it
    assert (out / f"train_{case}_loss.txt").read_text() == "8.500000\n8.375000\n"
    values = read_case(out / f"{case}.log")
    assert list(values) == ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS",
                            "TrainingTime", "TrainAccuracy", "ActualLoss", "E2ETrainingTime",
                            "RandomInitAccuracy"]  # ours, CPU runs only, after the port's keys
    assert values["ActualLoss"] == "8.375000" and values["TrainAccuracy"] == "55.5"
    assert "10-NN" in (out / "test_0.log").read_text()


def test_moby_1p_performance_case_has_compile_time(tmp_path, stubs, tiny_imagefolder):
    done = run_script("train_performance_1p.sh", "--model=moby", "--device=cpu",
                      f"--data_path={tiny_imagefolder}", tmp_path=tmp_path, **stubs)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "output" / "0"
    case = "Transformer-SSL_ID3434_for_PyTorch_bs64_1p_perf"
    values = read_case(out / f"{case}.log")
    assert values["CompileTime"] == "0.5" and values["ActualLoss"] == "16.2500"
    assert (out / f"train_{case}_loss.txt").read_text() == "16.2500\n"


def test_eval_8p_evaluates_the_last_full_run(tmp_path, stubs, tiny_imagefolder):
    flags = ("--model=moby", "--device=cpu", "--nproc=1", f"--data_path={tiny_imagefolder}")
    done = run_script("eval_8p.sh", *flags, tmp_path=tmp_path, **stubs)
    assert done.returncode == 2 and "run train_full_1p.sh first or pass --checkpoint" in done.stderr
    assert run_script("train_full_8p.sh", *flags, tmp_path=tmp_path, **stubs).returncode == 0
    done = run_script("eval_8p.sh", *flags, tmp_path=tmp_path, **stubs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "Final Train Accuracy : 61.25"
    checkpoint = (tmp_path / "output" / "0" / "Transformer-SSL_ID3434_for_PyTorch_bs64_1p_acc" /
                  "moby__stub" / "pretrain" / "checkpoint.pth")
    assert f"evaluation of {checkpoint}" in done.stdout


# A pretraining stand-in that shows the process group torchrun formed.
STUB_WORLD_PRETRAIN = """\
import argparse, os
p = argparse.ArgumentParser(); p.add_argument("--output_dir")
args, _ = p.parse_known_args()
os.makedirs(args.output_dir, exist_ok=True)
open(os.path.join(args.output_dir, "checkpoint.pth"), "wb").write(b"stub")
print(f"RANK={os.environ['RANK']} WORLD_SIZE={os.environ['WORLD_SIZE']} RANK_ID={os.environ['RANK_ID']} "
      f"RANK_SIZE={os.environ['RANK_SIZE']} ASCEND_DEVICE_ID={os.environ['ASCEND_DEVICE_ID']}")
print("Epoch: [0/1]  [0/2]  eta: 0:00:01  loss: 8.500000 (8.500000)  lr: 0.000001 (0.000001)")
print("Throughput: 321.50 images/s (0.1991 s/step over 10 steps after 5 warm-up, global batch 128)")
"""


def start_node(tmp_path: Path, node: int, port: int, stubs: dict, *flags: str) -> subprocess.Popen:
    from test_launch_scripts import script_env

    env = script_env(tmp_path / f"node{node}", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port), **stubs)
    return subprocess.Popen(["bash", str(REPO / "test" / "train_full_16p.sh"), "--device=cpu", "--nproc=1",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_16p_script_joins_two_nodes(tmp_path, stubs, tiny_imagefolder):
    """2 simulated nodes of 1 process each: torchrun's rendezvous forms one world of 2."""
    world_stub = tmp_path / "stubs" / "world.py"
    world_stub.write_text(STUB_WORLD_PRETRAIN)
    stubs = {**stubs, "DINO_PRETRAIN": str(world_stub)}
    port = free_port()
    nodes = [start_node(tmp_path, node, port, stubs, f"--data_path={tiny_imagefolder}") for node in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, out + err
    logs = [(tmp_path / f"node{n}" / "output" / "0" / "train_0.log").read_text() for n in (0, 1)]
    assert "RANK=0 WORLD_SIZE=2 RANK_ID=0" in logs[0] and "RANK=1 WORLD_SIZE=2 RANK_ID=1" in logs[1]
    assert "RANK_SIZE=2" in logs[0] and "RANK_SIZE=2" in logs[1]
    assert "Final Train Accuracy : 55.5" in outs[0][0]  # node 0 evaluates and reports
    assert "node 1: pretraining finished" in outs[1][0] and "Final result" not in outs[1][0]
    case = read_case(tmp_path / "node0" / "output" / "0" / "DINO_ID3436_for_PyTorch_bs64_2p_acc.log")
    assert case["RankSize"] == "2"


def test_16p_script_needs_the_master_address(tmp_path):
    done = run_script("train_full_16p.sh", "--device=cpu", "--dry_run", tmp_path=tmp_path, MASTER_ADDR="")
    assert done.returncode == 2 and "set MASTER_ADDR" in done.stderr
    settings, commands = dry_run("train_full_16p.sh", "--device=npu", "--model=moby", tmp_path=tmp_path,
                                 MASTER_ADDR="10.0.0.1", NODE_RANK="1")
    assert settings["WORLD"] == "16" and settings["CASE_NAME"].endswith("_bs64_16p_acc")
    assert commands["PRETRAIN"][3:8] == ["--nproc_per_node=8", "--nnodes=2", "--node_rank=1",
                                         "--master_addr=10.0.0.1", "--master_port=29680"]
    assert "--nnodes=2" not in commands["EVAL"]  # evaluation: node 0's 8 devices


@pytest.mark.slow
def test_16p_script_trains_real_dino_on_two_simulated_nodes(tmp_path, tiny_imagefolder):
    port = free_port()
    flags = (f"--data_path={tiny_imagefolder}", "--steps=2", "--batch_size=8")
    nodes = [start_node(tmp_path, node, port, {"OMP_NUM_THREADS": "1"}, *flags) for node in (0, 1)]
    outs = [node.communicate(timeout=900) for node in nodes]
    for n, (node, (out, err)) in enumerate(zip(nodes, outs)):
        log = tmp_path / f"node{n}" / "output" / "0" / "train_0.log"
        assert node.returncode == 0, out + err + (log.read_text()[-3000:] if log.exists() else "")
    train_log = (tmp_path / "node0" / "output" / "0" / "train_0.log").read_text()
    assert "global batch 16)" in train_log  # 8 images on each of the 2 ranks
    case = read_case(tmp_path / "node0" / "output" / "0" / "DINO_ID3436_for_PyTorch_bs8_2p_acc.log")
    assert case["RankSize"] == "2" and 0 <= float(case["TrainAccuracy"]) <= 100


# ------------------------------------------------------------------------------------------------
# 5. Performance runs use the ports' schedules.

def test_performance_runs_use_the_ascend_schedules(tmp_path):
    for script in ("train_performance_1p.sh", "train_performance_8p.sh"):
        _, commands = dry_run(script, "--device=cuda", tmp_path=tmp_path)
        pretrain = commands["PRETRAIN"]
        assert (flag_value(pretrain, "--epochs"), flag_value(pretrain, "--warmup_epochs")) == ("1", "0")
        assert flag_value(pretrain, "--num_steps") == "200"
    _, commands = dry_run("train_performance_1p.sh", "--device=npu", "--model=moby", tmp_path=tmp_path)
    assert flag_value(commands["PRETRAIN"], "--steps") == "150" and "--epochs" not in commands["PRETRAIN"]
    assert flag_value(commands["PRETRAIN"], "--batch-size") == "128"
    _, commands = dry_run("train_performance_8p.sh", "--device=npu", "--model=moby", tmp_path=tmp_path)
    assert flag_value(commands["PRETRAIN"], "--epochs") == "2" and "--steps" not in commands["PRETRAIN"]


# ------------------------------------------------------------------------------------------------
# 6. env_npu.sh: the ports' variables and device-log settings, not torch_npu 1.x's switches.

def test_env_npu_sets_the_ascend_variables(tmp_path):
    root = tmp_path / "Ascend"
    fake_cann(root, "ok", "nnae")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "msnpureport.calls"
    (bin_dir / "msnpureport").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    (bin_dir / "msnpureport").chmod(0o755)
    code = ("unset PTCOPY_ENABLE BMMV2_ENABLE TASK_QUEUE_ENABLE; source test/env_npu.sh; "
            "echo SET_ENV=$SSL_ASCEND_SET_ENV; env | grep -E '^(ASCEND_|TASK_QUEUE|COMBINED|HCCL_WH|PTCOPY|BMMV2)'")
    env = {**os.environ, **ascend_env(root), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    values = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert values["SET_ENV"] == str(root / "nnae" / "set_env.sh")
    assert values["ASCEND_TOOLKIT_HOME"] == str(root / "nnae" / "latest")
    for name, value in (("ASCEND_SLOG_PRINT_TO_STDOUT", "0"), ("ASCEND_GLOBAL_LOG_LEVEL", "3"),
                        ("ASCEND_GLOBAL_EVENT_ENABLE", "0"), ("TASK_QUEUE_ENABLE", "1"),
                        ("COMBINED_ENABLE", "1"), ("HCCL_WHITELIST_DISABLE", "1")):
        assert values[name] == value, name
    assert "PTCOPY_ENABLE" not in values and "BMMV2_ENABLE" not in values
    assert calls.read_text().splitlines() == [f"-g error -d {d}" for d in range(8)] + ["-e disable"]


def test_env_npu_does_nothing_without_cann(tmp_path):
    code = "source test/env_npu.sh; echo \"[$SSL_ASCEND_SET_ENV]\"; echo ${ASCEND_SLOG_PRINT_TO_STDOUT:-unset}"
    env = {**os.environ, **ascend_env(tmp_path / "none")}
    env.pop("ASCEND_SLOG_PRINT_TO_STDOUT", None)
    done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert done.stdout.splitlines() == ["[]", "unset"]


# ------------------------------------------------------------------------------------------------
# MoBY's linear evaluation on several devices: upstream's recipe, lr 1.0 at a global batch of 512.

@pytest.mark.parametrize("script, flags, world", [
    ("train_full_8p.sh", (), 8),
    ("train_full_8p.sh", ("--batch_size=256",), 8),
    ("eval_8p.sh", ("--checkpoint={checkpoint}",), 8),
    ("train_full_16p.sh", (), 16),
    ("train_full_1p.sh", (), 1),
])
def test_moby_linear_evaluation_runs_at_upstreams_lr(tmp_path, script, flags, world):
    checkpoint = tmp_path / "pretrained.pth"
    checkpoint.write_bytes(b"x")
    flags = [flag.format(checkpoint=checkpoint) for flag in flags]
    _, commands = dry_run(script, "--model=moby", "--device=npu", *flags, tmp_path=tmp_path,
                          MASTER_ADDR="10.0.0.1")
    linear = commands["EVAL"]
    launcher_procs = int(next(w for w in linear if w.startswith("--nproc_per_node=")).split("=")[1])
    assert launcher_procs == min(world, 8)
    base_lr = 1.0  # moby/main_linear.py's --lr default, scaled by batch x processes / 512
    assert "--lr" not in linear
    assert base_lr * int(flag_value(linear, "--batch-size")) * launcher_procs / 512 == 1.0


# ------------------------------------------------------------------------------------------------
# Older stacks: torch < 2.1 stops with one clear line; the 1.8 / 1.11 files install nothing.

def fake_torch_metadata(folder: Path, version: str) -> None:
    info = folder / f"torch-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")


@pytest.mark.parametrize("command", [["-c", "import ssl_runtime"], ["dino/main_dino.py", "--help"],
                                     ["moby/main_moby.py", "--help"]])
def test_torch_older_than_2_1_stops_every_program(tmp_path, command):
    fake_torch_metadata(tmp_path, "1.11.0")
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert done.returncode == 2
    assert done.stderr.startswith("error: torch 1.11.0 is installed, but this code needs torch >= 2.1")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("version, ok", [("2.1.0+cpu", True), ("2.1.0a0+git123", True), ("2.14.1", True),
                                         ("2.0.1", False), ("1.8.1", False), (None, True)])
def test_torch_version_rule(version, ok):
    assert (torch_stack.torch_problem(version) is None) is ok


@pytest.mark.parametrize("name", ["1.8_requirements.txt", "1.11_requirements.txt"])
def test_old_requirement_files_install_nothing_and_point_to_the_supported_ones(name):
    text = (REPO / name).read_text()
    assert requirement_pins(REPO / name) == {}
    assert "torch >= 2.1" in text
    for path in ("requirements.txt", "test/requirements_npu_2.1.txt", "test/requirements_npu_2.14.txt"):
        assert path in text and (REPO / path).is_file()


# ------------------------------------------------------------------------------------------------
# 7. Huawei's collectors read our logs. The extraction commands below are the ones of Huawei's
# test/train_full_8p.sh, train_performance_{1p,8p}.sh (DINO_ID3436, Transformer-SSL_ID3434), run
# as they are on the train / eval logs of our programs ($LOG is the log).

HUAWEI = {
    # DINO: the mean step time of the last lines (full_8p: field 16; performance runs: after "time:")
    "dino_time_full_8p": """tail -n 50 $LOG|grep -a 'eta'|head -n 30|awk -F " " '{print $16}'|awk '{sum+=$1} END {print sum/NR}'""",
    "dino_time_perf": """tail -n 10 $LOG|grep -a 'eta'|head -n 30|awk -F "time:" '{print $2}'|awk -F " " '{print $1}'|awk '{sum+=$1} END {print sum/NR}'""",
    "dino_losses": """grep 'eta' $LOG|awk -F "loss:" '{print $2}' |awk -F " " '{print $2}'""",
    "dino_accuracy": """train_accuracy=`grep -a '10-NN classifier result: Top1:' $LOG|awk -F " " '{print $5}'|head -1`; echo ${train_accuracy%,}""",
    # MoBY: the last step line's time (1p: the value, field 13; 8p: the average, field 14)
    "moby_time_1p": """grep -a 'time'  $LOG|grep loss|awk -F " " 'END {print $13}'""",
    "moby_time_8p": """grep -a 'time'  $LOG|grep loss|awk -F " " 'END {print $14}'|sed 's/(//g'|sed 's/)//g'""",
    "moby_losses": """grep 'INFO Train' $LOG|awk -F "loss " '{print $NF}' | awk -F " " '{print $1}'""",
    # (performance_8p, whose run ends normally: the last line, upstream's "Training time", dropped)
    "moby_losses_perf_8p": """grep 'INFO Train' $LOG|awk -F "loss " '{print $NF}' | awk -F " " '{print $1}'|awk -F " " '{print $1}'|awk 'NR>1{print line}{line=$0}'""",
    "moby_accuracy": """grep -a 'Max accuracy' $LOG|awk -F " " 'END {print $8}'|sed 's/%//g'""",
}


def huawei(name: str, log: Path) -> list[str]:
    done = subprocess.run(["bash", "-c", HUAWEI[name]], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LOG": str(log)})
    assert done.returncode == 0 and "error" not in done.stderr, done.stderr
    return done.stdout.splitlines()


def step_times(lines: list[str]) -> list[float]:
    """The `time:` value of DINO's step lines, read by name."""
    return [float(line.split("time: ")[1].split()[0]) for line in lines if "eta: " in line]


def test_huaweis_collectors_read_dinos_lines(tmp_path, tiny_imagefolder):
    from conftest import run_entry_quietly
    from dino import main_dino
    from ssl_runtime import knn

    text = run_entry_quietly(main_dino.main, [
        "--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--local_crop_size", "16",
        "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4", "--epochs", "2",
        "--device", "cpu", "--use_fp16", "false", "--warmup_epochs", "0", "--data_path", str(tiny_imagefolder),
        "--output_dir", str(tmp_path / "run"), "--num_workers", "0"])  # 6 steps an epoch: lines 0, 5
    log = tmp_path / "train_0.log"
    log.write_text(text)
    lines = text.splitlines()
    step_lines = [line for line in lines if "eta: " in line]
    assert len(step_lines) == 4 and "teacher_entropy" in step_lines[0]  # our signals are there too
    full = step_times([line for line in lines[-50:] if "eta" in line][:30])
    assert float(huawei("dino_time_full_8p", log)[0]) == pytest.approx(sum(full) / len(full), rel=1e-5)
    perf = step_times([line for line in lines[-10:] if "eta" in line][:30])
    assert perf and float(huawei("dino_time_perf", log)[0]) == pytest.approx(sum(perf) / len(perf), rel=1e-5)
    losses = huawei("dino_losses", log)  # `(running average)`, the port strips the brackets
    assert [loss[1:-1] for loss in losses] == report.loss_history(lines)
    (tmp_path / "test_0.log").write_text(knn.result_line(10, 55.5, 90.0) + "\n")
    assert huawei("dino_accuracy", tmp_path / "test_0.log") == ["55.5"]


@pytest.mark.parametrize("flow, flags", [("full_8p", ("--epochs", "2", "--max_epochs", "1")),
                                         ("performance_1p", ("--epochs", "1", "--steps", "2")),
                                         ("performance_8p", ("--epochs", "1"))])
def test_huaweis_collectors_read_mobys_lines(tmp_path, tiny_imagefolder, flow, flags):
    """Each of Huawei's MoBY flows: --max_epochs (full runs), --steps (1-device performance) and
    whole epochs (8-device performance, whose collector drops the closing line)."""
    from conftest import run_entry_quietly
    from moby import main_moby
    from tests.test_moby_train import pretrain_args

    text = run_entry_quietly(main_moby.main, pretrain_args(tiny_imagefolder, tmp_path, *flags))
    log = tmp_path / "train_0.log"
    log.write_text(text)
    last = [line for line in text.splitlines() if "INFO Train:" in line][-1]
    value, average = last.split("\ttime ")[1].split("\t")[0].split()  # `time 0.1234 (0.2345)`
    assert huawei("moby_time_1p", log) == [value]
    assert huawei("moby_time_8p", log) == [average.strip("()")]
    losses = huawei("moby_losses_perf_8p" if flow == "performance_8p" else "moby_losses", log)
    assert losses == report.loss_history(text.splitlines()) and len(losses) >= 2


def test_huaweis_collector_reads_mobys_linear_accuracy(tmp_path):
    from ssl_runtime.logs import setup_logger

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):  # the console line of main_linear.py's result
        setup_logger("moby__swin_tiny__x", rank=0).info(f"Max accuracy: {68.35:.2f}%")
    (tmp_path / "eval_0.log").write_text(buffer.getvalue())
    assert huawei("moby_accuracy", tmp_path / "eval_0.log") == ["68.35"]
