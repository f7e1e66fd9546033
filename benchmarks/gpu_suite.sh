#!/usr/bin/env bash
# Everything that needs a GPU, for when a CUDA machine is lent, run on the installed
# package: the checkout is installed (no dependencies, no network) into a temporary
# directory with any wheels carried in gpu_wheels/ (benchmarks/fetch_gpu_wheels.sh
# fetches what the device image lacks: xxhash, the serving stack, the openai client),
# and every stage imports pagedkv from there, never from the checkout.
#
# Stages (default: all, in this order; name some to run only those, e.g. to stay within
# a 10-minute call):
#   resources     registers/spills/shared memory of every kernel for sm_80 and sm_90
#                 (benchmarks/kernel_resources.py --check; no GPU needed)    (issue 17)
#   kernels  = kernel-tests + kernel-bench                                  (issue 3)
#   kernel-tests  gpu-marked kernel tests (CUDA matrix, graphs, int64, copies)
#   kernel-bench  bench_attention, bench_copy
#   model    gpu-marked model tests (CUDA forward, bf16, CUDA graphs)        (issue 7)
#   offload  bench_offload: session offload/restore vs pinned copy_, decode
#            timing with and without a concurrent offload                    (issue 4);
#            layer-wise restore tests (CUDA events) and TTFT with/without overlap (issue 18)
#   agent    bench_agent_loop on the 1B-shaped model, 16 concurrent sessions (issue 7)
# Every output, and the benchmarks' --json files, go under $OUT (default ./out/gpu_suite).
#
# Usage: OUT=/some/dir bash benchmarks/gpu_suite.sh [--quick] [--dry-run] [STAGE ...]
#   --dry-run  on any machine (no GPU needed): checks the arguments, installs the package
#              as a real run does, checks that every file a stage runs exists, that the
#              tests collect and that every benchmark imports (its --help), then prints
#              the commands it would run. Exit status 0 when all of that holds.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT="${OUT:-out/gpu_suite}"
PY="${PYTHON:-python3}"  # the device image's python3 holds PyTorch
QUICK=""
DRY=0
STAGES=()
ALL_STAGES=(resources kernel-tests kernel-bench model offload agent hf)
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK="--quick" ;;
    --dry-run) DRY=1 ;;
    kernels) STAGES+=(kernel-tests kernel-bench) ;;
    resources|kernel-tests|kernel-bench|model|offload|agent|hf) STAGES+=("$arg") ;;
    *) echo "gpu_suite: unknown argument '$arg' (stages: ${ALL_STAGES[*]} kernels; options: --quick --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
