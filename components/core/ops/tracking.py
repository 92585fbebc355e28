"""MLflow run context and lineage tags (git commit, DVC hashes of inputs, params hash, flow run).

Nothing happens on import: the tracking URI is resolved when a run starts (`MLFLOW_TRACKING_URI`, else
`sqlite:///<project>/mlflow.db`, absolute, also from a `dvc exp run --queue` workspace). SQLite takes one
writer at a time: for parallel experiments (`dvc exp run --run-all -j 2`) or a team, point
MLFLOW_TRACKING_URI at an MLflow tracking server (README, "Team set-up").
When Prefect drives the pipeline it exports `ALIGNFLOW_PARENT_RUN_ID` and `ALIGNFLOW_FLOW_RUN_ID`;
stage runs then nest under the flow's run and carry the flow-run id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = os.environ.get("ALIGNFLOW_EXPERIMENT", "alignflow")


def project_root(start: str | Path = ".") -> Path:
    """The project a stage runs for: the nearest directory with a dvc.yaml, and for a queued or parallel
    `dvc exp run` (whose workspace is a temp copy under <project>/.dvc/tmp/exps/) the project above it."""
    here = Path(start).resolve()
    parts = here.parts
    if ".dvc" in parts:  # a DVC experiment workspace: log into the project, not into the temp copy
        return Path(*parts[: parts.index(".dvc")])
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists():
            return d
    return here


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's sqlite:///<project>/mlflow.db; a relative sqlite path is made
    absolute in the project, so every stage, flow and experiment workspace of a project shares one store."""
    return tracking_uri_for(".")


# Tracked files the pipeline itself rewrites (DVC's lock, the uncached metrics and plots): a run changing them is
# not the user's tree being dirty.
PIPELINE_WRITTEN = ("dvc.lock", "metrics", "plots")


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    """git/commit, and git/dirty: whether tracked files differ from that commit, PIPELINE_WRITTEN aside."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    mine = [f":(exclude,top){p}" for p in PIPELINE_WRITTEN]
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", *mine))
    return {"git/commit": commit, "git/dirty": str(dirty).lower()}


def tracking_uri_for(project_dir: str | Path) -> str:
    """tracking_uri() as seen from `project_dir` (the flow resolves it once for all its stages)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{project_root(project_dir) / uri.removeprefix('sqlite:///')}"
    return uri


