"""torch_npu.npu.amp.GradScaler with the contract of the real one (torch_npu 2.1.0.post17, 2.14.0).

Dynamic loss scaling as torch's GradScaler does it, and where the NPU scaler differs:
  * NPU tensors only: scaling a tensor of another device raises ValueError;
  * for an optimizer that takes its own loss scale (`_step_supports_amp_scaling`, e.g. torch's
    fused AdamW) step() calls `optimizer.step(grad_scaler=self)`, an argument torch's optimizers
    refuse with TypeError;
  * for torch_npu's fused optimizers unscale_ combines their flat buffers first (the gradients
    present then are the ones the optimizer ever sees) and unscales those buffers; for others, an
    fp16 gradient is refused (TypeError), as torch's scaler does;
  * on chips without inf/nan support (the default here; torch_npu.npu.utils.is_support_inf_nan)
    every unscale_ agrees on overflow across ranks with an all_reduce of a float32 NPU tensor on
    the default process group;
  * a skipped step prints "Gradient overflow. Skipping step", a scale change prints it;
  * state_dict() adds `dynamic`, and load_state_dict() needs it (KeyError: 'dynamic' for the
    state of torch's GradScaler) and refuses an empty state (a disabled scaler's).
"""

import enum

import torch
import torch.distributed as dist

from . import utils


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


class GradScaler:
    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, dynamic=True, enabled=True):
        self._enabled = enabled
        if growth_factor <= 1.0:
            raise ValueError("The growth factor must be > 1.0.")
        if backoff_factor >= 1.0:
            raise ValueError("The backoff factor must be < 1.0.")
        self._init_scale = float(init_scale)
        self._growth_factor, self._backoff_factor = growth_factor, backoff_factor
        self._growth_interval, self._dynamic = growth_interval, dynamic
        self._init_growth_tracker = 0
        self._scale = self._growth_tracker = None  # NPU tensors, made at the first scale()
        self._stages: dict = {}
        self._found_inf: dict = {}
        self._has_overflow = False
        self._dist_overflow_count = None

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def scale(self, outputs):
        if not self._enabled:
            return outputs
        if not (isinstance(outputs, torch.Tensor) and outputs.device.type == "npu"):
            raise ValueError("Device type of outputs should be npu.")
        if self._scale is None:
            self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=outputs.device)
            self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32,
                                              device=outputs.device)
            self._dist_overflow_count = torch.zeros(1, device="npu")
        return outputs * self._scale

    def _check_scale(self, where: str) -> None:
        if self._scale is None:
            raise AssertionError(f"Attempted {where} but _scale is None.  This may indicate your script "
                                 "did not use scaler.scale(loss or outputs) earlier in the iteration.")

    @torch.no_grad()
    def unscale_(self, optimizer) -> None:
        if not self._enabled:
            return
        self._check_scale("unscale_")
        stage = self._stages.get(id(optimizer), _Stage.READY)
        if stage is _Stage.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if stage is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        inverse = self._scale.float().reciprocal()
        if getattr(optimizer, "is_fused_optimizer", False):
            if not optimizer.is_params_grads_combined:
                optimizer._maybe_init_combined_params_and_grads()
            grads = [flat for flat in optimizer.grads_all_group_combined if flat is not None]
        else:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if any(g.dtype == torch.float16 for g in grads):
                raise TypeError("Attempting to unscale FP16 gradients.")
        found = False
        for grad in grads:
            if grad.device.type != "npu":
                raise ValueError("Device type of master_tensor should be npu.")
            if self._dynamic:
                found |= not bool(torch.isfinite(grad).all())
            grad.mul_(inverse.to(grad.dtype))
        self._has_overflow |= found
        self._sync_dist_overflow_count()
        self._stages[id(optimizer)] = _Stage.UNSCALED

    def _sync_dist_overflow_count(self) -> None:
        """Every rank skips the step when one overflowed (chips without inf/nan support)."""
        if utils.is_support_inf_nan() or not self._dynamic or not dist.is_initialized():
            return
        if self._has_overflow:
            self._dist_overflow_count.add_(1)
        dist.all_reduce(self._dist_overflow_count)
        self._has_overflow |= bool(self._dist_overflow_count.item() != 0)
        self._dist_overflow_count.zero_()

    def step(self, optimizer, *args, **kwargs):
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale("step")
        stage = self._stages.get(id(optimizer), _Stage.READY)
        if stage is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            result = optimizer.step(*args, **dict(kwargs, grad_scaler=self))
            self._stages[id(optimizer)] = _Stage.STEPPED
            return result
        if stage is _Stage.READY:
            self.unscale_(optimizer)
        result = None
        if self._dynamic and self._has_overflow:
            print("Gradient overflow. Skipping step")
        else:
            result = optimizer.step(*args, **kwargs)
        self._stages[id(optimizer)] = _Stage.STEPPED
        return result

    def update(self, new_scale=None) -> None:
        if not self._enabled:
            return
        self._check_scale("update")
        if new_scale is not None:
            self._scale = torch.full((), float(new_scale), dtype=torch.float32, device=self._scale.device)
        elif self._dynamic:
            if self._has_overflow:
                self._scale.mul_(self._backoff_factor)
                self._growth_tracker.zero_()
                print(f"Loss scaler reducing loss scale to {self._scale.item()}")
            else:
                self._growth_tracker.add_(1)
                if int(self._growth_tracker.item()) == self._growth_interval:
                    grown = self._scale * self._growth_factor
                    if not torch.isinf(grown):
                        self._scale = grown
                    self._growth_tracker.zero_()
                    print(f"Loss scaler increasing loss scale to {self._scale.item()}")
        self._stages.clear()
        self._has_overflow = False

    def state_dict(self) -> dict:
        if not self._enabled:
            return {}
        tracker = self._init_growth_tracker if self._growth_tracker is None else int(self._growth_tracker.item())
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": tracker, "dynamic": self._dynamic}

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        self._init_scale = float(state_dict["scale"])
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        if self._growth_tracker is not None:
            self._growth_tracker.fill_(self._init_growth_tracker)
        self._dynamic = state_dict["dynamic"]
