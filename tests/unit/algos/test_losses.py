"""Preference losses: hand-computed values, properties, and parity with TRL 1.16.

Hand-computed cases use a 2-pair batch; the arithmetic is in the comments. Parity tests run our
functions and TRL's on the same seeded random log-probs (B=8): TRL's own methods are called where
they exist in isolation (CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss); where TRL computes a loss
inline in `_compute_loss` (DPO, KTO) the few formula lines are copied here, with file and line, and
`test_copied_trl_lines_still_in_installed_trl` fails if the installed TRL no longer contains them.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from components.core.algos.losses import (
    REFERENCE_FREE,
    LossOutput,
    hinge_dpo,
    ipo,
    kto,
    kto_from_pairs,
    orpo,
    preference_loss,
    preference_metrics,
    robust_dpo,
    rpo_nll,
    sigmoid_dpo,
    simpo,
)

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol
    )


# Two pairs with known log-ratios (policy - reference, summed):
#   pair A: chosen -10 - (-12) = 2.0, rejected -15 - (-14) = -1.0  -> h = 3.0, beta*h = 0.3 at beta=0.1
#   pair B: chosen  -8 - (-8)  = 0.0, rejected  -9 - (-9)  =  0.0  -> h = 0 (zero margin)
PAIRS = dict(
    policy_chosen_logps=T([-10.0, -8.0]),
    policy_rejected_logps=T([-15.0, -9.0]),
    reference_chosen_logps=T([-12.0, -8.0]),
    reference_rejected_logps=T([-14.0, -9.0]),
)
LOG2 = math.log(2.0)


# --------------------------------------------------------------------------- hand-computed values


def test_sigmoid_dpo_hand_computed():
    out = sigmoid_dpo(**PAIRS, beta=0.1)
    # A: -log sigma(0.3) = log(1 + e^-0.3) = log(1.7408182) = 0.5543552;  B: -log sigma(0) = log 2
    assert close(out.losses, [0.5543552, LOG2])
    # rewards = beta * log-ratio: A (0.2, -0.1), B (0, 0)
    assert close(out.chosen_rewards, [0.2, 0.0]) and close(out.rejected_rewards, [-0.1, 0.0])
    assert not out.chosen_rewards.requires_grad


def test_cdpo_hand_computed():
    out = sigmoid_dpo(**PAIRS, beta=0.1, label_smoothing=0.1)
    # -(1-eps) log s(x) - eps log s(-x), and log s(-x) = log s(x) - x, so loss = -log s(x) + eps*x
    # A: 0.5543552 + 0.1*0.3 = 0.5843552;  B (x=0): log 2 whatever eps
    assert close(out.losses, [0.5843552, LOG2])


def test_robust_dpo_hand_computed():
    out = robust_dpo(**PAIRS, beta=0.1, label_smoothing=0.1)
    # [-(1-eps) log s(x) + eps log s(-x)] / (1-2eps) = -log s(x) - eps*x/(1-2eps)
    # A: 0.5543552 - 0.03/0.8 = 0.5168552;  B: log 2
    assert close(out.losses, [0.5168552, LOG2])
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_dpo(**PAIRS, beta=0.1, label_smoothing=0.5)


def test_hinge_hand_computed():
    # A: relu(1 - 0.1*3) = 0.7;  B': log-ratios 10 and -2, h = 12 > 1/beta = 10 -> 0
    out = hinge_dpo(T([-10.0, 0.0]), T([-15.0, -2.0]), T([-12.0, -10.0]), T([-14.0, 0.0]), beta=0.1)
    assert close(out.losses, [0.7, 0.0])


def test_ipo_hand_computed():
    # beta=0.1 -> target 1/(2 beta) = 5.
    # A: chosen log-ratio 2.0 over 2 tokens = 1.0, rejected -1.0 over 4 tokens = -0.25; (1.25 - 5)^2 = 14.0625
    # B: chosen log-ratio 20 over 4 tokens = 5.0, rejected 0 over 3 tokens = 0;        (5 - 5)^2 = 0
    out = ipo(
        T([-10.0, 0.0]), T([-15.0, -9.0]), T([-12.0, -20.0]), T([-14.0, -9.0]), 0.1, T([2, 4]), T([4, 3])
    )
    assert close(out.losses, [14.0625, 0.0])
    # rewards stay on summed log-probs (as TRL logs them): A (0.2, -0.1), B (2.0, 0)
    assert close(out.chosen_rewards, [0.2, 2.0]) and close(out.rejected_rewards, [-0.1, 0.0])


def test_simpo_hand_computed():
    # beta=2, gamma=0.5. A: avg chosen -4/4 = -1, avg rejected -9/6 = -1.5; z = 2*0.5 - 0.5 = 0.5
    #   -log sigma(0.5) = log(1 + e^-0.5) = log(1.6065307) = 0.4740770
    # B: avg chosen -3/3 = -1, avg rejected -5/4 = -1.25; z = 2*0.25 - 0.5 = 0 -> log 2
    out = simpo(T([-4.0, -3.0]), T([-9.0, -5.0]), T([4, 3]), T([6, 4]), beta=2.0, gamma=0.5)
    assert close(out.losses, [0.4740770, LOG2])
    assert close(out.chosen_rewards, [-2.0, -2.0]) and close(out.rejected_rewards, [-3.0, -2.5])


def test_orpo_hand_computed():
    # Per-token probabilities chosen so the odds are round. alpha=0.5.
    # A: chosen P=0.5 (2 tokens, sum 2 log .5), odds 1; rejected P=0.2 (3 tokens, sum 3 log .2), odds 1/4
    #    log_odds = log 4, log sigma(log 4) = log(4/5) = -0.2231436
    # B: swapped: chosen P=0.2 (3 tokens), rejected P=0.5 (2 tokens): log sigma(-log 4) = log(1/5) = -1.6094379
    # NLL per chosen sequence: A -2 log .5 / 2 = 0.6931472, B -3 log .2 / 3 = 1.6094379
    # losses: A 0.6931472 + 0.5*0.2231436 = 0.8047190,  B 1.6094379 + 0.5*1.6094379 = 2.4141569
    half, fifth = math.log(0.5), math.log(0.2)
    out = orpo(T([2 * half, 3 * fifth]), T([3 * fifth, 2 * half]), T([2, 3]), T([3, 2]), alpha=0.5)
    assert close(out.losses, [0.8047190, 2.4141569])
    assert close(out.losses.mean(), (0.6931472 + 1.6094379) / 2 + 0.5 * (0.2231436 + 1.6094379) / 2)
    assert close(out.extra["log_odds_ratio"], [math.log(0.8), math.log(0.2)])
    assert close(out.extra["log_odds_chosen"], [math.log(4.0), -math.log(4.0)])
    assert close(out.extra["nll_loss"], [0.6931472, 1.6094379])
    assert close(out.chosen_rewards, [0.5 * half, 0.5 * fifth])  # alpha * per-token mean log-prob


def test_kto_hand_computed():
    # beta=0.1, z0=0.5, log-ratios: desirable 2.0, undesirable -1.0, undesirable weight 1.5
    #   desirable:   1 - sigma(0.1*(2 - 0.5))    = sigma(-0.15) = 1/(1 + e^0.15) = 0.4625702
    #   undesirable: 1.5 * (1 - sigma(0.1*(0.5 + 1))) = 1.5 * 0.4625702 = 0.6938553
    out = kto(T([-10.0, -15.0]), T([-12.0, -14.0]), T([True, False]), T(0.5), 0.1, 1.0, 1.5)
    assert close(out.losses, [0.4625702, 0.6938553])
    assert close(out.chosen_rewards, [0.2]) and close(out.rejected_rewards, [-0.1])
    # a negative KL estimate is clamped to 0: 1 - sigma(0.2) = 1/(1 + e^0.2) = 0.4501660
    out = kto(T([-10.0]), T([-12.0]), T([True]), T(-3.0), 0.1, 1.0, 1.0)
    assert close(out.losses, [0.4501660]) and close(out.extra["kl"], 0.0)


def test_kto_from_pairs_hand_computed():
    # log-ratios: A chosen 2, rejected -1; B chosen 1, rejected 0 -> z0 = mean(2, 1, -1, 0) = 0.5, beta=0.1
    #   A: chosen 1 - s(0.1*1.5) = 0.4625702, rejected 1 - s(0.1*(0.5+1)) = 0.4625702 -> pair 0.4625702
    #   B: chosen 1 - s(0.1*0.5) = 1/(1+e^0.05) = 0.4875026, rejected 1 - s(0.1*0.5) = 0.4875026
    out = kto_from_pairs(
        T([-10.0, -7.0]), T([-15.0, -9.0]), T([-12.0, -8.0]), T([-14.0, -9.0]), 0.1, 1.0, 1.0
    )
    assert close(out.losses, [0.4625702, 0.4875026])
    assert close(out.extra["kl"], 0.5)
    assert close(out.chosen_rewards, [0.2, 0.1]) and close(out.rejected_rewards, [-0.1, 0.0])


def test_rpo_nll_normalises_each_sequence_by_its_length():
    # chosen sums -6 (4 tokens) and -2 (1 token): per-sequence NLL [1.5, 2.0], mean 1.75.
    # (TRL pools the batch's tokens: 8/5 = 1.6, which depends on the micro-batch split.)
    nll = rpo_nll(T([-6.0, -2.0]), T([4, 1]))
    assert close(nll, [1.5, 2.0]) and close(nll.mean(), 1.75)
    # invariant to how a batch is split (accumulation / DDP): halves give the same per-pair values
    assert close(torch.cat([rpo_nll(T([-6.0]), T([4])), rpo_nll(T([-2.0]), T([1]))]), nll)


# --------------------------------------------------------------------------- properties


def test_sigmoid_at_zero_margin_is_log2_and_cdpo_at_zero_is_sigmoid():
    zeros = torch.zeros(3)
    assert close(sigmoid_dpo(zeros, zeros, zeros, zeros, beta=0.5).losses, [LOG2] * 3)
    pol_c, pol_r, ref_c, ref_r = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    plain = sigmoid_dpo(pol_c, pol_r, ref_c, ref_r, beta=0.1)
    via_cdpo = preference_loss(
        "cdpo",
        policy_chosen_logps=pol_c,
        policy_rejected_logps=pol_r,
        reference_chosen_logps=ref_c,
        reference_rejected_logps=ref_r,
        beta=0.1,
    )
    assert close(plain.losses, via_cdpo.losses)
    # robust with eps=0 is also plain DPO
    assert close(robust_dpo(pol_c, pol_r, ref_c, ref_r, beta=0.1, label_smoothing=0.0).losses, plain.losses)


def test_ipo_minimised_at_half_inverse_beta():
    beta = 0.25  # target per-token margin 1/(2 beta) = 2
    margin = torch.linspace(0.0, 4.0, 401, requires_grad=True)  # per-token margins, 1-token completions
    zeros, ones = torch.zeros(401), torch.ones(401)
    losses = ipo(margin, zeros, zeros, zeros, beta, ones, ones).losses
    assert close(margin[losses.argmin()], 2.0, tol=1e-5)
    losses.sum().backward()
    assert close(margin.grad[losses.argmin()], 0.0)


def test_hinge_zero_beyond_margin():
    beta = 0.1
    h = torch.tensor([10.0, 10.5, 30.0], requires_grad=True)  # at and beyond 1/beta = 10
    zeros = torch.zeros(3)
    out = hinge_dpo(h, zeros, zeros, zeros, beta=beta)
    out.losses.sum().backward()
    assert close(out.losses, [0.0, 0.0, 0.0]) and close(h.grad, [0.0, 0.0, 0.0])
    assert hinge_dpo(T([9.0]), T([0.0]), T([0.0]), T([0.0]), beta=beta).losses.item() > 0


@pytest.mark.parametrize("name", ["sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo", "kto"])
def test_gradients_raise_chosen_and_lower_rejected(name):
    # Near zero margin every loss is active; d loss / d chosen < 0 and d loss / d rejected > 0.
    pol_c = torch.tensor([-6.0, -9.0], requires_grad=True)
    pol_r = torch.tensor([-6.5, -8.5], requires_grad=True)
    out = preference_loss(
        name,
        policy_chosen_logps=pol_c,
        policy_rejected_logps=pol_r,
        reference_chosen_logps=T([-6.0, -9.0]),
        reference_rejected_logps=T([-6.0, -9.0]),
        chosen_lengths=T([3, 4]),
        rejected_lengths=T([3, 4]),
        beta=0.1,
        label_smoothing=0.1 if name in ("cdpo", "robust") else 0.0,
    )
    out.losses.mean().backward()
    assert (pol_c.grad < 0).all(), pol_c.grad
    assert (pol_r.grad > 0).all(), pol_r.grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_dispatcher_rpo_and_errors():
    kwargs = dict(**PAIRS, chosen_lengths=T([4, 2]), rejected_lengths=T([5, 3]), beta=0.1)
    base = preference_loss("sigmoid", **kwargs)
    with_rpo = preference_loss("sigmoid", **kwargs, rpo_alpha=0.5)
    # rpo term: chosen sums -10, -8, each over its own length
    lengths = kwargs["chosen_lengths"].float()
    assert close(with_rpo.losses - base.losses, 0.5 * torch.tensor([10.0, 8.0]) / lengths)
    assert close(with_rpo.extra["rpo_nll"], torch.tensor([10.0, 8.0]) / lengths)
    # reference-free losses run without reference log-probs
    assert REFERENCE_FREE == {"simpo", "orpo"}
    no_ref = {k: v for k, v in kwargs.items() if not k.startswith("reference")}
    for name in REFERENCE_FREE:
        assert preference_loss(name, **no_ref).losses.shape == (2,)
    with pytest.raises(ValueError, match="dpop"):
        preference_loss("dpop", **kwargs)
    with pytest.raises(ValueError, match="'sigmoid' needs reference"):
        preference_loss("sigmoid", **no_ref)
    with pytest.raises(ValueError, match="'hinge'"):
        preference_loss("hinge", **kwargs, label_smoothing=0.1)


def test_preference_metrics_names_and_values():
    out = sigmoid_dpo(**PAIRS, beta=0.1)  # rewards: chosen (0.2, 0), rejected (-0.1, 0)
    metrics = preference_metrics(
        out, PAIRS["policy_chosen_logps"], PAIRS["policy_rejected_logps"], prefix="eval_"
    )
    assert metrics == pytest.approx(
        {
            "eval_rewards/chosen": 0.1,
            "eval_rewards/rejected": -0.05,
            "eval_rewards/accuracies": 0.5,  # tie in pair B counts as wrong
            "eval_rewards/margins": 0.15,
            "eval_logps/chosen": -9.0,
            "eval_logps/rejected": -12.0,
        }
    )
    assert all(isinstance(v, float) for v in metrics.values())
    orpo_metrics = preference_metrics(orpo(T([-2.0]), T([-3.0]), T([2]), T([2]), 1.0), T([-2.0]), T([-3.0]))
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= orpo_metrics.keys()


# --------------------------------------------------------------------------- parity with TRL 1.16


@pytest.fixture(scope="module")
def trl_trainers():
    pytest.importorskip("trl")
    with warnings.catch_warnings():  # TRLExperimentalWarning on import
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    return SimpleNamespace(CPOTrainer=CPOTrainer, ORPOTrainer=ORPOTrainer)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1234)
    B = 8
    chosen_lengths = torch.randint(1, 40, (B,), generator=g)
    rejected_lengths = torch.randint(1, 40, (B,), generator=g)
    # summed log-probs: roughly -0.5..-2.5 nats per token, reference within a few nats of policy
    pol_c = -(0.5 + 2 * torch.rand(B, generator=g)) * chosen_lengths
    pol_r = -(0.5 + 2 * torch.rand(B, generator=g)) * rejected_lengths
    ref_c = pol_c + 3 * torch.randn(B, generator=g)
    ref_r = pol_r + 3 * torch.randn(B, generator=g)
    return SimpleNamespace(
        pol_c=pol_c, pol_r=pol_r, ref_c=ref_c, ref_r=ref_r, len_c=chosen_lengths, len_r=rejected_lengths
    )


def trl_dpo_reference(loss_type, b, beta, label_smoothing):
    """Copied from trl 1.16.0 trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss (reverse_kl scores)."""
    chosen_logratios = b.pol_c - b.ref_c  # L1350
    rejected_logratios = b.pol_r - b.ref_r  # L1351
    delta_score = chosen_logratios - rejected_logratios  # L1383 (chosen_scores = chosen_logratios, L1354)
    if loss_type == "sigmoid":  # L1387-1388
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":  # L1390-1391
        per_sequence_loss = torch.relu(1 - beta * delta_score)
    elif loss_type == "ipo":  # L1393-1404 (completion_mask.sum(dim=1) is the completion length)
        chosen_avg_score = chosen_logratios / b.len_c.float().clamp(min=1.0)
        rejected_avg_score = rejected_logratios / b.len_r.float().clamp(min=1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":  # L1428-1431
        clean_loss_term = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped_loss_term = -label_smoothing * F.logsigmoid(-beta * delta_score)
        per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
    chosen_rewards = beta * chosen_logratios.detach()  # L1582
    rejected_rewards = beta * rejected_logratios.detach()  # L1583
    return per_sequence_loss, chosen_rewards, rejected_rewards


def trl_kto_reference(policy_logps, reference_logps, labels, kl, beta, desirable_weight, undesirable_weight):
    """Copied from trl 1.16.0 trl/trainer/kto_trainer.py, KTOTrainer._compute_loss, loss_type="kto"."""
    kl = kl.clamp(min=0)  # L1444
    chosen_logratios = policy_logps[labels] - reference_logps[labels]  # L1449
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))  # L1453
    chosen_rewards = beta * chosen_logratios.detach()  # L1459
    rejected_logratios = policy_logps[~labels] - reference_logps[~labels]  # L1467
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))  # L1470
    rejected_rewards = beta * rejected_logratios.detach()  # L1474
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)  # L1479
    return losses, chosen_rewards, rejected_rewards


def test_copied_trl_lines_still_in_installed_trl():
    pytest.importorskip("trl")
    root = Path(importlib.util.find_spec("trl").origin).parent / "trainer"
    dpo_src = (root / "dpo_trainer.py").read_text()
    kto_src = (root / "kto_trainer.py").read_text()
    for line in [
        "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)",
        "per_sequence_loss = torch.relu(1 - self.beta * delta_score)",
        "chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)",
        "per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2",
        "clean_loss_term = -(1 - self.label_smoothing) * F.logsigmoid(self.beta * delta_score)",
        "flipped_loss_term = -self.label_smoothing * F.logsigmoid(-self.beta * delta_score)",
        "per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * self.label_smoothing)",
        "batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean()",
        "chosen_rewards = self.beta * chosen_logratios.detach()",
    ]:
        assert line in dpo_src, line
    for line in [
        "kl = self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)",
        "chosen_losses = 1 - F.sigmoid(self.beta * (chosen_logratios - kl))",
        "rejected_losses = 1 - F.sigmoid(self.beta * (kl - rejected_logratios))",
        "(self.desirable_weight * chosen_losses, self.undesirable_weight * rejected_losses),",
    ]:
        assert line in kto_src, line


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("robust", 0.3)],
)
def test_parity_dpo_family_with_trl_formula(batch, loss_type, label_smoothing):
    beta = 0.1
    b = batch
    losses, chosen_rewards, rejected_rewards = trl_dpo_reference(loss_type, b, beta, label_smoothing)
    refs = (b.pol_c, b.pol_r, b.ref_c, b.ref_r)
    if loss_type == "sigmoid":
        out = sigmoid_dpo(*refs, beta=beta)
    elif loss_type == "hinge":
        out = hinge_dpo(*refs, beta=beta)
    elif loss_type == "ipo":
        out = ipo(*refs, beta, b.len_c, b.len_r)
    else:
        out = robust_dpo(*refs, beta=beta, label_smoothing=label_smoothing)
    assert close(out.losses, losses) and close(out.chosen_rewards, chosen_rewards)
    assert close(out.rejected_rewards, rejected_rewards)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_parity_dpo_family_with_trl_cpo_loss(trl_trainers, batch, loss_type, label_smoothing):
    # CPOTrainer.cpo_loss applies the same pairwise formulas to (chosen - rejected) of what it is given;
    # fed log-ratios it computes DPO/cDPO/hinge, and fed per-token log-ratios TRL-DPO's IPO. This is
    # the one callable TRL 1.16 function that still has cDPO (label smoothing on the sigmoid loss).
    beta, b = 0.1, batch
    fake_self = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        accelerator=SimpleNamespace(device="cpu"),
    )
    chosen, rejected = b.pol_c - b.ref_c, b.pol_r - b.ref_r
    if loss_type == "ipo":
        chosen, rejected = chosen / b.len_c, rejected / b.len_r
    trl_losses, _, _ = trl_trainers.CPOTrainer.cpo_loss(fake_self, chosen, rejected)
    name = {"sigmoid": "cdpo" if label_smoothing else "sigmoid"}.get(loss_type, loss_type)
    out = preference_loss(
        name,
        policy_chosen_logps=b.pol_c,
        policy_rejected_logps=b.pol_r,
        reference_chosen_logps=b.ref_c,
        reference_rejected_logps=b.ref_r,
        chosen_lengths=b.len_c,
        rejected_lengths=b.len_r,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    assert close(out.losses, trl_losses)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_parity_simpo_with_trl_cpo_loss(trl_trainers, batch, label_smoothing):
    # TRL's CPO forward passes per-token mean log-probs for simpo (average_log_prob=True, cpo_trainer.py L850).
    beta, gamma, b = 2.0, 0.5, batch
    fake_self = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        accelerator=SimpleNamespace(device="cpu"),
    )
    trl_losses, trl_chosen, trl_rejected = trl_trainers.CPOTrainer.cpo_loss(
        fake_self, b.pol_c / b.len_c, b.pol_r / b.len_r
    )
    out = simpo(b.pol_c, b.pol_r, b.len_c, b.len_r, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    assert close(out.losses, trl_losses)
    assert close(out.chosen_rewards, trl_chosen) and close(out.rejected_rewards, trl_rejected)


def _chosen_tokens(batch, vocab=11, seed=7):
    """Random logits and labels for the chosen completions (response tokens only, -100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    B, T_ = batch.len_c.shape[0], int(batch.len_c.max()) + 1
    logits = torch.randn(B, T_, vocab, generator=g)
    labels = torch.randint(0, vocab, (B, T_), generator=g)
    labels[torch.arange(T_) >= batch.len_c[:, None]] = -100  # right padding
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T)
    summed = (token_logps * (labels != -100)).sum(-1)  # (B,)
    return logits, labels, token_logps, summed


