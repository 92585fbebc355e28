"""Scalar heads: reward models and value models, a linear head on a decoder.

Both are Hugging Face `AutoModelForSequenceClassification` checkpoints with one label (the layout TRL's
`RewardTrainer` writes and every reward model on the hub uses), so a reward model trained here loads in TRL,
OpenRLHF or `evaluate.judge: reward_model`, and the same class serves PPO's value model. The head scores every
position; a reward model is read at the last token of a sequence, a value model at every token.

The model is always called through its own forward (so DDP sees the call); a hook on the head keeps the
per-token scores (B, T) that the class would otherwise pool away. The Bradley-Terry loss and the calibration
of a reward model are here too, as pure functions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from components.core.data.tokens import collate_groups, collate_shared_prompt, pad_right
from components.core.model.loading import enable_gradient_checkpointing
from components.core.model.logprobs import attention_mask_for, unwrapped, uses_sliding_window

log = logging.getLogger("alignflow.heads")


def score_head(model) -> torch.nn.Module:
    """The head of a sequence-classification model (`score` in Llama, Qwen2, Mistral, Gemma, GPT-2; `classifier` in
    some encoders)."""
    base = unwrapped(model)
    for name in ("score", "classifier", "v_head"):
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(base).__name__}: no score head (score / classifier) to read per-token scores from")


def load_scorer(path: str, trust_remote_code: bool = False, *, pad_token_id: int | None = None, frozen: bool = False,
                dtype: torch.dtype = torch.float32, gradient_checkpointing: bool | str = False):
    """A one-label sequence-classification model from `path`: a reward model as it is, or a causal LM (the SFT
    model) with a freshly initialised head (seed torch first for a reproducible head)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized: score.weight" is the point when starting from an LM
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                   trust_remote_code=trust_remote_code)
    finally:
        transformers.logging.set_verbosity(level)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    if frozen:
        return model.requires_grad_(False).eval()
    enable_gradient_checkpointing(model, gradient_checkpointing)
    return model


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) head output at every position (a right-padded batch, or any layout with its mask and positions)."""
    captured = {}

    def keep(_module, _inputs, output):
        captured["scores"] = output

    handle = score_head(model).register_forward_hook(keep)
    try:
        extra = {} if position_ids is None else {"position_ids": position_ids}
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    finally:
        handle.remove()
    return captured["scores"].squeeze(-1).float()


def sequence_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device):
    """Right-padded prompt + response rows: (input_ids, attention_mask, prompt lengths, response lengths)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    ids = pad_right(seqs, pad_id).to(device)
    mask = pad_right([[1] * len(s) for s in seqs], 0).to(device)
    return ids, mask, [len(p) for p in prompts], [len(r) for r in responses]


def end_scores(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
               device) -> torch.Tensor:
    """(B,) the score at the last token of each prompt + response (a reward model's reward)."""
    ids, mask, p_len, r_len = sequence_batch(prompts, responses, pad_id, device)
    scores = token_scores(model, ids, mask)
    last = torch.tensor([p + r - 1 for p, r in zip(p_len, r_len, strict=True)], device=scores.device)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)


def shared_rows_supported(model) -> bool:
    """Chosen and rejected behind one prompt need a custom 4D mask (sdpa / eager attention, no sliding windows)."""
    config = getattr(unwrapped(model), "config", None)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager") and not uses_sliding_window(config)


