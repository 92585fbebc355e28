"""SFT sequence packing without padding between examples (`sft.packing`): several examples per row, each
with its own position ids (restarting at 0) and a block-diagonal causal 4D mask, so every token attends to its
own example only and the loss is exactly that of one row per example, with fewer rows and no padding inside.

`pack_rows` fills rows of at most `max_length` tokens first-fit, in the given order; `collate_packed` builds the
batch. The first token of each example gets no label: no example is trained to follow the one before it.
On the CPU / sdpa path the mask is materialised (B, 1, T, T); models with sliding-window layers, whose
per-layer masks a custom 4D mask would override, fall back to one row per example.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from components.core.data.tokens import IGNORE_INDEX, TokenBatch


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices per row, first fit in order; an example longer than max_length gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def collate_packed(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, max_length: int) -> TokenBatch:
    """(input_ids, labels) examples packed into rows: TokenBatch with position_ids and a (B, 1, T, T) bool mask."""
    rows = pack_rows([len(s[0]) for s in seqs], max_length)
    t = max(sum(len(seqs[i][0]) for i in row) for row in rows)
    b = len(rows)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    segment = torch.zeros((b, t), dtype=torch.long)  # 0 padding, k + 1 the row's k-th example
    for r, row in enumerate(rows):
        off = 0
        for k, i in enumerate(row):
            ids, lab = seqs[i]
            n = len(ids)
            input_ids[r, off : off + n] = torch.as_tensor(ids)
            labels[r, off : off + n] = torch.as_tensor(lab)
            labels[r, off] = IGNORE_INDEX  # predicted from the previous example's last token: never trained
            position_ids[r, off : off + n] = torch.arange(n)
            segment[r, off : off + n] = k + 1
            off += n
    q, kv = segment[:, :, None], segment[:, None, :]
    mask = torch.ones(t, t, dtype=torch.bool).tril() & (q == kv) & (q != 0)
    mask |= torch.eye(t, dtype=torch.bool)  # padding attends to itself: no all-masked row (NaN in sdpa)
    return TokenBatch(input_ids, mask[:, None], labels, position_ids, int((segment != 0).sum()))
