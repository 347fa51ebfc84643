"""The project's NPU paths end to end, in 2 processes on the emulated NPU of tests/doubles (rank 0
on npu:0, rank 1 on npu:1, hccl the rule-checking double whose records these tests read): DINO
pretraining with its defaults (fp16 with torch_npu's loss scaler, SyncBatchNorm in the BN head)
with adamw and npufusedadamw across freeze_last_layer, a SIGTERM and a resume; DINO's k-NN and
linear evaluation (train, resume, --evaluate), attention maps, nearest neighbours and export; MoBY
O1 pretraining with both optimizers, linear and k-NN evaluation and export; and
test/train_full_8p.sh --device=npu through a CANN install whose torch_npu is the double.
docs/ascend-emulator.md says what this proves and what only hardware can."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import DOUBLES, free_port, make_imagefolder, run_entry_quietly
from dino import nearest_neighbors, visualize_attention
from moby import export as moby_export

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(DOUBLES / "launch.py")
PICO = ["--arch", "vit_pico", "--patch_size", "4"]
DINO_TINY = [*PICO, "--img_size", "32", "--local_crop_size", "16", "--local_crops_number", "2", "--out_dim", "64",
             "--batch_size_per_gpu", "4", "--warmup_epochs", "0", "--num_workers", "0", "--device", "npu",
             "--use_bn_in_head", "true", "--saveckp_freq", "1"]  # fp16 and the loss scaler: the defaults
MOBY_CFG = str(ROOT / "configs" / "moby_swin_cpu.yaml")
MOBY_TINY = ["MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS", "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]",
             "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "32", "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1",
             "TRAIN.WARMUP_EPOCHS", "1"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def emulator_built():
    """Build the emulated device once, before any rank needs it."""
    sys.path.insert(0, str(DOUBLES))
    try:
        import npu_emulator

        npu_emulator.build()
    finally:
        sys.path.remove(str(DOUBLES))


def run_env(log: Path, **extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
            "HCCL_DOUBLE_LOG": str(log), **extra}


def torchrun(log: Path, script: str, *args: str, timeout: int = 600) -> str:
    """`script` in 2 processes on the emulated NPUs (torchrun, the doubles); its output, once it
    succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", LAUNCH, script, *args]
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(log), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def ranks_until_signalled(log: Path, script: str, *args: str, ready, timeout: float = 600) -> tuple[list[int], str]:
    """`script` in 2 processes started as torchrun's workers are; SIGTERM reaches rank 1 only
    (ranks must agree to stop) once ready(rank 0's output so far). Exit codes and rank 0's output."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, LAUNCH, script, *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=run_env(log, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outputs: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda p=p, o=o: o.extend(p.stdout), daemon=True)
               for p, o in zip(procs, outputs)]
    for reader in readers:
        reader.start()
    sent, deadline = False, time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if not sent and ready("".join(outputs[0])):
            procs[1].send_signal(signal.SIGTERM)
            sent = True
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for reader in readers:
        reader.join(timeout=10)
    assert sent, "the run ended before it could be interrupted:\n" + "".join(outputs[0])[-3000:]
    return [p.returncode for p in procs], "".join(outputs[0])


def collectives(log: Path) -> list[dict]:
    """The hccl double's records of every rank, after checking the rules every real run keeps:
    each rank's collectives on its own NPU, none refused, both ranks present."""
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert {c["rank"] for c in calls} == {0, 1}
    wrong = [c for c in calls if c["device"] != f"npu:{c['rank']}" or c["refused"]]
    assert not wrong, wrong[:5]
    return calls


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def last_layer_frozen_in_epoch_0(out: Path) -> None:
    """The teacher is an EMA of the student: equal exactly while the student's copy never moved."""
    first, second = load(out / "checkpoint0000.pth"), load(out / "checkpoint0001.pth")
    for name in ("head.last_layer.weight_v", "backbone.blocks.0.mlp.fc1.weight"):
        frozen = torch.equal(first["student"][name], first["teacher"][name])
        assert frozen == name.startswith("head.last_layer"), name
    assert not torch.equal(first["student"]["head.last_layer.weight_v"], second["student"]["head.last_layer.weight_v"])


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory) -> dict:
    """DINO with npufusedadamw (the Ascend scripts' choice): 2 epochs (the last layer frozen in the
    first), then a resume into epoch 3. Its folders are evaluated below."""
    tmp = tmp_path_factory.mktemp("dino")
    data = make_imagefolder(tmp / "data", classes=2, per_class=8)
    out, log = tmp / "out", tmp / "hccl.log"
    train = ["dino/main_dino.py", *DINO_TINY, "--optimizer", "npufusedadamw", "--freeze_last_layer", "1",
             "--data_path", str(data), "--output_dir", str(out)]
    first = torchrun(log, *train, "--epochs", "2")
    resumed = torchrun(log, *train, "--epochs", "3")
    return {"data": data, "out": out, "log": log, "first": first, "resumed": resumed, "tmp": tmp}


