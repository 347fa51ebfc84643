"""torch_npu.optim.NpuFusedAdamW with the structure and contract of torch_npu's fused optimizers
(NpuFusedOptimizerBase in torch_npu 2.1.0.post17 and 2.14.0), on the emulated NPU.

What the real ones do, kept here (attribute names included: torch_npu's GradScaler and the
project read them):
  * At the first step (or the first zero_grad / GradScaler.unscale_ that finds gradients) every
    parameter whose .grad is not None, and that gradient, are moved into one flat buffer per dtype
    (float32, float16) across ALL parameter groups (`params_all_group_combined`,
    `grads_all_group_combined`); each group works on its slice of them. The tensors stay the same
    Python objects, now viewing the buffer. Tensors to combine must be on the NPU and contiguous;
    parameters must be float32 or float16. This is never redone.
  * The moments are combined per group and dtype at the first step
    (`combined_param_states_indexed_by_group[group][dtype]`: step, exp_avg, exp_avg_sq); the
    per-parameter state tensors become views of them. The group's step count (bias correction)
    starts from its first parameter's state['step'] and advances at every step.
  * The update runs on the flat buffers only: a gradient tensor assigned after packing is ignored; a
    parameter that had no gradient when packing happened never trains, and its first step with a
    gradient fails with KeyError: 'step'.
  * zero_grad(set_to_none=True) raises ValueError; zero_grad() zeroes the flat buffers.
The AdamW arithmetic is the real one's (decoupled weight decay, bias-corrected moments); amsgrad
is not modelled.
"""

import torch

import npu_emulator

_DTYPES = (torch.float32, torch.float16)  # the order of the real optimizer's per-dtype lists


def _storage_numel(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes() // tensor.element_size()


def combine_tensors(tensors):
    """One new flat NPU buffer holding `tensors`, as torch_npu.utils.npu_combine_tensors does; None
    for no tensors. Each tensor keeps its storage object, whose memory becomes its slice of the
    buffer (torch_npu.npu_change_data_ptr): autograd and DDP see the same parameters as before."""
    if not tensors:
        return None
    for tensor in tensors:
        if tensor.device.type != "npu":
            raise RuntimeError(f"Tensors to combine must be on NPU, got {tensor.device.type}.")
        if not tensor.is_contiguous():
            raise RuntimeError("Tensors to combine must be contiguous.")
        if tensor.dtype != tensors[0].dtype:
            raise RuntimeError("Tensors to combine must have the same dtype.")
    flat = torch.zeros(sum(_storage_numel(t) for t in tensors), dtype=tensors[0].dtype,
                       device=tensors[0].device)
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            values = tensor.clone()
            npu_emulator.load().change_data_ptr(tensor, flat, offset)
            tensor.copy_(values)
            offset += _storage_numel(tensor)
    return flat


class NpuFusedOptimizerBase(torch.optim.Optimizer):
    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self.combined_params_indexed_by_group = None
        self.combined_grads_indexed_by_group = None
        self.combined_param_states_indexed_by_group = None
        self.params_lists_indexed_by_group = []
        self.params_all_group_combined = [None] * len(_DTYPES)
        self.grads_all_group_combined = [None] * len(_DTYPES)
        self.is_params_grads_combined = False
        self.is_states_combined = False
        self.is_fused_optimizer = True

    def _maybe_init_combined_params_and_grads(self) -> None:
        if self.is_params_grads_combined:
            return
        lists = []  # per group, per dtype: the parameters that have a gradient
        for group in self.param_groups:
            by_dtype = [[] for _ in _DTYPES]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype not in _DTYPES:
                    raise TypeError(f"Fused optimizer's parameters must be either float32 or float16, "
                                    f"but received {p.dtype}")
                by_dtype[_DTYPES.index(p.dtype)].append(p)
            lists.append(by_dtype)
        self.params_lists_indexed_by_group = lists
        for d in range(len(_DTYPES)):
            params = [p for by_dtype in lists for p in by_dtype[d]]
            self.params_all_group_combined[d] = combine_tensors(params)
            self.grads_all_group_combined[d] = combine_tensors([p.grad for p in params])
        offsets = [0] * len(_DTYPES)
        self.combined_params_indexed_by_group, self.combined_grads_indexed_by_group = [], []
        for by_dtype in lists:
            params_slices, grads_slices = [], []
            for d, params in enumerate(by_dtype):
                size = sum(_storage_numel(p) for p in params)
                start, offsets[d] = offsets[d], offsets[d] + size
                params_slices.append(self.params_all_group_combined[d][start:start + size] if size else None)
                grads_slices.append(self.grads_all_group_combined[d][start:start + size] if size else None)
            self.combined_params_indexed_by_group.append(params_slices)
            self.combined_grads_indexed_by_group.append(grads_slices)
        self.is_params_grads_combined = any(flat is not None for flat in self.params_all_group_combined)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = False) -> None:
        if set_to_none:
            raise ValueError("set_to_none is not supported in fused optimizers")
        self._maybe_init_combined_params_and_grads()
        if not self.is_params_grads_combined:
            super().zero_grad(set_to_none=False)
            return
        for flat in self.grads_all_group_combined:
            if flat is not None:
                flat.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._maybe_init_combined_params_and_grads()
        if not self.is_states_combined:
            self._maybe_init_combined_states()
        for index in range(len(self.param_groups)):
            self._group_step(index)
        return loss

    def _maybe_init_combined_states(self) -> None:
        raise NotImplementedError

    def _group_step(self, group_index: int) -> None:
        raise NotImplementedError


