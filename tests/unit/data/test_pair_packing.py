"""Padding-free preference batches (core/data/pair_packing.py): pairs end to end, positions restarting per pair
(rejected continuing from the prompt), a block-diagonal mask with the shared-prompt rule inside each pair, the
slots each response token is read from, and no padding. Equality with the padded layout: tests/unit/model."""

from __future__ import annotations

import pytest
import torch

from components.core.data.pair_packing import collate_packed_pairs, pair_rows, pair_segment_length
from components.core.data.tokens import IGNORE_INDEX, collate_shared_prompt

X = IGNORE_INDEX
PAIRS = [
    {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]},
    {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8, 9]},
]


def test_pairs_end_to_end_by_hand():
    batch = collate_packed_pairs(PAIRS, pad_id=0, max_tokens=100)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    # chosen and rejected both continue from their prompt's end
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert batch.targets.tolist() == [[3, 4, 5], [7, 8, 9]]
    assert batch.segment.tolist() == [[1, 1, 2], [1, 2, 2]]
    # a response's first token is read off its prompt's last position, the others off the token before them
    assert batch.source.tolist() == [[1, 2, 1], [5, 5, 7]]
    mask = batch.attention_mask[0, 0]
    assert mask[4].tolist() == [True, True, False, False, True, False, False, False, False]  # rejected: no chosen
    assert mask[3].tolist() == [True, True, True, True] + [False] * 5  # chosen sees its prompt and itself
    assert mask[8].tolist() == [False] * 5 + [True, False, True, True]  # second pair: itself only
    assert batch.real_tokens == batch.input_ids.numel() == 9  # no padding at all


def lengths_pairs(spec: list[tuple[int, int, int]]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{key: torch.randint(5, 99, (n,), generator=g).tolist() for key, n in
             zip(("prompt_ids", "chosen_ids", "rejected_ids"), lens, strict=True)} for lens in spec]


SPREAD = [(12, 14, 14), (90, 100, 110), (3, 1, 1), (40, 30, 70), (25, 60, 5), (7, 9, 0)]


def test_one_row_has_zero_padding_and_every_token_once():
    pairs = lengths_pairs(SPREAD)
    total = sum(pair_segment_length(p) for p in pairs)
    batch = collate_packed_pairs(pairs, pad_id=0, max_tokens=total)
    assert batch.input_ids.shape == (1, total) and batch.real_tokens == total
    assert sorted(batch.input_ids[0].tolist()) == sorted(t for p in pairs for ids in p.values() for t in ids)
    mask = batch.attention_mask[0, 0]
    assert not (mask & ~torch.ones_like(mask).tril()).any()  # causal
    assert mask.sum(-1).min() >= 1  # no all-masked query (NaN in sdpa)
    padded = collate_shared_prompt(pairs, pad_id=0)
    assert padded.input_ids.numel() > 2 * total  # what the padded layout computes for these lengths


def test_default_rows_are_never_longer_or_more_than_the_padded_ones():
    """By default rows hold at most the longest pair: <= B rows, each <= the padded row, first fit longest first."""
    pairs = lengths_pairs(SPREAD)
    lengths = [pair_segment_length(p) for p in pairs]
    rows = pair_rows(pairs)
    assert sorted(i for row in rows for i in row) == list(range(len(pairs)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows) and rows[0] == [1]
    batch = collate_packed_pairs(pairs, pad_id=0)
    padded = collate_shared_prompt(pairs, pad_id=0)
    assert batch.input_ids.shape[0] <= len(pairs) and batch.input_ids.shape[1] == max(lengths)
    assert batch.input_ids.shape[1] <= padded.input_ids.shape[1]
    assert batch.real_tokens == sum(lengths) < batch.input_ids.numel() < padded.input_ids.numel()


def test_a_pair_without_prompt_is_refused():
    with pytest.raises(ValueError, match="non-empty prompt"):
        collate_packed_pairs([{"prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]}], pad_id=0)
