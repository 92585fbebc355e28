"""The Prefect flow (flows/pipeline.py) against the real pipeline, on tiny params, in temp copies of the repo.

    .venv/bin/pytest tests/integration/test_flow.py                  # everything (~4 min on 2 cores)
    .venv/bin/pytest tests/integration/test_flow.py -m "not slow"    # runner + ordering only (~10 s)

One Prefect test server for the session (prefect_test_harness costs ~11 s). `dvc repro` runs the whole tiny
pipeline once (conftest's `tiny_repo`, shared with test_dvc.py); the flow then runs it in a fresh copy that holds
that run's DVC cache, so DVC restores every stage from its run cache, which it does only when the flow asks for
the same command, params, code and data; register (a persisted out, never run-cached) runs for real. Stages the
flow itself executes are checked by `sft_retry`: sft forced through the flow, crashed once, retried, resumed to
dvc repro's weights, its MLflow run nested under the flow's.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_repo_copy

from flows.pipeline import pipeline_stages, select_stages
from flows.supervisor import StageTimeout, run_command

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GIT_AUTHOR_NAME": "alignflow-test",
    "GIT_AUTHOR_EMAIL": "test@alignflow.invalid",
    "GIT_COMMITTER_NAME": "alignflow-test",
    "GIT_COMMITTER_EMAIL": "test@alignflow.invalid",
}
# Outs whose bytes legitimately differ between two identical runs: metrics/plots carry throughput and
# wall times; registration records MLflow run ids / versions, a timestamp, the git commit (each temp copy is
# its own commit) and the flow-run id. They are compared with those fields dropped.
VOLATILE_KEY_PARTS = (
    "per_second",
    "seconds",
    "time",
    "duration",
    "run_id",
    "version",
    "timestamp",
    "uri",
    "created",
    "git/commit",
    "prefect/",
    "alignflow/pid",  # the registering process and host: identity of a run, not of its result
    "alignflow/host",
)

# Files inside cached (cache: true) outs that carry wall-clock timings, so the out's hash changes on every
# run. A reproducibility wart of the stage, not of the flow: it makes downstream stages look changed when
# the stage re-runs. Listed so the test stays precise; remove an entry once the stage writes timings
# to its metrics file instead.
VOLATILE_FILES_IN_CACHED_OUTS: set[str] = set()


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def lock_outs(repo: Path) -> dict[str, str]:
    return {o["path"]: o["md5"] for s in lock(repo).values() for o in s.get("outs", [])}


def without_volatile(path: Path, also_drop: frozenset[str] = frozenset()):
    """File content with timing / identity fields (and keys in also_drop) removed: JSON keys, CSV columns."""

    def keep(key: str) -> bool:
        return (
            key not in also_drop
            and not key.endswith("_at")
            and not any(p in key.lower() for p in VOLATILE_KEY_PARTS)
        )

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if keep(k)}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    if path.suffix == ".json":
        return clean(json.loads(path.read_text()))
    if path.suffix == ".csv":
        with path.open() as f:
            return [{k: v for k, v in row.items() if keep(k)} for row in csv.DictReader(f)]
    return path.read_text()


def assert_same_but_timing(repo_a: Path, repo_b: Path, out: str, differing: list[str]) -> None:
    """Two versions of a DVC out that differ only where they may: timing / identity fields of metrics, plots
    and reports (cache: false), and the files in VOLATILE_FILES_IN_CACHED_OUTS. Everything else, models and
    data above all, must be bit-identical."""
    a, b = repo_a / out, repo_b / out
    files = (
        sorted(
            {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
            | {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
        )
        if a.is_dir()
        else [Path()]
    )
    for rel in files:
        fa, fb = a / rel, b / rel
        assert fa.exists() and fb.exists(), f"{out}/{rel} exists in only one run"
        if fa.read_bytes() == fb.read_bytes():
            continue
        path = str(Path(out) / rel) if rel != Path() else out
        allowed = path in VOLATILE_FILES_IN_CACHED_OUTS or path.startswith(("metrics/", "plots/", "reports/"))
        assert allowed, f"{path} differs between the flow run and dvc repro"
        # lineage tags that record the hash of an out which itself differs (dvc/<out>) may differ too
        hashes = frozenset(f"dvc/{d}" for d in differing)
        assert without_volatile(fa, hashes) == without_volatile(fb, hashes), (
            f"{path} differs beyond timing fields"
        )


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"  # dead, waiting for its (new) parent to reap it


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect test server for the session, with PREFECT_HOME and the offline env in a sandbox."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect_home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**OFFLINE_ENV, "PREFECT_HOME": str(home)}.items():
            mp.setenv(key, value)
        with (
            temporary_settings(updates={PREFECT_HOME: home}),
            prefect_test_harness(server_startup_timeout=90),
        ):
            yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def flow_run(prefect_server, tiny_repo, tmp_path_factory):
    """The whole tiny pipeline run once by the flow in a fresh copy holding `dvc repro`'s cache (tiny_repo's):
    (repo, summary, flow_run_id, seconds)."""
    from flows.pipeline import alignflow_pipeline

    repo = make_repo_copy(tmp_path_factory.mktemp("flow_repo"))
    shutil.copytree(tiny_repo / ".dvc" / "cache", repo / ".dvc" / "cache")
    started = time.perf_counter()
    state = alignflow_pipeline(repo_dir=str(repo), promote=True, retry_delay_s=1, return_state=True)
    seconds = time.perf_counter() - started
    assert state.is_completed(), state
    return repo, state.result(), str(state.state_details.flow_run_id), seconds


@pytest.fixture(scope="module")
def sft_retry(flow_run, tmp_path_factory):
    """sft forced through the flow in a copy of the flow's repo, crashing once after its step-3 checkpoint:
    (repo, sft's models/sft hash before, marker file, summary, flow_run_id)."""
    from flows.pipeline import alignflow_pipeline

    repo = tmp_path_factory.mktemp("retry") / "repo"
    shutil.copytree(flow_run[0], repo, symlinks=True)
    marker = repo.parent / "crash.marker"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGNFLOW_CRASH_AT_STEP", "4")  # after the step-3 checkpoint
        mp.setenv("ALIGNFLOW_CRASH_MARKER", str(marker))
        state = alignflow_pipeline(stages=["sft"], force=True, repo_dir=str(repo), retry_delay_s=1, return_state=True)
    assert state.is_completed(), state
    return repo, lock_outs(flow_run[0])["models/sft"], marker, state.result(), str(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def repro_run(tiny_repo):
    """The same tiny pipeline (configs/params/tiny.yaml) run by plain `dvc repro` (conftest's session copy)."""
    return tiny_repo, float("nan")


# ----------------------------------------------------------------------------- runner + ordering (fast)


def test_only_changed_stages_and_their_downstream_run_and_the_result_is_one_line():
    from flows.pipeline import Stage, one_line, stages_to_run

    plan = [Stage("prepare", "", False), Stage("sft", "", True, ("prepare",)), Stage("dpo", "", True, ("sft",)),
            Stage("other", "", False)]
    assert stages_to_run(plan, {"sft"}) == {"sft", "dpo"}  # dpo's inputs are about to change
    assert stages_to_run(plan, set()) == set()
    assert stages_to_run(plan, None) == {"prepare", "sft", "dpo", "other"}  # dvc status failed: DVC decides each
    summary = {"prepare": {"status": "up-to-date"}, "sft": {"status": "ran"}, "dpo": {"status": "restored"},
               "promotion": "rejected"}
    assert one_line(summary) == ("alignflow-pipeline: 3 stages: 1 ran, 1 restored from the run-cache, 1 up to date "
                                 "(sft, dpo); promotion: rejected")



def test_a_stage_that_failed_on_its_inputs_is_not_retried():
    from prefect.states import Failed

    from components.core.ops.logs import INPUT_ERROR_MARK
    from flows.pipeline import StageFailed, retry_unless_input_error

    deterministic = StageFailed(f"stage 'prepare' failed with exit code 1; last lines:\nprepare: error: x.jsonl:3: "
                                f"invalid JSON\n{INPUT_ERROR_MARK} (DataError): fix the params or data")
    crashed = StageFailed("stage 'sft' failed with exit code 137; last lines:\nKilled")
    assert retry_unless_input_error(None, None, Failed(data=deterministic, message=repr(deterministic))) is False
    assert retry_unless_input_error(None, None, Failed(data=crashed, message=repr(crashed))) is True


def test_runner_streams_merged_output_line_by_line(tmp_path):
    lines: list[str] = []
    rc = run_command(
        ["bash", "-c", "echo one; echo two >&2; printf 'bar 1\\rbar 2\\n'; exit 3"],
        tmp_path,
        None,
        timeout_s=30,
        on_line=lines.append,
    )
    assert rc == 3
    assert lines == ["one", "two", "bar 1", "bar 2"]


def test_runner_streams_progress_redraws_as_they_happen(tmp_path):
    started, seen = time.monotonic(), {}
    run_command(
        ["bash", "-c", "printf 'step 1\\r'; sleep 1.5; printf 'step 2\\n'"],
        tmp_path,
        None,
        timeout_s=30,
        on_line=lambda line: seen.setdefault(line, time.monotonic() - started),
    )
    assert seen["step 1"] < 1.0 <= seen["step 2"]  # a \r redraw is logged before the line is finished


def test_timeout_terminates_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(StageTimeout):
        run_command(
            ["bash", "-c", f"sleep 100 & echo $! > {pidfile}; echo started; wait"],
            tmp_path,
            None,
            timeout_s=1.0,
            on_line=lines.append,
            kill_grace_s=10.0,
        )
    assert time.monotonic() - started < 8  # SIGTERM was enough: no wait for the grace period
    assert "started" in lines
    assert process_gone(int(pidfile.read_text()))  # the grandchild went with its leader


def test_timeout_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(StageTimeout):  # ignored SIGTERM is inherited by the child: both need SIGKILL
        run_command(
            ["bash", "-c", f"trap '' TERM; sleep 100 & echo $! > {pidfile}; wait"],
            tmp_path,
            None,
            timeout_s=1.0,
            on_line=lambda line: None,
            kill_grace_s=1.0,
        )
    assert 2.0 <= time.monotonic() - started < 10
    assert process_gone(int(pidfile.read_text()))


def test_stages_come_in_dependency_order_with_dvc_yaml_order_breaking_ties(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "c": {"cmd": "cp b.txt c.txt", "deps": ["b.txt"], "outs": ["c.txt"]},
                    "a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
                    "b": {
                        "cmd": "accelerate launch --config_file x.yaml -m train",
                        "deps": ["a.txt"],
                        "outs": ["b.txt"],
                    },
                    "z": {"cmd": "echo z > z.txt", "outs": ["z.txt"]},
                }
            },
            sort_keys=False,
        )
    )
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"],
        cwd=tmp_path,
        check=True,
        env=subprocess_env(),
    )
    stages = pipeline_stages(tmp_path)
    assert [s.name for s in stages] == ["a", "b", "c", "z"]
    assert [s.name for s in stages if s.training] == ["b"]
    assert [s.name for s in select_stages(stages, ["z", "b"])] == ["b", "z"]
    with pytest.raises(ValueError, match="unknown stage"):
        select_stages(stages, ["nope"])
    assert [s.upstream for s in stages] == [(), ("a",), ("b",), ()]


