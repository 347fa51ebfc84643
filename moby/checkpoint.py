"""Checkpoints in upstream Transformer-SSL's layout, written atomically.

A checkpoint is a dict: model (state dict), optimizer, lr_scheduler, max_accuracy, epoch (the
last finished epoch), config (the merged yacs config) and amp (the loss-scaler state; upstream's
key, from apex). `scaler` is accepted as another name for `amp` when reading.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from yacs.config import CfgNode

from ssl_runtime.checkpoint import load_checkpoint as read_checkpoint
from ssl_runtime.checkpoint import load_state_dict_checked, save_atomic
from ssl_runtime.errors import UserError
from ssl_runtime.resilience import rng_state

from .backbones import convert_official_swin, is_official_swin_layout

LATEST = "checkpoint.pth"
ENCODER_PREFIXES = ("encoder.", "encoder_k.")


def save_checkpoint(config: CfgNode, epoch: int, model: torch.nn.Module, max_accuracy: float,
                    optimizer: torch.optim.Optimizer, lr_scheduler, scaler, logger: logging.Logger,
                    epoch_step: int = 0, device_type: str = "cpu") -> Path:
    """ckpt_epoch_{epoch}.pth and checkpoint.pth in the output folder (the checkpoint.pth it
    replaces is kept as checkpoint.previous.pth).

    epoch_step > 0 saves inside `epoch` after that many of its iterations: checkpoint.pth only,
    with `epoch` = the last finished epoch as always, so a resume starts at epoch + 1, batch
    epoch_step.
    """
    if epoch_step:
        epoch -= 1
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "max_accuracy": max_accuracy,
        "epoch": epoch,
        "config": config,
        "amp": scaler.state_dict(),
        "epoch_step": epoch_step,  # (ours) iterations of the next epoch already done
        "rng": rng_state(device_type),  # (ours) so that a resumed run draws what it would have
    }
    latest = Path(config.OUTPUT) / LATEST
    path = Path(config.OUTPUT) / f"ckpt_epoch_{epoch}.pth" if not epoch_step else latest
    logger.info(f"{path} saving......")
    if not epoch_step:
        save_atomic(state, path)
    save_atomic(state, latest, keep_previous=True)
    logger.info(f"{path} saved !!!")
    return path


def auto_resume_candidates(output_dir: str | Path) -> list[Path]:
    """checkpoint.pth, then every other *.pth in the folder, newest first (upstream takes the
    newest; the others are fallbacks should it be unreadable)."""
    folder = Path(output_dir)
    others = [p for p in folder.glob("*.pth") if p.is_file() and p.name != LATEST] if folder.is_dir() else []
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return ([folder / LATEST] if (folder / LATEST).is_file() else []) + others


def auto_resume_path(output_dir: str | Path) -> Path | None:
    """checkpoint.pth if present, else the newest *.pth in the folder (as upstream)."""
    candidates = auto_resume_candidates(output_dir)
    return candidates[0] if candidates else None


def _encoder_part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def is_official_moby(state: dict) -> bool:
    return is_official_swin_layout(_encoder_part(state, "encoder."))


def convert_official_moby(state: dict, model: torch.nn.Module) -> dict:
    """Rewrite the encoder./encoder_k. parts of an official MoBY state dict (upstream's own Swin)
    into timm's key layout; our own checkpoints pass through unchanged."""
    out = {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIXES)}
    for prefix in ENCODER_PREFIXES:
        part = _encoder_part(state, prefix)
        if part and is_official_swin_layout(part):
            part = convert_official_swin(part, getattr(model, prefix.rstrip(".")))
        out.update({prefix + k: v for k, v in part.items()})
    return out


def resume(config: CfgNode, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler,
           scaler, logger: logging.Logger, checkpoint: dict | None = None) -> float:
    """Load MODEL.RESUME (or the already read `checkpoint`) into model (and, unless EVAL_MODE,
    optimizer, scheduler, scaler and TRAIN.START_EPOCH = epoch + 1). Returns the stored max accuracy."""
    logger.info(f"==============> Resuming form {config.MODEL.RESUME}....................")
    if checkpoint is None:
        checkpoint = read_checkpoint(config.MODEL.RESUME)
    if "model" not in checkpoint:
        raise UserError(f"{config.MODEL.RESUME} has no 'model' entry: it is not a MoBY checkpoint")
    official = is_official_moby(checkpoint["model"])
    state = convert_official_moby(checkpoint["model"], model)
    load_state_dict_checked(model, state, f"checkpoint {config.MODEL.RESUME}")
    max_accuracy = 0.0
    if official:
        # Its optimizer state follows upstream's parameter order, not timm's: weights only.
        logger.info(f"{config.MODEL.RESUME} is an official (upstream Swin) checkpoint: "
                    "loaded its weights only")
        return max_accuracy
    if not config.EVAL_MODE and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        config.defrost()
        config.TRAIN.START_EPOCH = checkpoint["epoch"] + 1
        config.freeze()
        scaler_state = checkpoint.get("amp", checkpoint.get("scaler"))
        if scaler_state:
            scaler.load_state_dict(scaler_state)
        logger.info(f"=> loaded successfully '{config.MODEL.RESUME}' (epoch {checkpoint['epoch']})")
        max_accuracy = checkpoint.get("max_accuracy", 0.0)
    return max_accuracy


def load_pretrained_encoder(model: torch.nn.Module, path: str | Path, logger: logging.Logger,
                            prefix: str = "encoder.") -> None:
    """The online encoder (`encoder.*`, or another prefix such as the target's `encoder_k.`) of a
    MoBY checkpoint into a backbone or classifier; a classifier's head stays freshly initialised."""
    checkpoint = read_checkpoint(path)
    encoder = _encoder_part(checkpoint.get("model", checkpoint), prefix)
    if not encoder:
        raise UserError(f"{path} holds no '{prefix}' weights: pass a MoBY pre-training checkpoint")
    if is_official_swin_layout(encoder):
        encoder = convert_official_swin(encoder, model)
    encoder = {k: v for k, v in encoder.items() if not k.startswith("head.")}
    load_state_dict_checked(model, encoder, f"{prefix.rstrip('.')} of {path}", ignore_missing=("head.",))
    logger.info(f"loaded pretrained checkpoint from: {path}")