def pair_end_scores(model, pairs: Sequence[dict], pad_id: int, device,
                    share_prompt: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen (B,), r_rejected (B,)) of tokenised pairs in one forward.

    With the shared-prompt layout (tokens.collate_shared_prompt: one row [prompt | chosen | rejected], the
    rejected tokens masked from the chosen ones and positioned right after the prompt) the prompt is computed
    once per pair; otherwise 2B right-padded rows. Both read each response at its last token.
    """
    share = shared_rows_supported(model) if share_prompt is None else share_prompt
    if not share:
        prompts = [p["prompt_ids"] for p in pairs] * 2
        scores = end_scores(model, prompts, [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs],
                            pad_id, device)
        return scores[: len(pairs)], scores[len(pairs):]
    batch = collate_shared_prompt(pairs, pad_id)
    scores = token_scores(model, batch.input_ids.to(device), _attention(model, batch.attention_mask, device),
                          batch.position_ids.to(device))
    start = max(len(p["prompt_ids"]) for p in pairs)
    chosen_end = torch.tensor([start + len(p["chosen_ids"]) - 1 for p in pairs], device=scores.device)
    rejected_end = torch.tensor([start + len(p["chosen_ids"]) + len(p["rejected_ids"]) - 1 if p["rejected_ids"]
                                 else start - 1 for p in pairs], device=scores.device)  # empty: the prompt's end
    return (scores.gather(1, chosen_end.unsqueeze(1)).squeeze(1), scores.gather(1, rejected_end.unsqueeze(1)).squeeze(1))


def _attention(model, mask: torch.Tensor, device) -> torch.Tensor:
    return attention_mask_for(unwrapped(model), mask.to(device))


def group_end_scores(model, prompts: Sequence[Sequence[int]], grouped: Sequence[Sequence[Sequence[int]]], pad_id: int,
                     device) -> torch.Tensor:
    """(B * G,) end scores of G completions per prompt, group-major; with one row per group behind one copy of
    the prompt (tokens.collate_groups) when the model takes a 4D mask, else separate rows."""
    if not shared_rows_supported(model):
        return end_scores(model, [p for p, cs in zip(prompts, grouped, strict=True) for _ in cs],
                          [c for cs in grouped for c in cs], pad_id, device)
    batch = collate_groups(prompts, grouped, pad_id)
    scores = token_scores(model, batch.input_ids.to(device), _attention(model, batch.attention_mask, device),
                          batch.position_ids.to(device))
    start = max(len(p) for p in prompts)
    ends = []
    for cs in grouped:
        off = 0
        for c in cs:
            ends.append(start + off + len(c) - 1 if c else start - 1)
            off += len(c)
    rows = torch.arange(len(prompts), device=scores.device).repeat_interleave(len(grouped[0]))
    return scores[rows, torch.tensor(ends, device=scores.device)]


@torch.no_grad()
def batched_end_scores(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                       batch_size: int) -> list[float]:
    """end_scores over a whole list, batch by batch, on the model's device."""
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        out += end_scores(model, prompts[start : start + batch_size], responses[start : start + batch_size], pad_id,
                          device).tolist()
    return out


def response_values(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                    device) -> torch.Tensor:
    """(B, L) values V(s_t) of the state before each response token (the position that predicts it), as TRL's
    PPO reads `full_value[:, context_length - 1 : -1]`; 0 past a response's end (L = longest response)."""
    ids, mask, p_len, r_len = sequence_batch(prompts, responses, pad_id, device)
    scores = token_scores(model, ids, mask)
    width = max(r_len)
    pos = torch.tensor([[p - 1 + t for t in range(width)] for p in p_len], device=scores.device)
    valid = torch.tensor([[t < r for t in range(width)] for r in r_len], device=scores.device)
    pos = pos.clamp(max=scores.shape[1] - 1)
    return scores.gather(1, pos) * valid


# ----------------------------------------------------------------------------- reward-model math (pure)


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                         center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss as TRL's RewardTrainer defines it; its batch mean is TRL's loss:
    -log σ(r_c - r_r - margin) + coef * (r_c + r_r)^2 (the centring term keeps rewards near zero mean)."""
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return loss


def reliability(chosen: Sequence[float], rejected: Sequence[float], bins: int = 10) -> dict:
    """Calibration of a reward model on held-out pairs: p = σ(r_c - r_r) against how often the labelled order holds.

    Each pair is counted in both orders, (p, chosen preferred) and (1 - p, not), so the observed rate in a bin is
    a real frequency and a model that is always right but too unsure shows up below the diagonal's end. Returns
    the bins (edges, count, mean predicted, observed) and the expected calibration error (count-weighted |gap|).
    """
    diff = torch.tensor(chosen, dtype=torch.float64) - torch.tensor(rejected, dtype=torch.float64)
    p = torch.cat([torch.sigmoid(diff), torch.sigmoid(-diff)])
    outcome = torch.cat([torch.ones_like(diff), torch.zeros_like(diff)])
    index = torch.clamp((p * bins).long(), max=bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        if not n:
            continue
        predicted, observed = float(p[sel].mean()), float(outcome[sel].mean())
        out.append({"low": b / bins, "high": (b + 1) / bins, "count": n, "predicted": predicted, "observed": observed})
        ece += n * abs(predicted - observed)
    return {"bins": out, "ece": ece / max(len(p), 1)}