def test_parity_rpo_nll_with_trl_sft_term(batch):
    _, labels, token_logps, summed = _chosen_tokens(batch)
    # trl/trainer/dpo_trainer.py L1498: batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean()
    # TRL pools tokens over the batch; ours normalises per sequence: equal on equal-length rows.
    for length in batch.len_c.unique():
        rows = batch.len_c == length
        trl_batch_loss = -token_logps[rows][labels[rows] != -100].mean()
        assert close(rpo_nll(summed[rows], batch.len_c[rows]).mean(), trl_batch_loss)


@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_parity_orpo_with_trl_odds_ratio_loss(trl_trainers, batch, alpha):
    b = batch
    logits, labels, _, summed_chosen = _chosen_tokens(b)
    fake_self = SimpleNamespace(beta=alpha, accelerator=SimpleNamespace(device="cpu"))
    # ORPO's forward passes per-token mean log-probs (average_log_prob=True, orpo_trainer.py L805)
    trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = trl_trainers.ORPOTrainer.odds_ratio_loss(
        fake_self, summed_chosen / b.len_c, b.pol_r / b.len_r
    )
    # TRL's total is nll - losses.mean() (orpo_trainer.py L848); its NLL (L779-800) pools the batch's
    # tokens (and counts prompt tokens), ours is per sequence (see rpo_nll): compare the odds-ratio part.
    out = orpo(summed_chosen, b.pol_r, b.len_c, b.len_r, alpha=alpha)
    assert close((out.losses - out.extra["nll_loss"]).mean(), -trl_losses.mean())
    nll = torch.nn.CrossEntropyLoss(reduction="none")(logits.transpose(1, 2), labels).sum(-1) / b.len_c
    assert close(out.extra["nll_loss"], nll)
    assert close(out.extra["log_odds_ratio"], trl_losses / alpha)
    assert close(out.extra["log_odds_ratio"].mean(), trl_ratio)
    assert close(out.extra["log_odds_chosen"].mean(), trl_log_odds)
    assert close(out.chosen_rewards, trl_chosen) and close(out.rejected_rewards, trl_rejected)


