"""Padding-free preference batches (`dpo.padding_free`, `reference.padding_free`): the pairs of a micro-batch laid
end to end, `[prompt_1 | chosen_1 | rejected_1 | prompt_2 | chosen_2 | rejected_2 | ...]`, with no padding.

The shared-prompt layout (`tokens.collate_shared_prompt`) pads every pair to the longest prompt on the left and
the longest response pair on the right, so a micro-batch of pairs of very different lengths computes mostly
padding. Here each pair keeps exactly its own tokens: positions restart at each pair (chosen and rejected both
continue from its prompt's end, as in the shared-prompt row), and the 4D mask is block-diagonal over pairs, with
the shared-prompt rule inside a pair (rejected never sees chosen). Every response token is therefore conditioned
exactly as in its own padded row, and the per-pair log-probs are the padded ones up to float rounding (tested).

Rows: with a dense (T, T) mask (sdpa, eager) attention costs T^2 even where the mask is False, so one row of all
the pairs can cost more attention than the padded rows it replaces (measured on CPU: 8 pairs of 40..300 tokens in
one 1360-token row ran about as fast as the padded (8, 300) batch, twice as slow on a narrower model; rows of at
most 300 tokens ran 25-35% faster than either). So pairs go first fit, longest first, into rows
of at most `max_tokens`, by default the longest pair's own length: never more rows than pairs, none longer than
the padded row, hence never more attention or tokens than the padded layout, and only the few tokens at the ends
of the rows are padding (a budget of at least the pairs' total gives one row and none at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from components.core.data.packing import pack_rows
from components.core.data.tokens import IGNORE_INDEX


@dataclass
class PackedPairBatch:
    """B pairs in R <= B rows of length T. A pair's response slots k (chosen tokens, then rejected ones) are
    read from the final hidden states flattened to (R * T, H): `source[b, k]` is the flat index of the position
    that predicts slot k (for a response's first token, its prompt's last position)."""

    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, 1, T, T) bool, True = may attend
    targets: torch.Tensor  # (B, K) response token ids by slot, IGNORE_INDEX past the pair's responses
    source: torch.Tensor  # (B, K) flat index (row * T + position) of the position predicting each slot
    segment: torch.Tensor  # (B, K) 1 chosen, 2 rejected, 0 none
    real_tokens: int  # tokens that are not padding (all R * T of them with one row)


def pair_segment_length(pair: dict) -> int:
    """Tokens a pair takes in a padding-free row: its prompt once, then both responses."""
    return len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def pair_rows(pairs: Sequence[dict], max_tokens: int | None = None) -> list[list[int]]:
    """Pair indices per row, first fit, longest first (rows come out of similar length, so the padding at the
    end of the shorter ones stays small). max_tokens None: the longest pair's length."""
    lengths = [pair_segment_length(p) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
    budget = max(lengths) if max_tokens is None else max_tokens
    return [[order[j] for j in row] for row in pack_rows([lengths[i] for i in order], budget)]


def collate_packed_pairs(pairs: Sequence[dict], pad_id: int, max_tokens: int | None = None) -> PackedPairBatch:
    """Pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`) laid end to end in rows of at most `max_tokens`
    (`pair_rows`; a pair longer than that gets a row of its own)."""
    if any(not p["prompt_ids"] for p in pairs):  # its first response token would be read off another pair
        raise ValueError("padding-free pairs need a non-empty prompt")
    rows = pair_rows(pairs, max_tokens)
    t = max(sum(pair_segment_length(pairs[i]) for i in row) for row in rows)
    k = max(max(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs), 1)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), t), dtype=torch.long)
    owner = torch.zeros((len(rows), t), dtype=torch.long)  # 0 padding, j + 1 the row's j-th pair
    kind = torch.zeros((len(rows), t), dtype=torch.long)  # 3 prompt, 1 chosen, 2 rejected
    targets = torch.full((len(pairs), k), IGNORE_INDEX, dtype=torch.long)
    source = torch.zeros((len(pairs), k), dtype=torch.long)
    segment = torch.zeros((len(pairs), k), dtype=torch.long)
    for r, row in enumerate(rows):
        off = 0
        for j, b in enumerate(row):
            prompt, chosen, rejected = pairs[b]["prompt_ids"], pairs[b]["chosen_ids"], pairs[b]["rejected_ids"]
            np_, nc, nr = len(prompt), len(chosen), len(rejected)
            n = np_ + nc + nr
            input_ids[r, off : off + n] = torch.as_tensor(list(prompt) + list(chosen) + list(rejected))
            position_ids[r, off : off + n] = torch.cat([torch.arange(np_ + nc), torch.arange(np_, np_ + nr)])
            owner[r, off : off + n] = j + 1
            kind[r, off : off + n] = torch.tensor([3] * np_ + [1] * nc + [2] * nr)
            targets[b, : nc + nr] = torch.as_tensor(list(chosen) + list(rejected))
            segment[b, : nc + nr] = torch.tensor([1] * nc + [2] * nr)
            # each response token is predicted by the token before it; a response's first token by the
            # prompt's last one (rejected as well: it continues from the prompt, not from chosen)
            last_prompt = r * t + off + np_ - 1
            source[b, :nc] = last_prompt + torch.arange(nc)
            source[b, nc : nc + nr] = last_prompt + nc + torch.arange(nr)
            if nr:
                source[b, nc] = last_prompt
            off += n
    q_owner, kv_owner = owner[:, :, None], owner[:, None, :]
    q_kind, kv_kind = kind[:, :, None], kind[:, None, :]
    mask = torch.ones(t, t, dtype=torch.bool).tril() & (q_owner == kv_owner) & (q_owner != 0)
    mask &= ~((q_kind == 2) & (kv_kind == 1))
    mask |= torch.eye(t, dtype=torch.bool)  # padding attends to itself: no all-masked row (NaN in sdpa)
    return PackedPairBatch(input_ids, position_ids, mask[:, None], targets, source, segment, int((owner != 0).sum()))
