"""A picture of what a DINO backbone learned: validation images beside their nearest training images.

    python dino/nearest_neighbors.py --arch vit_pico --patch_size 4 --img_size 32 \
        --pretrained_weights out/checkpoint.pth --png out/nearest_neighbors.png

Features are the k-NN evaluation's (L2-normalised, cosine similarity). Each row: a query (blue
frame) and its --k nearest training images, framed green when they share its label, red otherwise.
--pretrained_weights accepts what the evaluations accept, including timm:<name> (random baseline).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dino/nearest_neighbors.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from dino.augment import eval_transform  # noqa: E402
from dino.checkpoints import add_pretrained_args, build_eval_backbone  # noqa: E402
from dino.models import canonical_arch, is_vit  # noqa: E402
from ssl_runtime.data import SafeImageFolder, check_same_classes, limit_images, resolve_data_path  # noqa: E402
from ssl_runtime.device import add_device_arg  # noqa: E402
from ssl_runtime.distributed import single_process_context  # noqa: E402
from ssl_runtime.errors import UserError, main_entry  # noqa: E402
from ssl_runtime.misc import fix_random_seeds  # noqa: E402
from ssl_runtime.pictures import add_neighbour_args, check_neighbour_args, write_neighbour_grid  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Nearest neighbours in a DINO backbone's feature space")
    add_pretrained_args(parser, patch_size=16)
    parser.add_argument("--data_path", default=None, type=str,
                        help="dataset root with train/ and val/ (default: the bundled Fashion-MNIST)")
    parser.add_argument("--max_train_images", default=0, type=int,
                        help="search a fixed random subset of this many training images (0: all)")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int,
                        help="batch size of feature extraction")
    parser.add_argument("--num_workers", default=4, type=int, help="data loading workers")
    add_neighbour_args(parser)
    add_device_arg(parser)
    return parser


def main_nn(args: argparse.Namespace):
    args.arch = canonical_arch(args.arch)
    check_neighbour_args(args)
    if is_vit(args.arch) and args.img_size % args.patch_size:
        raise UserError(f"--patch_size {args.patch_size} does not divide --img_size {args.img_size}")
    ctx = single_process_context(args.device)
    fix_random_seeds(0)  # a random-initialisation baseline is reproducible
    root = resolve_data_path(args.data_path, need=("train", "val"))
    transform = eval_transform(args.img_size)
    train_set = limit_images(SafeImageFolder(root / "train", transform=transform), args.max_train_images)
    val_set = SafeImageFolder(root / "val", transform=transform)
    check_same_classes(train_set, val_set)
    model = build_eval_backbone(args)
    return write_neighbour_grid(model, train_set, val_set, ctx, args, args.batch_size_per_gpu,
                                args.num_workers)


@main_entry
def main(argv: list[str] | None = None) -> None:
    main_nn(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
