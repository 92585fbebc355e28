#!/usr/bin/env bash
# Set up and run the test suite (unit, integration, end to end), CPU only, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# Headless Chromium renders the evaluation report in a test; without it that one test skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (timeout 300 apt-get install -y -qq chromium >/dev/null 2>&1 \
    || (timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 300 apt-get install -y -qq chromium >/dev/null 2>&1)) \
    || echo "chromium not installable here: the report screenshot test will skip"
fi
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DVC_NO_ANALYTICS=1
ruff check .
# two workers, one per core: most of the suite is stage processes starting (imports are single-threaded); each test
# file runs on one worker (tests/conftest.py: test_dvc + test_flow together), so its fixtures are built once
pytest -q -rs -n 2 --dist loadscope --no-loadscope-reorder --durations=15 "$@"
