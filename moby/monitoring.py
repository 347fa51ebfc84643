"""Watching MoBY runs: TensorBoard scalars and a JSON-lines log.txt per epoch (as DINO writes).

log.txt (rank 0, in the run's output folder) gets one line per epoch: the epoch means of the step
scalars (`train_loss`, `train_lr`, `train_wd`) plus whatever the caller adds (validation accuracy
of linear evaluation as `test_acc1` / `test_acc5`), and `epoch`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from yacs.config import CfgNode

from ssl_runtime.distributed import DistContext
from ssl_runtime.schedules import cosine_momentum
from ssl_runtime.monitor import TENSORBOARD_DIR, TrainingMonitor, append_json_line

from .engine import TrainState
from .model import MoBY

LOG_NAME = "log.txt"


def attach_monitor(config: CfgNode, state: TrainState, ctx: DistContext, logger: logging.Logger,
                   images_per_step: int) -> TrainingMonitor:
    """A monitor writing to OUTPUT/tensorboard every PRINT_FREQ steps (config TENSORBOARD)."""
    state.monitor = TrainingMonitor(Path(config.OUTPUT) / TENSORBOARD_DIR, ctx.is_main,
                                    every=config.PRINT_FREQ, images_per_step=images_per_step,
                                    enabled=config.TENSORBOARD, log=logger.info)
    return state.monitor


def momentum_source(moby: MoBY):
    """The EMA momentum of the step just taken (the model's counter has already moved on)."""
    def used_momentum() -> dict[str, float]:
        return {"momentum": cosine_momentum(moby.contrast_momentum, max(moby.step - 1, 0), moby.total_steps)}
    return used_momentum


def log_epoch(config: CfgNode, state: TrainState, epoch: int, **evaluation: float) -> dict:
    """Close the epoch: TensorBoard `epoch/*` (and `val/*` for evaluation numbers), one log.txt line."""
    record = {f"train_{k}": v for k, v in state.monitor.end_epoch(epoch).items()}
    if evaluation:
        state.monitor.scalars(epoch, "val", evaluation)
        record.update({f"test_{k}": v for k, v in evaluation.items()})
    if state.ctx.is_main:
        append_json_line(Path(config.OUTPUT) / LOG_NAME, {**record, "epoch": epoch})
    return record
