# Shared logic of the Ascend-ModelZoo-style launch scripts in test/. Sourced, never run.
#
# Every script is a short wrapper:   source test/common.sh;  ssl_main <mode> <nproc> "$@"
#   mode full        pretrain, then evaluate (DINO: k-NN; MoBY: linear); accuracy case (_acc)
#   mode perf        pretrain for a fixed number of steps; performance case (_perf)
#   mode eval_knn    k-NN evaluation of a DINO or MoBY checkpoint given with --checkpoint=
#   mode eval_linear linear evaluation of a DINO or MoBY checkpoint given with --checkpoint=
#
# Logs: test/output/0/train_0.log (rank 0's output) and test/output/0/eval_0.log; the result
# block is printed at the end and written to test/output/0/<Network>_bs<BS>_<N>p_<acc|perf>.log.
# --dry_run prints the resolved settings and commands without running anything.
# The output folder can be moved with env SSL_TEST_OUTPUT (the tests use this).

SSL_TEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SSL_REPO=$(dirname "$SSL_TEST_DIR")
# shellcheck source=test/setup_env.sh
source "$SSL_TEST_DIR/setup_env.sh"

DINO_NETWORK=DINO_ID3436_for_PyTorch
MOBY_NETWORK=Transformer-SSL_ID3434_for_PyTorch

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
# ViT-S settings barely move it in that time). A 1-epoch run (the default) uses a fixed
# 12,800-image subset, so it only checks the pipeline in ~3 minutes (k-NN near the random-init
# level); --epochs=3 trains on the whole split (~40 min on 2 cores; 20-NN teacher ~69.5 %).
# Warm-up: upstream's ratio (10 of 100 epochs), at least 1 epoch when there are several.
dino_small_cpu_args() {
    local warmup=$((EPOCHS / 10)) subset=0
    if ((EPOCHS > 1 && warmup == 0)); then warmup=1; fi
    if ((EPOCHS == 1)); then subset=12800; fi
    echo "--arch vit_pico --patch_size 4 --img_size 32 --local_crop_size 16 --local_crops_number 2" \
         "--out_dim 4096 --use_bn_in_head true --lr 1e-3 --num_workers 2 --max_train_images $subset" \
         "--warmup_epochs $warmup"
}
# The matching architecture flags for dino/eval_knn.py and dino/eval_linear.py on CPU.
dino_small_cpu_eval_args() {
    echo "--arch vit_pico --patch_size 4 --img_size 32"
}
# The random-initialisation baseline of a CPU full run (RANDOM_EVAL_CMD): the run's own k-NN
# evaluation of the untrained network, measured once per recipe and cached (ssl_runtime.baseline).
dino_random_init_eval() {
    # shellcheck disable=SC2206
    RANDOM_EVAL_CMD=("$DINO_EVAL_KNN" --checkpoint_key teacher --device "$DEVICE" $EVAL_MODEL_ARGS)
    [[ -n $DATA_PATH ]] && RANDOM_EVAL_CMD+=(--data_path "$DATA_PATH")
    return 0
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
# on a fixed 12,800-image subset, so that a full run (pretraining plus one linear-evaluation epoch)
# takes minutes; see the head of configs/moby_swin_cpu.yaml for the whole train split.
moby_small_cpu_cfg() {
    echo configs/moby_swin_cpu.yaml
}
moby_full_cfg() {
    echo configs/moby_swin_tiny.yaml
}
# The evaluation of a full run: on NPU/GPU upstream's linear evaluation; on CPU the k-NN protocol
# (moby/eval_knn.py, as DINO's: weighted 10/20-NN, T = 0.07, the full 60k/10k split), because one
# linear epoch, all a CPU run can afford, measures the linear head's training more than the encoder.
moby_full_eval() {
    if [[ $DEVICE == cpu ]]; then echo knn; else echo linear; fi
}
moby_knn_eval_args() {  # the whole train split, whatever subset pretraining used
    echo "--opts DATA.MAX_TRAIN_IMAGES 0"
}
moby_random_init_eval() {
    # shellcheck disable=SC2046
    RANDOM_EVAL_CMD=("$MOBY_EVAL_KNN" --cfg "$CFG" --output "$RUN_DIR" --tag random_init --random-init
        --device "$DEVICE" $(moby_knn_eval_args))
    [[ -n $DATA_PATH ]] && RANDOM_EVAL_CMD+=(--data-path "$DATA_PATH")
    return 0
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

###################################################################################################
# Generic part: arguments, environment, launch, result block.
###################################################################################################

ssl_usage() {
    cat <<'EOF'
flags (all optional, --name=value):
  --data_path=DIR     ImageFolder root with train/ and val/ (default: Fashion-MNIST, converted on first use)
  --model=dino|moby   which method (default dino)
  --batch_size=N      batch size per device
  --epochs=N          pretraining epochs
  --steps=N           stop pretraining after N steps (performance runs default to a fixed count)
  --device=auto|npu|cuda|cpu  accelerator (default auto: npu, then cuda, then cpu)
  --nproc=N           number of processes/devices (default: 1 for *_1p.sh, 8 for *_8p.sh)
  --cfg=FILE          MoBY YAML config
  --checkpoint=FILE   checkpoint to evaluate (eval_knn.sh, eval_linear.sh)
  --conda_name=NAME   conda environment to activate first
  --bin=, --more_path1=  accepted for compatibility with the Ascend scripts, ignored
  --dry_run           print the resolved settings and commands, run nothing
  --help              this text
EOF
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
# NPROC, CFG, CHECKPOINT, CONDA_NAME and DRY_RUN; exits with a message on a bad flag.
ssl_parse_args() {
    local mode=$1
    shift
    MODEL=dino DATA_PATH='' BATCH_SIZE='' EPOCHS='' STEPS='' DEVICE=auto NPROC='' CFG=''
    CHECKPOINT='' CONDA_NAME='' DRY_RUN=0
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
            --cfg=*) CFG=${arg#*=} ;;
            --checkpoint=*) CHECKPOINT=${arg#*=} ;;
            --conda_name=*) CONDA_NAME=${arg#*=} ;;
            --bin=* | --more_path1=*) ssl_note "${arg%%=*} is accepted for compatibility and ignored" ;;
            --dry_run) DRY_RUN=1 ;;
            -h | --help) ssl_usage; exit 0 ;;
            *) ssl_die "unknown argument '$arg'"$'\n'"$(ssl_usage)" ;;
        esac
    done

    [[ $MODEL == dino || $MODEL == moby ]] || ssl_die "--model=$MODEL: choose dino or moby"
    case $DEVICE in auto | npu | cuda | cpu) ;; *) ssl_die "--device=$DEVICE: choose auto, npu, cuda or cpu" ;; esac
    local name value
    for name in BATCH_SIZE EPOCHS STEPS NPROC; do
        value=${!name}
        if [[ -n $value ]] && ! ssl_is_positive_int "$value"; then
            ssl_die "--$(echo "$name" | tr 'A-Z' 'a-z')=$value: expected a positive whole number"
        fi
    done
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
    if [[ $mode == eval_* ]]; then
        [[ -n $CHECKPOINT ]] || ssl_die "--checkpoint=FILE is required: the checkpoint to evaluate"
        [[ -f $CHECKPOINT ]] || ssl_die "--checkpoint=$CHECKPOINT: no such file"
        CHECKPOINT=$(ssl_abspath "$CHECKPOINT")
    elif [[ -n $CHECKPOINT ]]; then
        ssl_die "--checkpoint is for eval_knn.sh and eval_linear.sh; training scripts start from scratch"
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

