#!/usr/bin/env bash
# Wheels for what the GPU machine's image lacks (it has torch 2.11, Triton 3.6, transformers,
# safetensors, numpy, scipy, pillow, but no package index): run here, where pip works; the GPU
# scripts (run_gpu_table.sh, run_gpu_tiers.sh, ...) install them from the carried .whl/ and .whl_ao/.
# Python 3.12, x86-64 Linux, as on that machine. Both folders are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
download() {  # download DIR SPEC...
  local dir=$1; shift
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d "$dir" "$@"
}
# talkgen's runtime needs beyond the image (pyloudnorm 0.2: 0.1 imports `future`; soundfile needs cffi)
download .whl einops==0.8.2 ftfy==6.3.1 wcwidth==0.2.13 soundfile==0.13.1 cffi==2.0.0 pycparser==2.23 \
  soxr==1.0.0 pyloudnorm==0.2.0 av==15.1.0 pydantic==2.11.9 pydantic-core==2.33.2 annotated-types==0.7.0 \
  typing-inspection==0.4.1 pydantic-settings==2.11.0 python-dotenv==1.2.1 typer==0.20.0 shellingham==1.5.4 \
  diffusers==0.42.1
# torchao 0.17 is the release built for torch 2.11 (fp8 GEMMs)
download .whl_ao torchao==0.17.0
du -sh .whl .whl_ao
