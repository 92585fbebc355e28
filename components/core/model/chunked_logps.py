"""Per-token log-probs straight from final hidden states and the LM-head weight, chunked over tokens.

The plain path (`model(...).logits.float()` then log_softmax) holds fp32 (N, V) logits, and autograd keeps them
for backward: at V = 150k and N = 8k that is ~5 GB per copy. Here an autograd.Function computes the logits
`chunk_size` rows at a time, keeps only each row's logsumexp, and recomputes a chunk's logits in backward
(the Liger / torchtune "chunked cross-entropy" trade: one extra LM-head matmul for O(chunk_size * V) memory).

Plain tensors only: under FSDP/DTensor the LM-head weight is sharded, so callers use the plain path there.
Hidden states are the post-final-norm ones: `model.model(...).last_hidden_state`, or
`model(..., output_hidden_states=True, logits_to_keep=1).hidden_states[-1]` (the same tensor in transformers
5.23, checked for Llama and tied-embedding Qwen2); the weight is `model.lm_head.weight` (tied or not). Under
autocast those hidden states come out float32 (fp32 residual stream) and are matmul'd in autocast's dtype, as
`lm_head` would: call this inside the same autocast region as the model.
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax / accumulation dtype: float32, or float64 for float64 inputs (so gradcheck can run)."""
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would run in: autocast's where it is on (it leaves float64 alone), else the
    half-precision input's (bf16 activations against fp32 master weights), else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device)
    return hidden.dtype if hidden.dtype in _HALF else weight.dtype


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """(C, H) x (V, H) -> (C, V) float32 (float64 for float64) tempered logits; h, w, b already in the compute dtype."""
    logits = h @ w.T if b is None else torch.addmm(b, h, w.T)
    logits = logits.to(_acc(logits.dtype))  # a fresh tensor either way: safe to scale in place
    return logits.div_(temperature) if temperature != 1.0 else logits


def _forward(hidden, weight, bias, targets, temperature, chunk_size, with_entropy, dtype):
    """Returns (logps (N,), lse (N,), entropy (N,) or None) in _acc(dtype); nothing of size (N, V) survives."""
    n = hidden.shape[0]
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    logps = torch.empty(n, dtype=_acc(dtype), device=hidden.device)
    lse = torch.empty_like(logps)
    entropy = torch.empty_like(logps) if with_entropy else None
    for s in range(0, n, chunk_size):
        logits = _chunk_logits(hidden[s : s + chunk_size].to(dtype), w, b, temperature)  # (C, V)
        lse[s : s + chunk_size] = row_lse = torch.logsumexp(logits, dim=-1)  # (C,)
        logps[s : s + chunk_size] = logits.gather(1, targets[s : s + chunk_size, None]).squeeze(1) - row_lse
        if entropy is not None:  # H = lse - sum_v p_v z_v, from the chunk already in memory
            entropy[s : s + chunk_size] = row_lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logps, lse, entropy


class _ChunkedTokenLogps(torch.autograd.Function):
    # Autocast is switched off inside and the matmul dtype is chosen explicitly (`_compute_dtype`, stored on
    # ctx) rather than via torch.amp.custom_fwd/custom_bwd: those bind one device type at decoration time, and
    # on CPU the backward runs on the caller's thread, where an ambient autocast would silently recast the
    # backward matmuls. This way forward and backward use the same, visible dtype on every device.

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            logps, lse, entropy = _forward(hidden, weight, bias, targets, temperature, chunk_size, with_entropy,
                                           dtype)
        # Only the inputs and one float per row: the (N, V) logits are recomputed chunk by chunk in backward.
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.dtype, ctx.temperature, ctx.chunk_size = dtype, temperature, chunk_size
        if entropy is None:
            return logps, None
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, t, c = ctx.dtype, ctx.temperature, ctx.chunk_size
        grad_h = torch.empty_like(hidden) if need_h else None
        # Summed over chunks in float32, so the accumulation does not round at each chunk when compute is bf16.
        grad_w = torch.zeros(weight.shape, dtype=_acc(dtype), device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=_acc(dtype), device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            g = grad_logps.to(_acc(dtype))
            for s in range(0, hidden.shape[0], c):
                h = hidden[s : s + c].to(dtype)
                # d logp / d z = onehot(target) - softmax(z), z = logits / T; softmax from the saved lse.
                grad_z = _chunk_logits(h, w, b, t).sub_(lse[s : s + c, None]).exp_()  # (C, V) softmax
                grad_z.mul_(-g[s : s + c, None] / t)
                grad_z.scatter_add_(1, targets[s : s + c, None], (g[s : s + c] / t)[:, None])
                if grad_b is not None:
                    grad_b += grad_z.sum(0)
                grad_z = grad_z.to(dtype)  # the matmuls run in the forward's dtype, as autograd's would
                if grad_h is not None:
                    grad_h[s : s + c] = grad_z @ w
                if grad_w is not None:
                    grad_w += grad_z.T @ h  # in-place add upcasts into the accumulator
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False,
                        bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax((hidden @ weight.T (+ bias)) / temperature)[target] per row, without (N, V) logits.

    hidden (N, H) (any float dtype, e.g. bf16 under autocast), weight (V, H), targets (N,) long ids (callers clamp
    ignored positions to 0 and mask after), bias (V,) or None. Returns (logps (N,) float32, entropy (N,) float32 or
    None; float64 for float64 inputs); entropy (of the tempered distribution, in nats) carries no grad. Peak extra memory is a few
    (chunk_size, V) float32 buffers in forward and backward. Gradients reach hidden, weight and bias in their own
    dtypes and accumulate with any other use of them (tied embeddings).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"want hidden (N, H), weight (V, H), targets (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size must be >= 1 and temperature > 0; got {chunk_size}, {temperature}")
    targets = targets.long()
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        # Frozen model or torch.no_grad: the same loop, with nothing saved for a backward that will not run.
        dtype = _compute_dtype(hidden, weight)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            logps, _, entropy = _forward(hidden, weight, bias, targets, temperature, chunk_size, with_entropy, dtype)
        return logps, entropy
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, float(temperature), int(chunk_size), with_entropy)
