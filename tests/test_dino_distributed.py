"""DINO over 2 CPU processes (gloo): the DDP gradient sync and the centre all-reduce really happen."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port

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


# The torchrun end-to-end run (2 processes, checkpoints, resume, evaluation) is in
# tests/test_accelerator_paths.py, under the process group that refuses what NCCL/HCCL refuse.
