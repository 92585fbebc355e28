"""GRPO math (core/algos/rl.py) against hand-computed values, and against TRL 1.16's GRPO loss on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch

from components.core.algos import rl
from components.core.algos.reward_functions import (
    final_number,
    load_reward_function,
    numeric_reward,
    reward_identity,
)

# ----------------------------------------------------------------------------- advantages


def test_group_advantages_each_scale_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5])  # two groups of 2: {1, 0} and {0.5, 0.5}
    std_g1 = math.sqrt(0.5)  # unbiased std of {1, 0}
    adv, group_std = rl.group_advantages(r, 2, "none")
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    torch.testing.assert_close(group_std, torch.tensor([std_g1, std_g1, 0.0, 0.0]))
    adv, _ = rl.group_advantages(r, 2, "group")
    torch.testing.assert_close(adv, torch.tensor([0.5 / (std_g1 + 1e-4), -0.5 / (std_g1 + 1e-4), 0.0, 0.0]))
    batch_std = math.sqrt(sum((x - 0.5) ** 2 for x in [1.0, 0.0, 0.5, 0.5]) / 3)
    adv, _ = rl.group_advantages(r, 2, "batch")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (batch_std + 1e-4))
    assert rl.zero_std_groups(group_std, 2).tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 3"):
        rl.group_advantages(r, 3, "group")


# ----------------------------------------------------------------------------- surrogate, KL, aggregation


def test_clipped_surrogate_clips_low_and_high_by_hand():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[0.5, 1.0, 1.5]]))  # ratios 0.5, 1.0, 1.5
    pos = rl.clipped_surrogate(logps, old, torch.tensor([2.0]), epsilon_low=0.2, epsilon_high=0.28)
    # A > 0: min(r A, clip(r) A) = A * min(r, clip(r)): 0.5*2 (unclipped low side), 1*2, 1.28*2
    torch.testing.assert_close(pos.per_token_loss, -torch.tensor([[1.0, 2.0, 2.56]]))
    neg = rl.clipped_surrogate(logps, old, torch.tensor([-2.0]), epsilon_low=0.2, epsilon_high=0.28)
    # A < 0: min(-2 r, -2 clip(r)) = -2 max(r, clip(r)): 0.8, 1, 1.5
    torch.testing.assert_close(neg.per_token_loss, torch.tensor([[1.6, 2.0, 3.0]]))
    mask = torch.ones(1, 3)
    clip = rl.clip_fractions(neg.ratio, torch.tensor([-2.0]), mask, 0.2, 0.28)
    assert clip["clip_ratio/low"].item() == 1 and clip["clip_ratio/high"].item() == 0
    clip = rl.clip_fractions(pos.ratio, torch.tensor([2.0]), mask, 0.2, 0.28)
    assert clip["clip_ratio/high"].item() == 1 and clip["clip_ratio/region"].item() == 1


def test_k3_kl_by_hand_and_in_the_loss():
    logps, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    # exp(ref - logp) - (ref - logp) - 1 = 0.5 - ln 0.5 - 1
    torch.testing.assert_close(rl.k3_kl(logps, ref), torch.tensor([[0.5 + math.log(2) - 1]]))
    assert rl.k3_kl(ref, ref).item() == 0.0
    out = rl.clipped_surrogate(logps, logps, torch.tensor([0.0]), 0.2, 0.2, beta=0.1, ref_logps=ref)
    torch.testing.assert_close(out.per_token_loss, 0.1 * rl.k3_kl(logps, ref))
    with pytest.raises(ValueError, match="reference"):
        rl.clipped_surrogate(logps, logps, torch.tensor([0.0]), 0.2, 0.2, beta=0.1)


def test_each_loss_aggregation_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    totals = rl.Totals(sequences=2, tokens=4, micro_batches=1, max_completion_length=5)
    assert rl.aggregate(loss, mask, "grpo", totals).item() == pytest.approx((2.0 + 4.0) / 2)
    assert rl.aggregate(loss, mask, "bnpo", totals).item() == pytest.approx(10.0 / 4)
    assert rl.aggregate(loss, mask, "dr_grpo", totals).item() == pytest.approx(10.0 / (2 * 5))
    assert rl.aggregate(loss, mask, "dapo", totals).item() == pytest.approx(10.0 / 4)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batch_shares_sum_to_the_global_loss(loss_type):
    """Split one batch in two micro-batches: the shares add up to the loss of the whole (bnpo is per
    micro-batch by definition and is excluded)."""
    torch.manual_seed(0)
    loss = torch.randn(6, 4)
    mask = (torch.rand(6, 4) > 0.3).long()
    mask[:, 0] = 1
    whole = rl.Totals(sequences=6, tokens=int(mask.sum()), micro_batches=1, max_completion_length=4)
    split = rl.Totals(sequences=6, tokens=int(mask.sum()), micro_batches=2, max_completion_length=4)
    parts = rl.aggregate(loss[:2], mask[:2], loss_type, split) + rl.aggregate(loss[2:], mask[2:], loss_type, split)
    torch.testing.assert_close(parts, rl.aggregate(loss, mask, loss_type, whole))


# ----------------------------------------------------------------------------- parity with TRL


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_trl_grpo_trainer(loss_type, beta):
    """TRL 1.16's GRPOTrainer._compute_loss on a stub model that returns fixed per-token log-probs."""
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    torch.manual_seed(1)
    B, T = 4, 5
    logps = torch.randn(B, T) * 0.1 - 1.0
    old = logps + torch.randn(B, T) * 0.3
    ref = logps + torch.randn(B, T) * 0.2
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.__dict__.update(
        beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda t: t.reshape(-1), reduce=lambda t, reduction=None: t,
                                    gather_for_metrics=lambda t: t.reshape(-1)),
        model=SimpleNamespace(training=True), _metrics={"train": __import__("collections").defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros(B, T), None)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    try:
        expected = trainer._compute_loss(None, inputs)
    except (AttributeError, KeyError, TypeError) as e:  # a private API: name the drift instead of a false pass
        pytest.fail(f"TRL's _compute_loss changed shape ({type(e).__name__}: {e}); update this test")
    out = rl.clipped_surrogate(logps, old, adv, 0.2, 0.28, beta, ref if beta else None)
    totals = rl.Totals(sequences=B, tokens=int(mask.sum()), micro_batches=1, max_completion_length=T)
    torch.testing.assert_close(rl.aggregate(out.per_token_loss, mask, loss_type, totals), expected)


