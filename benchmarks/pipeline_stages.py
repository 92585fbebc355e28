"""Wall time of each default pipeline stage, in a fresh copy of the repo, one `dvc repro --single-item` each.

    python benchmarks/pipeline_stages.py [--params configs/params/tiny.yaml] [--out benchmarks/results/pipeline_stages.json]
    python benchmarks/pipeline_stages.py --params configs/params/smollm2-135m.yaml \
        --out benchmarks/results/pipeline_stages_smollm2.json          # the real SmolLM2-135M-Instruct
    python benchmarks/pipeline_stages.py --set reward_model.enabled=true --set ppo.enabled=true \
        --out benchmarks/results/pipeline_stages_rlhf.json          # all five policies (classic RLHF on)

Targets (issue 2/3, 2 CPU cores): bootstrap -> sft under 2 minutes, the whole default pipeline under 5.
Process start-up (python, torch, accelerate launch) is part of each stage's time, as a user pays it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["bootstrap", "synthesize", "sources", "prepare", "sft", "reference", "dpo", "grpo", "reward_model",
          "ppo", "rloo", "evaluate", "register"]
POLICIES = ("eval/", "eval/grpo/", "eval/ppo/", "eval/rloo/", "eval/base/")
HEADLINE = ("reward_mean", "reward_delta", "reward_delta_ci_low", "reward_delta_ci_high", "reward_eq_1",
            "win_rate_vs_sft", "win_rate_vs_dpo", "kl_to_reference", "length_ratio", "rm_score_mean")


def fresh_copy(dst: Path, params: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file() and not rel.startswith(("tests/", "benchmarks/", "metrics/", "plots/", "reports/")) \
                and rel != "dvc.lock":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    shutil.copy2(params, dst / "params.yaml")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/pipeline_stages.json"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a param in the copy (YAML value), e.g. ppo.enabled=true")
    args = parser.parse_args()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1")
    with tempfile.TemporaryDirectory(prefix="alignflow-stages-") as tmp:
        repo = Path(tmp)
        fresh_copy(repo, Path(args.params))
        if args.set:
            import yaml

            params = yaml.safe_load((repo / "params.yaml").read_text())
            for item in args.set:
                dotted, _, value = item.partition("=")
                section, key = dotted.split(".", 1)
                params[section][key] = yaml.safe_load(value)
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo}/mlflow.db"
        times: dict[str, float] = {}
        for stage in STAGES:
            t0 = time.perf_counter()
            proc = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=repo, env=env,
                                  capture_output=True, text=True)
            times[stage] = round(time.perf_counter() - t0, 1)
            if proc.returncode:
                sys.exit(f"{stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            print(f"{stage:>11}  {times[stage]:7.1f} s", flush=True)
        t0 = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, check=True)
        noop = round(time.perf_counter() - t0, 2)
        metrics = {name: json.loads((repo / f"metrics/{name}.json").read_text())
                   for name in ("sft", "dpo", "eval", "reward_model")}
    through_sft = sum(times[s] for s in STAGES[:5])
    total = sum(times.values())
    print(f"{'through sft':>11}  {through_sft:7.1f} s   (target < 120 s)")
    print(f"{'total':>11}  {total:7.1f} s   (target < 300 s)")
    print(f"{'no-op repro':>11}  {noop:7.2f} s")
    result = {
        "benchmark": "pipeline_stages", "params": args.params, "overrides": args.set, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(),
        "stage_seconds": times, "through_sft_seconds": round(through_sft, 1), "total_seconds": round(total, 1),
        "noop_repro_seconds": noop,
        "sft": {k: metrics["sft"][k] for k in ("eval/loss_first", "eval/loss", "train/loss")},
        "dpo": {k: metrics["dpo"][k] for k in ("eval/rewards/accuracies", "eval/rewards/accuracies_first")},
        "eval": {"eval/sft/reward_mean": metrics["eval"]["eval/sft/reward_mean"],
                 **{k: v for k, v in metrics["eval"].items()
                    if k.startswith(("eval/sft/reward_mean_ci", "eval/sft/reward_delta_vs_base"))},
                 "eval/sft/reward_eq_1": metrics["eval"].get("eval/sft/reward_eq_1"),
                 "eval/sft/rm_score_mean": metrics["eval"].get("eval/sft/rm_score_mean"),
                 **{p + k: metrics["eval"][p + k] for p in POLICIES for k in HEADLINE if p + k in metrics["eval"]}},
        "reward_model": {k: v for k, v in metrics["reward_model"].items() if k.startswith("eval/")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
