"""Command line and run set-up shared by main_moby.py, main_linear.py and eval_knn.py.

The flags are upstream moby_main.py's, plus the Ascend port's --epochs / --steps / --max_epochs
and our --device.
"""

from __future__ import annotations

import argparse
import logging

from yacs.config import CfgNode

from ssl_runtime.amp import AMP_DTYPES
from ssl_runtime.augment import use_batched
from ssl_runtime.checkpoint import add_trust_arg, prepare_output_dir
from ssl_runtime.cpu_layout import lay_out
from ssl_runtime.device import add_device_arg
from ssl_runtime.distributed import DistContext, add_launcher_args, init_distributed
from ssl_runtime.errors import UserError
from ssl_runtime.logs import setup_logger
from ssl_runtime.misc import seed_everything

from .checkpoint import TRUST_FLAG
from .config import get_config, save_config, set_values


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description)
    parser.add_argument("--cfg", type=str, required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--opts", default=None, nargs="+",
                        help="modify config options by adding 'KEY VALUE' pairs, e.g. TRAIN.EPOCHS 100")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--data-path", type=str,
                        help="ImageFolder root with train/ (and val/); default: Fashion-MNIST")
    parser.add_argument("--zip", action="store_true",
                        help="upstream's zipped ImageNet: not supported, use an ImageFolder path")
    parser.add_argument("--cache-mode", type=str, default=None, choices=["no", "full", "part"],
                        help="upstream's in-memory cache of the zip dataset: not supported")
    parser.add_argument("--resume", help="resume from checkpoint")
    add_trust_arg(parser, TRUST_FLAG)  # (ours) MODEL.TRUST_CHECKPOINT
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true",
                        help="whether to use gradient checkpointing to save memory")
    parser.add_argument("--amp-opt-level", type=str, default="O1", choices=["O0", "O1", "O2"],
                        help="mixed precision level, O0 = fp32; O1/O2 autocast to AMP_DTYPE on NPU/GPU, "
                             "and on CPU to bf16 where the CPU has native bf16 (AVX512-BF16, AMX, Arm "
                             "BF16), else fp32 (env SSL_CPU_AMP=fp32|bf16 decides instead)")
    parser.add_argument("--amp-dtype", type=str, choices=AMP_DTYPES,
                        help="(ours) AMP_DTYPE: the NPU/GPU autocast type of O1/O2, fp16 (default, with "
                             "loss scaling) or bf16 (no loss scaling; the remedy for NaN losses in fp16)")
    parser.add_argument("--output", default="output", type=str, metavar="PATH",
                        help="root of output folder, the full path is <output>/<model_name>/<tag>")
    parser.add_argument("--tag", help="tag of experiment")
    parser.add_argument("--eval", action="store_true", help="perform evaluation only")
    parser.add_argument("--throughput", action="store_true", help="test throughput only")
    parser.add_argument("--epochs", type=int, help="training epochs (overrides TRAIN.EPOCHS)")
    add_launcher_args(parser)
    add_device_arg(parser)
    parser.set_defaults(device=None)  # unset: the config's DEVICE (auto by default) decides
    return parser


def add_pretrain_limits(parser: argparse.ArgumentParser) -> None:
    """The Ascend port's flags for short runs, and --compile."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoders (TRAIN.COMPILE; CUDA and CPU, not NPU)")
    parser.add_argument("--steps", type=int,
                        help="stop after this many training iterations (performance runs)")
    parser.add_argument("--max_epochs", type=int,
                        help="stop before this epoch while keeping the TRAIN.EPOCHS-long schedules")
    parser.add_argument("--knn_every", type=int,
                        help="(ours) every N epochs, a quick 20-NN top-1 of the online encoder on fixed "
                             "5,000 train / 1,000 val images (TRAIN.KNN_EVERY; 0: off)")


def parse_config(parser: argparse.ArgumentParser,
                 argv: list[str] | None = None) -> tuple[argparse.Namespace, CfgNode]:
    args = parser.parse_args(argv)
    if args.zip or args.cache_mode:
        raise UserError("--zip and --cache-mode (upstream's zipped-ImageNet reader and its cache) are "
                        "not supported: pass an ImageFolder root with train/ and val/ via --data-path")
    return args, get_config(args)


UPSTREAM_WORKERS = 8  # upstream's DATA.NUM_WORKERS, what -1 means on NPU/GPU


def start_run(config: CfgNode, args: argparse.Namespace, pretraining: bool = False) -> DistContext:
    """Device, process group, data workers and CPU threads, per-rank seed (SEED + rank, as upstream).

    Pretraining resolves AUG.BATCHED (its augmentation is heavy unless batched); the
    evaluations' transforms are light, so on CPU they load in the main process."""
    ctx = init_distributed(config.DEVICE, args.local_rank, args.dist_url)
    batched = pretraining and use_batched(config.AUG.BATCHED, ctx.device_type)
    set_values(config, LOCAL_RANK=ctx.local_rank, **{"AUG.BATCHED": batched})
    layout = resolve_workers(config, ctx.device_type, light_pipeline=batched or not pretraining)
    if ctx.is_main:
        print(layout, flush=True)
    seed_everything(config.SEED + ctx.rank)
    return ctx


def resolve_workers(config: CfgNode, device_type: str, light_pipeline: bool) -> str:
    """DATA.NUM_WORKERS -1 (automatic, the default) becomes a worker count (see
    ssl_runtime.cpu_layout); returns the layout's line for the log."""
    workers, layout = lay_out(config.DATA.NUM_WORKERS, device_type, UPSTREAM_WORKERS, light_pipeline)
    set_values(config, **{"DATA.NUM_WORKERS": workers})
    return layout


def open_output(config: CfgNode, ctx: DistContext) -> logging.Logger:
    """Create the output folder, the logger (log_rank{r}.txt) and, on rank 0, config.json."""
    prepare_output_dir(config.OUTPUT, "--output")
    logger = setup_logger(config.MODEL.NAME, config.OUTPUT, rank=ctx.rank)
    if ctx.is_main:
        path = save_config(config, config.OUTPUT)
        logger.info(f"Full config saved to {path}")
    logger.info(config.dump())
    return logger
