"""NPU and multi-device paths proven on a CPU machine, through test doubles that fail the way the
real stacks fail (tests/doubles): torch_npu's fused AdamW and GradScaler contracts, and a process
group that refuses what NCCL/HCCL refuse. The slow tests run DINO and MoBY pretraining (crossing
DINO's freeze_last_layer), resume, linear and k-NN evaluation in 2 processes under that group."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, make_imagefolder
from dino import main_dino
from dino.loss import DINOLoss
from dino.models import build_dino_networks
from moby.engine import TrainState, train_step as moby_train_step
from moby.config import get_config
from moby.main_moby import moby_loss
from moby.model import build_moby
from moby.optimization import build_optimizer as build_moby_optimizer
from ssl_runtime import distributed, meters
from ssl_runtime.amp import MixedPrecision
from ssl_runtime.checkpoint import load_checkpoint
from ssl_runtime.compat import fused_optimizer_devices
from ssl_runtime.distributed import check_collective_tensor, single_process_context
from ssl_runtime.errors import UserError
from ssl_runtime.meters import SmoothedValue, ThroughputMeter
from ssl_runtime.optim import build_optimizer, clear_gradients, held_still, param_groups_weight_decay
from ssl_runtime.resilience import restore_rng_state, rng_state

ROOT = Path(__file__).resolve().parents[1]
DOUBLES = ROOT / "tests" / "doubles"
LAUNCH = str(DOUBLES / "launch.py")
DINO_TINY = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--local_crop_size", "16",
             "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4",
             "--warmup_epochs", "0", "--num_workers", "0", "--use_fp16", "false", "--device", "cpu"]


MOBY_TINY = ["MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS", "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]",
             "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "32", "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1",
             "TRAIN.WARMUP_EPOCHS", "1"]
MOBY_CPU_CFG = str(ROOT / "configs" / "moby_swin_cpu.yaml")


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """`import torch_npu` finds the double (tests/doubles/torch_npu) for the test's duration."""
    def forget():
        for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
            del sys.modules[name]
    forget()
    monkeypatch.syspath_prepend(str(DOUBLES))
    yield importlib.import_module("torch_npu")
    forget()


# ---------------------------------------------------------------- the doubles themselves

