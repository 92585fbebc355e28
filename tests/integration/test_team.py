"""The team set-up, run for real: an MLflow tracking server (PostgreSQL backend when this machine has it,
else SQLite) with a local artifact root, a Prefect server, the project's work pools, a deployment from
flows/prefect.yaml, a process worker, and a local DVC remote. The README's "Team set-up" section gives the
same commands. Every service is started and stopped inside the test.

Checks: the triggered deployment ran every stage; their MLflow runs are on the server, nested under the
flow's run; the registry moved as the gate decided; and a second checkout restores the artifacts with
`dvc pull` instead of recomputing them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import make_repo_copy, pipeline_env, run_cmd

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if Path("/usr/lib/postgresql").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def postgres(services: list, cleanup: list) -> str | None:
    """A throwaway PostgreSQL cluster (as the postgres user when we are root); its URI, or None."""
    import tempfile

    if PG_BIN is None:
        return None
    root = Path(tempfile.mkdtemp(prefix="alignflow-pg-"))  # outside pytest's 0700 tree: postgres must enter it
    cleanup.append(root)
    data, port = root / "pg", free_port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    try:
        data.mkdir()
        if as_pg:
            shutil.chown(root, "postgres")
            shutil.chown(data, "postgres")
        subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow"],
                       check=True, capture_output=True, timeout=120)
        log = root / "pg.log"
        proc = start([*as_pg, str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
                      "-h", "127.0.0.1"], dict(os.environ), log)
        services.append(proc)
        for _ in range(100):
            ok = subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                capture_output=True).returncode == 0
            if ok:
                break
            time.sleep(0.2)
        subprocess.run([*as_pg, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                       check=True, capture_output=True, timeout=60)
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    except (OSError, subprocess.SubprocessError):
        return None


def test_team_setup_end_to_end(tmp_path):
    from mlflow import MlflowClient

    services: list[subprocess.Popen] = []
    cleanup: list[Path] = []
    root = tmp_path / "team"
    root.mkdir()
    try:
        # ---------------------------------------------------------------- MLflow tracking server
        backend = postgres(services, cleanup) or f"sqlite:///{root / 'mlflow-server.db'}"
        print(f"MLflow backend store: {backend.split(':')[0]}")
        mlflow_port = free_port()
        base_env = pipeline_env(root)
        base_env.pop("MLFLOW_TRACKING_URI")
        server = start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                        "--artifacts-destination", str(root / "mlartifacts"), "--serve-artifacts",
                        "--host", "127.0.0.1", "--port", str(mlflow_port)],
                       base_env, root / "mlflow.log")
        services.append(server)
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", 180, server, root / "mlflow.log")
        tracking = f"http://127.0.0.1:{mlflow_port}"

        # ---------------------------------------------------------------- Prefect server
        prefect_port = free_port()
        prefect_env = {**base_env, "PREFECT_HOME": str(root / "prefect-home"),
                       "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
        prefect = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                         "--port", str(prefect_port)], prefect_env, root / "prefect.log")
        services.append(prefect)
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 180, prefect, root / "prefect.log")

        # ---------------------------------------------------------------- the checkout, with a DVC remote
        repo = make_repo_copy(root / "repo")
        # What is under test here is the team's services, not the online stages (test_dvc and test_flow run
        # them): disabled, they write their placeholders in a second each, and the flow still runs every stage.
        params = yaml.safe_load((repo / "params.yaml").read_text())
        for section in ("grpo", "reward_model", "ppo"):
            params[section]["enabled"] = False
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        remote = root / "dvc-remote"
        run_cmd(["dvc", "remote", "add", "-d", "storage", str(remote)], repo)
        run_cmd(["git", "commit", "-qam", "dvc remote"], repo)

        # ---------------------------------------------------------------- pools, deployment, worker
        env = {**prefect_env, "MLFLOW_TRACKING_URI": tracking, "ALIGNFLOW_REPO_DIR": str(repo),
               "ALIGNFLOW_DVC_REMOTE": "storage"}
        run_cmd([sys.executable, "-m", "flows.pipeline", "setup-pools", "--gpu-pool-type", "process"], repo, env=env)
        run_cmd([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", "flows/prefect.yaml",
                 "--name", "box"], repo, env=env, timeout=300)
        worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu", "--type", "process"],
                       env, root / "worker.log", cwd=repo)
        services.append(worker)

        # ---------------------------------------------------------------- trigger and wait
        out = run_cmd([sys.executable, "-m", "prefect", "deployment", "run", "alignflow-pipeline/box"], repo,
                      env=env).stdout
        flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        deadline = time.time() + 900
        with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                while True:
                    state = client.read_flow_run(flow_run_id).state
                    if state is not None and state.is_final():
                        break
                    assert time.time() < deadline, (root / "worker.log").read_text()[-4000:]
                    time.sleep(2)
        assert state.is_completed(), (root / "worker.log").read_text()[-6000:]

        # ---------------------------------------------------------------- MLflow: nested runs, registry
        ml = MlflowClient(tracking)
        [experiment] = [e for e in ml.search_experiments() if e.name == "alignflow"]
        [parent] = ml.search_runs([experiment.experiment_id],
                                  f"tags.`alignflow/kind` = 'pipeline' AND tags.`prefect/flow_run_id` = '{flow_run_id}'")
        assert parent.info.status == "FINISHED"
        children = ml.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        # every stage that opens an MLflow run (the reference pass only writes its artifact)
        assert {"sft", "dpo", "evaluate", "register"} <= {r.data.tags["alignflow/stage"] for r in children}
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        assert set(lock) >= {"bootstrap", "synthesize", "prepare", "sft", "reference", "dpo", "evaluate", "register"}
        name = yaml.safe_load((repo / "params.yaml").read_text())["register"]["model_name"]
        [version] = ml.search_model_versions(f"name='{name}'")
        decision = version.tags.get("promotion/decision")
        aliases = ml.get_registered_model(name).aliases
        assert decision in ("promoted", "rejected"), version.tags
        assert (aliases.get("champion") == int(version.version)) == (decision == "promoted")  # as the gate decided
        assert parent.data.tags["alignflow/promotion"] == decision

        # ---------------------------------------------------------------- a second checkout pulls, not recomputes
        run_cmd(["git", "add", "dvc.lock", "metrics", "plots"], repo)
        run_cmd(["git", "commit", "-qm", "pipeline run"], repo)
        second = root / "second"
        run_cmd(["git", "clone", "-q", str(repo), str(second)], root)
        run_cmd(["dvc", "pull"], second, env=pipeline_env(second))
        assert (second / "models/dpo/model.safetensors").exists()
        status = run_cmd(["dvc", "status", "--json"], second, env=pipeline_env(second)).stdout
        assert json.loads(status or "{}") == {}  # everything up to date: nothing to recompute
    finally:
        for proc in reversed(services):
            stop(proc)
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)
