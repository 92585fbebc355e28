"""Preference losses as small pure functions of per-sequence log-probs.

Every function takes summed log-probs of whole completions, shape (B,):

    policy_chosen_logps      log pi_theta(y_w | x)
    policy_rejected_logps    log pi_theta(y_l | x)
    reference_chosen_logps   log pi_ref(y_w | x)
    reference_rejected_logps log pi_ref(y_l | x)

plus, for the losses that average over tokens, the completion token counts `chosen_lengths` and
`rejected_lengths` (B,). Each returns a `LossOutput` whose `losses` are per example (the training
loss is `out.losses.mean()`) and whose rewards are detached and defined as TRL 1.16 defines them for
that loss, so logged metrics are comparable with TRL runs. Parity with TRL is checked in
tests/unit/test_losses.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from components.core.config import LOSSES

# Losses that never look at the reference model; the DPO stage can skip the reference pass for these.
REFERENCE_FREE = {"simpo", "orpo"}


@dataclass(frozen=True)
class LossOutput:
    losses: Tensor  # (B,) per-example loss, differentiable
    chosen_rewards: Tensor  # (B,) detached implicit reward of the chosen completion
    rejected_rewards: Tensor  # (B,) detached implicit reward of the rejected completion
    extra: dict[str, Tensor] = field(default_factory=dict)  # detached loss-specific metrics


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    # A zero-length completion would divide by zero; TRL clamps the count at 1 for the same reason.
    return logps / lengths.to(logps.dtype).clamp(min=1.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012), as TRL's ORPO."""
    # a mean log-prob of exactly 0 (P = 1) would give log(0) = -inf and a NaN loss: stay just below it
    x = x.clamp(max=-1e-6)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# --------------------------------------------------------------------------- DPO family (with reference)


def sigmoid_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7); cDPO when label_smoothing > 0.

        h      = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))       # (B,)
        loss   = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)     # (B,)

    eps = label_smoothing is the assumed probability that a preference label is flipped
    (conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences"); eps = 0 is DPO.
    TRL 1.16's DPOTrainer `sigmoid` branch has no label smoothing; the cDPO form above is the one
    TRL's CPOTrainer `sigmoid` and DPOTrainer `aot` branches still use.
    Rewards: beta * (policy - reference) on summed log-probs.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def robust_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), TRL `loss_type="robust"`.

        loss = [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)      # (B,)

    An unbiased estimate of the clean-label DPO loss when each label is flipped with probability
    eps in [0, 0.5). Unlike cDPO the flipped term enters with a minus sign, so the loss is not
    bounded below; the gradient is DPO's, re-weighted. h as in `sigmoid_dpo`.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_dpo needs label_smoothing in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    losses = (clean - flipped) / (1 - 2 * label_smoothing)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def hinge_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """SLiC-HF calibration hinge (Zhao et al. 2023, arXiv:2305.10425), TRL DPO `loss_type="hinge"`.

        loss = max(0, 1 - beta * h)                                                     # (B,)

    = beta * max(0, 1/beta - h): SLiC's rank-calibration hinge with margin delta = 1/beta, applied
    (as TRL does) to the reference-adjusted margin h rather than SLiC's raw log-likelihood margin.
    Zero loss and zero gradient once h >= 1/beta. h as in `sigmoid_dpo`.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))  # (B,)
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17; beta plays the paper's tau), TRL `ipo`.

        h_avg = (log pi(y_w) - log ref(y_w)) / |y_w| - (log pi(y_l) - log ref(y_l)) / |y_l|   # (B,)
        loss  = (h_avg - 1 / (2 beta))^2                                                     # (B,)

    The paper writes sequence-level log-ratios. TRL divides each by the completion length because
    summed log-ratios make the squared loss (and so the meaning of beta) scale with length; TRL's
    comment says the IPO authors confirmed this normalised form is what the paper's results used.
    We match TRL. The minimum is at h_avg = 1/(2 beta).
    Rewards (as TRL logs them): beta * (policy - reference) on *summed* log-probs.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) summed
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) summed
    h_avg = _per_token(chosen_logratios, chosen_lengths) - _per_token(rejected_logratios, rejected_lengths)
    losses = (h_avg - 1 / (2 * beta)) ** 2
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


# --------------------------------------------------------------------------- reference-free


