"""DINO over 2 CPU processes (gloo): the DDP gradient sync and the centre all-reduce really happen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import make_imagefolder
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--local_crop_size", "16",
        "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4", "--epochs", "1",
        "--warmup_epochs", "0", "--num_workers", "0", "--use_fp16", "false", "--device", "cpu"]



def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _worker(rank: int, world: int, port: int, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dino import main_dino
    from dino.loss import DINOLoss
    from ssl_runtime.amp import MixedPrecision
    from ssl_runtime.distributed import all_gather_object, init_distributed, shutdown, unwrap
    from ssl_runtime.meters import ThroughputMeter

    ctx = init_distributed("cpu")
    args = main_dino.get_args_parser().parse_args(TINY)
    main_dino.validate_args(args)
    args.epochs = 2  # train in epoch 1, after the last layer is unfrozen, so every parameter moves

    # centre: rank r contributes teacher outputs equal to r, so the global batch mean is 0.5
    loss_fn = DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs)
    loss_fn.update_center(torch.full((6, args.out_dim), float(rank)))
    centre_after_one_update = loss_fn.center.mean().item()
    loss_fn.center.zero_()

    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    student, teacher = main_dino.build_student_teacher(args, ctx)
    initial = _flat(unwrap(student)).clone()
    torch.manual_seed(100 + rank)  # different images per rank
    batches = [([torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)],
                torch.zeros(4)) for _ in range(3)]
    optimizer = main_dino.build_optimizer_for(student, args, ctx)
    precision = MixedPrecision.from_flag(False, "cpu")
    schedules = main_dino.build_schedules(args, len(batches), ctx.world_size)
    main_dino.train_one_epoch(student, teacher, loss_fn, batches, optimizer, precision, schedules, 1, args,
                              ctx, ThroughputMeter(8), main_dino.NonFiniteLossGuard(ctx.device), None)

    gathered = all_gather_object({
        "student": _flat(unwrap(student)), "teacher": _flat(teacher), "centre": loss_fn.center.clone(),
        "moved": not torch.equal(_flat(unwrap(student)), initial),
    })
    if rank == 0:
        a, b = gathered
        Path(result_file).write_text(json.dumps({
            "world": ctx.world_size, "centre_after_one_update": centre_after_one_update,
            "student_equal": torch.equal(a["student"], b["student"]),
            "teacher_equal": torch.equal(a["teacher"], b["teacher"]),
            "centre_equal": torch.equal(a["centre"], b["centre"]),
            "centre_nonzero": bool(a["centre"].abs().sum() > 0),
            "moved": a["moved"] and b["moved"],
        }))
    shutdown()


@pytest.mark.slow
def test_two_process_training_syncs_student_teacher_and_centre(tmp_path):
    result = tmp_path / "result.json"
    mp.spawn(_worker, args=(2, free_port(), str(result)), nprocs=2, join=True)
    outcome = json.loads(result.read_text())
    assert outcome["world"] == 2
    assert outcome["centre_after_one_update"] == pytest.approx(0.1 * 0.5)  # global, not local, mean
    assert outcome["student_equal"] and outcome["teacher_equal"] and outcome["centre_equal"]
    assert outcome["centre_nonzero"] and outcome["moved"]


@pytest.mark.slow
def test_torchrun_two_processes_end_to_end(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "dino/main_dino.py",
           *TINY, "--data_path", str(data), "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # 16 images / (4 per rank x 2 ranks) = 2 steps per epoch, each over a global batch of 8
    assert "Epoch: [0/1]  [0/2]" in run.stdout
    assert "global batch 8" in run.stdout
    assert run.stdout.count("Throughput:") == 1  # printed by rank 0 only
    assert (out / "checkpoint.pth").is_file()
    assert json.loads((out / "log.txt").read_text().splitlines()[0])["epoch"] == 0
