"""The evaluation report: matplotlib figures and one self-contained HTML page (figures inlined as PNG).

Pure rendering: `build_report(...)` turns the numbers evaluate computed into PNG bytes (core/eval/figures.py) and HTML;
`write_report(...)` puts them on disk as one atomic directory. No model or metric is computed here.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from components.core.eval.figures import (
    ONLINE,
    plot_distributions,
    plot_margins,
    plot_reliability,
    plot_training_curves,
    plot_win_rate,
    read_curves,
)
from components.core.ops.io import atomic_dir, write_json, write_jsonl


def methods_table(m: dict) -> str:
    """SFT, DPO and every online policy side by side: judge reward (Δ and CI), exact solves, win rate, KL,
    length and the reward model's score (the proxy next to the true reward)."""
    esc = html.escape
    rm = "eval/sft/rm_score_mean" in m
    head = ("<tr><th>policy</th><th>judge reward</th><th>Δ vs SFT [CI]</th><th>exact solves</th>"
            "<th>win vs SFT</th><th>win vs DPO</th><th>KL to SFT</th><th>length</th>"
            + ("<th>reward-model score</th>" if rm else "") + "</tr>")

    def cell(key: str, fmt: str = "{:.3f}") -> str:
        return f'<td class="num">{fmt.format(m[key])}</td>' if key in m else '<td class="num">–</td>'

    rows = [f'<tr><td>SFT</td>{cell("eval/sft/reward_mean")}<td class="num">–</td>'
            f'{cell("eval/sft/reward_eq_1", "{:.1%}")}<td class="num">–</td><td class="num">–</td>'
            f'<td class="num">0</td>{cell("eval/sft/length_mean", "{:.1f}")}'
            + (cell("eval/sft/rm_score_mean") if rm else "") + "</tr>"]
    for name in ("base", "dpo", *ONLINE):
        p = "eval/" if name == "dpo" else f"eval/{name}/"
        if p + "reward_mean" not in m:
            continue
        delta = (f'<td class="num">{m[p + "reward_delta"]:+.3f} [{m[p + "reward_delta_ci_low"]:+.3f}, '
                 f'{m[p + "reward_delta_ci_high"]:+.3f}]</td>')
        rows.append(f"<tr><td>{esc(name.upper())}</td>{cell(p + 'reward_mean')}{delta}"
                    f"{cell(p + 'reward_eq_1', '{:.1%}')}{cell(p + 'win_rate_vs_sft', '{:.1%}')}"
                    + (cell(p + "win_rate_vs_dpo", "{:.1%}") if name != "dpo" else '<td class="num">–</td>')
                    + f"{cell(p + 'kl_to_reference', '{:.2f}')}{cell(p + 'length_mean', '{:.1f}')}"
                    + (cell(p + "rm_score_mean") if rm else "") + "</tr>")
    return f'<table class="methods"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


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
    if "eval/sft/tool/success" in m:  # an environment with tools: success with and without them
        t = "eval/grpo/tool/" if "eval/grpo/tool/success" in m else "eval/sft/tool/"
        d = (f'Δ vs SFT {m[t + "success_delta_vs_sft"]:+.1%} [{m[t + "success_delta_vs_sft_ci_low"]:+.1%}, '
             f'{m[t + "success_delta_vs_sft_ci_high"]:+.1%}]; ' if t != "eval/sft/tool/" else "")
        cards.append(_card("Task success with the tool", f'{m["eval/sft/tool/success"]:.1%}<span class="arrow">→</span>'
                                                         f'{m[t + "success"]:.1%}',
                           f'SFT → {t.split("/")[1].upper()}; {d}without the tool {m["eval/sft/tool/success_without_tool"]:.1%}'
                           f' → {m[t + "success_without_tool"]:.1%}; {m[t + "calls_per_episode"]:.2f} calls per episode',
                           "good" if t != "eval/sft/tool/" and m[t + "success_delta_vs_sft_ci_low"] > 0 else "neutral"))
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
        "training_curves.png": "From plots/<stage>.csv of each training stage.",
        "reward_model_calibration.png": "Held-out pairs, each counted in both orders; on the diagonal, a predicted "
                                        "70% means the labelled order holds 70% of the time.",
    }
    figures = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(captions.get(name, ''))}</figcaption></figure>"
        for name, png in images.items()
    )

    rows = []
    online = [n for n in (*ONLINE, "base") if samples and f"{n}_response" in samples[0]]
    for s in samples:
        outcome = {1.0: ("win", "DPO"), 0.5: ("tie", "tie"), 0.0: ("loss", "SFT")}[s["win"]]
        grpo_cells = "".join(f'<td class="text">{esc(s[n + "_response"])}</td><td class="num">{s[n + "_score"]:.3f}</td>'
                             for n in online)
        rows.append(
            f'<tr><td class="text">{esc(s["prompt_text"])}</td>'
            f'<td class="text">{esc(s["sft_response"])}</td><td class="num">{s["sft_score"]:.3f}</td>'
            f'<td class="text">{esc(s["dpo_response"])}</td><td class="num">{s["dpo_score"]:.3f}</td>'
            f'<td><span class="badge {outcome[0]}">{outcome[1]}</span></td>{grpo_cells}</tr>'
        )
    grpo_head = "".join(f"<th>{n.upper()} response</th><th>score</th>" for n in online)
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
<h2>Methods side by side</h2>
{methods_table(m)}
<p class="sub">Same held-out prompts and random numbers for every policy. The judge is the true reward; the
reward-model score is the proxy PPO and RLOO were trained on: a policy whose reward-model score rises while its
judge reward does not is exploiting the reward model.</p>
<h2>Results</h2>
{figures}
<h2>Sample generations</h2>
{sample_table}
<h2>All metrics</h2>
<div class="metrics">{metric_tables}</div>
<footer>Generated by components/evaluate.py (alignflow). Scores: judge = {esc(str(setup.get("judge", "")))}.</footer>
</main></body></html>
"""


def build_report(metrics: dict, samples: list[dict], *, wins: list[float], logp_margins: dict[str, list[float]],
                 reward_margins: list[float], lengths: dict[str, list[int]], scores: dict[str, list[float]],
                 curves: dict[str, str], setup: dict, confidence: float, num_samples: int,
                 reward_model_report: str = "") -> tuple[dict[str, bytes], str]:
    """(PNG bytes by file name, HTML page) of the evaluation report.

    logp_margins: log p(chosen) - log p(rejected) per held-out pair, for sft and dpo; curves: policy name -> the
    plots/<stage>.csv its training wrote (missing files are left out of the figure).
    """
    images: dict[str, bytes] = {
        "win_rate.png": plot_win_rate(wins, metrics["eval/win_rate_vs_sft"], metrics["eval/win_rate_ci_low"],
                                      metrics["eval/win_rate_ci_high"], confidence),
        "margins.png": plot_margins(logp_margins["sft"], logp_margins["dpo"], reward_margins, setup["β"]),
        "distributions.png": plot_distributions(lengths, scores),
    }
    training = plot_training_curves(*(read_curves(curves.get(n, "")) for n in ("sft", "dpo", *ONLINE)))
    if training:
        images["training_curves.png"] = training
    if reward_model_report and Path(reward_model_report).exists():
        import json

        reliability = plot_reliability(json.loads(Path(reward_model_report).read_text()))
        if reliability:
            images["reward_model_calibration.png"] = reliability
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
