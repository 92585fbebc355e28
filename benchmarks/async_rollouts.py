"""Asynchronous rollouts against the synchronous loop: the grpo stage of the default pipeline with
`grpo.max_staleness` 0 (synchronous), 1 and 2, in rotated order each round so that drift in the machine's speed
falls on every side.

    python benchmarks/async_rollouts.py [--rounds 2] [--staleness 0 1 2] [--out benchmarks/results/async_rollouts_cpu.json]

Needs the default pipeline's SFT model and prepared data (`dvc repro sft`). Each run is the real stage, started as
dvc.yaml starts it, in a scratch directory beside them. Per run: the stage's own `seconds`, its generation and
update seconds (summed over steps; with staleness > 0 generation runs in the rollout thread, beside the update),
the seconds the trainer waited for a round (`time/wait`), the training reward of the last log window, the mean
importance-sampling ratio, and the final weights' hash (the same for every run of one setting: the schedule is
decided by round index, not timing). The held-out comparison is evaluate's (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import default_stage_dir, run_default_stage, write_stage_results  # noqa: E402


def run(work: Path, staleness: int) -> dict:
    metrics = run_default_stage(work, "grpo", {"grpo": {"max_staleness": staleness}})
    with open(work / "plots/grpo.csv") as f:
        rows = list(csv.DictReader(f))
    waited = sum(float(r.get("time/wait") or 0.0) for r in rows)
    ratio = [float(r["sampling/importance_sampling_ratio/mean"]) for r in rows
             if r.get("sampling/importance_sampling_ratio/mean")]
    return {"max_staleness": staleness, "seconds": metrics["seconds"],
            "generate_seconds": round(metrics["time/generate_total"], 2),
            "update_seconds": round(metrics["time/update_total"], 2), "wait_seconds": round(waited, 2),
            "reward_last_window": metrics["reward_last_window"],
            "is_ratio_mean": statistics.fmean(ratio) if ratio else None,
            "weights": hashlib.sha256((work / "models/grpo/model.safetensors").read_bytes()).hexdigest()[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/async_rollouts_cpu.json"))
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="alignflow-async-") as tmp:
        work = default_stage_dir(tmp)
        for r in range(args.rounds):
            k = r % len(args.staleness)
            for s in args.staleness[k:] + args.staleness[:k]:
                runs.append({"round": r, **run(work, s)})
                print(json.dumps(runs[-1]), flush=True)
    sync = statistics.median(x["seconds"] for x in runs if x["max_staleness"] == 0) if 0 in args.staleness else None
    summary = {}
    for s in args.staleness:
        mine = [x for x in runs if x["max_staleness"] == s]
        med = statistics.median(x["seconds"] for x in mine)
        summary[f"staleness_{s}"] = {
            "median_seconds": med, "speedup_over_sync": round(sync / med, 3) if sync else None,
            "reward_last_window": statistics.fmean(x["reward_last_window"] for x in mine),
            "same_weights_every_run": len({x["weights"] for x in mine}) == 1}
    write_stage_results(args.out, "async_rollouts", runs, summary)


if __name__ == "__main__":
    main()
