"""SFT packing (core/data/packing.py): rows filled first-fit, positions restarting per example, a block-diagonal mask,
no example trained to follow another, and the same NLL as one row per example (sdpa and eager, values and
gradients)."""

from __future__ import annotations

import pytest
import torch

from components.core.data import packing
from components.core.data.tokens import IGNORE_INDEX, collate_sequences
from components.core.model.logprobs import batch_nll

X = IGNORE_INDEX  # no label
EXAMPLES = [  # (input_ids, labels): prompt tokens unlabelled, response tokens labelled
    ([5, 6, 7, 8], [X, X, 7, 8]),
    ([9, 10, 11], [X, 10, 11]),
    ([12, 13, 14, 15, 16, 17], [X, X, X, 15, 16, 17]),
    ([18, 19], [X, 19]),
]


def test_pack_rows_first_fit_by_hand():
    assert packing.pack_rows([4, 3, 6, 2], max_length=8) == [[0, 1], [2, 3]]
    assert packing.pack_rows([4, 3, 6, 2], max_length=7) == [[0, 1], [2], [3]]
    assert packing.pack_rows([9, 1], max_length=8) == [[0], [1]]  # too long for any row: a row of its own


def test_collate_packed_positions_labels_and_mask():
    batch = packing.collate_packed(EXAMPLES, pad_id=0, max_length=8)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 0], [12, 13, 14, 15, 16, 17, 18, 19]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 0, 1]]
    # each example's first token is never a target (it would be predicted from the previous example)
    assert batch.labels.tolist() == [[X, X, 7, 8, X, 10, 11, X], [X, X, X, 15, 16, 17, X, 19]]
    mask = batch.attention_mask[0, 0]
    assert mask[5].tolist() == [False, False, False, False, True, True, False, False]  # token 10 sees 9, 10
    assert mask[7].tolist() == [False] * 7 + [True]  # padding attends only to itself
    assert batch.num_tokens == 15


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64,
                         attn_implementation=request.param)
    return LlamaForCausalLM(config)


def test_packed_nll_and_gradients_equal_one_row_per_example(model):
    packed = packing.collate_packed(EXAMPLES, pad_id=0, max_length=8)
    rows = collate_sequences(EXAMPLES, pad_id=0)
    nll_p, n_p = batch_nll(model, packed)
    grads_p = torch.autograd.grad(nll_p, [p for p in model.parameters()], allow_unused=True)
    nll_r, n_r = batch_nll(model, rows)
    grads_r = torch.autograd.grad(nll_r, [p for p in model.parameters()], allow_unused=True)
    assert int(n_p) == int(n_r) == 8
    torch.testing.assert_close(nll_p, nll_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_p, grads_r, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
