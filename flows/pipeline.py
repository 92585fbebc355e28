"""The alignflow pipeline as a Prefect flow: one task per DVC stage, in dvc.yaml's dependency order.

    python -m flows.pipeline                                  # whole pipeline once, ephemeral server, no set-up
    python -m flows.pipeline run --stages dpo evaluate --force --promote
    python -m flows.pipeline serve --cron "0 2 * * *"         # needs `prefect server start` + PREFECT_API_URL
    python -m flows.pipeline setup-pools                      # cpu/gpu work pools + concurrency limits
    prefect deploy --all --prefect-file flows/prefect.yaml    # the deployments (see that file)

Each task runs `dvc repro --single-item <stage>` in the repo root, so a flow run and `dvc repro` share
artifacts, dvc.lock and the cache, and DVC alone decides what is up to date (one `dvc status` up front
spares a DVC process per stage that nothing touched). The stage list and its order are read from dvc.yaml
at run time; nothing here knows what a stage does (no ML in flows/).

The flow opens a parent MLflow run; stage subprocesses see ALIGNFLOW_PARENT_RUN_ID / ALIGNFLOW_FLOW_RUN_ID
(components/tracking.py), so their runs nest under it, and after each stage the two are cross-linked
(parent tag `stage_run/<stage>`, child tag `parent_flow_run`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run

# Wall-clock limit per stage (seconds); a stage missing here gets FALLBACK_TIMEOUT_S. Override per run
# with the flow parameter `timeouts_s={"sft": 7200}`. Generous: a timeout is for hung runs, not slow ones.
DEFAULT_TIMEOUTS_S: dict[str, float] = {
    "bootstrap": 15 * 60,
    "synthesize": 15 * 60,
    "prepare": 60 * 60,
    "sft": 8 * 3600,
    "reference": 2 * 3600,
    "dpo": 8 * 3600,
    "evaluate": 2 * 3600,
    "register": 30 * 60,
}
FALLBACK_TIMEOUT_S = 2 * 3600.0
KILL_GRACE_S = 20.0  # SIGTERM -> SIGKILL: time for accelerate/torchrun to shut their workers down

# Task tags that server-side concurrency limits key on (`setup-pools` creates both with limit 1):
# every stage holds the checkout's DVC lock; training stages also hold the GPU.
DVC_TAG = "alignflow-dvc"
GPU_TAG = "alignflow-gpu"
TRAINING_LAUNCHERS = ("accelerate launch", "torchrun", "deepspeed")


class StageTimeout(RuntimeError):
    """A command ran past its limit; its whole process group was killed."""


class StageFailed(RuntimeError):
    """`dvc repro` of a stage exited non-zero; the message ends with the tail of its output."""


# ----------------------------------------------------------------------------- subprocess runner


def run_command(
    cmd: list[str],
    cwd: str | Path,
    env: dict[str, str] | None,
    timeout_s: float,
    on_line: Callable[[str], object] = print,
    kill_grace_s: float = KILL_GRACE_S,
) -> int:
    """Run `cmd` in a new process group, streaming merged stdout/stderr to `on_line` line by line.

    The limit is enforced on the process group itself: on timeout the group (dvc, accelerate, its
    workers, anything they spawned) gets SIGTERM, then SIGKILL after `kill_grace_s`, and StageTimeout is
    raised. The group is also taken down when we are interrupted (Prefect cancellation, Ctrl-C), and
    stragglers are killed after a normal exit, so no stage process outlives its task. Returns the exit code.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own session + process group: pgid == pid, signals to us don't reach it
    )
    pgid = proc.pid
    reader = threading.Thread(target=_pump_lines, args=(proc.stdout, on_line), daemon=True)
    reader.start()
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        on_line(f"timeout: {' '.join(cmd)} ran past {timeout_s:g}s; terminating process group {pgid}")
        _kill_group(pgid, kill_grace_s)
        raise StageTimeout(f"{' '.join(cmd)} exceeded {timeout_s:g}s; process group {pgid} killed") from None
    except BaseException:  # cancelled or interrupted: take the stage down with us
        _kill_group(pgid, kill_grace_s)
        raise
    finally:
        _kill_group(pgid, kill_grace_s)  # stragglers that outlived the leader (no-op when none)
        try:
            proc.wait(timeout=5)  # reap the leader
        except subprocess.TimeoutExpired:
            pass
        reader.join(timeout=5)


