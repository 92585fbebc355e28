"""Registry: the promotion gate on hand-made numbers, then register / promote / rollback / status
against a real MLflow SQLite store with two tiny real models (built offline, ~50k parameters).

The store's schema is created once per session and copied per test (creating it costs seconds; MLflow
writes from this one process only). Tests call `components.cli.main` so exit codes are checked too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from components import cli, register
from components.core.release.gate import gate_decision

NAME = "tiny-aligned"
GATE = {"primary_metric": "eval/reward_mean", "min_delta": 0.0, "confidence": 0.95, "max_kl": 50.0,
        "max_length_ratio": 2.0, "min_prompts": 2}
GOOD_METRICS = {"eval/kl_to_reference": 3.0, "eval/length_ratio": 1.1, "eval/num_prompts": 6}


# ----------------------------------------------------------------------------- gate_decision (unit)

PARITY_PASS = ("pass", "4/4 held-out prompts identical")


def decide(*args, parity=PARITY_PASS):
    return gate_decision(*args, serving_parity=parity)



def test_gate_passes_on_a_clear_paired_improvement():
    # every prompt improves by exactly 0.5: each resample's mean is 0.5, so the interval is [0.5, 0.5]
    d = decide([0.75, 1.0, 0.5, 0.5], [0.25, 0.5, 0.0, 0.0], GOOD_METRICS, GATE, 200, 0)
    assert d.passed, d.reasons
    assert (d.delta, d.ci_low, d.ci_high) == (0.5, 0.5, 0.5)
    assert len(d.reasons) == 6 and all(r.startswith("PASS") for r in d.reasons)


def test_gate_rejects_when_the_interval_includes_zero():
    # differences +1, -1, +1, -1, +0.5: mean 0.1 > min_delta 0, but resamples of 5 values straddle 0
    d = decide([1, 0, 1, 0, 0.5], [0, 1, 0, 1, 0], GOOD_METRICS, GATE, 1000, 0)
    assert not d.passed
    assert d.delta == pytest.approx(0.1)
    assert d.ci_low < 0 < d.ci_high
    assert any(r.startswith("FAIL 95% CI") for r in d.reasons)


def test_gate_rejects_a_tie_and_a_too_small_gain():
    tie = decide([0.5, 0.5], [0.5, 0.5], GOOD_METRICS, GATE, 200, 0)
    assert not tie.passed and (tie.delta, tie.ci_low) == (0.0, 0.0)  # [0, 0] does not exclude zero
    small = decide([0.75, 0.75], [0.5, 0.5], GOOD_METRICS, {**GATE, "min_delta": 0.5}, 200, 0)
    assert not small.passed
    assert [r.split()[0] for r in small.reasons] == ["FAIL", "PASS", "PASS", "PASS", "PASS", "PASS"]  # CI fine, delta short


@pytest.mark.parametrize("metrics, failing", [
    ({"eval/kl_to_reference": 50.01, "eval/length_ratio": 1.0}, "eval/kl_to_reference"),
    ({"eval/kl_to_reference": 1.0, "eval/length_ratio": 2.5}, "eval/length_ratio"),
    ({"eval/length_ratio": 1.0}, "eval/kl_to_reference missing"),
    ({"eval/kl_to_reference": float("nan"), "eval/length_ratio": 1.0}, "eval/kl_to_reference missing"),
    ({"eval/kl_to_reference": 1.0, "eval/length_ratio": 1.0}, "compared on"),
])
def test_guardrails_veto_an_improvement(metrics, failing):
    gate = {**GATE, "min_prompts": 3} if failing == "compared on" else GATE
    d = decide([1.0, 1.0], [0.0, 0.0], metrics, gate, 200, 0)
    assert not d.passed
    assert [r for r in d.reasons if r.startswith("FAIL")] == [next(r for r in d.reasons if failing in r)]


def test_no_champion_passes_but_guardrails_still_apply():
    d = decide(None, None, GOOD_METRICS, GATE, 200, 0)
    assert d.passed and "no champion" in d.reasons[0] and d.delta is None
    assert not decide(None, None, {**GOOD_METRICS, "eval/kl_to_reference": 99.0}, GATE, 200, 0).passed


def test_too_few_prompts_never_promote_and_a_ci_below_zero_says_so():
    one = decide([0.9], [0.1], GOOD_METRICS, {**GATE, "min_prompts": 50}, 200, 0)
    assert not one.passed and (one.ci_low, one.ci_high) == pytest.approx((0.8, 0.8))  # a "CI" of one prompt
    assert "FAIL compared on 1 prompts < gate.min_prompts 50" in one.reasons
    first = decide(None, None, {**GOOD_METRICS, "eval/num_prompts": 4}, {**GATE, "min_prompts": 50}, 200, 0)
    assert not first.passed and "FAIL evaluated on 4 held-out prompts < gate.min_prompts 50" in first.reasons
    worse = decide([0.0] * 10, [1.0] * 10, GOOD_METRICS, GATE, 200, 0)
    assert any(r.endswith("lies below 0") for r in worse.reasons)


@pytest.mark.parametrize("parity, reason", [
    (None, "FAIL serving parity never checked on this version (alignflow serve-check VERSION)"),
    (("", ""), "FAIL serving parity never checked on this version (alignflow serve-check VERSION)"),
    (("fail", "3/4 held-out prompts identical; first difference: ..."),
     "FAIL serving parity: 3/4 held-out prompts identical; first difference: ..."),
])
def test_a_version_that_does_not_serve_as_evaluated_is_never_promoted(parity, reason):
    first = decide(None, None, GOOD_METRICS, GATE, 200, 0, parity=parity)
    better = decide([1.0, 1.0], [0.0, 0.0], GOOD_METRICS, GATE, 200, 0, parity=parity)
    for d in (first, better):
        assert not d.passed and [r for r in d.reasons if r.startswith("FAIL")] == [reason]


def test_unpaired_scores_are_an_error():
    with pytest.raises(ValueError, match="paired"):
        decide([1.0, 0.0], [0.0], GOOD_METRICS, GATE, 200, 0)


# ----------------------------------------------------------------------------- workspace


def write_params(gate: dict | None = None, **evaluate) -> None:
    params = {
        "seed": 7,
        "data": {"sources": [{"path": "data/raw/preferences.jsonl"}]},
        "evaluate": {"num_prompts": 6, "max_new_tokens": 6, "temperature": 1.0, "batch_size": 8,
                     "bootstrap_samples": 200, **evaluate},
        "register": {"model_name": NAME, "gate": {**GATE, **(gate or {})}},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))


def stage_candidate(model_dir: Path, reward_mean: float, kl: float = 3.0) -> None:
    """What the dpo and evaluate stages leave behind for `register`."""
    shutil.rmtree("models/dpo", ignore_errors=True)
    shutil.copytree(model_dir, "models/dpo")
    metrics = {"eval/reward_mean": reward_mean, "eval/sft/reward_mean": 0.4, "eval/win_rate_vs_sft": 0.6,
               "eval/win_rate_ci_low": 0.52, "eval/win_rate_ci_high": 0.68, "eval/kl_to_reference": kl,
               "eval/length_ratio": 1.05, "eval/num_prompts": 6}
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/eval.json").write_text(json.dumps(metrics))
    Path("reports/eval").mkdir(parents=True, exist_ok=True)
    Path("reports/eval/index.html").write_text("<html>report</html>")
    from components.core.train.checkpoints import model_identity

    Path("reports/eval/evaluated_models.json").write_text(json.dumps({"dpo": model_identity("models/dpo")}))


def make_workspace(root: Path, store: Path, mp: pytest.MonkeyPatch) -> Path:
    """A project directory for `register`: params, held-out prompts, a dvc.lock, its own copy of the store (cwd)."""
    from components.core import sorting as synthetic

    mp.chdir(root)
    shutil.copy(store, root / "mlflow.db")
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("ALIGNFLOW_FLOW_RUN_ID", "flow-run-42")
    mp.delenv("ALIGNFLOW_PARENT_RUN_ID", raising=False)
    write_params()
    _, pairs = synthetic.generate(0, 8, 3, 4, 9, 0.0, seed=11)
    Path("data/prepared").mkdir(parents=True)
    Path("data/prepared/pref_eval.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", **r}) + "\n" for i, r in enumerate(pairs)))
    lock = {"schema": "2.0", "stages": {
        "prepare": {"outs": [{"path": "data/prepared", "md5": "d0d0.dir"}]},
        "sft": {"outs": [{"path": "models/sft", "md5": "5f75.dir"}]},
        "reference": {"outs": [{"path": "artifacts/ref_logps", "md5": "4ef5.dir"}]},
        "dpo": {"outs": [{"path": "models/dpo", "md5": "d90d.dir"}]},
    }}
    Path("dvc.lock").write_text(yaml.safe_dump(lock))
    return root


@pytest.fixture
def workspace(tmp_path, monkeypatch, empty_store):
    return make_workspace(tmp_path, empty_store, monkeypatch)


def aliases() -> dict[str, str]:
    import mlflow

    return {a: str(v) for a, v in mlflow.MlflowClient().get_registered_model(NAME).aliases.items()}


def version_tags(version: str) -> dict[str, str]:
    import mlflow

    return dict(mlflow.MlflowClient().get_model_version(NAME, version).tags)


# ----------------------------------------------------------------------------- register / promote / rollback


@pytest.mark.integration
def test_register_promote_rollback(workspace, tiny_models, monkeypatch, capsys):
    from components.core.eval import judges

    # -- first registration: challenger, lineage on the version; promotion: no champion -> champion
    stage_candidate(tiny_models["a"], reward_mean=0.40)
    assert cli.main(["register"]) == 0
    report = json.loads(Path("reports/registration.json").read_text())
    assert report["version"] == "1" and report["model_uri"] == f"models:/{NAME}/1"
    tags = version_tags("1")
    assert tags["dvc/data/prepared"] == "d0d0.dir" and tags["dvc/models/sft"] == "5f75.dir"
    assert tags["dvc/models/dpo"] == "d90d.dir" and tags["prefect/flow_run_id"] == "flow-run-42"
    assert tags["git/dirty"] in ("true", "false") and len(tags["params/hash"]) == 16
    assert float(tags["eval/reward_mean"]) == 0.40 and report["tags"] == tags
    assert aliases() == {"challenger": "1"}

    assert cli.main(["promote"]) == 0
    assert aliases() == {"champion": "1"}  # no longer a challenger once champion
    tags = version_tags("1")
    assert tags["promotion/decision"] == "promoted" and "no champion" in tags["promotion/reasons"]
    assert tags["promotion/compared_to"] == "none" and "promotion/previous_champion" not in tags

    # -- second registration: challenger moves, champion does not
    stage_candidate(tiny_models["b"], reward_mean=0.55)
    assert cli.main(["register"]) == 0
    assert aliases() == {"challenger": "2", "champion": "1"}

    # -- real generation: both versions downloaded from the registry and re-scored by the synthetic
    # judge; an unreachable min_delta (rewards lie in [0, 1]) makes the rejection certain
    write_params(gate={"min_delta": 2.0})
    capsys.readouterr()
    assert cli.main(["promote"]) == 2
    out = capsys.readouterr().out
    assert "REJECTED: champion stays v1" in out
    assert any(line.split()[:3] == ["FAIL", "eval/reward_mean", "delta"] for line in out.splitlines())
    assert aliases() == {"challenger": "2", "champion": "1"}
    tags = version_tags("2")
    assert tags["promotion/decision"] == "rejected" and tags["promotion/compared_to"] == "1"
    assert float(tags["promotion/ci_low"]) <= float(tags["promotion/ci_high"])

    # -- the same eval set again: scores come from the cache, no model is loaded
    def no_scoring(*args, **kwargs):
        raise AssertionError("score_prompts called although scores are cached")

    monkeypatch.setattr(judges, "score_prompts", no_scoring)
    assert cli.main(["promote", "--dry-run"]) == 0  # dry run: 0 whatever the decision
    assert version_tags("2") == tags

    # -- controlled scores on a new eval set (max_new_tokens changed): v2 is clearly better
    def fake_scores(model_dir, prompts, judge, **kwargs):
        base = 0.7 if "/v2/" in model_dir else 0.3
        return ["x"] * len(prompts), [base + 0.01 * (i % 3) for i in range(len(prompts))]

    monkeypatch.setattr(judges, "score_prompts", fake_scores)
    write_params(gate={"min_delta": 0.1}, max_new_tokens=5)
    capsys.readouterr()
    assert cli.main(["promote", "--dry-run"]) == 0
    assert "DRY RUN, would be PROMOTED" in capsys.readouterr().out
    assert aliases() == {"challenger": "2", "champion": "1"} and version_tags("2") == tags  # nothing moved

    assert cli.main(["promote", "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["decision"] == "promoted" and decision["delta"] == pytest.approx(0.4)
    assert aliases() == {"champion": "2"}
    tags = version_tags("2")
    assert tags["promotion/decision"] == "promoted" and tags["promotion/previous_champion"] == "1"
    assert float(tags["promotion/delta"]) == pytest.approx(0.4) and float(tags["promotion/ci_low"]) > 0
    assert cli.main(["promote", "--version", "2"]) == 0  # already champion: nothing to do

    # -- rollback: champion back to v1; the demoted version holds no alias to be re-promoted by accident
    assert cli.main(["rollback"]) == 0
    assert aliases() == {"champion": "1"}
    assert version_tags("2")["rollback/restored_version"] == "1"
    assert version_tags("1")["rollback/replaced_version"] == "2"
    assert cli.main(["promote"]) == 1  # no challenger
    assert cli.main(["rollback"]) == 1  # v1 was the first champion: nothing before it

    capsys.readouterr()
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()
    assert "champion=v1" in rows[0] and "promoted" in rows[2] and "0.550" in rows[2]  # newest (v2) first

    # -- the champion, loaded back through the registry, answers chat messages
    import mlflow

    chat = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = chat.predict({"messages": [{"role": "user", "content": "Sort ascending: 3 1 2"}], "max_tokens": 5,
                        "temperature": 0})
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert 0 < out["usage"]["completion_tokens"] <= 5


@pytest.mark.integration
def test_failed_registration_leaves_aliases(workspace, tiny_models, monkeypatch):
    import mlflow

    stage_candidate(tiny_models["a"], reward_mean=0.4)
    assert cli.main(["register"]) == 0 and cli.main(["promote"]) == 0
    before = aliases()
    report = Path("reports/registration.json").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("artifact store unavailable")

    stage_candidate(tiny_models["b"], reward_mean=0.6)
    for target in (mlflow.pyfunc, mlflow):  # fails while logging the model / while registering it
        attr = "log_model" if target is mlflow.pyfunc else "register_model"
        with monkeypatch.context() as m:
            m.setattr(target, attr, broken)
            assert cli.main(["register"]) == 1
        assert aliases() == before
        assert [v.version for v in mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")] == [1]
        assert Path("reports/registration.json").read_text() == report
    runs = mlflow.search_runs(experiment_names=["alignflow"], output_format="list")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]

    assert cli.main(["promote", "--version", "7"]) == 1  # no such version
    assert cli.main(["promote", "--bogus"]) == 1  # a usage error is 1, not 2 (2 = rejected)
    assert aliases() == before


def test_register_stage_cli_and_the_alignflow_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        register.main(["--help"])  # `python -m components.register`: the DVC stage, nothing else
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model-dir" in out and "promote" not in out
    assert cli.main(["--help"]) == 0
    assert "promote" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 1  # usage errors exit 1: 2 means "gate rejected"


# ----------------------------------------------------------------------------- transactions

SLOW_PROMOTE = '''
import os, sys, time
from pathlib import Path
from components.core.eval import judges

def scores(model_dir, prompts, judge, **kwargs):
    # a barrier: announce that this promotion has read the champion and is scoring, then wait for "go"
    marks = Path(os.environ["MARKS"])
    (marks / f"scoring-{os.getpid()}").touch()
    deadline = time.time() + 120
    while not (marks / "go").exists() and time.time() < deadline:
        time.sleep(0.05)
    base = {"/v2/": 0.8, "/v3/": 0.7}.get(next((k for k in ("/v2/", "/v3/") if k in model_dir), ""), 0.3)
    return ["x"] * len(prompts), [base + 0.01 * (i % 3) for i in range(len(prompts))]

judges.score_prompts = scores
from components import cli
sys.exit(cli.main(sys.argv[1:]))
'''


def start_promote(version: str, marks: Path):
    import os
    import subprocess
    import sys

    script = marks / "promote.py"
    script.write_text(SLOW_PROMOTE)
    env = {**os.environ, "MARKS": str(marks)}
    return subprocess.Popen([sys.executable, str(script), "promote", "--version", version], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120.0):
    import time

    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def three_versions(tiny_models) -> None:
    stage_candidate(tiny_models["a"], reward_mean=0.40)
    assert cli.main(["register"]) == 0 and cli.main(["promote"]) == 0  # v1 champion
    stage_candidate(tiny_models["b"], reward_mean=0.55)
    assert cli.main(["register"]) == 0  # v2
    stage_candidate(tiny_models["a"], reward_mean=0.50)  # same weights as v1, other metrics: a new version
    assert cli.main(["register"]) == 0  # v3
    assert aliases() == {"champion": "1", "challenger": "3"}


@pytest.mark.integration
def test_two_promotions_at_once_cannot_both_win(workspace, tiny_models, tmp_path):
    three_versions(tiny_models)
    marks = tmp_path / "marks"
    marks.mkdir()
    procs = {v: start_promote(v, marks) for v in ("2", "3")}
    # each scores 2 versions (candidate, champion): both have read champion v1 once 4 scorings started
    wait_for(lambda: len(list(marks.glob("scoring-*"))) >= 2)
    (marks / "go").touch()
    results = {v: (p.wait(timeout=300), p.stdout.read() + p.stderr.read()) for v, p in procs.items()}
    winners = [v for v, (rc, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    [loser] = [v for v in results if v not in winners]
    assert results[loser][0] == 1 and "champion moved from v1 to v" in results[loser][1]
    assert aliases()["champion"] == winners[0]
    assert version_tags(winners[0])["promotion/previous_champion"] == "1"
    assert "promotion/decision" not in version_tags(loser)  # an aborted decision leaves no record


@pytest.mark.integration
def test_a_rollback_during_a_promotion_is_not_undone(workspace, tiny_models, tmp_path, monkeypatch):
    from components.core.eval import judges

    three_versions(tiny_models)
    with monkeypatch.context() as m:
        m.setattr(judges, "score_prompts", lambda model_dir, prompts, judge, **kw: (
            ["x"] * len(prompts), [(0.8 if "/v2/" in model_dir else 0.3) + 0.01 * (i % 3) for i in range(len(prompts))]))
        assert cli.main(["promote", "--version", "2"]) == 0  # v2 champion, previous v1
    assert aliases()["champion"] == "2"
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = start_promote("3", marks)
    wait_for(lambda: any(marks.glob("scoring-*")))  # it has read champion v2 and is scoring
    assert cli.main(["rollback"]) == 0  # champion v2 -> v1 meanwhile
    (marks / "go").touch()
    rc, out = proc.wait(timeout=300), proc.stdout.read() + proc.stderr.read()
    assert rc == 1 and "champion moved from v2 to v1" in out
    assert aliases()["champion"] == "1"  # the rollback stands
    assert version_tags("2")["rollback/restored_version"] == "1"
    assert cli.main(["rollback"]) == 1  # v1 was the first champion: the chain is intact


@pytest.mark.integration
def test_register_is_idempotent_and_checks_whose_metrics_it_records(workspace, tiny_models):
    import mlflow

    stage_candidate(tiny_models["a"], reward_mean=0.40)
    Path("reports/eval/evaluated_models.json").write_text(json.dumps({"dpo": "not-this-model"}))
    assert cli.main(["register"]) == 1  # metrics of another model: refused, nothing registered
    assert not mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]).search_registered_models()

    stage_candidate(tiny_models["a"], reward_mean=0.40)  # now with the right evaluated model
    assert cli.main(["register"]) == 0 and cli.main(["register"]) == 0  # same artifact + lineage: one version
    assert [v.version for v in mlflow.MlflowClient().search_model_versions(f"name='{NAME}'")] == [1]
    assert json.loads(Path("reports/registration.json").read_text())["version"] == "1"

    from components.register import _move_challenger

    stage_candidate(tiny_models["b"], reward_mean=0.55)
    assert cli.main(["register"]) == 0 and aliases()["challenger"] == "2"
    assert _move_challenger(NAME, "1") is None  # a slower parallel registration of an older version ...
    assert aliases()["challenger"] == "2"  # ... leaves challenger on the newest

    write_params(gate={"min_delta": -1.0})  # (any decision will do: only the aliases matter here)
    assert cli.main(["promote"]) == 0 and aliases() == {"champion": "2"}  # no longer a challenger once champion
    assert cli.main(["register"]) == 0 and aliases() == {"champion": "2"}  # registered again: still champion only
    assert json.loads(Path("reports/registration.json").read_text())["alias"] == "champion"


@pytest.mark.integration
def test_runs_of_killed_processes_are_closed_and_promote_leftovers_swept(workspace, tmp_path):
    import socket

    import mlflow

    from components.core.ops import tracking
    from components.core.release import registry

    uri = os.environ["MLFLOW_TRACKING_URI"]
    experiment = tracking.ensure_experiment(uri)
    client = mlflow.MlflowClient(uri)
    here = {"alignflow/stage": "sft", "alignflow/host": socket.gethostname()}
    dead = client.create_run(experiment, tags={**here, "alignflow/pid": "999999999"})  # SIGKILLed mid-run
    alive = client.create_run(experiment, tags={**here, "alignflow/pid": str(os.getpid())})
    elsewhere = client.create_run(experiment, tags={**here, "alignflow/host": "other", "alignflow/pid": "999999999"})
    assert tracking.close_dead_runs(uri, experiment, "sft") == [dead.info.run_id]
    status = {r: client.get_run(r).info.status for r in (dead.info.run_id, alive.info.run_id, elsewhere.info.run_id)}
    assert list(status.values()) == ["FAILED", "RUNNING", "RUNNING"]  # another host's runs are not ours to judge

    stale = tmp_path / f"{registry.PROMOTE_DIR_PREFIX}999999999-abc"
    mine = tmp_path / f"{registry.PROMOTE_DIR_PREFIX}{os.getpid()}-def"
    stale.mkdir()
    mine.mkdir()
    assert registry.sweep_promote_dirs(tmp_path) == [stale] and mine.exists()


@pytest.mark.integration
def test_a_rejected_version_keeps_no_stale_previous_champion(workspace, tiny_models, monkeypatch):
    from components.core.eval import judges

    three_versions(tiny_models)
    scores = {"/v2/": 0.8, "/v3/": 0.2}
    monkeypatch.setattr(judges, "score_prompts", lambda model_dir, prompts, judge, **kw: (
        ["x"] * len(prompts),
        [next((s for k, s in scores.items() if k in model_dir), 0.5) + 0.01 * (i % 3) for i in range(len(prompts))]))
    assert cli.main(["promote", "--version", "2"]) == 0 and version_tags("2")["promotion/previous_champion"] == "1"
    assert cli.main(["rollback"]) == 0  # v2 demoted; it still says it once replaced v1
    scores["/v2/"] = 0.1  # re-scored on a new eval set it now loses
    write_params(gate={"min_delta": 0.0}, max_new_tokens=5)
    assert cli.main(["promote", "--version", "2"]) == 2
    tags = version_tags("2")
    assert tags["promotion/decision"] == "rejected" and "promotion/previous_champion" not in tags
