"""Optimizer, per-step learning-rate schedule and learning-rate scaling (upstream optimizer.py,
lr_scheduler.py and the scaling in moby_main.py)."""

from __future__ import annotations

import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.scheduler.step_lr import StepLRScheduler
from yacs.config import CfgNode

from ssl_runtime.errors import UserError
from ssl_runtime.optim import build_optimizer as runtime_optimizer
from ssl_runtime.optim import param_groups_weight_decay

REFERENCE_BATCH = 512.0  # learning rates in the configs are for 512 images per step
# Huawei's MoBY port turns "adamw" into apex's NpuFusedAdamW; here "adamw" is torch's AdamW on every
# device and torch_npu's fused one is asked for by name, spelled as Huawei's DINO port spells it.
MOBY_OPTIMIZERS = ("adamw", "sgd", "npufusedadamw")


def scale_learning_rates(config: CfgNode, world_size: int) -> None:
    """BASE_LR, WARMUP_LR and MIN_LR x (batch per process x processes / 512), and x accumulation
    steps when gradients are accumulated, as upstream (the config is updated in place)."""
    factor = config.DATA.BATCH_SIZE * world_size / REFERENCE_BATCH
    if config.TRAIN.ACCUMULATION_STEPS > 1:
        factor *= config.TRAIN.ACCUMULATION_STEPS
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()


def build_optimizer(config: CfgNode, model: torch.nn.Module, device_type: str) -> torch.optim.Optimizer:
    """AdamW (or SGD with Nesterov) without weight decay on biases and 1-D parameters.

    Upstream also skips the names a model lists in no_weight_decay(); the MoBY wrapper lists none,
    so Swin's relative-position tables ARE decayed during pre-training. We keep that.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    skip_keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else ()
    groups = param_groups_weight_decay(model, config.TRAIN.WEIGHT_DECAY, skip_names=skip,
                                       skip_keywords=skip_keywords)
    opt = config.TRAIN.OPTIMIZER
    name = opt.NAME.lower()
    if name not in MOBY_OPTIMIZERS:
        raise UserError(f"TRAIN.OPTIMIZER.NAME {opt.NAME!r} is not supported: use "
                        f"{', '.join(MOBY_OPTIMIZERS)}")
    return runtime_optimizer(name, groups, device_type, lr=config.TRAIN.BASE_LR,
                             weight_decay=config.TRAIN.WEIGHT_DECAY, momentum=opt.MOMENTUM,
                             nesterov=True, betas=tuple(opt.BETAS), eps=opt.EPS)


class LinearLRScheduler(Scheduler):
    """Linear warm-up, then linear decay to lr_min_rate x base lr (upstream's 'linear' scheduler)."""

    def __init__(self, optimizer: torch.optim.Optimizer, t_initial: int, lr_min_rate: float,
                 warmup_t: int = 0, warmup_lr_init: float = 0.0, t_in_epochs: bool = True):
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=t_in_epochs)
        self.t_initial, self.lr_min_rate = t_initial, lr_min_rate
        self.warmup_t, self.warmup_lr_init = warmup_t, warmup_lr_init
        if warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / warmup_t for v in self.base_values]
            self.update_groups(warmup_lr_init)
        else:
            self.warmup_steps = [1 for _ in self.base_values]

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        done = (t - self.warmup_t) / max(self.t_initial - self.warmup_t, 1)
        return [v - (v - v * self.lr_min_rate) * done for v in self.base_values]


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    epochs: int | None = None, warmup_epochs: float | None = None) -> Scheduler:
    """A timm scheduler stepped once per iteration with `step_update(global_iteration)`."""
    epochs = config.TRAIN.EPOCHS if epochs is None else epochs
    warmup_epochs = config.TRAIN.WARMUP_EPOCHS if warmup_epochs is None else warmup_epochs
    total = int(epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)
    name = config.TRAIN.LR_SCHEDULER.NAME
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=total, lr_min=config.TRAIN.MIN_LR,
                                 warmup_lr_init=config.TRAIN.WARMUP_LR, warmup_t=warmup,
                                 cycle_limit=1, t_in_epochs=False)
    if name == "linear":
        return LinearLRScheduler(optimizer, t_initial=total, lr_min_rate=0.01,
                                 warmup_lr_init=config.TRAIN.WARMUP_LR, warmup_t=warmup, t_in_epochs=False)
    if name == "step":
        decay = int(config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch)
        return StepLRScheduler(optimizer, decay_t=decay,
                               decay_rate=config.TRAIN.LR_SCHEDULER.DECAY_RATE,
                               warmup_lr_init=config.TRAIN.WARMUP_LR, warmup_t=warmup, t_in_epochs=False)
    raise UserError(f"TRAIN.LR_SCHEDULER.NAME {name!r} is not supported: use cosine, linear or step")
