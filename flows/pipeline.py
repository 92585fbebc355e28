"""The alignflow pipeline as a Prefect flow: one task per DVC stage, in dvc.yaml's dependency order.

    python -m flows.pipeline                                  # whole pipeline once, ephemeral server, no set-up
    python -m flows.pipeline run --stages dpo evaluate --force --promote
    python -m flows.pipeline serve --cron "0 2 * * *"         # needs `prefect server start` + PREFECT_API_URL
    python -m flows.pipeline setup-pools                      # cpu/gpu work pools + concurrency limits
    prefect deploy --all --prefect-file flows/prefect.yaml    # the deployments (see that file)

Each task runs `dvc repro --single-item <stage>` in the repo root, so a flow run and `dvc repro` share
artifacts, dvc.lock and the cache, and DVC alone decides what is up to date. The stage list and its order
are read from dvc.yaml at run time; nothing here knows what a stage does (no ML in flows/).

flows/ is three small files: this one (the flow and its tasks), supervisor.py (process groups, timeouts,
log streaming) and pools.py (work pools and concurrency limits). The flow's MLflow parent run is opened and
closed through components/core/ops/tracking.py; stage subprocesses see ALIGNFLOW_PARENT_RUN_ID /
ALIGNFLOW_FLOW_RUN_ID, so their runs nest under it, and afterwards the two are cross-linked (parent tag
`stage_run/<stage>`, child tag `parent_flow_run`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run

from components.core.ops import tracking
from flows.pools import DVC_TAG, GPU_TAG, setup_work_pools
from flows.supervisor import StageTimeout, run_command

__all__ = ["Stage", "StageFailed", "StageTimeout", "alignflow_pipeline", "pipeline_stages", "select_stages"]

# Wall-clock limit per stage (seconds); a stage missing here gets FALLBACK_TIMEOUT_S. Override per run
# with the flow parameter `timeouts_s={"sft": 7200}`. Generous: a timeout is for hung runs, not slow ones.
DEFAULT_TIMEOUTS_S: dict[str, float] = {
    "bootstrap": 15 * 60,
    "synthesize": 15 * 60,
    "prepare": 60 * 60,
    "sft": 8 * 3600,
    "reference": 2 * 3600,
    "dpo": 8 * 3600,
    "grpo": 8 * 3600,
    "reward_model": 8 * 3600,
    "ppo": 8 * 3600,
    "rloo": 8 * 3600,
    "evaluate": 2 * 3600,
    "register": 30 * 60,
}
FALLBACK_TIMEOUT_S = 2 * 3600.0

TRAINING_LAUNCHERS = ("components.core.ops.launch", "accelerate launch", "torchrun", "deepspeed")

# `python -m flows.pipeline run` imports MLflow and opens its store in this thread while Prefect starts its
# server; the flow waits for it before it writes (one writer at a time), so the work is overlapped, not raced
_tracking_warm_up: threading.Thread | None = None


class StageFailed(RuntimeError):
    """`dvc repro` of a stage exited non-zero; the message ends with the tail of its output."""


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
    # a matrix/foreach group is selected by its name too: "sources" = sources@src0, sources@src1, ...
    def names(s: Stage) -> set[str]:
        return {s.name, s.short_name, s.short_name.split("@", 1)[0]}

    known = set().union(*(names(s) for s in all_stages))
    unknown = [r for r in requested if r not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {[s.name for s in all_stages]}")
    return [s for s in all_stages if names(s) & set(requested)]


def changed_stages(repo_dir: str | Path, timeout_s: float = 300) -> set[str] | None:
    """The stages `dvc status` reports changed, in one call (None if it could not say: then every task runs and
    `dvc repro` decides)."""
    import subprocess

    try:
        out = subprocess.run(_dvc("status", "--json"), cwd=repo_dir, env=_stage_env({}), capture_output=True,
                             text=True, timeout=timeout_s)
        return set(json.loads(out.stdout or "{}")) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def stages_to_run(plan: list[Stage], changed: set[str] | None) -> set[str]:
    """The stages of plan that will run: those DVC reports changed, and everything downstream of them (a stage
    whose inputs an upstream run will rewrite is up to date only until then). All of plan when changed is None."""
    if changed is None:
        return {s.name for s in plan}
    run: set[str] = set()
    for stage in plan:  # dependency order: upstream first
        if stage.name in changed or any(u in run or u in changed for u in stage.upstream):
            run.add(stage.name)
    return run


def one_line(summary: dict) -> str:
    """The flow's result in one line: how many stages ran, were restored or up to date, and the promotion."""
    stages = {k: v for k, v in summary.items() if isinstance(v, dict) and "status" in v}
    counts = collections.Counter(v["status"] for v in stages.values())
    ran = [k for k, v in stages.items() if v["status"] != "up-to-date"]
    line = (f"alignflow-pipeline: {len(stages)} stages: {counts.get('ran', 0)} ran, {counts.get('restored', 0)} "
            f"restored from the run-cache, {counts.get('up-to-date', 0)} up to date")
    if ran:
        line += f" ({', '.join(ran)})"
    if "promotion" in summary:
        line += f"; promotion: {summary['promotion']}"
    return line


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


