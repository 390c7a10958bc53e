#!/usr/bin/env bash
# The GPU suite: every figure a lent GPU should produce, in one call of at most 10 minutes (570 s of command time,
# install included), written as one summary.md (tables to paste into the README) and summary.json.
#
# On the lent machine (the device tool's `run`, from the repository root; its image has python3 3.12,
# torch 2.11 cu130, triton 3.6, nvcc 13.0 and no network):
#   1. Before the call, here, put the CIFAR-10 archive into the work tree as an untracked file (19.6 MB; untracked
#      files travel with the tree): cp ../shared/data/cifar10-jpeg.tar.gz cifar10-jpeg.tar.gz
#   2. run(command="SUITE_COMMIT=<git rev-parse --short HEAD> benchmarks/gpu_suite.sh --export $OUT /tmp/suite",
#      timeout_s=600); `--dry-run` prints this command with the commit filled in, and the plan below.
#      $OUT then holds summary.md, summary.json and logs.tar.gz, rewritten after every step, so a cut-short
#      call still returns what finished. Without the archive the training step is skipped (recorded as SKIP).
#   3. If a part failed, fix it and rerun only that part: --part a (install, sm_90 precompile, GPU tests, kernel
#      table) or --part b (cost per step, eager vs graphs, CIFAR-10 training, PGD-20 eval speed, compile); each part
#      works alone, and part b installs first when the CUDA extension is not built yet.
#   Then: rm cifar10-jpeg.tar.gz
#
# Usage: benchmarks/gpu_suite.sh [--dry-run] [--part a|b|all] [--export DIR] OUTDIR [CIFAR_TGZ]
#   --dry-run   print the GPU plan and the command, then run every step on the CPU at tiny sizes: the same
#               commands, parsing and summary (CI runs this)
#   CIFAR_TGZ   default: cifar10-jpeg.tar.gz in the repository root, if present
# Plan: expected seconds of command time on an H100/H200 with 16 cores (PLAN below), most valuable figures first;
# each step's timeout is its plan + 30% (at least 30 s), cut to what is left of the budget. Budget: all 570,
# part a 300, part b 400 (dry run: 3000, each step at most 900); SUITE_BUDGET_S overrides. A failed or timed-out
# step is recorded and the suite goes on.
# Environment: PYTHON (default python3), SUITE_BUDGET_S, SUITE_COMMIT (the commit, where the copy has no .git),
# TRAIN_EPOCHS (default 1), MAX_JOBS (default nproc), TRITON_CACHE_DIR (default OUTDIR/triton-cache).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

DRY=0 PART=all EXPORT=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1; shift ;;
        --part) PART=${2:-}; shift 2 ;;
        --export) EXPORT=${2:-}; shift 2 ;;
        -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
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
# Expected seconds of each step on the GPU, in the order they run. install: CUDA + C++ extensions with nvcc on 16
# cores; precompile: every Triton specialisation for sm_90 on 16 processes (242 at 0.25-2.5 s each under Triton 3.6,
# 206 s in all on this project's 2-core VM: 15-20 s on 16 cores, plus imports) into the cache the GPU tests read,
# so their JIT is a cache load (cold, it would be 60-120 s inside the tests); cost_*:
# 4 methods x (3 warm-up + 10 timed steps) x 2 rounds plus capture; compile: clean and APART in one process.
PLAN=(env:5 install:100 info:5 precompile:35 gpu_tests:75 cost_b128:35 kernels:50 cost_b128_eager:30 train:60
      eval_speed:30 cost_b512:40 cost_b128_compile:70)
