"""The math of online RL with verifiable rewards (GRPO and its fixes), as pure tensor functions.

Names and formulas follow the papers and TRL 1.16's `GRPOTrainer`, so a number here means what it means
there (parity tested in tests/unit/test_rl.py):
- group-relative advantages (GRPO, arXiv:2402.03300): A_i = r_i - mean(group), divided by the group's std
  (`scale_rewards="group"`), by the whole batch's std (`"batch"`, Dr. GRPO's recommendation against the
  difficulty bias, arXiv:2503.20783, and TRL's), or not at all (`"none"`); std is unbiased, + 1e-4;
- the clipped surrogate with separate low / high clip ranges (DAPO's clip-higher, arXiv:2503.14476);
- the k3 estimator of KL(pi || ref) per token, exp(ref - logp) - (ref - logp) - 1 (Schulman, 2020);
- loss aggregation: `grpo` (mean over sequences of each one's token mean), `bnpo` (token mean of each
  micro-batch), `dr_grpo` (token sum / (sequences x max_completion_length)), `dapo` (token sum / tokens
  of the whole accumulated global batch).

The aggregations are written as each micro-batch's *share* of the global step's loss (`Totals` holds the
global counts), so summing the shares over micro-batches and processes gives the global loss exactly,
whatever the micro-batch size or the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
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


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: LossType, totals: Totals) -> torch.Tensor:
    """This micro-batch's share of the step's loss (a scalar); the shares of all micro-batches sum to it."""
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / totals.sequences
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / totals.micro_batches
    if loss_type == "dr_grpo":
        return masked.sum() / (totals.sequences * totals.max_completion_length)
    if loss_type == "dapo":
        return masked.sum() / max(totals.tokens, 1)
    raise ValueError(f"loss_type={loss_type!r}: expected grpo, bnpo, dr_grpo or dapo")


def clip_fractions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                   epsilon_high: float) -> dict[str, torch.Tensor]:
    """Token counts (sums over the mask) where the clip was active, as TRL counts them: low when the ratio fell
    below 1 - eps_low with A < 0, high when it rose above 1 + eps_high with A > 0."""
    adv = advantages.unsqueeze(1)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    m = mask.bool()
    return {"clip_ratio/low": (low & m).sum().float(), "clip_ratio/high": (high & m).sum().float(),
            "clip_ratio/region": ((low | high) & m).sum().float()}
