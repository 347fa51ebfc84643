# Shared logic of the Ascend-ModelZoo-style launch scripts in test/. Sourced, never run.
#
# Every script is a short wrapper:   source test/common.sh;  ssl_main <mode> <nproc> "$@"
#   mode full        pretrain, then evaluate (DINO: k-NN; MoBY: linear); accuracy case (_acc)
#   mode perf        pretrain for a fixed number of steps or epochs; performance case (_perf)
#   mode eval        the evaluation of a full run (DINO: k-NN; MoBY: linear) of --checkpoint=,
#                    by default of the last train_full run with the same number of devices
#   mode eval_knn    k-NN evaluation of a DINO or MoBY checkpoint given with --checkpoint=
#   mode eval_linear linear evaluation of a DINO or MoBY checkpoint given with --checkpoint=
#
# Order of work: flags; conda; the Ascend environment (test/env_npu.sh: CANN's set_env.sh, when
# CANN is installed); the Python interpreter (test/setup_env.sh); the device, asked from Python
# (ssl_runtime/device.py: an Ascend machine whose torch_npu does not import stops here); commands;
# launch through ssl_runtime/launch.py (the Ascend scripts' per-rank variables, core binding,
# torchrun); the result block and files (ssl_runtime/report.py).
#
# Files, where the Ascend scripts put them (ID = $ASCEND_DEVICE_ID, 0 when unset):
#   test/output/ID/train_ID.log                 pretraining output (rank 0)
#   test/output/ID/test_ID.log (DINO), eval_ID.log (MoBY)   evaluation output
#   test/output/ID/<CaseName>.log               the case file (Network = ..., ActualFPS = ...)
#   test/output/ID/train_<CaseName>_loss.txt    one loss per logged step
#   test/output/ID/<CaseName>/                  checkpoints and the programs' own logs
# with CaseName = <Network>_bs<batch per device>_<devices>p_<acc|perf|...>.
# --dry_run prints the resolved settings and commands without running anything.
# The output folder can be moved with env SSL_TEST_OUTPUT (the tests use this).

SSL_TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SSL_REPO=$(dirname "$SSL_TEST_DIR")
# shellcheck source=test/setup_env.sh
source "$SSL_TEST_DIR/setup_env.sh"

DINO_NETWORK=DINO_ID3436_for_PyTorch
MOBY_NETWORK=Transformer-SSL_ID3434_for_PyTorch
# The evaluation log's name, as each Ascend port writes it: <prefix>_<ID>.log.
DINO_EVAL_LOG="test"
MOBY_EVAL_LOG="eval"

###################################################################################################
# Model-specific settings. The DINO and MoBY trees own the functions and variables of this section:
# edit them when a program's flags or its small CPU configuration change.
###################################################################################################

# Entry points, relative to the repository root (overridable from the environment for tests).
DINO_PRETRAIN=${DINO_PRETRAIN:-dino/main_dino.py}
DINO_EVAL_KNN=${DINO_EVAL_KNN:-dino/eval_knn.py}
DINO_EVAL_LINEAR=${DINO_EVAL_LINEAR:-dino/eval_linear.py}
MOBY_PRETRAIN=${MOBY_PRETRAIN:-moby/main_moby.py}
MOBY_LINEAR=${MOBY_LINEAR:-moby/main_linear.py}
MOBY_EVAL_KNN=${MOBY_EVAL_KNN:-moby/eval_knn.py}

# DINO pretraining flags on CPU: a 2-block ViT (dim 96) on 32-px crops of Fashion-MNIST. BN in the
# head and lr 1e-3 (per 256 images) make this small model learn within a few epochs (upstream's
# ViT-S settings barely move it in that time). The teacher's EMA follows the run's length: upstream's
# 0.996 (a time constant of 250 steps) suits 125,000 steps; over the ~800 steps of an epoch here it
# would leave the teacher with ~30 % of its random start, so these runs use 0.99 (100 steps). A
# 1-epoch run (the default, ~9 min on 2 cores with the evaluation) trains on a fixed 50,000-image
# subset and does not freeze the last layer (upstream freezes 1 epoch of 100, not the whole run);
# measured: 10-NN teacher 66.5 % against 56.1 % at random initialisation. --epochs=3 trains on the
# whole split (~25 min; 20-NN teacher ~69.5 %). Warm-up: upstream's ratio (10 of 100 epochs), at
# least 1 epoch when there are several.
dino_small_cpu_args() {
    local warmup=$((EPOCHS / 10)) subset=0 freeze=1
    if ((EPOCHS > 1 && warmup == 0)); then warmup=1; fi
    if ((EPOCHS == 1)); then subset=50000 freeze=0; fi
    echo "--arch vit_pico --patch_size 4 --img_size 32 --local_crop_size 16 --local_crops_number 2" \
         "--out_dim 4096 --use_bn_in_head true --lr 1e-3 --momentum_teacher 0.99" \
         "--max_train_images $subset --freeze_last_layer $freeze --warmup_epochs $warmup"
}
# The matching architecture flags for dino/eval_knn.py and dino/eval_linear.py on CPU.
dino_small_cpu_eval_args() {
    echo "--arch vit_pico --patch_size 4 --img_size 32"
}
# The evaluation of a full run and of test/eval_*.sh: upstream's k-NN protocol.
dino_default_eval() {
    echo eval_knn
}
# DINO on NPU/GPU: upstream's ViT-S/16 recipe (main_dino.py's defaults).
dino_full_args() {
    echo "--arch vit_small --patch_size 16"
}
dino_full_eval_args() {
    echo "--arch vit_small --patch_size 16"
}
# Default batch size per device, epochs and performance-run steps: $1 = cpu|accelerator.
dino_defaults() {
    if [[ $1 == cpu ]]; then
        DEFAULT_BATCH_SIZE=64 DEFAULT_EPOCHS=1 DEFAULT_STEPS=20
    else
        DEFAULT_BATCH_SIZE=64 DEFAULT_EPOCHS=100 DEFAULT_STEPS=200
    fi
}

