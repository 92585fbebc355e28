#!/usr/bin/env bash
# Create .venv and install alignflow with the pins from ../shared/ENVIRONMENT.md.
# torch first: `torch==2.13.0` resolves to the local CPU wheel here; anything that pulled torch
# unconstrained would download several GB of CUDA packages. Pass `dev` to add test/benchmark tools.
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
