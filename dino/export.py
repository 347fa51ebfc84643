"""Export a DINO backbone (teacher or student) as a timm state dict: .safetensors and .pth.

    python dino/export.py --pretrained_weights out/checkpoint.pth --checkpoint_key teacher --output out/teacher

Architecture flags default to the ones stored in our checkpoint (`args`); an official backbone-only
file needs --arch / --patch_size. The exported keys are timm's, so
`timm.create_model(<printed name>, pretrained=True, pretrained_cfg_overlay=dict(file=...))` loads
the file as is; the command prints that call and checks it (features compared with ours).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dino/export.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
from collections.abc import Mapping  # noqa: E402

from dino.checkpoints import load_pretrained_backbone  # noqa: E402
from dino.models import build_backbone, canonical_arch, is_vit  # noqa: E402
from ssl_runtime.checkpoint import add_trust_arg, load_checkpoint  # noqa: E402
from ssl_runtime.errors import UserError, main_entry  # noqa: E402
from ssl_runtime.export import add_export_args, export_backbone  # noqa: E402
from ssl_runtime.timm_interop import TimmSpec, vit_spec_of  # noqa: E402

DEFAULTS = {"arch": "vit_small", "patch_size": 16, "img_size": 224}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export a DINO backbone for timm")
    parser.add_argument("--pretrained_weights", required=True,
                        help="checkpoint.pth written by main_dino.py, or an official DINO file "
                             "(.pth or .safetensors)")
    parser.add_argument("--checkpoint_key", default="teacher",
                        help='"teacher" or "student" in a training checkpoint')
    parser.add_argument("--arch", default=None, help="default: from the checkpoint, else vit_small")
    parser.add_argument("--patch_size", default=None, type=int, help="default: from the checkpoint, else 16")
    parser.add_argument("--img_size", default=None, type=int,
                        help="image size of the exported position embedding "
                             "(default: from the checkpoint, else 224)")
    add_trust_arg(parser)
    add_export_args(parser)
    return parser


def fill_architecture(args: argparse.Namespace) -> None:
    """Missing architecture flags come from the training arguments saved in our checkpoints
    (a dict; an argparse Namespace in older and upstream's full checkpoints)."""
    stored = {}
    if any(getattr(args, name) is None for name in DEFAULTS):
        checkpoint = load_checkpoint(args.pretrained_weights, trust=args.trust_checkpoint)
        stored = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
        stored = vars(stored) if isinstance(stored, argparse.Namespace) else stored or {}
        if not isinstance(stored, Mapping):
            raise UserError(f"the 'args' entry of {args.pretrained_weights} is a {type(stored).__name__}, "
                            "not training arguments: pass --arch, --patch_size and --img_size")
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, stored_value(stored, name, default))
    args.arch = canonical_arch(args.arch)
    if is_vit(args.arch) and args.img_size % args.patch_size:
        raise UserError(f"--patch_size {args.patch_size} does not divide --img_size {args.img_size}")


def stored_value(stored: Mapping, name: str, default):
    """stored[name] when it has the default's type (a str arch, int sizes), else a UserError."""
    value = stored.get(name, default)
    if type(value) is not type(default):  # bool is an int: compare the exact types
        raise UserError(f"the checkpoint's training arguments give {name} = {value!r} "
                        f"({type(value).__name__}): pass --{name} yourself")
    return value


def timm_spec(model, arch: str) -> TimmSpec:
    if is_vit(arch):
        return vit_spec_of(model, family="vit", tag="dino")
    return TimmSpec(arch)  # resnet50: torchvision / timm names, 1:1


def export(args: argparse.Namespace):
    fill_architecture(args)
    model = build_backbone(args.arch, args.patch_size, args.img_size)
    load_pretrained_backbone(model, args.pretrained_weights, args.checkpoint_key, args.trust_checkpoint)
    source = f"{args.pretrained_weights} ({args.checkpoint_key}, {args.arch})"
    return export_backbone(model, timm_spec(model, args.arch), args, args.img_size, source)


@main_entry
def main(argv: list[str] | None = None) -> None:
    export(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
