"""train/online.py: dynamic sampling, shared-prefix sampling equal to plain generate."""

from __future__ import annotations

import pytest
import torch


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
    from transformers import LlamaConfig, LlamaForCausalLM

    from components.core.train import online

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    prompts = [online.Prompt(id=str(i), messages=[], answer="", ids=ids)
               for i, ids in enumerate([[5, 6, 7, 8, 9], [11, 12], [3, 4, 13, 14, 15, 16, 17]])]
    sampling = online.Sampling(num_generations=4, max_completion_length=6, temperature=1.0, top_p=1.0,
                               generation_batch_size=3, eos=[1], pad_id=0)
    calls = []
    real = online.shared_prompt_cache

    def counting(model, input_ids, attention, repeats, synced=False):
        cache = real(model, input_ids, attention, repeats, synced)
        calls.append((tuple(input_ids.shape), repeats, cache.get_seq_length(), cache.layers[0].keys.shape[0]))
        return cache

    monkeypatch.setattr(online, "shared_prompt_cache", counting)
    shared = online.sample_chunk(model, prompts, sampling, seed=3)
    # one prefill row per prompt, all but its last token; the cache then holds one row per completion
    assert calls == [((3, 7), 4, 6, 12)]
    monkeypatch.setattr(online, "shared_prompt_cache", lambda *args: None)
    plain = online.sample_chunk(model, prompts, sampling, seed=3)
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
