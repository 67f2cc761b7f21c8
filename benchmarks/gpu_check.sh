#!/usr/bin/env bash
# One prepared check for a lent GPU (H200 image: Python 3.12, torch 2.11, triton 3.6, nvcc 13.0,
# no network: everything is built from this checkout). Run from anywhere:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh [--quick]
#
# 1. builds fair_pruner from source with the CUDA extension (sm_90),
# 2. runs the kernel tests on the GPU (Triton compiled, not interpreted; CUDA C++),
# 3. benchmarks each op on every GPU backend against eager PyTorch and against the
#    memory-bandwidth floor (bytes moved / measured copy bandwidth), checking outputs,
# 4. scores LMs on the GPU against the forward + backward they ride on (SmolLM2-135M's and
#    Llama-3-8B's shapes, random weights, bf16): time and peak GPU memory of each, the
#    measured side of the on-paper 8B / 70B estimate in benchmarks/README.md,
# 5. prints a short table; full logs and JSON go under $OUT (at most 8 files).
# Each step has its own time limit; a failed step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
QUICK=${1:-}
export FAIR_PRUNER_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
export TRITON_INTERPRET=0 FAIR_PRUNER_BENCH_THREADS=${FAIR_PRUNER_BENCH_THREADS:-16}
export PATH="$CUDA_HOME/bin:$PATH"
status=0

step() {  # step NAME LIMIT_S LOGFILE CMD...: run with a limit, log to $OUT/LOGFILE, keep going
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$log" 2>&1; then
    echo "   ok in $((SECONDS - t0)) s"
  else
    local rc=$?
    echo "   FAILED (rc $rc) after $((SECONDS - t0)) s; tail of $log:"
    tail -n 25 "$OUT/$log" | sed 's/^/   | /'
    status=1
  fi
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --no-deps: the image has its own torch and no network (pyproject pins torch for CPU machines).
step "build (CPU + CUDA extensions)" 420 build.log \
  "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" - <<'EOF' | tee -a "$OUT/env.txt"
import warnings
warnings.simplefilter("ignore")
from fair_pruner import ops
print("backends on cuda:", {op: ops.active_backend(op, "cuda") for op in ops.OP_NAMES})
print("backends on cpu: ", {op: ops.active_backend(op, "cpu") for op in ops.OP_NAMES})
EOF

if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
  step "GPU tests (CUDA C++, compiled Triton, CPU backends)" 420 tests.log \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels_triton.py \
    tests/test_ops_backends.py
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1
else
  echo "== GPU tests skipped: pytest/hypothesis not installed here (bench --check still compares)"
fi

step "kernel benchmarks vs eager and the bandwidth floor" 420 bench.txt \
  "$PY" benchmarks/bench_ops.py --device cuda --repeats 20 --json "$OUT/bench_gpu.json" $QUICK
echo "== table (ms; x vs eager; floor = bytes moved / copy bandwidth)"
grep -v "^#" "$OUT/bench.txt" | sed 's/^/   /'

# One JSON line per model: seconds of fp.score (with and without the Gram matrices) against
# the plain forward + backward and the activations-only one, and each one's peak GPU memory.
step "LM scoring vs forward + backward on the GPU (random weights, bf16)" 420 lm.log bash -c "
  \"$PY\" benchmarks/bench_llm_overhead.py --random smollm2-135m --device cuda --dtype bfloat16 \
    --seqs 64 --seq-len 512 --repeats 2 --threads 16 &&
  \"$PY\" benchmarks/bench_llm_overhead.py --random llama3-8b --device cuda --dtype bfloat16 \
    --seqs 8 --seq-len 2048 --repeats 1 --threads 16 --gram-memory 40"
grep "^{" "$OUT/lm.log" | sed 's/^/   /'
echo "results under $OUT"
exit $status
