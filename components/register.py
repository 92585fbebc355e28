"""register stage: the DPO model into the MLflow registry; and the registry operations behind the CLI.

    python -m components.register --params params.yaml   # the DVC `register` stage (= alignflow register)
    alignflow promote [--version N] [--dry-run]           # challenger vs champion, under register.gate
    alignflow rollback                                    # champion back to the one it replaced
    alignflow status

The `alignflow` command (components/cli.py) is the only CLI for promote / rollback / status; this module
has no dependency on it.

register: logs `models/dpo/` as an MLflow transformers model (weights + tokenizer + chat template) in a
run tagged with its lineage (git commit and dirty flag, DVC hashes of the prepared data, SFT model,
reference log-probs and DPO model, params hash, Prefect flow run, eval metrics), registers a new
version of `register.model_name` carrying the same tags, and points the `challenger` alias at it.

promote: the eval metrics stored with two versions may come from different eval sets, so both models
are re-scored on the *current* held-out prompts (same prompts, same sampling seeds) with the evaluate
stage's own code (core/generation, core/rewards); the per-prompt difference challenger - champion is
bootstrapped. `champion` moves only when `core/gate.gate_decision` passes. Every decision is recorded as `promotion/*` tags on the candidate.

Aliases always move last: a failure anywhere before leaves `champion` and `challenger` where they were.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from components.core.gate import gate_decision

log = logging.getLogger("alignflow.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
# What a registered model is made of; their DVC hashes (from dvc.lock) become lineage tags.
LINEAGE_INPUTS = ["data/prepared", "models/sft", "artifacts/ref_logps", "models/dpo"]
PRIMARY_METRIC = "eval/reward_mean"  # the only primary metric that can be re-scored per prompt
SCORES_DIR = "promotion_scores"  # run artifact folder: cached per-prompt scores of a version
PIPELINE_PACKAGES = ("torch", "transformers", "accelerate")
TAG_VALUE_LIMIT = 4000  # MLflow caps tag values (5000 chars on SQL stores)


class RegistryError(RuntimeError):
    """A registry state the command cannot act on (no challenger, nothing to roll back to, ...)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _client():
    """Registry client on the configured tracking URI (also set globally: artifact helpers read it)."""
    import mlflow

    from components.core import tracking

    uri = tracking.tracking_uri()
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


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


# ----------------------------------------------------------------------------- register


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in PIPELINE_PACKAGES:
        try:
            # "2.13.0+cpu" -> "2.13.0": a serving image picks its own CUDA/CPU build of the same release
            reqs.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return reqs


def _model_card(model_name: str, tags: dict[str, str], metrics: dict[str, float]):
    from huggingface_hub import ModelCard

    shown = ["eval/reward_mean", "eval/sft/reward_mean", "eval/win_rate_vs_sft", "eval/kl_to_reference",
             "eval/length_ratio"]
    lines = [f"- `{k}`: {metrics[k]:.4f}" for k in shown if k in metrics]
    return ModelCard(
        "---\nlicense: other\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        "tags: [alignflow, dpo]\n---\n"
        f"# {model_name}\n\n"
        "Causal LM trained by the alignflow pipeline: SFT, then preference optimisation (DPO family).\n\n"
        f"- git commit: `{tags.get('git/commit', 'unknown')}` (dirty: {tags.get('git/dirty', 'unknown')})\n"
        f"- params hash: `{tags.get('params/hash', '')}`\n"
        f"- data (DVC md5): `{tags.get('dvc/data/prepared', 'not run under DVC')}`\n\n"
        "Held-out evaluation:\n" + ("\n".join(lines) or "- (no eval metrics)") + "\n\n"
        "Full lineage: the tags of this model version and of its MLflow run.\n"
    )