def _limited_tags(tags: set[str]) -> set[str]:
    """The tags among `tags` that a task concurrency limit keys on (`setup-pools` creates them).

    A task carries a tag only when a limit exists for it: Prefect acquires a slot for every tag of every
    task run, a round trip that took up to 2 s per stage in Prefect 3.8 even with no limit behind it."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return tags & {limit.tag for limit in client.read_concurrency_limits(limit=200, offset=0)}
    except Exception as e:  # keep the tags: a limit we could not read may exist
        get_run_logger().warning("could not read task concurrency limits (%s); tagging every task", e)
        return set(tags)


# ----------------------------------------------------------------------------- tasks


def retry_unless_input_error(task, task_run, state) -> bool:
    """Retry a failed stage unless it failed on its inputs (bad params or data, a diverging run): the
    stage printed INPUT_ERROR_MARK, and a retry would fail the same way."""
    from components.core.ops.logs import INPUT_ERROR_MARK

    return INPUT_ERROR_MARK not in f"{state.message or ''} {state.data!r}"


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_input_error)
def run_stage(
    stage: str,
    repo_dir: str,
    force: bool,
    timeout_s: float,
    extra_env: dict[str, str],
    dvc_remote: str | None,
) -> dict:
    """`dvc repro --single-item <stage>`: DVC decides whether it runs; a retry after a crash resumes
    from the stage's checkpoint."""
    logger = get_run_logger()
    attempt = current_task_run.get_run_count()
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
    limited = _limited_tags({DVC_TAG, GPU_TAG})
    # one `dvc status` for the whole plan: an up-to-date stage costs no task (nor its `dvc repro` start-up)
    will_run = stages_to_run(plan, None if force or remote else changed_stages(repo))
    if len(will_run) < len(plan):
        logger.info("up to date (dvc status): %s", ", ".join(s.name for s in plan if s.name not in will_run) or "-")

    uri = tracking.tracking_uri_for(repo)
    extra_env = {"MLFLOW_TRACKING_URI": uri}
    if flow_run_id:
        extra_env["ALIGNFLOW_FLOW_RUN_ID"] = flow_run_id
    parent_run_id = experiment_id = None
    if track and (will_run or promote):  # before any stage, so the tracking DB has one writer at a time
        if _tracking_warm_up is not None:
            _tracking_warm_up.join()
        parent_run_id, experiment_id = tracking.start_pipeline_run(
            uri, repo, flow_run_id, str(current_flow_run.get_name() or ""), [s.name for s in plan], force)
        extra_env["ALIGNFLOW_PARENT_RUN_ID"] = parent_run_id

    summary: dict[str, object] = {}
    status = "FAILED"
    try:
        if remote:
            pull_artifacts(str(repo), remote)
        for stage in plan:
            if stage.name not in will_run:
                summary[stage.short_name] = {"status": "up-to-date", "seconds": 0.0, "attempts": 0}
                continue
            stage_task = run_stage.with_options(
                name=f"stage-{stage.short_name}",
                task_run_name=f"dvc repro {stage.name}",
                retries=retries,
                retry_delay_seconds=retry_delay_s,
                tags=[t for t in ([DVC_TAG, GPU_TAG] if stage.training else [DVC_TAG]) if t in limited],
            )
            timeout = timeouts.get(stage.name, timeouts.get(stage.short_name, timeouts.get(
                stage.short_name.split("@", 1)[0], FALLBACK_TIMEOUT_S)))
            summary[stage.short_name] = stage_task(stage.name, str(repo), force, float(timeout), extra_env, remote)
        if parent_run_id:
            try:
                ran = [s.short_name for s in plan if summary[s.short_name]["status"] != "up-to-date"]
                links = tracking.link_stage_runs(uri, experiment_id, parent_run_id, flow_run_id, ran)
                for stage_name, run_id in links.items():
                    summary[stage_name]["mlflow_run_id"] = run_id
            except Exception as e:  # lineage is worth a warning, not a failed pipeline
                logger.warning("could not link the stages' MLflow runs: %s", e)
        if promote:
            summary["promotion"] = apply_promotion_gate(str(repo), extra_env, timeouts.get("promote", 1800))
        status = "FINISHED"
    finally:
        if parent_run_id:
            try:
                tracking.end_pipeline_run(uri, parent_run_id, repo, summary, status)
            except Exception as e:
                logger.warning("could not close the MLflow parent run %s: %s", parent_run_id, e)
    return summary


