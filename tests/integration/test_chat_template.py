"""Bring-your-own-model without a chat template: bootstrap materialises models/base with ChatML added.

Offline: a tiny byte-level BPE tokenizer that knows only `<|endoftext|>` (eos, no pad, no template) and a tiny
tied-embedding bf16 `LlamaForCausalLM` stand in for the user's base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components import bootstrap
from components.core.config import ModelConfig, Runtime
from components.core.data.tokens import CHATML_TEMPLATE, encode_chat, render
from components.core.ops.io import SOURCE_FILE, resolve_model_path

CONVERSATION = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello"}]


def make_user_model(path: Path, chat_template: str | None = None, pad_token: str | None = None,
                    extra_tokens: tuple[str, ...] = ()) -> Path:
    """A template-less (unless chat_template) base model dir: BPE tokenizer + 2-layer Llama, bf16, tied."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + ([pad_token] if pad_token else []) + list(extra_tokens)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the user and the assistant talk\n"] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        pad_token=pad_token, chat_template=chat_template)
    assert "<|im_start|>" not in tokenizer.get_vocab() or "<|im_start|>" in extra_tokens
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_bootstrap(out: Path, name_or_path: Path) -> dict:
    # the architecture and synthetic settings only matter for the embedded model
    return bootstrap.run(ModelConfig(name_or_path=str(name_or_path)), out_dir=str(out), runtime=Runtime(seed=1234))


@pytest.fixture(scope="module")
def chat_ready(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("byo")
    user = make_user_model(root / "user")
    out = root / "models/base"
    return user, out, run_bootstrap(out, user)


def test_template_less_model_is_materialised_with_chatml(chat_ready):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    user, out, result = chat_ready
    assert result["chat_template"] == "added" and result["added_tokens"] == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert not (out / SOURCE_FILE).exists() and resolve_model_path(str(out)) == str(out)
    record = json.loads((out / bootstrap.TEMPLATE_FILE).read_text())
    assert record["name_or_path"] == str(user) and record["chat_template"] == "chatml-added"
    assert record["added_tokens"] == result["added_tokens"]

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    start, end = (tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"],
                  tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"])
    assert len(start) == 1 and len(end) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == end[0]
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id not in (end[0], start[0])
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert render(tokenizer, CONVERSATION) == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"

    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tokenizer) > result["embedding_rows"][0] and rows % 64 == 0
    assert model.config.vocab_size == rows and model.lm_head.weight.shape[0] == rows
    assert model.dtype == torch.bfloat16  # dtype as loaded
    assert model.config.eos_token_id == end[0] and model.config.pad_token_id == tokenizer.pad_token_id
    old_eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert model.generation_config.eos_token_id == [end[0], old_eos]
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_encode_chat_ends_the_assistant_turn_with_im_end(chat_ready):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_ready[1])
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert trained[: -len(newline)][-1] == tokenizer.eos_token_id  # "...hello<|im_end|>" then the template's "\n"
    assert tokenizer.decode(trained) == "hello<|im_end|>\n"
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def force_im_end(model, im_end: int) -> None:
    """Make `<|im_end|>` the argmax after any input: only hidden dim 0 survives the final norm, every token's
    embedding is +10 there (so that dim stays positive), and `<|im_end|>`'s row is 10x larger (tied or not)."""
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        for weight in {id(w): w for w in (model.get_input_embeddings().weight, model.lm_head.weight)}.values():
            weight[:, 0] = 10.0
            weight[im_end, 0] = 100.0


def test_generation_stops_at_turn_end(chat_ready):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.core.data.tokens import prompt_ids_for_generation
    from components.core.model.generation import eos_ids, generate_tokens

    tokenizer = AutoTokenizer.from_pretrained(chat_ready[1])
    model = AutoModelForCausalLM.from_pretrained(chat_ready[1], dtype=torch.float32).eval()
    im_end, old_eos = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")
    force_im_end(model, im_end)
    prompt = torch.tensor([prompt_ids_for_generation(tokenizer, CONVERSATION[:1])])
    # with the saved generation config alone: stops right after <|im_end|>
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == [im_end]
    # control: with only the old eos as a stop, the same model runs to the length limit
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                         do_sample=False, eos_token_id=old_eos, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] - prompt.shape[1] == 20
    # the project's sampler (eos from tokenizer + generation config) stops there too
    assert eos_ids(model, tokenizer) == sorted([im_end, old_eos])
    _, responses = generate_tokens(model, tokenizer, [CONVERSATION[:1]] * 2, max_new_tokens=20, temperature=0.0,
                                   top_p=1.0, batch_size=2, seed=0)
    assert responses == [[im_end], [im_end]]


def test_existing_tokens_and_pad_are_reused(tmp_path):
    from transformers import AutoTokenizer

    user = make_user_model(tmp_path / "user", pad_token="<pad>", extra_tokens=("<|im_start|>",))
    before = AutoTokenizer.from_pretrained(user)
    result = run_bootstrap(tmp_path / "base", user)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert result["added_tokens"] == ["<|im_end|>"]  # <|im_start|> already had an id; pad kept
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == before.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == len(before) + 1
    assert len(tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"]) == 2


def test_model_with_template_stays_a_pointer(tmp_path):
    user = make_user_model(tmp_path / "user", chat_template=CHATML_TEMPLATE, pad_token="<pad>",
                           extra_tokens=("<|im_start|>", "<|im_end|>"))
    out = tmp_path / "base"
    result = run_bootstrap(out, user)
    assert result["chat_template"] == "own" and not result["built"]
    assert sorted(p.name for p in out.iterdir()) == [SOURCE_FILE]  # no weights copied
    assert resolve_model_path(str(out)) == str(user)