@pytest.mark.parametrize("kl", [0.7, -0.4])
def test_parity_kto_with_trl_formula(batch, kl):
    b = batch
    policy, reference = torch.cat([b.pol_c, b.pol_r]), torch.cat([b.ref_c, b.ref_r])
    labels = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    args = (0.1, 1.0, 1.33)  # beta, desirable_weight, undesirable_weight
    trl_losses, trl_chosen, trl_rejected = trl_kto_reference(policy, reference, labels, T(kl), *args)
    out = kto(policy, reference, labels, T(kl), *args)
    assert close(torch.cat([out.losses[labels], out.losses[~labels]]), trl_losses)
    assert close(out.losses.mean(), trl_losses.nanmean())
    assert close(out.chosen_rewards, trl_chosen) and close(out.rejected_rewards, trl_rejected)


def test_parity_kto_from_pairs_with_trl_formula_given_our_kl(batch):
    # Same loss as TRL on the 2B completions once z0 is fixed; z0 itself is our batch estimate
    # (TRL's comes from mismatched prompt/completion pairs we do not have).
    b = batch
    policy, reference = torch.cat([b.pol_c, b.pol_r]), torch.cat([b.ref_c, b.ref_r])
    labels = torch.arange(16) < 8
    z0 = (policy - reference).mean().clamp(min=0)
    trl_losses, trl_chosen, trl_rejected = trl_kto_reference(policy, reference, labels, z0, 0.2, 1.0, 1.5)
    out = kto_from_pairs(b.pol_c, b.pol_r, b.ref_c, b.ref_r, 0.2, 1.0, 1.5)
    assert isinstance(out, LossOutput) and out.losses.shape == (8,)
    assert close(out.extra["kl"], z0)
    assert close(out.losses.mean(), trl_losses.nanmean())
    assert close(out.chosen_rewards, trl_chosen) and close(out.rejected_rewards, trl_rejected)



def test_orpo_is_finite_when_a_response_is_certain():
    """A mean log-prob of exactly 0 (P = 1) made log(1 - P) = -inf and the loss NaN."""
    out = orpo(T([0.0]), T([-3.0]), T([2]), T([2]), 1.0)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.extra["log_odds_chosen"]).all()


def test_kto_from_pairs_uses_the_given_reference_point():
    from components.core.algos.losses import kto_from_pairs

    args = (T([-1.0, -2.0]), T([-3.0, -1.0]), T([-1.5, -2.0]), T([-2.0, -2.0]), 0.1, 1.0, 1.0)
    batch = kto_from_pairs(*args)  # z0 from this batch: mean(0.5, 0, -1, 1) = 0.125
    given = kto_from_pairs(*args, kl=torch.tensor(0.4))
    assert batch.extra["kl"].item() == pytest.approx(0.125) and given.extra["kl"].item() == pytest.approx(0.4)
    assert kto_from_pairs(*args, kl=torch.tensor(-1.0)).extra["kl"].item() == 0.0  # clamped at 0
