"""Linear evaluation of a MoBY encoder (upstream Transformer-SSL moby_linear.py).

    python moby/main_linear.py --cfg configs/moby_swin_tiny_linear.yaml --data-path <imagenet>

The encoder weights (`encoder.*`) come from <output>/<MODEL.NAME>/<tag>/checkpoint.pth as
upstream, or from --pretrained. Everything but the classifier `head` is frozen; the head is
trained with SGD (Nesterov, momentum 0.9, no weight decay), lr --lr x batch x processes / 512
with a cosine schedule, and label smoothing 0.1. Results go to <that folder>/linear.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datetime  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from moby.checkpoint import load_pretrained_encoder, save_checkpoint  # noqa: E402
from moby.cli import base_parser, open_output, parse_config, start_run  # noqa: E402
from moby.config import set_values  # noqa: E402
from moby.data import build_labelled_datasets, linear_train_transform, sharded_eval_loader  # noqa: E402
from moby.engine import (THROUGHPUT_WARMUP_STEPS, TrainState, last_epoch, maybe_resume,  # noqa: E402
                         measure_throughput, mixed_precision, prepare_budget, train_one_epoch)
from moby.model import build_linear_classifier  # noqa: E402
from moby.monitoring import attach_monitor, log_epoch  # noqa: E402
from moby.optimization import build_optimizer, build_scheduler, scale_learning_rates  # noqa: E402
from ssl_runtime import device as devices  # noqa: E402
from ssl_runtime.data import build_loader, set_loader_epoch  # noqa: E402
from ssl_runtime.distributed import DistContext, all_reduce_sum_, wrap_ddp  # noqa: E402
from ssl_runtime.errors import main_entry  # noqa: E402
from ssl_runtime.meters import AverageMeter, ThroughputMeter  # noqa: E402
from ssl_runtime.timm_interop import classifier_parameters, create_timm_baseline, timm_model_name  # noqa: E402


def linear_config(config: CfgNode, args) -> None:
    """Upstream's hard-coded linear-evaluation settings (epochs from LINEAR_EVAL / --epochs)."""
    output = config.OUTPUT
    set_values(config, **{
        "LINEAR_EVAL.PRETRAINED": "" if args.random_init else (args.pretrained or
                                                               os.path.join(output, "checkpoint.pth")),
        "OUTPUT": os.path.join(output, "linear"),
        "MODEL.TYPE": "linear",
        "MODEL.DROP_PATH_RATE": args.drop_path_rate,
        "AUG.SSL_AUG": False,
        "AUG.SSL_LINEAR_AUG": True,
        "AUG.MIXUP": 0.0,
        "AUG.CUTMIX": 0.0,
        "AUG.CUTMIX_MINMAX": None,
        "TRAIN.EPOCHS": args.epochs or config.LINEAR_EVAL.EPOCHS,
        "TRAIN.WARMUP_EPOCHS": config.LINEAR_EVAL.WARMUP_EPOCHS,
        "TRAIN.LR_SCHEDULER.NAME": "cosine",
        "TRAIN.OPTIMIZER.NAME": "sgd",
        "TRAIN.OPTIMIZER.MOMENTUM": 0.9,
        "TRAIN.BASE_LR": args.lr,
        "TRAIN.WEIGHT_DECAY": 0.0,
    })