# MoBY configurations (yacs YAML) on CPU and on NPU/GPU. The CPU one is a 32-px Swin that trains
# on a fixed 28,000-image subset, so that a full run (pretraining, then k-NN) takes under 10
# minutes; the head of configs/moby_swin_cpu.yaml gives its recipe and the whole train split.
moby_small_cpu_cfg() {
    echo configs/moby_swin_cpu.yaml
}
moby_full_cfg() {
    echo configs/moby_swin_tiny.yaml
}
# The evaluation of a full run ($1 = full) or of test/eval_*.sh ($1 = eval): on NPU/GPU upstream's
# linear evaluation; a CPU full run uses the k-NN protocol (moby/eval_knn.py, as DINO's: weighted
# 10/20-NN, T = 0.07, the full 60k/10k split), because one linear epoch, all a CPU run can afford,
# measures the linear head's training more than the encoder.
moby_default_eval() {
    if [[ $1 == full && $DEVICE == cpu ]]; then echo eval_knn; else echo eval_linear; fi
}
moby_knn_eval_args() {  # the whole train split, whatever subset pretraining used
    echo "--opts DATA.MAX_TRAIN_IMAGES 0"
}
# The linear-evaluation config of a pretraining config: foo.yaml -> foo_linear.yaml when it exists.
moby_linear_cfg() {
    local cfg=$1
    local linear=${cfg%.yaml}_linear.yaml
    if [[ $cfg != *_linear.yaml && -f $linear ]]; then echo "$linear"; else echo "$cfg"; fi
}
# How --epochs=E reaches MoBY. On NPU/GPU, as the Ascend port does, --max_epochs stops training
# after E epochs while the schedules keep the YAML's length (300 epochs for Swin-T). On CPU the
# runs are short, so the schedules are fitted to the E epochs instead (--epochs).
moby_epochs_args() {
    if [[ $DEVICE == cpu ]]; then echo "--epochs $1"; else echo "--max_epochs $1"; fi
}
moby_defaults() {
    if [[ $1 == cpu ]]; then
        DEFAULT_BATCH_SIZE=64 DEFAULT_EPOCHS=1 DEFAULT_STEPS=20
    else
        DEFAULT_BATCH_SIZE=128 DEFAULT_EPOCHS=100 DEFAULT_STEPS=150
    fi
}
# Performance runs follow the Ascend ports' schedules, so that their losses compare with the ports'
# logs. DINO: one epoch without warm-up (--warmup_epochs 0), cut after DEFAULT_STEPS steps. MoBY on
# NPU/GPU: one process runs DEFAULT_STEPS steps of the YAML's schedule; several run two whole
# epochs with the schedules fitted to them (--epochs 2, no step limit). MoBY on CPU: DEFAULT_STEPS.
dino_perf_schedule() {
    EPOCHS=${EPOCHS:-1}
    STEPS=${STEPS:-$DEFAULT_STEPS}
}
dino_perf_args() {
    echo "--warmup_epochs 0"
}
moby_perf_schedule() {
    if [[ $DEVICE != cpu ]] && ((WORLD > 1)); then
        EPOCHS=${EPOCHS:-2}
    else
        STEPS=${STEPS:-$DEFAULT_STEPS}
    fi
}
moby_perf_epochs_args() {
    if [[ $DEVICE != cpu ]] && ((WORLD > 1)); then echo "--epochs $1"; else moby_epochs_args "$1"; fi
}
# MoBY's linear-evaluation batch per device on NPU/GPU. Upstream's recipe is lr 1.0 at a global
# batch of 512 (8 GPUs x 64); main_linear.py scales --lr by batch x processes / 512, so keeping the
# global batch at 512 gives upstream's lr of 1.0 whatever the pretraining batch. The evaluation
# runs NPROC processes (on node 0 only in multi-node runs). On CPU: the run's batch.
moby_linear_batch() {
    if [[ $DEVICE == cpu ]]; then
        echo "$BATCH_SIZE"
    elif ((NPROC >= 512)); then
        echo 1
    else
        echo $((512 / NPROC))
    fi
}
# NPU-only flags of the pretraining programs, as the Ascend ports' scripts pass them.
dino_npu_args() {
    echo "--optimizer npufusedadamw --bin $BIN"
}
moby_npu_args() {
    echo "--bin $BIN"
}

