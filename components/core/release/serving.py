"""What a registered version serves, and the check that it answers as evaluate did.

A version is an MLflow chat model (`chat_model.py`: OpenAI-style messages in, chat completion out) over a plain
Hugging Face directory, the artifact `hf_model`: the policy's weights and tokenizer byte for byte, its chat
template (ChatML written out when the tokenizer had none: the template the pipeline rendered with), a generation
config whose eos ids are the tokens that end a turn and whose sampling is evaluate's, and the model card.

Serving parity (`parity`): for the first N held-out prompts (evaluate's order), through the MLflow pyfunc loaded
in process exactly as `mlflow models serve` loads it,
- the prompt's token ids under the served template equal the ids prepare stored (the token artifact), and
- the greedy answer equals the pipeline's own greedy generation (`core/model/generation.generate_tokens`, one
  prompt at a time, as the server answers) token for token, end-of-turn token included.
The result is the run metric and version tag `serving/parity` (with `serving/parity_detail`: what differs);
the gate refuses a version without a pass.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger("alignflow.registry")

CHAT_MODEL_FILE = Path(__file__).with_name("chat_model.py")
HF_ARTIFACT = "hf_model"  # = chat_model.ARTIFACT (that file imports nothing from alignflow)
SERVING_FORMAT = "chat/1"  # part of the registration key: a version of another format is registered anew
PARITY_TAG = "serving/parity"
PARITY_DETAIL_TAG = "serving/parity_detail"
PARITY_PROMPTS_TAG = "serving/parity_prompts"
PASS, FAIL = "pass", "fail"
CARD = "README.md"


def sampling_defaults(max_new_tokens: int, temperature: float, top_p: float) -> dict:
    """The chat model's defaults for a request that sets none: evaluate's sampling."""
    return {"max_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p)}


def stage_hf_dir(model_dir: str | Path, dst: str | Path, sampling: dict, card: str = "",
                 trust_remote_code: bool = False) -> Path:
    """Copy a policy directory to dst as the version's HF directory: files unchanged, plus the chat template
    when the tokenizer has none, eos / pad / sampling in generation_config.json, and the model card."""
    from transformers import AutoConfig, GenerationConfig

    from components.core.data.tokens import CHATML_TEMPLATE
    from components.core.model.generation import generation_eos
    from components.core.model.loading import load_tokenizer

    dst = Path(dst)
    shutil.copytree(model_dir, dst)
    tokenizer = load_tokenizer(str(dst), trust_remote_code)
    if not tokenizer.chat_template:  # the pipeline rendered with ChatML: serve exactly that
        (dst / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    try:
        generation = GenerationConfig.from_pretrained(dst)
    except OSError:
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(dst, trust_remote_code=trust_remote_code))
    eos = generation_eos(str(dst), tokenizer)
    generation.eos_token_id = eos if len(eos) > 1 else eos[0]
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if sampling["temperature"] > 0:  # evaluate's plain temperature / top-p sampling, nothing a checkpoint shipped
        generation.update(do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=0,
                          repetition_penalty=1.0)
    else:
        generation.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    generation.max_new_tokens = sampling["max_tokens"]
    generation.save_pretrained(dst)
    if card:
        (dst / CARD).write_text(card)
    return dst


def log_chat_model(hf_dir: str | Path, model_name: str, sampling: dict, pip_requirements: list[str]):
    """Log hf_dir as the chat model (artifact path `model`) in the active MLflow run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA

    from components.core.release import chat_model  # the served code: MLflow logs and loads it by its file

    example = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "temperature": 0.0}
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=chat_model.__file__,
        artifacts={chat_model.ARTIFACT: str(hf_dir)},
        model_config={"model_name": model_name, **sampling},
        signature=ModelSignature(CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA),
        input_example=example,
        metadata={"task": "llm/v1/chat", "alignflow_serving_format": SERVING_FORMAT},
        pip_requirements=["mlflow==" + mlflow.__version__, *pip_requirements],
    )


def hf_dir_of(root: str | Path) -> Path:
    """The Hugging Face directory inside a downloaded version: the chat model's `hf_model` artifact, or (versions
    registered before alignflow served chat) the transformers flavor's weights with its tokenizer copied beside."""
    import yaml

    root = Path(root)
    flavors = yaml.safe_load((root / "MLmodel").read_text())["flavors"]
    pyfunc = flavors.get("python_function", {})
    if HF_ARTIFACT in pyfunc.get("artifacts", {}):
        return root / pyfunc["artifacts"][HF_ARTIFACT]["path"]
    flavor = flavors["transformers"]
    model_dir = root / flavor.get("model_binary", "model")
    for component in flavor.get("components", []):
        for f in (root / "components" / component).iterdir():
            if f.is_file() and not (model_dir / f.name).exists():
                shutil.copy2(f, model_dir / f.name)
    return model_dir


