#!/usr/bin/env bash
# Evaluation on 8 devices (--nproc=N for another count), as a full run ends: DINO k-NN, MoBY linear
# (upstream's recipe: lr 1.0 at a global batch of 512). Evaluates --checkpoint=FILE, by default the
# checkpoint of the last train_full_8p.sh run; prints Final Train Accuracy.
# Flags: run with --help (or see docs/launch.md). Example: bash test/eval_8p.sh --model=moby --data_path=/imagenet
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ssl_main eval 8 "$@"