def _pump_lines(stream, on_line: Callable[[str], object]) -> None:
    # Split on \n and \r as bytes arrive: tqdm redraws with \r and no newline until the bar closes, so
    # readline() would hold a whole training run's progress until its end.
    pending = b""
    while chunk := os.read(stream.fileno(), 65536):
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        for line in lines:
            _emit(line, on_line)
    _emit(pending, on_line)
    stream.close()


def _emit(raw: bytes, on_line: Callable[[str], object]) -> None:
    line = raw.decode(errors="replace").rstrip()
    if line.strip():
        try:
            on_line(line)
        except Exception:  # a logging hiccup must not stall the pipe (and with it the child)
            pass


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the group (zombies wait for a reaper, not for us)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: signal 0 (counts zombies, so may wait out the grace)
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the group, wait up to grace_s for it to exit, then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not _group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.05)


# ----------------------------------------------------------------------------- the pipeline, from dvc.yaml


@dataclass(frozen=True)
class Stage:
    name: str  # DVC addressing: "sft", or "sub/dvc.yaml:sft" for nested pipelines
    cmd: str
    training: bool  # launched through accelerate/torchrun: needs the GPU
    upstream: tuple[str, ...] = ()  # stages whose outs it reads

    @property
    def short_name(self) -> str:
        return self.name.rsplit(":", 1)[-1]


