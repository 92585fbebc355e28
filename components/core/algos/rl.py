"""The math of online RL as pure tensor functions: the GRPO family (GRPO, Dr. GRPO, DAPO) and classic RLHF
(PPO's GAE, clipped policy and value losses, RLOO's leave-one-out baseline, the adaptive KL controller).

Names and formulas follow the papers and TRL (1.16's `GRPOTrainer`; the PPO/RLOO trainers of TRL 0.26), so a
number here means what it means there (parity tested in tests/unit/algos/test_rl.py). GRPO family:
- group-relative advantages (GRPO, arXiv:2402.03300): A_i = r_i - mean(group), divided by the group's std
  (`scale_rewards="group"`), by the whole batch's std (`"batch"`, Dr. GRPO's recommendation against the
  difficulty bias, arXiv:2503.20783, and TRL's), or not at all (`"none"`); std is unbiased, + 1e-4;
- the clipped surrogate with separate low / high clip ranges (DAPO's clip-higher, arXiv:2503.14476);
- the k3 estimator of KL(pi || ref) per token, exp(ref - logp) - (ref - logp) - 1 (Schulman, 2020);
- loss aggregation: `grpo` (mean over sequences of each one's token mean), `bnpo` (token mean of each
  micro-batch), `dr_grpo` (token sum / (sequences x max_completion_length)), `dapo` (token sum / tokens
  of the whole accumulated global batch);
- TRL 1.16's newer objectives (`policy_surrogate`): `cispo` (MiniMax-M1, arXiv:2506.13585: the importance weight
  clipped at epsilon_high and detached, times A times the log-prob; aggregated as dapo), `sapo` (arXiv:2511.20347:
  a sigmoid gate 4/tau * sigmoid(tau (w - 1)) instead of the hard clip, tau by the advantage's sign; aggregated as
  grpo), `luspo` (arXiv:2602.05261: GSPO's sequence loss times the sequence's length: token sum / sequences);
  and GSPO's sequence-level importance weight (arXiv:2507.18071, `importance_sampling_level="sequence"`):
  w = exp(mean over the sequence's tokens of log pi - log pi_old), one weight per sequence;
- online DPO (`online_dpo`, TRL's experimental OnlineDPOTrainer, arXiv:2402.04792): each group's best and worst
  completion by reward (`best_worst`) are a preference pair judged on the fly, and the sigmoid DPO loss
  -log sigma(dpo_beta * ((log pi - log ref)(best) - (log pi - log ref)(worst))) is averaged over the step's pairs;
  a group whose rewards are all equal makes no pair.

The aggregations are written as each micro-batch's *share* of the global step's loss (`Totals` holds the
global counts), so summing the shares over micro-batches and processes gives the global loss exactly,
whatever the micro-batch size or the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "online_dpo"]
ImportanceLevel = Literal["token", "sequence"]
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def unbiased_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """torch.std with Bessel's correction; 0 (not NaN) for a single element."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros(()) if dim is None else torch.zeros(x.shape[:dim] + x.shape[dim + 1 :])
    return x.std() if dim is None else x.std(dim=dim)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages (N,) and each item's group std (N,) from rewards (N,), groups of `group_size` consecutive items.

    The group std is returned whatever `scale` is: a zero-std group carries no learning signal (every
    advantage is 0), which frac_reward_zero_std reports and DAPO's dynamic sampling filters on.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    group_std = unbiased_std(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std + STD_EPS)
    elif scale == "batch":
        advantages = advantages / (unbiased_std(rewards) + STD_EPS)
    elif scale != "none":
        raise ValueError(f"scale_rewards={scale!r}: expected group, batch or none")
    return advantages, group_std