# Several nodes (train_full_16p.sh): the MoBY port runs 64 images per device there, the global
# batch of its 8-device run. DINO keeps its batch per device.
moby_multinode_defaults() {
    [[ $1 == cpu ]] || DEFAULT_BATCH_SIZE=64
}
dino_multinode_defaults() {
    :
}

###################################################################################################
# Generic part: arguments, environment, launch, result block.
###################################################################################################

ssl_usage() {
    cat <<'USAGE'
flags (all optional, --name=value):
  --data_path=DIR     ImageFolder root with train/ and val/ (default: Fashion-MNIST, converted on first use)
  --model=dino|moby   which method (default dino)
  --batch_size=N      batch size per device
  --epochs=N          pretraining epochs
  --steps=N           stop pretraining after N steps (performance runs default to the Ascend ports' counts)
  --device=auto|npu|cuda|cpu  accelerator (default auto: npu, then cuda, then cpu; on a machine with
                      CANN, npu or a clear stop when torch_npu does not import)
  --nproc=N           processes (devices) per node (default: 1 for *_1p.sh, 8 for *_8p.sh / *_16p.sh)
  --nnodes=N          nodes (default 1; train_full_16p.sh: 2); several nodes also need
  --node_rank=R       this node's index, 0 on the first node (default: env NODE_RANK, else 0)
  --master_addr=HOST  address of node 0 (default: env MASTER_ADDR)
  --master_port=PORT  port on node 0 (default: env MASTER_PORT, else 29680)
  --cfg=FILE          MoBY YAML config
  --checkpoint=FILE   checkpoint to evaluate (eval_knn.sh, eval_linear.sh; eval_8p.sh: default the
                      last train_full run's)
  --trust_checkpoint  read a --checkpoint the safe loader refuses (an official full checkpoint, an
                      older one of ours) with the full unpickler: only for files you trust
  --bin=True|False    NPU: binary operators (True, the default) or online compilation (False)
  --conda_name=NAME   conda environment to activate first
  --more_path1=       accepted for compatibility with the Ascend scripts, ignored
  --dry_run           print the resolved settings and commands, run nothing
  --help              this text
environment: ASCEND_DEVICE_ID (device of 1-process runs and name of the output folder, default 0),
  CANN_SET_ENV (CANN's set_env.sh), SSL_PYTHON (interpreter), SSL_TEST_OUTPUT (output root)
USAGE
}

ssl_die() {
    echo "error: $*" >&2
    exit 2
}

ssl_note() {
    echo "note: $*" >&2
}

ssl_abspath() {
    if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}

ssl_is_positive_int() {
    [[ $1 =~ ^[0-9]+$ ]] && (($1 > 0))
}

# Parse the flags of a script in mode $1 into MODEL, DATA_PATH, BATCH_SIZE, EPOCHS, STEPS, DEVICE,
# NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, CFG, CHECKPOINT, CONDA_NAME, BIN and DRY_RUN;
# exits with a message on a bad flag.
ssl_parse_args() {
    local mode=$1
    shift
    MODEL=dino DATA_PATH='' BATCH_SIZE='' EPOCHS='' STEPS='' DEVICE=auto NPROC='' NNODES='' CFG=''
    CHECKPOINT='' CONDA_NAME='' DRY_RUN=0 TRUST=0 BIN=True BIN_GIVEN=0
    NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-29680}
    local arg
    for arg in "$@"; do
        case $arg in
            --data_path=*) DATA_PATH=${arg#*=} ;;
            --model=*) MODEL=${arg#*=} ;;
            --batch_size=*) BATCH_SIZE=${arg#*=} ;;
            --epochs=*) EPOCHS=${arg#*=} ;;
            --steps=*) STEPS=${arg#*=} ;;
            --device=*) DEVICE=${arg#*=} ;;
            --nproc=*) NPROC=${arg#*=} ;;
            --nnodes=*) NNODES=${arg#*=} ;;
            --node_rank=*) NODE_RANK=${arg#*=} ;;
            --master_addr=*) MASTER_ADDR=${arg#*=} ;;
            --master_port=*) MASTER_PORT=${arg#*=} ;;
            --cfg=*) CFG=${arg#*=} ;;
            --checkpoint=*) CHECKPOINT=${arg#*=} ;;
            --trust_checkpoint) TRUST=1 ;;
            --conda_name=*) CONDA_NAME=${arg#*=} ;;
            --bin=*) BIN=${arg#*=} BIN_GIVEN=1 ;;
            --more_path1=*) ssl_note "--more_path1 is accepted for compatibility and ignored" ;;
            --dry_run) DRY_RUN=1 ;;
            -h | --help) ssl_usage; exit 0 ;;
            *) ssl_die "unknown argument '$arg'"$'\n'"$(ssl_usage)" ;;
        esac
    done

    [[ $MODEL == dino || $MODEL == moby ]] || ssl_die "--model=$MODEL: choose dino or moby"
    case $DEVICE in auto | npu | cuda | cpu) ;; *) ssl_die "--device=$DEVICE: choose auto, npu, cuda or cpu" ;; esac
    case ${BIN,,} in
        true | 1) BIN=True ;;
        false | 0) BIN=False ;;
        *) ssl_die "--bin=$BIN: use True (binary operators) or False (online compilation)" ;;
    esac
    local name value
    for name in BATCH_SIZE EPOCHS STEPS NPROC NNODES MASTER_PORT; do
        value=${!name}
        if [[ -n $value ]] && ! ssl_is_positive_int "$value"; then
            ssl_die "--$(echo "$name" | tr 'A-Z' 'a-z')=$value: expected a positive whole number"
        fi
    done
    [[ $NODE_RANK =~ ^[0-9]+$ ]] || ssl_die "--node_rank=$NODE_RANK (or NODE_RANK): expected 0, 1, ..."
    [[ ${ASCEND_DEVICE_ID:-0} =~ ^[0-9]+$ ]] ||
        ssl_die "ASCEND_DEVICE_ID=$ASCEND_DEVICE_ID is not a device number: e.g. ASCEND_DEVICE_ID=0"
    if [[ -n $DATA_PATH ]]; then
        [[ -d $DATA_PATH ]] || ssl_die "--data_path=$DATA_PATH is not a folder: pass an ImageFolder root" \
            "holding train/ and val/, or leave the flag out to use Fashion-MNIST"
        DATA_PATH=$(ssl_abspath "$DATA_PATH")
    fi
    if [[ -n $CFG ]]; then
        [[ $MODEL == moby ]] || ssl_die "--cfg is a MoBY option: add --model=moby"
        [[ -f $CFG || -f $SSL_REPO/$CFG ]] || ssl_die "--cfg=$CFG: no such file (see configs/)"
        [[ -f $CFG ]] && CFG=$(ssl_abspath "$CFG")
    fi
    if [[ $mode == eval* ]]; then
        [[ ${NNODES:-1} == 1 ]] || ssl_die "evaluation runs on one node: leave --nnodes out"
        [[ -n $CHECKPOINT || $mode == eval ]] ||
            ssl_die "--checkpoint=FILE is required: the checkpoint to evaluate"
        if [[ -n $CHECKPOINT ]]; then
            [[ -f $CHECKPOINT ]] || ssl_die "--checkpoint=$CHECKPOINT: no such file"
            CHECKPOINT=$(ssl_abspath "$CHECKPOINT")
        fi
    elif [[ -n $CHECKPOINT || $TRUST == 1 ]]; then
        ssl_die "--checkpoint is for eval_knn.sh, eval_linear.sh and eval_8p.sh (--trust_checkpoint" \
            "too); training scripts start from scratch"
    fi
}