def is_chat_model(root: str | Path) -> bool:
    import yaml

    meta = yaml.safe_load((Path(root) / "MLmodel").read_text()).get("metadata") or {}
    return meta.get("task") == "llm/v1/chat" and bool(meta.get("alignflow_serving_format"))


# ----------------------------------------------------------------------------- parity


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _describe(kind: str, pid: str, served: list[int], pipeline: list[int], decode, against: str) -> str:
    at = _first_difference(served, pipeline)
    return (f"prompt {pid}: {kind} differ at token {at}: served {served[at:at + 6]} {decode(served[at:at + 6])!r} "
            f"vs {against} {pipeline[at:at + 6]} {decode(pipeline[at:at + 6])!r} ({len(served)} vs {len(pipeline)} tokens)")


def expected_prompt_ids(pref_eval_path: str, tokenizer) -> tuple[dict[str, list[int]] | None, str]:
    """The token artifact's prompt ids (and where they come from), or None with the reason when it cannot be read."""
    from components.core.data.token_store import TokenizedError, stored_prompt_ids, tokens_path

    try:
        return stored_prompt_ids(pref_eval_path, tokenizer), f"the token artifact ({tokens_path(pref_eval_path)})"
    except TokenizedError as e:
        return None, f"the pipeline's rendering (no usable token artifact: {str(e).split(';')[0]})"


def parity(model_uri: str, pipeline_dir: str, pref_eval_path: str, num_prompts: int, max_new_tokens: int,
           trust_remote_code: bool = False) -> dict:
    """Served (the pyfunc at model_uri, in process) vs the pipeline (its own loading and greedy generation of
    pipeline_dir) on the first num_prompts held-out prompts of pref_eval_path, in evaluate's order. Returns
    {passed, prompts, identical, fraction, detail, mismatches}."""
    import mlflow

    from components.core.eval.judges import eval_prompts
    from components.core.model.generation import generate_tokens, load_causal_lm

    if not Path(pref_eval_path).exists():
        raise FileNotFoundError(f"{pref_eval_path}: no held-out prompts to check serving parity on (dvc repro prepare)")
    prompts = eval_prompts(pref_eval_path, num_prompts)
    if not prompts:
        return {"passed": False, "prompts": 0, "identical": 0, "fraction": 0.0, "mismatches": [],
                "detail": f"no held-out prompts in {pref_eval_path} to check serving against"}
    served = mlflow.pyfunc.load_model(model_uri)
    model, tokenizer = load_causal_lm(pipeline_dir, trust_remote_code)
    stored, source = expected_prompt_ids(pref_eval_path, tokenizer)
    rendered, answers = generate_tokens(model, tokenizer, [m for _, m in prompts], max_new_tokens, 0.0, 1.0,
                                        batch_size=1, seed=0, desc="serving parity")
    mismatches = []
    for (pid, messages), own_prompt, own_answer in zip(prompts, rendered, answers, strict=True):
        out = served.predict({"messages": messages, "max_tokens": max_new_tokens, "temperature": 0.0,
                              "custom_inputs": {"return_token_ids": True}})
        got_prompt = out["custom_outputs"]["prompt_token_ids"]
        got_answer = out["custom_outputs"]["completion_token_ids"][0]
        want_prompt = stored.get(pid, own_prompt) if stored is not None else own_prompt
        if got_prompt != want_prompt:
            mismatches.append(_describe("prompt tokens", pid, got_prompt, want_prompt, tokenizer.decode, source))
        elif got_answer != own_answer:
            mismatches.append(_describe("greedy answers", pid, got_answer, own_answer, tokenizer.decode,
                                        "the pipeline's"))
    identical = len(prompts) - len(mismatches)
    head = (f"{identical}/{len(prompts)} held-out prompts identical (prompt tokens vs {source}; greedy answers of "
            f"up to {max_new_tokens} tokens vs the pipeline's)")
    detail = head if not mismatches else head + "; first difference: " + mismatches[0]
    log.info("serving parity of %s: %s", model_uri, detail)
    return {"passed": not mismatches, "prompts": len(prompts), "identical": identical,
            "fraction": identical / len(prompts), "detail": detail, "mismatches": mismatches}


def parity_tags(result: dict) -> dict[str, str]:
    return {PARITY_TAG: PASS if result["passed"] else FAIL, PARITY_DETAIL_TAG: result["detail"][:4000],
            PARITY_PROMPTS_TAG: str(result["prompts"])}
