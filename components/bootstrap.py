"""The embedded default base model: a tiny Llama and a BPE tokenizer, built offline.

`python -m components.bootstrap --params params.yaml` writes `models/base/`, a standard Hugging Face
directory (`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained("models/base")` load it):
- a byte-level BPE trained with `tokenizers` on the synthetic task's text (any UTF-8 text still
  encodes), ChatML special tokens and chat template;
- a randomly initialised (seeded) `LlamaForCausalLM` sized by the `model` section.

When `model.name_or_path` names a local directory or a hub id, nothing is built: the stage writes
`models/base/alignflow_source.json` pointing at it, and `core/io.resolve_model_path` follows
the pointer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from components.core.io import SOURCE_FILE, atomic_dir
from components.core.logs import stage_main
from components.core.tokens import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # role names and template words appear in every sequence: give them merges too
    tok.train_from_iterator(texts + ["user assistant system\n"] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
    )


def build_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                intermediate_size: int, max_position_embeddings: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def run(
    out_dir: str,
    name_or_path: str,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int,
    max_position_embeddings: int,
    min_items: int,
    max_items: int,
    max_value: int,
    seed: int,
) -> dict:
    from components.core import sorting
    from components.core.config import EMBEDDED

    if name_or_path != EMBEDDED and name_or_path.startswith((".", "/")) and not Path(name_or_path).exists():
        raise FileNotFoundError(f"model.name_or_path: {name_or_path} does not exist")
    with atomic_dir(out_dir) as tmp:
        if name_or_path != EMBEDDED:
            (tmp / SOURCE_FILE).write_text(json.dumps({"name_or_path": name_or_path}) + "\n")
            result = {"model": name_or_path, "built": False}
        else:
            tokenizer = build_tokenizer(sorting.corpus(min_items, max_items, max_value, seed), vocab_size)
            model = build_model(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads,
                                intermediate_size, max_position_embeddings, seed)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            n_params = sum(p.numel() for p in model.parameters())
            result = {"model": EMBEDDED, "built": True, "parameters": n_params, "vocab_size": len(tokenizer)}
    return result


@stage_main("bootstrap")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="models/base")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    m, s = p.model, p.synthetic
    result = run(args.out, m.name_or_path, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
                 m.intermediate_size, m.vocab_size, m.max_position_embeddings,
                 s.min_items, s.max_items, s.max_value, p.seed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