def lock_hashes(lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """{out path: md5} of every stage's outs in dvc.lock ({} when there is no lock yet)."""
    lock = Path(lock_path)
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {o["path"]: o.get("md5") or o.get("hash", "") for s in stages.values() for o in s.get("outs", [])}


def dvc_hashes(paths: list[str], lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """DVC's md5 of each input path, read from the `outs` of the stage that produced it in dvc.lock.

    `dvc repro` writes a stage's lock entry as soon as the stage finishes, so when a downstream stage
    runs, its inputs' hashes in dvc.lock are the ones it is reading. Paths DVC does not produce
    (or runs outside DVC) are simply absent.
    """
    produced = lock_hashes(lock_path)
    return {f"dvc/{p}": produced[p] for p in paths if p in produced}


def _lock_tags(repo: Path) -> dict[str, str]:
    """Every out's hash and the hash of dvc.lock itself, as tags of a pipeline run."""
    lock = repo / "dvc.lock"
    if not lock.exists():
        return {}
    tags = {f"dvc/{path}": md5 for path, md5 in lock_hashes(lock).items()}
    tags["dvc/dvc.lock"] = hashlib.md5(lock.read_bytes()).hexdigest()
    return tags


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

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    close_dead_runs(uri, ensure_experiment(uri), stage)
    mlflow.set_experiment(EXPERIMENT)
    tags = {**lineage_tags(stage, inputs, params_digest), **determinism_tags(), "alignflow/host": socket.gethostname(),
            "alignflow/pid": str(os.getpid())}
    parent = os.environ.get("ALIGNFLOW_PARENT_RUN_ID")
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params(_flatten(params))
        yield run


def determinism_tags() -> dict[str, str]:
    """`alignflow/determinism/<key>` for what decides the run's bits (threads, deterministic kernels, versions,
    device); nothing for a stage that never loaded torch (it has no kernels to decide)."""
    import sys

    if "torch" not in sys.modules:
        return {}
    from components.core.ops import determinism

    return {f"alignflow/determinism/{k}": json.dumps(v) if isinstance(v, dict) else str(v)
            for k, v in determinism.settings().items()}


def close_dead_runs(uri: str, experiment_id: str, stage: str) -> list[str]:
    """Mark FAILED this stage's runs left RUNNING by a process on this host that no longer exists (killed
    with SIGKILL, or the machine went down): a RUNNING run is one that is still running."""
    from mlflow import MlflowClient

    from components.core.ops.lifeline import pid_alive

    client = MlflowClient(uri)
    host = socket.gethostname()
    closed = []
    runs = client.search_runs([experiment_id], f"tags.`alignflow/stage` = '{stage}' AND attributes.status = 'RUNNING'")
    for run in runs:
        tags = run.data.tags
        if tags.get("alignflow/host") == host and tags.get("alignflow/pid", "").isdigit() \
                and not pid_alive(int(tags["alignflow/pid"])):
            client.set_terminated(run.info.run_id, status="FAILED")
            client.set_tag(run.info.run_id, "alignflow/ended", "process gone (killed); closed by the next run")
            closed.append(run.info.run_id)
    if closed:
        log.warning("%s: marked %d run(s) of dead processes FAILED: %s", stage, len(closed), ", ".join(closed))
    return closed


def ensure_experiment(uri: str, project_dir: str | Path = ".") -> str:
    """The experiment's id, creating it if needed. With a local store its artifacts go to <project>/mlruns
    (absolute): created from a `dvc exp run` workspace, MLflow would put them in the temp copy."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = (project_root(project_dir) / "mlruns").as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def log_metrics(run, metrics: dict[str, float], step: int | None = None) -> None:
    if run is None:
        return
    import mlflow

    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    mlflow.log_metrics(clean, step=step)


# ----------------------------------------------------------------------------- pipeline (flow) runs


def warm_up(uri: str, project_dir: str | Path = ".") -> None:
    """Import MLflow and create the store and experiment now (seconds on a fresh SQLite file), so that a flow
    can do it while something else waits (Prefect's server start) rather than before its first stage."""
    try:
        ensure_experiment(uri, project_dir)
    except Exception as e:  # the flow's own start_pipeline_run will raise it with context
        log.debug("MLflow warm-up failed: %s", e)


def start_pipeline_run(uri: str, repo: Path, flow_run_id: str, flow_run_name: str, stages: list[str],
                       force: bool) -> tuple[str, str]:
    """Create the flow's MLflow run (before any stage, so the DB is created by one writer).

    Returns (run id, experiment id)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = ensure_experiment(uri, repo)
    tags = {
        "alignflow/kind": "pipeline",
        "prefect/flow_run_id": flow_run_id,
        "prefect/flow_run_name": flow_run_name,
        **git_state(repo),
        **_lock_tags(repo),
    }
    from mlflow.entities import Param

    run = client.create_run(experiment_id, run_name=f"pipeline {flow_run_name}".strip(), tags=tags)
    client.log_batch(run.info.run_id, params=[Param("stages", ",".join(stages)), Param("force", str(force))])
    return run.info.run_id, experiment_id


def link_stage_runs(uri: str, experiment_id: str, parent_run_id: str, flow_run_id: str,
                    stages: list[str]) -> dict[str, str]:
    """Find the stages' runs from this flow run (one query, after the stages: the stage processes are the
    only writers to the store while they run), cross-link them with the parent; mark crashed attempts FAILED.

    Returns {stage: run id} of the newest run per stage."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`prefect/flow_run_id` = '{flow_run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    from mlflow.entities import RunTag

    linked: dict[str, str] = {}
    wanted = set(stages)
    for run in runs:  # newest first
        stage = run.data.tags.get("alignflow/stage")
        if stage not in wanted or run.info.run_id == parent_run_id:
            continue
        if stage not in linked:
            linked[stage] = run.info.run_id
            client.set_tag(run.info.run_id, "parent_flow_run", parent_run_id)
        elif run.info.status == "RUNNING":  # an attempt that was killed mid-run never closed its run
            client.set_terminated(run.info.run_id, status="FAILED")
    if linked:
        client.log_batch(parent_run_id, tags=[RunTag(f"stage_run/{_key(s)}", r) for s, r in linked.items()])
    return linked


def _key(name: str) -> str:
    """An MLflow-safe key part: matrix stage names (`sources@src0`) carry a character MLflow rejects."""
    return name.replace("@", "-")


def end_pipeline_run(uri: str, parent_run_id: str, repo: Path, summary: dict, status: str) -> None:
    """Close the flow's run: the dvc.lock hashes it ended with, each stage's status and seconds. The run is
    terminated even if recording one of those fails."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(uri)
    try:
        tags = [RunTag(key, value) for key, value in _lock_tags(repo).items()]
        metrics = []
        now = int(time.time() * 1000)
        for stage, result in summary.items():
            if isinstance(result, dict):
                tags.append(RunTag(f"stage_status/{_key(stage)}", result["status"]))
                metrics.append(Metric(f"stage_seconds/{_key(stage)}", result["seconds"], now, 0))
            else:
                tags.append(RunTag(f"alignflow/{_key(stage)}", str(result)))
        for start in range(0, max(len(tags), len(metrics)), 100):  # MLflow takes <= 100 tags per batch
            client.log_batch(parent_run_id, metrics=metrics[start : start + 100], tags=tags[start : start + 100])
    finally:
        client.set_terminated(parent_run_id, status=status)


def stage_tracking(accelerator, stage: str, params: dict, inputs: list[str], enabled: bool):
    """The stage's MLflow run on the main process; a no-op context elsewhere or when disabled."""
    from components.core.config import params_hash
    from components.core.ops import tracking

    return tracking.stage_run(stage, params, inputs, params_hash(params),
                              enabled=enabled and accelerator.is_main_process)


def log_step_metrics(run, row: dict, step: int) -> None:
    from components.core.ops import tracking

    tracking.log_metrics(run, {k: v for k, v in row.items() if k != "step"}, step=step)
