#!/usr/bin/env bash
# k-NN evaluation of a checkpoint: --checkpoint=FILE --model=dino|moby [--nproc=N].
# Flags: run with --help (or see docs/launch.md). Example: bash test/eval_knn.sh --device=cpu --model=moby
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ssl_main eval_knn 1 "$@"
