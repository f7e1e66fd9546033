#!/usr/bin/env bash
# Everything that needs a GPU, for when a CUDA machine is lent. Installs nothing (the
# machine must already have torch with CUDA, triton, pytest; the agent stage also needs
# the serving extra: openai, starlette, uvicorn, websockets). Stages (default: all, in
# this order; name some to run only those, e.g. to stay within a 10-minute call):
#   kernels  = kernel-tests + kernel-bench                                  (issue 3)
#   kernel-tests  gpu-marked kernel tests (CUDA matrix, graphs, int64, copies)
#   kernel-bench  bench_attention, bench_copy
#   model    gpu-marked model tests (CUDA forward, bf16, CUDA graphs)        (issue 7)
#   offload  bench_offload: session offload/restore vs pinned copy_, decode
#            timing with and without a concurrent offload                    (issue 4)
#   agent    bench_agent_loop on the 1B-shaped model, 16 concurrent sessions (issue 7);
#            the device image lacks openai/starlette/uvicorn/websockets: fetch them here
#            with benchmarks/fetch_gpu_wheels.sh and carry gpu_wheels/ with the call
#            (installed from there, without network, into a temporary directory)
# Every output, and the benchmarks' --json files, go under $OUT (default ./out/gpu_suite).
# Usage: OUT=/some/dir bash benchmarks/gpu_suite.sh [--quick] [STAGE ...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_suite}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compile for the GPU; the interpreted CPU tests skip there
PY="${PYTHON:-python3}"  # the device image's python3 holds PyTorch
QUICK=""
STAGES=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK="--quick" ;;
    kernels) STAGES+=(kernel-tests kernel-bench) ;;
    kernel-tests|kernel-bench|model|offload|agent) STAGES+=("$arg") ;;
    *) echo "gpu_suite: unknown argument '$arg' (stages: kernels kernel-tests kernel-bench model offload agent)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(kernel-tests kernel-bench model offload agent)

{
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/nvidia-smi.txt" 2>&1

# tests/conftest.py needs hypothesis; without it run the tests without conftest
# (the gpu marker is registered in pyproject.toml, and this machine has a GPU).
NOCONF=""
$PY -c "import hypothesis" 2>/dev/null || NOCONF="--noconftest"
status=0
for stage in "${STAGES[@]}"; do
  echo "== gpu_suite stage $stage"
  case "$stage" in
    kernel-tests)
      $PY -m pytest tests/test_kernels_gpu.py tests/test_kernels_strided_index.py -m gpu -q -rfEs \
        $NOCONF -p no:cacheprovider >"$OUT/gpu_tests.txt" 2>&1 || status=$?
      tail -n 5 "$OUT/gpu_tests.txt"
      ;;
    kernel-bench)
      $PY benchmarks/bench_attention.py $QUICK --json "$OUT/bench_attention.json" \
        >"$OUT/bench_attention.txt" 2>&1 || status=$?
      tail -n 30 "$OUT/bench_attention.txt"
      $PY benchmarks/bench_copy.py --json "$OUT/bench_copy.json" \
        >"$OUT/bench_copy.txt" 2>&1 || status=$?
      tail -n 16 "$OUT/bench_copy.txt"
      ;;
    model)
      $PY -m pytest tests/test_model_gpu.py -m gpu -q -rfEs $NOCONF -p no:cacheprovider \
        >"$OUT/model_gpu_tests.txt" 2>&1 || status=$?
      tail -n 5 "$OUT/model_gpu_tests.txt"
      ;;
    offload)
      $PY benchmarks/bench_offload.py --json "$OUT/bench_offload.json" \
        >"$OUT/bench_offload.txt" 2>&1 || status=$?
      tail -n 20 "$OUT/bench_offload.txt"
      ;;
    agent)
      if ! $PY -c "import openai, starlette, uvicorn, websockets" 2>/dev/null; then
        if [ -d gpu_wheels ]; then
          DEPS="${TMPDIR:-/tmp}/pagedkv_gpu_deps"
          $PY -m pip install -q --no-index --no-deps --target "$DEPS" gpu_wheels/*.whl \
            >"$OUT/agent_wheels.txt" 2>&1 || status=$?
          export PYTHONPATH="$PYTHONPATH:$DEPS"
        else
          echo "agent stage: openai/starlette/uvicorn/websockets missing and no gpu_wheels/" \
            "(run benchmarks/fetch_gpu_wheels.sh here and carry gpu_wheels)"
          status=1
          continue
        fi
      fi
      $PY benchmarks/bench_agent_loop.py --model llama_1b --device cuda --dtype bfloat16 \
        --sessions 16 --repeats 1 --json "$OUT/bench_agent_loop.json" \
        >"$OUT/bench_agent_loop.txt" 2>&1 || status=$?
      tail -n 45 "$OUT/bench_agent_loop.txt"
      ;;
  esac
done

echo "gpu_suite: exit status $status; outputs in $OUT"
exit "$status"
