"""Checkpoints in upstream Transformer-SSL's layout, written atomically.

A checkpoint is a dict: model (the state dict, in upstream's key layout: see to_upstream_layout),
optimizer, lr_scheduler, max_accuracy, epoch (the last finished epoch), config (the merged yacs
config, as a plain nested dict: upstream stores the CfgNode object), amp (the loss-scaler state;
upstream's key, from apex), and ours: epoch_step and rng (an exact, also mid-epoch, resume).
Everything in it is a tensor or a plain Python value, so the safe (weights-only) unpickler reads
it. Reading accepts both key layouts (upstream's and timm's, written by earlier versions), and
`scaler` as another name for `amp`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from yacs.config import CfgNode

from ssl_runtime.amp import load_scaler_state
from ssl_runtime.checkpoint import (load_checkpoint, load_state_dict_checked, require_entries,
                                     require_state_dict, save_atomic)
from ssl_runtime.errors import UserError
from ssl_runtime.resilience import rng_state

from .backbones import convert_official_swin, is_official_swin_layout, to_official_swin
from .config import config_to_dict

LATEST = "checkpoint.pth"
ENCODER_PREFIXES = ("encoder.", "encoder_k.")
TRUST_FLAG = "--trust-checkpoint"  # MODEL.TRUST_CHECKPOINT


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """A checkpoint (a dict) through the safe loader (see ssl_runtime.checkpoint.load_checkpoint);
    `trust` (--trust-checkpoint, MODEL.TRUST_CHECKPOINT) also reads files it refuses."""
    checkpoint = load_checkpoint(path, trust=trust, trust_flag=TRUST_FLAG)
    return require_entries(checkpoint, path, (), "pass a MoBY checkpoint (checkpoint.pth, ckpt_epoch_N.pth) "
                                                 "or an encoder exported by moby/export.py")


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
        "model": to_upstream_layout(model.state_dict(), model),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "max_accuracy": float(max_accuracy),
        "epoch": epoch,
        "config": config_to_dict(config),
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


def _encoders(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(key prefix, encoder) of a MoBY model (online and target), or ("", classifier)."""
    if hasattr(model, "encoder_k"):
        return [(prefix, getattr(model, prefix.rstrip("."))) for prefix in ENCODER_PREFIXES]
    return [("", model)]


def _map_encoders(state: dict, model: torch.nn.Module, convert) -> dict:
    """convert(part, encoder) applied to the keys of each encoder; the other keys unchanged."""
    rest, out = dict(state), {}
    for prefix, encoder in _encoders(model):
        part = {k: rest.pop(prefix + k) for k in list(_encoder_part(rest, prefix))}
        if part:
            out.update({prefix + k: v for k, v in convert(part, encoder).items()})
    return {**out, **rest}


def to_upstream_layout(state: dict, model: torch.nn.Module) -> dict:
    """Our (timm) state dict of a MoBY model or linear classifier under upstream's keys, with
    the buffers upstream's Swin stores (moby/backbones.py), so that upstream's moby_linear.py
    and moby_main.py load it with strict=True."""
    return _map_encoders(state, model, to_official_swin)


def from_upstream_layout(state: dict, model: torch.nn.Module) -> dict:
    """The inverse: upstream's keys (ours since this layout, official checkpoints) to timm's;
    timm-layout parts (earlier versions of ours) pass through unchanged."""
    def convert(part, encoder):
        return convert_official_swin(part, encoder) if is_official_swin_layout(part) else part

    return _map_encoders(state, model, convert)


def is_official_checkpoint(checkpoint: dict) -> bool:
    """Written by upstream (or Huawei's port, which keeps upstream's code): upstream's key layout
    without our own entries (ours in that layout always carry `epoch_step`)."""
    encoder = _encoder_part(checkpoint["model"], "encoder.") or checkpoint["model"]
    return is_official_swin_layout(encoder) and "epoch_step" not in checkpoint


def resume(config: CfgNode, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler,
           scaler, logger: logging.Logger, checkpoint: dict | None = None) -> float:
    """Load MODEL.RESUME (or the already read `checkpoint`) into model (and, unless EVAL_MODE,
    optimizer, scheduler, scaler and TRAIN.START_EPOCH = epoch + 1). Returns the stored max accuracy."""
    logger.info(f"==============> Resuming form {config.MODEL.RESUME}....................")
    if checkpoint is None:
        checkpoint = read_checkpoint(config.MODEL.RESUME, config.MODEL.TRUST_CHECKPOINT)
    require_entries(checkpoint, config.MODEL.RESUME, ("model",),
                    "it is not a MoBY checkpoint: resume from checkpoint.pth or ckpt_epoch_N.pth of a run")
    require_state_dict(checkpoint["model"], f"'model' in {config.MODEL.RESUME}",
                       "the file is damaged or not a MoBY checkpoint: resume from checkpoint.pth or "
                       "ckpt_epoch_N.pth of a run")
    official = is_official_checkpoint(checkpoint)
    state = from_upstream_layout(checkpoint["model"], model)
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
            load_scaler_state(scaler, scaler_state)
        logger.info(f"=> loaded successfully '{config.MODEL.RESUME}' (epoch {checkpoint['epoch']})")
        max_accuracy = checkpoint.get("max_accuracy", 0.0)
    return max_accuracy


def load_pretrained_encoder(model: torch.nn.Module, path: str | Path, logger: logging.Logger,
                            prefix: str = "encoder.", trust: bool = False) -> None:
    """The online encoder (`encoder.*`, or another prefix such as the target's `encoder_k.`) of a
    MoBY checkpoint into a backbone or classifier; a classifier's head stays freshly initialised.

    A file holding a bare encoder state dict (moby/export.py's .safetensors or .pth) is loaded
    as the encoder itself. `trust`: see read_checkpoint.
    """
    checkpoint = read_checkpoint(path, trust)
    if "model" in checkpoint:
        state = require_state_dict(checkpoint["model"], f"'model' in {path}",
                                   "the file is damaged or not a MoBY checkpoint")
    else:  # a bare encoder, or something else: its tensors, and the check below says what is missing
        state = {k: v for k, v in checkpoint.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    encoder = _encoder_part(state, prefix)
    if not encoder and "model" not in checkpoint and not any(k.startswith(ENCODER_PREFIXES) for k in state):
        encoder = dict(state)
    if not encoder:
        raise UserError(f"{path} holds no '{prefix}' weights: pass a MoBY pre-training checkpoint")
    encoder = from_upstream_layout(encoder, model)
    encoder = {k: v for k, v in encoder.items() if not k.startswith("head.")}
    load_state_dict_checked(model, encoder, f"{prefix.rstrip('.')} of {path}", ignore_missing=("head.",))
    logger.info(f"loaded pretrained checkpoint from: {path}")