def zero_std_groups(group_std: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N / group_size,) bool: the groups whose rewards are all equal (TRL's isclose(std, 0))."""
    per_group = group_std.view(-1, group_size)[:, 0]
    return torch.isclose(per_group, torch.zeros_like(per_group))


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass(frozen=True)
class Totals:
    """Global counts of one optimizer step (all micro-batches, all processes)."""

    sequences: int
    tokens: int
    micro_batches: int
    max_completion_length: int
    pairs: int = 0  # online_dpo: the preference pairs (groups with reward variance)


@dataclass
class SurrogateOutput:
    per_token_loss: torch.Tensor  # (B, T), before masking
    ratio: torch.Tensor  # (B, T) pi / pi_old
    per_token_kl: torch.Tensor | None  # (B, T) when beta > 0


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> SurrogateOutput:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3 per token.

    logps, old_logps, ref_logps: (B, T) per-token log-probs of the completion tokens; advantages (B,).
    """
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(ratio * adv, clipped * adv)
    per_token_kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        per_token_kl = k3_kl(logps, ref_logps)
        per_token_loss = per_token_loss + beta * per_token_kl
    return SurrogateOutput(per_token_loss, ratio, per_token_kl)


@dataclass(frozen=True)
class Objective:
    """The policy loss of the GRPO family, as grpo's params choose it (`Objective.of(cfg)`)."""

    loss_type: LossType = "dapo"
    level: ImportanceLevel = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    sapo_temperatures: tuple[float, float] = (1.0, 1.05)  # (positive advantage, non-positive advantage)
    dpo_beta: float = 0.1  # online_dpo
    group_size: int = 1  # online_dpo: G, the completions of one prompt (consecutive rows)

    @classmethod
    def of(cls, cfg) -> Objective:
        return cls(cfg.loss_type, cfg.importance_sampling_level, cfg.epsilon_low, cfg.epsilon_high, cfg.beta,
                   (cfg.sapo_temperature_pos, cfg.sapo_temperature_neg), cfg.dpo_beta, cfg.num_generations)


def best_worst(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """online_dpo's "advantages": +1 for each group's best completion, -1 for its worst (the first of equals), 0 for
    the others and for every completion of a group whose rewards are all equal (no pair)."""
    grouped = rewards.view(-1, group_size)
    out = torch.zeros_like(grouped)
    has_pair = grouped.max(dim=1).values > grouped.min(dim=1).values
    rows = torch.arange(grouped.shape[0])
    out[rows, grouped.argmax(dim=1)] = 1.0
    out[rows, grouped.argmin(dim=1)] = -1.0
    return (out * has_pair[:, None]).view(-1)


def advantages_of(loss_type: LossType, rewards: torch.Tensor, group_size: int,
                  scale: ScaleRewards) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, group std) of a round: group-relative, or online_dpo's best / worst marks."""
    advantages, group_std = group_advantages(rewards, group_size, scale)
    return (best_worst(rewards, group_size), group_std) if loss_type == "online_dpo" else (advantages, group_std)


def importance_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                       level: ImportanceLevel) -> torch.Tensor:
    """pi / pi_old per token (B, T), or GSPO's per sequence (B, 1): exp of the mean log-ratio over its tokens."""
    log_ratio = logps - old_logps
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        m = mask.to(log_ratio.dtype)
        return torch.exp((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level={level!r}: expected token or sequence")


def policy_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     objective: Objective, ref_logps: torch.Tensor | None = None) -> SurrogateOutput:
    """The per-token policy loss (B, T) of `objective` (before masking and aggregation), as TRL 1.16's
    GRPOTrainer._compute_loss computes it, plus beta * k3 KL; `ratio` is the importance weight per token (a
    sequence-level weight repeated over the sequence's tokens)."""
    o = objective
    if o.loss_type == "online_dpo":
        return online_dpo_loss(logps, advantages, mask, o, ref_logps)
    coef = importance_weights(logps, old_logps, mask, o.level)
    adv = advantages.unsqueeze(1)
    if o.loss_type == "cispo":
        per_token_loss = -torch.clamp(coef, max=o.epsilon_high).detach() * adv * logps
    elif o.loss_type == "sapo":
        tau = torch.where(adv > 0, o.sapo_temperatures[0], o.sapo_temperatures[1])
        per_token_loss = -(torch.sigmoid(tau * (coef - 1)) * 4 / tau) * adv
    else:
        per_token_loss = -torch.min(coef * adv, torch.clamp(coef, 1 - o.epsilon_low, 1 + o.epsilon_high) * adv)
    per_token_loss = per_token_loss.expand_as(logps)
    per_token_kl = None
    if o.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        per_token_kl = k3_kl(logps, ref_logps)
        per_token_loss = per_token_loss + o.beta * per_token_kl
    return SurrogateOutput(per_token_loss, coef.expand_as(logps), per_token_kl)


def online_dpo_loss(logps: torch.Tensor, marks: torch.Tensor, mask: torch.Tensor, objective: Objective,
                    ref_logps: torch.Tensor | None) -> SurrogateOutput:
    """The sigmoid DPO loss of each group's pair (marks: `best_worst`, rows grouped by `objective.group_size`), put on
    the first token of its best completion (zeros elsewhere), so that `aggregate` sums it over the step's pairs."""
    if ref_logps is None:
        raise ValueError("online_dpo needs the reference log-probs")
    m = mask.to(logps.dtype)
    log_ratio = ((logps - ref_logps) * m).sum(-1)  # (B,) log pi/ref of each completion
    margin = (marks * log_ratio).view(-1, objective.group_size).sum(-1)  # best - worst, per group
    has_pair = (marks.view(-1, objective.group_size) > 0).any(-1)
    group_loss = -torch.nn.functional.logsigmoid(objective.dpo_beta * margin) * has_pair
    per_token_loss = torch.zeros_like(logps)
    per_token_loss[:, 0] = group_loss.repeat_interleave(objective.group_size) * (marks > 0)
    return SurrogateOutput(per_token_loss, torch.ones_like(logps), None)


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: LossType, totals: Totals) -> torch.Tensor:
    """This micro-batch's share of the step's loss (a scalar); the shares of all micro-batches sum to it."""
    if loss_type == "online_dpo":  # one value per pair, already in place (online_dpo_loss)
        return per_token_loss.sum() / max(totals.pairs, 1)
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / totals.sequences
    if loss_type == "luspo":
        return masked.sum() / totals.sequences
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / totals.micro_batches
    if loss_type == "dr_grpo":
        return masked.sum() / (totals.sequences * totals.max_completion_length)
    if loss_type in ("dapo", "cispo"):
        return masked.sum() / max(totals.tokens, 1)
    raise ValueError(f"loss_type={loss_type!r}: expected grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo or online_dpo")