def read_eval_metrics(path: str) -> dict[str, float]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no eval metrics; run the evaluate stage first (dvc repro evaluate)")
    raw = json.loads(Path(path).read_text())
    return {k: float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def register(
    model_dir: str,
    metrics_path: str,
    model_name: str,
    params: dict,
    params_digest: str,
    *,
    trust_remote_code: bool = False,
    eval_report_dir: str = "reports/eval",
    out_path: str = "reports/registration.json",
    extra_artifacts: Sequence[str] = ("params.yaml", "dvc.lock"),
) -> dict:
    """Log model_dir to MLflow, register it as a new version of model_name, alias it `challenger`.

    params: logged as run params; params_digest: the lineage hash tagged on run and version.
    Returns (and writes to out_path) name, version, run_id, model_uri, tags.
    """
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.core import tracking
    from components.core.io import write_json

    metrics = read_eval_metrics(metrics_path)
    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: no model here; run the dpo stage first (dvc repro dpo)")
    # An absolute path as name_or_path: MLflow asks the hub for a license file under that name, and
    # an absolute path fails the hub's repo-id check at once instead of retrying DNS for ~25 s offline.
    source = str(Path(model_dir).resolve())
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model.config.use_cache = True  # training saves with it off; serving wants the KV cache

    with tracking.stage_run("register", params, LINEAGE_INPUTS, params_digest) as run:
        run_id = run.info.run_id
        tracking.log_metrics(run, metrics)
        lineage = {k: v for k, v in mlflow.get_run(run_id).data.tags.items() if not k.startswith("mlflow.")}
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            task="text-generation",
            save_pretrained=True,
            model_card=_model_card(model_name, lineage, metrics),
            pip_requirements=_pip_requirements(),
            name="model",
        )
        if Path(eval_report_dir).is_dir():
            mlflow.log_artifacts(eval_report_dir, artifact_path="eval_report")
        for path in [metrics_path, *extra_artifacts]:
            if Path(path).is_file():
                mlflow.log_artifact(path, artifact_path="inputs")

    # After the run closed (FINISHED): a version never points at a failed run.
    tags = {**lineage, **{k: repr(v) for k, v in metrics.items()}, "alignflow/run_id": run_id,
            "alignflow/registered_at": _now()}
    client = _client()
    version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    client.set_registered_model_alias(model_name, CHALLENGER, version.version)  # last registry write
    result = {"name": model_name, "version": str(version.version), "run_id": run_id,
              "model_uri": f"models:/{model_name}/{version.version}", "logged_model_uri": info.model_uri,
              "alias": CHALLENGER, "tags": tags}
    write_json(out_path, result)
    log.info("registered %s version %s (run %s) as %s", model_name, version.version, run_id, CHALLENGER)
    return result


# ----------------------------------------------------------------------------- scoring for promotion


def download_version(name: str, version: str, dst: str | Path) -> str:
    """A Hugging Face directory (weights + tokenizer) of a registered version: what evaluate loads.

    The transformers flavor stores weights under `model/` and the tokenizer under
    `components/tokenizer/`; copy the tokenizer next to the weights.
    """
    import mlflow
    import yaml

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["transformers"]
    model_dir = root / flavor.get("model_binary", "model")
    for component in flavor.get("components", []):
        for f in (root / "components" / component).iterdir():
            if f.is_file() and not (model_dir / f.name).exists():
                shutil.copy2(f, model_dir / f.name)
    return str(model_dir)


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
    from components.core.generation import score_prompts

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


# ----------------------------------------------------------------------------- promote / rollback / status


def promote(
    model_name: str,
    gate: dict,
    *,
    version: str | None = None,
    dry_run: bool = False,
    pref_eval_path: str = "data/prepared/pref_eval.jsonl",
    num_prompts: int = 200,
    judge: str = "synthetic",
    judge_path: str = "",
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    bootstrap_samples: int = 1000,
    seed: int = 1234,
) -> dict:
    """Compare a candidate (alias `challenger`, or `version`) with `champion`; move `champion` if it passes.

    Returns a dict with "decision" in promoted | rejected | noop and the gate's numbers. With dry_run
    nothing in the registry changes (only the score cache may be written).
    """
    if gate["primary_metric"] != PRIMARY_METRIC:
        raise ValueError(f"register.gate.primary_metric={gate['primary_metric']!r}: promotion re-scores prompts "
                         f"with the judge, so only {PRIMARY_METRIC!r} is supported")
    from mlflow.exceptions import MlflowException

    client = _client()
    if version is not None:
        try:
            candidate = client.get_model_version(model_name, str(version))
        except MlflowException as e:
            raise RegistryError(f"{model_name}: no version {version} ({e.message})") from e
    else:
        candidate = _by_alias(client, model_name, CHALLENGER)
        if candidate is None:
            raise RegistryError(f"{model_name}: no version has alias {CHALLENGER!r}; "
                                "register one (alignflow register) or pass --version")
    champion = _by_alias(client, model_name, CHAMPION)
    result = {"model_name": model_name, "candidate": str(candidate.version),
              "champion": str(champion.version) if champion else None, "dry_run": dry_run,
              "delta": None, "ci_low": None, "ci_high": None, "eval_set": None, "num_prompts": 0}
    if champion is not None and str(champion.version) == str(candidate.version):
        return {**result, "decision": "noop", "passed": True,
                "reasons": [f"PASS version {candidate.version} is already {CHAMPION}"]}

    metrics = version_metrics(candidate)
    if champion is None:
        decision = gate_decision(None, None, metrics, gate, bootstrap_samples, seed)
    else:
        from components.core.generation import eval_prompts
        from components.core.rewards import load_judge

        if not Path(pref_eval_path).exists():
            raise FileNotFoundError(f"{pref_eval_path}: no held-out prompts to compare on (dvc repro prepare)")
        prompts = eval_prompts(pref_eval_path, num_prompts)
        if not prompts:
            raise RegistryError(f"{pref_eval_path}: no held-out prompts")
        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                    "batch_size": batch_size, "seed": seed, "judge": judge, "judge_path": judge_path}
        digest = eval_set_digest(prompts, settings)
        judge_fn = load_judge(judge, judge_path)
        with tempfile.TemporaryDirectory(prefix="alignflow-promote-") as work:
            cand = score_version(client, model_name, candidate, prompts, judge_fn, settings, digest, work)
            champ = score_version(client, model_name, champion, prompts, judge_fn, settings, digest, work)
        decision = gate_decision(cand, champ, metrics, gate, bootstrap_samples, seed)
        result.update(eval_set=digest, num_prompts=len(prompts), candidate_mean=statistics.fmean(cand),
                      champion_mean=statistics.fmean(champ))
    result.update(decision="promoted" if decision.passed else "rejected", passed=decision.passed,
                  reasons=decision.reasons, delta=decision.delta, ci_low=decision.ci_low, ci_high=decision.ci_high)
    if dry_run:
        return result

    tags = {
        "promotion/decision": result["decision"],
        "promotion/reasons": "; ".join(decision.reasons)[:TAG_VALUE_LIMIT],
        "promotion/delta": _fmt(decision.delta, ".6f"),
        "promotion/ci_low": _fmt(decision.ci_low, ".6f"),
        "promotion/ci_high": _fmt(decision.ci_high, ".6f"),
        "promotion/compared_to": result["champion"] or "none",
        "promotion/eval_set": result["eval_set"] or "none",
        "promotion/gate": json.dumps(gate, sort_keys=True),
        "promotion/at": _now(),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(candidate.version), key, value)
    if decision.passed:
        if champion is not None:
            client.set_model_version_tag(model_name, str(candidate.version), "promotion/previous_champion",
                                         str(champion.version))
        elif "promotion/previous_champion" in candidate.tags:  # stale, from an earlier promotion
            client.delete_model_version_tag(model_name, str(candidate.version), "promotion/previous_champion")
        client.set_registered_model_alias(model_name, CHAMPION, str(candidate.version))  # last write
        log.info("%s: champion %s -> %s", model_name, result["champion"], candidate.version)
    return result


