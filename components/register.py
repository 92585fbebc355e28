"""register stage: log the candidate model (DPO, GRPO, PPO or RLOO) to MLflow, register a new version, point `challenger` at it.

    python -m components.register --params params.yaml   # the DVC `register` stage (= alignflow register)

`register.candidate` picks the policy: `dpo` (models/dpo), `grpo`, `ppo` or `rloo` (models/<candidate>). The version carries
that policy's held-out metrics under the gate's names (`eval/reward_mean`, `eval/kl_to_reference`, ...:
an online policy's `eval/<candidate>/*` are mapped onto them), so `alignflow promote` gates any of them the same way.
Logs the candidate's directory as an MLflow chat model (core/release/serving.py: OpenAI-style messages in, the
model's own chat template applied, generation stopping at the end of the turn) in a run tagged with its lineage
(git commit and dirty flag, DVC hashes of the prepared data, SFT model, reference log-probs and DPO model, params
hash, Prefect flow run, eval metrics), checks that the logged model serves as evaluate generated (serving parity:
prompt tokens and greedy answers, `serving/parity`), registers a new version of `register.model_name` carrying the
same tags, and points the `challenger` alias at it when parity passed (the last registry write: a failure before it
leaves the aliases where they were). Promotion, rollback, status, serving and export are
`alignflow promote | rollback | status | serve-check | serve | export` (components/cli.py over core/release/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from components.core.config import EvaluateConfig, RegisterConfig, Runtime, params_hash
from components.core.ops.logs import stage_main
from components.core.release import deploy, serving
from components.core.release.registry import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    now,
    registry_client,
    registry_lock,
    version_of,
)

log = logging.getLogger("alignflow.registry")

# What a registered model is made of; their DVC hashes (from dvc.lock) become lineage tags.
LINEAGE_INPUTS = ["data/prepared", "models/sft", "artifacts/ref_logps", "models/dpo"]
CANDIDATE_INPUTS = {"dpo": LINEAGE_INPUTS, "grpo": ["data/prepared", "models/sft", "models/grpo"],
                    "ppo": ["data/prepared", "models/sft", "models/reward_model", "models/ppo"],
                    "rloo": ["data/prepared", "models/sft", "models/reward_model", "models/rloo"]}
METHOD = {"dpo": "preference optimisation (DPO family)", "grpo": "online RL with verifiable rewards (GRPO)",
          "ppo": "a Bradley-Terry reward model, then PPO against it (classic RLHF)",
          "rloo": "a Bradley-Terry reward model, then RLOO against it"}
PIPELINE_PACKAGES = ("torch", "transformers", "accelerate")
KEY_TAG = "alignflow/registration_key"
EVALUATED_FILE = "evaluated_models.json"  # written by evaluate into its report: which models it scored


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


def _model_card(model_name: str, tags: dict[str, str], metrics: dict[str, float], candidate: str = "dpo") -> str:
    """The version's README.md (Hugging Face model card): what it is, how to call it, where it came from."""
    shown = ["eval/reward_mean", "eval/sft/reward_mean", "eval/win_rate_vs_sft", "eval/kl_to_reference",
             "eval/length_ratio"]
    lines = [f"- `{k}`: {metrics[k]:.4f}" for k in shown if k in metrics]
    return (
        "---\nlicense: other\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        f"tags: [alignflow, {candidate}, conversational]\n---\n"
        f"# {model_name}\n\n"
        "Causal LM trained by the alignflow pipeline: SFT, then " + METHOD[candidate] + ".\n\n"
        "## Use\n\n"
        "A chat model: OpenAI-style `messages` in, a chat completion out. The chat template in this directory "
        "is the one it was trained and evaluated with; a turn ends at the generation config's `eos_token_id`.\n"
        "Served by `alignflow serve` (MLflow) as `POST /invocations` with "
        '`{"messages": [{"role": "user", "content": "..."}], "max_tokens": 32, "temperature": 0}` '
        "(`temperature` 0 = greedy; `top_p`, `stop`, `n` as OpenAI). Request defaults, and this generation "
        "config's sampling, are the ones evaluate used.\n\n"
        "## Lineage\n\n"
        f"- git commit: `{tags.get('git/commit', 'unknown')}` (dirty: {tags.get('git/dirty', 'unknown')})\n"
        f"- params hash: `{tags.get('params/hash', '')}`\n"
        f"- data (DVC md5): `{tags.get('dvc/data/prepared', 'not run under DVC')}`\n\n"
        "Held-out evaluation:\n" + ("\n".join(lines) or "- (no eval metrics)") + "\n\n"
        "Full lineage: the tags of this model version and of its MLflow run.\n"
    )