def pipeline_stages(repo_dir: str | Path) -> list[Stage]:
    """The repo's DVC pipeline stages in dependency order; ties keep their order in dvc.yaml."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(repo_dir)) as repo:

        def name(s) -> str:  # s.addressing is relative to the cwd; we want it relative to the repo
            dvcfile = os.path.relpath(s.dvcfile.path, repo.root_dir)
            return s.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{s.name}"

        graph = repo.index.graph  # an edge points from a stage to a stage it depends on
        position = {s: i for i, s in enumerate(repo.index.stages)}
        ordered = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: position[s])
        stages = []
        for s in ordered:
            if isinstance(s, PipelineStage):  # not `dvc add`/import .dvc files
                cmd = " && ".join(s.cmd) if isinstance(s.cmd, list) else str(s.cmd)
                upstream = tuple(name(u) for u in graph.successors(s) if isinstance(u, PipelineStage))
                stages.append(Stage(name(s), cmd, any(t in cmd for t in TRAINING_LAUNCHERS), upstream))
        return stages


def select_stages(all_stages: list[Stage], requested: list[str] | None) -> list[Stage]:
    if requested is None:
        return all_stages
    known = {s.name for s in all_stages} | {s.short_name for s in all_stages}
    unknown = [r for r in requested if r not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {[s.name for s in all_stages]}")
    return [s for s in all_stages if s.name in requested or s.short_name in requested]


def stages_to_check(plan: list[Stage], changed: set[str] | None) -> set[str]:
    """Stages that need `dvc repro`: those `dvc status` reports changed, and everything downstream of them
    in the plan (their inputs change once the upstream stage re-runs). None = status unknown: all."""
    if changed is None:
        return {s.name for s in plan}
    todo: set[str] = set()
    for s in plan:  # dependency order: upstream decisions are made first
        if s.name in changed or any(u in todo for u in s.upstream):
            todo.add(s.name)
    return todo


def changed_stages(repo: Path) -> set[str] | None:
    """Names of the stages `dvc status` reports changed (None if it could not tell)."""
    try:
        done = subprocess.run(
            _dvc("status", "--json"),
            cwd=repo,
            env=_stage_env({}),
            capture_output=True,
            text=True,
            timeout=600,
        )
        return set(json.loads(done.stdout)) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError):
        return None


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _stage_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # stage cmds say `python -m ...` / `accelerate launch`: resolve them in our environment, as an
    # activated venv would, even when we were started as `.venv/bin/python -m flows.pipeline`
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are printed
    return {**env, **extra}


# ----------------------------------------------------------------------------- tasks


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, tags=[DVC_TAG])
def run_stage(
    stage: str,
    repo_dir: str,
    force: bool,
    timeout_s: float,
    extra_env: dict[str, str],
    dvc_remote: str | None,
    up_to_date: bool = False,
) -> dict:
    """`dvc repro --single-item <stage>`; a retry after a crash resumes from the stage's checkpoint.

    up_to_date: `dvc status` found the stage and everything upstream unchanged, so `dvc repro` would do
    nothing: report that without paying for a DVC process (~0.7 s a stage).
    """
    logger = get_run_logger()
    attempt = current_task_run.get_run_count()
    if up_to_date and not dvc_remote:
        logger.info("%s | dvc status: stage and its inputs unchanged, nothing to reproduce", stage)
        return {"status": "up-to-date", "seconds": 0.0, "attempts": attempt}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    outcome = {"status": "ran"}

    def on_line(line: str) -> None:
        tail.append(line)
        if "didn't change, skipping" in line:
            outcome["status"] = "up-to-date"
        elif "is cached - skipping run" in line:
            outcome["status"] = "restored"
        logger.info("%s | %s", stage, line)

    cmd = _dvc("repro", "--single-item", stage, *(["--force"] if force else []))
    if dvc_remote:  # missing inputs, and outs of a run-cache hit, come from the remote instead of a re-run
        cmd.append("--pull")
    logger.info("attempt %d: %s (timeout %gs)", attempt, " ".join(cmd[1:]), timeout_s)
    started = time.perf_counter()
    rc = run_command(cmd, repo_dir, _stage_env(extra_env), timeout_s, on_line)
    if rc != 0:
        raise StageFailed(
            f"stage {stage!r} failed with exit code {rc} (attempt {attempt}); last lines:\n" + "\n".join(tail)
        )
    if dvc_remote:  # outs + run-cache entry, so other workers restore this stage instead of re-running it
        rc = run_command(
            _dvc("push", "--remote", dvc_remote, "--run-cache", stage),
            repo_dir,
            _stage_env({}),
            timeout_s,
            on_line,
        )
        if rc != 0:
            raise StageFailed(f"dvc push of stage {stage!r} to remote {dvc_remote!r} failed (exit {rc})")
    return {
        "status": outcome["status"],
        "seconds": round(time.perf_counter() - started, 2),
        "attempts": attempt,
    }


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def pull_artifacts(repo_dir: str, dvc_remote: str, timeout_s: float = 3600) -> None:
    """Fetch every out recorded in dvc.lock and the run-cache, so stages that are up to date elsewhere
    are skipped or restored here rather than recomputed. Outs not in the remote yet are not an error."""
    logger = get_run_logger()
    cmd = _dvc("pull", "--remote", dvc_remote, "--run-cache", "--allow-missing")
    rc = run_command(cmd, repo_dir, _stage_env({}), timeout_s, lambda line: logger.info("pull | %s", line))
    if rc != 0:
        raise StageFailed(f"dvc pull from remote {dvc_remote!r} failed")


@task(cache_policy=NO_CACHE)
def apply_promotion_gate(repo_dir: str, extra_env: dict[str, str], timeout_s: float = 1800) -> str:
    """`alignflow promote`: exit 0 = promoted, 2 = the gate rejected the candidate (a valid outcome)."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "components.cli", "promote"]  # == the `alignflow promote` entry point
    rc = run_command(
        cmd, repo_dir, _stage_env(extra_env), timeout_s, lambda line: logger.info("promote | %s", line)
    )
    if rc == 0:
        return "promoted"
    if rc == 2:
        logger.warning("promotion gate rejected the candidate; the champion stays")
        return "rejected"
    raise StageFailed(f"alignflow promote failed with exit code {rc}")


