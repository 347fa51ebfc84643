#!/usr/bin/env bash
# Linear evaluation of a checkpoint: --checkpoint=FILE --model=dino|moby [--nproc=N].
# Flags: run with --help (or see docs/launch.md). Example: bash test/eval_linear.sh --device=cpu --model=moby
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ssl_main eval_linear 1 "$@"