$PY -P -c pass 2>/dev/null || { echo "gpu_suite: $PY must be Python 3.11 or newer (it runs with -P)" >&2; exit 2; }
mkdir -p "$OUT" || { echo "gpu_suite: cannot create OUT=$OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"

# -- install: carried wheels, then the checkout itself, into one private directory -----
SITE="$(mktemp -d "${TMPDIR:-/tmp}/pagedkv_gpu_site.XXXXXX")"
trap 'rm -rf "$SITE"' EXIT
if ls gpu_wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target "$SITE" gpu_wheels/*.whl \
    >"$OUT/install_wheels.txt" 2>&1 || { echo "gpu_suite: installing gpu_wheels/ failed (see $OUT/install_wheels.txt)" >&2; exit 1; }
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$REPO" \
  >"$OUT/install_pagedkv.txt" 2>&1 || { echo "gpu_suite: installing pagedkv failed (see $OUT/install_pagedkv.txt)" >&2; exit 1; }
export PYTHONPATH="$SITE"
# -P: do not put the working directory (the checkout) on sys.path
RUN="$PY -P"
WHERE="$($RUN -c 'import pagedkv, os; print(os.path.dirname(pagedkv.__file__))' 2>&1)" || {
  echo "gpu_suite: the installed pagedkv does not import: $WHERE" >&2
  echo "  (missing dependencies? run benchmarks/fetch_gpu_wheels.sh and carry gpu_wheels/)" >&2
  exit 1
}
case "$WHERE" in
  "$SITE"/*) ;;
  *) echo "gpu_suite: pagedkv imports from $WHERE, not the installed copy in $SITE" >&2; exit 1 ;;
esac
unset TRITON_INTERPRET  # compile for the GPU; the interpreted CPU tests skip there

# tests/conftest.py needs hypothesis; without it run the tests without conftest
# (the gpu marker is registered in pyproject.toml).
NOCONF=""
$RUN -c "import hypothesis" 2>/dev/null || NOCONF="--noconftest"

# stage -> its commands, one per line: "LOG<TAB>COMMAND" (output goes to $OUT/LOG)
stage_commands() {
  local t=$'\t'
  case "$1" in
    resources)
      echo "kernel_resources.txt${t}$RUN benchmarks/kernel_resources.py --check $QUICK --json $OUT/kernel_resources.json --markdown $OUT/kernel_resources.md" ;;
    kernel-tests)
      echo "gpu_tests.txt${t}$RUN -m pytest tests/test_kernels_gpu.py tests/test_kernels_strided_index.py -m gpu -q -rfEs $NOCONF -p no:cacheprovider" ;;
    kernel-bench)
      echo "bench_attention.txt${t}$RUN benchmarks/bench_attention.py $QUICK --json $OUT/bench_attention.json"
      echo "bench_copy.txt${t}$RUN benchmarks/bench_copy.py --json $OUT/bench_copy.json" ;;
    model)
      echo "model_gpu_tests.txt${t}$RUN -m pytest tests/test_model_gpu.py -m gpu -q -rfEs $NOCONF -p no:cacheprovider" ;;
    offload)
      echo "bench_offload.txt${t}$RUN benchmarks/bench_offload.py --json $OUT/bench_offload.json"
      echo "layerwise_tests.txt${t}$RUN -m pytest tests/test_layerwise_restore.py -q -rfEs $NOCONF -p no:cacheprovider"
      echo "bench_layerwise_restore.txt${t}$RUN benchmarks/bench_layerwise_restore.py --device cuda --context 16384 --new 512 --layers 32 --json $OUT/bench_layerwise_restore.json" ;;
    agent)
      echo "bench_agent_loop.txt${t}$RUN benchmarks/bench_agent_loop.py --model llama_1b --device cuda --dtype bfloat16 --sessions 16 --repeats 1 --json $OUT/bench_agent_loop.json" ;;
    hf)
      echo "bench_hf_agent_loop.txt${t}$RUN benchmarks/bench_hf_agent_loop.py --size qwen2-0.5b --device cuda --dtype bfloat16 --system-tokens 4096 --tool-tokens 1024 --repeats 2 --json $OUT/bench_hf_agent_loop.json" ;;
  esac
}

status=0
if [ "$DRY" = 1 ]; then
  echo "gpu_suite --dry-run: pagedkv installed from $REPO into $SITE; stages: ${STAGES[*]}"
  for stage in "${STAGES[@]}"; do
    while IFS=$'\t' read -r log cmd; do
      [ -z "$cmd" ] && continue
      echo "would run [$stage]: $cmd > $OUT/$log"
      set -- $cmd
      if [ "$3" = "-m" ] && [ "$4" = "pytest" ]; then
        files=()
        for w in "$@"; do case "$w" in tests/*.py) files+=("$w") ;; esac; done
        for f in "${files[@]}"; do [ -f "$f" ] || { echo "  missing test file $f"; status=1; }; done
        # collect only: imports every test module against the installed package
        if ! $RUN -m pytest --collect-only -q $NOCONF -p no:cacheprovider "${files[@]}" >"$OUT/dry_$stage.txt" 2>&1; then
          echo "  test collection failed (see $OUT/dry_$stage.txt)"; status=1
        fi
      else
        script="$3"
        [ -f "$script" ] || { echo "  missing script $script"; status=1; continue; }
        if ! $RUN "$script" --help >"$OUT/dry_$(basename "$script" .py).txt" 2>&1; then
          echo "  $script --help failed (see $OUT/dry_$(basename "$script" .py).txt)"; status=1
        fi
      fi
    done < <(stage_commands "$stage")
  done
  if [ "$status" = 0 ]; then echo "gpu_suite --dry-run: ok"; else echo "gpu_suite --dry-run: FAILED"; fi
  exit "$status"
fi

{
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  $RUN -c "import torch, triton, pagedkv; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'pagedkv', pagedkv.__version__)"
} >"$OUT/nvidia-smi.txt" 2>&1

for stage in "${STAGES[@]}"; do
  echo "== gpu_suite stage $stage"
  if [ "$stage" = hf ] && ! $RUN -c "import transformers, tokenizers" 2>/dev/null; then
    echo "hf stage: transformers/tokenizers missing (run benchmarks/fetch_gpu_wheels.sh here and carry gpu_wheels)"
    status=1; continue
  fi
  if [ "$stage" = agent ] && ! $RUN -c "import openai, starlette, uvicorn, websockets" 2>/dev/null; then
    echo "agent stage: openai/starlette/uvicorn/websockets missing (run benchmarks/fetch_gpu_wheels.sh here and carry gpu_wheels)"
    status=1
    continue
  fi
  while IFS=$'\t' read -r log cmd; do
    [ -z "$cmd" ] && continue
    $cmd >"$OUT/$log" 2>&1 || status=$?
    tail -n 30 "$OUT/$log"
  done < <(stage_commands "$stage")
done

echo "gpu_suite: exit status $status; outputs in $OUT"
exit "$status"
