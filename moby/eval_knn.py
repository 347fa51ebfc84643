"""Weighted k-NN evaluation of a MoBY encoder (upstream DINO's eval_knn.py protocol).

    python moby/eval_knn.py --cfg configs/moby_swin_cpu.yaml --pretrained <out>/checkpoint.pth

Features of the train and val images (resized and centre-cropped) are L2-normalised; each val
image takes the k nearest train features, which vote with weight exp(cos / T). Prints
`{k}-NN classifier result: Top1: x, Top5: y` for every k.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from moby.backbones import build_encoder  # noqa: E402
from moby.checkpoint import load_pretrained_encoder  # noqa: E402
from moby.cli import base_parser, open_output, parse_config, start_run  # noqa: E402
from moby.config import set_values  # noqa: E402
from moby.data import BICUBIC, build_labelled_datasets, dataset_root, eval_transform  # noqa: E402
from ssl_runtime.distributed import DistContext  # noqa: E402
from ssl_runtime.errors import main_entry  # noqa: E402
from ssl_runtime.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, evaluate_knn, result_line  # noqa: E402
from ssl_runtime.monitor import TENSORBOARD_DIR, TrainingMonitor  # noqa: E402
from ssl_runtime.timm_interop import create_timm_baseline, timm_model_name  # noqa: E402


def knn_on_encoder(config: CfgNode, encoder: torch.nn.Module, ctx: DistContext, logger: logging.Logger,
                   ks=DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE) -> dict[int, tuple[float, float]]:
    """k-NN accuracy of an encoder that returns pooled features; logs one result line per k."""
    transform = eval_transform(config, interpolation=BICUBIC)
    train, val = build_labelled_datasets(config, transform, transform)
    results = evaluate_knn(encoder, train, val, ctx, config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS,
                           ks=ks, temperature=temperature)
    for k, (top1, top5) in sorted(results.items()):
        logger.info(result_line(k, top1, top5))
    return results


def load_encoder(config: CfgNode, path: str | None, key: str, logger: logging.Logger) -> torch.nn.Module:
    """The online (`encoder`) or target (`encoder_k`) encoder of a MoBY checkpoint, a random one, or
    (path `timm:<name>`) a randomly initialised timm model at DATA.IMG_SIZE, as a baseline."""
    name = timm_model_name(path)
    if name is not None:
        return create_timm_baseline(name, config.DATA.IMG_SIZE)
    encoder = build_encoder(config, num_classes=0)
    if path is None:
        logger.info("no --pretrained checkpoint: evaluating the randomly initialised encoder")
        return encoder
    load_pretrained_encoder(encoder, path, logger, prefix=key + ".", trust=config.MODEL.TRUST_CHECKPOINT)
    return encoder


@main_entry
def main(argv: list[str] | None = None) -> None:
    parser = base_parser("k-NN evaluation of a MoBY encoder")
    parser.add_argument("--pretrained", default=None,
                        help="MoBY checkpoint or exported encoder (.pth or .safetensors; default: "
                             "<output>/<MODEL.NAME>/<tag>/checkpoint.pth), "
                             "or timm:<model name> for a randomly initialised timm model (a baseline)")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate the encoder at random initialisation (a baseline)")
    parser.add_argument("--checkpoint_key", default="encoder", choices=["encoder", "encoder_k"],
                        help="online encoder (as linear evaluation) or the momentum target encoder")
    parser.add_argument("--nb_knn", default=list(DEFAULT_KS), nargs="+", type=int,
                        help="numbers of nearest neighbours")
    parser.add_argument("--temperature", default=DEFAULT_TEMPERATURE, type=float,
                        help="temperature of the neighbours' votes")
    args, config = parse_config(parser, argv)
    dataset_root(config, ("train", "val"))  # a wrong dataset fails before anything is loaded
    pretrained = args.pretrained or os.path.join(config.OUTPUT, "checkpoint.pth")
    if args.random_init:
        pretrained = None
    set_values(config, OUTPUT=os.path.join(config.OUTPUT, "knn"))
    ctx = start_run(config, args)
    logger = open_output(config, ctx)
    encoder = load_encoder(config, pretrained, args.checkpoint_key, logger).to(ctx.device)
    results = knn_on_encoder(config, encoder, ctx, logger, ks=args.nb_knn, temperature=args.temperature)
    monitor = TrainingMonitor(Path(config.OUTPUT) / TENSORBOARD_DIR, ctx.is_main,
                              enabled=config.TENSORBOARD, log=logger.info)
    monitor.scalars(0, "knn", {f"top1_k{k}": top1 for k, (top1, _) in results.items()})
    monitor.close()


if __name__ == "__main__":
    main()
