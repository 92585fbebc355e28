"""model/logprobs.py: sequence log-probs, shared-prompt and group rows against separate rows, the hidden-state path."""

from __future__ import annotations

import pytest
import torch

from components import bootstrap
from components.core import sorting
from components.core.data import tokens
from components.core.data.tokens import IGNORE_INDEX
from components.core.model import logprobs


@pytest.fixture(scope="module")
def tiny():
    tok = bootstrap.build_tokenizer(sorting.corpus(3, 4, 9, seed=1), 300)
    model = bootstrap.build_model(tok, 32, 2, 2, 1, 64, 128, seed=1).eval()
    return tok, model


def test_sequence_logps_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))  # (1, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    logps, counts = logprobs.sequence_logps(logits, labels)
    # token 1 predicted by position 0 (p=0.5), token 0 predicted by position 1 (p=0.25)
    torch.testing.assert_close(logps, torch.log(torch.tensor([0.5 * 0.25])))
    assert counts.tolist() == [2]


def test_shared_prompt_logps_equal_separate_rows(tiny):
    tok, model = tiny
    _, prefs = sorting.generate(0, 12, 3, 6, 9, 0.0, seed=5)
    pairs = [tokens.tokenize_pair(tok, {"id": str(i), **r}, 64, 48) for i, r in enumerate(prefs)]
    pairs[0]["rejected_ids"] = pairs[0]["rejected_ids"][:1]  # one-token response: edge of the mask logic
    assert logprobs.shared_prompt_supported(model)
    with torch.no_grad():
        separate = logprobs.pair_logps(model, pairs, tok.pad_token_id, "cpu", share_prompt=False)
        shared = logprobs.pair_logps(model, pairs, tok.pad_token_id, "cpu", share_prompt=True)
    for a, b in zip(separate, shared, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)


def test_shared_prompt_gradients_match(tiny):
    tok, model = tiny
    _, prefs = sorting.generate(0, 6, 3, 5, 9, 0.0, seed=9)
    pairs = [tokens.tokenize_pair(tok, {"id": str(i), **r}, 64, 48) for i, r in enumerate(prefs)]
    grads = []
    for share in (False, True):
        model.zero_grad()
        c, r, _, _ = logprobs.pair_logps(model, pairs, tok.pad_token_id, "cpu", share_prompt=share)
        (c - 0.5 * r).sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_shared_prompt_detected_through_a_ddp_style_wrapper(tiny):
    _, model = tiny

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like: no .config, a .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert logprobs.shared_prompt_supported(Wrapper(model))


def test_group_rows_equal_separate_completion_rows(tiny):
    """GRPO's one-row-per-group layout (prompt computed once, G completions behind it) gives the per-token
    log-probs and entropies of one row per completion, with temperature, incl. an empty and a 1-token one."""
    tok, model = tiny
    prompts = [tokens.prompt_ids_for_generation(tok, [{"role": "user", "content": f"Sort ascending: {i} 3 1"}])
               for i in range(3)]
    prompts[1] = prompts[1][2:]  # another length: left padding in play
    g = torch.Generator().manual_seed(0)
    comps = [[torch.randint(5, 250, (n,), generator=g).tolist() for n in lens]
             for lens in ([4, 1, 6], [3, 3, 0], [5, 2, 2])]
    flat_p = [p for p, cs in zip(prompts, comps, strict=True) for _ in cs]
    flat_c = [c for cs in comps for c in cs]
    with torch.no_grad():
        sep, sep_mask, sep_ent = logprobs.completion_token_logps(model, flat_p, flat_c, tok.pad_token_id, "cpu", 0.7,
                                                                with_entropy=True)
        grp, grp_mask, grp_ent = logprobs.group_token_logps(model, prompts, comps, tok.pad_token_id, "cpu", 0.7,
                                                           with_entropy=True)
    width = sep.shape[1]
    assert torch.equal(sep_mask, grp_mask[:, :width]) and not grp_mask[:, width:].any()
    torch.testing.assert_close(grp[:, :width], sep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grp_ent[:, :width], sep_ent * sep_mask, rtol=1e-5, atol=1e-5)
    assert sep_mask.sum(-1).tolist() == [len(c) for c in flat_c]