def behaviour_weights(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                      clip_min: float | None, clip_max: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The correction for completions another policy sampled (TRL 1.16's vLLM importance sampling; here an
    asynchronous round's older weights): pi_old / pi_sampler per token (`token_*`) or per sequence (`sequence_*`,
    the exp of the summed log-ratio), clamped to [clip_min, clip_max] (`*_truncate`) or zeroed outside it
    (`*_mask`). Returns (weights, (B, T) or (B, 1), multiplying the per-token loss; (B, T) bool: the counted tokens
    whose ratio was cut)."""
    diff = torch.nan_to_num((old_logps - sampler_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    outside = (ratio < lo) | (ratio > hi)
    if mode.endswith("truncate"):
        weights = ratio if clip_min is None and clip_max is None else ratio.clamp(min=clip_min, max=clip_max)
    elif mode.endswith("mask"):
        weights = ratio.masked_fill(outside, 0.0)
    else:
        raise ValueError(f"is_correction_mode={mode!r}: expected token_truncate, token_mask, sequence_truncate or "
                         "sequence_mask")
    return weights, outside.expand_as(mask) & mask.bool()


def correct_off_policy(out: SurrogateOutput, old_logps: torch.Tensor, sampled: list[list[float]], mask: torch.Tensor,
                       cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """An asynchronous round's per-token loss (not its KL term, as TRL) times `behaviour_weights` against the
    sampler's log-probs (`sampled`, one list per row), in place on `out`; cfg: grpo's section. Returns the weights
    and the cut tokens, for the metrics."""
    weights, cut = behaviour_weights(old_logps, padded(sampled, old_logps), mask, cfg.is_correction_mode,
                                     cfg.is_clip_min, cfg.is_clip_max)
    kl = 0.0 if out.per_token_kl is None else cfg.beta * out.per_token_kl
    out.per_token_loss = (out.per_token_loss - kl) * weights + kl
    return weights.expand_as(mask), cut


def padded(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-row values (completions' log-probs as sampled) as a zero-padded tensor shaped and placed as `like`."""
    out = torch.zeros_like(like)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=like.dtype)
    return out


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                   epsilon_high: float, cispo: bool = False) -> dict[str, torch.Tensor]:
    """Token counts (sums over the mask) where the clip was active, as TRL counts them: low when the ratio fell
    below 1 - eps_low with A < 0, high when it rose above 1 + eps_high with A > 0 (cispo: above eps_high itself,
    its only clip)."""
    adv = advantages.unsqueeze(1)
    low = (ratio < 1 - epsilon_low) & (adv < 0) & (not cispo)
    high = (ratio > (epsilon_high if cispo else 1 + epsilon_high)) & (adv > 0)
    m = mask.bool()
    return {"clip_ratio/low": (low & m).sum().float(), "clip_ratio/high": (high & m).sum().float(),
            "clip_ratio/region": ((low | high) & m).sum().float()}


# ----------------------------------------------------------------------------- classic RLHF: PPO and RLOO
# As TRL's PPOTrainer (experimental since 0.20) and RLOOTrainer define them; hand-computed tests in tests/unit/algos/test_rl.py.


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, variance with Bessel's correction (TRL's
    masked_whiten); shift_mean=False adds the mean back (whitening the scale only, as for rewards)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1.0)
    var = (((x - mean) ** 2) * mask).sum() / n.clamp(min=1.0)
    if n > 1:
        var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate on the sampled tokens: k1 = logp - ref (unbiased, can be negative),
    k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        return k3_kl(logps, ref_logps)
    raise ValueError(f"kl_estimator={estimator!r}: expected k1 or k3")


def ppo_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B, T) PPO rewards: -kl_coef * KL_t at every response token, plus the sequence score at its last token."""
    rewards = -kl_coef * kl * mask
    last = (mask.long().sum(-1) - 1).clamp(min=0)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) response tokens (Schulman et al. 2016):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V = 0 and A = 0 past the end.
    Returns (advantages, returns = advantages + values), both 0 past each sequence's end."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def ppo_policy_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped policy loss max(-A r, -A clip(r, 1 ± eps)) and whether the clip was active."""
    ratio = torch.exp(logps - old_logps)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.max(loss1, loss2), (loss2 > loss1)


def ppo_value_losses(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                     cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, ± eps_v),
    and whether the clipped term was the larger."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    return 0.5 * torch.max(loss1, loss2), (loss2 > loss1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each sample's reward minus the mean of the other G - 1 in its group."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


class AdaptiveKLController:
    """Ziegler et al. 2019: kl_coef *= 1 + clip(KL / target - 1, ±0.2) * n_steps / horizon after each batch."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
