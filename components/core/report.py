"""The evaluation report: matplotlib figures and one self-contained HTML page (figures inlined as PNG).

Pure rendering: `build_report(...)` turns the numbers evaluate computed into PNG bytes and HTML text;
`write_report(...)` puts them on disk as one atomic directory. No model or metric is computed here.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.core.io import atomic_dir, write_json, write_jsonl

PALETTE = {"sft": "#8c96a8", "dpo": "#3b6fd9", "grpo": "#e08a2c", "win": "#2e9e6b", "tie": "#c9cdd6",
           "loss": "#d9534f"}


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


def plot_training_curves(sft_rows: list[dict], dpo_rows: list[dict], grpo_rows: list[dict] | None = None) -> bytes | None:
    """One panel per quantity that exists: SFT loss, DPO loss, DPO reward margins, DPO accuracies, GRPO reward
    and its zero-std share."""
    import matplotlib.pyplot as plt

    grpo_rows = grpo_rows or []

    panels = [
        ("SFT loss", sft_rows, [("train/loss", "train"), ("eval/loss", "held-out")]),
        ("DPO loss", dpo_rows, [("train/loss", "train"), ("loss", "train"), ("eval/loss", "held-out")]),
        ("DPO reward margin", dpo_rows, [("rewards/margins", "train"), ("eval/rewards/margins", "held-out")]),
        ("DPO preference accuracy", dpo_rows,
         [("rewards/accuracies", "train"), ("eval/rewards/accuracies", "held-out")]),
        ("GRPO reward (rollouts)", grpo_rows, [("reward", "mean"), ("frac_reward_zero_std", "zero-std groups")]),
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


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f6fa;color:#1f2430}
main{max-width:1180px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:34px 0 12px;color:#2b3242}
.sub{color:#5f6878;font-size:13px;margin-bottom:22px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:14px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(20,30,60,.08);border-top:4px solid #3b6fd9}
.card.good{border-top-color:#2e9e6b}.card.bad{border-top-color:#d9534f}.card.neutral{border-top-color:#8c96a8}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#5f6878}
.card .value{font-size:28px;font-weight:650;margin:6px 0 2px}
.card .detail{font-size:12.5px;color:#5f6878}
.arrow{color:#8c96a8;font-weight:400;font-size:20px;margin:0 4px}
figure{background:#fff;border-radius:10px;padding:12px;margin:0 0 14px;box-shadow:0 1px 3px rgba(20,30,60,.08)}
figure img{max-width:100%;display:block;margin:0 auto}
figcaption{font-size:12.5px;color:#5f6878;margin-top:6px}
table{border-collapse:collapse;width:100%;background:#fff;border-radius:10px;overflow:hidden;
      box-shadow:0 1px 3px rgba(20,30,60,.08);font-size:13px}
th,td{padding:8px 10px;border-bottom:1px solid #e7eaf0;vertical-align:top;text-align:left}
th{background:#eef1f7;font-weight:600;color:#2b3242}
td.text{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
td.num{font-variant-numeric:tabular-nums;text-align:right;white-space:nowrap}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-size:11.5px;font-weight:600;color:#fff}
.badge.win{background:#2e9e6b}.badge.loss{background:#d9534f}.badge.tie{background:#a3aab8}
.metrics{display:grid;grid-template-columns:1fr 1fr;gap:14px;align-items:start}
footer{margin-top:30px;font-size:12px;color:#8a92a3}
"""


def _card(label: str, value: str, detail: str, tone: str = "") -> str:
    return (f'<div class="card {tone}"><div class="label">{html.escape(label)}</div>'
            f'<div class="value">{value}</div><div class="detail">{detail}</div></div>')


