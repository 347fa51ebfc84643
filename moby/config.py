"""MoBY configuration: every key and default of upstream Transformer-SSL's config.py, in yacs.

A run is described by one YAML file (which may inherit others through BASE), `--opts KEY VALUE`
pairs and a few command-line shortcuts, merged in that order by `update_config`.
Keys we add beyond upstream are marked "(ours)".
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml
from yacs.config import CfgNode as CN

from ssl_runtime.amp import AMP_DTYPES
from ssl_runtime.errors import UserError

_C = CN()

# YAML files this one inherits from, relative to its own folder.
_C.BASE = [""]

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 64  # per process
_C.DATA.DATA_PATH = ""  # ImageFolder root with train/ and val/; empty = the default Fashion-MNIST (ours)
_C.DATA.DATASET = "imagenet"  # any ImageFolder is accepted (upstream: ImageNet only)
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = "bicubic"
_C.DATA.ZIP_MODE = False  # upstream's zip reader: not supported here
_C.DATA.CACHE_MODE = "part"  # upstream's in-memory cache: not supported here
_C.DATA.PIN_MEMORY = True
# (ours) -1: automatic, upstream's 8 on NPU/GPU; on CPU planned with the torch threads
# (ssl_runtime/cpu_layout.py)
_C.DATA.NUM_WORKERS = -1
# (ours) Train on a fixed random subset of at most this many training images (0 = all of them);
# the subset depends on SEED only, so every rank and every evaluation sees the same images.
_C.DATA.MAX_TRAIN_IMAGES = 0
# Number of training images, filled in at run time (upstream adds it on the fly; declared here).
_C.DATA.TRAINING_IMAGES = 0

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = "swin"  # 'moby' for pre-training, 'linear' for linear evaluation
_C.MODEL.NAME = "swin_tiny_patch4_window7_224"
_C.MODEL.RESUME = ""
# (ours) --trust-checkpoint: read checkpoints the safe (weights-only) loader refuses, such as
# upstream's (they hold the yacs config object) or this project's before it wrote plain values,
# with the full unpickler, which runs any code the file carries. Only for files you trust. Set
# from that flag alone: refused in YAML files and --opts.
_C.MODEL.TRUST_CHECKPOINT = False
_C.MODEL.NUM_CLASSES = 1000  # replaced by the dataset's class count
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1

_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.IN_CHANS = 3
_C.MODEL.SWIN.EMBED_DIM = 96
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN.WINDOW_SIZE = 7
_C.MODEL.SWIN.MLP_RATIO = 4.0
_C.MODEL.SWIN.QKV_BIAS = True
_C.MODEL.SWIN.QK_SCALE = None  # only None (head_dim ** -0.5) is supported by timm's Swin
_C.MODEL.SWIN.APE = False  # absolute position embedding: not supported by timm's Swin
_C.MODEL.SWIN.PATCH_NORM = True
# Norm before the MLP in every Swin block: 'ln' or 'bn' (honoured here, see moby/backbones.py).
_C.MODEL.SWIN.NORM_BEFORE_MLP = "ln"

# (ours) The DeiT / ViT encoder; upstream hard-codes timm's deit_small_patch16_224 (these defaults).
_C.MODEL.DEIT = CN()
_C.MODEL.DEIT.PATCH_SIZE = 16
_C.MODEL.DEIT.IN_CHANS = 3
_C.MODEL.DEIT.EMBED_DIM = 384
_C.MODEL.DEIT.DEPTH = 12
_C.MODEL.DEIT.NUM_HEADS = 6
_C.MODEL.DEIT.MLP_RATIO = 4.0
_C.MODEL.DEIT.QKV_BIAS = True

_C.MODEL.MOBY = CN()
_C.MODEL.MOBY.ENCODER = "swin"  # 'swin' or 'deit_small' (any 'deit*' / 'vit*' uses MODEL.DEIT)
_C.MODEL.MOBY.ONLINE_DROP_PATH_RATE = 0.1
_C.MODEL.MOBY.TARGET_DROP_PATH_RATE = 0.0
_C.MODEL.MOBY.CONTRAST_MOMENTUM = 0.99
_C.MODEL.MOBY.CONTRAST_TEMPERATURE = 0.2
_C.MODEL.MOBY.CONTRAST_NUM_NEGATIVE = 4096
_C.MODEL.MOBY.PROJ_NUM_LAYERS = 2
_C.MODEL.MOBY.PRED_NUM_LAYERS = 2

# ----------------------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 0
# (ours) Pre-training only: True accumulates the gradients of ACCUMULATION_STEPS iterations into
# one optimizer step. False (upstream's moby_main.py) steps every iteration; ACCUMULATION_STEPS then
# only multiplies the learning rates. Linear evaluation always accumulates (moby_linear.py does).
_C.TRAIN.REAL_ACCUMULATION = False
# (ours) A NaN/inf loss stops the run (the last checkpoint is kept). True skips the optimizer step
# of such an iteration instead and goes on, as upstream does under apex mixed precision (its
# dynamic loss scaler skips steps whose gradients overflow); skipped steps are logged.
_C.TRAIN.SKIP_NON_FINITE = False
_C.TRAIN.USE_CHECKPOINT = False
# (ours, Ascend --steps) stop after this many optimizer steps; 0 = no limit.
_C.TRAIN.STEPS = 0
# (ours, Ascend --max_epochs) stop before this epoch while keeping the EPOCHS-long schedule; 0 = off.
_C.TRAIN.MAX_EPOCHS = 0
# (ours) torch.compile the online and target encoders (CUDA, CPU; ignored on NPU).
_C.TRAIN.COMPILE = False
# (ours) also save checkpoint.pth every this many iterations inside an epoch, so an interrupted
# run loses at most that many; 0 = only at epoch ends (upstream).
_C.TRAIN.SAVE_STEPS = 0
# (ours) every this many epochs, a quick 20-NN top-1 of the online encoder on fixed 5,000 train /
# 1,000 val images (ssl_runtime.knn.KnnProbe), to see the features improve during pre-training; 0 = off.
_C.TRAIN.KNN_EVERY = 0

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"  # 'cosine', 'linear' or 'step'
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # step scheduler only
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # step scheduler only

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# ----------------------------------------------------------------------------- linear evaluation
_C.LINEAR_EVAL = CN()
_C.LINEAR_EVAL.PRETRAINED = ""
# (ours) upstream moby_linear.py hard-codes 100 epochs with 5 warm-up epochs; small runs change these.
_C.LINEAR_EVAL.EPOCHS = 100
_C.LINEAR_EVAL.WARMUP_EPOCHS = 5

# ----------------------------------------------------------------------------- augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = "batch"
_C.AUG.SSL_AUG = False  # the two-view MoBY augmentation
_C.AUG.SSL_AUG_TYPE = "byol"
_C.AUG.SSL_AUG_CROP = 0.08  # smallest RandomResizedCrop scale
_C.AUG.SSL_LINEAR_AUG = False  # crop + flip only, for linear evaluation
# (ours) the two views' colour steps on whole batches where the model runs (ssl_runtime.augment):
# None (automatic) means True on CPU, False on NPU/GPU
_C.AUG.BATCHED = None

# ----------------------------------------------------------------------------- testing
_C.TEST = CN()
_C.TEST.CROP = True

# ----------------------------------------------------------------------------- misc
_C.AMP_OPT_LEVEL = ""  # 'O0' (fp32), 'O1', 'O2'; set from --amp-opt-level
# (ours) the autocast type of O1/O2 on NPU/GPU: 'fp16' (upstream's apex fp16, with loss scaling) or
# 'bf16' (no loss scaling; the remedy for NaN losses under fp16). On CPU mixed precision means bf16
# where the CPU has native bf16, else fp32 (SSL_CPU_AMP=fp32|bf16 decides instead): ssl_runtime.amp.
_C.AMP_DTYPE = "fp16"
_C.OUTPUT = ""
_C.TAG = "default"
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0
# (ours) accelerator: auto, npu, cuda or cpu.
_C.DEVICE = "auto"
# (ours) TensorBoard scalars in OUTPUT/tensorboard on rank 0 (when the tensorboard package is installed).
_C.TENSORBOARD = True


def default_config() -> CN:
    """A fresh copy of the defaults (the module-level tree is never modified)."""
    return _C.clone()


def _explain_merge_error(exc: Exception, source: str) -> UserError:
    """Turn yacs' KeyError / ValueError / AssertionError into one line the user can act on."""
    text = str(exc.args[0] if exc.args else exc)
    if text.startswith("Non-existent"):  # yacs: "Non-existent config key: X" / "Non-existent key: X"
        key = text.split(":", 1)[1].strip()
        return UserError(f"unknown config key {key} in {source}: check its spelling against "
                         "moby/config.py (keys are upper case, e.g. TRAIN.EPOCHS)")
    return UserError(f"bad config value in {source}: {text}")