ssl_activate_conda() {
    [[ -n $CONDA_NAME ]] || return 0
    if ! command -v conda >/dev/null 2>&1; then
        ssl_note "conda not found: --conda_name=$CONDA_NAME ignored"
        return 0
    fi
    eval "$(conda shell.bash hook)" && conda activate "$CONDA_NAME" ||
        ssl_die "could not activate the conda environment '$CONDA_NAME'"
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

# Print npu, cuda or cpu for the request $1, or stop with ssl_runtime.device's message: an Ascend
# machine whose torch_npu does not import, --device=npu without NPU, --device=cuda without CUDA.
ssl_check_device() {
    local kind status
    kind=$(cd "$SSL_REPO" && PYTHONPATH=$SSL_REPO${PYTHONPATH:+:$PYTHONPATH} \
        "$SSL_PYTHON" -m ssl_runtime.device --device "$1")
    status=$?
    if ((status != 0)); then
        ((status == 2)) || echo "error: $SSL_PYTHON could not tell the device (exit $status); see above" >&2
        exit 2
    fi
    echo "$kind"
}

# The checkpoint of the newest train_full run with this model and number of devices (eval mode).
ssl_last_full_checkpoint() {
    local inside=checkpoint.pth found
    [[ $MODEL == moby ]] && inside='*/pretrain/checkpoint.pth'
    # shellcheck disable=SC2086,SC2012  # the patterns are meant to expand; newest first
    found=$(ls -t "$LOG_DIR/$NETWORK"_bs*_"$WORLD"p_acc/$inside 2>/dev/null | head -n 1)
    [[ -n $found ]] || ssl_die "no --checkpoint given and no checkpoint of a ${WORLD}-device train_full" \
        "run under $LOG_DIR: run train_full_${WORLD}p.sh first or pass --checkpoint=FILE"
    echo "$found"
}

# Fill in everything the flags left open: device, defaults, names, paths, launcher.
ssl_resolve() {
    local mode=$1 default_nproc=$2
    NPROC=${NPROC:-$default_nproc}
    NNODES=${NNODES:-1}
    WORLD=$((NPROC * NNODES))
    if ((NNODES > 1)); then
        [[ -n $MASTER_ADDR ]] || ssl_die "$NNODES nodes need the address of node 0: set MASTER_ADDR" \
            "(or --master_addr=) on every node, and NODE_RANK=0 on node 0, 1 on node 1, ..."
        ((NODE_RANK < NNODES)) || ssl_die "NODE_RANK=$NODE_RANK is not in 0..$((NNODES - 1))"
    fi
    # An explicit device is checked before anything starts; a dry run only previews it.
    if [[ $DEVICE == auto ]] || { ((!DRY_RUN)) && [[ $DEVICE != cpu ]]; }; then
        DEVICE=$(ssl_check_device "$DEVICE") || exit 2
    fi
    if [[ $DEVICE != npu ]] && ((BIN_GIVEN)); then
        ssl_note "--bin chooses NPU operator binaries: ignored on $DEVICE"
    fi
    local device_class=accelerator
    [[ $DEVICE == cpu ]] && device_class=cpu
    "${MODEL}_defaults" "$device_class"
    ((NNODES > 1)) && "${MODEL}_multinode_defaults" "$device_class"
    # Evaluation-only runs pass these on only when given (the programs' defaults apply otherwise).
    GIVEN_BATCH_SIZE=$BATCH_SIZE GIVEN_EPOCHS=$EPOCHS
    BATCH_SIZE=${BATCH_SIZE:-$DEFAULT_BATCH_SIZE}
    [[ $mode == perf ]] && "${MODEL}_perf_schedule"
    EPOCHS=${EPOCHS:-$DEFAULT_EPOCHS}
    if [[ $MODEL == moby && -z $CFG ]]; then
        if [[ $device_class == cpu ]]; then CFG=$(moby_small_cpu_cfg); else CFG=$(moby_full_cfg); fi
    fi
    if [[ $MODEL == dino ]]; then
        NETWORK=$DINO_NETWORK EVAL_LOG_PREFIX=$DINO_EVAL_LOG
        if [[ $device_class == cpu ]]; then
            MODEL_ARGS=$(dino_small_cpu_args) EVAL_MODEL_ARGS=$(dino_small_cpu_eval_args)
        else
            MODEL_ARGS=$(dino_full_args) EVAL_MODEL_ARGS=$(dino_full_eval_args)
        fi
    else
        NETWORK=$MOBY_NETWORK EVAL_LOG_PREFIX=$MOBY_EVAL_LOG MODEL_ARGS='' EVAL_MODEL_ARGS=''
    fi
    NPU_ARGS=''
    [[ $DEVICE == npu ]] && NPU_ARGS=$("${MODEL}_npu_args")
    local kind=acc
    [[ $mode == perf ]] && kind=perf
    [[ $mode == eval* ]] && kind=$mode
    CASE_NAME=${NETWORK}_bs${BATCH_SIZE}_${WORLD}p_${kind}

    DEVICE_ID=${ASCEND_DEVICE_ID:-0}
    OUTPUT_ROOT=${SSL_TEST_OUTPUT:-$SSL_TEST_DIR/output}
    LOG_DIR=$OUTPUT_ROOT/$DEVICE_ID
    TRAIN_LOG=$LOG_DIR/train_$DEVICE_ID.log
    EVAL_LOG=$LOG_DIR/${EVAL_LOG_PREFIX}_$DEVICE_ID.log
    LOSS_FILE=$LOG_DIR/train_${CASE_NAME}_loss.txt
    RUN_DIR=$LOG_DIR/$CASE_NAME
    CASE_FILE=$LOG_DIR/$CASE_NAME.log
    [[ $mode == eval && -z $CHECKPOINT ]] && { CHECKPOINT=$(ssl_last_full_checkpoint) || exit 2; }

    # ssl_runtime/launch.py: RANK, LOCAL_RANK, RANK_ID, ASCEND_DEVICE_ID per process, core binding,
    # torchrun (standalone on one node; static rendezvous at MASTER_ADDR:MASTER_PORT on several).
    LAUNCHER=("$SSL_PYTHON" -m ssl_runtime.launch --nproc_per_node="$NPROC")
    if ((NNODES > 1)); then
        LAUNCHER+=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
            --master_port="$MASTER_PORT")
    fi
    # Evaluation runs on one node (node 0, where rank 0 wrote the checkpoint).
    EVAL_LAUNCHER=("$SSL_PYTHON" -m ssl_runtime.launch --nproc_per_node="$NPROC")
}

