"""The emulated Ascend NPU of tests/doubles (npu_emulator.cpp, the torch_npu and hccl doubles):
the device fails where an accelerator fails, and the doubles keep the real contracts (torch_npu
2.1.0.post17 / 2.14.0, Ascend/pytorch's ProcessGroupHCCL). The project's own runs on it are in
tests/test_npu_runs.py."""

from __future__ import annotations

import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ssl_runtime.device import loader_kwargs


@pytest.fixture
def npu(fake_torch_npu):
    return fake_torch_npu


# ---------------------------------------------------------------- the device

def test_two_devices_with_their_own_tensors_and_autograd(npu):
    assert torch.npu.is_available() and torch.npu.device_count() == 2
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device="npu:1", requires_grad=True)
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).to("npu:1")
    loss = (a @ b).relu().sum()  # a @ b = [[3, 2], [7, 4]]
    loss.backward()  # the autograd engine runs it on npu:1's own device thread
    assert loss.device == torch.device("npu", 1) and loss.item() == 16.0
    assert a.grad.device == torch.device("npu", 1)
    assert a.grad.cpu().tolist() == [[1.0, 2.0], [1.0, 2.0]]  # ones @ b.T


@pytest.mark.parametrize("other", ["cpu", "npu:1"])
def test_tensors_of_two_devices_in_one_operator_fail(npu, other):
    x = torch.ones(3, device="npu:0")
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device, but found at "
                                           f"least two devices, npu:0 and {other}"):
        x + torch.ones(3, device=other)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        F.linear(x, torch.ones(2, 3, device=other))
    # as on CUDA and NPU: a zero-dim CPU tensor is a scalar, CPU indices are moved by the device
    assert (x * torch.tensor(2.0)).cpu().tolist() == [2.0, 2.0, 2.0]
    assert x[torch.tensor([0, 2])].device == x.device


def test_numpy_of_a_device_tensor_fails(npu):
    with pytest.raises(TypeError, match="can't convert npu:0 device type tensor to numpy"):
        torch.ones(2, device="npu").numpy()
    assert torch.ones(2, device="npu").cpu().numpy().tolist() == [1.0, 1.0]


def test_out_operators_write_into_and_grow_device_tensors(npu):
    out = torch.empty(0, device="npu:1")
    torch.arange(5.0, out=out)  # the CPU kernel grows its output: the device tensor follows
    assert out.device == torch.device("npu", 1) and out.cpu().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    total = torch.zeros(1, device="npu:1")
    torch.sum(out, dim=0, keepdim=True, out=total)
    assert total.item() == 10.0


