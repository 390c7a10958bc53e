#!/usr/bin/env bash
# The GPU suite: every figure a lent GPU should produce, in at most 6 minutes of command time (install included),
# written as one summary.md (tables to paste into the README) and summary.json.
#
# On the lent machine (the device tool's `run`, from the repository root; its image has python3 3.12,
# torch 2.11 cu130, triton 3.6, nvcc 13.0 and no network):
#   1. Before the call, here, put the CIFAR-10 archive into the work tree as an untracked file (19.6 MB; untracked
#      files travel with the tree): cp ../shared/data/cifar10-jpeg.tar.gz cifar10-jpeg.tar.gz
#   2. run(command="benchmarks/gpu_suite.sh --export $OUT /tmp/suite", timeout_s=420)
#      $OUT then holds summary.md, summary.json and logs.tar.gz, rewritten after every step, so a cut-short
#      call still returns what finished. Without the archive the training step is skipped (recorded as SKIP).
#   3. If a part failed, fix it and rerun only that part: --part a (install, GPU tests, kernel table) or
#      --part b (cost per step, eager vs graphs vs compile, CIFAR-10 training, PGD-20 eval speed); each part works alone, and
#      part b installs first when the CUDA extension is not built yet.
#   Then: rm cifar10-jpeg.tar.gz
#
# Usage: benchmarks/gpu_suite.sh [--dry-run] [--part a|b|all] [--export DIR] OUTDIR [CIFAR_TGZ]
#   --dry-run   every step on the CPU at tiny sizes: the same commands, parsing and summary (CI runs this)
#   CIFAR_TGZ   default: cifar10-jpeg.tar.gz in the repository root, if present
# Budget (seconds of command time, each step's timeout cut to what is left): all 345, part a 200, part b 200
# (dry run: 1800, step caps x8); SUITE_BUDGET_S overrides. A failed or timed-out step is recorded and the suite goes on.
# Environment: PYTHON (default python3), SUITE_BUDGET_S, TRAIN_EPOCHS (default 1), MAX_JOBS (default nproc).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

DRY=0 PART=all EXPORT=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1; shift ;;
        --part) PART=${2:-}; shift 2 ;;
        --export) EXPORT=${2:-}; shift 2 ;;
        -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
        -*) echo "gpu_suite: unknown option $1; see --help" >&2; exit 2 ;;
        *) break ;;
    esac
done
case $PART in a | b | all) ;; *) echo "gpu_suite: --part $PART; use a, b or all" >&2; exit 2 ;; esac
[[ $# -ge 1 ]] || { echo "gpu_suite: give the output folder: benchmarks/gpu_suite.sh [options] OUTDIR [CIFAR_TGZ]" >&2; exit 2; }
OUT=$1
CIFAR=${2:-}
[[ -z $CIFAR && -f $ROOT/cifar10-jpeg.tar.gz ]] && CIFAR=$ROOT/cifar10-jpeg.tar.gz
PY=${PYTHON:-python3}
case $PART in all) DEFAULT_BUDGET=345 ;; *) DEFAULT_BUDGET=200 ;; esac
CAPX=1  # step caps are multiplied by this: the dry run's CPU is slower at everything
if [[ $DRY == 1 ]]; then DEFAULT_BUDGET=1800 CAPX=8; fi
BUDGET=${SUITE_BUDGET_S:-$DEFAULT_BUDGET}
RESERVE=10  # seconds kept for the last summary
START=$(date +%s)
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
[[ -n $EXPORT ]] && { mkdir -p "$EXPORT" && EXPORT=$(cd "$EXPORT" && pwd) || exit 1; }
STEPS="$OUT/steps.tsv"
[[ -f $STEPS ]] || printf 'step\tstatus\trc\tseconds\tlog\n' > "$STEPS"
printf '{"started": "%s", "part": "%s", "budget_s": %s, "dry_run": %s}\n' "$(date -u +%FT%TZ)" "$PART" "$BUDGET" \
    "$([[ $DRY == 1 ]] && echo true || echo false)" > "$OUT/suite.json"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

