# The shell part of the Ascend-ModelZoo-style launch scripts in test/. Sourced, never run:
#
#     source test/common.sh;  ssl_main <mode> <default processes per node> "$@"
#
#   mode full        pretrain, then evaluate (DINO: k-NN; MoBY: linear); accuracy case (_acc)
#   mode perf        pretrain for a fixed number of steps or epochs; performance case (_perf)
#   mode eval        the evaluation of a full run (DINO: k-NN; MoBY: linear) of --checkpoint=,
#                    by default of the last train_full run with the same number of devices
#   mode eval_knn    k-NN evaluation of a DINO or MoBY checkpoint given with --checkpoint=
#   mode eval_linear linear evaluation of a DINO or MoBY checkpoint given with --checkpoint=
#
# Only what has to happen in the shell before Python starts lives here: the conda environment of
# --conda_name, the Ascend environment (test/env_npu.sh sources CANN's set_env.sh, without which
# torch_npu does not import) and the choice of interpreter (test/setup_env.sh). Everything else
# (flags, device, recipes, the files under test/output/ID/, resuming a rerun, the stages and the
# result block) is ssl_runtime/launch_scripts, run as `python -m ssl_runtime.launch_scripts`.
# Flags: --help, or docs/launch.md.

SSL_TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SSL_REPO=$(dirname "$SSL_TEST_DIR")
# shellcheck source=test/setup_env.sh
source "$SSL_TEST_DIR/setup_env.sh"

ssl_note() {
    echo "note: $*" >&2
}

# The value of --$1= among the other arguments (the last one wins; empty when absent).
ssl_flag_value() {
    local name=$1 arg value=''
    shift
    for arg in "$@"; do
        [[ $arg == "--$name="* ]] && value=${arg#*=}
    done
    echo "$value"
}

# True when one of the other arguments is exactly $1.
ssl_has_flag() {
    local flag=$1 arg
    shift
    for arg in "$@"; do
        [[ $arg == "$flag" ]] && return 0
    done
    return 1
}

ssl_activate_conda() {
    local name=$1
    [[ -n $name ]] || return 0
    if ! command -v conda >/dev/null 2>&1; then
        ssl_note "conda not found: --conda_name=$name ignored"
        return 0
    fi
    eval "$(conda shell.bash hook)" && conda activate "$name" ||
        { echo "error: could not activate the conda environment '$name'" >&2; exit 2; }
}

# The Ascend environment, before anything asks Python about devices: torch_npu only imports
# with CANN's libraries on the paths that set_env.sh sets. Nothing happens where CANN is absent.
ssl_source_ascend() {
    SSL_ENV_NPU_FUNCTIONS_ONLY=1
    # shellcheck source=test/env_npu.sh
    source "$SSL_TEST_DIR/env_npu.sh"
    ssl_source_ascend_env || exit 2
    [[ -n $SSL_ASCEND_SET_ENV ]] && echo "Ascend environment: $SSL_ASCEND_SET_ENV" >&2
    return 0
}

# The whole script: ssl_main <mode> <default number of processes per node> "$@".
ssl_main() {
    local mode=$1 default_nproc=$2 preview=0 device
    shift 2
    if ssl_has_flag --dry_run "$@" || ssl_has_flag --help "$@" || ssl_has_flag -h "$@"; then
        preview=1
    fi
    ((preview)) || ssl_activate_conda "$(ssl_flag_value conda_name "$@")"
    ssl_source_ascend
    if ((preview)); then
        ssl_preview_python "$SSL_REPO"
    else
        ssl_setup_env "$SSL_REPO" || exit 1
    fi
    # The Ascend ports' device-side log settings (msnpureport), unless another device was asked for.
    device=$(ssl_flag_value device "$@")
    if ((!preview)) && [[ -n $SSL_ASCEND_SET_ENV && $device != cpu && $device != cuda ]]; then
        ssl_quiet_device_logs
    fi
    export PYTHONPATH=$SSL_REPO${PYTHONPATH:+:$PYTHONPATH}
    exec "$SSL_PYTHON" -m ssl_runtime.launch_scripts "$mode" "$default_nproc" "$@"
}
