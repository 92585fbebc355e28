"""benchmarks/gpu_check.sh --dry-run: the GPU check's every step (environment, the GPU-marked tests, DPO and GRPO
against TRL, the summary) run on the CPU at the smallest size in a fresh clone, so the script is known to work
before a GPU is lent for the few minutes it has."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import pipeline_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_runs_every_step_and_writes_its_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=pipeline_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["passed"] is True
    steps = {s["step"]: s for s in summary["steps"]}
    assert [steps[name]["rc"] for name in ("env", "tests", "dpo", "grpo")] == [0, 0, 0, 0]
    assert steps["smollm2"]["skipped"] and "vllm" in steps
    assert summary["environment"]["torch"] and summary["environment"]["cuda_available"] is False
    assert summary["figures"]["gpu_dpo_vs_trl"]["speedup_end_to_end"] > 0
    assert summary["figures"]["gpu_grpo_vs_trl"]["speedup_wall"] > 0
    tests_log = (out / "logs" / "tests.log").read_text()
    assert "skipped" in tests_log and "needs a CUDA device" in tests_log  # collected, and skipped for the CPU