left() { echo $(( BUDGET - ($(date +%s) - START) - RESERVE )); }

# The summary (and the export) after every step, so a call cut short still returns the finished figures.
summarize() {
    "$PY" benchmarks/gpu_summary.py "$OUT" > /dev/null 2>> "$OUT/summary.err"
    if [[ -n $EXPORT ]]; then
        cp -f "$OUT/summary.md" "$OUT/summary.json" "$EXPORT/" 2> /dev/null
        tar -czf "$EXPORT/logs.tar.gz" --exclude='*.pt' -C "$OUT" . 2> /dev/null
    fi
}

# step NAME CAP_SECONDS COMMAND...: run with timeout min(CAP, time left), log to OUT/NAME.log, record the outcome.
step() {
    local name=$1 cap=$(( $2 * CAPX ))
    shift 2
    local t log="$OUT/$name.log" s0 rc status
    t=$(left)
    (( t > cap )) && t=$cap
    if (( t < 10 )); then
        echo "== $name: SKIPPED (suite budget spent)"
        printf '%s\tSKIP\t-\t0\t%s\n' "$name" "no time left" >> "$STEPS"
        return 0
    fi
    echo "== $name (timeout ${t}s): $*"
    s0=$(date +%s)
    timeout --kill-after=5 "$t" "$@" > "$log" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124 | 137) status=TIMEOUT ;; *) status=FAIL ;; esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - s0 ))" "$name.log" >> "$STEPS"
    echo "   $status (rc $rc, $(( $(date +%s) - s0 ))s)"
    [[ $status == ok ]] || tail -n 5 "$log" | sed 's/^/   | /'
    summarize
}

skip() {  # skip NAME REASON
    echo "== $1: SKIPPED ($2)"
    printf '%s\tSKIP\t-\t0\t%s\n' "$1" "$2" >> "$STEPS"
    summarize
}

if [[ $DRY == 1 ]]; then
    DEVICE=cpu DTYPE=fp32 CB=aot_eager
    KFILTER="2x3x8x8 and not compile"
    MODEL=(--model smallcnn --width 4 --dataset synthetic --synthetic-n 64 --pgd-steps 2)
    TIMING=(--warmup 1 --steps 1 --rounds 1)
    B_SMALL=16 B_LARGE=32
    TRAIN_DATA=(--dataset synthetic --synthetic-n 64 --model smallcnn --width 4 --batch-size 16 --pgd-steps 2 --eval-n 16)
    EVAL_SPEED=(--device cpu --model smallcnn --width 4 --size 8 --n 32 --batches 16)
    INSTALL=(bash -c "'$PY' -m pip --version && '$PY' -c 'import apart_fast.ops.dispatch; print(\"dry run: no build, the installed package imports\")'")
else
    DEVICE=cuda CB=inductor
    DTYPE=$("$PY" -c "import torch; print('bf16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'fp32')" 2>/dev/null)
    [[ $DTYPE == bf16 ]] || DTYPE=fp32
    KFILTER="(128x3x32x32 or 128x64x32x32) and not compile"
    MODEL=(--model preact18 --width 64 --dataset synthetic --image-size 32 --synthetic-n 4096 --epoch-size 50000)
    TIMING=(--warmup 5 --steps 10 --rounds 2)
    B_SMALL=128 B_LARGE=512
    TRAIN_DATA=(--dataset cifar10 --data-dir "$CIFAR" --model preact18 --width 64 --batch-size 128 --eval-n 1000)
    EVAL_SPEED=(--device cuda --model preact18 --width 64 --size 32 --n 2048 --batches 256,1024)
    INSTALL=("$PY" -m pip install --no-build-isolation --no-deps -e .)
fi
COST=(--device "$DEVICE" --dtype "$DTYPE" --no-progress --methods clean,fgsm_rs,pgd,apart "${MODEL[@]}" "${TIMING[@]}")