TRUST_KEY = "MODEL.TRUST_CHECKPOINT"


def _refuse_trust(source: str) -> UserError:
    """Trust in a checkpoint (the unpickler that runs code) comes from the command line only: a
    config file, possibly inherited or shared, must not be able to switch it on."""
    return UserError(f"{TRUST_KEY} is set in {source}: trusting a checkpoint (reading it with the "
                     "unpickler that runs code stored in it) is a command-line choice only. Remove "
                     "the key and pass --trust-checkpoint for a file you trust")


def merge_yaml(config: CN, cfg_file: str | os.PathLike, _inheriting: tuple[Path, ...] = ()) -> None:
    """Merge a YAML file into config, after the files listed in its BASE (as upstream).
    `_inheriting`: the files whose BASE led here, to name a cycle instead of recursing forever."""
    path = Path(cfg_file)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: pass --cfg configs/<name>.yaml")
    chain = (*_inheriting, path.resolve())
    if path.resolve() in _inheriting:
        raise UserError(f"config file {path} inherits from itself through BASE "
                        f"({' -> '.join(p.name for p in chain)}): remove the cycle")
    try:
        content = yaml.safe_load(path.read_bytes().decode("utf-8-sig")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                        f"offset {exc.start}): save it with UTF-8 encoding") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from exc
    except OSError as exc:
        raise UserError(f"cannot read config file {path} ({exc.strerror or exc})") from None
    if not isinstance(content, dict):
        raise UserError(f"config file {path} must hold a mapping of KEY: value pairs")
    model = content.get("MODEL")
    if isinstance(model, dict) and model.get("TRUST_CHECKPOINT", False) is not False:
        raise _refuse_trust(f"config file {path}")  # (False, as config.json records it, is harmless)
    for base in content.get("BASE", [""]) or []:
        if base:
            merge_yaml(config, path.parent / base, chain)
    config.defrost()
    try:
        config.merge_from_other_cfg(CN(content))
    except (KeyError, ValueError, AssertionError) as exc:
        raise _explain_merge_error(exc, str(path)) from exc


