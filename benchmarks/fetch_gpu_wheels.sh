#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU machine's image lacks, at
# the versions constraints.txt pins, for its Python 3.12 on x86_64 Linux: pagedkv's own
# xxhash, for the `agent` stage the serving stack and the openai client, for the `hf`
# stage transformers. The image
# already has torch, triton, numpy, anyio, httpx, h11, click, tqdm, typing-extensions
# and uvloop, so only the rest is fetched, without dependencies. Then carry `gpu_wheels`
# with the run call; gpu_suite.sh installs them, and pagedkv, into a private directory:
#   bash benchmarks/fetch_gpu_wheels.sh      # writes gpu_wheels/ (git-ignored, ~10 MB)
#   run(command="OUT=$OUT bash benchmarks/gpu_suite.sh", carry=["gpu_wheels"])
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-gpu_wheels}"
NAMES=(xxhash safetensors openai starlette uvicorn websockets pydantic pydantic_core jiter
       distro sniffio typing-inspection annotated-types annotated-doc
       # the `hf` stage: transformers and what it needs beyond the image
       transformers tokenizers huggingface_hub kernels regex PyYAML packaging filelock fsspec
       hf-xet httpx2 typer rich shellingham markdown-it-py mdurl Pygments)
SPECS=()
for name in "${NAMES[@]}"; do
  # constraints.txt spells names as pip freeze does; compare them normalised (PEP 503)
  norm="$(echo "$name" | tr 'A-Z_.' 'a-z--')"
  pin="$(awk -F'==' -v n="$norm" '{k=tolower($1); gsub(/[_.]/, "-", k)} k == n {print $0}' constraints.txt)"
  SPECS+=("${pin:-$name}")
done
mkdir -p "$DEST"
python -m pip download --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "${SPECS[@]}"
du -sh "$DEST"
