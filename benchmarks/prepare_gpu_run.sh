#!/usr/bin/env bash
# Run here (no GPU needed), from the repository root, before benchmarks/gpu_run.sh goes to a
# GPU machine: gathers into .gpu/ (git-ignored) what that machine lacks. Its image has torch,
# transformers, accelerate, scipy, statsmodels, pandas, jinja2 and matplotlib, but not pydantic
# or gguf.
set -euo pipefail
mkdir -p .gpu/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 gguf==0.19.0
du -sh .gpu
