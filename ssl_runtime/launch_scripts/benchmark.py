"""Training-step and data-pipeline benchmark of DINO and MoBY (dino/benchmark.py, moby/benchmark.py)
on a set of named configurations, each in its own process (so peak memory is per configuration).
Prints one line per figure and writes test/output/benchmark/<name>.json.

  bash test/benchmark.sh                       # the small CPU configurations (minutes on 2 cores)
  bash test/benchmark.sh --configs="a b c d"   # the upstream comparison set (about 10 minutes)
  bash test/benchmark.sh --configs="b d"           # fp32 and the automatic precision side by side
  bash test/benchmark.sh --configs=vits16 --device=cuda --precision=fp16,bf16 --compile --steps=50

Configurations (batch per device; --batch_size= overrides):
  dino_cpu  DINO vit_pico/4, 2x32 + 2x16, out_dim 4096, BN head, batch 64 (the CPU recipe)
  moby_cpu  MoBY Swin 32 px (configs/moby_swin_cpu.yaml: queue 256), batch 64
  a         DINO vit_small/16, 2x224 + 2x96, out_dim 65536, batch 8
  b         DINO vit_tiny/4, 2x32 + 6x16, out_dim 4096, batch 64
  c         MoBY Swin-T 224, queue 4096, batch 8
  d         MoBY Swin 32 px, patch 2, window 4, C48, depths 2-2-2, queue 4096, batch 64
  vits16    DINO vit_small/16, 2x224 + 10x96 (upstream's full recipe), batch 64
  swin_t    MoBY Swin-T 224 (configs/moby_swin_tiny.yaml), batch 64
Every configuration times its step once per precision: --precision=LIST (default fp32,auto;
  from fp32, auto, bf16, fp16). auto is the mixed precision a training run uses on the device
  (CPU: bf16 where the CPU has native bf16, else fp32; NPU/GPU: fp16). --amp is --precision=auto.
Other flags: --device=auto|cpu|cuda|npu  --steps=N (timed steps, default 10)  --warmup=N (3)
  --workers="0 2" (data-pipeline worker counts; default: 0 and the run's own; none: skip)
  --compile  --output=DIR  --dry_run
Any other flag goes to every benchmark program as it is (e.g. a flag of dino/benchmark.py and
moby/benchmark.py), which stops with its own message when it does not know it.

    python -m ssl_runtime.launch_scripts.benchmark [flags]     (test/benchmark.sh runs this)
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import REPO

DINO_CPU = ("--arch vit_pico --patch_size 4 --img_size 32 --local_crop_size 16 --local_crops_number 2 "
            "--out_dim 4096 --use_bn_in_head true")
CONFIGS = {  # name: (program, its flags)
    "dino_cpu": ("dino/benchmark.py", DINO_CPU),
    "a": ("dino/benchmark.py", "--arch vit_small --patch_size 16 --local_crops_number 2 --out_dim 65536 "
                               "--num_workers 2"),
    "b": ("dino/benchmark.py", "--arch vit_tiny --patch_size 4 --img_size 32 --local_crop_size 16 "
                               "--local_crops_number 6 --out_dim 4096 --num_workers 2"),
    "vits16": ("dino/benchmark.py", "--arch vit_small --patch_size 16 --local_crops_number 10"),
    "moby_cpu": ("moby/benchmark.py", "--cfg configs/moby_swin_cpu.yaml"),
    # upstream's 4096 keys (the CPU recipe keeps 256), as the upstream comparison was timed
    "d": ("moby/benchmark.py", "--cfg configs/moby_swin_cpu.yaml --opts MODEL.MOBY.CONTRAST_NUM_NEGATIVE 4096"),
    "c": ("moby/benchmark.py", "--cfg configs/moby_swin_tiny.yaml --opts DATA.NUM_WORKERS 2"),
    "swin_t": ("moby/benchmark.py", "--cfg configs/moby_swin_tiny.yaml"),
}
SMALL_BATCH = {"a": 8, "c": 8}  # the others: 64


@dataclass
class Options:
    configs: list[str] = field(default_factory=lambda: ["dino_cpu", "moby_cpu"])
    device: str = "auto"
    steps: str = "10"
    warmup: str = "3"
    workers: str = ""
    batch_size: str = ""
    output: Path = field(default_factory=lambda: Path(os.environ.get("SSL_TEST_OUTPUT") or REPO / "test" / "output")
                         / "benchmark")
    precision: str = ""  # the programs' default (fp32,auto) when empty
    compile: bool = False
    dry_run: bool = False
    passed_on: list[str] = field(default_factory=list)


class BadFlag(Exception):
    pass


def parse(argv: list[str]) -> Options:
    o = Options()
    for arg in argv:
        name, has_value, value = arg.partition("=")
        if has_value and name in ("--configs", "--device", "--steps", "--warmup", "--workers", "--batch_size",
                                  "--precision"):
            setattr(o, name[2:], value.split() if name == "--configs" else value)
        elif has_value and name == "--output":
            o.output = Path(value)
        elif arg == "--amp":  # earlier versions' switch: the mixed precision a run would use
            o.precision = "auto"
        elif arg in ("--compile", "--dry_run"):
            setattr(o, arg[2:], True)
        else:
            o.passed_on.append(arg)
    unknown = [name for name in o.configs if name not in CONFIGS]
    if unknown:
        raise BadFlag(f"unknown configuration '{unknown[0]}' (see --help)")
    if not (o.steps.isdigit() and int(o.steps) > 0):
        raise BadFlag(f"--steps must be a positive integer, got '{o.steps}'")
    return o


def command(o: Options, name: str) -> list[str]:
    """The benchmark program of a configuration with its flags (without the interpreter)."""
    program, flags = CONFIGS[name]
    batch = o.batch_size or str(SMALL_BATCH.get(name, 64))
    # the precision is --bench_precision's (the programs' own default: fp32 and auto side by side)
    precision = ["--bench_precision", o.precision] if o.precision else []
    if program.startswith("dino/"):
        common = ["--compile", str(o.compile).lower()]
        batch_flag = ["--batch_size_per_gpu", batch]
    else:
        common = ["--compile"] if o.compile else []
        batch_flag = ["--batch-size", batch]
    workers = [] if not o.workers else ["--bench_workers"] + ([] if o.workers == "none" else o.workers.split())
    return [program, *flags.split(), *common, *batch_flag, "--device", o.device, "--bench_steps", o.steps,
            "--bench_warmup", o.warmup, "--bench_name", name, "--bench_json", str(o.output / f"{name}.json"),
            *precision, *workers, *o.passed_on]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.split("\n\n    python -m")[0])
        return
    try:
        o = parse(argv)
    except BadFlag as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not o.dry_run:
        o.output.mkdir(parents=True, exist_ok=True)
    status = 0
    for name in o.configs:
        words = command(o, name)
        if o.dry_run:
            print("python " + " ".join(words))
            continue
        done = subprocess.run([os.environ.get("SSL_PYTHON") or sys.executable, "-u", *words], cwd=REPO)
        status = done.returncode or status
    raise SystemExit(status)


if __name__ == "__main__":
    main()
