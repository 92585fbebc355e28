"""Shared fixtures. Everything is built offline; no hub access."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A small byte-level BPE tokenizer with the ChatML template, saved as a HF tokenizer dir.

    Byte-level: any text encodes (unseen words fall back to byte tokens), so token counts are real.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from components.batching import CHATML_TEMPLATE

    corpus = [
        "What is the capital of France? Paris is the capital of France.",
        "Sort the numbers 3 1 2 into 1 2 3. Hello! How can I help you today?",
        "user assistant system You are a helpful assistant. Yes. No.",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(path)
    return str(path)
