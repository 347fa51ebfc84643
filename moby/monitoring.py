"""Watching MoBY runs: TensorBoard scalars and a JSON-lines log.txt per epoch (as DINO writes).

log.txt (rank 0, in the run's output folder) gets one line per epoch: the epoch means of the step
scalars (`train_loss`, `train_lr`, `train_wd`, and for pre-training the similarity signals
`train_pos_sim`, `train_neg_sim`, `train_sim_gap`) plus whatever the caller adds (validation
accuracy of linear evaluation as `test_acc1` / `test_acc5`), and `epoch`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from yacs.config import CfgNode

from ssl_runtime.collapse import CollapseWatch
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


# (ours) A similarity gap below this many temperatures counts as collapsed: the positive logit then
# exceeds the mean negative one by less than 0.25, the positive is at most e^0.25 = 1.3 times as
# likely as a typical negative, and the loss is within about a quarter nat of its chance value
# ln(1 + K): the contrastive task is not being solved. Healthy runs are far above it (the CPU
# recipe: 0.35 / T = 1.75 temperatures at step 40); a tiny run at chance level hovers at 0 +- 0.15.
SIM_GAP_FLOOR_IN_TEMPERATURES = 0.25

MOBY_COLLAPSE_ADVICE = ("usual remedies: a lower TRAIN.BASE_LR, a higher MODEL.MOBY.CONTRAST_MOMENTUM "
                        "(e.g. 0.996), a larger queue MODEL.MOBY.CONTRAST_NUM_NEGATIVE, another "
                        "MODEL.MOBY.CONTRAST_TEMPERATURE (0.1-0.2), TRAIN.WARMUP_EPOCHS of 1 or more "
                        "(all via --opts KEY VALUE)")


def moby_collapse_diagnosis(temperature: float):
    """The CollapseWatch diagnosis of MoBY's similarity signals (see moby.model.similarity_signals)."""
    floor = SIM_GAP_FLOOR_IN_TEMPERATURES * temperature

    def diagnose(values) -> str | None:
        gap = values["sim_gap"]
        if not gap < floor:  # a NaN is the NaN guard's business
            return None
        return (f"the positive pairs are hardly more similar than the negatives (sim_gap {gap:.4f} "
                f"= pos_sim {values['pos_sim']:.4f} - neg_sim {values['neg_sim']:.4f}, below "
                f"{floor:.4f} = {SIM_GAP_FLOOR_IN_TEMPERATURES} x the temperature "
                f"{temperature}), the loss is near its chance value: the encoder does not tell "
                f"images apart (a collapse, or nothing learnt yet); "
                f"{MOBY_COLLAPSE_ADVICE}")
    return diagnose


def collapse_watch(config: CfgNode, steps_per_epoch: int, world_size: int,
                   logger: logging.Logger) -> CollapseWatch:
    """Watched once the lr warm-up is over and the queue holds only keys of the trained encoder
    (before that, neg_sim compares with the random initial queue); 5 checks in a row."""
    queue_refill = -(-config.MODEL.MOBY.CONTRAST_NUM_NEGATIVE // (config.DATA.BATCH_SIZE * world_size))
    warmup = int(config.TRAIN.WARMUP_EPOCHS * steps_per_epoch)
    return CollapseWatch(moby_collapse_diagnosis(config.MODEL.MOBY.CONTRAST_TEMPERATURE),
                         start_step=warmup + queue_refill, patience=5, log=logger.warning)
