"""Log-probs of responses under a model: the one scoring path of every stage.

reference and dpo score preference pairs with `pair_logps` (one shared-prompt row per pair where the
model allows it), sft and evaluate take token NLLs with `batch_nll`, evaluate scores its own samples with
`response_logps`. Every function returns per-sequence sums and token counts, so callers normalise as their
objective needs. Inputs are the token lists of `core/tokens.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from components.core.tokens import (
    IGNORE_INDEX,
    collate_groups,
    collate_pairs,
    collate_sequences,
    collate_shared_prompt,
    prompt_response_to_sequence,
)
from components.core.training import autocast


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the labelled tokens of each row, and how many there are.

    logits: (B, T, V) from the model on input_ids; labels: (B, T) with IGNORE_INDEX where unscored.
    Returns (logps (B,), counts (B,)). Computed in float32 via cross_entropy, which never
    materialises the (B, T, V) log-softmax.
    """
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.clamp_min(0).reshape(-1),
        reduction="none",
    ).view(targets.shape)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def shared_prompt_supported(model) -> bool:
    """The shared-prompt layout needs a custom 4D mask (sdpa/eager attention) and `logits_to_keep`."""
    import inspect

    base = getattr(model, "module", model)  # DDP: the wrapper has no `config`
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None)
    return impl in ("sdpa", "eager") and "logits_to_keep" in inspect.signature(base.forward).parameters


def _shared_prompt_logps(model, pairs: list[dict], pad_id: int, device):
    batch = collate_shared_prompt(pairs, pad_id)
    mask = batch.attention_mask.to(device)
    if getattr(model, "module", model).config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    logits = model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                   attention_mask=mask, logits_to_keep=batch.keep).logits  # (B, K + 1, V)
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)  # (B, K + 1)
    targets, source, segment = batch.targets.to(device), batch.source.to(device), batch.segment.to(device)
    rows = torch.arange(len(pairs), device=device)[:, None]
    token_logps = logits[rows, source, targets.clamp_min(0)] - log_z[rows, source]  # (B, K)
    chosen, rejected = segment == 1, segment == 2
    return ((token_logps * chosen).sum(-1), (token_logps * rejected).sum(-1), chosen.sum(-1), rejected.sum(-1))


def pair_logps(model, pairs: list[dict], pad_id: int, device, share_prompt: bool | None = None):
    """Summed response log-probs and token counts of chosen and rejected, in one forward pass.

    Returns (chosen_logps (B,), rejected_logps (B,), chosen_tokens (B,), rejected_tokens (B,)).
    With `share_prompt` (default: when the model supports it) each pair is one row whose prompt is
    computed once and the LM head runs on response positions only; otherwise chosen and rejected are
    stacked as 2B padded rows (DPO reference implementation's `concatenated_inputs`). Same numbers
    either way, up to float rounding (tested).
    """
    if share_prompt is None:
        share_prompt = shared_prompt_supported(model)
    if share_prompt:
        return _shared_prompt_logps(model, pairs, pad_id, device)
    batch = collate_pairs(pairs, pad_id).to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (2B, T, V)
    logps, counts = sequence_logps(logits, batch.labels)
    b = len(pairs)
    return logps[:b], logps[b:], counts[:b], counts[b:]


def batch_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL over labelled tokens of the batch, and the number of those tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    logps, counts = sequence_logps(logits, batch.labels)
    return -logps.sum(), counts.sum()


@torch.no_grad()
def preference_logps(model, pairs: list[dict], batch_size: int, pad_id: int, mixed_precision: str = "auto"):
    """Summed response log-probs of every pair, in input order, scored exactly as the reference stage does
    (tokens.tokenize_pair + pair_logps). Returns (chosen (N,), rejected (N,), chosen_tokens (N,),
    rejected_tokens (N,))."""
    device = next(model.parameters()).device
    columns: list[list[torch.Tensor]] = [[], [], [], []]
    for start in range(0, len(pairs), batch_size):
        with autocast(device, mixed_precision):
            outputs = pair_logps(model, pairs[start : start + batch_size], pad_id, device)
        for column, t in zip(columns, outputs, strict=True):
            column.append(t.cpu())
    chosen, rejected, chosen_tokens, rejected_tokens = (torch.cat(c) for c in columns)
    return chosen.float(), rejected.float(), chosen_tokens, rejected_tokens


