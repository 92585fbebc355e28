"""Model loading and saving for real model sizes: gradient checkpointing, frozen models, the saved dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from components import bootstrap
from components.core import sorting
from components.core.data import tokens
from components.core.model import loading, logprobs
from components.core.train import loop


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = bootstrap.build_tokenizer(sorting.corpus(3, 4, 9, seed=1), 300)
    model = bootstrap.build_model(tok, 32, 2, 2, 1, 64, 128, seed=1)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


def nll_grads(model, tok):
    _, prefs = sorting.generate(0, 4, 3, 5, 9, 0.0, seed=2)
    seqs = [tokens.prompt_response_to_sequence(*tokens.encode_prompt_response(tok, r["prompt"], r["chosen"]))
            for r in prefs]
    model.train()
    nll, n = logprobs.batch_nll(model, tokens.collate_sequences(seqs, tok.pad_token_id))
    (nll / n).backward()
    return nll.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model_dir):
    path, tok = model_dir
    plain = loading.load_model(str(path), gradient_checkpointing=False)
    checkpointed = loading.load_model(str(path), gradient_checkpointing=True)
    assert not loading.checkpointing(plain) and loading.checkpointing(checkpointed)
    assert not loading.checkpointing(loading.load_model(str(path), gradient_checkpointing="auto"))  # 100M+
    (loss_a, grads_a), (loss_b, grads_b) = nll_grads(plain, tok), nll_grads(checkpointed, tok)
    torch.testing.assert_close(loss_b, loss_a)
    for key, g in grads_a.items():
        torch.testing.assert_close(grads_b[key], g, rtol=1e-5, atol=1e-7)


def test_frozen_model_has_no_trainable_weights(model_dir):
    model = loading.load_model(str(model_dir[0]), frozen=True)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert loading.frozen_dtype("bf16") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def test_final_model_is_saved_in_the_dtype_the_input_was_stored_in(model_dir, tmp_path):
    path, tok = model_dir
    assert loading.stored_dtype(str(path)) == torch.float32
    accelerator = loop.make_accelerator("no")
    model = loading.load_model(str(path))
    loop.save_model_atomic(accelerator, model, tok, str(tmp_path / "bf16"), torch.bfloat16)
    weights = load_file(str(tmp_path / "bf16/model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16/config.json").read_text())["dtype"] == "bfloat16"
    assert loading.stored_dtype(str(tmp_path / "bf16")) == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the live fp32 master weights are untouched