PART_A=" env install info precompile gpu_tests kernels "
PART_B=" env install cost_b128 cost_b128_eager train eval_speed cost_b512 cost_b128_compile "
plan_of() { local e; for e in "${PLAN[@]}"; do [[ ${e%%:*} == "$1" ]] && { echo "${e##*:}"; return; }; done; echo 0; }
case $PART in all) GPU_BUDGET=570 ;; a) GPU_BUDGET=300 ;; b) GPU_BUDGET=400 ;; esac
# The dry run's CPU work has nothing to do with the GPU plan: each of its steps may take up to 15 minutes of a
# 50-minute budget (a shared 2-core machine can be ten times slower than an idle one).
DEFAULT_BUDGET=$GPU_BUDGET DRY_CAP=900
if [[ $DRY == 1 ]]; then DEFAULT_BUDGET=3000; fi
BUDGET=${SUITE_BUDGET_S:-$DEFAULT_BUDGET}
RESERVE=10  # seconds kept for the last summary
START=$(date +%s)
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
[[ -n $EXPORT ]] && { mkdir -p "$EXPORT" && EXPORT=$(cd "$EXPORT" && pwd) || exit 1; }
STEPS="$OUT/steps.tsv"
[[ -f $STEPS ]] || printf 'step\tstatus\trc\tseconds\tlog\n' > "$STEPS"
COMMIT=$(git rev-parse --short HEAD 2> /dev/null) || COMMIT=${SUITE_COMMIT:-}
[[ -n $COMMIT ]] || COMMIT="unknown: no git metadata in this copy (pass SUITE_COMMIT)"
planned=0 plan_text="" plan_json=""
for e in "${PLAN[@]}"; do
    [[ $PART == all || ( $PART == a && $PART_A == *" ${e%%:*} "* ) || ( $PART == b && $PART_B == *" ${e%%:*} "* ) ]] \
        || continue
    planned=$(( planned + ${e##*:} )); plan_text+="${e%%:*} ${e##*:}, "; plan_json+="\"${e%%:*}\": ${e##*:}, "
done
printf '{"started": "%s", "part": "%s", "budget_s": %s, "gpu_budget_s": %s, "planned_s": %s, "plan": {%s}, "dry_run": %s, "commit": "%s"}\n' \
    "$(date -u +%FT%TZ)" "$PART" "$BUDGET" "$GPU_BUDGET" "$planned" "${plan_json%, }" \
    "$([[ $DRY == 1 ]] && echo true || echo false)" "$COMMIT" > "$OUT/suite.json"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT/triton-cache}  # the precompile step fills it, the GPU tests read it

left() { echo $(( BUDGET - ($(date +%s) - START) - RESERVE )); }

# The summary (and the export) after every step, so a call cut short still returns the finished figures.
summarize() {
    "$PY" benchmarks/gpu_summary.py "$OUT" > /dev/null 2>> "$OUT/summary.err"
    if [[ -n $EXPORT ]]; then
        cp -f "$OUT/summary.md" "$OUT/summary.json" "$EXPORT/" 2> /dev/null
        tar -czf "$EXPORT/logs.tar.gz" --exclude='*.pt' --exclude=triton-cache -C "$OUT" . 2> /dev/null
    fi
}

# step NAME COMMAND...: run with timeout min(max(plan + 30%, 30 s), time left) (the dry run: DRY_CAP), log to
# OUT/NAME.log, record the outcome (30 s at least: a python start importing torch and triton can take 10-20 s).
step() {
    local name=$1 cap
    cap=$(( $(plan_of "$1") * 13 / 10 ))
    (( cap < 30 )) && cap=30
    [[ $DRY == 1 ]] && cap=$DRY_CAP
    shift
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

PIP=("$PY" -m pip --disable-pip-version-check)  # the lent machine has no network
if [[ $DRY == 1 ]]; then
    DEVICE=cpu DTYPE=fp32 CB=aot_eager
    KFILTER="2x3x8x8 and not compile"
    MODEL=(--model smallcnn --width 4 --dataset synthetic --synthetic-n 64 --pgd-steps 2)
    TIMING=(--warmup 1 --steps 1 --rounds 1)
    B_SMALL=16 B_LARGE=32
    TRAIN_DATA=(--dataset synthetic --synthetic-n 64 --model smallcnn --width 4 --batch-size 16 --pgd-steps 2 --eval-n 16)
    EVAL_SPEED=(--device cpu --model smallcnn --width 4 --size 8 --n 32 --batches 16)
    INSTALL=(bash -c "$(printf '%q ' "${PIP[@]}") --version && '$PY' -c 'import apart_fast.ops.dispatch; print(\"dry run: no build, the installed package imports\")'")
    PRECOMPILE=(--only "pack_sign fp32 n=8192" --jobs 1)  # one specialisation, in-process: the same command, seconds
    XDIST=()
else
    DEVICE=cuda CB=inductor
    DTYPE=$("$PY" -c "import torch; print('bf16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'fp32')" 2>/dev/null)
    [[ $DTYPE == bf16 ]] || DTYPE=fp32
    KFILTER="(128x3x32x32 or 128x64x32x32 or 16M) and not compile"
    MODEL=(--model preact18 --width 64 --dataset synthetic --image-size 32 --synthetic-n 4096 --epoch-size 50000)
    TIMING=(--warmup 3 --steps 10 --rounds 2)
    B_SMALL=128 B_LARGE=512
    TRAIN_DATA=(--dataset cifar10 --data-dir "$CIFAR" --model preact18 --width 64 --batch-size 128 --eval-n 1000)
    EVAL_SPEED=(--device cuda --model preact18 --width 64 --size 32 --n 4096 --batches 256,1024)
    # A CUDA extension that fails to build fails this step with nvcc's error (APART_FAST_FORCE_CUDA: no silent
    # fallback to Triton or the reference), and the import proves it loads.
    INSTALL=(bash -c "APART_FAST_FORCE_CUDA=1 $(printf '%q ' "${PIP[@]}") install --no-build-isolation --no-deps -e . \
        && '$PY' -c 'import apart_fast._C_cuda; print(\"CUDA extension built and loaded\")'")
    PRECOMPILE=()
    # pytest-xdist where installed (the GPU image has it): tests spread one by one over 8 processes sharing the GPU
    XDIST=()
    "$PY" -c "import xdist" > /dev/null 2>&1 && XDIST=(-n 8 --dist load)
fi
COST=(--device "$DEVICE" --dtype "$DTYPE" --no-progress "${MODEL[@]}" "${TIMING[@]}")

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
print("suite-env nvcc:", nvcc[-1] if nvcc else "not found")
print(run(["nvidia-smi"]))'

echo "gpu_suite: part $PART, budget ${BUDGET}s, $( [[ $DRY == 1 ]] && echo 'CPU dry run' || echo "device $DEVICE, $DTYPE"), out $OUT"
echo "gpu_suite: plan on the GPU (seconds): ${plan_text%, } = ${planned} s of the ${GPU_BUDGET} s budget"
if [[ $DRY == 1 ]]; then
    echo "gpu_suite: on the lent machine: run(command=\"SUITE_COMMIT=${COMMIT%%:*} benchmarks/gpu_suite.sh --export \$OUT /tmp/suite\", timeout_s=600)"
fi
step env "$PY" -c "$ENV_CMD"

if [[ $PART != b ]] || ! "$PY" -c "import apart_fast._C_cuda, apart_fast.kernels" > /dev/null 2>&1 || [[ $DRY == 1 ]]; then
    step install "${INSTALL[@]}"
fi

if [[ $PART != b ]]; then
    step info "$PY" -c "import apart_fast.ops.dispatch as d, torch; print({b: d.available(b) or d.unavailable_reason(b) for b in d.BACKENDS}); print('auto backend:', d.auto_backend(torch.device('$DEVICE')))"
    step precompile "$PY" benchmarks/sm90_report.py --no-nvcc --jobs "$(nproc)" --cache-dir "$TRITON_CACHE_DIR" \
        --out "$OUT/sm90" "${PRECOMPILE[@]}"
    step gpu_tests "$PY" -m pytest -m gpu -v -p no:cacheprovider "${XDIST[@]}" tests
fi
if [[ $PART != a ]]; then
    step cost_b128 "$PY" -m apart_fast bench cost "${COST[@]}" --methods clean,fgsm_rs,pgd,apart --batch-size "$B_SMALL" \
        --cuda-graphs --out "$OUT/cost-b128"
fi
if [[ $PART != b ]]; then
    step kernels "$PY" -m apart_fast bench kernels --filter "$KFILTER" --out "$OUT/kernels" \
        --timeout $(( DRY == 1 ? DRY_CAP - 30 : $(plan_of kernels) ))
fi
if [[ $PART != a ]]; then
    step cost_b128_eager "$PY" -m apart_fast bench cost "${COST[@]}" --methods clean,fgsm_rs,pgd,apart \
        --batch-size "$B_SMALL" --no-cuda-graphs --out "$OUT/cost-b128-eager"
    if [[ $DRY == 1 || ( -n $CIFAR && -f $CIFAR ) ]]; then
        step train "$PY" -m apart_fast bench cost --methods pgd,apart "${TRAIN_DATA[@]}" --device "$DEVICE" \
            --dtype "$DTYPE" --warmup 2 --steps 3 --train-epochs "${TRAIN_EPOCHS:-1}" --eval --no-progress --out "$OUT/train"
    else
        skip train "no CIFAR-10 archive: cifar10-jpeg.tar.gz in the repository root, or the 2nd argument"
    fi
    step eval_speed "$PY" benchmarks/eval_speed.py "${EVAL_SPEED[@]}"
    step cost_b512 "$PY" -m apart_fast bench cost "${COST[@]}" --methods clean,fgsm_rs,pgd,apart --batch-size "$B_LARGE" \
        --cuda-graphs --out "$OUT/cost-b512"
    # torch.compile last, its time the least predictable: clean and APART in one process (shared warm caches)
    step cost_b128_compile "$PY" -m apart_fast bench cost "${COST[@]}" --methods clean,apart --batch-size "$B_SMALL" \
        --cuda-graphs --compile --compile-backend "$CB" --out "$OUT/cost-b128-compile"
fi

summarize
echo
echo "================ gpu_suite: $(( $(date +%s) - START ))s of ${BUDGET}s -> $OUT/summary.md"
cat "$OUT/summary.md"
# exit status: 0 when every step that ran succeeded
! cut -f2 "$STEPS" | grep -qxE 'FAIL|TIMEOUT'
