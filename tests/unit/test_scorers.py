"""Reward / value heads (core/heads.py) on a tiny random Llama sequence-classification model: the score is read
where Hugging Face's own pooling (and so TRL's RewardTrainer) reads it, the shared-prompt layout equals separate
rows, and the values sit at the positions that predict each response token."""

from __future__ import annotations

import pytest
import torch

from components.core.model import heads

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
