#!/usr/bin/env bash
# Training-step and data-pipeline benchmark of DINO and MoBY on a set of named configurations:
#   bash test/benchmark.sh                       # the small CPU configurations
#   bash test/benchmark.sh --configs="a b c d"   # the upstream comparison set
# Flags and configurations: --help (ssl_runtime/launch_scripts/benchmark.py); flags it does not
# know go to every benchmark program as they are.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for arg in "$@"; do
    [[ $arg == --dry_run || $arg == --help || $arg == -h ]] && SSL_PREVIEW=1
done
if [[ ${SSL_PREVIEW:-0} == 1 ]]; then ssl_preview_python "$REPO"; else ssl_setup_env "$REPO" || exit 1; fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
exec "$SSL_PYTHON" -m ssl_runtime.launch_scripts.benchmark "$@"
