"""Linear classification on frozen features (facebookresearch/dino eval_linear.py).

    python dino/eval_linear.py --data_path /path/to/imagenet --pretrained_weights out/checkpoint.pth \
        --output_dir out/linear
Rerunning the same command resumes from <output_dir>/checkpoint.pth.tar.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dino/eval_linear.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Subset  # noqa: E402
from torchvision import transforms  # noqa: E402

from dino.augment import eval_transform, normalize_transform  # noqa: E402
from dino.checkpoints import add_pretrained_args, build_eval_backbone, load_training_state, model_label  # noqa: E402
from dino.models import backbone_is_vit, canonical_arch, is_vit  # noqa: E402
from ssl_runtime.checkpoint import load_checkpoint, prepare_output_dir, require_entries, save_atomic  # noqa: E402
from ssl_runtime.data import (SafeImageFolder, build_loader, check_same_classes, resolve_data_path,  # noqa: E402
                              set_loader_epoch)
from ssl_runtime.device import add_device_arg  # noqa: E402
from ssl_runtime.distributed import DistContext, add_launcher_args, all_reduce_sum_, init_distributed, wrap_ddp  # noqa: E402
from ssl_runtime.errors import UserError, main_entry  # noqa: E402
from ssl_runtime.logs import silence_non_main  # noqa: E402
from ssl_runtime.meters import MetricLogger, SmoothedValue  # noqa: E402
from ssl_runtime.misc import bool_flag, fix_random_seeds  # noqa: E402
from ssl_runtime.monitor import TENSORBOARD_DIR, TrainingMonitor  # noqa: E402
from ssl_runtime.optim import clear_gradients  # noqa: E402

CHECKPOINT_NAME = "checkpoint.pth.tar"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with linear classification on ImageNet")
    parser.add_argument("--n_last_blocks", default=4, type=int,
                        help="concatenate the [CLS] tokens of the n last blocks (4 for ViT-S, 1 for ViT-B)")
    parser.add_argument("--avgpool_patchtokens", default=False, type=bool_flag,
                        help="also concatenate the average of the last block's patch tokens (ViT-B)")
    add_pretrained_args(parser, patch_size=16)
    parser.add_argument("--epochs", default=100, type=int, help="number of training epochs")
    parser.add_argument("--lr", default=0.001, type=float,
                        help="learning rate for a global batch of 256 (scaled linearly)")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="per-device batch size")
    parser.add_argument("--data_path", default=None, type=str,
                        help="dataset root with train/ and val/ (default: the bundled Fashion-MNIST)")
    parser.add_argument("--num_workers", default=10, type=int, help="data loading workers per process")
    parser.add_argument("--val_freq", default=1, type=int, help="epoch frequency of validation")
    parser.add_argument("--output_dir", default=".", help="where logs and checkpoints go")
    parser.add_argument("--num_labels", default=1000, type=int, help="number of classifier outputs")
    parser.add_argument("--evaluate", dest="evaluate", action="store_true",
                        help="only evaluate the linear head saved in --output_dir")
    parser.add_argument("--tensorboard", default=True, type=bool_flag,
                        help="write TensorBoard scalars to <output_dir>/tensorboard (rank 0, when installed)")
    add_launcher_args(parser)
    add_device_arg(parser)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    args.arch = canonical_arch(args.arch)
    for name in ("epochs", "batch_size_per_gpu", "img_size", "patch_size", "num_labels",
                 "n_last_blocks", "val_freq"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if is_vit(args.arch) and args.img_size % args.patch_size:
        raise UserError(f"--patch_size {args.patch_size} does not divide --img_size {args.img_size}")


class LinearClassifier(nn.Module):
    """A linear layer on frozen features, initialised N(0, 0.01) with a zero bias."""

    def __init__(self, dim: int, num_labels: int = 1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(x.size(0), -1))


class FrozenFeatures(nn.Module):
    """The frozen backbone's features: for ViTs the [CLS] tokens of the last n blocks (each after
    the final norm), optionally with the average patch token of the last block."""

    def __init__(self, backbone: nn.Module, vit: bool, n_last_blocks: int, avgpool: bool):
        super().__init__()
        self.backbone, self.vit, self.n, self.avgpool = backbone, vit, n_last_blocks, avgpool

    @property
    def dim(self) -> int:
        width = self.backbone.num_features
        return width * (self.n + int(self.avgpool)) if self.vit else width

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.vit:
            return self.backbone(x)
        layers = self.backbone.get_intermediate_layers(x, n=self.n, return_prefix_tokens=True, norm=True)
        output = torch.cat([prefix[:, 0] for _, prefix in layers], dim=-1)
        if not self.avgpool:
            return output
        pooled = layers[-1][0].mean(dim=1)
        if self.n == 1:  # upstream's interleaved [cls_0, avg_0, cls_1, ...] order (official heads)
            return torch.stack((output, pooled), dim=-1).reshape(output.shape[0], -1)
        # upstream crashes here (shapes differ); concatenating is what its feature size assumes
        return torch.cat((output, pooled), dim=-1)


def accuracy_counts(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k predictions, for each k."""
    pred = output.topk(max(topk), dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, :k].any(dim=1).sum() for k in topk]


