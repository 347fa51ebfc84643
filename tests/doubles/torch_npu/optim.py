"""torch_npu.optim.NpuFusedAdamW with the contract of torch_npu's fused optimizers, on any device.

What the real ones do (torch_npu 2.1.0.post17 and 2.14.0, NpuFusedOptimizerBase), kept here:
  * At the first step (or the first zero_grad / GradScaler.unscale_ that finds gradients) every
    parameter whose .grad is not None, and that gradient, are moved into one flat buffer per
    parameter group and dtype; the tensors stay the same objects, now viewing the buffer. This is
    never redone.
  * The update runs on the flat buffers only: a gradient tensor assigned after packing (e.g. after
    `p.grad = None` and a new backward) is silently ignored; a parameter that had no gradient when
    packing happened never trains, and its first step with a gradient fails with KeyError: 'step'.
  * zero_grad(set_to_none=True) raises ValueError; zero_grad() zeroes the flat buffer.
  * Parameters must be float32 or float16 (TypeError otherwise); marks itself is_fused_optimizer.
  * The whole parameter group shares one step count (bias correction) in the buffers; each
    parameter's state['step'] is a Python int counted alongside.
The AdamW arithmetic is torch's (decoupled weight decay, bias-corrected moments); amsgrad is not
modelled. Relaxed on purpose: CPU tensors are accepted, so CPU tests can train through it.
"""

import torch


def _into_one_buffer(tensors):
    """Copy tensors into one new flat buffer and make each of them a view of its slice (same
    Python objects, new storage), as torch_npu's combine step does on the device."""
    flat = torch.zeros(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            flat[offset:offset + t.numel()].copy_(t.reshape(-1))
            t.set_(flat.untyped_storage(), offset, t.shape)
            offset += t.numel()
    return flat


class _Pack:
    """One group's parameters of one dtype, with their gradients and moments in flat buffers."""

    def __init__(self, params):
        self.params = params
        self.flat_param = _into_one_buffer(params)
        self.flat_grad = _into_one_buffer([p.grad for p in params])
        self.flat_exp_avg = self.flat_exp_avg_sq = None
        self.step = 0


class NpuFusedOptimizerBase(torch.optim.Optimizer):
    is_fused_optimizer = True

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._packs = None  # per param group: a list of _Pack, once packed

    def _pack_gradients(self) -> None:
        if self._packs is not None:
            return
        packs, found = [], False
        for group in self.param_groups:
            by_dtype = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype not in (torch.float32, torch.float16):
                    raise TypeError(f"Fused optimizer's parameters must be either float32 or float16, "
                                    f"but received {p.dtype}")
                by_dtype.setdefault(p.dtype, []).append(p)
            packs.append([_Pack(params) for params in by_dtype.values()])
            found = found or bool(by_dtype)
        if found:
            self._packs = packs

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = False) -> None:
        if set_to_none:
            raise ValueError("set_to_none is not supported in fused optimizers")
        self._pack_gradients()
        if self._packs is None:
            super().zero_grad(set_to_none=False)
            return
        for packs in self._packs:
            for pack in packs:
                pack.flat_grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pack_gradients()
        if self._packs is None:
            return loss
        for group, packs in zip(self.param_groups, self._packs):
            for pack in packs:
                self._init_pack_state(pack)
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["step"] += 1  # KeyError: 'step' for a parameter that was not packed
            for pack in packs:
                pack.step += 1
                self._update(group, pack)
        return loss

    def _init_pack_state(self, pack: _Pack) -> None:
        raise NotImplementedError

    def _update(self, group: dict, pack: _Pack) -> None:
        raise NotImplementedError


class NpuFusedAdamW(NpuFusedOptimizerBase):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        if amsgrad:
            raise NotImplementedError("the NpuFusedAdamW test double does not model amsgrad")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False))

    def _init_pack_state(self, pack: _Pack) -> None:
        if pack.flat_exp_avg is not None:
            return
        for p in pack.params:  # fresh state, or the one a checkpoint loaded
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["exp_avg"] = state["exp_avg"].to(p.device, p.dtype).clone()
            state["exp_avg_sq"] = state["exp_avg_sq"].to(p.device, p.dtype).clone()
        pack.flat_exp_avg = _into_one_buffer([self.state[p]["exp_avg"] for p in pack.params])
        pack.flat_exp_avg_sq = _into_one_buffer([self.state[p]["exp_avg_sq"] for p in pack.params])
        pack.step = int(self.state[pack.params[0]]["step"])

    def _update(self, group: dict, pack: _Pack) -> None:
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        grad, m, v = pack.flat_grad, pack.flat_exp_avg, pack.flat_exp_avg_sq
        pack.flat_param.mul_(1.0 - lr * decay)
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        correction1 = 1.0 - beta1 ** pack.step
        correction2 = 1.0 - beta2 ** pack.step
        denominator = (v / correction2).sqrt_().add_(eps)
        pack.flat_param.addcdiv_(m, denominator, value=-lr / correction1)