def render_html(metrics: dict, samples: list[dict], images: dict[str, bytes], setup: dict, confidence: float) -> str:
    m = metrics
    esc = html.escape
    delta = m["eval/reward_delta"]
    win_tone = "good" if m["eval/win_rate_ci_low"] > 0.5 else "bad" if m["eval/win_rate_ci_high"] < 0.5 else "neutral"
    cards = [
        _card("Judge reward", f'{m["eval/sft/reward_mean"]:.3f}<span class="arrow">→</span>{m["eval/reward_mean"]:.3f}',
              f'SFT → DPO, Δ {delta:+.3f} [{m["eval/reward_delta_ci_low"]:+.3f}, {m["eval/reward_delta_ci_high"]:+.3f}]',
              "good" if m["eval/reward_delta_ci_low"] > 0 else "bad" if m["eval/reward_delta_ci_high"] < 0 else "neutral"),
        _card("Win rate vs SFT", f'{m["eval/win_rate_vs_sft"]:.1%}',
              f'{confidence:.0%} CI [{m["eval/win_rate_ci_low"]:.1%}, {m["eval/win_rate_ci_high"]:.1%}]; ties count ½',
              win_tone),
        _card("KL to reference", f'{m["eval/kl_to_reference"]:.2f}',
              "nats per response, KL(π_DPO ‖ π_SFT), Monte-Carlo on DPO samples"),
        _card("Length ratio", f'{m["eval/length_ratio"]:.2f}×',
              f'DPO {m["eval/length_mean"]:.1f} vs SFT {m["eval/sft/length_mean"]:.1f} tokens'),
        _card("Preference accuracy", f'{m["eval/rewards/accuracies"]:.1%}',
              f'DPO implicit reward, held-out pairs; likelihood: SFT {m["eval/sft/logp_accuracy"]:.1%} '
              f'→ DPO {m["eval/logp_accuracy"]:.1%}'),
    ]
    if "eval/reward_eq_1" in m:
        cards.append(_card("Exactly solved", f'{m["eval/sft/reward_eq_1"]:.1%}<span class="arrow">→</span>'
                                             f'{m["eval/reward_eq_1"]:.1%}', "SFT → DPO, share of prompts with reward 1"))
    if "eval/grpo/reward_mean" in m:
        g = "eval/grpo/"
        cards.append(_card("GRPO judge reward", f'{m["eval/sft/reward_mean"]:.3f}<span class="arrow">→</span>'
                                                f'{m[g + "reward_mean"]:.3f}',
                           f'SFT → GRPO, Δ {m[g + "reward_delta"]:+.3f} [{m[g + "reward_delta_ci_low"]:+.3f}, '
                           f'{m[g + "reward_delta_ci_high"]:+.3f}]',
                           "good" if m[g + "reward_delta_ci_low"] > 0 else "bad" if m[g + "reward_delta_ci_high"] < 0
                           else "neutral"))
        cards.append(_card("GRPO win rate", f'{m[g + "win_rate_vs_sft"]:.1%}',
                           f'vs SFT [{m[g + "win_rate_ci_low"]:.1%}, {m[g + "win_rate_ci_high"]:.1%}]; vs DPO '
                           f'{m[g + "win_rate_vs_dpo"]:.1%} [{m[g + "win_rate_vs_dpo_ci_low"]:.1%}, '
                           f'{m[g + "win_rate_vs_dpo_ci_high"]:.1%}]'))
        extra = (f'exact {m[g + "reward_eq_1"]:.1%}; ' if g + "reward_eq_1" in m else "")
        cards.append(_card("GRPO KL · length", f'{m[g + "kl_to_reference"]:.2f}',
                           f'{extra}KL(π_GRPO ‖ π_SFT) nats; length ×{m[g + "length_ratio"]:.2f} vs SFT', "neutral"))
    if "eval/sft/perplexity" in m:
        cards.append(_card("Held-out perplexity", f'{m["eval/sft/perplexity"]:.3f}<span class="arrow">→</span>'
                                                  f'{m["eval/perplexity"]:.3f}', "SFT → DPO, assistant tokens", "neutral"))

    captions = {
        "win_rate.png": "Each held-out prompt is answered once by each model (same random numbers) and judged; "
                        "the interval is a percentile bootstrap over prompts.",
        "margins.png": "Left: how much more likely each model finds the preferred answer. Right: the DPO implicit "
                       "reward margin against the cached reference log-probs; accuracy = share right of 0.",
        "distributions.png": "Dashed lines are means. A DPO length distribution far right of SFT's hints at length "
                             "exploitation.",
        "training_curves.png": "From plots/sft.csv and plots/dpo.csv.",
    }
    figures = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(captions.get(name, ''))}</figcaption></figure>"
        for name, png in images.items()
    )

    rows = []
    with_grpo = bool(samples) and "grpo_response" in samples[0]
    for s in samples:
        outcome = {1.0: ("win", "DPO"), 0.5: ("tie", "tie"), 0.0: ("loss", "SFT")}[s["win"]]
        grpo_cells = (f'<td class="text">{esc(s["grpo_response"])}</td><td class="num">{s["grpo_score"]:.3f}</td>'
                      if with_grpo else "")
        rows.append(
            f'<tr><td class="text">{esc(s["prompt_text"])}</td>'
            f'<td class="text">{esc(s["sft_response"])}</td><td class="num">{s["sft_score"]:.3f}</td>'
            f'<td class="text">{esc(s["dpo_response"])}</td><td class="num">{s["dpo_score"]:.3f}</td>'
            f'<td><span class="badge {outcome[0]}">{outcome[1]}</span></td>{grpo_cells}</tr>'
        )
    grpo_head = "<th>GRPO response</th><th>score</th>" if with_grpo else ""
    sample_table = (
        '<table class="samples"><thead><tr><th style="width:24%">Prompt</th><th>SFT response</th><th>score</th>'
        f"<th>DPO response</th><th>score</th><th>DPO vs SFT</th>{grpo_head}</tr></thead><tbody>" + "".join(rows)
        + "</tbody></table>"
        if rows else "<p>No samples requested (evaluate.num_samples_in_report = 0).</p>"
    )
    items = sorted(m.items())
    half = (len(items) + 1) // 2
    metric_tables = "".join(
        '<table><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>'
        + "".join(f'<tr><td>{esc(k)}</td><td class="num">{v:.6g}</td></tr>' for k, v in part)
        + "</tbody></table>"
        for part in (items[:half], items[half:]) if part
    )
    setup_text = " · ".join(f"{esc(str(k))} = {esc(str(v))}" for k, v in setup.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>alignflow evaluation: DPO vs SFT</title><style>{CSS}</style></head>
<body><main>
<h1>DPO vs SFT on held-out data</h1>
<div class="sub">{setup_text}</div>
<div class="cards">{"".join(cards)}</div>
<h2>Results</h2>
{figures}
<h2>Sample generations</h2>
{sample_table}
<h2>All metrics</h2>
<div class="metrics">{metric_tables}</div>
<footer>Generated by components/evaluate.py (alignflow). Scores: judge = {esc(str(setup.get("judge", "")))}.</footer>
</main></body></html>
"""


def build_report(metrics: dict, samples: list[dict], *, wins: list[float], sft_logp_margin: list[float],
                 dpo_logp_margin: list[float], reward_margins: list[float], lengths: dict[str, list[int]],
                 scores: dict[str, list[float]], sft_curves_path: str, dpo_curves_path: str, setup: dict,
                 confidence: float, num_samples: int, grpo_curves_path: str = "") -> tuple[dict[str, bytes], str]:
    """(PNG bytes by file name, HTML page) of the evaluation report."""
    images: dict[str, bytes] = {
        "win_rate.png": plot_win_rate(wins, metrics["eval/win_rate_vs_sft"], metrics["eval/win_rate_ci_low"],
                                      metrics["eval/win_rate_ci_high"], confidence),
        "margins.png": plot_margins(sft_logp_margin, dpo_logp_margin, reward_margins, setup["β"]),
        "distributions.png": plot_distributions(lengths, scores),
    }
    curves = plot_training_curves(read_curves(sft_curves_path), read_curves(dpo_curves_path),
                                  read_curves(grpo_curves_path))
    if curves:
        images["training_curves.png"] = curves
    return images, render_html(metrics, samples[:num_samples], images, setup, confidence)


def write_report(report_dir: str, images: dict[str, bytes], page: str, samples: list[dict], metrics: dict,
                 extra_json: dict[str, dict] | None = None) -> None:
    """reports/eval/: index.html, the PNGs, samples.jsonl, metrics.json (+ extra_json files), swapped in complete."""
    with atomic_dir(report_dir) as tmp:
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)
        for name, png in images.items():
            (tmp / name).write_bytes(png)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        write_jsonl(tmp / "samples.jsonl", samples)
        write_json(tmp / "metrics.json", metrics)
