#!/usr/bin/env bash
# Everything worth measuring on a lent GPU, in one call of at most ~9 minutes, from the repository root:
#   benchmarks/gpu_suite.sh [OUTDIR] [CIFAR_TGZ]
# Needs torch, triton and nvcc; no internet. Steps: build the extension (pip install -e .), the GPU-marked
# tests, the op benchmarks (bench kernels; torch.compile providers last), bench cost for PreAct ResNet-18 width 64 at batch 128 and 512,
# and a short CIFAR-10 (JPEG) training of APART and PGD-10 (data: 2nd argument or $CIFAR_TGZ; skipped when
# absent). Each step has its own timeout, cut to what is left of SUITE_BUDGET_S (default 540 s); a failed
# step is recorded and the suite goes on. Every log, JSON and table lands in OUTDIR; a summary is printed last.
# Environment: PYTHON (default python), SUITE_BUDGET_S, TRAIN_EPOCHS (default 1), MAX_JOBS (default nproc).
set -u
cd "$(dirname "$0")/.." || exit 1

OUT=${1:-gpu-suite-$(date +%Y%m%d-%H%M%S)}
CIFAR=${2:-${CIFAR_TGZ:-}}
PY=${PYTHON:-python}
BUDGET=${SUITE_BUDGET_S:-540}
RESERVE=15  # seconds kept for the summary
START=$(date +%s)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\trc\tseconds\tlog\n' > "$STEPS"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) - RESERVE )); }

# step NAME CAP_SECONDS COMMAND...: run with timeout min(CAP, time left), log to OUT/NAME.log, record the outcome.
step() {
    local name=$1 cap=$2
    shift 2
    local t
    t=$(left)
    (( t > cap )) && t=$cap
    local log="$OUT/$name.log"
    if (( t < 10 )); then
        echo "== $name: SKIPPED (suite budget spent)"
        printf '%s\tSKIP\t-\t0\t%s\n' "$name" "no time left" >> "$STEPS"
        return 0
    fi
    echo "== $name (timeout ${t}s): $*"
    local s0 rc status
    s0=$(date +%s)
    timeout --kill-after=10 "$t" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - s0 ))" "$log" >> "$STEPS"
    echo "   $status (rc $rc, $(( $(date +%s) - s0 ))s)"
    [[ $status == ok ]] || tail -n 5 "$log" | sed 's/^/   | /'
    return 0
}

step env 20 bash -c "nvidia-smi; $PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; command -v nvcc && nvcc --version; nproc; free -g"
step install 200 "$PY" -m pip install --no-build-isolation --no-deps -e .
step info 20 "$PY" -c "import apart_fast.ops.dispatch as d, torch; print({b: d.available(b) or d.unavailable_reason(b) for b in d.BACKENDS}); print('auto on cuda:', d.auto_backend(torch.device('cuda')))"
step gpu_tests 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
# torch.compile providers compile per op and size: they run last, in whatever time is left
KT=$(( $(left) - 15 )); (( KT > 100 )) && KT=100
step kernels 115 "$PY" -m apart_fast bench kernels --filter "not compile" --out "$OUT/kernels" --timeout "$KT"

DTYPE=$("$PY" -c "import torch; print('bf16' if torch.cuda.is_bf16_supported() else 'fp32')" 2>/dev/null || echo fp32)
case $DTYPE in bf16 | fp32) ;; *) DTYPE=fp32 ;; esac
echo "== cost dtype: $DTYPE (bf16 autocast where the GPU supports it)"
COST=(--model preact18 --width 64 --dataset synthetic --image-size 32 --synthetic-n 50000 --epoch-size 50000
      --device cuda --dtype "$DTYPE" --warmup 5 --steps 20 --rounds 2 --no-progress)
step cost_b128 75 "$PY" -m apart_fast bench cost "${COST[@]}" --batch-size 128 --out "$OUT/cost-b128"
step cost_b512 90 "$PY" -m apart_fast bench cost "${COST[@]}" --batch-size 512 --out "$OUT/cost-b512"
# The engine issue's comparison at batch 128: eager vs CUDA graphs (cost_b128 above) vs graphs + torch.compile
FAST=(--methods clean,fgsm_rs,pgd,apart --batch-size 128)
step cost_b128_eager 60 "$PY" -m apart_fast bench cost "${COST[@]}" "${FAST[@]}" --no-cuda-graphs --out "$OUT/cost-b128-eager"
step cost_b128_compile 120 "$PY" -m apart_fast bench cost "${COST[@]}" "${FAST[@]}" --compile --out "$OUT/cost-b128-compile"

if [[ -n $CIFAR && -e $CIFAR ]]; then
    step train_cifar10 400 "$PY" -m apart_fast bench cost --methods pgd,apart --model preact18 --width 64 \
        --batch-size 128 --dataset cifar10 --data-dir "$CIFAR" --device cuda --dtype "$DTYPE" --warmup 3 --steps 10 \
        --train-epochs "${TRAIN_EPOCHS:-1}" --eval --eval-n 2000 --no-progress --out "$OUT/train-cifar10"
else
    echo "== train_cifar10: SKIPPED (no CIFAR-10 archive: pass it as the 2nd argument or set CIFAR_TGZ)"
    printf 'train_cifar10\tSKIP\t-\t0\tno CIFAR-10 archive given\n' >> "$STEPS"
fi

KT=$(( $(left) - 15 ))
step kernels_compile 120 "$PY" -m apart_fast bench kernels --filter "compile and 128x64x32x32" \
    --out "$OUT/kernels-compile" --timeout "$KT"

{
    echo
    echo "================ gpu_suite summary ($(( $(date +%s) - START ))s of ${BUDGET}s) -> $OUT"
    column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
    for f in "$OUT"/cost-b128/cost.md "$OUT"/cost-b512/cost.md "$OUT"/cost-b128-eager/cost.md \
             "$OUT"/cost-b128-compile/cost.md; do
        [[ -f $f ]] || continue
        echo "-- $(head -n 1 "$f" | sed 's/^# //')"
        grep '^|' "$f" | cut -c1-160
    done
    if [[ -f $OUT/kernels/kernels.md ]]; then
        echo "-- kernels ($(grep -c '^| [a-z]' "$OUT/kernels/kernels.md") rows; full table in kernels/kernels.md)"
        grep -m 2 -E '^- (GPU memory|copy bandwidth)' "$OUT/kernels/kernels.md"
        grep '^|' "$OUT/kernels/kernels.md" | head -n 14 | cut -c1-160
    fi
    if [[ -f $OUT/train-cifar10/cost.md ]]; then
        echo "-- CIFAR-10 training"
        grep -A 4 '^| method | epochs' "$OUT/train-cifar10/cost.md" | cut -c1-160
    fi
} | tee "$OUT/summary.txt"