# Build the program command lines (arrays, without the launcher) for the mode.
ssl_build_commands() {
    local mode=$1 evaluation=$1
    [[ $mode == full || $mode == eval ]] && evaluation=$("${MODEL}_default_eval" "$mode")
    PRETRAIN_CMD=() EVAL_CMD=()
    # shellcheck disable=SC2206,SC2207  # the model argument strings are meant to split into words
    if [[ $MODEL == dino ]]; then
        if [[ $mode == full || $mode == perf ]]; then
            PRETRAIN_CMD=("$DINO_PRETRAIN" --output_dir "$RUN_DIR" --batch_size_per_gpu "$BATCH_SIZE"
                --epochs "$EPOCHS" --device "$DEVICE" $MODEL_ARGS $NPU_ARGS)
            # the perf schedule wins over the recipe's (said once when they agree)
            [[ $mode == perf && " $MODEL_ARGS " != *" $(dino_perf_args) "* ]] && PRETRAIN_CMD+=($(dino_perf_args))
            [[ -n $STEPS ]] && PRETRAIN_CMD+=(--num_steps "$STEPS")
            [[ -n $DATA_PATH ]] && PRETRAIN_CMD+=(--data_path "$DATA_PATH")
        fi
        local weights=${CHECKPOINT:-$RUN_DIR/checkpoint.pth}
        case $evaluation in
            eval_knn)
                EVAL_CMD=("$DINO_EVAL_KNN" --pretrained_weights "$weights" --checkpoint_key teacher
                    --device "$DEVICE" $EVAL_MODEL_ARGS) ;;
            eval_linear)
                EVAL_CMD=("$DINO_EVAL_LINEAR" --pretrained_weights "$weights" --checkpoint_key teacher
                    --output_dir "$RUN_DIR" --device "$DEVICE" $EVAL_MODEL_ARGS) ;;
        esac
        [[ ${#EVAL_CMD[@]} -gt 0 && -n $DATA_PATH ]] && EVAL_CMD+=(--data_path "$DATA_PATH")
    else
        if [[ $mode == full || $mode == perf ]]; then
            local epochs_args
            if [[ $mode == perf ]]; then epochs_args=$(moby_perf_epochs_args "$EPOCHS"); else epochs_args=$(moby_epochs_args "$EPOCHS"); fi
            PRETRAIN_CMD=("$MOBY_PRETRAIN" --cfg "$CFG" --batch-size "$BATCH_SIZE" --output "$RUN_DIR"
                --tag pretrain --device "$DEVICE" $epochs_args $NPU_ARGS)
            [[ -n $STEPS ]] && PRETRAIN_CMD+=(--steps "$STEPS")
            [[ -n $DATA_PATH ]] && PRETRAIN_CMD+=(--data-path "$DATA_PATH")
        fi
        if [[ $evaluation == eval_linear ]]; then
            # MoBY writes <output>/<MODEL.NAME>/<tag>/checkpoint.pth; the name is filled in after
            # pretraining (ssl_moby_checkpoint).
            local weights=${CHECKPOINT:-$RUN_DIR/MODEL.NAME/pretrain/checkpoint.pth}
            EVAL_CMD=("$MOBY_LINEAR" --cfg "$(moby_linear_cfg "$CFG")" --output "$RUN_DIR" --tag linear
                --pretrained "$weights" --device "$DEVICE")
            # a full run's batch is the pretraining one: the linear stage gets upstream's recipe
            if [[ $mode == full || ($DEVICE != cpu && -z $GIVEN_BATCH_SIZE) ]]; then
                EVAL_CMD+=(--batch-size "$(moby_linear_batch)")
            fi
        elif [[ $evaluation == eval_knn ]]; then
            EVAL_CMD=("$MOBY_EVAL_KNN" --cfg "$CFG" --output "$RUN_DIR" --tag knn
                --pretrained "${CHECKPOINT:-$RUN_DIR/MODEL.NAME/pretrain/checkpoint.pth}" --device "$DEVICE")
            # shellcheck disable=SC2207
            [[ $mode == full ]] && EVAL_CMD+=($(moby_knn_eval_args))
        fi
        [[ ${#EVAL_CMD[@]} -gt 0 && -n $DATA_PATH ]] && EVAL_CMD+=(--data-path "$DATA_PATH")
    fi
    [[ ${#EVAL_CMD[@]} -gt 0 && $DEVICE == npu ]] && EVAL_CMD+=(--bin "$BIN")
    # Evaluation-only runs: the flags given for the evaluation itself.
    if [[ $mode == eval* && -n $GIVEN_BATCH_SIZE ]]; then
        if [[ $MODEL == dino ]]; then
            EVAL_CMD+=(--batch_size_per_gpu "$BATCH_SIZE")
        else
            EVAL_CMD+=(--batch-size "$BATCH_SIZE")
        fi
    fi
    [[ $evaluation == eval_linear && $mode == eval* && -n $GIVEN_EPOCHS ]] && EVAL_CMD+=(--epochs "$EPOCHS")  # both spell it so
    if [[ $TRUST == 1 ]]; then
        if [[ $MODEL == dino ]]; then EVAL_CMD+=(--trust_checkpoint); else EVAL_CMD+=(--trust-checkpoint); fi
    fi
    RANDOM_EVAL_CMD=()
    if [[ $mode == full && $DEVICE == cpu ]]; then ssl_random_init_command; fi
    return 0
}

# The random-initialisation baseline of a CPU full run (RANDOM_EVAL_CMD): the run's own k-NN
# command (EVAL_CMD) without its weights, so it is the same evaluation of the untrained network;
# measured once per recipe and cached (ssl_runtime.baseline). Its own --tag keeps MoBY's logs apart.
ssl_random_init_command() {
    local i
    RANDOM_EVAL_CMD=("${EVAL_CMD[0]}")
    [[ $MODEL == moby ]] && RANDOM_EVAL_CMD+=(--random-init)  # DINO: no weights means random init
    for ((i = 1; i < ${#EVAL_CMD[@]}; i++)); do
        case ${EVAL_CMD[$i]} in
            --pretrained_weights|--pretrained) ((i++)) ;;
            --tag) RANDOM_EVAL_CMD+=(--tag random_init); ((i++)) ;;
            *) RANDOM_EVAL_CMD+=("${EVAL_CMD[$i]}") ;;
        esac
    done
}

ssl_print_settings() {
    local name
    for name in MODEL NETWORK DEVICE NPROC NNODES NODE_RANK WORLD BATCH_SIZE EPOCHS STEPS DATA_PATH CFG \
        CHECKPOINT CASE_NAME TRAIN_LOG EVAL_LOG LOSS_FILE CASE_FILE RUN_DIR SSL_PYTHON; do
        echo "$name=${!name}"
    done
}

ssl_quote() {
    local out
    printf -v out '%q ' "$@"
    echo "${out% }"
}

ssl_print_commands() {
    ((${#PRETRAIN_CMD[@]})) && echo "PRETRAIN: $(ssl_quote "${LAUNCHER[@]}" "${PRETRAIN_CMD[@]}")"
    ((${#EVAL_CMD[@]})) && echo "EVAL: $(ssl_quote "${EVAL_LAUNCHER[@]}" "${EVAL_CMD[@]}")"
    ((${#RANDOM_EVAL_CMD[@]})) && echo "RANDOM-INIT: $(ssl_quote "${EVAL_LAUNCHER[@]}" "${RANDOM_EVAL_CMD[@]}")"
    return 0
}

# Run one stage under a launcher (the name of its array) with all output in a log; stop the
# script if it fails.
ssl_run_stage() {
    local what=$1 log=$2
    local -n stage_launcher=$3
    shift 3
    echo "[$(date +%T)] $what: $(ssl_quote "${stage_launcher[@]}" "$@")"
    echo "[$(date +%T)] log: $log (follow it with: tail -f $log)"
    "${stage_launcher[@]}" "$@" >"$log" 2>&1
    local status=$?
    if ((status != 0)); then
        echo "----- last lines of $log -----" >&2
        tail -n 20 "$log" >&2
        echo "error: $what failed (exit $status); read $log" >&2
        exit "$status"
    fi
}

# After MoBY pretraining: the checkpoint under <output>/<MODEL.NAME>/pretrain/.
ssl_moby_checkpoint() {
    local found
    found=$(ls -t "$RUN_DIR"/*/pretrain/checkpoint.pth 2>/dev/null | head -n 1)
    [[ -n $found ]] || {
        echo "error: pretraining wrote no $RUN_DIR/<MODEL.NAME>/pretrain/checkpoint.pth; read $TRAIN_LOG" >&2
        exit 1
    }
    local i
    for i in "${!EVAL_CMD[@]}"; do
        [[ ${EVAL_CMD[$i]} == "$RUN_DIR/MODEL.NAME/pretrain/checkpoint.pth" ]] && EVAL_CMD[$i]=$found
    done
}

ssl_prepare_environment() {
    export PYTHONPATH=$SSL_REPO${PYTHONPATH:+:$PYTHONPATH}
    [[ $DEVICE == npu ]] && ssl_quiet_device_logs
    mkdir -p "$LOG_DIR" || exit 1
    if [[ -z $DATA_PATH ]]; then
        # Convert the default dataset before the clock starts (and before several ranks want it).
        # As root, a missing Debian package is installed first; otherwise the error says how.
        local root
        if ! root=$("$SSL_PYTHON" -m ssl_runtime.fashion_mnist 2>/dev/null); then
            ssl_ensure_dataset >&2 || true
            root=$("$SSL_PYTHON" -m ssl_runtime.fashion_mnist) || exit 2
        fi
        echo "dataset: Fashion-MNIST at $root (pass --data_path= for another ImageFolder dataset)"
    fi
}

ssl_train() {
    local mode=$1
    rm -rf "$RUN_DIR"  # a fresh run, as the Ascend scripts do: no auto-resume from an old run
    rm -f "$TRAIN_LOG" "$EVAL_LOG" "$CASE_FILE" "$LOSS_FILE"
    local start=$SECONDS
    ssl_run_stage "$NETWORK pretraining" "$TRAIN_LOG" LAUNCHER "${PRETRAIN_CMD[@]}"
    if ((NODE_RANK > 0 && NNODES > 1)); then
        echo "node $NODE_RANK: pretraining finished; node 0 evaluates and prints the result"
        return 0
    fi
    local report_args=(--loss_file "$LOSS_FILE")
    if [[ $mode == full ]]; then
        [[ $MODEL == moby ]] && ssl_moby_checkpoint
        ssl_run_stage "$NETWORK evaluation" "$EVAL_LOG" EVAL_LAUNCHER "${EVAL_CMD[@]}"
        report_args+=(--eval_log "$EVAL_LOG")
    fi
    # the MoBY port's 1-device performance case also records the first step's time
    [[ $mode == perf && $MODEL == moby && $WORLD == 1 ]] && report_args+=(--compile_time)
    local e2e=$((SECONDS - start))
    if ((${#RANDOM_EVAL_CMD[@]})); then
        local random_init
        random_init=$(ssl_random_init) || exit $?
        report_args+=(--random_init_accuracy "$random_init")
    fi
    "$SSL_PYTHON" -m ssl_runtime.report --train_log "$TRAIN_LOG" "${report_args[@]}" \
        --network "$NETWORK" --rank_size "$WORLD" --batch_size "$BATCH_SIZE" \
        --case_name "$CASE_NAME" --e2e_seconds "$e2e" --out_file "$CASE_FILE" || exit $?
}

# The accuracy of RANDOM_EVAL_CMD, after the timed run: measured once per recipe, then cached.
ssl_random_init() {
    echo "[$(date +%T)] random-init baseline (once per recipe, then cached): $(ssl_quote "${RANDOM_EVAL_CMD[@]}")" >&2
    "$SSL_PYTHON" -m ssl_runtime.baseline --log "$LOG_DIR/random_init_$DEVICE_ID.log" -- "${EVAL_LAUNCHER[@]}" "${RANDOM_EVAL_CMD[@]}"
}

ssl_evaluate() {
    # A fresh evaluation: eval_linear resumes from a linear head it finds in its output folder.
    [[ $CHECKPOINT != "$RUN_DIR"/* ]] && rm -rf "$RUN_DIR"
    rm -f "$EVAL_LOG"
    ssl_run_stage "$NETWORK evaluation of $CHECKPOINT" "$EVAL_LOG" EVAL_LAUNCHER "${EVAL_CMD[@]}"
    "$SSL_PYTHON" -m ssl_runtime.report --accuracy_only --eval_log "$EVAL_LOG" || exit $?
}

# The whole script: ssl_main <mode> <default number of processes per node> "$@".
ssl_main() {
    local mode=$1 default_nproc=$2
    shift 2
    ssl_parse_args "$mode" "$@"
    cd "$SSL_REPO" || exit 1  # config and program paths are relative to the repository
    if ((DRY_RUN)); then
        [[ -n $CONDA_NAME ]] && ssl_note "--dry_run: conda environment '$CONDA_NAME' not activated"
    else
        ssl_activate_conda
    fi
    ssl_source_ascend
    if ((DRY_RUN)); then
        if [[ -z ${SSL_PYTHON:-} ]]; then
            SSL_PYTHON=$(command -v python3)
            [[ -x $SSL_REPO/.venv/bin/python ]] && SSL_PYTHON=$SSL_REPO/.venv/bin/python
        fi
    else
        ssl_setup_env "$SSL_REPO" || exit 1
    fi
    ssl_resolve "$mode" "$default_nproc"
    ssl_build_commands "$mode"
    if ((DRY_RUN)); then
        ssl_print_settings
        ssl_print_commands
        return 0
    fi
    ssl_prepare_environment
    case $mode in
        full | perf) ssl_train "$mode" ;;
        eval | eval_knn | eval_linear) ssl_evaluate ;;
        *) ssl_die "internal: unknown mode $mode" ;;
    esac
}
