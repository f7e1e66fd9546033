#!/usr/bin/env bash
# The kernel checks that need a GPU, in one go, for when a CUDA machine is lent:
# gpu-marked kernel tests, then bench_attention and bench_copy. Installs nothing (the
# machine must already have torch with CUDA, triton and pytest). Every output, and the
# benchmarks' --json files, go under $OUT (default ./out/gpu_suite):
#   nvidia-smi.txt  gpu_tests.txt  bench_attention.txt/.json  bench_copy.txt/.json
# Usage: OUT=/some/dir bash benchmarks/gpu_suite.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_suite}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compile for the GPU; the interpreted CPU tests skip there
QUICK="${1:-}"

{
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/nvidia-smi.txt" 2>&1

# tests/conftest.py needs hypothesis; without it run the kernel tests without conftest
# (the gpu marker is registered in pyproject.toml, and this machine has a GPU).
NOCONF=""
python -c "import hypothesis" 2>/dev/null || NOCONF="--noconftest"
status=0
python -m pytest tests/test_kernels_gpu.py -m gpu -q -rfEs $NOCONF -p no:cacheprovider \
  >"$OUT/gpu_tests.txt" 2>&1 || status=$?
tail -n 5 "$OUT/gpu_tests.txt"

python benchmarks/bench_attention.py $QUICK --json "$OUT/bench_attention.json" \
  >"$OUT/bench_attention.txt" 2>&1 || status=$?
tail -n 30 "$OUT/bench_attention.txt"

python benchmarks/bench_copy.py --json "$OUT/bench_copy.json" >"$OUT/bench_copy.txt" 2>&1 || status=$?
tail -n 16 "$OUT/bench_copy.txt"

echo "gpu_suite: exit status $status; outputs in $OUT"
exit "$status"
