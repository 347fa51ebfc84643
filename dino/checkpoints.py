"""Loading backbone weights from our checkpoints and from official DINO files.

Accepted inputs (what upstream's load_pretrained_weights accepts, but checked):
  * a full training checkpoint ({'student', 'teacher', ...}): the `checkpoint_key` entry is used,
    `module.` (DDP) and `backbone.` (multi-crop wrapper) prefixes are removed and the DINO
    projection head (`head.*`) is dropped on purpose;
  * a plain backbone state dict in the official layout (`cls_token`, `pos_embed`,
    `patch_embed.proj.*`, `blocks.N.*`, `norm.*` for ViTs; torchvision names for ResNet-50),
    which matches timm's modules 1:1.
Every other mismatch is reported as a UserError: never a silent partial load.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from ssl_runtime.checkpoint import (add_trust_arg, is_state_dict, load_checkpoint, load_state_dict_checked,
                                     require_state_dict, strip_prefixes)
from ssl_runtime.errors import UserError
from ssl_runtime.timm_interop import create_timm_baseline, timm_model_name

from .models import resample_pos_embed

WRAPPER_PREFIXES = ("module.", "backbone.")
HEAD_PREFIX = "head."


def select_state_dict(checkpoint: Mapping, checkpoint_key: str | None, source: str) -> dict:
    """The tensors to load: checkpoint[checkpoint_key] for a full checkpoint, else the file itself."""
    if checkpoint_key and checkpoint_key in checkpoint:
        print(f"Take key {checkpoint_key} in provided checkpoint dict")
        state = checkpoint[checkpoint_key]
    else:
        state = checkpoint
    if not is_state_dict(state):
        keys = ", ".join(sorted(str(k) for k in checkpoint)[:10])
        raise UserError(f"{source} is neither a state dict nor holds --checkpoint_key "
                        f"{checkpoint_key!r} (its top-level keys: {keys}); pass --checkpoint_key "
                        "teacher or student for a DINO training checkpoint")
    return dict(state)


def backbone_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Strip wrapper prefixes and drop the projection head; returns (backbone state, dropped keys)."""
    state = strip_prefixes(state, WRAPPER_PREFIXES)
    dropped = [k for k in state if k.startswith(HEAD_PREFIX)]
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}, dropped


def adapt_pos_embed(model: nn.Module, state: dict) -> bool:
    """Resample a ViT position embedding trained at another resolution to the model's grid, as
    upstream DINO does for inputs of that size (so features equal upstream's at that size)."""
    target = getattr(model, "pos_embed", None)
    source = state.get("pos_embed")
    if target is None or source is None or source.shape == target.shape:
        return False
    if source.ndim != 3 or source.shape[-1] != target.shape[-1]:
        return False  # a different width: let the checked load report it
    state["pos_embed"] = resample_pos_embed(source, tuple(model.patch_embed.grid_size))
    return True


def load_pretrained_backbone(model: nn.Module, path: str, checkpoint_key: str | None = "teacher",
                             trust: bool = False) -> None:
    """Load backbone weights (.pth or .safetensors) into a timm backbone, explaining any mismatch;
    `trust` (--trust_checkpoint) lets files the safe loader refuses be read."""
    if not os.path.isfile(path):
        raise UserError(f"--pretrained_weights {path} does not exist or is not a file: "
                        "point it at a checkpoint.pth written by main_dino.py or an official DINO file")
    checkpoint = load_checkpoint(path, trust=trust)
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path} does not hold a state dict (found {type(checkpoint).__name__})")
    state, dropped = backbone_state_dict(select_state_dict(checkpoint, checkpoint_key, path))
    resampled = adapt_pos_embed(model, state)
    load_state_dict_checked(model, state, what=f"backbone weights in {path}")
    notes = [f"{len(state)} tensors"]
    if dropped:
        notes.append(f"dropped {len(dropped)} projection-head tensors")
    if resampled:
        notes.append("position embedding resampled to the model's grid")
    print(f"Pretrained weights found at {path} and loaded: {', '.join(notes)}")


def load_training_state(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a whole module of a training checkpoint (student, teacher, linear classifier) saved
    with or without a DDP `module.` prefix."""
    require_state_dict(state, what, "the checkpoint is damaged or was not written by this program; "
                       "move it out of --output_dir, or choose another --output_dir")
    load_state_dict_checked(module, strip_prefixes(state, ("module.",)), what=what)


def add_pretrained_args(parser, patch_size: int = 16) -> None:
    """Flags every evaluation script shares with upstream (plus --img_size)."""
    parser.add_argument("--arch", default="vit_small", type=str, help="architecture of the backbone")
    parser.add_argument("--patch_size", default=patch_size, type=int, help="patch resolution of the model")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="checkpoint to evaluate (ours or official, .pth or .safetensors; empty: "
                             "random initialisation "
                             "of --arch; timm:<model name>: a randomly initialised timm model, a baseline)")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='key to use in a training checkpoint (e.g. "teacher" or "student")')
    parser.add_argument("--img_size", default=224, type=int,
                        help="evaluation image size (the model's native size; 224 for official weights)")
    add_trust_arg(parser)


def load_or_random(model: nn.Module, path: str, checkpoint_key: str | None, arch: str,
                   trust: bool = False) -> None:
    """Load `path`, or say clearly that the random initialisation is being evaluated."""
    if path:
        load_pretrained_backbone(model, path, checkpoint_key, trust)
        return
    # upstream downloads the reference weights here; without network access we cannot
    print(f"warning: no --pretrained_weights given: evaluating a randomly initialised {arch} "
          "(pass --pretrained_weights <checkpoint.pth> to evaluate trained weights)", flush=True)


def build_eval_backbone(args) -> nn.Module:
    """The backbone an evaluation runs on: --arch loaded from --pretrained_weights (or random), or,
    for `--pretrained_weights timm:<name>`, a randomly initialised timm model at --img_size."""
    from .models import build_backbone

    name = timm_model_name(args.pretrained_weights)
    if name is not None:
        return create_timm_baseline(name, args.img_size)
    model = build_backbone(args.arch, args.patch_size, args.img_size)
    load_or_random(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.trust_checkpoint)
    return model


def model_label(args) -> str:
    """What is evaluated, for log lines: 'vit_small 16x16' or 'timm:<name> (random init)'."""
    if timm_model_name(args.pretrained_weights):
        return f"{args.pretrained_weights} (random init)"
    return f"{args.arch} {args.patch_size}x{args.patch_size}"
