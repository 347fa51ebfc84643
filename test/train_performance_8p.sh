#!/usr/bin/env bash
# Performance run on 8 devices (--nproc=N for another count): a fixed number of
# pretraining steps (--steps=N); prints the result block with FPS.
# Flags: run with --help (or see docs/launch.md). Example: bash test/train_performance_8p.sh --device=cpu --model=moby
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ssl_main perf 8 "$@"
