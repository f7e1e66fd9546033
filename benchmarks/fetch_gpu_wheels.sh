#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU machine lacks for the
# `agent` stage of gpu_suite.sh: the serving stack and the openai client, for the
# device image's Python 3.12 on x86_64 Linux. The image already has torch, triton,
# numpy, anyio, httpx, h11, click, tqdm, typing-extensions and uvloop, so only the rest
# is fetched, without dependencies. Then carry `gpu_wheels` with the run call:
#   bash benchmarks/fetch_gpu_wheels.sh      # writes gpu_wheels/ (git-ignored, ~10 MB)
#   run(command="OUT=$OUT bash benchmarks/gpu_suite.sh agent", carry=["gpu_wheels"])
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-gpu_wheels}"
mkdir -p "$DEST"
python -m pip download --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "openai==3.54.0" "starlette==1.10.0" "uvicorn==0.54.0" "websockets==15.0.1" \
  "pydantic==2.13.4" "pydantic_core==2.46.4" "jiter==0.19.0" "distro" "sniffio==1.3.1" \
  "typing-inspection==0.4.2" "annotated-types==0.7.0"
du -sh "$DEST"
