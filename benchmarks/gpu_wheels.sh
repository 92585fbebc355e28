#!/usr/bin/env bash
# The wheels the `device` tool's GPU machine lacks for benchmarks/gpu_check.sh, downloaded here into .whl/
# (that machine has Python 3.12 with torch, accelerate, peft, pyarrow, pytest, ... and no network).
#
#   bash benchmarks/gpu_wheels.sh          # then: run(carry=[".whl", ...], "bash benchmarks/gpu_check.sh --wheels .whl")
#
# pip resolves our runtime needs plus TRL for CPython 3.12 on manylinux x86-64 (a report only: nothing is
# installed), drops what the machine already holds (PRESENT, from .library/device/KINDS.md's package list) and
# downloads the rest without their dependencies. The total must stay under the tool's 64 MiB working-tree limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEST=.whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# distributions the GPU machine's image already has (its torch build is the one to use: never carry torch)
PRESENT="absl-py accelerate aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click cloudpickle
colorama contourpy cycler filelock fonttools frozenlist fsspec h11 hf-xet httpcore httpx huggingface-hub idna jinja2
joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl mpmath multidict networkx numpy packaging pandas
peft pillow pip pluggy protobuf psutil pyarrow pygments pyparsing pytest pytest-xdist python-dateutil pyyaml regex
requests rich safetensors scipy setuptools shellingham six sympy tabulate tokenizers torch tqdm triton typer
typing-extensions urllib3 werkzeug wheel wrapt xxhash yarl zipp propcache execnet iniconfig jinja2 sentencepiece"
NEEDS=("transformers==5.23.0" "trl==1.16.0" "mlflow-skinny==3.17.2" "datasets" "pydantic" "gguf" "sqlalchemy" "alembic")

report=$(mktemp)
"$PY" -m pip install -q --dry-run --ignore-installed --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" --target /tmp/gpu-wheels-target --report "$report" "${NEEDS[@]}"
mapfile -t pins < <("$PY" - "$report" "$PRESENT" <<'EOF'
import json, re, sys
present = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2].split()}
for item in json.load(open(sys.argv[1]))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if name not in present and not name.startswith(("nvidia-", "cuda-")):
        print(f"{name}=={item['metadata']['version']}")
EOF
)
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${pins[@]}"
size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: ${#pins[@]} wheels, ${size} MiB: ${pins[*]}"
[ "$size" -lt 60 ] || { echo "gpu_wheels.sh: ${size} MiB is over what the device tool carries (64 MiB in all)" >&2; exit 1; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
