"""From a registered version to an answer: `alignflow serve-check | serve | export`.

serve-check: serving parity (serving.py) of a version, on demand, recorded on it as register records it.
serve: `mlflow models serve` for a version or alias of the registered chat model (one command line, built here).
export: a version or alias to a plain Hugging Face directory (weights, tokenizer, chat template, generation config
with the turn's eos ids; LoRA merged when a directory holds an adapter) that transformers, vLLM and TGI load, with
its lineage in `alignflow_lineage.json` beside the weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from components.core.release import serving
from components.core.release.registry import RegistryError, download_version, now, registry_client

log = logging.getLogger("alignflow.registry")

LINEAGE_FILE = "alignflow_lineage.json"
LINEAGE_PREFIXES = ("git/", "dvc/", "params/", "eval/", "serving/", "promotion/", "alignflow/", "prefect/")


def resolve(name: str, ref: str):
    """The version `ref` names: a version number ("3", "v3") or an alias ("champion")."""
    from mlflow.exceptions import MlflowException

    client = registry_client()
    number = ref[1:] if ref[:1] in "vV" and ref[1:].isdigit() else ref
    try:
        if number.isdigit():
            return client.get_model_version(name, number)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as e:
        kind = "version" if number.isdigit() else "alias"
        raise RegistryError(f"{name}: no {kind} {ref!r} in the registry ({registry_uri()}); "
                            "`alignflow status` lists versions and aliases") from e


def registry_uri() -> str:
    from components.core.ops import tracking

    return tracking.tracking_uri()


def record_parity(name: str, version: str, run_id: str | None, result: dict) -> dict[str, str]:
    """Write a parity result on a version (tags) and its run (metric `serving/parity`); returns the tags."""
    client = registry_client()
    tags = serving.parity_tags(result)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if run_id:
        client.log_metric(run_id, serving.PARITY_TAG, result["fraction"])
    return tags


def serve_check(name: str, ref: str, pref_eval_path: str, num_prompts: int, max_new_tokens: int,
                trust_remote_code: bool = False) -> dict:
    """Serving parity of a registered version against the pipeline's generation of its own weights, recorded on it."""
    version = resolve(name, ref)
    with tempfile.TemporaryDirectory(prefix="alignflow-serve-check-") as work:
        import mlflow

        root = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=work))
        if not serving.is_chat_model(root):
            raise RegistryError(f"{name} version {version.version} is not a chat model (registered before alignflow "
                                "registered chat models): register the model again (alignflow register)")
        result = serving.parity(str(root), str(serving.hf_dir_of(root)), pref_eval_path, num_prompts,
                                max_new_tokens, trust_remote_code)
    record_parity(name, str(version.version), version.run_id, result)
    return {"model_name": name, "version": str(version.version), **result}


def serve_command(name: str, ref: str, host: str, port: int, env_manager: str, workers: int | None) -> list[str]:
    """The `mlflow models serve` command line for a version or alias (checked to exist)."""
    version = resolve(name, ref)
    uri = f"models:/{name}/{version.version}" if ref.lstrip("vV").isdigit() else f"models:/{name}@{ref}"
    if version.tags.get(serving.PARITY_TAG) != serving.PASS:
        log.warning("%s version %s has no passing serving-parity check (%s): it may not answer as it was evaluated",
                    name, version.version, version.tags.get(serving.PARITY_DETAIL_TAG, "never checked"))
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--host", host, "--port", str(port),
           "--env-manager", env_manager]
    if workers:
        cmd += ["--workers", str(workers)]
    return cmd


def export(name: str, ref: str, out_dir: str | Path, force: bool = False) -> dict:
    """Write version `ref` of `name` to out_dir as a plain Hugging Face directory with alignflow_lineage.json."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise RegistryError(f"{out}: exists and is not empty; choose another --out or pass --force")
    version = resolve(name, ref)
    with tempfile.TemporaryDirectory(prefix="alignflow-export-") as work:
        hf_dir = Path(download_version(name, str(version.version), work))
        staged = Path(work) / "export"
        if (hf_dir / "adapter_config.json").exists():
            _merge_adapter(hf_dir, staged)
        else:
            shutil.copytree(hf_dir, staged)
        client = registry_client()
        aliases = sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(version.version))
        lineage = {"model_name": name, "version": str(version.version), "aliases": aliases, "run_id": version.run_id,
                   "source": version.source, "registry": registry_uri(), "exported_at": now(),
                   "tags": {k: v for k, v in sorted(version.tags.items()) if k.startswith(LINEAGE_PREFIXES)}}
        (staged / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)  # whole or not at all: the copy is complete before it takes the name
    log.info("exported %s version %s to %s", name, version.version, out)
    return {"model_name": name, "version": str(version.version), "aliases": aliases, "out": str(out)}


def _merge_adapter(adapter_dir: Path, dst: Path) -> None:
    """A LoRA adapter directory merged into its base model (peft), saved as a plain model with the tokenizer."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).merge_and_unload()
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(dst)
    for f in adapter_dir.iterdir():  # the chat template, generation config and card the version carries
        if f.is_file() and not f.name.startswith("adapter_") and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
