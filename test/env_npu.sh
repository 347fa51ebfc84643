# The Ascend environment, as the Ascend ModelZoo ports set it. Sourced (never run) by
# test/common.sh before anything asks Python which device there is, on every machine: where no
# CANN is installed it does nothing. It can also be sourced by hand: `source test/env_npu.sh`.
#
# CANN's set_env.sh is looked for in this order:
#   1. $CANN_SET_ENV when set (an error when that file does not exist);
#   2. under Install_Path of /etc/Ascend/ascend_cann_install.info, else under /usr/local/Ascend:
#      ascend-toolkit/set_env.sh (when ascend-toolkit/latest exists), cann/set_env.sh (the layout
#      of newer CANN releases), nnae/set_env.sh.
# After sourcing, SSL_ASCEND_SET_ENV holds the file used (empty: no Ascend install found).
# Values you set yourself before are kept.

# Print the set_env.sh to source (nothing when none exists); status 2 when CANN_SET_ENV is wrong.
ssl_find_cann_set_env() {
    if [[ -n ${CANN_SET_ENV:-} ]]; then
        if [[ ! -f $CANN_SET_ENV ]]; then
            echo "error: CANN_SET_ENV=$CANN_SET_ENV does not exist: point it at your CANN set_env.sh" \
                 "(e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh) or unset it" >&2
            return 2
        fi
        echo "$CANN_SET_ENV"
        return 0
    fi
    local info=${SSL_CANN_INSTALL_INFO:-/etc/Ascend/ascend_cann_install.info}
    local root=${SSL_ASCEND_ROOT:-/usr/local/Ascend}
    if [[ -f $info ]]; then
        local from_info
        from_info=$(grep -m1 '^Install_Path=' "$info" | cut -d= -f2-)
        [[ -n $from_info ]] && root=$from_info
    fi
    if [[ -d $root/ascend-toolkit/latest && -f $root/ascend-toolkit/set_env.sh ]]; then
        echo "$root/ascend-toolkit/set_env.sh"
    elif [[ -f $root/cann/set_env.sh ]]; then
        echo "$root/cann/set_env.sh"
    elif [[ -f $root/nnae/set_env.sh ]]; then
        echo "$root/nnae/set_env.sh"
    fi
    return 0
}

# Source CANN's set_env.sh and export the runtime switches; returns 2 when CANN_SET_ENV is wrong.
ssl_source_ascend_env() {
    local set_env
    set_env=$(ssl_find_cann_set_env) || return 2
    SSL_ASCEND_SET_ENV=$set_env
    [[ -n $set_env ]] || return 0
    # shellcheck disable=SC1090
    source "$set_env" || { echo "error: sourcing $set_env failed" >&2; return 2; }

    # Host logs: not to the terminal (0), errors only (3; 0 debug, 1 info, 2 warning); no event logs.
    export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
    export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
    export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
    # The host queues operator launches to the device asynchronously (faster step loop).
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
    # Merge chains of non-contiguous view operations into one device copy.
    export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
    # HCCL may use any network interface (no whitelist); it binds to this host's first address.
    export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
    if [[ -z ${HCCL_IF_IP:-} ]] && command -v hostname >/dev/null 2>&1; then
        HCCL_IF_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
    fi
    export HCCL_IF_IP
    # Not set, unlike the ports' env_npu.sh: PTCOPY_ENABLE, BMMV2_ENABLE, DYNAMIC_OP and
    # SCALAR_TO_HOST_MEM belong to torch_npu 1.x; the 2.x wheels no longer read them. The ports'
    # torch.npu.set_option switches are applied by ssl_runtime/device.py (SSL_NPU_* variables).
    return 0
}

# Device-side logs: errors only, events off (the ports' msnpureport calls), for devices 0-7.
# SSL_MSNPUREPORT=0 skips it (it changes a setting of the devices, not of this shell).
ssl_quiet_device_logs() {
    [[ ${SSL_MSNPUREPORT:-1} == 0 ]] && return 0
    command -v msnpureport >/dev/null 2>&1 || return 0
    local device
    for device in 0 1 2 3 4 5 6 7; do
        msnpureport -g error -d "$device" >/dev/null 2>&1
    done
    msnpureport -e disable >/dev/null 2>&1
    return 0
}

# Sourced by hand (not from common.sh, which calls the functions itself): do what the ports' does.
if [[ ${SSL_ENV_NPU_FUNCTIONS_ONLY:-0} != 1 ]]; then
    if ssl_source_ascend_env && [[ -n $SSL_ASCEND_SET_ENV ]]; then
        ssl_quiet_device_logs
    fi
fi
