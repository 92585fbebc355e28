"""Log-probs of responses under a model: the one scoring path of every stage.

reference and dpo score preference pairs with `pair_logps` (one shared-prompt row per pair where the
model allows it, or padding-free rows of pairs end to end), sft and evaluate take token NLLs with `batch_nll`,
evaluate scores its own samples with `response_logps`. Every function returns per-sequence sums and token counts, so callers normalise as their
objective needs. Inputs are the token lists of `core/data/tokens.py`.

Memory: the model runs with `logits_to_keep=1` and its final hidden states are taken from the decoder;
log-probs come from `model/chunked_logps.chunked_token_logps` on the scored positions only, so no fp32 (B, T, V)
logits exist in forward or backward (at a 150k vocabulary that copy was the largest tensor of a step). Models
whose decoder cannot be reached take the plain logits path (`sequence_logps`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from components.core.data.pair_packing import collate_packed_pairs
from components.core.data.tokens import (
    IGNORE_INDEX,
    collate_groups,
    collate_pairs,
    collate_sequences,
    collate_shared_prompt,
    prompt_response_to_sequence,
)
from components.core.model.loading import autocast


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


def unwrapped(model):
    """The HF model behind DDP (`.module`) and peft (`get_base_model`) wrappers."""
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def hidden_path_supported(model) -> bool:
    """Whether final hidden states can be taken from the decoder (HF causal LMs: `get_decoder`, an output
    embedding without bias, `logits_to_keep`); else callers use the model's logits."""
    import inspect

    base = unwrapped(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return (hasattr(base, "get_decoder") and isinstance(head, torch.nn.Linear) and head.bias is None
            and "logits_to_keep" in inspect.signature(getattr(model, "module", model).forward).parameters)


def final_hidden(model, **inputs) -> torch.Tensor:
    """(B, T, H) post-final-norm hidden states of a forward through the (possibly wrapped) model.

    The forward goes through the wrapper (DDP / FSDP hooks run as usual) with `logits_to_keep=1`, so the LM
    head runs on one position only; a forward hook on the decoder captures its `last_hidden_state`.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = unwrapped(model).get_decoder().register_forward_hook(hook)
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def slot_logps(model, hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, with_entropy: bool = False):
    """log p(targets[b, k] | hidden[b, positions[b, k]]) for the real slots (mask) of each row.

    hidden (B, T, H); positions, targets, mask (B, K). Only the N real slots reach the LM head, chunked
    (`core/logprobs.chunked_token_logps`). Returns (logps (B, K) float32, 0 where masked; entropy (B, K) or None).
    """
    from components.core.model.chunked_logps import chunked_token_logps

    rows, cols = mask.nonzero(as_tuple=True)
    h = hidden[rows, positions[rows, cols]]  # (N, H)
    weight = unwrapped(model).get_output_embeddings().weight
    logps, entropy = chunked_token_logps(h, weight, targets[rows, cols].clamp_min(0), temperature=temperature,
                                         with_entropy=with_entropy)
    out = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).index_put((rows, cols), logps)
    if entropy is not None:
        entropy = torch.zeros(mask.shape, dtype=entropy.dtype, device=entropy.device).index_put((rows, cols), entropy)
    return out, entropy


def model_sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                         position_ids: torch.Tensor | None = None):
    """`sequence_logps` of a forward on (input_ids, attention_mask[, position_ids]): (logps (B,), counts (B,)).
    A 4D bool mask (packed rows) is passed as the model's attention takes it."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if attention_mask.dim() == 4:
        inputs["attention_mask"] = attention_mask_for(model, attention_mask)
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if not hidden_path_supported(model):
        return sequence_logps(model(**inputs).logits, labels)
    hidden = final_hidden(model, **inputs)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    positions = torch.arange(targets.shape[1], device=targets.device).expand_as(targets)
    logps, _ = slot_logps(model, hidden, positions, targets, mask)
    return logps.sum(-1), mask.sum(-1)


def attention_mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    """A bool 4D mask as the model's attention takes it: eager adds the mask to the scores (0 / -inf)."""
    if getattr(model, "module", model).config._attn_implementation == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def shared_prompt_supported(model) -> bool:
    """The shared-prompt layout needs a custom 4D mask (sdpa/eager attention) and `logits_to_keep`."""
    import inspect

    base = getattr(model, "module", model)  # DDP: the wrapper has no `config`
    config = getattr(base, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return (impl in ("sdpa", "eager") and "logits_to_keep" in inspect.signature(base.forward).parameters
            and not uses_sliding_window(config))


def uses_sliding_window(config) -> bool:
    """Sliding-window layers (Mistral, Gemma-2/3, Qwen2 with use_sliding_window) build their own per-layer mask,
    which one custom 4D mask would override: such models score chosen and rejected as separate rows."""
    if any("sliding" in str(t) for t in (getattr(config, "layer_types", None) or [])):
        return True
    return bool(getattr(config, "sliding_window", None)) and bool(getattr(config, "use_sliding_window", True))


def _slot_inputs(model, batch, device) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model inputs, targets, source, chosen, rejected) of a batch in the slot layout (`SharedPromptBatch` or
    `PackedPairBatch`): response slot k of pair b is token targets[b, k], predicted at position source[b, k]."""
    inputs = {"input_ids": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
              "attention_mask": attention_mask_for(model, batch.attention_mask.to(device))}
    segment = batch.segment.to(device)
    return inputs, batch.targets.to(device), batch.source.to(device), segment == 1, segment == 2


def _pair_sums(token_logps: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple:
    return ((token_logps * chosen).sum(-1), (token_logps * rejected).sum(-1), chosen.sum(-1), rejected.sum(-1))


def _shared_prompt_logps(model, pairs: list[dict], pad_id: int, device):
    batch = collate_shared_prompt(pairs, pad_id)
    inputs, targets, source, chosen, rejected = _slot_inputs(model, batch, device)
    if hidden_path_supported(model):
        hidden = final_hidden(model, **inputs)  # (B, T, H)
        # kept logit j of the logits_to_keep layout sits at position T - keep + j
        token_logps, _ = slot_logps(model, hidden, source + (hidden.shape[1] - batch.keep), targets, chosen | rejected)
    else:
        logits = model(**inputs, logits_to_keep=batch.keep).logits.float()  # (B, K + 1, V)
        log_z = torch.logsumexp(logits, dim=-1)  # (B, K + 1)
        rows = torch.arange(len(pairs), device=device)[:, None]
        token_logps = logits[rows, source, targets.clamp_min(0)] - log_z[rows, source]  # (B, K)
    return _pair_sums(token_logps, chosen, rejected)


def _packed_pair_logps(model, pairs: list[dict], pad_id: int, device, max_tokens: int | None):
    """`_shared_prompt_logps` on the padding-free layout (`core/data/pair_packing.py`): the same slots, read
    from the hidden states of all rows flattened, so the per-pair sums are the padded ones up to rounding."""
    batch = collate_packed_pairs(pairs, pad_id, max_tokens)
    inputs, targets, source, chosen, rejected = _slot_inputs(model, batch, device)
    if hidden_path_supported(model):
        hidden = final_hidden(model, **inputs)  # (R, T, H)
        flat = hidden.reshape(1, -1, hidden.shape[-1]).expand(len(pairs), -1, -1)  # a view: (B, R * T, H)
        token_logps, _ = slot_logps(model, flat, source, targets, chosen | rejected)
    else:
        logits = model(**inputs).logits  # (R, T, V): this path has no logits_to_keep to narrow it
        picked = logits.reshape(-1, logits.shape[-1])[source].float()  # (B, K, V)
        token_logps = (picked.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
                       - torch.logsumexp(picked, dim=-1))  # (B, K)
    return _pair_sums(token_logps, chosen, rejected)


def pair_logps(model, pairs: list[dict], pad_id: int, device, share_prompt: bool | None = None,
               padding_free: bool = False, max_tokens: int | None = None):
    """Summed response log-probs and token counts of chosen and rejected, in one forward pass.

    Returns (chosen_logps (B,), rejected_logps (B,), chosen_tokens (B,), rejected_tokens (B,)).
    With `share_prompt` (default: when the model supports it) each pair is one row whose prompt is
    computed once and the LM head runs on response positions only; otherwise chosen and rejected are
    stacked as 2B padded rows (DPO reference implementation's `concatenated_inputs`). `padding_free` (with
    share_prompt) lays the pairs end to end instead, without padding between them, in rows of at most
    `max_tokens` (default: the longest pair's length; `core/data/pair_packing.py`). Same numbers every way, up
    to float rounding (tested).
    """
    if share_prompt is None:
        share_prompt = shared_prompt_supported(model)
    if share_prompt and padding_free:
        return _packed_pair_logps(model, pairs, pad_id, device, max_tokens)
    if share_prompt:
        return _shared_prompt_logps(model, pairs, pad_id, device)
    batch = collate_pairs(pairs, pad_id).to(device)
    logps, counts = model_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels,
                                         batch.position_ids)  # (2B,)
    b = len(pairs)
    return logps[:b], logps[b:], counts[:b], counts[b:]


def batch_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL over labelled tokens of the batch, and the number of those tokens."""
    logps, counts = model_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels,
                                         batch.position_ids)
    return -logps.sum(), counts.sum()


@torch.no_grad()
def preference_logps(model, pairs: list[dict], batch_size: int, pad_id: int, mixed_precision: str = "auto"):
    """Summed response log-probs of every pair, in input order, scored exactly as the reference stage does
    (the ids of token_store.load_pairs + pair_logps). Returns (chosen (N,), rejected (N,), chosen_tokens (N,),
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
            out.append(model_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels)[0].cpu())
    return torch.cat(out) if out else torch.zeros(0)


def completion_token_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device,
                           temperature: float = 1.0, with_entropy: bool = False):
    """Per-token log-probs of each completion given its prompt, under logits / temperature (as sampled).

    Rows are [left-padded prompt | right-padded completion] (TRL's layout), position ids count real tokens
    only, and the LM head runs on the completion positions alone (`logits_to_keep`) when the model takes it.
    Returns (logps (B, C), mask (B, C) bool, entropy (B, C) or None), C = the longest completion. Entropy
    (of the tempered distribution, in nats) carries no gradient.
    """
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
    targets = ids[:, p_width:]
    mask = attn[:, p_width:]
    inputs = {"input_ids": ids, "attention_mask": attn.long(), "position_ids": positions}
    if hidden_path_supported(model):
        hidden = final_hidden(model, **inputs)  # (B, T, H); position p_width - 1 + t predicts completion token t
        slot_positions = torch.arange(p_width - 1, p_width - 1 + c_width, device=device).expand_as(targets)
        token_logps, entropy = slot_logps(model, hidden, slot_positions, targets, mask, temperature, with_entropy)
        return token_logps, mask, entropy
    logits = model(**inputs).logits[:, p_width - 1 : -1, :].float()  # (B, C, V)
    if temperature != 1.0:
        logits = logits / temperature
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            logp_all = torch.log_softmax(logits, dim=-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
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
    inputs = {"input_ids": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
              "attention_mask": attention_mask_for(model, batch.attention_mask.to(device))}
    source, targets = batch.source.to(device), batch.targets.to(device)
    index, mask = batch.index.to(device), batch.mask.to(device)
    if hidden_path_supported(model):
        hidden = final_hidden(model, **inputs)  # (B, T, H); kept logit j sits at position T - keep + j
        slots, slot_entropy = slot_logps(model, hidden, source + (hidden.shape[1] - batch.keep), targets,
                                         targets != IGNORE_INDEX, temperature, with_entropy)  # (B, K)
        entropy = slot_entropy.reshape(-1)[index] * mask if with_entropy else None
        return slots.reshape(-1)[index] * mask, mask, entropy
    logits = model(**inputs, logits_to_keep=batch.keep).logits.float()  # (B, K + 1, V)
    if temperature != 1.0:
        logits = logits / temperature
    rows = torch.arange(len(prompt_ids), device=device)[:, None]
    picked = logits[rows, source]  # (B, K, V): the distribution each slot's token was drawn from
    slot_logps_ = picked.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    token_logps = slot_logps_.reshape(-1)[index] * mask
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
