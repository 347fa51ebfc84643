"""torch_npu.npu.amp.GradScaler, reduced to the behaviour the project depends on.

Dynamic loss scaling as torch's GradScaler does it, plus the two ways the real NPU scaler differs:
  * for an optimizer that takes its own loss scale (`_step_supports_amp_scaling`, e.g. torch's
    fused AdamW) it calls `optimizer.step(grad_scaler=self)`, an argument torch's optimizers
    refuse with TypeError;
  * for torch_npu's fused optimizers (`is_fused_optimizer`) unscaling packs their gradient buffer
    first, so the gradients present at the first unscale are the ones the optimizer ever sees.
Tensors may live on any device (the real one wants NPU tensors).
"""

import math

import torch


class GradScaler:
    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, dynamic=True, enabled=True):
        self._enabled = enabled
        self._scale = float(init_scale)
        self._growth_factor, self._backoff_factor = growth_factor, backoff_factor
        self._growth_interval, self._dynamic = growth_interval, dynamic
        self._growth_tracker = 0
        self._unscaled: set[int] = set()
        self._found_inf = False

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return self._scale if self._enabled else 1.0

    def scale(self, outputs):
        return outputs * self._scale if self._enabled else outputs

    @torch.no_grad()
    def unscale_(self, optimizer) -> None:
        if not self._enabled:
            return
        if id(optimizer) in self._unscaled:
            raise RuntimeError("unscale_() has already been called on this optimizer since the "
                               "last update().")
        if getattr(optimizer, "is_fused_optimizer", False):
            optimizer._pack_gradients()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self._scale)
                    self._found_inf |= not bool(torch.isfinite(p.grad).all())
        self._unscaled.add(id(optimizer))

    def step(self, optimizer, *args, **kwargs):
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return optimizer.step(*args, **dict(kwargs, grad_scaler=self))
        if id(optimizer) not in self._unscaled:
            self.unscale_(optimizer)
        if self._found_inf:
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale=None) -> None:
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale = float(new_scale)
        elif self._found_inf:
            self._scale *= self._backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._dynamic and self._growth_tracker == self._growth_interval:
                self._scale *= self._growth_factor
                self._growth_tracker = 0
        self._unscaled.clear()
        self._found_inf = False
        if not math.isfinite(self._scale):
            raise RuntimeError("loss scale is not finite")

    def state_dict(self) -> dict:
        if not self._enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self._scale = float(state["scale"])
        self._growth_tracker = int(state["_growth_tracker"])