def train(features, classifier, optimizer, loader, epoch: int, ctx: DistContext) -> dict:
    classifier.train()
    metric_logger = MetricLogger(delimiter="  ", device=ctx.device)
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    criterion = nn.CrossEntropyLoss()
    for inp, target in metric_logger.log_every(loader, 20, f"Epoch: [{epoch}]"):
        inp = inp.to(ctx.device, non_blocking=True)
        target = target.to(ctx.device, non_blocking=True)
        loss = criterion(classifier(features(inp)), target)
        clear_gradients(optimizer)
        loss.backward()
        optimizer.step()
        metric_logger.update(loss=loss.detach())
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def validate_network(loader, features, classifier, ctx: DistContext, num_labels: int) -> dict:
    """Accuracy over the whole validation set: every rank scores its shard and the counts are summed
    (upstream reported rank 0's numbers only, facebookresearch/dino#289)."""
    classifier.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # float32, as Huawei's port: HCCL has no float64 on most chips (counts stay exact to 2^24)
    totals = torch.zeros(4, device=ctx.device)  # loss, top1, top5, count
    metric_logger = MetricLogger(delimiter="  ", device=ctx.device)
    topk = (1, 5) if num_labels >= 5 else (1,)
    for inp, target in metric_logger.log_every(loader, 20, "Test:"):
        inp = inp.to(ctx.device, non_blocking=True)
        target = target.to(ctx.device, non_blocking=True)
        output = classifier(features(inp))
        counts = accuracy_counts(output, target, topk)
        batch_loss = criterion(output.float(), target)
        metric_logger.update(loss=batch_loss / target.numel())
        totals[0] += batch_loss
        totals[1] += counts[0]
        totals[2] += counts[-1]
        totals[3] += target.numel()
    all_reduce_sum_(totals)
    loss, top1, top5, count = totals.tolist()
    stats = {"loss": loss / count, "acc1": 100.0 * top1 / count}
    if num_labels >= 5:
        stats["acc5"] = 100.0 * top5 / count
        print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}")
    else:
        print(f"* Acc@1 {stats['acc1']:.3f} loss {stats['loss']:.3f}")
    return stats


def build_data(args, ctx: DistContext):
    root = resolve_data_path(args.data_path, need=("train", "val"))
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(args.img_size),
        transforms.RandomHorizontalFlip(),
        normalize_transform(),
    ])
    dataset_train = SafeImageFolder(root / "train", transform=train_transform)
    dataset_val = SafeImageFolder(root / "val", transform=eval_transform(args.img_size))
    check_same_classes(dataset_train, dataset_val)
    num_classes = len(dataset_train.classes)
    if num_classes > args.num_labels:
        raise UserError(f"the dataset has {num_classes} classes but --num_labels is {args.num_labels}: "
                        f"pass --num_labels {num_classes}")
    # each rank scores a disjoint slice of the validation set (no padding duplicates)
    val_shard = Subset(dataset_val, range(ctx.rank, len(dataset_val), ctx.world_size))
    single = dataclasses.replace(ctx, rank=0, world_size=1, distributed=False)
    val_loader = build_loader(val_shard, args.batch_size_per_gpu, args.num_workers, single,
                              shuffle=False, drop_last=False)
    train_loader = build_loader(dataset_train, args.batch_size_per_gpu, args.num_workers, ctx,
                                shuffle=True, drop_last=False)
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")
    return train_loader, val_loader, len(dataset_val)


