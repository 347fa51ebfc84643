"""NPU and multi-device paths of the project, in this process, on the emulated NPU of tests/doubles
(tensors on npu:N, torch_npu's fused AdamW and GradScaler contracts): optimizer choice, DINO's
freeze on every optimizer against upstream's semantics, the loss-scaler state across devices, the
collective-tensor rule. The 2-process runs are in tests/test_npu_runs.py."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_imagefolder, run_entry_quietly
from dino import main_dino
from dino.loss import DINOLoss
from moby.engine import TrainState, train_step as moby_train_step
from moby.config import get_config
from moby.main_moby import moby_loss
from moby.model import build_moby
from moby.optimization import build_optimizer as build_moby_optimizer
from ssl_runtime import distributed, meters
from ssl_runtime.amp import MixedPrecision, load_scaler_state
from ssl_runtime.checkpoint import load_checkpoint
from ssl_runtime.compat import fused_optimizer_devices
from ssl_runtime.device import npu_available, resolve_device
from ssl_runtime.distributed import check_collective_tensor, single_process_context
from ssl_runtime.errors import UserError
from ssl_runtime.meters import SmoothedValue, ThroughputMeter
from ssl_runtime.optim import (LARS, build_optimizer, clear_gradients, held_still, in_own_groups,
                               param_groups_weight_decay)
from ssl_runtime.resilience import restore_rng_state, rng_state

ROOT = Path(__file__).resolve().parents[1]
DINO_TINY = ["--arch", "vit_pico", "--patch_size", "4", "--img_size", "32", "--local_crop_size", "16",
             "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4",
             "--warmup_epochs", "0", "--num_workers", "0", "--use_fp16", "false", "--device", "cpu"]


MOBY_TINY = ["MODEL.SWIN.EMBED_DIM", "12", "MODEL.SWIN.DEPTHS", "[1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 2]",
             "MODEL.MOBY.CONTRAST_NUM_NEGATIVE", "32", "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1",
             "TRAIN.WARMUP_EPOCHS", "1"]
MOBY_CPU_CFG = str(ROOT / "configs" / "moby_swin_cpu.yaml")


# ---------------------------------------------------------------- the doubles with the project

def test_npu_grad_scaler_double_refuses_torch_fused_optimizers(fake_torch_npu):
    """torch_npu's GradScaler hands optimizers that scale themselves `grad_scaler=`, which torch's
    fused AdamW does not accept: the reason the NPU default is the foreach AdamW."""
    if "cpu" not in fused_optimizer_devices():
        pytest.skip("this torch has no fused AdamW kernel to show it with")
    p = torch.nn.Parameter(torch.ones(3, device="npu"))
    scaler = fake_torch_npu.npu.amp.GradScaler()
    optimizer = torch.optim.AdamW([p], fused=True)
    scaler.scale(p.sum()).backward()
    with pytest.raises(TypeError, match="grad_scaler"):
        scaler.step(optimizer)


def test_torch_npu_double_installs_torch_npu(fake_torch_npu):
    assert torch.npu is fake_torch_npu.npu and torch.npu.is_available()
    assert npu_available() and resolve_device("auto") == "npu"


# ---------------------------------------------------------------- optimizer choice and steps

def test_npufusedadamw_by_name_and_a_clear_error_without_torch_npu(fake_torch_npu, monkeypatch):
    params = [torch.nn.Parameter(torch.ones(2, device="npu"))]
    assert type(build_optimizer("npufusedadamw", [{"params": params}], "npu")).__name__ == "NpuFusedAdamW"
    monkeypatch.setitem(sys.modules, "torch_npu.optim", None)  # as if torch_npu were not installed
    with pytest.raises(UserError, match="torch_npu does not import"):
        build_optimizer("npufusedadamw", [{"params": params}], "npu")


def test_default_adamw_on_npu_is_torchs_and_steps_under_the_npu_grad_scaler(fake_torch_npu):
    params = [torch.nn.Parameter(torch.ones(3, device="npu"))]
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
    p, q = (torch.nn.Parameter(torch.ones(2, device="npu")) for _ in range(2))
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


def _frozen_and_free(name: str, weights: tuple[torch.Tensor, torch.Tensor], device: str):
    """(frozen, free) parameters on `device`, and an optimizer of `name` over them as DINO builds it:
    a fused optimizer gets the frozen one in a group of its own."""
    frozen, free = (torch.nn.Parameter(w.to(device)) for w in weights)
    groups = [{"params": [frozen, free], "weight_decay": 0.05}]
    if name == "npufusedadamw":
        groups = in_own_groups(groups, [frozen])
    return frozen, free, build_optimizer(name, groups, device, lr=0.01)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars", "npufusedadamw"])
def test_held_still_parameters_do_not_move_on_any_optimizer(fake_torch_npu, name):
    torch.manual_seed(0)
    held, free, optimizer = _frozen_and_free(name, (torch.randn(3, 2), torch.randn(3, 2)), "npu")
    start_held, start_free = held.detach().clone(), free.detach().clone()
    for _ in range(3):
        clear_gradients(optimizer)
        (held.square().sum() + free.square().sum()).backward()
        with held_still(optimizer, [held]):
            optimizer.step()
    assert torch.equal(held, start_held) and not torch.equal(free, start_free)
    if name == "npufusedadamw":  # stepped in its buffer, then weights and state put back to fresh
        state = optimizer.state[held]
        assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        assert [s["step"] for s in optimizer.combined_param_states_indexed_by_group[1] if s["exp_avg"] is not None] == [0]
    else:  # upstream's grad = None: the optimizer never touched it
        assert not optimizer.state[held]
    clear_gradients(optimizer)
    held.square().sum().backward()
    optimizer.step()  # released: it trains (on the fused optimizer too, no KeyError)
    assert not torch.equal(held, start_held)


def test_held_still_on_a_fused_optimizer_needs_a_group_of_their_own(fake_torch_npu):
    held, free = (torch.nn.Parameter(torch.ones(2, device="npu")) for _ in range(2))
    optimizer = fake_torch_npu.optim.NpuFusedAdamW([held, free])
    with pytest.raises(ValueError, match="parameter groups of their own"):
        with held_still(optimizer, [held]):
            pass


def test_in_own_groups_keeps_the_settings_and_says_where_a_group_came_from():
    a, b, c = (torch.nn.Parameter(torch.ones(1)) for _ in range(3))
    groups = [{"params": [a, b], "weight_decay": 0.04}, {"params": [c], "weight_decay": 0.0}]
    split = in_own_groups(groups, [b, c])
    assert [([id(p) for p in g["params"]], g["weight_decay"], g.get("split_from")) for g in split] == [
        ([id(a)], 0.04, None), ([id(b)], 0.04, 0), ([id(c)], 0.0, 1)]
    optimizer = torch.optim.AdamW(split)
    main_dino.set_schedule_values(optimizer, 0.5, 0.3)  # the wd schedule reaches group 0's part too
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.3, 0.0]


UPSTREAM_OPTIMIZERS = {  # torch's plain implementations (LARS is the project's, upstream DINO's)
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05, foreach=False),
    "npufusedadamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05, foreach=False),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=0.05, foreach=False),
    "lars": lambda params: LARS(params, lr=0.01, weight_decay=0.05, momentum=0.9),
}


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars", "npufusedadamw"])
def test_the_first_20_updates_after_the_freeze_are_upstreams(fake_torch_npu, name):
    """5 frozen steps, then the first 20 updates of the released layer, against upstream's
    semantics: torch's plain optimizer, the layer's gradient None while frozen (it never sees it).
    The gradients vary, and grow 10x at the release (with a constant gradient Adam moves every
    weight by lr per step whatever its history, which hides a wrong history). The updates are
    ~1e-2; two float32 implementations of the same arithmetic differ by rounding of the ~1-sized
    weights (1e-7 a step), far inside 1e-6; a moment or step count carried over from the freeze
    changes them by tens of percent."""
    torch.manual_seed(0)
    weights = (torch.randn(3, 4), torch.randn(3, 4))
    gradients = [(torch.randn(3, 4) * (10.0 if k >= 5 else 1.0), torch.randn(3, 4)) for k in range(25)]

    def updates(device: str, ours: bool) -> list[torch.Tensor]:
        if ours:
            frozen, free, optimizer = _frozen_and_free(name, weights, device)
        else:
            frozen, free = (torch.nn.Parameter(w.clone()) for w in weights)
            optimizer = UPSTREAM_OPTIMIZERS[name]([{"params": [frozen, free]}])
        moves = []
        for k, (g_frozen, g_free) in enumerate(gradients):
            clear_gradients(optimizer)
            ((frozen * g_frozen.to(device)).sum() + (free * g_free.to(device)).sum()).backward()
            before = frozen.detach().cpu().clone()
            if ours:
                with held_still(optimizer, [frozen] if k < 5 else []):
                    optimizer.step()
            else:
                if k < 5:
                    frozen.grad = None  # upstream DINO's cancel_gradients_last_layer
                optimizer.step()
            if k >= 5:
                moves.append(frozen.detach().cpu() - before)
        return moves

    for ours, upstream in zip(updates("npu", True), updates("cpu", False)):
        torch.testing.assert_close(ours, upstream, rtol=0, atol=1e-6)


def _dino_args(*extra: str) -> argparse.Namespace:
    args = main_dino.get_args_parser().parse_args([*DINO_TINY, *extra])
    main_dino.validate_args(args)
    return args


@pytest.mark.parametrize("optimizer_name", ["adamw", "npufusedadamw"])
def test_dino_step_freezes_the_last_layer_in_epoch_0_and_trains_it_in_epoch_1(fake_torch_npu, optimizer_name):
    """On the emulated NPU with DINO's defaults: fp16 autocast and torch_npu's loss scaler."""
    ctx = single_process_context("npu")
    args = _dino_args("--optimizer", optimizer_name, "--epochs", "2", "--freeze_last_layer", "1",
                      "--device", "npu", "--use_fp16", "true")
    torch.manual_seed(0)
    student, teacher = main_dino.build_student_teacher(args, ctx)
    loss_fn = DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs).to(ctx.device)
    optimizer = main_dino.build_optimizer_for(student, args, ctx)
    precision = MixedPrecision.from_flag(True, "npu")
    params = (list(student.parameters()), list(teacher.parameters()))
    last = {n: p for n, p in student.named_parameters() if "last_layer" in n and p.requires_grad}
    first = student.backbone.patch_embed.proj.weight
    assert last and first.device.type == "npu"
    generator = torch.Generator().manual_seed(1)

    def step(epoch: int) -> None:
        main_dino.set_schedule_values(optimizer, 1e-3, 0.04)
        images = [torch.randn(4, 3, 32, 32, generator=generator).to(ctx.device) for _ in range(2)] + \
                 [torch.randn(4, 3, 16, 16, generator=generator).to(ctx.device) for _ in range(2)]
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
    ctx = single_process_context("npu")
    model = build_moby(config, steps_per_epoch=4).to(ctx.device)
    optimizer = build_moby_optimizer(config, model, "npu")
    precision = MixedPrecision.from_level("O1", "npu")  # fp16 autocast, torch_npu's loss scaler
    state = TrainState(optimizer, None, precision, ctx, None, ThroughputMeter(4))
    params = [p for p in model.parameters() if p.requires_grad]
    start = params[0].detach().clone()
    generator = torch.Generator().manual_seed(2)
    for _ in range(6):  # fp16 gradients of a loss scaled by 2**16 overflow at first: steps skipped
        views = [torch.randn(4, 3, 16, 16, generator=generator).to(ctx.device) for _ in range(2)]
        batch = (*views, torch.zeros(4, device=ctx.device))
        moby_train_step(model, batch, state, moby_loss, params, config.TRAIN.CLIP_GRAD)
    assert not torch.equal(params[0], start) and precision.scaler.get_scale() < 2.0 ** 16


# ---------------------------------------------------------------- loss-scaler state across devices

TORCH_SCALER_STATE = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                      "_growth_tracker": 7}  # torch's GradScaler.state_dict() (CUDA, CPU): no `dynamic`


def test_torch_scaler_state_is_what_torch_writes():
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch 2.1 has no CPU GradScaler to ask")
    assert torch.amp.GradScaler("cpu").state_dict().keys() == TORCH_SCALER_STATE.keys()


def test_a_gpu_runs_scaler_state_resumes_on_npu(fake_torch_npu):
    scaler = MixedPrecision.from_level("O1", "npu").scaler
    load_scaler_state(scaler, dict(TORCH_SCALER_STATE))
    assert scaler.state_dict() == {**TORCH_SCALER_STATE, "dynamic": True}
    scaler.scale(torch.ones((), device="npu"))
    assert scaler.get_scale() == 1024.0
    plain = torch.amp.GradScaler("cpu") if hasattr(torch.amp, "GradScaler") else None
    if plain is not None:  # and the NPU's state (with `dynamic`) on torch's scaler
        load_scaler_state(plain, scaler.state_dict())
        assert plain.get_scale() == 1024.0


@pytest.mark.slow
def test_dino_checkpoints_of_cpu_and_gpu_runs_resume_on_npu(fake_torch_npu, tmp_path):
    """A CPU run's checkpoint (no loss scaler) and a GPU run's (torch's scaler state) resume on NPU,
    where DINO's default fp16 runs torch_npu's scaler."""
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=4)
    common = [*DINO_TINY[:-4], "--data_path", str(data)]  # without DINO_TINY's precision and device
    cpu_run = [*common, "--output_dir", str(tmp_path / "cpu"), "--device", "cpu", "--use_fp16", "true"]
    run_entry_quietly(main_dino.main, [*cpu_run, "--epochs", "1"])
    assert "fp16_scaler" not in torch.load(tmp_path / "cpu" / "checkpoint.pth", weights_only=False)
    npu_run = [*common, "--device", "npu", "--use_fp16", "true", "--epochs", "2"]
    out = run_entry_quietly(main_dino.main, [*npu_run, "--output_dir", str(tmp_path / "cpu")])
    assert "resumed student, teacher, optimizer, dino_loss" in out and "at epoch 1" in out
    resumed = torch.load(tmp_path / "cpu" / "checkpoint.pth", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["fp16_scaler"]["dynamic"] is True

    gpu = tmp_path / "gpu"  # the CPU checkpoint as a GPU run writes it: with torch's scaler state
    gpu.mkdir()
    checkpoint = torch.load(tmp_path / "cpu" / "checkpoint.pth", weights_only=False)
    checkpoint.update(epoch=1, fp16_scaler=dict(TORCH_SCALER_STATE))
    torch.save(checkpoint, gpu / "checkpoint.pth")
    run_entry_quietly(main_dino.main, [*npu_run, "--output_dir", str(gpu)])
    assert torch.load(gpu / "checkpoint.pth", weights_only=False)["fp16_scaler"]["_growth_tracker"] == 7 + 2


def test_bf16_on_npu_has_no_loss_scaling_fp16_keeps_torch_npus_scaler(fake_torch_npu):
    bf16 = MixedPrecision.from_level("O1", "npu", amp_dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and not bf16.scaler.is_enabled()
    assert type(bf16.scaler).__module__ == "ssl_runtime.amp"  # no torch_npu scaler built at all
    fp16 = MixedPrecision.from_flag(True, "npu")  # DINO's default --amp_dtype
    assert fp16.dtype == torch.float16 and type(fp16.scaler).__module__.startswith("torch_npu")


def _dino_state(args, ctx, precision):
    """A tiny DINO run's objects after one step under `precision`, on the emulated NPU."""
    torch.manual_seed(0)
    student, teacher = main_dino.build_student_teacher(args, ctx)
    loss_fn = DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs).to(ctx.device)
    optimizer = build_optimizer("adamw", param_groups_weight_decay(student, 0.04), "npu")  # NPU's default
    main_dino.set_schedule_values(optimizer, 1e-3, 0.04)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 32, 32, generator=generator).to(ctx.device) for _ in range(2)] + \
             [torch.randn(4, 3, 16, 16, generator=generator).to(ctx.device) for _ in range(2)]
    main_dino.train_step(student, teacher, loss_fn, images, optimizer, precision, 1, 0.99, args,
                         (list(student.parameters()), list(teacher.parameters())))
    return student, teacher, optimizer, loss_fn