def test_dino_fused_adamw_on_two_npus_across_the_freeze_and_a_resume(dino_run):
    out, stdout = dino_run["out"], dino_run["first"]
    # 16 images / (4 per rank x 2 ranks) = 2 steps per epoch, each over a global batch of 8
    assert "Epoch: [0/2]  [0/2]" in stdout and "global batch 8" in stdout
    assert "O1: fp16 on npu, with loss scaling" in stdout
    last_layer_frozen_in_epoch_0(out)
    saved = load(out / "checkpoint0000.pth")
    groups = saved["optimizer"]["param_groups"]
    assert [g.get("split_from") for g in groups] == [None, None, 0]  # the last layer's own group
    (index,) = groups[2]["params"]
    state = saved["optimizer"]["state"][index]  # held still in its buffer: fresh after every step
    assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert saved["fp16_scaler"]["dynamic"] is True  # torch_npu's scaler wrote it
    assert "Found checkpoint at" in dino_run["resumed"] and "Epoch: [2/3]" in dino_run["resumed"]
    assert load(out / "checkpoint.pth")["epoch"] == 3
    ops = {(c["op"], c["dtype"]) for c in collectives(dino_run["log"])}
    assert ("allreduce", "float32") in ops  # DDP's gradient buckets, the meters, the scaler's overflow flag
    assert ("_allgather_base", "float32") in ops  # SyncBatchNorm's statistics
    assert ("broadcast", "float32") in ops  # DDP's start from rank 0's weights


def test_dino_adamw_on_two_npus_stops_on_sigterm_and_resumes(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=16)  # 4 steps an epoch
    out, log = tmp_path / "out", tmp_path / "hccl.log"
    train = ["dino/main_dino.py", *DINO_TINY, "--optimizer", "adamw", "--freeze_last_layer", "1",
             "--data_path", str(data), "--output_dir", str(out), "--epochs", "3"]
    codes, text = ranks_until_signalled(log, *train, ready=lambda t: "Epoch: [1/3]  [0/4]" in t)
    assert codes == [143, 143], text[-3000:]
    match = re.search(r"received signal on another rank: saved a checkpoint after step (\d)/4 of epoch (\d)", text)
    assert match, text[-3000:]
    step, epoch = int(match[1]), int(match[2])
    finished = torchrun(log, *train)
    resumed_at = f"at epoch {epoch}, step {step}" if step < 4 else f"at epoch {epoch + 1}"
    assert f"{resumed_at}\n" in finished and "Throughput:" in finished
    assert load(out / "checkpoint.pth")["epoch"] == 3
    last_layer_frozen_in_epoch_0(out)
    collectives(log)