def test_current_device_decides_where_npu_without_index_goes(npu):
    torch.npu.set_device(1)
    try:
        assert torch.zeros(1, device="npu").device == torch.device("npu", 1)
        assert torch.ones(2).npu().device == torch.device("npu", 1)
    finally:
        torch.npu.set_device(0)
    assert torch.zeros(1, device="npu").device == torch.device("npu", 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_runs_products_in_low_precision_and_reductions_in_float32(npu, dtype):
    x = torch.randn(4, 8, device="npu")
    linear, norm = torch.nn.Linear(8, 3).npu(), torch.nn.LayerNorm(3).npu()
    with torch.autocast("npu", dtype=dtype):
        y = linear(x)
        assert y.dtype == dtype and (x @ x.T).dtype == dtype
        assert torch.softmax(y, -1).dtype == torch.float32 and norm(y).dtype == torch.float32
        assert (y + 1).dtype == dtype  # operators of no list keep their inputs' type
    assert linear(x).dtype == torch.float32
    with torch.autocast("npu", dtype=dtype):
        conv = torch.nn.Conv2d(3, 2, 3).npu()(torch.randn(1, 3, 5, 5, device="npu"))
    assert conv.dtype == dtype


def test_sync_batch_norm_kernels_equal_batch_norm_over_the_whole_batch(npu):
    """SyncBatchNorm's five kernels (CPU has none), for two 'ranks' of 4 and 2 samples, against
    torch's batch_norm of all 6 and its autograd gradients. float32 throughout: the differences
    are rounding of sums of 24 terms, well inside 1e-5."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(6, 3, 2, 2), torch.rand(3) + 0.5, torch.randn(3)
    dy = torch.randn(6, 3, 2, 2)
    on = [t.to("npu") for t in (x[:4], x[4:])]
    stats = [torch.batch_norm_stats(part, 1e-5) for part in on]
    counts = torch.tensor([16.0, 8.0], device="npu")  # samples x pixels on each rank
    running_mean, running_var = torch.zeros(3, device="npu"), torch.ones(3, device="npu")
    mean, invstd = torch.batch_norm_gather_stats_with_counts(
        on[0], torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats]), running_mean,
        running_var, 0.1, 1e-5, counts)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.cpu(), x.mean((0, 2, 3)), **close)
    torch.testing.assert_close(invstd.cpu(), (x.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt(), **close)
    torch.testing.assert_close(running_mean.cpu(), 0.1 * x.mean((0, 2, 3)), **close)
    torch.testing.assert_close(running_var.cpu(), 0.9 + 0.1 * x.var((0, 2, 3), unbiased=True), **close)

    x_ref = x.clone().requires_grad_()
    w_ref, b_ref = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    expected = F.batch_norm(x_ref, None, None, w_ref, b_ref, training=True, eps=1e-5)
    expected.backward(dy)
    x_npu, w_npu, dy_npu = x.to("npu"), weight.to("npu"), dy.to("npu")
    out = torch.batch_norm_elemt(x_npu, w_npu, bias.to("npu"), mean, invstd, 1e-5)
    torch.testing.assert_close(out.cpu(), expected.detach(), **close)
    sum_dy, sum_dy_xmu, grad_w, grad_b = torch.batch_norm_backward_reduce(dy_npu, x_npu, mean, invstd, w_npu,
                                                                          True, True, True)
    grad_x = torch.batch_norm_backward_elemt(dy_npu, x_npu, mean, invstd, w_npu, sum_dy, sum_dy_xmu,
                                             torch.tensor([24], dtype=torch.int32, device="npu"))
    torch.testing.assert_close(grad_x.cpu(), x_ref.grad, **close)
    torch.testing.assert_close(grad_w.cpu(), w_ref.grad, **close)
    torch.testing.assert_close(grad_b.cpu(), b_ref.grad, **close)


def test_memory_statistics_count_the_device_allocations(npu):
    torch.npu.reset_peak_memory_stats(1)
    before = torch.npu.memory_allocated(1)
    x = torch.empty(1024, 256, device="npu:1")  # 1 MiB of float32
    assert torch.npu.memory_allocated(1) == before + 2**20
    del x
    assert torch.npu.memory_allocated(1) == before
    assert torch.npu.max_memory_allocated(1) == before + 2**20


def test_the_loader_pins_batches_for_the_device(npu):
    loader = DataLoader(TensorDataset(torch.arange(4.0)), batch_size=2, **loader_kwargs("npu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch 2.9+: "pin_memory_device is deprecated" when passed
        (batch,) = next(iter(loader))
    asked = () if hasattr(torch, "accelerator") else ("npu",)  # torch 2.1 pins for CUDA unless told
    assert batch.device.type == "cpu" and batch.is_pinned(*asked)
    assert not torch.ones(2).is_pinned(*asked)


def test_device_tensors_saved_load_on_the_host_and_on_their_device(npu, tmp_path):
    torch.save({"x": torch.arange(3.0, device="npu:1")}, tmp_path / "c.pth")
    on_host = torch.load(tmp_path / "c.pth", map_location="cpu")["x"]
    assert on_host.device.type == "cpu" and on_host.tolist() == [0.0, 1.0, 2.0]
    assert torch.load(tmp_path / "c.pth")["x"].device == torch.device("npu", 1)


# ---------------------------------------------------------------- hccl

@pytest.fixture
def hccl_group(npu):
    import hccl

    hccl.CALLS.clear()
    return hccl.HcclGroup(dist.HashStore(), 0, 1, datetime.timedelta(seconds=30))


def test_hccl_is_registered_for_npu_tensors_only(npu):
    capability = getattr(dist.Backend, "backend_capability", {})
    assert "hccl" in dist.Backend.backend_list and capability.get("hccl", ["npu"]) == ["npu"]


@pytest.mark.parametrize("tensor, message", [
    (torch.ones(4), "Tensors must be NPU and dense"),
    ("non-contiguous", "Tensors must be contiguous"),
    (torch.float64, "HCCL allreduce: Unsupported data type at::kDouble"),
    (torch.uint8, "HCCL allreduce: Unsupported data type at::kByte/at::kBool"),
    (torch.bool, "HCCL allreduce: Unsupported data type at::kByte/at::kBool"),
])
def test_hccl_refuses_what_hccl_refuses_and_records_it(hccl_group, tensor, message):
    import hccl

    if tensor == "non-contiguous":
        tensor = torch.ones(4, 2, device="npu").t()
    elif isinstance(tensor, torch.dtype):
        tensor = torch.ones(4, dtype=tensor, device="npu")
    with pytest.raises(RuntimeError, match=message):
        hccl_group.allreduce([tensor], dist.AllreduceOptions())
    assert hccl.CALLS[-1]["refused"] == message


def test_hccl_reduces_32_and_64_bit_integers_and_gathers_every_type(hccl_group):
    import hccl

    for dtype in (torch.int32, torch.int64, torch.float16, torch.bfloat16):
        value = torch.full((2,), 3, dtype=dtype, device="npu")
        hccl_group.allreduce([value], dist.AllreduceOptions()).wait()
        assert value.cpu().tolist() == [3, 3]
    for dtype in (torch.float64, torch.uint8, torch.bool):  # all_gather and broadcast take them
        value = torch.ones(2, dtype=dtype, device="npu")
        out = [torch.zeros_like(value)]
        hccl_group.allgather([out], [value]).wait()
        hccl_group.broadcast([value], dist.BroadcastOptions()).wait()
        assert out[0].cpu().tolist() == value.cpu().tolist()
    assert [(c["op"], c["dtype"], c["device"]) for c in hccl.CALLS[:2]] == [
        ("allreduce", "int32", "npu:0"), ("allreduce", "int64", "npu:0")]
    assert not any(c["refused"] for c in hccl.CALLS)


# ---------------------------------------------------------------- torch_npu's GradScaler

def _npu_param(*values, dtype=torch.float32):
    return torch.nn.Parameter(torch.tensor(values, dtype=dtype, device="npu"))


def test_npu_grad_scaler_takes_npu_tensors_only(npu):
    scaler = npu.npu.amp.GradScaler()
    with pytest.raises(ValueError, match="Device type of outputs should be npu"):
        scaler.scale(torch.ones(()))
    assert scaler.scale(torch.ones((), device="npu")).item() == 2.0 ** 16


def test_npu_grad_scaler_state_needs_dynamic(npu):
    scaler = npu.npu.amp.GradScaler(init_scale=8.0)
    state = scaler.state_dict()
    assert state == {"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                     "_growth_tracker": 0, "dynamic": True}
    torch_layout = {k: v for k, v in state.items() if k != "dynamic"}  # what torch's GradScaler writes
    with pytest.raises(KeyError, match="dynamic"):
        npu.npu.amp.GradScaler().load_state_dict(torch_layout)
    with pytest.raises(RuntimeError, match="The source state dict is empty"):
        npu.npu.amp.GradScaler().load_state_dict({})


def test_npu_grad_scaler_skips_an_overflowing_step_and_halves_the_scale(npu, capsys):
    p = _npu_param(1.0, 2.0)
    optimizer = torch.optim.SGD([p], lr=1.0)
    scaler = npu.npu.amp.GradScaler(init_scale=4.0)
    scaler.scale((p * torch.tensor(float("inf"), device="npu")).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert p.detach().cpu().tolist() == [1.0, 2.0] and scaler.get_scale() == 2.0
    assert "Gradient overflow. Skipping step" in capsys.readouterr().out


def test_npu_grad_scaler_refuses_fp16_gradients_of_unfused_optimizers(npu):
    p = _npu_param(1.0, dtype=torch.float16)
    scaler = npu.npu.amp.GradScaler()
    scaler.scale(p.float().sum()).backward()
    with pytest.raises(TypeError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(torch.optim.SGD([p], lr=1.0))


# ---------------------------------------------------------------- torch_npu's fused AdamW

def test_fused_adamw_packs_one_buffer_per_dtype_across_groups(npu):
    a, b = _npu_param(1.0, 2.0, 3.0), _npu_param(4.0)
    h = _npu_param(5.0, 6.0, dtype=torch.float16)
    fused = npu.optim.NpuFusedAdamW([{"params": [a, h]}, {"params": [b], "weight_decay": 0.0}])
    for p in (a, b, h):
        p.grad = torch.ones_like(p)
    fused.step()
    flat32, flat16 = fused.params_all_group_combined
    assert flat32.numel() == 4 and flat16.numel() == 2 and flat16.dtype == torch.float16
    assert a.data_ptr() == flat32.data_ptr() and b.data_ptr() == flat32.data_ptr() + 3 * 4
    assert [len(states) for states in fused.combined_param_states_indexed_by_group] == [2, 2]
    assert fused.combined_param_states_indexed_by_group[1][1]["exp_avg"] is None  # no fp16 in group 1


@pytest.mark.parametrize("param, message", [
    (torch.nn.Parameter(torch.ones(3)), "Tensors to combine must be on NPU, got cpu"),
    ("non-contiguous", "Tensors to combine must be contiguous"),
])
def test_fused_adamw_refuses_host_and_non_contiguous_tensors(npu, param, message):
    if param == "non-contiguous":
        param = torch.nn.Parameter(torch.ones(3, 2, device="npu").t())
    param.grad = torch.ones_like(param)
    with pytest.raises(RuntimeError, match=message):
        npu.optim.NpuFusedAdamW([param]).step()


def test_fused_adamw_computes_adamw_and_keeps_torch_npus_contract(npu):
    """Same numbers as torch's AdamW for the parameters it packed; set_to_none refused; a gradient
    replaced after packing ignored; a parameter without gradient at packing time fails later."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 3, device="npu")), torch.nn.Parameter(torch.randn(5, device="npu"))
    ref = torch.nn.Parameter(a.detach().cpu().clone())
    fused = npu.optim.NpuFusedAdamW([a, b], lr=0.1, weight_decay=0.05)
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
        torch.testing.assert_close(a.detach().cpu(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert b.grad is None  # b never had a gradient: not packed
    before = a.detach().clone()
    fused.zero_grad()
    a.grad = torch.ones_like(a)  # a new tensor after packing: the fused step never sees it
    fused.step()
    state, (beta1, beta2) = fused.state[a], fused.param_groups[0]["betas"]
    direction = (state["exp_avg"] / (1 - beta1 ** state["step"])) / (
        (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt() + 1e-8)
    torch.testing.assert_close(a.detach(), before * (1 - 0.1 * 0.05) - 0.1 * direction)
    (b * 2).sum().backward()
    with pytest.raises(KeyError, match="step"):
        fused.step()