# ----------------------------------------------------------------------------- CLI


def _parse_timeouts(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        stage, _, seconds = item.partition("=")
        if not seconds:
            raise SystemExit(f"--timeout expects STAGE=SECONDS, got {item!r}")
        out[stage] = float(seconds)
    return out


def _parser() -> argparse.ArgumentParser:
    """The command line of `python -m flows.pipeline` (a bare `--promote` etc. means `run --promote`)."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"run": "run the pipeline once (Prefect's ephemeral server unless PREFECT_API_URL is set)",
             "serve": "serve the flow on a cron schedule (needs `prefect server start` and PREFECT_API_URL)"}
    for name in ("run", "serve"):
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument("--stages", nargs="+", default=None, help="stages to run (default: all in dvc.yaml)")
        p.add_argument("--force", action="store_true", help="re-run stages even when up to date")
        p.add_argument("--dvc-remote", default=None)
        p.add_argument("--repo-dir", default=".")
        p.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS")
        p.add_argument("--promote", action=argparse.BooleanOptionalAction, default=False,
                       help="finish with `alignflow promote` (the gate; a rejection is a result, not a failure)")
    sub.choices["run"].add_argument("--json", action="store_true", help="print the per-stage summary as JSON")
    serve = sub.choices["serve"]
    serve.add_argument("--cron", default="0 2 * * *", help="the schedule (cron syntax, the server's time zone)")
    serve.add_argument("--name", default="nightly", help="the deployment's name")
    pools = sub.add_parser("setup-pools", help="create the cpu/gpu work pools and concurrency limits",
                           description="create the cpu/gpu work pools and concurrency limits")
    pools.add_argument("--gpu-pool-type", default="kubernetes", choices=["kubernetes", "docker", "process"])
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    parser = _parser()
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
        global _tracking_warm_up
        _tracking_warm_up = threading.Thread(
            target=tracking.warm_up, args=(tracking.tracking_uri_for(args.repo_dir), args.repo_dir), daemon=True)
        _tracking_warm_up.start()
        summary = alignflow_pipeline(**params)
        print(json.dumps(summary, indent=2) if args.json else one_line(summary))
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