def test_dino_knn_and_linear_evaluation_on_two_npus(dino_run):
    model = [*PICO, "--img_size", "32", "--device", "npu", "--data_path", str(dino_run["data"]),
             "--pretrained_weights", str(dino_run["out"] / "checkpoint.pth"), "--num_workers", "0"]
    log = dino_run["tmp"] / "eval.log"
    knn = torchrun(log, "dino/eval_knn.py", *model, "--nb_knn", "1", "5")
    assert re.search(r"5-NN classifier result: Top1: [\d.]+, Top5: ", knn)
    linear = [*model, "--n_last_blocks", "1", "--num_labels", "2", "--batch_size_per_gpu", "4",
              "--output_dir", str(dino_run["tmp"] / "linear")]
    assert re.search(r"\* Acc@1 [\d.]+ loss [\d.]+", torchrun(log, "dino/eval_linear.py", *linear, "--epochs", "1"))
    resumed = torchrun(log, "dino/eval_linear.py", *linear, "--epochs", "2")
    assert "Found checkpoint at" in resumed and "Epoch: [1]" in resumed
    assert re.search(r"\* Acc@1 [\d.]+ loss [\d.]+", torchrun(log, "dino/eval_linear.py", *linear, "--evaluate"))
    ops = {c["op"] for c in collectives(log)}
    assert {"allreduce", "allgather"} <= ops  # the k-NN's feature gather, the meters' totals


