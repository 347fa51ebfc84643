"""Weighted k-NN evaluation of frozen features (facebookresearch/dino eval_knn.py).

    python dino/eval_knn.py --data_path /path/to/imagenet --pretrained_weights out/checkpoint.pth
Works with or without a launcher (torchrun shards the feature extraction over processes).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dino/eval_knn.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from dino.augment import eval_transform  # noqa: E402
from dino.checkpoints import add_pretrained_args, build_eval_backbone, model_label  # noqa: E402
from dino.main_dino import UPSTREAM_WORKERS  # noqa: E402
from dino.models import canonical_arch, is_vit  # noqa: E402
from ssl_runtime.checkpoint import load_checkpoint  # noqa: E402
from ssl_runtime.data import SafeImageFolder, build_loader, check_same_classes, resolve_data_path  # noqa: E402
from ssl_runtime.device import add_device_arg  # noqa: E402
from ssl_runtime.cpu_layout import AUTO_WORKERS, lay_out  # noqa: E402
from ssl_runtime.distributed import DistContext, add_launcher_args, barrier, init_distributed  # noqa: E402
from ssl_runtime.errors import UserError, main_entry  # noqa: E402
from ssl_runtime.knn import IndexedDataset, extract_features, knn_classify_all, result_line  # noqa: E402
from ssl_runtime.logs import silence_non_main  # noqa: E402
from ssl_runtime.misc import bool_flag, fix_random_seeds  # noqa: E402

FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on ImageNet")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="per-device batch size")
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                        help="numbers of neighbours to use (20 usually works best)")
    parser.add_argument("--temperature", default=0.07, type=float, help="temperature of the voting weights")
    parser.add_argument("--use_cuda", default=True, type=bool_flag,
                        help="keep the features on the device for the k-NN search (false: host memory)")
    add_pretrained_args(parser, patch_size=16)
    parser.add_argument("--dump_features", default=None,
                        help="folder where to save the computed features, empty for no saving")
    parser.add_argument("--load_features", default=None,
                        help="folder with features saved by --dump_features (skips extraction)")
    parser.add_argument("--num_workers", default=AUTO_WORKERS, type=int,
                        help="data loading workers per process; -1 (default): upstream's 10 on NPU/GPU, "
                             "on CPU planned with the torch threads (ssl_runtime/cpu_layout.py)")
    parser.add_argument("--data_path", default=None, type=str,
                        help="dataset root with train/ and val/ (default: the bundled Fashion-MNIST)")
    add_launcher_args(parser)
    add_device_arg(parser)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    args.arch = canonical_arch(args.arch)
    for name in ("batch_size_per_gpu", "img_size", "patch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.nb_knn or min(args.nb_knn) <= 0:
        raise UserError(f"--nb_knn needs positive numbers of neighbours, got {args.nb_knn}")
    if is_vit(args.arch) and args.img_size % args.patch_size:
        raise UserError(f"--patch_size {args.patch_size} does not divide --img_size {args.img_size}")


def extract_feature_pipeline(args: argparse.Namespace, ctx: DistContext):
    root = resolve_data_path(args.data_path, need=("train", "val"))
    transform = eval_transform(args.img_size)
    dataset_train = SafeImageFolder(root / "train", transform=transform)
    dataset_val = SafeImageFolder(root / "val", transform=transform)
    check_same_classes(dataset_train, dataset_val)
    loaders = [build_loader(IndexedDataset(ds), args.batch_size_per_gpu, args.num_workers, ctx,
                            shuffle=False, drop_last=False) for ds in (dataset_train, dataset_val)]
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")

    model = build_eval_backbone(args)
    print(f"Model {model_label(args)} built.")
    model = model.to(ctx.device).eval()

    print("Extracting features for train set...")
    train_features, train_labels = extract_features(model, loaders[0], ctx, desc="train features")
    print("Extracting features for val set...")
    test_features, test_labels = extract_features(model, loaders[1], ctx, desc="val features")
    if args.dump_features and ctx.is_main:
        folder = Path(args.dump_features)
        folder.mkdir(parents=True, exist_ok=True)
        for name, tensor in zip(FEATURE_FILES, (train_features, test_features, train_labels, test_labels)):
            torch.save(tensor.cpu(), folder / name)
        print(f"Features saved in {folder}")
    return train_features, test_features, train_labels, test_labels, len(dataset_train.classes)


def load_saved_features(folder: str, trust: bool = False):
    missing = [name for name in FEATURE_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(f"--load_features {folder} lacks {', '.join(missing)}: write them first "
                        "with --dump_features")
    tensors = [load_checkpoint(os.path.join(folder, name), trust=trust) for name in FEATURE_FILES]
    for name, tensor in zip(FEATURE_FILES, tensors):
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{os.path.join(folder, name)} holds a {type(tensor).__name__}, not a tensor: "
                            "write the features with --dump_features")
    num_classes = int(max(tensors[2].max(), tensors[3].max())) + 1
    return (*tensors, num_classes)


def eval_knn(args: argparse.Namespace) -> dict[int, tuple[float, float]]:
    validate_args(args)
    ctx = init_distributed(args.device, args.local_rank, args.dist_url)
    silence_non_main(ctx.is_main)
    fix_random_seeds(0)  # a random-initialisation baseline is then reproducible
    args.num_workers, layout = lay_out(args.num_workers, ctx.device_type, UPSTREAM_WORKERS,
                                       light_pipeline=True)
    print(layout)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))

    if args.load_features:
        train_f, test_f, train_y, test_y, num_classes = load_saved_features(args.load_features, args.trust_checkpoint)
    else:
        train_f, test_f, train_y, test_y, num_classes = extract_feature_pipeline(args, ctx)

    results: dict[int, tuple[float, float]] = {}
    if ctx.is_main:
        where = ctx.device if args.use_cuda else torch.device("cpu")
        train_f, test_f, train_y, test_y = (t.to(where) for t in (train_f, test_f, train_y, test_y))
        print("Features are ready!\nStart the k-NN classification.")
        results = knn_classify_all(train_f, train_y, test_f, test_y, args.nb_knn, args.temperature,
                                   num_classes)
        for k in args.nb_knn:
            print(result_line(k, *results[k]), flush=True)
    barrier()
    return results


@main_entry
def main(argv: list[str] | None = None) -> None:
    eval_knn(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
