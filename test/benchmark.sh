#!/usr/bin/env bash
# Training-step and data-pipeline benchmark of DINO and MoBY (dino/benchmark.py, moby/benchmark.py)
# on a set of named configurations, each in its own process (so peak memory is per configuration).
# Prints one line per figure and writes test/output/benchmark/<name>.json.
#
#   bash test/benchmark.sh                       # the small CPU configurations (minutes on 2 cores)
#   bash test/benchmark.sh --configs="a b c d"   # the upstream comparison set (about 10 minutes)
#   bash test/benchmark.sh --configs=vits16 --device=cuda --amp --compile --steps=50
#
# Configurations (batch per device; --batch_size= overrides):
#   dino_cpu  DINO vit_pico/4, 2x32 + 2x16, out_dim 4096, BN head, batch 64 (the CPU recipe)
#   moby_cpu  MoBY Swin 32 px (configs/moby_swin_cpu.yaml), batch 64 (= d)
#   a         DINO vit_small/16, 2x224 + 2x96, out_dim 65536, batch 8
#   b         DINO vit_tiny/4, 2x32 + 6x16, out_dim 4096, batch 64
#   c         MoBY Swin-T 224, queue 4096, batch 8
#   d         MoBY Swin 32 px, patch 2, window 4, C48, depths 2-2-2, queue 4096, batch 64
#   vits16    DINO vit_small/16, 2x224 + 10x96 (upstream's full recipe), batch 64
#   swin_t    MoBY Swin-T 224 (configs/moby_swin_tiny.yaml), batch 64
# Other flags: --device=auto|cpu|cuda|npu  --steps=N (timed steps, default 10)  --warmup=N (3)
#   --workers="0 2" (data-pipeline worker counts; default: 0 and the run's own; none: skip)
#   --amp  --compile
#   --output=DIR  --dry_run
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

CONFIGS="dino_cpu moby_cpu" DEVICE=auto STEPS=10 WARMUP=3 WORKERS="" AMP=0 COMPILE=0 BATCH="" DRY=0
OUTPUT=${SSL_TEST_OUTPUT:-$REPO/test/output}/benchmark
for arg in "$@"; do
    case $arg in
        --configs=*) CONFIGS=${arg#*=} ;;
        --device=*) DEVICE=${arg#*=} ;;
        --steps=*) STEPS=${arg#*=} ;;
        --warmup=*) WARMUP=${arg#*=} ;;
        --workers=*) WORKERS=${arg#*=} ;;
        --batch_size=*) BATCH=${arg#*=} ;;
        --output=*) OUTPUT=${arg#*=} ;;
        --amp) AMP=1 ;;
        --compile) COMPILE=1 ;;
        --dry_run) DRY=1 ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown flag $arg (see --help)" >&2; exit 2 ;;
    esac
done

# "<program> <flags>" of a configuration; the batch comes from batch_of.
config_command() {
    local dino_common="--use_fp16 $([[ $AMP == 1 ]] && echo true || echo false) --compile $([[ $COMPILE == 1 ]] && echo true || echo false)"
    local moby_common="--amp-opt-level $([[ $AMP == 1 ]] && echo O1 || echo O0) $([[ $COMPILE == 1 ]] && echo --compile)"
    case $1 in
        dino_cpu) echo "dino/benchmark.py --arch vit_pico --patch_size 4 --img_size 32 --local_crop_size 16 --local_crops_number 2 --out_dim 4096 --use_bn_in_head true $dino_common" ;;
        a) echo "dino/benchmark.py --arch vit_small --patch_size 16 --local_crops_number 2 --out_dim 65536 --num_workers 2 $dino_common" ;;
        b) echo "dino/benchmark.py --arch vit_tiny --patch_size 4 --img_size 32 --local_crop_size 16 --local_crops_number 6 --out_dim 4096 --num_workers 2 $dino_common" ;;
        vits16) echo "dino/benchmark.py --arch vit_small --patch_size 16 --local_crops_number 10 $dino_common" ;;
        moby_cpu|d) echo "moby/benchmark.py --cfg configs/moby_swin_cpu.yaml $moby_common" ;;
        c) echo "moby/benchmark.py --cfg configs/moby_swin_tiny.yaml --opts DATA.NUM_WORKERS 2 $moby_common" ;;
        swin_t) echo "moby/benchmark.py --cfg configs/moby_swin_tiny.yaml $moby_common" ;;
        *) return 1 ;;
    esac
}

batch_of() {
    [[ -n $BATCH ]] && { echo "$BATCH"; return; }
    case $1 in a|c) echo 8 ;; *) echo 64 ;; esac
}

for name in $CONFIGS; do
    command=$(config_command "$name") || { echo "error: unknown configuration '$name' (see --help)" >&2; exit 2; }
done
[[ $STEPS =~ ^[1-9][0-9]*$ ]] || { echo "error: --steps must be a positive integer, got '$STEPS'" >&2; exit 2; }

if [[ $DRY == 0 ]]; then
    ssl_setup_env "$REPO" || exit 1
    mkdir -p "$OUTPUT"
fi
status=0
for name in $CONFIGS; do
    command=$(config_command "$name")
    batch=$(batch_of "$name")
    batch_flag=$([[ $command == dino/* ]] && echo "--batch_size_per_gpu $batch" || echo "--batch-size $batch")
    workers_flag=()
    if [[ $WORKERS == none ]]; then
        workers_flag=(--bench_workers)
    elif [[ -n $WORKERS ]]; then
        # shellcheck disable=SC2206
        workers_flag=(--bench_workers $WORKERS)
    fi
    # shellcheck disable=SC2206
    argv=($command $batch_flag --device "$DEVICE" --bench_steps "$STEPS" --bench_warmup "$WARMUP"
          --bench_name "$name" --bench_json "$OUTPUT/$name.json" "${workers_flag[@]}")
    if [[ $DRY == 1 ]]; then
        echo "python ${argv[*]}"
        continue
    fi
    (cd "$REPO" && "$SSL_PYTHON" -u "${argv[@]}") || status=$?
done
exit $status