def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6), TRL CPOTrainer `loss_type="simpo"`, `cpo_alpha=0`.

        r_w  = beta * log pi(y_w) / |y_w|,   r_l = beta * log pi(y_l) / |y_l|       # (B,) length-normalised
        z    = r_w - r_l - gamma                                                   # (B,) target margin gamma
        loss = -(1 - eps) log sigma(z) - eps log sigma(-z)                         # (B,)

    No reference model. TRL writes the margin as `simpo_gamma / beta` inside beta * (.), which is
    the same z. eps is TRL's optional label smoothing (0 in the paper).
    Rewards: r_w, r_l (beta times the per-token mean log-prob, as TRL's CPO logs them).
    """
    chosen_avg = _per_token(policy_chosen_logps, chosen_lengths)  # (B,)
    rejected_avg = _per_token(policy_rejected_logps, rejected_lengths)  # (B,)
    z = beta * (chosen_avg - rejected_avg) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return LossOutput(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())


def rpo_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """SFT term on the chosen completions (RPO, Pang et al. 2024, arXiv:2404.19733, eq. 5).

        nll_i = -log pi(y_w,i | x_i) / |y_w,i|                                      # (B,)

    Per-sequence length normalisation, as in the paper. TRL (DPO `loss_type=[..., "sft"]`, formerly
    `rpo_alpha`) instead pools all chosen tokens of the micro-batch (-sum_i log pi / sum_i |y_w,i|);
    that value depends on how a step's pairs are split into micro-batches and processes, so gradient
    accumulation and DDP would change the objective. Ours does not; the two agree when all chosen
    lengths in a batch are equal (tested against TRL's formula).
    """
    return -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1.0)


def orpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    alpha: float,
) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 6-7), TRL ORPOTrainer (`beta` there is our alpha).

        log P(y)  = log pi(y) / |y|                                                 # (B,) per-token mean
        log_odds  = (log P(y_w) - log P(y_l)) - (log(1 - P(y_w)) - log(1 - P(y_l)))    # (B,)
        loss      = nll(y_w) - alpha * log sigma(log_odds)                          # (B,)

    nll(y_w) is `rpo_nll`: the chosen response's per-token NLL, per sequence. TRL's ORPO pools the NLL
    over the batch's tokens and also counts the prompt tokens (its `concatenated_forward`); from response
    log-probs we compute the paper's response-only SFT term, so the NLL part differs from TRL there while
    the odds-ratio part matches exactly.
    extra: `nll_loss` (B,), `log_odds_ratio` = log sigma(log_odds) (B,), `log_odds_chosen` = log_odds
    (B,) (TRL's metric names). Rewards: alpha * log P(y), as TRL.
    """
    chosen_avg = _per_token(policy_chosen_logps.float(), chosen_lengths)  # (B,)
    rejected_avg = _per_token(policy_rejected_logps.float(), rejected_lengths)  # (B,)
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)  # (B,)
    nll = rpo_nll(policy_chosen_logps, chosen_lengths)
    losses = nll - alpha * ratio
    extra = {"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return LossOutput(losses, alpha * chosen_avg.detach(), alpha * rejected_avg.detach(), extra)


# --------------------------------------------------------------------------- KTO


def kto(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7), TRL KTOTrainer `loss_type="kto"`.

        r      = log pi(y) - log ref(y)                                             # (N,)
        z0     = max(kl, 0), detached                                               # ()
        loss   = lambda_D (1 - sigma(beta (r - z0)))    if labels (desirable)        # (N,)
                 lambda_U (1 - sigma(beta (z0 - r)))    otherwise

    Unpaired: `labels` (N,) bool marks desirable completions. `losses` keeps the input order (TRL
    concatenates desirable then undesirable; the mean is the same). As in TRL, `chosen_rewards` is
    beta * r over the desirable completions only, shape (n_desirable,), and `rejected_rewards` over
    the undesirable ones, shape (n_undesirable,). extra: `kl` = z0.
    """
    labels = labels.to(torch.bool)
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratios = policy_logps - reference_logps  # (N,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(labels, desirable, undesirable)
    rewards = beta * logratios.detach()
    return LossOutput(losses, rewards[labels], rewards[~labels], {"kl": z0})


def kto_from_pairs(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    kl: Tensor | None = None,
) -> LossOutput:
    """KTO on a paired batch: each chosen is desirable, each rejected undesirable.

        z0     = max(0, kl) when given, else max(0, mean over the 2B completions of (log pi(y) - log ref(y))),
                 detached
        loss_i = (kto(y_w,i) + kto(y_l,i)) / 2                                       # (B,)

    TRL estimates z0 = KL(pi || ref) from *mismatched* pairs (completion of example i-1 scored under
    prompt i), which needs two extra forward passes over re-collated sequences. Per-pair log-probs
    carry no such pairs, so we use the batch mean of the log-ratios of the matched completions: the
    same Monte-Carlo form E[log pi/ref] with the same detach and clamp, but over on-prompt
    completions. It is an approximation of TRL's z0, not equal to it: matched completions are the
    ones being pushed up/down, so their mean log-ratio tracks the policy's drift more directly.
    Averaging each pair's two terms keeps `losses.mean()` equal to KTO's mean over 2B completions.
    The dpo stage passes `kl`: the previous optimizer step's mean over all its micro-batches and processes
    (0 at the first step, where policy = reference), so z0 does not depend on how a step is split.
    Rewards: beta * (policy - reference) on summed log-probs, (B,) each. extra: `kl` = z0.
    """
    policy_logps = torch.cat([policy_chosen_logps, policy_rejected_logps])  # (2B,)
    reference_logps = torch.cat([reference_chosen_logps, reference_rejected_logps])  # (2B,)
    batch_size = policy_chosen_logps.shape[0]
    labels = torch.arange(2 * batch_size, device=policy_logps.device) < batch_size  # (2B,)
    if kl is None:
        z0 = (policy_logps - reference_logps).detach().mean().clamp(min=0)
    else:
        z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).clamp(min=0)
    out = kto(policy_logps, reference_logps, labels, z0, beta, desirable_weight, undesirable_weight)
    losses = 0.5 * (out.losses[:batch_size] + out.losses[batch_size:])  # (B,)
    return LossOutput(losses, out.chosen_rewards, out.rejected_rewards, out.extra)


# --------------------------------------------------------------------------- dispatch and metrics


def preference_loss(
    name: str,
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_alpha: float = 1.0,
    kto_desirable_weight: float = 1.0,
    kto_undesirable_weight: float = 1.0,
    rpo_alpha: float = 0.0,
    kto_kl: Tensor | None = None,
) -> LossOutput:
    """The loss named by `dpo.loss` in params.yaml, plus `rpo_alpha * rpo_nll` when rpo_alpha > 0.

    `cdpo` is `sigmoid_dpo` with label smoothing; `kto` is `kto_from_pairs`. Reference log-probs may
    be None for the REFERENCE_FREE losses; lengths are needed by ipo, simpo, orpo and rpo_alpha > 0.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; expected one of {', '.join(LOSSES)}")
    if label_smoothing and name not in ("sigmoid", "cdpo", "robust", "simpo"):
        raise ValueError(f"label_smoothing={label_smoothing} has no meaning for loss {name!r}")
    if name not in REFERENCE_FREE and (reference_chosen_logps is None or reference_rejected_logps is None):
        raise ValueError(f"loss {name!r} needs reference_chosen_logps and reference_rejected_logps")
    if (name in ("ipo", "simpo", "orpo") or rpo_alpha > 0) and (
        chosen_lengths is None or rejected_lengths is None
    ):
        raise ValueError(f"loss {name!r} (rpo_alpha={rpo_alpha}) needs chosen_lengths and rejected_lengths")

    policy = (policy_chosen_logps, policy_rejected_logps)
    reference = (reference_chosen_logps, reference_rejected_logps)
    lengths = (chosen_lengths, rejected_lengths)
    if name in ("sigmoid", "cdpo"):
        out = sigmoid_dpo(*policy, *reference, beta=beta, label_smoothing=label_smoothing)
    elif name == "robust":
        out = robust_dpo(*policy, *reference, beta=beta, label_smoothing=label_smoothing)
    elif name == "hinge":
        out = hinge_dpo(*policy, *reference, beta=beta)
    elif name == "ipo":
        out = ipo(*policy, *reference, beta, *lengths)
    elif name == "simpo":
        out = simpo(*policy, *lengths, beta=beta, gamma=simpo_gamma, label_smoothing=label_smoothing)
    elif name == "orpo":
        out = orpo(*policy, *lengths, alpha=orpo_alpha)
    else:  # kto
        out = kto_from_pairs(*policy, *reference, beta, kto_desirable_weight, kto_undesirable_weight, kto_kl)

    if rpo_alpha > 0:
        nll = rpo_nll(policy_chosen_logps, chosen_lengths)
        extra = {**out.extra, "rpo_nll": nll.detach()}
        out = LossOutput(out.losses + rpo_alpha * nll, out.chosen_rewards, out.rejected_rewards, extra)
    return out


def preference_metric_sums(
    out: LossOutput, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor
) -> dict[str, Tensor]:
    """Sums over the batch under TRL's metric names, plus the sum of each per-example `out.extra` entry.

    Sums, not means, so a training loop can add micro-batches and processes and divide once by the pair
    count (`preference_metrics` does it for one batch). For a paired output (every loss here except
    unpaired `kto`): rewards/accuracies counts the pairs whose chosen reward beats the rejected one (ties
    count as wrong, as in TRL). 0-d `extra` entries (batch statistics such as KTO's z0) are left out.
    """
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    sums = {
        "loss": out.losses.detach().sum(),
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(),
        "logps/rejected": policy_rejected_logps.detach().sum(),
    }
    sums.update({k: v.detach().float().sum() for k, v in out.extra.items() if v.dim() > 0})
    return sums


def preference_metrics(
    out: LossOutput, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, prefix: str = ""
) -> dict[str, float]:
    """Batch means of `preference_metric_sums` (loss left out) and 0-d `extra` entries, keyed `prefix + name`."""
    n = max(1, out.losses.shape[0])
    sums = preference_metric_sums(out, policy_chosen_logps, policy_rejected_logps)
    metrics = {key: value.item() / n for key, value in sums.items() if key != "loss"}
    metrics.update({key: v.detach().float().item() for key, v in out.extra.items() if v.dim() == 0})
    return {f"{prefix}{key}": value for key, value in metrics.items()}