# ----------------------------------------------------------------------------- the flow on the real pipeline


@pytest.mark.integration
@pytest.mark.slow
def test_flow_leaves_the_same_artifacts_and_lock_as_dvc_repro(flow_run, repro_run):
    flow_repo, summary, _, flow_seconds = flow_run
    repro_repo, repro_seconds = repro_run
    print(f"\nflow {flow_seconds:.1f}s (overhead is measured by benchmarks/orchestration_overhead.py)")
    stages_in_yaml = [s.short_name for s in pipeline_stages(flow_repo)]  # matrix stages expanded (sources@src0)
    assert stages_in_yaml[:4] == ["bootstrap", "synthesize", "sources@src0", "sources@src1"]
    assert list(summary) == [*stages_in_yaml, "promotion"]  # dvc.yaml lists them in dependency order
    # DVC restores a stage from its run cache only for the same command, params, code and data: the flow asked
    # for exactly the stages `dvc repro` ran. register's out is persisted (never run-cached), so it ran again;
    # DVC also re-runs reward_model here instead of restoring it, and its model must then equal repro's (below).
    status = {s: summary[s]["status"] for s in stages_in_yaml}
    assert set(status.values()) <= {"restored", "ran"} and status["register"] == "ran"
    assert all(status[s] == "restored" for s in ("bootstrap", "prepare", "sft", "reference", "dpo", "grpo",
                                                  "ppo", "rloo", "evaluate")), status
    assert all(summary[s]["attempts"] == 1 for s in stages_in_yaml)
    assert summary["promotion"] in ("promoted", "rejected")

    flow_outs, repro_outs = lock_outs(flow_repo), lock_outs(repro_repo)
    assert flow_outs.keys() == repro_outs.keys()
    differing = sorted(p for p in flow_outs if flow_outs[p] != repro_outs[p])
    print("outs that differ only in timing/identity fields:", differing)
    for path in differing:
        assert_same_but_timing(flow_repo, repro_repo, path, differing)
    for model in ("models/base", "models/sft", "models/dpo", "models/reward_model"):  # bit-identical on CPU
        if model in flow_outs:
            assert flow_outs[model] == repro_outs[model], f"{model} differs"

    flow_lock, repro_lock = lock(flow_repo), lock(repro_repo)
    assert list(flow_lock) == list(repro_lock)
    for name in flow_lock:  # cmd, params and deps (code + upstream data) identical, up to the outs above
        for field in ("cmd", "params"):
            assert flow_lock[name].get(field) == repro_lock[name].get(field), (name, field)
        masked = [
            [{**d, "md5": "", "size": 0} if d["path"] in differing else d for d in lk[name].get("deps", [])]
            for lk in (flow_lock, repro_lock)
        ]
        assert masked[0] == masked[1], (name, "deps")

    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=flow_repo,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout) == {}  # the flow's dvc.lock is what `dvc repro` would accept as current