# ----------------------------------------------------------------------------- reward functions


def test_reward_functions_by_hand():
    prompt = [{"role": "user", "content": "Sort ascending: 3 1 2"}]
    assert load_reward_function("sorting")(prompt, "1 2 3", "") == 1.0
    assert load_reward_function("sorting")(prompt, "1 3 2", "") == pytest.approx(1 / 3)
    assert load_reward_function("exact_match")(prompt, " 1 2 3\n", "1 2 3") == 1.0
    assert load_reward_function("exact_match")(prompt, "1 2", "1 2 3") == 0.0
    assert load_reward_function("format")(prompt, "<think>hm</think>\n<answer>4</answer>", "") == 1.0
    assert load_reward_function("format")(prompt, "<answer>4</answer>", "") == 0.0
    assert final_number("so 3 + 4 = 7 #### 7") == "7" and final_number("the answer is \\boxed{1,234}") == "1234"
    assert numeric_reward(prompt, "I think it is 42.", "steps... #### 42") == 1.0
    assert numeric_reward(prompt, "no idea", "#### 42") == 0.0
    assert reward_identity("sorting") != reward_identity("exact_match")
    assert reward_identity("sorting") == reward_identity("sorting")
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward_function("nonsense")


# ----------------------------------------------------------------------------- dynamic sampling (DAPO)


