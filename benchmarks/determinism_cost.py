"""What `compute.deterministic: true` costs: the grpo stage of the default pipeline with deterministic kernels on
and off, alternated (on, off / off, on) so that drift in the machine's speed falls on both sides.

    python benchmarks/determinism_cost.py [--rounds 2] [--out benchmarks/results/determinism_cost_cpu.json]

Needs the default pipeline's SFT model and prepared data (`dvc repro sft`). Each run is the real stage, started
as dvc.yaml starts it, in a scratch directory beside them; its own `seconds` (metrics/grpo.json) is the figure, and
the final weights' hash says whether the two settings trained the same bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import default_stage_dir, run_default_stage, write_stage_results  # noqa: E402


def run_stage(work: Path, deterministic: bool) -> dict:
    seconds = run_default_stage(work, "grpo", {"compute": {"deterministic": deterministic}})["seconds"]
    weights = hashlib.sha256((work / "models/grpo/model.safetensors").read_bytes()).hexdigest()[:16]
    return {"deterministic": deterministic, "seconds": seconds, "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/determinism_cost_cpu.json"))
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="alignflow-determinism-") as tmp:
        work = default_stage_dir(tmp)
        for r in range(args.rounds):
            for deterministic in ((True, False) if r % 2 == 0 else (False, True)):
                runs.append({"round": r, **run_stage(work, deterministic)})
                print(json.dumps(runs[-1]), flush=True)
    on = [x["seconds"] for x in runs if x["deterministic"]]
    off = [x["seconds"] for x in runs if not x["deterministic"]]
    summary = {"median_seconds_on": statistics.median(on), "median_seconds_off": statistics.median(off),
               "time_ratio_on_over_off": round(statistics.median(on) / statistics.median(off), 3),
               "same_weights_on_runs": len({x["weights"] for x in runs if x["deterministic"]}) == 1}
    write_stage_results(args.out, "determinism_cost", runs, summary)


if __name__ == "__main__":
    main()
