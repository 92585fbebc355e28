"""chunked_token_logps against the plain log_softmax path: values, gradients, entropy, no_grad, bf16, and
what the autograd node keeps for backward (the point of chunking: never the (N, V) logits)."""

from __future__ import annotations

import pytest
import torch

from components.core.model.chunked_logps import chunked_token_logps


def plain(h, w, t, temperature=1.0, bias=None):
    """The reference: full fp32 (N, V) logits. Returns (logps (N,), entropy (N,))."""
    logits = h @ w.T if bias is None else h @ w.T + bias
    logp_all = torch.log_softmax(logits.float() / temperature, -1)
    return logp_all.gather(-1, t[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def make(n=13, v=37, h=8, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    b = torch.randn(v, generator=g, dtype=dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


@pytest.mark.parametrize("chunk", [1, 3, 13, 50])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_match_plain(chunk, temperature):
    hidden, weight, bias, targets = make(bias=True)  # N = 13: not divisible by 3
    for b in (None, bias):
        got, ent = chunked_token_logps(hidden, weight, targets, temperature, chunk, bias=b)
        assert ent is None and got.dtype == torch.float32 and got.shape == (13,)
        torch.testing.assert_close(got, plain(hidden, weight, targets, temperature, b)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 50])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradients_match_plain(chunk, temperature):
    hidden, weight, bias, targets = make(bias=True)
    coef = torch.randn(13, generator=torch.Generator().manual_seed(1))  # a random upstream gradient
    other = torch.randn_like(weight)

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        logps = fn(*leaves)
        # The weight's second use (as a tied embedding would be) must still receive its own gradient.
        ((logps * coef).sum() + (leaves[1] * other).sum()).backward()
        return [x.grad for x in leaves]

    ours = grads(lambda h, w, b: chunked_token_logps(h, w, targets, temperature, chunk, bias=b)[0])
    ref = grads(lambda h, w, b: plain(h, w, targets, temperature, b)[0])
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grad_only_where_required():
    hidden, weight, _, targets = make()
    hidden.requires_grad_()  # frozen LM head, trainable body (LoRA)
    chunked_token_logps(hidden, weight, targets, chunk_size=4)[0].sum().backward()
    hidden_ref = hidden.detach().clone().requires_grad_()
    plain(hidden_ref, weight, targets)[0].sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    hidden, weight, bias, targets = make(n=5, v=7, h=3, dtype=torch.float64, bias=True)
    inputs = tuple(x.requires_grad_() for x in (hidden, weight, bias))
    assert chunked_token_logps(*inputs[:2], targets)[0].dtype == torch.float64  # fp32 output would fail gradcheck
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_token_logps(h, w, targets, 0.7, 2, bias=b)[0], inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_matches_plain_and_has_no_grad(temperature):
    hidden, weight, _, targets = make()
    weight.requires_grad_()
    logps, ent = chunked_token_logps(hidden, weight, targets, temperature, 4, with_entropy=True)
    ref_logps, ref_ent = plain(hidden, weight, targets, temperature)
    assert logps.requires_grad and not ent.requires_grad and ent.dtype == torch.float32
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=1e-5)


def test_no_grad_matches_and_tracks_nothing():
    hidden, weight, _, targets = make()
    weight.requires_grad_()
    with torch.no_grad():
        logps, ent = chunked_token_logps(hidden, weight, targets, 0.7, 4, with_entropy=True)
    assert not logps.requires_grad and logps.grad_fn is None and not ent.requires_grad
    ref_logps, ref_ent = plain(hidden, weight.detach(), targets, 0.7)
    torch.testing.assert_close(logps, ref_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)


def test_bf16_hidden_close_to_fp32():
    hidden, weight, _, targets = make(n=32, v=64, h=16)
    hidden_bf16 = hidden.bfloat16().requires_grad_()  # bf16 activations against fp32 master weights
    weight.requires_grad_()
    logps, _ = chunked_token_logps(hidden_bf16, weight, targets, chunk_size=5)
    assert logps.dtype == torch.float32
    ref = plain(hidden_bf16.detach().float(), weight.detach(), targets)[0]
    torch.testing.assert_close(logps.detach(), ref, atol=5e-2, rtol=1e-2)  # bf16 logits: ~3 significant digits
    logps.sum().backward()
    assert hidden_bf16.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32


def test_autocast_follows_autocast_dtype():
    hidden, weight, _, targets = make(n=16, v=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_token_logps(hidden, weight, targets, chunk_size=3)[0]
        lm_logits = torch.nn.functional.linear(hidden, weight)  # what the model's lm_head would give
    assert lm_logits.dtype == torch.bfloat16
    ref = torch.log_softmax(lm_logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)  # same bf16 matmul, hence the same numbers


def test_saves_no_logits():
    n, v, h = 4096, 32000, 64
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    logps, _ = chunked_token_logps(hidden, weight, targets, chunk_size=256)
    saved = [t for t in logps.grad_fn.saved_tensors if t is not None]  # bias=None is saved as None
    assert len(saved) == 4
    assert sum(t.numel() for t in saved) <= n * h + v * h + n * 2  # inputs + targets + per-row lse
    assert sorted(tuple(t.shape) for t in saved) == [(n,), (n,), (n, h), (v, h)]  # nothing (chunk, V) or (N, V)


def test_empty():
    _, weight, _, _ = make()
    hidden = torch.zeros(0, 8, requires_grad=True)
    logps, ent = chunked_token_logps(hidden, weight, torch.zeros(0, dtype=torch.long), with_entropy=True)
    assert logps.shape == ent.shape == (0,)