# ----------------------------------------------------------------------------- MLflow parent run


def _tracking_uri(repo: Path) -> str:
    from components import tracking

    uri = tracking.tracking_uri()
    # a relative sqlite path means "in the repo", where `dvc repro` (cwd = repo root) would put it
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{repo / uri.removeprefix('sqlite:///')}"
    return uri


def _lock_tags(repo: Path) -> dict[str, str]:
    import hashlib

    import yaml

    lock = repo / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    tags = {f"dvc/{o['path']}": o.get("md5", "") for s in stages.values() for o in s.get("outs", [])}
    tags["dvc/dvc.lock"] = hashlib.md5(lock.read_bytes()).hexdigest()
    return tags


def _start_parent_run(
    uri: str, repo: Path, flow_run_id: str, flow_run_name: str, stages: list[Stage], force: bool
) -> tuple[str, str]:
    """Create the flow's MLflow run (before any stage, so the DB is created by one writer)."""
    from mlflow import MlflowClient

    from components import tracking

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(tracking.EXPERIMENT)
    tags = {
        "alignflow/kind": "pipeline",
        "prefect/flow_run_id": flow_run_id,
        "prefect/flow_run_name": flow_run_name,
        **tracking.git_state(repo),
        **_lock_tags(repo),
    }
    run = client.create_run(
        experiment_id, run_name=f"pipeline {tags['prefect/flow_run_name']}".strip(), tags=tags
    )
    client.log_param(run.info.run_id, "stages", ",".join(s.name for s in stages))
    client.log_param(run.info.run_id, "force", force)
    return run.info.run_id, experiment_id


