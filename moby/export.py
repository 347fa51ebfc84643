"""Export a MoBY encoder (Swin or DeiT) as a timm state dict: .safetensors and .pth.

    python moby/export.py --pretrained output/<MODEL.NAME>/<tag>/checkpoint.pth --output swin_encoder

The configuration defaults to the one stored in the checkpoint (`config`); pass --cfg (and --opts)
for a checkpoint without one. The online encoder (`encoder`) is exported unless --checkpoint_key
encoder_k asks for the momentum target. The command prints the timm.create_model call that loads
the files and checks it (features compared with ours).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402
from collections.abc import Mapping  # noqa: E402

from yacs.config import CfgNode  # noqa: E402

from moby.backbones import build_encoder  # noqa: E402
from moby.checkpoint import TRUST_FLAG, load_pretrained_encoder, read_checkpoint  # noqa: E402
from moby.config import config_from_checkpoint, get_config  # noqa: E402
from ssl_runtime.checkpoint import add_trust_arg  # noqa: E402
from ssl_runtime.errors import UserError, main_entry  # noqa: E402
from ssl_runtime.export import add_export_args, export_backbone  # noqa: E402
from ssl_runtime.timm_interop import TimmSpec, swin_spec, vit_spec_of  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export a MoBY encoder for timm")
    parser.add_argument("--pretrained", required=True, help="MoBY pre-training checkpoint (.pth or .safetensors)")
    parser.add_argument("--cfg", default=None, metavar="FILE",
                        help="config of the checkpoint (default: the one stored in it)")
    parser.add_argument("--opts", default=None, nargs="+", help="KEY VALUE pairs changing --cfg")
    parser.add_argument("--checkpoint_key", default="encoder", choices=["encoder", "encoder_k"],
                        help="online encoder or the momentum target encoder")
    add_trust_arg(parser, TRUST_FLAG)
    add_export_args(parser)
    return parser


def checkpoint_config(args: argparse.Namespace) -> CfgNode:
    if args.cfg:
        return get_config(argparse.Namespace(cfg=args.cfg, opts=args.opts))
    checkpoint = read_checkpoint(args.pretrained, args.trust_checkpoint)
    stored = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    return config_from_checkpoint(stored, args.pretrained)


def timm_spec(config: CfgNode, encoder) -> TimmSpec:
    """swin_*_patch4_window7_224 / deit_*_patch16_224, with kwargs for other sizes."""
    if config.MODEL.MOBY.ENCODER != "swin":
        return vit_spec_of(encoder, family="deit")
    swin = config.MODEL.SWIN
    if swin.NORM_BEFORE_MLP != "ln":
        raise UserError("MODEL.SWIN.NORM_BEFORE_MLP 'bn' (BatchNorm before every MLP) has no timm "
                        "equivalent: timm's Swin always uses LayerNorm there, so this encoder cannot "
                        "be exported for timm.create_model (use the checkpoint with moby/ tools)")
    if not swin.PATCH_NORM:
        raise UserError("MODEL.SWIN.PATCH_NORM False has no timm equivalent (timm's Swin always "
                        "normalises the patch embedding): this encoder cannot be exported for timm")
    return swin_spec(swin.EMBED_DIM, swin.DEPTHS, swin.NUM_HEADS, swin.PATCH_SIZE, swin.WINDOW_SIZE,
                     config.DATA.IMG_SIZE, swin.MLP_RATIO, swin.QKV_BIAS)


def export(args: argparse.Namespace):
    config = checkpoint_config(args)
    encoder = build_encoder(config, num_classes=0)
    spec = timm_spec(config, encoder)  # refuses architectures timm cannot express before any work
    load_pretrained_encoder(encoder, args.pretrained, logging.getLogger("moby.export"),
                            prefix=args.checkpoint_key + ".", trust=args.trust_checkpoint)
    source = f"{args.pretrained} ({args.checkpoint_key}, {config.MODEL.MOBY.ENCODER})"
    return export_backbone(encoder, spec, args, config.DATA.IMG_SIZE, source)


@main_entry
def main(argv: list[str] | None = None) -> None:
    export(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