def _batches(*flags_per_call):
    """A fake generator: call k returns groups whose zero_std flags are flags_per_call[k]."""
    calls = []

    def generate(attempt, need):
        flags = flags_per_call[len(calls)]
        calls.append((attempt, need))
        return [{"id": f"{attempt}.{i}", "zero_std": z} for i, z in enumerate(flags[:need])]

    return generate, calls


def test_dynamic_sampling_drops_zero_std_groups_and_refills():
    from components.core.train.online import collect_round

    generate, calls = _batches([True, False, True, False], [False, True], [False])
    groups, kept, frac = collect_round(generate, 4, dynamic=True, max_resample_rounds=3)
    # 2 kept of 4, then 2 more asked (1 kept), then 1 more asked (kept): 4 in all
    assert calls == [(0, 4), (1, 2), (2, 1)]
    assert [g["id"] for g in kept] == ["0.1", "0.3", "1.0", "2.0"]
    assert len(groups) == 7 and frac == 0.5


def test_dynamic_sampling_gives_up_after_max_rounds_and_without_it_keeps_all():
    from components.core.train.online import collect_round

    generate, calls = _batches([True, True], [True, True], [True, True])
    groups, kept, frac = collect_round(generate, 2, dynamic=True, max_resample_rounds=2)
    assert len(calls) == 3 and frac == 1.0 and [g["id"] for g in kept] == ["2.0", "2.1"]  # the last batch
    generate, calls = _batches([True, False])
    groups, kept, frac = collect_round(generate, 2, dynamic=False, max_resample_rounds=3)
    assert calls == [(0, 2)] and len(kept) == 2 and frac == 0.5


def test_sampling_runs_each_prompt_once_for_its_group_and_samples_as_plain_generate(monkeypatch):
    """sample_chunk prefills a prompt once for its G completions (shared_prompt_cache): the same ids and
    sampler log-probs as generate's own prefill of G copies, with prompts of different lengths (left padding)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from components.core.train import online

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    prompts = [online.Prompt(id=str(i), messages=[], answer="", ids=ids)
               for i, ids in enumerate([[5, 6, 7, 8, 9], [11, 12], [3, 4, 13, 14, 15, 16, 17]])]
    cfg = SimpleNamespace(num_generations=4, max_completion_length=6, temperature=1.0, top_p=1.0)
    calls = []
    real = online.shared_prompt_cache

    def counting(model, input_ids, attention, repeats, synced=False):
        cache = real(model, input_ids, attention, repeats, synced)
        calls.append((tuple(input_ids.shape), repeats, cache.get_seq_length(), cache.layers[0].keys.shape[0]))
        return cache

    monkeypatch.setattr(online, "shared_prompt_cache", counting)
    shared = online.sample_chunk(model, None, prompts, cfg, seed=3, eos=[1], pad_id=0)
    # one prefill row per prompt, all but its last token; the cache then holds one row per completion
    assert calls == [((3, 7), 4, 6, 12)]
    monkeypatch.setattr(online, "shared_prompt_cache", lambda *args: None)
    plain = online.sample_chunk(model, None, prompts, cfg, seed=3, eos=[1], pad_id=0)
    assert len(shared) == len(plain) == 12
    for a, b in zip(shared, plain, strict=True):
        assert a["ids"] == b["ids"] and a["truncated"] == b["truncated"]
        assert a["sampler_logps"] == pytest.approx(b["sampler_logps"], abs=1e-5)


def test_no_shared_prefill_for_a_model_that_picks_its_own_cache_or_one_token_prompts():
    from transformers import LlamaConfig, LlamaForCausalLM

    from components.core.train import online

    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    assert online.shared_prompt_cache(model, ids, mask, 4) is not None
    assert online.shared_prompt_cache(model, ids[:, :1], mask[:, :1], 4) is None
    model.generation_config.cache_implementation = "static"  # generate refuses a cache of ours beside it
    assert online.shared_prompt_cache(model, ids, mask, 4) is None