def test_fused_adamw_double_computes_adamw_and_keeps_torch_npus_contract(fake_torch_npu):
    """Same numbers as torch's AdamW for the parameters it packed; set_to_none refused; a gradient
    replaced after packing ignored; a parameter without gradient at packing time fails later."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    ref = torch.nn.Parameter(a.detach().clone())
    fused = fake_torch_npu.optim.NpuFusedAdamW([a, b], lr=0.1, weight_decay=0.05)
    plain = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.05, foreach=False)
    assert fused.is_fused_optimizer
    with pytest.raises(ValueError, match="set_to_none is not supported in fused optimizers"):
        fused.zero_grad(set_to_none=True)
    for step in range(3):
        fused.zero_grad()
        plain.zero_grad()
        (a.square() * (step + 1)).sum().backward()
        (ref.square() * (step + 1)).sum().backward()
        fused.step()
        plain.step()
        torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-7)
    assert b.grad is None  # b never had a gradient: not packed
    before = a.detach().clone()
    fused.zero_grad()
    a.grad = torch.ones_like(a)  # a new tensor after packing: the fused step never sees it
    fused.step()
    torch.testing.assert_close(a, before * (1 - 0.1 * 0.05) - 0.1 * _adam_direction(fused, a))
    (b * 2).sum().backward()
    with pytest.raises(KeyError, match="step"):
        fused.step()


def _adam_direction(optimizer, p):
    """The bias-corrected AdamW direction after a zero gradient, from the state the double kept."""
    state, (beta1, beta2) = optimizer.state[p], optimizer.param_groups[0]["betas"]
    t = state["step"]
    m_hat = state["exp_avg"] / (1 - beta1 ** t)
    v_hat = state["exp_avg_sq"] / (1 - beta2 ** t)
    return m_hat / (v_hat.sqrt() + optimizer.param_groups[0]["eps"])


def test_npu_grad_scaler_double_refuses_torch_fused_optimizers(fake_torch_npu):
    """torch_npu's GradScaler hands optimizers that scale themselves `grad_scaler=`, which torch's
    fused AdamW does not accept: the reason the NPU default is the foreach AdamW."""
    if "cpu" not in fused_optimizer_devices():
        pytest.skip("this torch has no fused CPU AdamW to show it with")
    p = torch.nn.Parameter(torch.ones(3))
    scaler = fake_torch_npu.npu.amp.GradScaler()
    optimizer = torch.optim.AdamW([p], fused=True)
    scaler.scale(p.sum()).backward()
    with pytest.raises(TypeError, match="grad_scaler"):
        scaler.step(optimizer)


def test_torch_npu_double_installs_torch_npu(fake_torch_npu):
    assert torch.npu is fake_torch_npu.npu and not torch.npu.is_available()
    assert torch.device("npu", 1).type == "npu"


# ---------------------------------------------------------------- optimizer choice and steps

def test_npufusedadamw_by_name_and_a_clear_error_without_torch_npu(fake_torch_npu, monkeypatch):
    params = [torch.nn.Parameter(torch.ones(2))]
    assert type(build_optimizer("npufusedadamw", [{"params": params}], "cpu")).__name__ == "NpuFusedAdamW"
    monkeypatch.setitem(sys.modules, "torch_npu.optim", None)  # as if torch_npu were not installed
    with pytest.raises(UserError, match="torch_npu does not import"):
        build_optimizer("npufusedadamw", [{"params": params}], "npu")


def test_default_adamw_on_npu_is_torchs_and_steps_under_the_npu_grad_scaler(fake_torch_npu):
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = build_optimizer("adamw", [{"params": params}], "npu", lr=0.1)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["foreach"]
    assert not optimizer.defaults.get("fused")
    scaler = MixedPrecision.from_level("O1", "npu").scaler
    assert type(scaler).__module__.startswith("torch_npu")
    for _ in range(2):
        clear_gradients(optimizer)
        scaler.scale(params[0].square().sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    assert torch.all(params[0] < 1)


def test_clear_gradients_keeps_fused_buffers_and_frees_the_rest(fake_torch_npu):
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    fused = fake_torch_npu.optim.NpuFusedAdamW([p])
    plain = torch.optim.AdamW([q])
    for optimizer, param in ((fused, p), (plain, q)):
        param.sum().backward()
        optimizer.step()
        grad = param.grad
        clear_gradients(optimizer)
        if optimizer is fused:
            assert param.grad is grad and torch.all(grad == 0)  # the packed buffer, zeroed
        else:
            assert param.grad is None


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars", "npufusedadamw"])
def test_held_still_parameters_do_not_move_on_any_optimizer(fake_torch_npu, name):
    torch.manual_seed(0)
    held, free = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3, 2))
    optimizer = build_optimizer(name, [{"params": [held, free], "weight_decay": 0.1}], "cpu", lr=0.1)
    start_held, start_free = held.detach().clone(), free.detach().clone()
    for _ in range(3):
        clear_gradients(optimizer)
        (held.square().sum() + free.square().sum()).backward()
        with held_still(optimizer, [held]):
            optimizer.step()
    assert torch.equal(held, start_held) and not torch.equal(free, start_free)
    if name == "npufusedadamw":  # in the buffer, weights put back: its moments saw 3 gradients 2 * held
        torch.testing.assert_close(optimizer.state[held]["exp_avg"], (1 - 0.9 ** 3) * 2 * start_held)
    else:  # upstream's grad = None: the optimizer never touched it
        assert not optimizer.state[held]
    clear_gradients(optimizer)
    held.square().sum().backward()
    optimizer.step()  # released: it trains (on the fused optimizer too, no KeyError)
    assert not torch.equal(held, start_held)


def test_after_the_freeze_the_fused_optimizer_moves_the_layer_as_upstream_adamw_does(fake_torch_npu):
    """Constant gradients: AdamW moves each coordinate by lr per step, from a fresh state
    (upstream's, which skipped the frozen layer) as from moments that followed the gradients during
    the freeze (the fused optimizer's, weights put back). Moments held at zero under the advancing
    step count would not: 0.7x here, 2.7x-5.5x after a 1251-step epoch."""
    gradient = torch.tensor([1.0, -2.0, 3.0, 0.5])
    upstream, fused = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    optimizers = {id(upstream): torch.optim.AdamW([upstream], lr=0.01, weight_decay=0.0, foreach=False),
                  id(fused): fake_torch_npu.optim.NpuFusedAdamW([fused], lr=0.01, weight_decay=0.0)}
    for steps, frozen in ((50, True), (5, False)):
        for _ in range(steps):
            for p in (upstream, fused):
                optimizer = optimizers[id(p)]
                clear_gradients(optimizer)
                (p * gradient).sum().backward()
                with held_still(optimizer, [p] if frozen else []):
                    optimizer.step()
    expected = torch.ones(4) - 5 * 0.01 * gradient.sign()
    torch.testing.assert_close(upstream.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("optimizer_name", ["adamw", "npufusedadamw"])
def test_dino_step_freezes_the_last_layer_in_epoch_0_and_trains_it_in_epoch_1(fake_torch_npu, optimizer_name):
    ctx = single_process_context("cpu")
    args = main_dino.get_args_parser().parse_args(DINO_TINY + ["--optimizer", optimizer_name,
                                                               "--epochs", "2", "--freeze_last_layer", "1"])
    main_dino.validate_args(args)
    torch.manual_seed(0)
    student, teacher = main_dino.build_student_teacher(args, ctx)
    loss_fn = DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs)
    optimizer = main_dino.build_optimizer_for(student, args, ctx)
    precision = MixedPrecision.from_flag(False, "cpu")
    params = (list(student.parameters()), list(teacher.parameters()))
    last = {n: p for n, p in student.named_parameters() if "last_layer" in n and p.requires_grad}
    first = student.backbone.patch_embed.proj.weight
    assert last
    generator = torch.Generator().manual_seed(1)

    def step(epoch: int) -> None:
        main_dino.set_schedule_values(optimizer, 1e-3, 0.04)
        images = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)] + \
                 [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
        main_dino.train_step(student, teacher, loss_fn, images, optimizer, precision, epoch, 0.99, args,
                             params)

    start = {n: p.detach().clone() for n, p in last.items()}
    start_first = first.detach().clone()
    for _ in range(2):
        step(0)
    assert all(torch.equal(p, start[n]) for n, p in last.items()), "the last layer moved while frozen"
    assert not torch.equal(first, start_first)
    for _ in range(2):
        step(1)
    assert all(not torch.equal(p, start[n]) for n, p in last.items()), "the last layer did not train"


def test_moby_step_with_the_npu_default_optimizer_and_scaler(fake_torch_npu):
    config = get_config(argparse.Namespace(cfg=MOBY_CPU_CFG, opts=MOBY_TINY + [
        "DATA.IMG_SIZE", "16", "MODEL.SWIN.WINDOW_SIZE", "4", "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "16"]))
    torch.manual_seed(0)
    model = build_moby(config, steps_per_epoch=4)
    optimizer = build_moby_optimizer(config, model, "npu")
    # the NPU scaler on CPU tensors: autocast stays off (no NPU), loss scaling is the NPU one
    precision = dataclasses.replace(MixedPrecision.from_level("O1", "npu"), dtype=torch.float32)
    state = TrainState(optimizer, None, precision, single_process_context("cpu"), None, ThroughputMeter(4))
    params = [p for p in model.parameters() if p.requires_grad]
    start = params[0].detach().clone()
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        views = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
        batch = (*views, torch.zeros(4))
        moby_train_step(model, batch, state, moby_loss, params, config.TRAIN.CLIP_GRAD)
    assert not torch.equal(params[0], start)


def test_bf16_on_npu_has_no_loss_scaling_fp16_keeps_torch_npus_scaler(fake_torch_npu):
    bf16 = MixedPrecision.from_level("O1", "npu", amp_dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and not bf16.scaler.is_enabled()
    assert type(bf16.scaler).__module__ == "ssl_runtime.amp"  # no torch_npu scaler built at all
    fp16 = MixedPrecision.from_flag(True, "npu")  # DINO's default --amp_dtype
    assert fp16.dtype == torch.float16 and type(fp16.scaler).__module__.startswith("torch_npu")


def _dino_state(args, ctx, precision):
    """A tiny DINO run's objects after one step under `precision` (on CPU tensors: the NPU double
    has no autocast, so the step computes in fp32 through the precision's scaler)."""
    torch.manual_seed(0)
    student, teacher = main_dino.build_student_teacher(args, ctx)
    loss_fn = DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs)
    optimizer = build_optimizer("adamw", param_groups_weight_decay(student, 0.04), "npu")  # NPU's default
    main_dino.set_schedule_values(optimizer, 1e-3, 0.04)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)] + \
             [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
    computing = dataclasses.replace(precision, dtype=torch.float32)
    main_dino.train_step(student, teacher, loss_fn, images, optimizer, computing, 1, 0.99, args,
                         (list(student.parameters()), list(teacher.parameters())))
    return student, teacher, optimizer, loss_fn


def test_dino_checkpoints_of_bf16_and_fp16_runs_resume_each_other(fake_torch_npu, tmp_path):
    """--amp_dtype bf16 saves upstream's --use_fp16 false layout (no fp16_scaler key); a bf16 run
    resumes an fp16 checkpoint (its loss scale unused) and an fp16 run a bf16 one (a fresh scale)."""
    ctx = single_process_context("cpu")
    layouts = {}
    for dtype in ("fp16", "bf16"):
        args = main_dino.get_args_parser().parse_args(
            DINO_TINY + ["--epochs", "2", "--use_fp16", "true", "--amp_dtype", dtype,
                         "--output_dir", str(tmp_path / dtype)])
        main_dino.validate_args(args)
        Path(args.output_dir).mkdir()
        precision = main_dino.mixed_precision(args, "npu")
        student, teacher, optimizer, loss_fn = _dino_state(args, ctx, precision)
        if precision.scaler.is_enabled():
            precision.scaler.update(new_scale=1024.0)  # a loss scale of its own, to see it come back
        main_dino.save_checkpoint(args, 1, student, teacher, optimizer, precision, loss_fn, 0, ctx)
        layouts[dtype] = set(load_checkpoint(tmp_path / dtype / "checkpoint.pth"))
    assert layouts["fp16"] - layouts["bf16"] == {"fp16_scaler"}
    assert "fp16_scaler" not in layouts["bf16"]

    for dtype, checkpoint_dtype, scale in (("fp16", "fp16", 1024.0), ("fp16", "bf16", 2.0 ** 16),
                                           ("bf16", "fp16", 1.0)):
        args = main_dino.get_args_parser().parse_args(DINO_TINY + ["--epochs", "2", "--use_fp16", "true",
                                                                   "--amp_dtype", dtype])
        main_dino.validate_args(args)
        precision = main_dino.mixed_precision(args, "npu")
        student, teacher, optimizer, loss_fn = _dino_state(args, ctx, precision)
        epoch, _ = main_dino.restart_from_checkpoint(tmp_path / checkpoint_dtype, student, teacher,
                                                     optimizer, precision, loss_fn)
        assert epoch == 1 and precision.scaler.get_scale() == scale


# ---------------------------------------------------------------- collectives and device state

def test_collective_layer_refuses_what_nccl_and_hccl_refuse():
    gpu = torch.device("cuda", 0)  # a device object needs no GPU; nothing is allocated there
    with pytest.raises(RuntimeError, match="training device is cuda:0"):
        check_collective_tensor(torch.zeros(2), gpu)
    for dtype in (torch.float64, torch.int64):
        with pytest.raises(RuntimeError, match="32-bit"):
            check_collective_tensor(torch.zeros(2, dtype=dtype), torch.device("cpu"))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.uint8):
        check_collective_tensor(torch.zeros(2, dtype=dtype), torch.device("cpu"))