# Print npu, cuda or cpu for DEVICE=auto (asks ssl_runtime.device, which knows how to look).
ssl_detect_device() {
    (cd "$SSL_REPO" && PYTHONPATH=$SSL_REPO "$SSL_PYTHON" -c \
        'from ssl_runtime.device import resolve_device; print(resolve_device("auto"))')
}

# torch.distributed.run (torchrun) exists from torch 1.9; older stacks have torch.distributed.launch.
ssl_has_torchrun() {
    "$SSL_PYTHON" - >/dev/null 2>&1 <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("torch")
folder = spec.submodule_search_locations[0] if spec else ""
sys.exit(spec is not None and not os.path.isfile(os.path.join(folder, "distributed", "run.py")))
EOF
}

# Fill in everything the flags left open: device, defaults, names, paths, launcher.
ssl_resolve() {
    local mode=$1 default_nproc=$2
    NPROC=${NPROC:-$default_nproc}
    if [[ $DEVICE == auto ]]; then
        DEVICE=$(ssl_detect_device) || ssl_die "could not detect the device with $SSL_PYTHON;" \
            "pass --device=npu|cuda|cpu"
    fi
    local device_class=accelerator
    [[ $DEVICE == cpu ]] && device_class=cpu
    "${MODEL}_defaults" "$device_class"
    # Evaluation-only runs pass these on only when given (the programs' defaults apply otherwise).
    GIVEN_BATCH_SIZE=$BATCH_SIZE GIVEN_EPOCHS=$EPOCHS
    BATCH_SIZE=${BATCH_SIZE:-$DEFAULT_BATCH_SIZE}
    EPOCHS=${EPOCHS:-$DEFAULT_EPOCHS}
    [[ $mode == perf ]] && STEPS=${STEPS:-$DEFAULT_STEPS}
    if [[ $MODEL == moby && -z $CFG ]]; then
        if [[ $device_class == cpu ]]; then CFG=$(moby_small_cpu_cfg); else CFG=$(moby_full_cfg); fi
    fi
    if [[ $MODEL == dino ]]; then
        NETWORK=$DINO_NETWORK
        if [[ $device_class == cpu ]]; then
            MODEL_ARGS=$(dino_small_cpu_args) EVAL_MODEL_ARGS=$(dino_small_cpu_eval_args)
        else
            MODEL_ARGS=$(dino_full_args) EVAL_MODEL_ARGS=$(dino_full_eval_args)
        fi
    else
        NETWORK=$MOBY_NETWORK MODEL_ARGS='' EVAL_MODEL_ARGS=''
    fi
    local kind=acc
    [[ $mode == perf ]] && kind=perf
    [[ $mode == eval_* ]] && kind=$mode
    CASE_NAME=${NETWORK}_bs${BATCH_SIZE}_${NPROC}p_${kind}

    OUTPUT_ROOT=${SSL_TEST_OUTPUT:-$SSL_TEST_DIR/output}
    LOG_DIR=$OUTPUT_ROOT/0
    TRAIN_LOG=$LOG_DIR/train_0.log
    EVAL_LOG=$LOG_DIR/eval_0.log
    RUN_DIR=$LOG_DIR/$CASE_NAME
    CASE_FILE=$LOG_DIR/$CASE_NAME.log

    if ((NPROC > 1)); then
        if ssl_has_torchrun; then
            LAUNCHER=("$SSL_PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
        else
            LAUNCHER=("$SSL_PYTHON" -m torch.distributed.launch --use_env --nproc_per_node="$NPROC")
        fi
    else
        LAUNCHER=("$SSL_PYTHON" -u)
    fi
}

# Build the program command lines (arrays, without the launcher) for the mode.
ssl_build_commands() {
    local mode=$1
    PRETRAIN_CMD=() EVAL_CMD=()
    # shellcheck disable=SC2206  # the model argument strings are meant to split into words
    if [[ $MODEL == dino ]]; then
        if [[ $mode == full || $mode == perf ]]; then
            PRETRAIN_CMD=("$DINO_PRETRAIN" --output_dir "$RUN_DIR" --batch_size_per_gpu "$BATCH_SIZE"
                --epochs "$EPOCHS" --device "$DEVICE" $MODEL_ARGS)
            [[ -n $STEPS ]] && PRETRAIN_CMD+=(--num_steps "$STEPS")
            [[ -n $DATA_PATH ]] && PRETRAIN_CMD+=(--data_path "$DATA_PATH")
        fi
        local weights=${CHECKPOINT:-$RUN_DIR/checkpoint.pth}
        case $mode in
            full | eval_knn)
                EVAL_CMD=("$DINO_EVAL_KNN" --pretrained_weights "$weights" --checkpoint_key teacher
                    --device "$DEVICE" $EVAL_MODEL_ARGS) ;;
            eval_linear)
                EVAL_CMD=("$DINO_EVAL_LINEAR" --pretrained_weights "$weights" --checkpoint_key teacher
                    --output_dir "$RUN_DIR" --device "$DEVICE" $EVAL_MODEL_ARGS) ;;
        esac
        [[ ${#EVAL_CMD[@]} -gt 0 && -n $DATA_PATH ]] && EVAL_CMD+=(--data_path "$DATA_PATH")
    else
        if [[ $mode == full || $mode == perf ]]; then
            PRETRAIN_CMD=("$MOBY_PRETRAIN" --cfg "$CFG" --batch-size "$BATCH_SIZE" --output "$RUN_DIR"
                --tag pretrain --device "$DEVICE" $(moby_epochs_args "$EPOCHS"))
            [[ -n $STEPS ]] && PRETRAIN_CMD+=(--steps "$STEPS")
            [[ -n $DATA_PATH ]] && PRETRAIN_CMD+=(--data-path "$DATA_PATH")
        fi
        if [[ $mode == full && $(moby_full_eval) == knn ]]; then
            # shellcheck disable=SC2046
            EVAL_CMD=("$MOBY_EVAL_KNN" --cfg "$CFG" --output "$RUN_DIR" --tag knn
                --pretrained "$RUN_DIR/MODEL.NAME/pretrain/checkpoint.pth" --device "$DEVICE" $(moby_knn_eval_args))
        elif [[ $mode == full || $mode == eval_linear ]]; then
            # MoBY writes <output>/<MODEL.NAME>/<tag>/checkpoint.pth; the name is filled in after
            # pretraining (ssl_moby_checkpoint).
            local weights=${CHECKPOINT:-$RUN_DIR/MODEL.NAME/pretrain/checkpoint.pth}
            EVAL_CMD=("$MOBY_LINEAR" --cfg "$(moby_linear_cfg "$CFG")" --batch-size "$BATCH_SIZE"
                --output "$RUN_DIR" --tag linear --pretrained "$weights" --device "$DEVICE")
        elif [[ $mode == eval_knn ]]; then
            EVAL_CMD=("$MOBY_EVAL_KNN" --cfg "$CFG" --output "$RUN_DIR" --tag knn
                --pretrained "$CHECKPOINT" --device "$DEVICE")
        fi
        [[ ${#EVAL_CMD[@]} -gt 0 && -n $DATA_PATH ]] && EVAL_CMD+=(--data-path "$DATA_PATH")
    fi
    # Evaluation-only runs: the flags given for the evaluation itself.
    if [[ $mode == eval_* && -n $GIVEN_BATCH_SIZE ]]; then
        if [[ $MODEL == dino ]]; then
            EVAL_CMD+=(--batch_size_per_gpu "$BATCH_SIZE")
        else
            EVAL_CMD+=(--batch-size "$BATCH_SIZE")
        fi
    fi
    [[ $mode == eval_linear && -n $GIVEN_EPOCHS ]] && EVAL_CMD+=(--epochs "$EPOCHS")  # both spell it so
    RANDOM_EVAL_CMD=()
    if [[ $mode == full && $DEVICE == cpu ]]; then "${MODEL}_random_init_eval"; fi
}

ssl_print_settings() {
    local name
    for name in MODEL NETWORK DEVICE NPROC BATCH_SIZE EPOCHS STEPS DATA_PATH CFG CHECKPOINT CASE_NAME \
        TRAIN_LOG EVAL_LOG CASE_FILE RUN_DIR SSL_PYTHON; do
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
    ((${#EVAL_CMD[@]})) && echo "EVAL: $(ssl_quote "${LAUNCHER[@]}" "${EVAL_CMD[@]}")"
    ((${#RANDOM_EVAL_CMD[@]})) && echo "RANDOM-INIT: $(ssl_quote "${LAUNCHER[@]}" "${RANDOM_EVAL_CMD[@]}")"
    return 0
}

# Run one stage under the launcher with all output in a log; stop the script if it fails.
ssl_run_stage() {
    local what=$1 log=$2
    shift 2
    echo "[$(date +%T)] $what: $(ssl_quote "${LAUNCHER[@]}" "$@")"
    echo "[$(date +%T)] log: $log (follow it with: tail -f $log)"
    "${LAUNCHER[@]}" "$@" >"$log" 2>&1
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
    local cann_set_env=${CANN_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
    if [[ $DEVICE == npu && -f $cann_set_env ]]; then
        # shellcheck source=test/env_npu.sh
        source "$SSL_TEST_DIR/env_npu.sh"
    fi
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
    rm -f "$TRAIN_LOG" "$EVAL_LOG" "$CASE_FILE"
    local start=$SECONDS
    ssl_run_stage "$NETWORK pretraining" "$TRAIN_LOG" "${PRETRAIN_CMD[@]}"
    local report_args=()
    if [[ $mode == full ]]; then
        [[ $MODEL == moby ]] && ssl_moby_checkpoint
        ssl_run_stage "$NETWORK evaluation" "$EVAL_LOG" "${EVAL_CMD[@]}"
        report_args=(--eval_log "$EVAL_LOG")
    fi
    local e2e=$((SECONDS - start))
    if ((${#RANDOM_EVAL_CMD[@]})); then
        local random_init
        random_init=$(ssl_random_init) || exit $?
        report_args+=(--random_init_accuracy "$random_init")
    fi
    "$SSL_PYTHON" -m ssl_runtime.report --train_log "$TRAIN_LOG" "${report_args[@]}" \
        --network "$NETWORK" --rank_size "$NPROC" --batch_size "$BATCH_SIZE" \
        --case_name "$CASE_NAME" --e2e_seconds "$e2e" --out_file "$CASE_FILE" || exit $?
}

# The accuracy of RANDOM_EVAL_CMD, after the timed run: measured once per recipe, then cached.
ssl_random_init() {
    echo "[$(date +%T)] random-init baseline (once per recipe, then cached): $(ssl_quote "${RANDOM_EVAL_CMD[@]}")" >&2
    "$SSL_PYTHON" -m ssl_runtime.baseline --log "$LOG_DIR/random_init_0.log" -- "${LAUNCHER[@]}" "${RANDOM_EVAL_CMD[@]}"
}

ssl_evaluate() {
    # A fresh evaluation: eval_linear resumes from a linear head it finds in its output folder.
    [[ $CHECKPOINT != "$RUN_DIR"/* ]] && rm -rf "$RUN_DIR"
    rm -f "$EVAL_LOG"
    ssl_run_stage "$NETWORK evaluation of $CHECKPOINT" "$EVAL_LOG" "${EVAL_CMD[@]}"
    "$SSL_PYTHON" -m ssl_runtime.report --accuracy_only --eval_log "$EVAL_LOG" || exit $?
}

# The whole script: ssl_main <mode> <default number of processes> "$@".
ssl_main() {
    local mode=$1 default_nproc=$2
    shift 2
    ssl_parse_args "$mode" "$@"
    cd "$SSL_REPO" || exit 1  # config and program paths are relative to the repository
    if ((DRY_RUN)); then
        [[ -n $CONDA_NAME ]] && ssl_note "--dry_run: conda environment '$CONDA_NAME' not activated"
        if [[ -z ${SSL_PYTHON:-} ]]; then
            SSL_PYTHON=$(command -v python3)
            [[ -x $SSL_REPO/.venv/bin/python ]] && SSL_PYTHON=$SSL_REPO/.venv/bin/python
        fi
    else
        ssl_activate_conda
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
        eval_knn | eval_linear) ssl_evaluate ;;
        *) ssl_die "internal: unknown mode $mode" ;;
    esac
}