@torch.no_grad()
def response_logps(model, prompt_ids: list[list[int]], response_ids: list[list[int]], batch_size: int,
                   pad_id: int, mixed_precision: str = "auto") -> torch.Tensor:
    """log pi(y|x) summed over response tokens, per (prompt, response); (N,)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [prompt_response_to_sequence(p, r) for p, r in
                zip(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], strict=True)]
        batch = collate_sequences(seqs, pad_id).to(device)
        with autocast(device, mixed_precision):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        out.append(sequence_logps(logits, batch.labels)[0].cpu())
    return torch.cat(out) if out else torch.zeros(0)


def completion_token_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device,
                           temperature: float = 1.0, with_entropy: bool = False):
    """Per-token log-probs of each completion given its prompt, under logits / temperature (as sampled).

    Rows are [left-padded prompt | right-padded completion] (TRL's layout), position ids count real tokens
    only, and the LM head runs on the completion positions alone (`logits_to_keep`) when the model takes it.
    Returns (logps (B, C), mask (B, C) bool, entropy (B, C) or None), C = the longest completion. Entropy
    (of the tempered distribution, in nats) carries no gradient.
    """
    import inspect

    p_width = max(len(p) for p in prompt_ids)
    c_width = max(max(len(c) for c in completion_ids), 1)
    ids = torch.full((len(prompt_ids), p_width + c_width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        ids[i, p_width - len(p) : p_width] = torch.tensor(p)
        attn[i, p_width - len(p) : p_width] = True
        if c:
            ids[i, p_width : p_width + len(c)] = torch.tensor(c)
            attn[i, p_width : p_width + len(c)] = True
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
    ids, attn, positions = ids.to(device), attn.to(device), positions.to(device)
    base = getattr(model, "module", model)
    kwargs = {"logits_to_keep": c_width + 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    logits = model(input_ids=ids, attention_mask=attn.long(), position_ids=positions, **kwargs).logits
    logits = logits[:, -(c_width + 1) : -1, :].float()  # (B, C, V): position t predicts completion token t
    if temperature != 1.0:
        logits = logits / temperature
    targets = ids[:, p_width:]
    mask = attn[:, p_width:]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            logp_all = torch.log_softmax(logits, dim=-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return token_logps * mask, mask, entropy


def group_token_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[list[int]]], pad_id: int,
                      device, temperature: float = 1.0, with_entropy: bool = False):
    """completion_token_logps for G completions per prompt, with each prompt computed once (one row per group,
    `tokens.collate_groups`). Same returns, rows ordered group-major (group b, completion j -> row b*G + j);
    C = the longest completion. Falls back to separate rows when the model cannot take a 4D mask."""
    if not shared_prompt_supported(model):
        flat_prompts = [p for p, cs in zip(prompt_ids, completion_ids, strict=True) for _ in cs]
        return completion_token_logps(model, flat_prompts, [c for cs in completion_ids for c in cs], pad_id, device,
                                      temperature, with_entropy)
    batch = collate_groups(prompt_ids, completion_ids, pad_id)
    attn = batch.attention_mask.to(device)
    if getattr(model, "module", model).config._attn_implementation == "eager":  # eager adds the mask to the scores
        attn = torch.zeros(attn.shape, device=device).masked_fill(~attn, torch.finfo(torch.float32).min)
    logits = model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                   attention_mask=attn, logits_to_keep=batch.keep).logits.float()  # (B, K + 1, V)
    if temperature != 1.0:
        logits = logits / temperature
    rows = torch.arange(len(prompt_ids), device=device)[:, None]
    source, targets = batch.source.to(device), batch.targets.to(device)
    picked = logits[rows, source]  # (B, K, V): the distribution each slot's token was drawn from
    slot_logps = picked.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    index, mask = batch.index.to(device), batch.mask.to(device)
    token_logps = slot_logps.reshape(-1)[index] * mask
    entropy = None
    if with_entropy:
        with torch.no_grad():
            logp_all = torch.log_softmax(picked, dim=-1)
            entropy = (-(logp_all.exp() * logp_all).sum(-1)).reshape(-1)[index] * mask
    return token_logps, mask, entropy


# ----------------------------------------------------------------------------- the reference artifact


class StaleReferenceError(ValueError):
    """The cached reference log-probs do not belong to the pairs being trained (other ids or other tokens)."""


def load_reference_logps(path: str | Path) -> dict:
    """{id: (chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, token_hash)} from one split file
    (token_hash is None in artifacts written before it was recorded)."""
    data = torch.load(path, weights_only=True)
    hashes = data.get("token_hashes") or [None] * len(data["ids"])
    return {
        i: (c, r, ct, rt, h)
        for i, c, r, ct, rt, h in zip(
            data["ids"], data["chosen_logps"].tolist(), data["rejected_logps"].tolist(),
            data["chosen_tokens"].tolist(), data["rejected_tokens"].tolist(), hashes, strict=True,
        )
    }
