"""The team set-up, run for real: an S3-compatible object store (moto's server on 127.0.0.1) holding the DVC remote
and MLflow's artifacts, an MLflow tracking server (PostgreSQL backend when this machine has it, else SQLite) proxying
those artifacts, a Prefect server, the project's work pools, a deployment from flows/prefect.yaml and a process
worker. flows/README.md ("One box with a worker") and
docs/design.md ("Team set-up") give the same commands. Every service is started and stopped inside the test.

Both servers require credentials (MLflow's basic-auth app, Prefect's auth string), given to every client through
the environment. Checks: requests without credentials are refused; the triggered deployment ran every stage;
their MLflow runs are on the server, nested under the flow's run; the registry moved as the gate decided; two
promotions racing from two "machines" move the champion exactly once (the Prefect server's concurrency slot);
and a second checkout restores the artifacts with `dvc pull` instead of recomputing them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import make_repo_copy, pipeline_env, run_cmd

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BUCKET = "alignflow-team"
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


MLFLOW_PASSWORD = "alignflow-Team-Secret-1"
PREFECT_AUTH = "admin:alignflow-prefect-secret"

RACE = """
import sys
from components.core.config import GateConfig
from components.core.release import registry
from components.core.release.gate import Decision

name, candidate = sys.argv[1], sys.argv[2]
client = registry.registry_client()
result = {"decision": "promoted", "champion": "1", "eval_set": "race"}
decision = Decision(passed=True, delta=0.1, ci_low=0.05, ci_high=0.15, reasons=["race test"])
try:
    registry._record_decision(client, name, client.get_model_version(name, candidate),
                              client.get_model_version(name, "1"), result, decision, GateConfig())
    print("moved")
except registry.RegistryError as e:
    print("refused:", e)
"""


def refused(url: str, data: bytes | None = None) -> bool:
    """Whether the server answers 401 to a request without credentials."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as e:
        return e.code == 401
    return False


def race_two_promotions(ml, name: str, repo: Path, env: dict, root: Path) -> None:
    """Two processes, as on two machines (each its own lock directory), move `champion` off v1 at once against one
    tracking server. Each waits 3 s inside the registry lock before its compare-and-set, so per-machine file locks
    alone would let both read v1 and both move; the Prefect server's concurrency slot lets exactly one move, and
    the other finds the champion moved and changes nothing."""
    v1 = ml.get_model_version(name, "1")
    for _ in range(2):  # v2, v3: the same model under new versions, enough for an alias move
        model_id = v1.model_id or v1.source.removeprefix("models:/").split("/")[0]  # MLflow 3: models:/<model id>
        ml.create_model_version(name, v1.source, run_id=v1.run_id, model_id=model_id)
    ml.set_registered_model_alias(name, "champion", "1")
    procs = []
    for candidate in ("2", "3"):
        machine = root / f"machine-{candidate}"
        machine.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-c", RACE, name, candidate], cwd=repo, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**env, "XDG_CACHE_HOME": str(machine), "ALIGNFLOW_REGISTRY_LOCK_HOLD_S": "3"}))
    outcomes = [p.communicate(timeout=300) for p in procs]
    said = [out.strip().splitlines()[-1] if out.strip() else err[-2000:] for out, err in outcomes]
    assert sorted(s.split(":")[0] for s in said) == ["moved", "refused"], said
    winner = ("2", "3")[[s.split(":")[0] for s in said].index("moved")]
    assert "champion moved from v1" in next(s for s in said if s.startswith("refused"))
    assert str(ml.get_registered_model(name).aliases["champion"]) == winner
    tagged = [v for v in ("2", "3") if ml.get_model_version(name, v).tags.get("promotion/decision")]
    assert tagged == [winner]  # the refused one recorded nothing