class NpuFusedAdamW(NpuFusedOptimizerBase):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        if amsgrad:
            raise NotImplementedError("the NpuFusedAdamW test double does not model amsgrad")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False))

    def _init_param_state(self, p) -> None:
        state = self.state[p]
        if not state:  # fresh, or the state a checkpoint loaded (copied into new tensors)
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        else:
            state["exp_avg"] = torch.zeros_like(p).copy_(state["exp_avg"])
            state["exp_avg_sq"] = torch.zeros_like(p).copy_(state["exp_avg_sq"])

    def _maybe_init_combined_states(self) -> None:
        if not self.is_params_grads_combined:
            return
        self.combined_param_states_indexed_by_group = []
        for by_dtype in self.params_lists_indexed_by_group:
            group_states = []
            for params in by_dtype:
                for p in params:
                    self._init_param_state(p)
                states = [self.state[p] for p in params]
                group_states.append({
                    "step": states[0]["step"] if states else 0,
                    "exp_avg": combine_tensors([s["exp_avg"] for s in states]),
                    "exp_avg_sq": combine_tensors([s["exp_avg_sq"] for s in states]),
                    "max_exp_avg_sq": None,
                })
            self.combined_param_states_indexed_by_group.append(group_states)
        self.is_states_combined = True

    def _group_step(self, group_index: int) -> None:
        group = self.param_groups[group_index]
        for p in group["params"]:
            if p.grad is not None:
                self.state[p]["step"] += 1  # KeyError: 'step' for a parameter that was not packed
        if not self.is_states_combined:
            return
        beta1, beta2 = group["betas"]
        for param, grad, state in zip(self.combined_params_indexed_by_group[group_index],
                                      self.combined_grads_indexed_by_group[group_index],
                                      self.combined_param_states_indexed_by_group[group_index]):
            if param is None or grad is None:
                continue
            param.mul_(1 - group["lr"] * group["weight_decay"])
            state["step"] += 1
            correction1 = 1 - beta1 ** state["step"]
            correction2 = 1 - beta2 ** state["step"]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (exp_avg_sq.sqrt() / correction2 ** 0.5).add_(group["eps"])
            param.addcdiv_(exp_avg, denominator, value=-group["lr"] / correction1)
