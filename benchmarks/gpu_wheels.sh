#!/usr/bin/env bash
# Build the wheelhouse that benchmarks/gpu_check.sh installs on the bare GPU machine, which cannot reach a registry.
#
#   benchmarks/gpu_wheels.sh [DIR]          # default .wheels/ (ignored by git; the device run carries it)
#
# The GPU image (../.library/device KINDS.md: python3 is CPython 3.12.3, x86-64) already has torch 2.11, triton 3.6,
# lightning 2.6.6, numpy, scipy, matplotlib, rich, safetensors, einops, pytest, hypothesis, transformers, msgpack,
# ninja, py-cpuinfo, psutil, tqdm, pyyaml, requests, httpx, anyio, xxhash. What it lacks, pinned to the versions
# this project is tested with here:
#   - DeepSpeed 0.19.8 and its missing dependencies: hjson, pydantic, pydantic_core, annotated_types,
#     typing_inspection;
#   - Hydra: hydra-core 1.4.0rc3, omegaconf 2.4.1rc1 (omegaconf 2.4 vendors the antlr4 runtime);
#   - wandb 0.31.0 and its missing dependencies: cwevals, distro, sniffio, platformdirs, googleapis-common-protos,
#     the opentelemetry packages;
#   - carried although the image has a version, because the image's version is unknown and too old a one breaks
#     the packages above: typing_extensions (pydantic needs >= 4.14.1), protobuf (>= 6.33.5), click (>= 8.2).
# DeepSpeed is published as an sdist only: it is built here into a pure-Python wheel (DS_BUILD_OPS=0: no compiled
# ops; DeepSpeed builds the ones it needs just in time, and the gating benchmark needs none).
# One version of each package: two would stop `pip install --no-deps` on the GPU machine.
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=${1:-.wheels}
PY=${PYTHON:-python3}
mkdir -p "$DIR"

BINARY=(
  hjson==3.1.0
  pydantic==2.13.4
  pydantic_core==2.46.4
  annotated_types==0.7.0
  typing_inspection==0.4.2
  typing_extensions==4.16.0
  hydra-core==1.4.0rc3
  omegaconf==2.4.1rc1
  wandb==0.31.0
  cwevals==0.0.1b1
  distro==1.9.0
  sniffio==1.3.1
  platformdirs==4.14.9
  click==8.5.1
  protobuf==7.36.2
  googleapis-common-protos==1.76.0
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-common==0.66b2
  opentelemetry-exporter-http-transport==0.66b2
)

quiet() { # pip's warnings about this machine's extra index folders are noise here
  "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}

quiet "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" "${BINARY[@]}"

if ! ls "$DIR"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  # --no-build-isolation: setup.py imports torch, and an isolated build would download a CUDA torch
  DS_BUILD_OPS=0 quiet "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary=deepspeed -w "$DIR" \
    deepspeed==0.19.8
fi

count=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
size=$(du -sm "$DIR" | cut -f1)
echo "$DIR: $count wheels, ${size} MiB (the device run carries at most 64 MiB with the working tree)"
if [ "$count" -ne $((${#BINARY[@]} + 1)) ]; then
  echo "expected $((${#BINARY[@]} + 1)) wheels: remove stale versions from $DIR" >&2
  exit 1
fi
