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
exec "$SSL_PYTHON" -m pytest -q -p no:cacheprovider "$@"