@pytest.mark.parametrize("share", [False, True])
def test_hidden_state_path_equals_the_plain_logits_path(tiny, monkeypatch, share):
    """The chunked log-probs from final hidden states (no fp32 (B, T, V) logits) give the values and the
    gradients of the plain path through the model's logits, for pairs (both layouts), SFT NLL and completions."""
    tok, model = tiny
    _, prefs = sorting.generate(0, 6, 3, 5, 9, 0.0, seed=4)
    pairs = [tokens.tokenize_pair(tok, {"id": str(i), **r}, 64, 48) for i, r in enumerate(prefs)]
    seqs = [tokens.prompt_response_to_sequence(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    batch = tokens.collate_sequences(seqs, tok.pad_token_id)
    prompts, comps = [p["prompt_ids"] for p in pairs], [p["rejected_ids"] for p in pairs]

    def run():
        model.zero_grad()
        c, r, nc, nr = logprobs.pair_logps(model, pairs, tok.pad_token_id, "cpu", share_prompt=share)
        nll, n = logprobs.batch_nll(model, batch)
        lp, mask, ent = logprobs.completion_token_logps(model, prompts, comps, tok.pad_token_id, "cpu", 0.8, True)
        ((c - 0.5 * r).sum() + 0.1 * nll + (lp * 0.3).sum()).backward()
        grads = [model.model.embed_tokens.weight.grad.clone(), model.model.layers[1].mlp.up_proj.weight.grad.clone()]
        return [t.detach() for t in (c, r, nc, nr, nll, n, lp, mask, ent)] + grads

    assert logprobs.hidden_path_supported(model)
    chunked = run()
    monkeypatch.setattr(logprobs, "hidden_path_supported", lambda m: False)
    plain = run()
    for a, b in zip(chunked, plain, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)


def test_sliding_window_models_score_separate_rows():
    from transformers import MistralConfig, Qwen2Config

    assert logprobs.uses_sliding_window(MistralConfig(sliding_window=4096))
    assert not logprobs.uses_sliding_window(MistralConfig(sliding_window=None))
    assert not logprobs.uses_sliding_window(Qwen2Config(use_sliding_window=False))
    assert logprobs.uses_sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0))


def test_a_pair_whose_prompt_tokens_differ_is_refused(tiny, monkeypatch):
    tok, _ = tiny
    real = tokens.encode_prompt_response

    def drifting(tokenizer, prompt, response, tools=None):  # a template whose prompt depends on the response
        p, r = real(tokenizer, prompt, response, tools)
        return (p + [5] if response[0]["content"] == "b" else p), r

    monkeypatch.setattr(tokens, "encode_prompt_response", drifting)
    record = {"id": "x", "prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="record x: .*must share the prompt"):
        tokens.tokenize_pair(tok, record, 64, 48)


def spread_pairs(tok) -> list[dict]:
    """Pairs of very different lengths (15 to 91 tokens; a 3-token prompt, a 1-token and an empty response)."""
    _, prefs = sorting.generate(0, 6, 3, 6, 9, 0.0, seed=7)
    pairs = [tokens.tokenize_pair(tok, {"id": str(i), **r}, 64, 48) for i, r in enumerate(prefs)]
    pairs[1]["chosen_ids"] = pairs[1]["chosen_ids"] * 12
    pairs[2]["rejected_ids"] = pairs[2]["rejected_ids"][:1]
    pairs[3]["prompt_ids"] = pairs[3]["prompt_ids"][-3:]
    pairs[4]["rejected_ids"] = pairs[4]["rejected_ids"] * 5
    pairs[5]["chosen_ids"] = []
    return pairs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_pairs_equal_padded_rows_values_and_gradients(tiny, attn):
    """dpo/reference.padding_free: the pairs end to end (one row, or rows of at most the longest pair) give the
    padded shared-prompt layout's per-pair log-probs, token counts and parameter gradients."""
    import copy

    tok, model = tiny
    model = copy.deepcopy(model)
    model.set_attn_implementation(attn)
    pairs = spread_pairs(tok)
    one_row = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    results = []
    for layout in ({"padding_free": False}, {"padding_free": True}, {"padding_free": True, "max_tokens": one_row}):
        model.zero_grad()
        c, r, nc, nr = logprobs.pair_logps(model, pairs, tok.pad_token_id, "cpu", share_prompt=True, **layout)
        (c - 0.5 * r).sum().backward()
        grads = [model.model.layers[0].self_attn.q_proj.weight.grad.clone(),
                 model.model.embed_tokens.weight.grad.clone()]
        results.append(([c.detach(), r.detach()], [nc, nr], grads))
    padded = results[0]
    assert padded[1][0].tolist() == [len(p["chosen_ids"]) for p in pairs]
    for logps, counts, grads in results[1:]:
        for a, b in zip(logps, padded[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(counts, padded[1], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(grads, padded[2], strict=True):  # summed over many more terms: rtol as the shared-prompt test
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_padding_free_plain_logits_path_equals_hidden_path(tiny, monkeypatch):
    """Models whose decoder cannot be reached score the packed rows through their logits: the same numbers."""
    tok, model = tiny
    pairs = spread_pairs(tok)
    with torch.no_grad():
        hidden = logprobs.pair_logps(model, pairs, tok.pad_token_id, "cpu", padding_free=True)
        monkeypatch.setattr(logprobs, "hidden_path_supported", lambda m: False)
        plain = logprobs.pair_logps(model, pairs, tok.pad_token_id, "cpu", padding_free=True)
    for a, b in zip(hidden, plain, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)