def restart(path: Path, classifier: nn.Module, optimizer, scheduler, trust: bool = False) -> tuple[int, float]:
    if not path.is_file():
        return 0, 0.0
    print(f"Found checkpoint at {path}")
    checkpoint = require_entries(load_checkpoint(path, trust=trust), path, ("state_dict", "epoch", "best_acc")
                                 + (("optimizer", "scheduler") if optimizer is not None else ()),
                                 "it is not a linear head written by eval_linear.py; move it out of "
                                 "--output_dir, or choose another --output_dir")
    load_training_state(classifier, checkpoint["state_dict"], f"linear classifier in {path}")
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    return int(checkpoint["epoch"]), float(checkpoint["best_acc"])


def eval_linear(args: argparse.Namespace) -> float:
    validate_args(args)
    ctx = init_distributed(args.device, args.local_rank, args.dist_url)
    silence_non_main(ctx.is_main)
    fix_random_seeds(0)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    output_dir = prepare_output_dir(args.output_dir)

    backbone = build_eval_backbone(args)
    vit = backbone_is_vit(backbone)
    if vit and args.n_last_blocks > len(backbone.blocks):
        raise UserError(f"--n_last_blocks {args.n_last_blocks} exceeds the {len(backbone.blocks)} "
                        f"blocks of {args.arch}: pass --n_last_blocks {len(backbone.blocks)} or fewer")
    features = FrozenFeatures(backbone, vit, args.n_last_blocks, args.avgpool_patchtokens)
    features = features.to(ctx.device).eval()
    for p in features.parameters():
        p.requires_grad = False
    print(f"Model {model_label(args)} built.")

    train_loader, val_loader, n_val = build_data(args, ctx)
    classifier = LinearClassifier(features.dim, num_labels=args.num_labels).to(ctx.device)
    ckpt_path = output_dir / CHECKPOINT_NAME

    if args.evaluate:
        if not ckpt_path.is_file():
            raise UserError(f"--evaluate needs a trained linear head in {ckpt_path}: run without "
                            "--evaluate first (the reference heads cannot be downloaded here)")
        restart(ckpt_path, classifier, None, None, args.trust_checkpoint)
        stats = validate_network(val_loader, features, classifier, ctx, args.num_labels)
        print(f"Accuracy of the network on the {n_val} test images: {stats['acc1']:.1f}%")
        return stats["acc1"]

    ddp_classifier = wrap_ddp(classifier, ctx)
    optimizer = torch.optim.SGD(ddp_classifier.parameters(),
                                args.lr * args.batch_size_per_gpu * ctx.world_size / 256.0,  # linear scaling
                                momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    start_epoch, best_acc = restart(ckpt_path, classifier, optimizer, scheduler, args.trust_checkpoint)
    monitor = TrainingMonitor(output_dir / TENSORBOARD_DIR, ctx.is_main, enabled=args.tensorboard)

    for epoch in range(start_epoch, args.epochs):
        set_loader_epoch(train_loader, epoch)
        train_stats = train(features, ddp_classifier, optimizer, train_loader, epoch, ctx)
        scheduler.step()
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            test_stats = validate_network(val_loader, features, classifier, ctx, args.num_labels)
            print(f"Accuracy at epoch {epoch} of the network on the {n_val} test images: "
                  f"{test_stats['acc1']:.1f}%")
            best_acc = max(best_acc, test_stats["acc1"])
            print(f"Max accuracy so far: {best_acc:.2f}%")
            log_stats.update({f"test_{k}": v for k, v in test_stats.items()})
            monitor.scalars(epoch, "val", test_stats)
        monitor.scalars(epoch, "train", train_stats)
        if ctx.is_main:
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
            save_atomic({"epoch": epoch + 1, "state_dict": classifier.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "best_acc": float(best_acc)}, ckpt_path)
    monitor.close()
    print("Training of the supervised linear classifier on frozen features completed.\n"
          f"Top-1 test accuracy: {best_acc:.1f}")
    return best_acc


@main_entry
def main(argv: list[str] | None = None) -> None:
    eval_linear(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