def merge_opts(config: CN, opts: list[str] | None) -> None:
    """Merge `--opts KEY VALUE ...` pairs."""
    if not opts:
        return
    if len(opts) % 2:
        raise UserError(f"--opts needs KEY VALUE pairs, got an odd number of items: {' '.join(opts)}")
    if TRUST_KEY in opts[::2]:
        raise _refuse_trust("--opts")
    config.defrost()
    try:
        config.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as exc:
        raise _explain_merge_error(exc, "--opts") from exc


# argparse attribute -> (config key, value to store or None to store the flag's value)
_CLI_OVERRIDES = (
    ("batch_size", "DATA.BATCH_SIZE"),
    ("data_path", "DATA.DATA_PATH"),
    ("zip", "DATA.ZIP_MODE"),
    ("cache_mode", "DATA.CACHE_MODE"),
    ("resume", "MODEL.RESUME"),
    ("trust_checkpoint", "MODEL.TRUST_CHECKPOINT"),
    ("accumulation_steps", "TRAIN.ACCUMULATION_STEPS"),
    ("use_checkpoint", "TRAIN.USE_CHECKPOINT"),
    ("amp_opt_level", "AMP_OPT_LEVEL"),
    ("amp_dtype", "AMP_DTYPE"),
    ("output", "OUTPUT"),
    ("tag", "TAG"),
    ("eval", "EVAL_MODE"),
    ("throughput", "THROUGHPUT_MODE"),
    ("epochs", "TRAIN.EPOCHS"),
    ("steps", "TRAIN.STEPS"),
    ("max_epochs", "TRAIN.MAX_EPOCHS"),
    ("compile", "TRAIN.COMPILE"),
    ("knn_every", "TRAIN.KNN_EVERY"),
    ("device", "DEVICE"),
)


