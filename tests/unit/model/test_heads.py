"""model/heads.py: scalar heads (reward and value models), the Bradley-Terry loss against TRL, calibration."""

from __future__ import annotations

import math

import pytest
import torch

from components.core.model import heads


def test_bradley_terry_matches_trl_reward_trainer():
    torch.manual_seed(0)
    rc, rr = torch.randn(6), torch.randn(6)
    margin = torch.rand(6)
    # TRL 1.16 RewardTrainer.compute_loss, written out: mean over the batch, then the centring term
    trl = -torch.nn.functional.logsigmoid(rc - rr - margin).mean() + 0.01 * torch.mean((rc + rr) ** 2)
    ours = heads.bradley_terry_losses(rc, rr, margin, 0.01).mean()
    torch.testing.assert_close(ours, trl)
    plain = heads.bradley_terry_losses(torch.tensor([1.0]), torch.tensor([0.0]))
    torch.testing.assert_close(plain, torch.tensor([math.log(1 + math.exp(-1.0))]))


def test_bradley_terry_gradient_of_accumulated_shares_equals_the_batch_loss():
    rc = torch.tensor([0.3, -0.2, 1.0, 0.5], requires_grad=True)
    rr = torch.tensor([0.1, 0.4, -1.0, 0.5], requires_grad=True)
    heads.bradley_terry_losses(rc, rr, None, 0.05).mean().backward()
    whole = rc.grad.clone()
    rc.grad = None
    for sl in (slice(0, 1), slice(1, 4)):  # micro-batches of 1 and 3, each its share of the global mean
        (heads.bradley_terry_losses(rc[sl], rr[sl], None, 0.05).sum() / 4).backward()
    torch.testing.assert_close(rc.grad, whole)


def test_reliability_counts_each_pair_both_ways():
    calib = heads.reliability([2.0, 0.0], [0.0, 0.0], bins=10)
    p = 1 / (1 + math.exp(-2.0))  # 0.881: bin 8, observed 1; its mirror 0.119 in bin 1, observed 0
    bins = {(round(b["low"], 1)): b for b in calib["bins"]}
    assert bins[0.8]["count"] == 1 and bins[0.8]["observed"] == 1.0 and bins[0.8]["predicted"] == pytest.approx(p)
    assert bins[0.1]["count"] == 1 and bins[0.1]["observed"] == 0.0
    assert bins[0.5]["count"] == 2 and bins[0.5]["observed"] == 0.5  # a tie: 0.5 both ways, one right one wrong
    # ECE: (|p - 1| + |1 - p - 0| + 2 * 0) / 4
    assert calib["ece"] == pytest.approx(2 * (1 - p) / 4)


PAD = 0


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64, num_labels=1,
                         pad_token_id=PAD, attn_implementation=request.param)
    return LlamaForSequenceClassification(config).eval()


PAIRS = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12]},
    {"prompt_ids": [13, 14, 15, 16, 17], "chosen_ids": [18], "rejected_ids": [19, 20]},
    {"prompt_ids": [21], "chosen_ids": [22, 23, 24, 25], "rejected_ids": [26]},
]


def test_end_scores_read_where_hugging_face_pools(model):
    prompts = [p["prompt_ids"] for p in PAIRS]
    responses = [p["chosen_ids"] for p in PAIRS]
    ours = heads.end_scores(model, prompts, responses, PAD, "cpu")
    ids, mask, _, _ = heads.sequence_batch(prompts, responses, PAD, "cpu")
    with torch.no_grad():
        pooled = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # HF: last non-pad token
    torch.testing.assert_close(ours, pooled, rtol=1e-5, atol=1e-5)


def test_shared_prompt_pairs_equal_separate_rows(model):
    assert heads.shared_rows_supported(model)
    with torch.no_grad():
        shared = heads.pair_end_scores(model, PAIRS, PAD, "cpu", share_prompt=True)
        rows = heads.pair_end_scores(model, PAIRS, PAD, "cpu", share_prompt=False)
    for a, b in zip(shared, rows, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_groups_behind_one_prompt_equal_separate_rows(model):
    prompts = [p["prompt_ids"] for p in PAIRS]
    grouped = [[p["chosen_ids"], p["rejected_ids"], []] for p in PAIRS]  # an empty completion is read at the prompt
    with torch.no_grad():
        grouped_scores = heads.group_end_scores(model, prompts, grouped, PAD, "cpu")
        rows = heads.end_scores(model, [p for p in prompts for _ in range(3)], [c for cs in grouped for c in cs],
                                  PAD, "cpu")
    torch.testing.assert_close(grouped_scores, rows, rtol=1e-5, atol=1e-5)


def test_response_values_sit_before_each_response_token(model):
    prompts = [p["prompt_ids"] for p in PAIRS]
    responses = [p["rejected_ids"] for p in PAIRS]
    values = heads.response_values(model, prompts, responses, PAD, "cpu")
    assert values.shape == (3, 3)
    ids, mask, _, _ = heads.sequence_batch(prompts, responses, PAD, "cpu")
    with torch.no_grad():
        every = heads.token_scores(model, ids, mask)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        for t in range(3):
            expected = every[i, len(p) - 1 + t] if t < len(r) else torch.tensor(0.0)
            torch.testing.assert_close(values[i, t], expected)


def test_score_head_is_found_or_named():
    with pytest.raises(ValueError, match="no score head"):
        heads.score_head(torch.nn.Linear(2, 2))
