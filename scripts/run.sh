#!/usr/bin/env bash
# Set up and run the whole pipeline on the embedded default (tiny Llama + sorting task, offline):
# bootstrap -> synthesize -> sources -> prepare -> sft -> reference -> dpo -> evaluate -> register.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DVC_NO_ANALYTICS=1
dvc repro
alignflow summary     # headline metrics, where the report and the registered version are