def _link_stage_runs(
    uri: str, experiment_id: str, parent_run_id: str, flow_run_id: str, stages: list[Stage]
) -> dict[str, str]:
    """Find the stages' runs from this flow run (one query, after the stages: the stage processes are the
    only writers to the store while they run), cross-link them with the parent; mark crashed attempts FAILED."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`prefect/flow_run_id` = '{flow_run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    linked: dict[str, str] = {}
    wanted = {s.short_name for s in stages}
    for run in runs:  # newest first
        stage = run.data.tags.get("alignflow/stage")
        if stage not in wanted or run.info.run_id == parent_run_id:
            continue
        if stage not in linked:
            linked[stage] = run.info.run_id
            client.set_tag(parent_run_id, f"stage_run/{stage}", run.info.run_id)
            client.set_tag(run.info.run_id, "parent_flow_run", parent_run_id)
        elif run.info.status == "RUNNING":  # an attempt that was killed mid-run never closed its run
            client.set_terminated(run.info.run_id, status="FAILED")
    return linked


def _end_parent_run(uri: str, parent_run_id: str, repo: Path, summary: dict, status: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for key, value in _lock_tags(repo).items():  # the hashes this run ended with
        client.set_tag(parent_run_id, key, value)
    for stage, result in summary.items():
        if isinstance(result, dict):
            client.set_tag(parent_run_id, f"stage_status/{stage}", result["status"])
            client.log_metric(parent_run_id, f"stage_seconds/{stage}", result["seconds"])
        else:
            client.set_tag(parent_run_id, f"alignflow/{stage}", str(result))
    client.set_terminated(parent_run_id, status=status)


# ----------------------------------------------------------------------------- the flow


@flow(name="alignflow-pipeline")
def alignflow_pipeline(
    stages: list[str] | None = None,
    force: bool = False,
    promote: bool = False,
    timeouts_s: dict[str, float] | None = None,
    dvc_remote: str | None = None,
    repo_dir: str = ".",
    retries: int = 2,
    retry_delay_s: float = 10.0,
    track: bool = True,
) -> dict:
    """Run the DVC pipeline stage by stage (all of dvc.yaml, or `stages`), then optionally the promotion gate.

    stages: stage names to run, in dvc.yaml's dependency order (default: all; up-to-date ones are skipped).
    force: re-run stages even when DVC says they are up to date (`dvc repro -f`).
    promote: finish with `alignflow promote` (gate rejection is a result, not a failure).
    timeouts_s: per-stage overrides of DEFAULT_TIMEOUTS_S, in seconds.
    dvc_remote: DVC remote to pull from first and push each stage to (default: env ALIGNFLOW_DVC_REMOTE).
        Stages then run with `dvc repro --pull`, which fetches missing data from the *default* remote
        (DVC has no remote option there): make this remote the default one in .dvc/config.
    """
    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    plan = select_stages(pipeline_stages(repo), stages)
    timeouts = {**DEFAULT_TIMEOUTS_S, **(timeouts_s or {})}
    remote = dvc_remote or os.environ.get("ALIGNFLOW_DVC_REMOTE") or None
    flow_run_id = str(current_flow_run.get_id() or "")
    logger.info("stages in order: %s", " -> ".join(s.name for s in plan))

    uri = _tracking_uri(repo)
    extra_env = {"MLFLOW_TRACKING_URI": uri}
    if flow_run_id:
        extra_env["ALIGNFLOW_FLOW_RUN_ID"] = flow_run_id
    # The MLflow parent run (mlflow import + sqlite set-up, ~2 s) is created in the background while DVC
    # works out what changed; it exists before the first stage starts, so the DB has one writer at a time.
    background = ThreadPoolExecutor(max_workers=1)
    parent = (
        background.submit(
            _start_parent_run, uri, repo, flow_run_id, str(current_flow_run.get_name() or ""), plan, force
        )
        if track
        else None
    )
    background.shutdown(wait=False)
    parent_run_id = experiment_id = None

    summary: dict[str, object] = {}
    status = "FAILED"
    try:
        if remote:
            pull_artifacts(str(repo), remote)
        to_check = {s.name for s in plan} if force else stages_to_check(plan, changed_stages(repo))
        if parent is not None:
            parent_run_id, experiment_id = parent.result()
            extra_env["ALIGNFLOW_PARENT_RUN_ID"] = parent_run_id
        for stage in plan:
            stage_task = run_stage.with_options(
                name=f"stage-{stage.short_name}",
                task_run_name=f"dvc repro {stage.name}",
                retries=retries,
                retry_delay_seconds=retry_delay_s,
                tags=[DVC_TAG, GPU_TAG] if stage.training else [DVC_TAG],
            )
            timeout = timeouts.get(stage.name, timeouts.get(stage.short_name, FALLBACK_TIMEOUT_S))
            up_to_date = stage.name not in to_check
            result = stage_task(stage.name, str(repo), force, float(timeout), extra_env, remote, up_to_date)
            summary[stage.short_name] = result
        if parent_run_id:
            try:
                ran = [s for s in plan if summary[s.short_name]["status"] != "up-to-date"]
                links = _link_stage_runs(uri, experiment_id, parent_run_id, flow_run_id, ran)
                for stage_name, run_id in links.items():
                    summary[stage_name]["mlflow_run_id"] = run_id
            except Exception as e:  # lineage is worth a warning, not a failed pipeline
                logger.warning("could not link the stages' MLflow runs: %s", e)
        if promote:
            summary["promotion"] = apply_promotion_gate(str(repo), extra_env, timeouts.get("promote", 1800))
        status = "FINISHED"
    finally:
        if parent is not None:
            try:
                parent_run_id = parent_run_id or parent.result()[0]
                _end_parent_run(uri, parent_run_id, repo, summary, status)
            except Exception as e:
                logger.warning("could not close the MLflow parent run %s: %s", parent_run_id, e)
    return summary


# ----------------------------------------------------------------------------- server-side set-up


def job_template(pool_type: str) -> dict:
    """Prefect's default base job template for `pool_type`, with a `gpu_count` variable wired into the
    Kubernetes job's `nvidia.com/gpu` limit (the stock template has no GPU field)."""
    import asyncio

    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    template = asyncio.run(get_default_base_job_template_for_infrastructure_type(pool_type))
    if template is None:
        raise RuntimeError(f"no default job template for work pool type {pool_type!r}")
    if pool_type == "kubernetes":
        template["variables"]["properties"]["gpu_count"] = {
            "title": "GPUs",
            "type": "integer",
            "default": 1,
            "description": "nvidia.com/gpu per flow-run pod",
        }
        container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        container.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpu_count }}"
    return template


