# Picks the Python interpreter that the launch scripts (test/*.sh) and tests/run.sh run with.
# Sourced, not run:
#
#   source test/setup_env.sh
#   ssl_setup_env || exit 1      # sets and exports SSL_PYTHON
#
# The choice, in order:
#   1. SSL_PYTHON, when it is already set: used as it is.
#   2. SSL_NO_VENV=1: python3 from PATH; the user manages the packages.
#   3. python3 from PATH, when it has torch (for example an Ascend environment with torch_npu, a
#      conda environment or an activated virtual environment). Its torch is never replaced: when it
#      lacks torchvision, timm or yacs, the scripts stop and print the pip command that adds them
#      while keeping its torch (python3 -m ssl_runtime prints it too).
#   4. Otherwise the repository's .venv: created and filled from requirements.txt when it is
#      missing or when requirements.txt changed since the last install. A stamp file holding the
#      hash of requirements.txt makes this check instant once the environment is in place.

SSL_ENV_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SSL_REQUIRED_MODULES=(torch torchvision timm yacs)

# True when the interpreter $1 can find every module named after it (found, not imported:
# importing torch takes seconds).
ssl_python_has_modules() {
    local python=$1
    shift
    "$python" - "$@" >/dev/null 2>&1 <<'EOF'
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(name) is None for name in sys.argv[1:]))
EOF
}

ssl_python_has_requirements() {
    ssl_python_has_modules "$1" "${SSL_REQUIRED_MODULES[@]}"
}

ssl_file_hash() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
    fi
}

# Make sure <repo>/.venv exists and holds requirements.txt; prints nothing when it already does.
ssl_ensure_venv() {
    local repo=$1
    local venv=$repo/.venv requirements=$repo/requirements.txt
    local stamp=$venv/.requirements.sha256
    local wanted
    wanted=$(ssl_file_hash "$requirements") || return 1
    if [[ -x $venv/bin/python && -f $stamp && $(<"$stamp") == "$wanted" ]]; then
        return 0
    fi
    if [[ ! -x $venv/bin/python ]]; then
        echo "setup: creating the virtual environment $venv" >&2
        if ! python3 -m venv "$venv"; then
            echo "error: could not create $venv: install python3-venv, or set SSL_NO_VENV=1 to use" \
                 "the current Python environment" >&2
            return 1
        fi
    fi
    echo "setup: installing $requirements into $venv (only when it changes)" >&2
    if ! "$venv/bin/python" -m pip install -r "$requirements" >&2; then
        echo "error: 'pip install -r $requirements' failed in $venv; fix the message above, or set" \
             "SSL_NO_VENV=1 to use the current Python environment" >&2
        return 1
    fi
    echo "$wanted" >"$stamp"
}

# Choose the interpreter (see the top of this file); exports SSL_PYTHON.
ssl_setup_env() {
    local repo=${1:-$SSL_ENV_REPO}
    if [[ -n ${SSL_PYTHON:-} ]]; then
        :
    elif [[ ${SSL_NO_VENV:-0} == 1 ]]; then
        SSL_PYTHON=$(command -v python3) || { echo "error: python3 is not on PATH" >&2; return 1; }
    elif ssl_python_has_modules python3 torch; then
        SSL_PYTHON=$(command -v python3)
        if ! ssl_python_has_requirements "$SSL_PYTHON"; then
            # prints what is missing and the pip command that keeps this torch
            (cd "$repo" && PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} "$SSL_PYTHON" -m ssl_runtime >/dev/null)
            return 1
        fi
    else
        ssl_ensure_venv "$repo" || return 1
        SSL_PYTHON=$repo/.venv/bin/python
        PATH=$repo/.venv/bin:$PATH
        export PATH
    fi
    export SSL_PYTHON
}

# The interpreter of a dry run or of --help (nothing is installed for them): SSL_PYTHON, else the
# repository's .venv when it exists, else python3 from PATH; exports SSL_PYTHON.
ssl_preview_python() {
    local repo=${1:-$SSL_ENV_REPO}
    if [[ -z ${SSL_PYTHON:-} ]]; then
        SSL_PYTHON=$(command -v python3)
        [[ -x $repo/.venv/bin/python ]] && SSL_PYTHON=$repo/.venv/bin/python
    fi
    export SSL_PYTHON
}

# Make sure the IDX files of the default dataset (Debian package dataset-fashion-mnist) are
# there; as root with apt-get, install the package when they are not. Returns 1 when they are
# missing and could not be installed (tests that need them are then skipped).
ssl_fashion_mnist_present() {
    local dir=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist} name
    for name in train-images-idx3 train-labels-idx1 t10k-images-idx3 t10k-labels-idx1; do
        [[ -f $dir/$name-ubyte.gz ]] || return 1
    done
}

ssl_ensure_dataset() {
    ssl_fashion_mnist_present && return 0
    local default_dir=/usr/share/datasets/fashion-mnist
    # The package can only help when the files are looked for where it puts them.
    if [[ ${FASHION_MNIST_DIR:-$default_dir} == "$default_dir" && $(id -u) == 0 ]] &&
        command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing the Debian package dataset-fashion-mnist" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q dataset-fashion-mnist >&2 ||
            { apt-get update -q >&2 && apt-get install -y -q dataset-fashion-mnist >&2; }
        ssl_fashion_mnist_present && return 0
    fi
    echo "note: Fashion-MNIST not found in ${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}:" \
         "install it with 'sudo apt-get install dataset-fashion-mnist'" >&2
    return 1
}