class _Handed(Exception):
    pass


def test_meter_totals_reach_the_collective_on_the_training_device_in_float32(monkeypatch):
    """End of every epoch on N devices: the meters' totals must be a float32 tensor on the
    device (NCCL/HCCL refuse host tensors; HCCL float64). 'meta' stands for the accelerator."""
    handed = []

    def all_reduce(tensor, *args, **kwargs):
        handed.append(tensor)
        raise _Handed  # meta tensors hold no values to read back: stop here

    monkeypatch.setattr(distributed, "is_dist", lambda: True)
    monkeypatch.setattr(meters, "is_dist", lambda: True)
    monkeypatch.setattr(distributed, "_collective_device", torch.device("meta"), raising=False)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    meter = SmoothedValue()
    meter.update(torch.tensor(2.0))
    with pytest.raises(_Handed):
        meter.synchronize_between_processes()
    assert handed[0].device.type == "meta" and handed[0].dtype == torch.float32


def test_only_the_collective_layer_calls_torch_distributed_collectives():
    pattern = re.compile(r"\b(dist|torch\.distributed)\.(all_reduce|all_gather\w*|broadcast\w*|reduce\w*|"
                         r"gather\w*|scatter\w*|barrier|send|recv|isend|irecv|all_to_all\w*)\(")
    offenders = []
    for folder in ("dino", "moby", "ssl_runtime"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "ssl_runtime" / "distributed.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_device_rng_state_round_trips_on_npu(fake_torch_npu):
    """Checkpoints store the device generator through torch.get_device_module (torch 2.3+) or
    its torch 2.1 replacement: the first save of a torch 2.1 run used to crash here."""
    torch.npu.manual_seed(5)
    saved = rng_state("npu")
    first = torch.npu.get_rng_state().clone()
    torch.npu.manual_seed(6)
    restore_rng_state(saved, "npu")
    assert torch.equal(torch.npu.get_rng_state(), first)


# ---------------------------------------------------------------- 2 processes, checked collectives

def torchrun(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Two CPU processes running `script` with the doubles (fake torch_npu, checked collectives)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", LAUNCH, script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run.stdout


def _last_layer_state_index(args) -> int:
    """Position of head.last_layer.weight_v in the optimizer's state (the order of its groups)."""
    student, _, _ = build_dino_networks(args)
    groups = param_groups_weight_decay(student, 0.0)
    names = {id(p): n for n, p in student.named_parameters()}
    order = [names[id(p)] for group in groups for p in group["params"]]
    return order.index("head.last_layer.weight_v")


@pytest.mark.slow
def test_dino_two_processes_npu_fused_adamw_checked_collectives(tmp_path):
    """DINO pretraining through the fused optimizer double under the checking group: epoch 0 with
    the last layer frozen, epoch 1 training it, checkpoints, a resume into epoch 2; then linear
    and k-NN evaluation of the result, also in 2 processes."""
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=8)
    out = tmp_path / "out"
    train = ["dino/main_dino.py", *DINO_TINY, "--optimizer", "npufusedadamw", "--freeze_last_layer", "1",
             "--saveckp_freq", "1", "--data_path", str(data), "--output_dir", str(out)]
    stdout = ok(torchrun(*train, "--epochs", "2"))
    # 16 images / (4 per rank x 2 ranks) = 2 steps per epoch, each over a global batch of 8
    assert "Epoch: [0/2]  [0/2]" in stdout and "global batch 8" in stdout
    assert stdout.count("Throughput:") == 1  # printed by rank 0 only
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]
    first, second = (torch.load(out / f"checkpoint{e:04}.pth", weights_only=False) for e in (0, 1))
    for name in ("head.last_layer.weight_v", "backbone.blocks.0.mlp.fc1.weight"):
        # the teacher is an EMA of the student: equal exactly while the student's copy never moved
        frozen = torch.equal(first["student"][name], first["teacher"][name])
        assert frozen == name.startswith("head.last_layer"), name
    assert not torch.equal(first["student"]["head.last_layer.weight_v"],
                           second["student"]["head.last_layer.weight_v"])  # trained in epoch 1
    args = main_dino.get_args_parser().parse_args(DINO_TINY)
    main_dino.validate_args(args)
    state = first["optimizer"]["state"][_last_layer_state_index(args)]
    assert state["step"] == 2 and state["exp_avg"].abs().sum() > 0  # in the fused buffer, weights put back

    resumed = ok(torchrun(*train, "--epochs", "3"))
    assert "Found checkpoint at" in resumed and "Epoch: [2/3]" in resumed
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 3

    model = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--device", "cpu", "--data_path",
             str(data), "--pretrained_weights", str(out / "checkpoint.pth"), "--num_workers", "0"]
    linear = ok(torchrun("dino/eval_linear.py", *model, "--epochs", "1", "--n_last_blocks", "1",
                         "--num_labels", "2", "--batch_size_per_gpu", "4",
                         "--output_dir", str(tmp_path / "lin")))
    assert re.search(r"\* Acc@1 [\d.]+ loss [\d.]+", linear)
    knn = ok(torchrun("dino/eval_knn.py", *model, "--nb_knn", "1", "5"))
    assert "5-NN classifier result: Top1: " in knn