def test_team_setup_end_to_end(tmp_path):
    from mlflow import MlflowClient

    services: list[subprocess.Popen] = []
    cleanup: list[Path] = []
    cleanup_env: list[str] = []
    root = tmp_path / "team"
    root.mkdir()
    try:
        # ---------------------------------------------------------------- S3-compatible object storage
        # moto's server on 127.0.0.1: the DVC remote and MLflow's artifact store, as a team's bucket would be
        s3_port = free_port()
        s3_url = f"http://127.0.0.1:{s3_port}"
        s3_env = {"AWS_ACCESS_KEY_ID": "alignflow-test", "AWS_SECRET_ACCESS_KEY": "alignflow-test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(s3_env)  # every client below (dvc, the stages, this process's boto3)
        cleanup_env.extend(s3_env)
        s3 = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], dict(os.environ),
                   root / "s3.log")
        services.append(s3)
        wait_http(f"{s3_url}/moto-api/", 120, s3, root / "s3.log")
        import boto3

        boto3.client("s3", endpoint_url=s3_url).create_bucket(Bucket=BUCKET)

        # ---------------------------------------------------------------- MLflow tracking server
        # with MLflow's basic-auth app: the admin's password comes from the environment, as the README's
        backend = postgres(services, cleanup) or f"sqlite:///{root / 'mlflow-server.db'}"
        print(f"MLflow backend store: {backend.split(':')[0]}")
        mlflow_port = free_port()
        base_env = pipeline_env(root)
        base_env.pop("MLFLOW_TRACKING_URI")
        (root / "mlflow-auth.ini").write_text(
            f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'mlflow-auth.db'}\n"
            "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        server_env = {**base_env, "MLFLOW_AUTH_CONFIG_PATH": str(root / "mlflow-auth.ini"), "MLFLOW_S3_ENDPOINT_URL": s3_url,
                      "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key"}
        server = start([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                        "--backend-store-uri", backend,
                        "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts",
                        "--host", "127.0.0.1", "--port", str(mlflow_port)],
                       server_env, root / "mlflow.log")
        services.append(server)
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", 180, server, root / "mlflow.log")
        tracking = f"http://127.0.0.1:{mlflow_port}"
        assert refused(f"{tracking}/api/2.0/mlflow/experiments/search?max_results=1")

        # ---------------------------------------------------------------- Prefect server, with an auth string
        prefect_port = free_port()
        prefect_env = {**base_env, "PREFECT_HOME": str(root / "prefect-home"),
                       "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
        prefect = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                         "--port", str(prefect_port)],
                        {**prefect_env, "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH}, root / "prefect.log")
        services.append(prefect)
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 180, prefect, root / "prefect.log")
        assert refused(f"http://127.0.0.1:{prefect_port}/api/flows/filter", data=b"{}")
        prefect_env["PREFECT_API_AUTH_STRING"] = PREFECT_AUTH  # every client below: CLI, worker, flow, stages

        # ---------------------------------------------------------------- the checkout, with a DVC remote
        repo = make_repo_copy(root / "repo")
        # What is under test here is the team's services, not the online stages (test_dvc and test_flow run
        # them): disabled, they write their placeholders in a second each, and the flow still runs every stage.
        params = yaml.safe_load((repo / "params.yaml").read_text())
        for section in ("grpo", "reward_model", "ppo"):
            params[section]["enabled"] = False
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run_cmd(["dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc"], repo)
        run_cmd(["dvc", "remote", "modify", "storage", "endpointurl", s3_url], repo)
        run_cmd(["git", "commit", "-qam", "dvc remote"], repo)

        # ---------------------------------------------------------------- pools, deployment, worker
        env = {**prefect_env, "MLFLOW_TRACKING_URI": tracking, "ALIGNFLOW_REPO_DIR": str(repo),
               "ALIGNFLOW_DVC_REMOTE": "storage", "MLFLOW_TRACKING_USERNAME": "admin",
               "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}
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
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        deadline = time.time() + 900
        with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"],
                                 PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
            with get_client(sync_client=True) as client:
                while True:
                    state = client.read_flow_run(flow_run_id).state
                    if state is not None and state.is_final():
                        break
                    assert time.time() < deadline, (root / "worker.log").read_text()[-4000:]
                    time.sleep(2)
        assert state.is_completed(), (root / "worker.log").read_text()[-6000:]

        # ---------------------------------------------------------------- MLflow: nested runs, registry
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=MLFLOW_PASSWORD)
        cleanup_env.extend(["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"])
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

        # ---------------------------------------------------------------- two machines promote at once
        race_two_promotions(ml, name, repo, env, root)

        # ---------------------------------------------------------------- a second checkout pulls, not recomputes
        run_cmd(["git", "add", "dvc.lock"], repo)  # metrics and plots travel with the models, through the remote
        run_cmd(["git", "commit", "-qm", "pipeline run"], repo)
        second = root / "second"
        run_cmd(["git", "clone", "-q", str(repo), str(second)], root)
        run_cmd(["dvc", "pull"], second, env=pipeline_env(second))
        assert (second / "models/dpo/model.safetensors").exists()
        assert json.loads((second / "metrics/eval.json").read_text()) == json.loads((repo / "metrics/eval.json").read_text())
        listed = boto3.client("s3", endpoint_url=s3_url).list_objects_v2(Bucket=BUCKET)["Contents"]
        assert {o["Key"].split("/")[0] for o in listed} == {"dvc", "mlflow"}  # both stores are in the bucket
        # the registered model, loaded through the tracking server (its artifacts proxied from the bucket), answers
        import mlflow

        mlflow.set_tracking_uri(tracking)
        chat = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
        answer = chat.predict({"messages": [{"role": "user", "content": "Sort ascending: 3 1 2"}], "temperature": 0,
                               "max_tokens": 8})
        assert answer["choices"][0]["message"]["role"] == "assistant"
        status = run_cmd(["dvc", "status", "--json"], second, env=pipeline_env(second)).stdout
        assert json.loads(status or "{}") == {}  # everything up to date: nothing to recompute
    finally:
        for key in cleanup_env:
            os.environ.pop(key, None)
        for proc in reversed(services):
            stop(proc)
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)
