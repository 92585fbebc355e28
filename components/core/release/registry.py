"""The model registry's operations behind `alignflow promote | rollback | status`, and the names the
register stage shares with them (aliases, the registry client, RegistryError).

promote: the eval metrics stored with two versions may come from different eval sets, so both models
are re-scored on the *current* held-out prompts (same prompts, same sampling seeds) with the evaluate
stage's own code (core/generation, core/rewards); the per-prompt difference challenger - champion is
bootstrapped. `champion` moves only when `core/gate.gate_decision` passes. Every decision is recorded as
`promotion/*` tags on the candidate.

Transactions: every alias move (promote, rollback, register's `challenger`) happens inside
`registry_lock(model)`, re-reads the alias it is about to move and aborts with a RegistryError if another
command moved it meanwhile (compare-and-set), and writes its tags only after the move. So two promotions at
once cannot both win, a rollback during a promotion is never undone, and the previous-champion chain that
rollback walks stays consistent. The lock (this machine's, and the team server's across machines) is
`locking.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from components.core.config import EvaluateConfig, GateConfig
from components.core.ops.lifeline import pid_alive
from components.core.release.gate import Decision, gate_decision
from components.core.release.locking import RegistryError, registry_lock
from components.core.release.serving import PARITY_DETAIL_TAG, PARITY_TAG, hf_dir_of

log = logging.getLogger("alignflow.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
PRIMARY_METRIC = "eval/reward_mean"  # the only primary metric that can be re-scored per prompt
SCORES_DIR = "promotion_scores"  # run artifact folder: cached per-prompt scores of a version
TAG_VALUE_LIMIT = 4000  # MLflow caps tag values (5000 chars on SQL stores)
PROMOTE_DIR_PREFIX = "alignflow-promote-"  # + pid: the versions a promotion downloads to re-score


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def registry_client():
    """Registry client on the configured tracking URI (also set globally: artifact helpers read it)."""
    import mlflow

    from components.core.ops import tracking

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def sweep_promote_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove the download directories of promotions whose process is gone (killed mid-promotion)."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for d in root.glob(f"{PROMOTE_DIR_PREFIX}*"):
        pid = d.name[len(PROMOTE_DIR_PREFIX):].split("-", 1)[0]
        if d.is_dir() and (not pid.isdigit() or not pid_alive(int(pid))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def version_of(client, name: str, alias: str) -> str | None:
    v = _by_alias(client, name, alias)
    return str(v.version) if v is not None else None


def _by_alias(client, name: str, alias: str):
    """The version holding an alias, or None (also when the model itself is not registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_metrics(version) -> dict[str, float]:
    """The `eval/*` metrics a version was registered with (stored as version tags)."""
    out = {}
    for key, value in version.tags.items():
        if key.startswith("eval/"):
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def download_version(name: str, version: str, dst: str | Path) -> str:
    """A Hugging Face directory (weights, tokenizer, chat template) of a registered version: what evaluate loads."""
    import mlflow

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    return str(hf_dir_of(root))


def eval_set_digest(prompts: list[tuple[str, list[dict]]], settings: dict) -> str:
    """Identity of a scoring: the prompts and everything that changes a sample or its score."""
    blob = json.dumps({"prompts": prompts, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_scores(client, run_id: str, artifact: str) -> list[float] | None:
    import mlflow

    try:
        listed = {a.path for a in client.list_artifacts(run_id, SCORES_DIR)}
        if artifact in listed:
            return [float(s) for s in mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact}")["scores"]]
    except Exception as e:  # a cache: never fail the promotion over it
        log.warning("score cache unreadable (%s: %s); re-scoring", type(e).__name__, e)
    return None


def score_version(client, name: str, version, prompts: list[tuple[str, list[dict]]], judge, settings: dict,
                  digest: str, work_dir: str) -> list[float]:
    """Per-prompt judge scores of a version on prompts, cached as an artifact of the version's run."""
    from components.core.eval.judges import score_prompts

    artifact = f"{SCORES_DIR}/v{version.version}-{digest}.json"
    cached = _cached_scores(client, version.run_id, artifact) if version.run_id else None
    if cached is not None and len(cached) == len(prompts):
        log.info("version %s: cached scores for eval set %s", version.version, digest)
        return cached
    model_dir = download_version(name, version.version, Path(work_dir) / f"v{version.version}")
    scoring = {k: settings[k] for k in ("max_new_tokens", "temperature", "top_p", "batch_size", "seed")}
    responses, scores = score_prompts(model_dir, [m for _, m in prompts], judge, **scoring)
    if version.run_id:
        payload = {"version": str(version.version), "eval_set": digest, "settings": settings,
                   "ids": [i for i, _ in prompts], "scores": scores, "responses": responses}
        try:
            client.log_dict(version.run_id, payload, artifact)
        except Exception as e:
            log.warning("could not cache scores of version %s (%s: %s)", version.version, type(e).__name__, e)
    return scores


def promote(model_name: str, gate: GateConfig, evaluate: EvaluateConfig, *, version: str | None = None,
            dry_run: bool = False, pref_eval_path: str = "data/prepared/pref_eval.jsonl", seed: int = 1234) -> dict:
    """Compare a candidate (alias `challenger`, or `version`) with `champion`; move `champion` if it passes.

    gate: `register.gate`; evaluate: the `evaluate` section, whose prompts, sampling and judge re-score both
    models on pref_eval_path's held-out prompts (seed: the sampling seed, as evaluate's). Returns a dict with
    "decision" in promoted | rejected | noop and the gate's numbers. With dry_run nothing in the registry changes
    (only the score cache may be written).
    """
    if gate.primary_metric != PRIMARY_METRIC:
        raise ValueError(f"register.gate.primary_metric={gate.primary_metric!r}: promotion re-scores prompts "
                         f"with the judge, so only {PRIMARY_METRIC!r} is supported")
    client = registry_client()
    candidate = _candidate(client, model_name, version)
    champion = _by_alias(client, model_name, CHAMPION)
    result = {"model_name": model_name, "candidate": str(candidate.version),
              "champion": str(champion.version) if champion else None, "dry_run": dry_run,
              "delta": None, "ci_low": None, "ci_high": None, "eval_set": None, "num_prompts": 0}
    if champion is not None and str(champion.version) == str(candidate.version):
        return {**result, "decision": "noop", "passed": True,
                "reasons": [f"PASS version {candidate.version} is already {CHAMPION}"]}

    metrics = version_metrics(candidate)
    parity = (candidate.tags.get(PARITY_TAG, ""), candidate.tags.get(PARITY_DETAIL_TAG, ""))
    if champion is None:
        decision = gate_decision(None, None, metrics, gate.model_dump(), evaluate.bootstrap_samples, seed,
                                 serving_parity=parity)
    else:
        rescored = rescore(client, model_name, candidate, champion, evaluate, pref_eval_path, seed)
        decision = gate_decision(rescored["candidate"], rescored["champion"], metrics, gate.model_dump(),
                                 evaluate.bootstrap_samples, seed, serving_parity=parity)
        result.update(eval_set=rescored["eval_set"], num_prompts=rescored["num_prompts"],
                      candidate_mean=statistics.fmean(rescored["candidate"]),
                      champion_mean=statistics.fmean(rescored["champion"]))
    result.update(decision="promoted" if decision.passed else "rejected", passed=decision.passed,
                  reasons=decision.reasons, delta=decision.delta, ci_low=decision.ci_low, ci_high=decision.ci_high)
    if not dry_run:
        _record_decision(client, model_name, candidate, champion, result, decision, gate)
    return result


def _candidate(client, model_name: str, version: str | None):
    """The version to promote: `version`, or the one holding `challenger`."""
    from mlflow.exceptions import MlflowException

    if version is not None:
        try:
            return client.get_model_version(model_name, str(version))
        except MlflowException as e:
            raise RegistryError(f"{model_name}: no version {version} ({e.message})") from e
    candidate = _by_alias(client, model_name, CHALLENGER)
    if candidate is None:
        raise RegistryError(f"{model_name}: no version has alias {CHALLENGER!r}; "
                            "register one (alignflow register) or pass --version")
    return candidate


def rescore(client, model_name: str, candidate, champion, evaluate: EvaluateConfig, pref_eval_path: str,
            seed: int) -> dict:
    """Both versions' per-prompt judge scores on the current held-out prompts (same prompts, same sampling seeds):
    {candidate, champion: (P,) scores, eval_set: the digest of prompts and settings, num_prompts: P}."""
    from components.core.eval.judges import eval_prompts, load_judge

    if not Path(pref_eval_path).exists():
        raise FileNotFoundError(f"{pref_eval_path}: no held-out prompts to compare on (dvc repro prepare)")
    prompts = eval_prompts(pref_eval_path, evaluate.num_prompts)
    if not prompts:
        raise RegistryError(f"{pref_eval_path}: no held-out prompts")
    settings = {"max_new_tokens": evaluate.max_new_tokens, "temperature": evaluate.temperature,
                "top_p": evaluate.top_p, "batch_size": evaluate.batch_size, "seed": seed, "judge": evaluate.judge,
                "judge_path": evaluate.judge_path}
    digest = eval_set_digest(prompts, settings)
    judge_fn = load_judge(evaluate.judge, evaluate.judge_path)
    sweep_promote_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{PROMOTE_DIR_PREFIX}{os.getpid()}-") as work:
        cand = score_version(client, model_name, candidate, prompts, judge_fn, settings, digest, work)
        champ = score_version(client, model_name, champion, prompts, judge_fn, settings, digest, work)
    return {"candidate": cand, "champion": champ, "eval_set": digest, "num_prompts": len(prompts)}


def _record_decision(client, model_name: str, candidate, champion, result: dict, decision: Decision,
                     gate: GateConfig) -> None:
    """Move `champion` when the decision passed, and tag the candidate with the decision, under the registry lock
    and only if the champion is still the one compared against (compare-and-set)."""
    candidate_v = str(candidate.version)
    tags = {
        "promotion/decision": result["decision"],
        "promotion/reasons": "; ".join(decision.reasons)[:TAG_VALUE_LIMIT],
        "promotion/delta": _fmt(decision.delta, ".6f"),
        "promotion/ci_low": _fmt(decision.ci_low, ".6f"),
        "promotion/ci_high": _fmt(decision.ci_high, ".6f"),
        "promotion/compared_to": result["champion"] or "none",
        "promotion/eval_set": result["eval_set"] or "none",
        "promotion/gate": json.dumps(gate.model_dump(), sort_keys=True),
        "promotion/at": now(),
    }
    with registry_lock(model_name):
        # compare-and-set: the decision was made against result["champion"]; if another promote or a
        # rollback moved it while we scored, this decision is void
        current = version_of(client, model_name, CHAMPION)
        if current != result["champion"]:
            raise RegistryError(f"{model_name}: champion moved from v{result['champion']} to v{current} while "
                                f"this promotion of v{candidate_v} was scoring; nothing changed, re-run "
                                "alignflow promote to compare against the new champion")
        if decision.passed:
            client.set_registered_model_alias(model_name, CHAMPION, candidate_v)  # the move, then its record
            if version_of(client, model_name, CHALLENGER) == candidate_v:  # it is no longer challenging
                client.delete_registered_model_alias(model_name, CHALLENGER)
            log.info("%s: champion %s -> %s", model_name, result["champion"], candidate_v)
        for key, value in tags.items():
            client.set_model_version_tag(model_name, candidate_v, key, value)
        if decision.passed and champion is not None:
            client.set_model_version_tag(model_name, candidate_v, "promotion/previous_champion", str(champion.version))
        elif "promotion/previous_champion" in candidate.tags:  # stale: from an earlier promotion
            client.delete_model_version_tag(model_name, candidate_v, "promotion/previous_champion")


def rollback(model_name: str) -> dict:
    """Point `champion` back at the version the current champion replaced (its promotion/previous_champion).

    Repeated rollbacks walk further back. If `challenger` points at the demoted version it is removed,
    so a plain `alignflow promote` cannot re-promote it by accident (`--version` still can).
    """
    client = registry_client()
    with registry_lock(model_name):  # no promote can move champion between our read and our move
        return _rollback(client, model_name)


def _rollback(client, model_name: str) -> dict:
    from mlflow.exceptions import MlflowException

    current = _by_alias(client, model_name, CHAMPION)
    if current is None:
        raise RegistryError(f"{model_name}: no {CHAMPION} to roll back")
    previous = current.tags.get("promotion/previous_champion")
    if not previous:
        raise RegistryError(f"{model_name}: {CHAMPION} version {current.version} records no previous champion "
                            "(it was the first one); nothing to roll back to")
    try:
        client.get_model_version(model_name, previous)
    except MlflowException as e:
        raise RegistryError(f"{model_name}: previous champion version {previous} is gone ({e})") from e
    at, demoted = now(), str(current.version)
    client.set_registered_model_alias(model_name, CHAMPION, previous)  # the move, then its record
    client.set_model_version_tag(model_name, demoted, "rollback/demoted_at", at)
    client.set_model_version_tag(model_name, demoted, "rollback/restored_version", previous)
    client.set_model_version_tag(model_name, previous, "rollback/restored_at", at)
    client.set_model_version_tag(model_name, previous, "rollback/replaced_version", demoted)
    challenger = _by_alias(client, model_name, CHALLENGER)
    if challenger is not None and str(challenger.version) == demoted:
        client.delete_registered_model_alias(model_name, CHALLENGER)
    log.info("%s: champion %s -> %s (rollback)", model_name, demoted, previous)
    return {"model_name": model_name, "champion": previous, "demoted": demoted, "at": at}


def status(model_name: str) -> dict:
    """Registered versions (newest first) with aliases, key metrics and promotion decisions."""
    from mlflow.exceptions import MlflowException

    client = registry_client()
    try:
        aliases = {a: str(v) for a, v in client.get_registered_model(model_name).aliases.items()}
    except MlflowException as e:
        raise RegistryError(f"{model_name}: not registered yet (alignflow register)") from e
    versions = sorted(client.search_model_versions(f"name='{model_name}'"), key=lambda v: -int(v.version))
    rows = []
    for v in versions:
        rows.append({
            "version": str(v.version),
            "aliases": sorted(a for a, n in aliases.items() if n == str(v.version)),
            "created": datetime.fromtimestamp(v.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
            "run_id": v.run_id,
            "metrics": version_metrics(v),
            "decision": v.tags.get("promotion/decision", ""),
            "git_commit": v.tags.get("git/commit", ""),
        })
    return {"model_name": model_name, "aliases": aliases, "versions": rows}