def _set_key(config: CN, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node[name]
    node[leaf] = value


def update_config(config: CN, args: argparse.Namespace) -> CN:
    """YAML (with BASE), then --opts, then the command-line shortcuts; output = OUTPUT/NAME/TAG."""
    merge_yaml(config, args.cfg)
    merge_opts(config, getattr(args, "opts", None))
    config.defrost()
    for attr, key in _CLI_OVERRIDES:
        value = getattr(args, attr, None)
        # unset flags (None / False) leave the config alone, as upstream; an explicit 0 or a
        # negative number is kept so that check_config can reject e.g. --batch-size 0
        if value is not None and value is not False and value != "":
            _set_key(config, key, value)
    local_rank = getattr(args, "local_rank", None)
    if local_rank is not None:
        config.LOCAL_RANK = max(int(local_rank), 0)
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    check_config(config)
    config.freeze()
    return config


# (key, smallest allowed value, what to pass instead): checked before any data or model is built
_LOWER_BOUNDS = (
    ("TRAIN.EPOCHS", 1, "--epochs N or --opts TRAIN.EPOCHS N with N >= 1"),
    ("DATA.BATCH_SIZE", 1, "--batch-size N with N >= 1"),
    ("DATA.IMG_SIZE", 1, "--opts DATA.IMG_SIZE N"),
    ("DATA.NUM_WORKERS", -1, "--opts DATA.NUM_WORKERS N with N >= 0 (or -1: automatic)"),
    ("DATA.MAX_TRAIN_IMAGES", 0, "0 (all images) or a positive count"),
    ("TRAIN.STEPS", 0, "--steps N with N >= 1 (0: no limit)"),
    ("TRAIN.MAX_EPOCHS", 0, "--max_epochs N with N >= 1 (0: off)"),
    ("TRAIN.WARMUP_EPOCHS", 0, "0 or more epochs"),
    ("TRAIN.ACCUMULATION_STEPS", 0, "--accumulation-steps N with N >= 1"),
    ("TRAIN.SAVE_STEPS", 0, "0 (only at epoch ends) or a positive number of iterations"),
    ("TRAIN.KNN_EVERY", 0, "--knn_every N: 0 (off) or a positive number of epochs"),
    ("TRAIN.BASE_LR", 0, "a positive learning rate"),
    ("TRAIN.CLIP_GRAD", 0, "0 (no clipping) or a positive norm"),
    ("SAVE_FREQ", 1, "--opts SAVE_FREQ N with N >= 1"),
    ("PRINT_FREQ", 1, "--opts PRINT_FREQ N with N >= 1"),
    ("MODEL.MOBY.CONTRAST_NUM_NEGATIVE", 1, "a positive queue size, a multiple of the global batch"),
)


def _get(config: CN, dotted: str):
    node = config
    for name in dotted.split("."):
        node = node[name]
    return node


def check_config(config: CN) -> None:
    """Reject values out of range with the key, the value and the fix, before any expensive work."""
    for key, low, fix in _LOWER_BOUNDS:
        value = _get(config, key)
        if value is None or value < low:
            raise UserError(f"{key} is {value}, must be >= {low}: use {fix}")
    if config.AMP_DTYPE not in AMP_DTYPES:
        raise UserError(f"AMP_DTYPE is {config.AMP_DTYPE!r}: use one of {', '.join(AMP_DTYPES)} "
                        "(--amp-dtype)")
    moby = config.MODEL.MOBY
    if not moby.CONTRAST_TEMPERATURE > 0:
        raise UserError(f"MODEL.MOBY.CONTRAST_TEMPERATURE is {moby.CONTRAST_TEMPERATURE}, must be > 0")
    if not 0 <= moby.CONTRAST_MOMENTUM <= 1:
        raise UserError(f"MODEL.MOBY.CONTRAST_MOMENTUM is {moby.CONTRAST_MOMENTUM}, must be in [0, 1]")
    encoder = moby.ENCODER.lower()
    if encoder == "swin":
        patch_key = "MODEL.SWIN.PATCH_SIZE"
    elif encoder.startswith(("deit", "vit")):
        patch_key = "MODEL.DEIT.PATCH_SIZE"
    else:
        raise UserError(f"unknown MODEL.MOBY.ENCODER {moby.ENCODER!r}: use 'swin' or 'deit_small'")
    patch = _get(config, patch_key)
    if patch <= 0 or config.DATA.IMG_SIZE % patch:
        raise UserError(f"{patch_key} {patch} does not divide DATA.IMG_SIZE {config.DATA.IMG_SIZE}: "
                        "choose an image size that is a multiple of the patch size")


def get_config(args: argparse.Namespace) -> CN:
    return update_config(default_config(), args)


def save_config(config: CN, output_dir: str | os.PathLike) -> Path:
    """Write the merged config as YAML to <output>/config.json (upstream's file name). Trust is a
    choice of the command line, never of a file: the record says False, so that the file can be
    passed back as --cfg (which refuses True)."""
    record = config.clone()
    record.defrost()
    record.MODEL.TRUST_CHECKPOINT = False
    path = Path(output_dir) / "config.json"
    path.write_text(record.dump())
    return path


def config_to_dict(config: CN) -> dict:
    """The config as nested plain dicts, which the safe (weights-only) unpickler reads."""
    return {k: config_to_dict(v) if isinstance(v, CN) else v for k, v in config.items()}


def config_from_checkpoint(stored, source: str) -> CN:
    """The config stored in a checkpoint (a dict: ours; a CfgNode: upstream's and our earlier
    ones; YAML text), merged over today's defaults so that keys added since still get a value."""
    if isinstance(stored, str):
        stored = yaml.safe_load(stored)
    if not isinstance(stored, dict):
        raise UserError(f"{source} stores no config: pass the one it was trained with, "
                        "--cfg configs/<name>.yaml")
    config = default_config()
    try:
        config.merge_from_other_cfg(CN(stored))
    except (KeyError, ValueError, AssertionError) as exc:
        raise _explain_merge_error(exc, source) from exc
    config.MODEL.TRUST_CHECKPOINT = False  # a run made with --trust-checkpoint stores True: not ours
    config.freeze()
    return config


def set_values(config: CN, **dotted_values) -> None:
    """Change a frozen config in one place: set_values(cfg, **{'TRAIN.BASE_LR': 1e-3})."""
    config.defrost()
    for key, value in dotted_values.items():
        _set_key(config, key, value)
    config.freeze()
