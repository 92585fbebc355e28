"""Statistics of evaluation and of the promotion gate: small pure functions over per-prompt values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def bootstrap_ci(values: Sequence[float], n_resamples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13)."""
    x = np.asarray(values, dtype=np.float64)  # (N,)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // x.size)  # bound memory: (chunk, N) indices at a time
    for start in range(0, n_resamples, chunk):
        n = min(chunk, n_resamples - start)
        means[start : start + n] = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(x.mean()), float(low), float(high)


def bootstrap_ratio_ci(numerator: Sequence[float], denominator: Sequence[float], n_resamples: int,
                       confidence: float, seed: int, floor: float = 1.0) -> tuple[float, float, float]:
    """(ratio, low, high): mean(numerator) / max(mean(denominator), floor), prompts resampled in pairs."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)  # (N,), (N,)
    if a.size == 0 or a.size != b.size:
        raise ValueError(f"bootstrap_ratio_ci needs paired values, got {a.size} and {b.size}")
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // a.size)
    for start in range(0, n_resamples, chunk):
        n = min(chunk, n_resamples - start)
        idx = rng.integers(0, a.size, size=(n, a.size))
        ratios[start : start + n] = a[idx].mean(axis=1) / np.maximum(b[idx].mean(axis=1), floor)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return float(a.mean() / max(b.mean(), floor)), float(low), float(high)


def win_values(challenger: Sequence[float], baseline: Sequence[float], tol: float = 1e-9) -> list[float]:
    """Per-prompt outcome of challenger vs baseline: win 1, tie 0.5, loss 0 (ties within tol)."""
    return [0.5 if abs(c - b) <= tol else float(c > b) for c, b in zip(challenger, baseline, strict=True)]


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, Eq. 5); (N,)."""
    return beta * (policy_logps - reference_logps)