def setup_work_pools(gpu_pool_type: str = "kubernetes") -> None:
    """What flows/prefect.yaml cannot declare: the two work pools (one flow run at a time each) and the
    tag concurrency limits that keep two stages off one GPU and one DVC checkout. Idempotent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    pools = [
        WorkPoolCreate(
            name="cpu", type="process", concurrency_limit=1, base_job_template=job_template("process")
        ),
        WorkPoolCreate(
            name="gpu", type=gpu_pool_type, concurrency_limit=1, base_job_template=job_template(gpu_pool_type)
        ),
    ]
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(pool)
                print(f"work pool {pool.name!r} ({pool.type}) created, concurrency limit 1")
            except ObjectAlreadyExists:
                print(f"work pool {pool.name!r} exists; left as is")
        existing = {limit.tag for limit in client.read_concurrency_limits(limit=200, offset=0)}
        for tag in (DVC_TAG, GPU_TAG):
            if tag not in existing:
                client.create_concurrency_limit(tag=tag, concurrency_limit=1)
                print(f"task concurrency limit {tag!r} = 1")


# ----------------------------------------------------------------------------- CLI


def _parse_timeouts(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        stage, _, seconds = item.partition("=")
        if not seconds:
            raise SystemExit(f"--timeout expects STAGE=SECONDS, got {item!r}")
        out[stage] = float(seconds)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--stages", nargs="+", default=None, help="stages to run (default: all in dvc.yaml)")
        p.add_argument("--force", action="store_true", help="re-run stages even when up to date")
        p.add_argument("--dvc-remote", default=None)
        p.add_argument("--repo-dir", default=".")
        p.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS")
    sub.choices["run"].add_argument(
        "--promote", action="store_true", help="apply the promotion gate at the end"
    )
    serve = sub.choices["serve"]
    serve.add_argument("--cron", default="0 2 * * *")
    serve.add_argument("--name", default="nightly")
    serve.add_argument("--no-promote", dest="promote", action="store_false")
    pools = sub.add_parser("setup-pools", help="create the cpu/gpu work pools and concurrency limits")
    pools.add_argument("--gpu-pool-type", default="kubernetes", choices=["kubernetes", "docker", "process"])
    args = parser.parse_args(argv)

    if args.command == "setup-pools":
        setup_work_pools(args.gpu_pool_type)
        return
    params = {
        "stages": args.stages,
        "force": args.force,
        "promote": args.promote,
        "dvc_remote": args.dvc_remote,
        "repo_dir": args.repo_dir,
        "timeouts_s": _parse_timeouts(args.timeout) or None,
    }
    if args.command == "run":
        print(json.dumps(alignflow_pipeline(**params), indent=2))
        return
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise SystemExit(
            "serve needs a Prefect server (the ephemeral one cannot hold schedules):\n"
            "  prefect server start   # in another shell, then\n"
            "  export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    # one run at a time: a scheduled run never overlaps a slow previous one on the same GPU / checkout
    alignflow_pipeline.serve(name=args.name, cron=args.cron, parameters=params, global_limit=1)


if __name__ == "__main__":
    main()