def test_dino_checkpoints_of_bf16_and_fp16_runs_resume_each_other(fake_torch_npu, tmp_path):
    """--amp_dtype bf16 saves upstream's --use_fp16 false layout (no fp16_scaler key); a bf16 run
    resumes an fp16 checkpoint (its loss scale unused) and an fp16 run a bf16 one (a fresh scale)."""
    ctx = single_process_context("npu")
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

    unchanged = None  # a bf16 checkpoint holds no loss scale: the run keeps its own
    for dtype, checkpoint_dtype, scale in (("fp16", "fp16", 1024.0), ("fp16", "bf16", unchanged),
                                           ("bf16", "fp16", 1.0)):
        args = main_dino.get_args_parser().parse_args(DINO_TINY + ["--epochs", "2", "--use_fp16", "true",
                                                                   "--amp_dtype", dtype])
        main_dino.validate_args(args)
        precision = main_dino.mixed_precision(args, "npu")
        student, teacher, optimizer, loss_fn = _dino_state(args, ctx, precision)
        own_scale = precision.scaler.get_scale()
        epoch, _ = main_dino.restart_from_checkpoint(tmp_path / checkpoint_dtype, student, teacher,
                                                     optimizer, precision, loss_fn)
        assert epoch == 1 and precision.scaler.get_scale() == (own_scale if scale is unchanged else scale)


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
