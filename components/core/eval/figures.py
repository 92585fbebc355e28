"""The evaluation report's figures: matplotlib charts as PNG bytes (training curves, win rate, margins,
distributions, the reward model's reliability diagram). Pure rendering of numbers evaluate computed."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PALETTE = {"base": "#4a4f5c", "sft": "#8c96a8", "dpo": "#3b6fd9", "grpo": "#e08a2c", "ppo": "#8e5bd0", "rloo": "#c2477f",
           "win": "#2e9e6b", "tie": "#c9cdd6", "loss": "#d9534f"}
ONLINE = ("grpo", "ppo", "rloo")


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def read_curves(path: str) -> list[dict]:
    import csv

    if not path or not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], column: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        try:
            x, y = float(r["step"]), float(r.get(column) or "nan")
        except (KeyError, ValueError):
            continue
        if math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot_training_curves(sft_rows: list[dict], dpo_rows: list[dict], grpo_rows: list[dict] | None = None,
                         ppo_rows: list[dict] | None = None, rloo_rows: list[dict] | None = None) -> bytes | None:
    """One panel per quantity that exists: SFT loss, DPO loss, DPO reward margins, DPO accuracies, GRPO reward
    and its zero-std share, PPO / RLOO reward-model score against the true reward of the same rollouts."""
    import matplotlib.pyplot as plt

    grpo_rows, ppo_rows, rloo_rows = grpo_rows or [], ppo_rows or [], rloo_rows or []

    panels = [
        ("SFT loss", sft_rows, [("train/loss", "train"), ("eval/loss", "held-out")]),
        ("DPO loss", dpo_rows, [("train/loss", "train"), ("loss", "train"), ("eval/loss", "held-out")]),
        ("DPO reward margin", dpo_rows, [("rewards/margins", "train"), ("eval/rewards/margins", "held-out")]),
        ("DPO preference accuracy", dpo_rows,
         [("rewards/accuracies", "train"), ("eval/rewards/accuracies", "held-out")]),
        ("GRPO reward (rollouts)", grpo_rows, [("reward", "mean"), ("frac_reward_zero_std", "zero-std groups")]),
        *((f"{name.upper()} rollouts: RM score vs true reward", rows,
           [("objective/scores", "score trained on"), ("true_reward", "true reward")])
          for name, rows in (("ppo", ppo_rows), ("rloo", rloo_rows))),
    ]
    panels = [(t, rows, [(c, lab, _series(rows, c)) for c, lab in cols]) for t, rows, cols in panels]
    # keep the first non-empty column per label (dpo.csv calls its train loss "loss")
    panels = [(t, rows, [s for s in cols if s[2][0]]) for t, rows, cols in panels]
    panels = [(t, rows, [s for i, s in enumerate(cols) if s[1] not in {c[1] for c in cols[:i]}])
              for t, rows, cols in panels]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, _, cols) in zip(axes[0], panels, strict=True):
        for i, (_, label, (xs, ys)) in enumerate(cols):
            style = {"color": "#3b6fd9", "lw": 1.4} if i == 0 else {"color": "#e08a2c", "lw": 2, "marker": "o", "ms": 3}
            ax.plot(xs, ys, label=label, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.tight_layout()
    return _figure_png(fig)


def _hist(ax, data: dict[str, Sequence[float]], bins: int = 30, integer: bool = False) -> None:
    """Histograms on shared bins, bars side by side (an overlay hides one model when they agree)."""
    values = [v for vs in data.values() for v in vs]
    if not values:
        return
    lo, hi = min(values), max(values)
    if integer:
        edges = np.arange(math.floor(lo) - 0.5, math.ceil(hi) + 1.5, max(1, math.ceil((hi - lo + 1) / bins)))
    else:
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    width = (edges[1] - edges[0]) / len(data)
    for k, (name, vs) in enumerate(data.items()):
        counts, _ = np.histogram(vs, bins=edges)
        ax.bar(edges[:-1] + k * width, counts, width=width, align="edge", color=PALETTE[name], alpha=0.85,
               label=f"{name.upper()} (mean {np.mean(vs):.2f})", edgecolor="white", linewidth=0.4)
        ax.axvline(float(np.mean(vs)), color=PALETTE[name], lw=1.5, ls="--")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
    if integer:  # a few empty units either side, so a one-value distribution still reads as a bar at n
        ax.set_xlim(min(edges[0], lo - 3), max(edges[-1], hi + 3))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot_margins(sft_margin: list[float], dpo_margin: list[float], dpo_reward_margin: list[float], beta: float) -> bytes:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    _hist(a, {"sft": sft_margin, "dpo": dpo_margin})
    a.axvline(0, color="black", lw=0.8)
    a.set_title("log π(chosen) − log π(rejected), held-out pairs", fontsize=10)
    a.set_xlabel("nats (right of 0 = prefers the chosen answer)", fontsize=9)
    _hist(b, {"dpo": dpo_reward_margin})
    b.axvline(0, color="black", lw=0.8)
    b.set_title(f"DPO implicit reward margin (β = {beta:g})", fontsize=10)
    b.set_xlabel("β·[(log π − log π_ref)(chosen) − (…)(rejected)]", fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def plot_win_rate(wins: list[float], rate: float, low: float, high: float, confidence: float) -> bytes:
    import matplotlib.pyplot as plt

    n = len(wins)
    shares = {"win": wins.count(1.0) / n, "tie": wins.count(0.5) / n, "loss": wins.count(0.0) / n}
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 2.6), gridspec_kw={"height_ratios": [1, 1]})
    left = 0.0
    for name, label in (("win", "DPO better"), ("tie", "tie"), ("loss", "SFT better")):
        share = shares[name]
        a.barh(0, share, left=left, color=PALETTE[name], height=0.6)
        if share >= 0.06:
            a.text(left + share / 2, 0, f"{label}\n{share:.0%}", ha="center", va="center", fontsize=8,
                   color="white" if name != "tie" else "#333")
        left += share
    a.set_xlim(0, 1)
    a.axis("off")
    a.set_title(f"Per-prompt outcome, DPO vs SFT ({n} prompts)", fontsize=10)
    b.errorbar([rate], [0], xerr=[[rate - low], [high - rate]], fmt="o", color=PALETTE["dpo"], capsize=6,
               ms=8, lw=2)
    b.axvline(0.5, color="#555", ls="--", lw=1)
    b.text(0.505, -0.5, "no difference", ha="left", fontsize=7, color="#555")
    b.set_xlim(0, 1)
    b.set_ylim(-0.6, 0.6)
    b.set_yticks([])
    b.set_title(f"Win rate {rate:.1%}, {confidence:.0%} bootstrap interval [{low:.1%}, {high:.1%}]", fontsize=10)
    b.tick_params(labelsize=8)
    for side in ("top", "right", "left"):
        b.spines[side].set_visible(False)
    fig.tight_layout()
    return _figure_png(fig)


def plot_distributions(lengths: dict[str, list[int]], scores: dict[str, list[float]]) -> bytes:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    _hist(a, dict(lengths), bins=25, integer=True)
    a.set_title("Response length (tokens)", fontsize=10)
    _hist(b, dict(scores), bins=20)
    b.set_title("Judge score per response", fontsize=10)
    fig.tight_layout()
    return _figure_png(fig)


def plot_reliability(calibration: dict) -> bytes | None:
    """The reward model's reliability diagram: predicted P(chosen preferred) = σ(r_c − r_r) against how often it
    was, per bin, each held-out pair counted in both orders."""
    import matplotlib.pyplot as plt

    bins = calibration.get("bins") or []
    if not bins:
        return None
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.plot([0, 1], [0, 1], color="#555", ls="--", lw=1, label="perfect calibration")
    xs, ys = [b["predicted"] for b in bins], [b["observed"] for b in bins]
    sizes = [20 + 180 * b["count"] / max(c["count"] for c in bins) for b in bins]
    ax.plot(xs, ys, color=PALETTE["ppo"], lw=1.4)
    ax.scatter(xs, ys, s=sizes, color=PALETTE["ppo"], zorder=3, label="bins (size = pairs)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted σ(r_chosen − r_rejected)", fontsize=9)
    ax.set_ylabel("observed share in that order", fontsize=9)
    accuracy = calibration.get("accuracy")
    ax.set_title("Reward model on held-out pairs: " + (f"accuracy {accuracy:.1%}, " if accuracy is not None else "")
                 + f"ECE {calibration.get('ece', float('nan')):.3f}", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)