def registration_key(identity: str, lineage: dict[str, str], metrics: dict[str, float]) -> str:
    """What makes a registration the same one: the model's bytes, its inputs' DVC hashes and params, its metrics
    and the serving code (the git commit, run ids and times are left out)."""
    stable = {k: v for k, v in lineage.items() if k.startswith(("dvc/", "params/"))}
    served = {"format": serving.SERVING_FORMAT, "code": hashlib.sha256(serving.CHAT_MODEL_FILE.read_bytes()).hexdigest()}
    blob = json.dumps({"model": identity, "lineage": stable, "metrics": metrics, "served": served}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _registered(model_name: str, key: str):
    """The version registered with this key, if any (newest first)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = registry_client().search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return None
    return next((v for v in sorted(versions, key=lambda v: -int(v.version)) if v.tags.get(KEY_TAG) == key), None)


def _move_challenger(model_name: str, version: str) -> str | None:
    """Point `challenger` at version unless a newer version holds it already (parallel registrations) or the version
    is the champion (registered again: nothing to challenge). Returns the alias the version holds after it."""
    client = registry_client()
    with registry_lock(model_name):
        if version_of(client, model_name, CHAMPION) == version:
            log.info("%s: v%s is %s already; %s not moved", model_name, version, CHAMPION, CHALLENGER)
            return CHAMPION
        current = version_of(client, model_name, CHALLENGER)
        if current is not None and int(current) > int(version):
            log.warning("%s: challenger is v%s, newer than v%s; left there", model_name, current, version)
            return None
        client.set_registered_model_alias(model_name, CHALLENGER, version)
    return CHALLENGER


def read_eval_metrics(path: str, candidate: str = "dpo") -> dict[str, float]:
    """The candidate's eval metrics under the gate's names: DPO's as evaluate wrote them; for GRPO its
    `eval/grpo/<m>` become `eval/<m>` (with the shared `eval/sft/*`, `eval/num_*`)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no eval metrics; run the evaluate stage first (dvc repro evaluate)")
    raw = json.loads(Path(path).read_text())
    metrics = {k: float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if candidate == "dpo":  # DPO's own (and the shared) keys: another policy's metrics are not this version's
        others = tuple(f"eval/{c}/" for c in CANDIDATE_INPUTS if c != "dpo")
        return {k: v for k, v in metrics.items() if not k.startswith(others)}
    own = {k.replace(f"eval/{candidate}/", "eval/", 1): v for k, v in metrics.items() if k.startswith(f"eval/{candidate}/")}
    if not own:
        raise FileNotFoundError(f"{path}: no eval/{candidate}/* metrics; evaluate the {candidate} model first "
                                "(dvc repro evaluate)")
    shared = {k: v for k, v in metrics.items() if k.startswith(("eval/sft/", "eval/num_"))}
    return {**shared, **own}


def _check_evaluated(model_dir: str, identity: str, candidate: str, metrics_path: str, eval_report_dir: str) -> None:
    """Refuse metrics evaluate computed for another model than model_dir (per its evaluated_models.json)."""
    evaluated_file = Path(eval_report_dir) / EVALUATED_FILE
    if evaluated_file.exists():  # the metrics must be this model's, not another's
        evaluated = json.loads(evaluated_file.read_text())
        if evaluated.get(candidate) != identity:
            raise RegistryError(f"{metrics_path} was computed for another model than {model_dir} (per "
                                f"{evaluated_file}); evaluate this model first (dvc repro evaluate)")
    else:
        log.warning("%s missing: cannot check that %s is the model %s evaluated", evaluated_file, metrics_path,
                    model_dir)


def run(
    cfg: RegisterConfig,
    *,
    params: dict,
    evaluate: EvaluateConfig = EvaluateConfig(),
    model_dir: str | None = None,
    metrics_path: str = "metrics/eval.json",
    eval_report_dir: str = "reports/eval",
    pref_eval_path: str = "data/prepared/pref_eval.jsonl",
    out_path: str = "reports/registration.json",
    extra_artifacts: Sequence[str] = ("params.yaml", "dvc.lock"),
    runtime: Runtime = Runtime(),
) -> dict:
    """Log the candidate (`cfg.candidate`: models/<candidate>, or model_dir) to MLflow as a chat model, check that it
    serves as evaluate generated (serving parity), register it as a new version of `cfg.model_name` and alias it
    `challenger` (cfg: the `register` params section; evaluate: its sampling is the served defaults, its
    max_new_tokens the parity answers' length).

    params: every params section that shaped the model or its metrics (all but `register`: the gate does not make a
    different model), logged as the run's params; their hash is the lineage tag on run and version. The stage is
    its MLflow run, so there is no `track` switch. A version whose parity fails is registered (tagged
    `serving/parity: fail`, for inspection) but gets no alias, and the stage fails saying what differs. Returns (and
    writes to out_path) name, version, run_id, model_uri, tags.
    """
    import mlflow

    from components.core.ops import tracking
    from components.core.train.checkpoints import model_identity

    model_name, candidate = cfg.model_name, cfg.candidate
    model_dir = model_dir or f"models/{candidate}"
    params_digest = params_hash(params)
    metrics = read_eval_metrics(metrics_path, candidate)
    inputs = CANDIDATE_INPUTS[candidate]
    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: no model here; run the {candidate} stage first (dvc repro {candidate})")
    identity = model_identity(model_dir)
    _check_evaluated(model_dir, identity, candidate, metrics_path, eval_report_dir)
    lineage_now = tracking.lineage_tags("register", inputs, params_digest)
    key = registration_key(identity, lineage_now, metrics)

    def check(model_uri: str) -> dict:  # served vs the evaluated directory
        return serving.parity(model_uri, model_dir, pref_eval_path, cfg.parity_prompts, evaluate.max_new_tokens,
                              runtime.trust_remote_code)

    existing = _registered(model_name, key)
    if existing is not None:  # idempotent: the same artifact, lineage, metrics and served code are one version
        log.info("%s: %s with this lineage is already version %s; not registering it again", model_name,
                 model_dir, existing.version)
        tags = dict(existing.tags)
        if tags.get(serving.PARITY_TAG) != serving.PASS:  # an earlier attempt failed it: check again
            tags.update(deploy.record_parity(model_name, str(existing.version), existing.run_id,
                                             check(f"models:/{model_name}/{existing.version}")))
        return _finish(model_name, str(existing.version), existing.run_id, existing.source, tags, out_path)

    sampling = serving.sampling_defaults(evaluate.max_new_tokens, evaluate.temperature, evaluate.top_p)
    with tracking.stage_run("register", {**params, "candidate": candidate}, inputs, params_digest) as mlrun, \
            tempfile.TemporaryDirectory(prefix="alignflow-register-") as staging:
        run_id = mlrun.info.run_id
        tracking.log_metrics(mlrun, metrics)
        lineage = {k: v for k, v in mlflow.get_run(run_id).data.tags.items() if not k.startswith("mlflow.")}
        hf_dir = serving.stage_hf_dir(model_dir, Path(staging) / serving.HF_ARTIFACT, sampling,
                                      _model_card(model_name, lineage, metrics, candidate), runtime.trust_remote_code)
        info = serving.log_chat_model(hf_dir, model_name, sampling, _pip_requirements())
        result = check(info.model_uri)
        mlflow.log_metric(serving.PARITY_TAG, result["fraction"])
        mlflow.set_tags(serving.parity_tags(result))
        if Path(eval_report_dir).is_dir():
            mlflow.log_artifacts(eval_report_dir, artifact_path="eval_report")
        for path in [metrics_path, *extra_artifacts]:
            if Path(path).is_file():
                mlflow.log_artifact(path, artifact_path="inputs")

    # After the run closed (FINISHED): a version never points at a failed run.
    tags = {**lineage, **{k: repr(v) for k, v in metrics.items()}, "alignflow/run_id": run_id,
            "alignflow/registered_at": now(), KEY_TAG: key, "alignflow/model_identity": identity,
            "alignflow/candidate": candidate, **serving.parity_tags(result)}
    registry_client()
    version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    return _finish(model_name, str(version.version), run_id, info.model_uri, tags, out_path)


def _finish(model_name: str, version: str, run_id: str, logged_uri: str, tags: dict, out_path: str) -> dict:
    """Alias the version `challenger` when it passed serving parity (the last registry write), write out_path.
    A failed parity raises after out_path is written: the version stays, tagged, without an alias."""
    from components.core.ops.io import write_json

    passed = tags.get(serving.PARITY_TAG) == serving.PASS
    alias = _move_challenger(model_name, version) if passed else None
    result = {"name": model_name, "version": version, "run_id": run_id, "model_uri": f"models:/{model_name}/{version}",
              "logged_model_uri": logged_uri, "alias": alias, "serving_parity": tags.get(serving.PARITY_DETAIL_TAG),
              "tags": tags}
    write_json(out_path, result)
    if not passed:
        raise RegistryError(f"{model_name} version {version} does not serve as it was evaluated, so it is not "
                            f"{CHALLENGER}: {tags.get(serving.PARITY_DETAIL_TAG)}")
    log.info("registered %s version %s (run %s) as %s", model_name, version, run_id, CHALLENGER)
    return result


# ----------------------------------------------------------------------------- stage CLI


def register_from_params(params_path: str = "params.yaml", model_dir: str | None = None,
                         metrics_path: str = "metrics/eval.json", eval_report_dir: str = "reports/eval",
                         out_path: str = "reports/registration.json") -> dict:
    """The register stage with its params: what `dvc repro register` and `alignflow register` run."""
    from components.core.config import load_params

    p = load_params(params_path)
    # The version's lineage hash: every section that shaped the model or its metrics. `register`
    # itself (name, gate) is left out: changing the gate does not make a different model.
    params = p.model_dump(by_alias=True, exclude={"registry"})
    return run(p.registry, params=params, evaluate=p.evaluate, model_dir=model_dir, metrics_path=metrics_path,
               eval_report_dir=eval_report_dir, pref_eval_path="data/prepared/pref_eval.jsonl",
               out_path=out_path, runtime=Runtime.of(p))


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model-dir", default=None, help="default: models/<register.candidate>")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--eval-report", default="reports/eval")
    parser.add_argument("--out", default="reports/registration.json")


@stage_main("register")
def main(argv: list[str] | None = None) -> int:
    """`python -m components.register`: the DVC stage. Exit 0 registered, 1 error (message names the cause)."""

    parser = argparse.ArgumentParser(prog="python -m components.register", description=__doc__.splitlines()[0])
    add_register_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = register_from_params(args.params, args.model_dir, args.metrics, args.eval_report, args.out)
    except (RegistryError, FileNotFoundError) as e:  # params errors: stage_main's input-error exit
        print(f"register: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in ("name", "version", "run_id", "model_uri", "alias")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