@pytest.mark.slow
def test_moby_two_processes_npu_fused_adamw_checked_collectives(tmp_path):
    """MoBY pretraining with TRAIN.OPTIMIZER.NAME npufusedadamw under the checking group (the keys
    of both ranks reach the queues), then linear evaluation in 2 processes (k-NN evaluation is
    ssl_runtime.knn, run in 2 processes by the DINO test above)."""
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=8)
    ok(torchrun("moby/main_moby.py", "--cfg", MOBY_CPU_CFG, "--data-path", str(data), "--batch-size", "4",
                "--output", str(tmp_path / "out"), "--tag", "t", "--device", "cpu", "--epochs", "1",
                "--opts", *MOBY_TINY, "TRAIN.OPTIMIZER.NAME", "npufusedadamw"))
    run_dir = next((tmp_path / "out").glob("*/t"))
    assert (run_dir / "log_rank0.txt").is_file() and (run_dir / "log_rank1.txt").is_file()
    saved = torch.load(run_dir / "checkpoint.pth", weights_only=False)
    # 24 images over 2 ranks of 4: three steps whose 8 gathered keys each moved the pointer by
    # the GLOBAL batch (without the all-gather it would be 12)
    assert int(saved["model"]["queue_ptr"]) == 24 and saved["optimizer"]["state"]

    linear = ok(torchrun("moby/main_linear.py", "--cfg", str(ROOT / "configs" / "moby_swin_cpu_linear.yaml"),
                         "--data-path", str(data), "--batch-size", "4", "--output", str(tmp_path / "lin"),
                         "--tag", "t", "--pretrained", str(run_dir / "checkpoint.pth"), "--epochs", "1",
                         "--device", "cpu", "--opts", *MOBY_TINY))
    assert " * Acc@1 " in linear
