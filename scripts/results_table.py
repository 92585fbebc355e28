"""The README's results table of the embedded default, from a pipeline run's metrics files.

    python scripts/results_table.py             # print the table of this checkout's run (metrics/*.json)
    python scripts/results_table.py --record    # ... and keep it: benchmarks/results/default_pipeline.json

The README shows the recorded run (tests/unit/test_readme_commands.py checks that its table is this script's
rendering of benchmarks/results/default_pipeline.json). metrics/ itself is a DVC output, not committed: a run on
another CPU differs in the last digits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks/results/default_pipeline.json"
KEYS = [f"eval/{p}{m}" for p in ("sft/", "", "grpo/") for m in (
    "reward_mean", "reward_mean_ci_low", "reward_mean_ci_high", "reward_eq_1", "logp_accuracy", "win_rate_vs_sft",
    "win_rate_ci_low", "win_rate_ci_high", "reward_delta", "reward_delta_ci_low", "reward_delta_ci_high",
    "kl_to_reference", "kl_to_reference_ci_low", "kl_to_reference_ci_high", "length_ratio")] + [
    "eval/grpo/win_rate_vs_dpo", "eval/grpo/win_rate_vs_dpo_ci_low", "eval/grpo/win_rate_vs_dpo_ci_high",
    "eval/num_prompts"]


def collect(metrics_dir: Path) -> dict:
    """The headline metrics of a run (those of KEYS it has), with the SFT loss and where and when it ran."""
    ev = json.loads((metrics_dir / "eval.json").read_text())
    sft = json.loads((metrics_dir / "sft.json").read_text())
    return {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
            "metrics": {k: ev[k] for k in KEYS if k in ev},
            "sft": {k: sft[k] for k in ("eval/loss_first", "eval/loss") if k in sft}}


def render(run: dict) -> str:
    """The markdown table (and the line above it) the README shows for a recorded run."""
    m = run["metrics"]

    def v(key: str) -> str:
        return f"{m[key]:.3f}" if key in m else "-"

    def ci(key: str, low: str = "_ci_low", high: str = "_ci_high", sign: str = "") -> str:
        if key not in m:
            return "-"
        base = key.removesuffix("_mean") if low == "_mean_ci_low" else key
        return f"{m[key]:{sign}.3f} ({m[base + low]:{sign}.3f}–{m[base + high]:{sign}.3f})" if base + low in m else \
            f"{m[key]:{sign}.3f}"

    def win(prefix: str) -> str:
        key = f"eval/{prefix}win_rate_vs_sft"
        return f"{m[key]:.3f} ({m[f'eval/{prefix}win_rate_ci_low']:.3f}–{m[f'eval/{prefix}win_rate_ci_high']:.3f})"

    rows = [
        ("mean programmatic reward", *(ci(f"eval/{p}reward_mean", "_mean_ci_low", "_mean_ci_high")
                                       for p in ("sft/", "", "grpo/"))),
        ("Δ reward vs SFT", "", ci("eval/reward_delta", sign="+"), ci("eval/grpo/reward_delta", sign="+")),
        ("exactly sorted", *(v(f"eval/{p}reward_eq_1") for p in ("sft/", "", "grpo/"))),
        ("win rate vs SFT (ties ½)", "", win(""), win("grpo/") + "; vs DPO " + ci(
            "eval/grpo/win_rate_vs_dpo", "_ci_low", "_ci_high")),
        ("held-out pairs with log p(chosen) > log p(rejected)", *(v(f"eval/{p}logp_accuracy")
                                                                  for p in ("sft/", "", "grpo/"))),
        ("KL to SFT (nats/sequence)", "", ci("eval/kl_to_reference"), ci("eval/grpo/kl_to_reference")),
        ("length ratio vs SFT", "", v("eval/length_ratio"), v("eval/grpo/length_ratio")),
    ]
    sft = run["sft"]
    lines = [f"Measured {run['date']} on {run['machine']} ({int(m['eval/num_prompts'])} held-out prompts sampled "
             f"at temperature 1; 95% bootstrap CIs in parentheses; SFT's held-out loss {sft['eval/loss_first']:.3f} "
             f"(base model) → {sft['eval/loss']:.3f}):",
             "",
             "| | SFT | DPO (sigmoid, β 0.1, RPO α 1) | GRPO (80 steps × 16 prompts × G 8, `dapo`, β 0) |",
             "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics-dir", default=str(ROOT / "metrics"))
    parser.add_argument("--record", action="store_true", help=f"save the run as {RECORD.relative_to(ROOT)}")
    args = parser.parse_args()
    run = collect(Path(args.metrics_dir))
    if args.record:
        RECORD.write_text(json.dumps(run, indent=2) + "\n")
    print(render(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