def test_dino_tools_on_the_emulated_npu_and_export_without_it(dino_run, fake_torch_npu, tmp_path):
    model = [*PICO, "--device", "npu", "--pretrained_weights", str(dino_run["out"] / "checkpoint.pth")]
    out = run_entry_quietly(visualize_attention.main, [*model, "--image_size", "32", "32", "--data_path",
                                                       str(dino_run["data"]), "--num_images", "2",
                                                       "--output_dir", str(tmp_path)])
    assert "attention_grid.png saved: 2 images" in out and (tmp_path / "attention_grid.png").is_file()
    out = run_entry_quietly(nearest_neighbors.main, [*model, "--img_size", "32", "--data_path", str(dino_run["data"]),
                                                     "--num_workers", "0", "--png", str(tmp_path / "nn.png"),
                                                     "--num_queries", "2", "--k", "3"])
    assert "2 queries x 3 neighbours among 16 training images" in out
    # a machine without torch_npu exports an NPU run's checkpoint
    done = subprocess.run([sys.executable, "dino/export.py", "--pretrained_weights",
                           str(dino_run["out"] / "checkpoint.pth"), "--output", str(tmp_path / "vit")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "vit.safetensors").is_file() and "timm.create_model('vit_" in done.stdout


@pytest.fixture(scope="module")
def moby_runs(tmp_path_factory) -> dict:
    """MoBY O1 pretraining in 2 processes with each optimizer: {name: (run folder, hccl log)}."""
    tmp = tmp_path_factory.mktemp("moby")
    data = make_imagefolder(tmp / "data", classes=3, per_class=16)  # 6 steps of 2 x 4 images
    runs = {"data": data}
    for optimizer in ("adamw", "npufusedadamw"):
        log, out = tmp / f"{optimizer}.log", tmp / optimizer
        torchrun(log, "moby/main_moby.py", "--cfg", MOBY_CFG, "--data-path", str(data), "--batch-size", "4",
                 "--output", str(out), "--tag", "t", "--device", "npu", "--epochs", "1", "--amp-opt-level", "O1",
                 "--opts", *MOBY_TINY, "TRAIN.OPTIMIZER.NAME", optimizer)
        runs[optimizer] = (next(out.glob("*/t")), log)
    return runs


@pytest.mark.parametrize("optimizer", ["adamw", "npufusedadamw"])
def test_moby_o1_pretraining_on_two_npus(moby_runs, optimizer):
    run_dir, log = moby_runs[optimizer]
    assert (run_dir / "log_rank0.txt").is_file() and (run_dir / "log_rank1.txt").is_file()
    log_text = (run_dir / "log_rank0.txt").read_text()
    assert "O1: fp16 on npu, with loss scaling" in log_text
    # fp16 gradients of a loss scaled by 2**16 overflow at first: the scaler skips those steps,
    # then the optimizer steps (a finite gradient norm)
    assert re.search(r"grad_norm (?!nan)[\d.]+", log_text), log_text[-2000:]
    saved = load(run_dir / "checkpoint.pth")
    # 48 images over 2 ranks of 4: six steps whose 8 gathered keys each moved the queue pointer by
    # the GLOBAL batch, modulo the queue's 32 entries
    assert int(saved["model"]["queue_ptr"]) == 48 % 32 and saved["optimizer"]["state"]
    # the keys for the queues, gathered as autocast made them
    assert ("allgather", "float16") in {(c["op"], c["dtype"]) for c in collectives(log)}


def test_moby_linear_and_knn_evaluation_on_two_npus_and_export(moby_runs, tmp_path):
    run_dir, _ = moby_runs["npufusedadamw"]
    log = tmp_path / "hccl.log"
    common = ["--data-path", str(moby_runs["data"]), "--batch-size", "4", "--device", "npu", "--pretrained",
              str(run_dir / "checkpoint.pth"), "--tag", "t"]
    linear = torchrun(log, "moby/main_linear.py", "--cfg", str(ROOT / "configs" / "moby_swin_cpu_linear.yaml"),
                      *common, "--output", str(tmp_path / "lin"), "--epochs", "1", "--opts", *MOBY_TINY)
    assert " * Acc@1 " in linear
    knn = torchrun(log, "moby/eval_knn.py", "--cfg", MOBY_CFG, *common, "--output", str(tmp_path / "knn"),
                   "--nb_knn", "1", "5", "--opts", *MOBY_TINY)
    assert "5-NN classifier result: Top1: " in knn
    collectives(log)
    out = run_entry_quietly(moby_export.main, ["--pretrained", str(run_dir / "checkpoint.pth"),
                                               "--output", str(tmp_path / "swin")])
    assert (tmp_path / "swin.safetensors").is_file() and "swin_" in out


def test_train_full_8p_script_on_two_emulated_npus(tmp_path):
    """The Ascend user's command on a machine whose CANN (set_env.sh) provides torch_npu: here the
    double. Upstream's NPU recipe (ViT-S/16, 10 local crops, npufusedadamw, --bin True), one step."""
    cann = tmp_path / "Ascend" / "ascend-toolkit"
    (cann / "latest").mkdir(parents=True)
    set_env = cann / "set_env.sh"
    set_env.write_text(f"export ASCEND_TOOLKIT_HOME={cann}/latest\n"
                       f"export PYTHONPATH={DOUBLES}${{PYTHONPATH:+:$PYTHONPATH}}\n")
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=4)
    log = tmp_path / "hccl.log"
    env = {**run_env(log), "SSL_PYTHON": sys.executable, "SSL_TEST_OUTPUT": str(tmp_path / "output"),
           "CANN_SET_ENV": str(set_env), "PYTHONPATH": "", "MASTER_PORT": str(free_port())}
    for name in ("SSL_DEVICE", "ASCEND_DEVICE_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SSL_NPU_BINARY"):
        env.pop(name, None)
    # --epochs=10: upstream's 10 warm-up epochs fit; --steps=1 stops after one step
    done = subprocess.run(["bash", "test/train_full_8p.sh", "--device=npu", "--nproc=2", f"--data_path={data}",
                           "--epochs=10", "--steps=1", "--batch_size=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Final Train Accuracy : " in done.stdout
    train_log = (tmp_path / "output" / "0" / "train_0.log").read_text()
    assert "--arch vit_small" in done.stdout and "--optimizer npufusedadamw --bin True" in done.stdout
    assert "Epoch: [0/10]  [0/" in train_log and "global batch 2" in train_log
    calls = collectives(log)
    assert any(c["op"] == "allgather" for c in calls)  # the k-NN evaluation ran on both NPUs too
