#!/usr/bin/env bash
# Full training on 2 nodes x 8 devices: run it on both nodes with the same flags and
#   MASTER_ADDR=<address of node 0> NODE_RANK=0 (node 0) or 1 (node 1) [MASTER_PORT=29680].
# torchrun's rendezvous joins the nodes; node 0 then evaluates on its 8 devices (DINO: k-NN,
# MoBY: linear) and prints the result block. MoBY runs 64 images per device, as the Ascend port.
# Flags: run with --help (or see docs/launch.md) (--nproc=N devices per node, --nnodes=N nodes).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ssl_main full 8 --nnodes=2 "$@"