@pytest.mark.integration
@pytest.mark.slow
def test_flow_nests_and_cross_links_stage_runs_in_mlflow(flow_run, sft_retry):
    from mlflow import MlflowClient

    for repo, summary, flow_run_id, stages in ((flow_run[0], flow_run[1], flow_run[2], {"register"}),
                                              (sft_retry[0], sft_retry[3], sft_retry[4], {"sft"})):
        client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("alignflow")
        [parent] = client.search_runs(
            [experiment.experiment_id],
            f"tags.`alignflow/kind` = 'pipeline' AND tags.`prefect/flow_run_id` = '{flow_run_id}'",
        )
        tags = parent.data.tags
        assert parent.info.status == "FINISHED"
        assert (
            tags["git/commit"]
            == subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
            ).stdout.strip()
        )
        assert tags["dvc/dvc.lock"] and tags["dvc/models/sft"] == lock_outs(repo)["models/sft"]
        linked = {
            s: r["mlflow_run_id"] for s, r in summary.items() if isinstance(r, dict) and r.get("mlflow_run_id")
        }
        assert stages <= set(linked)  # the stages this flow executed (restored ones open no run)
        for stage, run_id in linked.items():
            assert tags[f"stage_run/{stage}"] == run_id
            child = client.get_run(run_id).data.tags
            assert child["alignflow/stage"] == stage
            assert child["parent_flow_run"] == parent.info.run_id == child["mlflow.parentRunId"]
            assert child["prefect/flow_run_id"] == flow_run_id


