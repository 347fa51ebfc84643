"""Optimizers: the same math everywhere, the fastest kernel each device has; clearing gradients
and holding parameters still in a way every optimizer accepts (torch_npu's fused ones included)."""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterable, Iterator

import torch

from .compat import fused_optimizer_devices
from .errors import UserError

# npufusedadamw: torch_npu's NpuFusedAdamW, chosen explicitly (Huawei's DINO port's flag value)
OPTIMIZERS = ("adamw", "sgd", "lars", "npufusedadamw")


def param_groups_weight_decay(model: torch.nn.Module, weight_decay: float,
                              skip_names: Iterable[str] = (), skip_keywords: Iterable[str] = (),
                              skip_1d: bool = True) -> list[dict]:
    """Split trainable parameters into [regularised, not regularised] groups.

    Biases and 1-D parameters (norm scales) are not decayed, as in both upstreams; names in
    skip_names or containing one of skip_keywords are not decayed either. Group 0 is the
    regularised one: DINO's weight-decay schedule is applied to it alone.
    """
    skip_names, skip_keywords = set(skip_names), tuple(skip_keywords)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = (skip_1d and param.ndim <= 1) or name.endswith(".bias") or name in skip_names \
            or any(key in name for key in skip_keywords)
        (no_decay if plain else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive SGD as used by upstream DINO for ResNet-50.

    1-D parameters (biases, norm scales) get neither weight decay nor the trust ratio.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    ratio = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm,
                                        torch.ones_like(param_norm))
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def _kernel_kwargs(device_type: str) -> dict:
    """The fused single-kernel update where this torch has one (CUDA; CPU in recent releases, ~10x
    faster than the per-tensor loop upstream gets by default), foreach elsewhere.

    Not fused on NPU, although torch_npu registers torch's fused AdamW kernel there: torch's
    fused optimizers take their loss scale from the GradScaler (`_step_supports_amp_scaling`),
    and torch_npu's GradScaler (the one that knows NPU overflow handling) then calls
    `step(grad_scaler=...)`, an argument torch's optimizers do not accept (TypeError at the
    first fp16 step).
    """
    if device_type != "npu" and device_type in fused_optimizer_devices():
        return {"fused": True}
    return {"foreach": True}


def _with_fastest_kernel(optimizer_class, param_groups, device_type: str, **kwargs) -> torch.optim.Optimizer:
    """Build with the device's fused/foreach kernel; a torch release without that kernel for this
    optimizer (torch 2.1's SGD has no fused=True) gets foreach, then the plain implementation."""
    param_groups = list(param_groups)
    for kernel in (_kernel_kwargs(device_type), {"foreach": True}):
        try:
            return optimizer_class(param_groups, **kwargs, **kernel)
        except (RuntimeError, TypeError, ValueError):
            continue
    return optimizer_class(param_groups, **kwargs)


def _start_missing_momentum(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Give a zero momentum buffer to each parameter stepping for the first time in a group whose
    other parameters already have one (DINO's last layer after its freeze_last_layer epochs, skipped
    with grad None until then): torch's fused SGD accepts a group only when all or none of its
    buffers exist (TypeError in torch._fused_sgd_ otherwise). With dampening 0 the first update is
    then momentum * 0 + grad = grad, exactly the buffer torch's other SGD kernels start from."""
    for group in optimizer.param_groups:
        if not group["momentum"] or group["dampening"]:
            continue
        stepping = [p for p in group["params"] if p.grad is not None]
        started = [optimizer.state[p].get("momentum_buffer") is not None for p in stepping]
        if any(started) and not all(started):
            for p, has_buffer in zip(stepping, started):
                if not has_buffer:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)


def npu_fused_adamw_class():
    """torch_npu.optim.NpuFusedAdamW, or a UserError saying why it is not there."""
    try:
        return importlib.import_module("torch_npu.optim").NpuFusedAdamW
    except Exception as exc:  # ImportError, or CANN libraries missing at load time
        raise UserError(f"the npufusedadamw optimizer is torch_npu's NpuFusedAdamW, but torch_npu "
                        f"does not import here ({type(exc).__name__}: {exc}): install torch_npu "
                        "for your CANN release, or use adamw (torch's AdamW, on every device)") from None


