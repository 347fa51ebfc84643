#!/usr/bin/env bash
# Run the test suite. Sets up what is missing first (virtual environment with requirements.txt,
# the Fashion-MNIST Debian package) and is quick when everything is in place.
#   bash tests/run.sh              # whole suite, slow end-to-end tests included
#   bash tests/run.sh -m "not slow" # the quick part only
#   bash tests/run.sh tests/test_runtime_knn.py -k weights
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
# shellcheck source=test/setup_env.sh
source test/setup_env.sh
ssl_setup_env || exit 1
ssl_ensure_dataset || echo "note: tests that need the real Fashion-MNIST files are skipped" >&2
# The emulated NPU of tests/doubles is a C++ extension built on first use: it needs c++ and ninja.
if ! command -v c++ >/dev/null 2>&1 || ! command -v ninja >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing g++ and ninja-build (the emulated NPU of tests/doubles is built with them)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++ ninja-build >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++ ninja-build >&2; }
    else
        echo "note: the emulated NPU needs a C++ compiler and ninja (apt-get install g++ ninja-build)" >&2
    fi
fi
exec "$SSL_PYTHON" -m pytest -q -p no:cacheprovider "$@"