def rollback(model_name: str) -> dict:
    """Point `champion` back at the version the current champion replaced (its promotion/previous_champion).

    Repeated rollbacks walk further back. If `challenger` points at the demoted version it is removed,
    so a plain `alignflow promote` cannot re-promote it by accident (`--version` still can).
    """
    from mlflow.exceptions import MlflowException

    client = _client()
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
    now, demoted = _now(), str(current.version)
    client.set_model_version_tag(model_name, demoted, "rollback/demoted_at", now)
    client.set_model_version_tag(model_name, demoted, "rollback/restored_version", previous)
    client.set_model_version_tag(model_name, previous, "rollback/restored_at", now)
    client.set_model_version_tag(model_name, previous, "rollback/replaced_version", demoted)
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    challenger = _by_alias(client, model_name, CHALLENGER)
    if challenger is not None and str(challenger.version) == demoted:
        client.delete_registered_model_alias(model_name, CHALLENGER)
    log.info("%s: champion %s -> %s (rollback)", model_name, demoted, previous)
    return {"model_name": model_name, "champion": previous, "demoted": demoted, "at": now}


def status(model_name: str) -> dict:
    """Registered versions (newest first) with aliases, key metrics and promotion decisions."""
    from mlflow.exceptions import MlflowException

    client = _client()
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


# ----------------------------------------------------------------------------- stage CLI


def register_from_params(params_path: str = "params.yaml", model_dir: str = "models/dpo",
                         metrics_path: str = "metrics/eval.json", eval_report_dir: str = "reports/eval",
                         out_path: str = "reports/registration.json") -> dict:
    """The register stage with its params: what `dvc repro register` and `alignflow register` run."""
    from components.core.config import load_params, params_hash

    p = load_params(params_path)
    # The version's lineage hash: every section that shaped the model or its metrics. `register`
    # itself (name, gate) is left out: changing the gate does not make a different model.
    params = p.model_dump(by_alias=True, exclude={"registry"})
    return register(model_dir=model_dir, metrics_path=metrics_path, model_name=p.registry.model_name,
                    params=params, params_digest=params_hash(params), trust_remote_code=p.model.trust_remote_code,
                    eval_report_dir=eval_report_dir, out_path=out_path)


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model-dir", default="models/dpo")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--eval-report", default="reports/eval")
    parser.add_argument("--out", default="reports/registration.json")


def main(argv: list[str] | None = None) -> int:
    """`python -m components.register`: the DVC stage. Exit 0 registered, 1 error (message names the cause)."""
    from components.core.config import ParamsError
    from components.core.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m components.register", description=__doc__.splitlines()[0])
    add_register_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        result = register_from_params(args.params, args.model_dir, args.metrics, args.eval_report, args.out)
    except (ParamsError, RegistryError, FileNotFoundError) as e:
        print(f"register: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in ("name", "version", "run_id", "model_uri", "alias")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