def build_optimizer(name: str, param_groups, device_type: str, lr: float = 0.0,
                    weight_decay: float = 0.0, momentum: float = 0.9, nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW / SGD / LARS with the device's fastest implementation of identical math, or
    torch_npu's NpuFusedAdamW when asked for by name.

    Per-group weight_decay values (see param_groups_weight_decay) take precedence over the
    weight_decay argument.
    """
    name = name.lower()
    if name == "adamw":
        return _with_fastest_kernel(torch.optim.AdamW, param_groups, device_type, lr=lr, betas=betas,
                                    eps=eps, weight_decay=weight_decay)
    if name == "npufusedadamw":
        return npu_fused_adamw_class()(list(param_groups), lr=lr, betas=betas, eps=eps,
                                       weight_decay=weight_decay)
    if name == "sgd":
        sgd = _with_fastest_kernel(torch.optim.SGD, param_groups, device_type, lr=lr, momentum=momentum,
                                   nesterov=nesterov, weight_decay=weight_decay)
        sgd.register_step_pre_hook(_start_missing_momentum)
        return sgd
    if name == "lars":
        return LARS(param_groups, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise UserError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


# ---------------------------------------------------------------- gradients every optimizer accepts

def packs_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch_npu's fused optimizers (they say so with `is_fused_optimizer`, the mark
    torch_npu's GradScaler reads). At their first step they move the gradients present into one
    flat buffer and never look again: a gradient set to None or replaced afterwards is ignored
    (or fails with KeyError: 'step'), and zero_grad(set_to_none=True) raises ValueError."""
    return bool(getattr(optimizer, "is_fused_optimizer", False))


def clear_gradients(optimizer: torch.optim.Optimizer) -> None:
    """zero_grad(set_to_none=True) (torch's default, less memory traffic), or zeroing in place
    for the optimizers that own their gradient buffers."""
    optimizer.zero_grad(set_to_none=not packs_gradients(optimizer))


def in_own_groups(groups: list[dict], params: Iterable[torch.Tensor]) -> list[dict]:
    """`groups` with `params` moved into groups of their own (same settings, after the others,
    each marked with "split_from": the index of the group it came from; empty groups dropped).

    What held_still needs on torch_npu's fused optimizers, which keep one step count per group."""
    held = {id(p) for p in params}
    kept, split = [], []
    for index, group in enumerate(groups):
        own = [p for p in group["params"] if id(p) in held]
        rest = [p for p in group["params"] if id(p) not in held]
        if rest or not own:
            kept.append({**group, "params": rest})
        if own:
            split.append({**group, "params": own, "split_from": index})
    return kept + split


def _groups_of(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[int]:
    """Indices of the parameter groups holding `params`, which must hold nothing else."""
    held = {id(p) for p in params}
    indices = [i for i, group in enumerate(optimizer.param_groups) if any(id(p) in held for p in group["params"])]
    for i in indices:
        if any(id(p) not in held for p in optimizer.param_groups[i]["params"]):
            raise ValueError("held_still on a fused optimizer needs the held parameters in parameter groups "
                             "of their own (ssl_runtime.optim.in_own_groups): it restarts a whole group's "
                             "moments and step count")
    return indices


def _restart_fused_state(optimizer: torch.optim.Optimizer, indices: list[int]) -> None:
    """Moments and step count of these groups back to a fresh start. torch_npu's fused optimizers
    keep them per group and dtype in combined buffers after their first step
    (combined_param_states_indexed_by_group), with each parameter's state['step'] alongside."""
    combined = getattr(optimizer, "combined_param_states_indexed_by_group", None) or []
    for index in indices:
        states = [optimizer.state[p] for p in optimizer.param_groups[index]["params"] if p in optimizer.state]
        if index < len(combined) and combined[index]:
            states += [state for state in combined[index] if state]
        for state in states:
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    value.zero_()
            if "step" in state:
                state["step"] = 0


@contextlib.contextmanager
def held_still(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Optimizer steps taken inside leave `params` exactly where they are (DINO's frozen last layer),
    and the optimizer's state for them as if it had never seen them.

    torch optimizers skip a parameter whose gradient is None (upstream's way: no update, no
    weight decay, no moment or step-count change). torch_npu's fused optimizers cannot skip one,
    so, as Huawei's port does, the weights are put back after the step (undoing the update and the
    weight decay); then their moments and their group's step count are cleared (the parameters
    must have groups of their own: in_own_groups). The first update after the freeze then starts
    from fresh moments at step 1, as upstream's does. (Putting the weights back alone left the
    moments following the frozen epochs' gradients under a step count that kept advancing: the
    first post-freeze updates were a fraction of upstream's, or several times them when the
    gradients grew after the release.)
    """
    params = list(params)
    if not params or not packs_gradients(optimizer):
        for p in params:
            p.grad = None
        yield
        return
    groups = _groups_of(optimizer, params)
    with torch.no_grad():
        for p in params:
            if p.grad is None:  # must exist at the first step to join the flat buffer
                p.grad = torch.zeros_like(p)
        kept = [p.detach().clone() for p in params]
    yield
    with torch.no_grad():
        for p, weights in zip(params, kept):
            p.copy_(weights)
        _restart_fused_state(optimizer, groups)
