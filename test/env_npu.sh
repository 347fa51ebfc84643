# Environment for Ascend NPU runs. test/common.sh sources this file only when the device is npu
# and CANN's set_env.sh exists. Values already set by the user are kept.

# CANN toolkit: library paths, Python paths for the operator compiler, ASCEND_* homes.
CANN_SET_ENV=${CANN_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
if [[ -f $CANN_SET_ENV ]]; then
    # shellcheck disable=SC1090
    source "$CANN_SET_ENV"
else
    echo "warning: $CANN_SET_ENV not found; set CANN_SET_ENV to your CANN set_env.sh" >&2
fi

# Let the host queue operator launches to the device asynchronously (faster step loop).
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
# Use the device's copy engine for non-contiguous tensor copies.
export PTCOPY_ENABLE=${PTCOPY_ENABLE:-1}
# Merge chains of discontiguous view operations into one device operation.
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
# Allow HCCL to use any network interface instead of a configured whitelist.
export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
# The host address HCCL binds to: the first address of this machine.
if [[ -z ${HCCL_IF_IP:-} ]] && command -v hostname >/dev/null 2>&1; then
    HCCL_IF_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
fi
export HCCL_IF_IP
# CANN log level: 3 = errors only (0 debug, 1 info, 2 warning).
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
# Use the second-generation batched matmul kernels (faster attention on Ascend 910).
export BMMV2_ENABLE=${BMMV2_ENABLE:-1}