ENV_CMD='import sys, subprocess, torch
def run(c):
    try:
        return subprocess.run(c, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        return f"unavailable ({type(e).__name__})"
try:
    import triton
    tv = triton.__version__
except Exception as e:
    tv = f"absent ({type(e).__name__})"
nvcc = run(["nvcc", "--version"]).splitlines()
print("suite-env python:", sys.version.split()[0])
print("suite-env torch:", torch.__version__)
print("suite-env torch_cuda:", torch.version.cuda)
print("suite-env triton:", tv)
print("suite-env gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
print("suite-env nvcc:", nvcc[-1] if nvcc else "-")
print("suite-env commit:", run(["git", "rev-parse", "--short", "HEAD"]) or "-")
print(run(["nvidia-smi"]))'

echo "gpu_suite: part $PART, budget ${BUDGET}s, $( [[ $DRY == 1 ]] && echo 'CPU dry run' || echo "device $DEVICE, $DTYPE"), out $OUT"
step env 30 "$PY" -c "$ENV_CMD"

if [[ $PART != b ]] || ! "$PY" -c "import apart_fast._C_cuda, apart_fast.kernels" > /dev/null 2>&1 || [[ $DRY == 1 ]]; then
    step install 170 "${INSTALL[@]}"
fi

if [[ $PART != b ]]; then
    step info 30 "$PY" -c "import apart_fast.ops.dispatch as d, torch; print({b: d.available(b) or d.unavailable_reason(b) for b in d.BACKENDS}); print('auto backend:', d.auto_backend(torch.device('$DEVICE')))"
    XDIST=()  # pytest-xdist where installed (the GPU image has it): several test processes share the GPU
    "$PY" -c "import xdist" > /dev/null 2>&1 && XDIST=(-n 4 --dist loadfile)
    step gpu_tests 90 "$PY" -m pytest -m gpu -v -p no:cacheprovider "${XDIST[@]}" tests
    step kernels 75 "$PY" -m apart_fast bench kernels --filter "$KFILTER" --out "$OUT/kernels" --timeout $(( 65 * CAPX ))
fi

if [[ $PART != a ]]; then
    step cost_b128 60 "$PY" -m apart_fast bench cost "${COST[@]}" --batch-size "$B_SMALL" --cuda-graphs --out "$OUT/cost-b128"
    step cost_b512 70 "$PY" -m apart_fast bench cost "${COST[@]}" --batch-size "$B_LARGE" --cuda-graphs --out "$OUT/cost-b512"
    step cost_b128_eager 45 "$PY" -m apart_fast bench cost "${COST[@]}" --batch-size "$B_SMALL" --no-cuda-graphs \
        --out "$OUT/cost-b128-eager"
    if [[ $DRY == 1 || ( -n $CIFAR && -f $CIFAR ) ]]; then
        step train 100 "$PY" -m apart_fast bench cost --methods pgd,apart "${TRAIN_DATA[@]}" --device "$DEVICE" \
            --dtype "$DTYPE" --warmup 2 --steps 3 --train-epochs "${TRAIN_EPOCHS:-1}" --eval --no-progress --out "$OUT/train"
    else
        skip train "no CIFAR-10 archive: cifar10-jpeg.tar.gz in the repository root, or the 2nd argument"
    fi
    step eval_speed 45 "$PY" benchmarks/eval_speed.py "${EVAL_SPEED[@]}"
    # torch.compile last: its compile time is the least predictable
    step cost_b128_compile 120 "$PY" -m apart_fast bench cost "${COST[@]}" --batch-size "$B_SMALL" --cuda-graphs \
        --compile --compile-backend "$CB" --out "$OUT/cost-b128-compile"
fi

summarize
echo
echo "================ gpu_suite: $(( $(date +%s) - START ))s of ${BUDGET}s -> $OUT/summary.md"
cat "$OUT/summary.md"
# exit status: 0 when every step that ran succeeded
! cut -f2 "$STEPS" | grep -qxE 'FAIL|TIMEOUT'