def classify_loss(criterion):
    def compute(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        images, targets = batch
        return criterion(model(images), targets)
    return compute


@torch.no_grad()
def validate(config: CfgNode, loader, model: torch.nn.Module, ctx: DistContext,
             logger: logging.Logger) -> tuple[float, float, float]:
    """Top-1 / top-5 accuracy (percent) and mean loss over the whole val set, summed over ranks."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    # float32, as Huawei's port: HCCL has no float64 on most chips (counts stay exact to 2^24)
    totals = torch.zeros(4, device=ctx.device)  # loss, top-1, top-5, images
    batch_time = AverageMeter()
    end = time.time()
    for idx, (images, targets) in enumerate(loader):
        images = images.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        output = model(images)
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices.eq(targets[:, None])
        images_here = torch.tensor(float(len(targets)), device=ctx.device)
        batch = torch.stack([criterion(output.float(), targets), top5[:, 0].sum().float(),
                             top5.any(dim=1).sum().float(), images_here])
        totals += batch
        batch_time.update(time.time() - end)
        end = time.time()
        if idx % config.PRINT_FREQ == 0:
            loss, acc1, acc5, count = totals.tolist()
            logger.info(f"Test: [{idx}/{len(loader)}]\t"
                        f"Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                        f"Loss {loss / count:.4f}\t"
                        f"Acc@1 {100 * acc1 / count:.3f}\tAcc@5 {100 * acc5 / count:.3f}\t"
                        f"Mem {devices.max_memory_mb(ctx.device):.0f}MB")
    all_reduce_sum_(totals)
    loss, acc1, acc5, count = totals.tolist()
    acc1, acc5 = 100.0 * acc1 / max(count, 1), 100.0 * acc5 / max(count, 1)
    logger.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
    return acc1, acc5, loss / max(count, 1)


def freeze_all_but_head(model: torch.nn.Module) -> None:
    # a timm baseline's classifier may be named otherwise (a ResNet's `fc`)
    head = {id(p) for p in classifier_parameters(model)} if hasattr(model, "get_classifier") else set()
    for name, param in model.named_parameters():
        if "head" not in name and id(param) not in head:
            param.requires_grad = False


def linear_eval(config: CfgNode, ctx: DistContext, logger: logging.Logger) -> float:
    train_set, val_set = build_labelled_datasets(config, linear_train_transform(config))
    set_values(config, **{"MODEL.NUM_CLASSES": len(train_set.classes)})
    train_loader = build_loader(train_set, config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS, ctx,
                                shuffle=True, drop_last=True)
    val_loader = sharded_eval_loader(val_set, config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS, ctx)

    logger.info(f"Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME}")
    timm_name = timm_model_name(config.LINEAR_EVAL.PRETRAINED)
    if timm_name:
        classifier = create_timm_baseline(timm_name, config.DATA.IMG_SIZE, config.MODEL.NUM_CLASSES)
    else:
        classifier = build_linear_classifier(config, config.MODEL.DROP_PATH_RATE)
    freeze_all_but_head(classifier)
    classifier = classifier.to(ctx.device)
    logger.info(str(classifier))
    optimizer = build_optimizer(config, classifier, ctx.device_type)
    mp = mixed_precision(config, ctx.device_type)
    logger.info(mp.precision_line())
    classifier, optimizer = mp.prepare(classifier, optimizer)
    model = wrap_ddp(classifier, ctx, broadcast_buffers=False)
    if timm_name:
        logger.info(f"{config.LINEAR_EVAL.PRETRAINED}: a randomly initialised timm model (baseline)")
    elif config.LINEAR_EVAL.PRETRAINED:
        load_pretrained_encoder(classifier, config.LINEAR_EVAL.PRETRAINED, logger,
                                trust=config.MODEL.TRUST_CHECKPOINT)
    else:
        logger.info("no pretrained weights (--random-init): the encoder keeps its random initialisation")
    logger.info(f"number of params: {sum(p.numel() for p in classifier.parameters() if p.requires_grad)}")

    steps_per_epoch = len(train_loader)
    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    criterion = LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING) \
        if config.MODEL.LABEL_SMOOTHING > 0 else torch.nn.CrossEntropyLoss()
    throughput = ThroughputMeter(config.DATA.BATCH_SIZE * ctx.world_size,
                                 warmup_steps=THROUGHPUT_WARMUP_STEPS, device=ctx.device)
    state = TrainState(optimizer, lr_scheduler, mp, ctx, logger, throughput,
                       skip_non_finite=config.TRAIN.SKIP_NON_FINITE)

    max_accuracy = maybe_resume(config, classifier, state)
    if config.MODEL.RESUME:
        acc1, _, _ = validate(config, val_loader, model, ctx, logger)
        logger.info(f"Accuracy of the network on the {len(val_set)} test images: {acc1:.1f}%")
        if config.EVAL_MODE:
            return acc1
    if config.THROUGHPUT_MODE:
        measure_throughput(val_loader, model, ctx, logger)
        return max_accuracy

    prepare_budget(config, state, steps_per_epoch)
    attach_monitor(config, state, ctx, logger, config.DATA.BATCH_SIZE * ctx.world_size)
    logger.info("Start linear evaluation training")
    start_time = time.time()
    for epoch in range(config.TRAIN.START_EPOCH, last_epoch(config)):
        set_loader_epoch(train_loader, epoch)
        train_one_epoch(config, model, train_loader, epoch, state, classify_loss(criterion))
        if ctx.is_main and (epoch % config.SAVE_FREQ == 0 or epoch == last_epoch(config) - 1):
            save_checkpoint(config, epoch, classifier, max_accuracy, optimizer, lr_scheduler, mp.scaler,
                            logger)
        acc1, acc5, _ = validate(config, val_loader, model, ctx, logger)
        logger.info(f"Accuracy of the network on the {len(val_set)} test images: {acc1:.1f}%")
        log_epoch(config, state, epoch, acc1=acc1, acc5=acc5)
        max_accuracy = max(max_accuracy, acc1)
        logger.info(f"Max accuracy: {max_accuracy:.2f}%")
    state.monitor.close()
    logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return max_accuracy


@main_entry
def main(argv: list[str] | None = None) -> None:
    parser = base_parser("MoBY linear evaluation script")
    parser.add_argument("--lr", type=float, default=1.0, help="base lr for linear evaluation (x batch / 512)")
    parser.add_argument("--drop-path-rate", type=float, default=0.2,
                        help="drop path rate of the frozen encoder during linear evaluation")
    parser.add_argument("--pretrained", default=None,
                        help="MoBY checkpoint or exported encoder to evaluate (.pth or .safetensors; "
                             "default: <output>/<MODEL.NAME>/<tag>/checkpoint.pth), or timm:<model "
                             "name>: a randomly initialised timm model")
    parser.add_argument("--random-init", action="store_true",
                        help="train the head on the randomly initialised encoder (a baseline)")
    args, config = parse_config(parser, argv)
    linear_config(config, args)
    ctx = start_run(config, args)
    scale_learning_rates(config, ctx.world_size)
    logger = open_output(config, ctx)
    linear_eval(config, ctx, logger)


if __name__ == "__main__":
    main()