@pytest.mark.integration
@pytest.mark.slow
def test_flow_rerun_with_nothing_changed_skips_every_stage(flow_run):
    from mlflow import MlflowClient

    from components.core.ops import tracking
    from flows.pipeline import alignflow_pipeline

    repo, _, _, _ = flow_run
    before = (repo / "dvc.lock").read_text()
    client = MlflowClient(tracking.tracking_uri_for(repo))
    runs = {r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    summary = alignflow_pipeline(repo_dir=str(repo))
    assert {r["status"] for r in summary.values()} == {"up-to-date"}
    assert {r["attempts"] for r in summary.values()} == {0}  # one `dvc status`, no stage task
    assert "promotion" not in summary
    assert (repo / "dvc.lock").read_text() == before
    after = {r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert after == runs  # nothing ran: no empty parent run either


@pytest.mark.integration
@pytest.mark.slow
def test_the_readme_quick_start_on_an_up_to_date_checkout_says_so_in_one_line(flow_run, prefect_server):
    """`python -m flows.pipeline` as the README writes it, against a running server, on the flow's checkout: every
    stage up to date after one `dvc status`, one summary line."""
    from conftest import pipeline_env

    repo = flow_run[0]
    env = {**pipeline_env(repo), "PREFECT_API_URL": prefect_server}
    env.pop("MLFLOW_TRACKING_URI")  # the project's own store, as for a user
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = proc.stdout.strip().splitlines()
    n = len(pipeline_stages(repo))
    assert line == f"alignflow-pipeline: {n} stages: 0 ran, 0 restored from the run-cache, {n} up to date", line
    print(f"no-op flow run through the CLI: {seconds:.1f} s")  # measured in benchmarks/orchestration_overhead.py


@pytest.mark.integration
@pytest.mark.slow
def test_crashed_training_stage_is_retried_and_resumes_to_the_same_weights(sft_retry):
    """The flow executing sft (not restoring it) crashes once, retries, resumes from the step-3 checkpoint and
    ends on the weights `dvc repro` trained: the flow's way of running a stage changes no bit."""
    repo, sft_before, marker, summary, _ = sft_retry
    assert marker.read_text() == "4"  # it did crash once ...
    assert summary["sft"]["attempts"] == 2 and summary["sft"]["status"] == "ran"  # ... and the retry finished
    assert lock_outs(repo)["models/sft"] == sft_before  # resumed from step 3 to bit-identical weights


# ----------------------------------------------------------------------------- deployments


@pytest.mark.integration
@pytest.mark.slow
def test_prefect_yaml_deploys_with_schedule_pools_and_limits(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pools import GPU_TAG, setup_work_pools

    shutil.copytree(ROOT / "flows", tmp_path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    setup_work_pools()
    setup_work_pools()  # idempotent
    env = {**subprocess_env(), "PREFECT_API_URL": prefect_server}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            "flows/prefect.yaml",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("alignflow-pipeline/nightly")
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        assert nightly.schedules[0].active
        assert nightly.work_pool_name == "gpu" and nightly.parameters["promote"] is True
        assert nightly.job_variables["gpu_count"] == 1 and nightly.job_variables["image"]
        assert nightly.concurrency_limit == 1 or nightly.global_concurrency_limit.limit == 1
        train = client.read_deployment_by_name("alignflow-pipeline/train-gpu")
        assert train.work_pool_name == "gpu" and train.parameters["stages"] == ["sft", "reference", "dpo", "grpo"]
        cpu = client.read_deployment_by_name("alignflow-pipeline/cpu-stages")
        assert cpu.work_pool_name == "cpu" and cpu.parameters["stages"] == ["sources", "prepare", "evaluate", "register"]

        gpu_pool = client.read_work_pool("gpu")
        assert gpu_pool.concurrency_limit == 1
        container = gpu_pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"][
            "spec"
        ]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
        assert client.read_work_pool("cpu").type == "process"
        assert client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit == 1
    # the flow tags its tasks with exactly the tags a limit keys on (an unlimited tag costs a round trip)
    from flows.pipeline import _limited_tags
    from flows.pools import DVC_TAG

    assert _limited_tags({DVC_TAG, GPU_TAG, "no-limit-here"}) == {DVC_TAG, GPU_TAG}
