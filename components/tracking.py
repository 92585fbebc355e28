"""MLflow run context and lineage tags (git commit, DVC hashes of inputs, params hash, flow run).

Nothing happens on import: the tracking URI is resolved when a run starts
(`MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the working directory).
When Prefect drives the pipeline it exports `ALIGNFLOW_PARENT_RUN_ID` and `ALIGNFLOW_FLOW_RUN_ID`;
stage runs then nest under the flow's run and carry the flow-run id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = os.environ.get("ALIGNFLOW_EXPERIMENT", "alignflow")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git/commit": commit, "git/dirty": str(dirty).lower()}


def dvc_hashes(paths: list[str], lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """DVC's md5 of each input path, read from the `outs` of the stage that produced it in dvc.lock.

    `dvc repro` writes a stage's lock entry as soon as the stage finishes, so when a downstream stage
    runs, its inputs' hashes in dvc.lock are the ones it is reading. Paths DVC does not produce
    (or runs outside DVC) are simply absent.
    """
    lock = Path(lock_path)
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    produced = {o["path"]: o.get("md5") or o.get("hash", "") for s in stages.values() for o in s.get("outs", [])}
    return {f"dvc/{p}": produced[p] for p in paths if p in produced}


def lineage_tags(stage: str, inputs: list[str], params_digest: str) -> dict[str, str]:
    tags = {"alignflow/stage": stage, "params/hash": params_digest, **git_state(), **dvc_hashes(inputs)}
    if flow_run := os.environ.get("ALIGNFLOW_FLOW_RUN_ID"):
        tags["prefect/flow_run_id"] = flow_run
    return tags


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


@contextlib.contextmanager
def stage_run(stage: str, params: dict, inputs: list[str], params_digest: str, enabled: bool = True) -> Iterator:
    """An MLflow run for one stage execution; yields the active run (or None when disabled)."""
    if not enabled:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    tags = lineage_tags(stage, inputs, params_digest)
    parent = os.environ.get("ALIGNFLOW_PARENT_RUN_ID")
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params(_flatten(params))
        yield run


def log_metrics(run, metrics: dict[str, float], step: int | None = None) -> None:
    if run is None:
        return
    import mlflow

    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    mlflow.log_metrics(clean, step=step)
