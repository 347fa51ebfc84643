#!/usr/bin/env bash
# Full training on one device: pretrain, then evaluate (DINO: k-NN, MoBY: linear);
# prints the result block with FPS and accuracy.
# Flags: run with --help (or see docs/launch.md). Example: bash test/train_full_1p.sh --device=cpu --model=moby
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ssl_main full 1 "$@"
