"""A picture of what a MoBY encoder learned: validation images beside their nearest training images.

    python moby/nearest_neighbors.py --cfg configs/moby_swin_cpu.yaml \
        --pretrained output/<MODEL.NAME>/<tag>/checkpoint.pth --png nearest_neighbors.png

Same features and picture as moby/eval_knn.py's search (L2-normalised encoder output, cosine):
each row is a query (blue frame) and its --k nearest training images, framed green when they share
its label, red otherwise. The training images are the config's (DATA.MAX_TRAIN_IMAGES applies).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402
import os  # noqa: E402

from moby.cli import base_parser, parse_config, resolve_workers  # noqa: E402
from moby.data import BICUBIC, build_labelled_datasets, eval_transform  # noqa: E402
from moby.eval_knn import load_encoder  # noqa: E402
from ssl_runtime.distributed import single_process_context  # noqa: E402
from ssl_runtime.errors import main_entry  # noqa: E402
from ssl_runtime.misc import seed_everything  # noqa: E402
from ssl_runtime.pictures import add_neighbour_args, check_neighbour_args, write_neighbour_grid  # noqa: E402


@main_entry
def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Nearest neighbours in a MoBY encoder's feature space")
    parser.add_argument("--pretrained", default=None,
                        help="MoBY checkpoint or exported encoder (.pth or .safetensors; default: "
                             "<output>/<MODEL.NAME>/<tag>/checkpoint.pth), "
                             "or timm:<model name> for a randomly initialised timm model")
    parser.add_argument("--checkpoint_key", default="encoder", choices=["encoder", "encoder_k"],
                        help="online encoder or the momentum target encoder")
    add_neighbour_args(parser)
    args, config = parse_config(parser, argv)
    check_neighbour_args(args)
    ctx = single_process_context(config.DEVICE)
    seed_everything(config.SEED)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger = logging.getLogger("moby.nearest_neighbors")
    logger.info(resolve_workers(config, ctx.device_type, light_pipeline=True))  # resize and crop only
    encoder = load_encoder(config, args.pretrained or os.path.join(config.OUTPUT, "checkpoint.pth"),
                           args.checkpoint_key, logger)
    transform = eval_transform(config, interpolation=BICUBIC)
    train_set, val_set = build_labelled_datasets(config, transform, transform)
    write_neighbour_grid(encoder, train_set, val_set, ctx, args, config.DATA.BATCH_SIZE,
                         config.DATA.NUM_WORKERS)


if __name__ == "__main__":
    main()
