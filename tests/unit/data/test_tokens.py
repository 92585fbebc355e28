"""data/tokens.py: chat encoding, the prompt/response split, length buckets."""

from __future__ import annotations

import pytest

from components import bootstrap
from components.core import sorting
from components.core.data import tokens


@pytest.fixture(scope="module")
def tiny():
    tok = bootstrap.build_tokenizer(sorting.corpus(3, 4, 9, seed=1), 300)
    model = bootstrap.build_model(tok, 32, 2, 2, 1, 64, 128, seed=1).eval()
    return tok, model


def test_encode_chat_trains_on_assistant_turns_only(tiny):
    tok, _ = tiny
    messages = [
        {"role": "user", "content": "Sort ascending: 3 1"},
        {"role": "assistant", "content": "1 3"},
        {"role": "user", "content": "Sort ascending: 2 0"},
        {"role": "assistant", "content": "0 2"},
    ]
    ids, mask = tokens.encode_chat(tok, messages)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "1 3<|im_end|>\n0 2<|im_end|>\n"
    assert tok.decode(ids) == tokens.render(tok, messages)


def test_prompt_response_split_is_a_token_boundary(tiny):
    tok, _ = tiny
    prompt = [{"role": "user", "content": "Sort ascending: 5 4"}]
    p, r = tokens.encode_prompt_response(tok, prompt, [{"role": "assistant", "content": "4 5"}])
    assert p == tokens.prompt_ids_for_generation(tok, prompt)
    assert tok.decode(r) == "4 5<|im_end|>\n"


def test_bucketed_batches_cover_everything_once_and_are_deterministic():
    lengths = [i % 17 for i in range(1000)]
    a = tokens.bucketed_batches(lengths, 32, seed=3, epoch=0)
    assert a == tokens.bucketed_batches(lengths, 32, seed=3, epoch=0)
    assert a != tokens.bucketed_batches(lengths, 32, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(1000))
    # bucketing: the length spread inside a batch is far below the global spread (16)
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a]
    assert sum(spreads) / len(spreads) < 3
