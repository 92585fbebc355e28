"""Our `reward_model` stage against TRL 1.16 `RewardTrainer` on the same job: wall time, pairs/s, peak memory.

    .venv/bin/python benchmarks/reward_model_vs_trl.py                       # CPU, models/sft, 100 steps x 16, 2 rounds
    .venv/bin/python benchmarks/reward_model_vs_trl.py --steps 3 --rounds 1 --out /tmp/rm_smoke.json   # smoke

Same on both sides: the initial model (models/sft, a causal LM, loaded as a one-label
`AutoModelForSequenceClassification`: both sides get a fresh score head, seeded), the preference pairs (the first
`steps x batch` records of data/prepared/pref_train.jsonl, conversational `prompt/chosen/rejected` messages, so
each pair is trained on once: one epoch), `--steps` optimizer steps of `--batch-size` pairs per device, the
Bradley-Terry loss -log σ(r_c - r_r) + `center_rewards_coefficient` · mean((r_c + r_r)²) (0.01 on both), no
margin (the records have none), torch AdamW (0.9, 0.95), weight decay 0, one constant lr (no warm-up), clipping
at 1.0, `max_length` 128, fp32 on CPU, no eval, no checkpoints, no gradient checkpointing, no tracking/reporting,
final model saved. TRL's defaults that would make the comparison unequal are set to ours: `gradient_checkpointing=False`
(TRL's default is True: slower), `optim="adamw_torch"` (its default is the fused AdamW), `bf16=False`,
`adam_beta2=0.95`, `lr_scheduler_type="constant"` (its default is linear decay), `save_strategy="no"`.
Differences that stay: TRL's `max_length` *drops* a pair whose chosen or rejected sequence is longer (ours truncates
the response); the JSON records how many pairs TRL kept (`trl_pairs_kept`): with these short sorting pairs, all of
them. TRL reads each sequence at its last token, the chat template's "\\n" after `<|im_end|>`; ours cuts each
response after its end-of-turn token and reads it there (where a sampled completion ends): one token fewer per
response (`train_tokens` of each side shows it). TRL samples its batches at random and pads each to its
longest sequence; ours plans length-bucketed batches (`training.preference_plan`) and computes the prompt once
per pair (shared-prompt rows): that is part of what is measured. Our stage reads a `pref_eval.jsonl`: it gets
an empty one (it then skips the held-out scoring and the calibration report, as TRL with no eval set does). TRL
logs once (`logging_steps=steps`), ours once (`log_every` past the end: its final row); TRL still computes its
per-step metrics (`.item()` gathers), as it always does.

Each run is its own subprocess (`--child`), rounds alternate the order (ours, TRL / TRL, ours):
- wall_s: from the child's first line, before it imports torch, to the final model on disk: each side pays for its
  own imports (TRL: trl, datasets, pandas, ...; ours: transformers, accelerate, pyarrow) and its own set-up (TRL:
  `Dataset.from_list`, its tokenising `map` and length `filter`, the trainer; ours: tokenising the pairs, the step
  plan); `process_s` is the whole subprocess incl. interpreter start;
- pairs/s: steps x batch size / wall_s (the same pairs on both sides);
- tokens: non-padding tokens of the chosen and rejected sequences, prompt counted in each (TRL's own
  `_total_train_tokens`; ours: the same count over its tokenised pairs, computed by the parent, untimed; ours
  computes each prompt once per pair, so what it runs is less);
- peak memory: `ru_maxrss` of the child (imports included);
- loop_s (diagnostic): the training loop alone (TRL: its `train_runtime`; ours: from its first step to its last).
Both sides load the initial model from one snapshot copied per invocation (a pipeline run may rewrite models/).
Ratios: speed = TRL wall / ours wall, memory = ours peak RSS / TRL peak RSS, each between the best rounds.
Writes benchmarks/results/reward_model_vs_trl_cpu.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": ""}


def child_ours(spec: dict, work: Path) -> dict:
    from components import reward_model
    from components.core.config import RewardModelConfig

    cfg = RewardModelConfig(max_steps=spec["steps"], batch_size=spec["batch_size"], learning_rate=spec["lr"],
                            warmup_ratio=0.0, scheduler="constant", max_grad_norm=1.0, weight_decay=0.0,
                            center_rewards_coefficient=spec["center"], eval_every=10**6, save_every=10**6,
                            log_every=10**6, gradient_checkpointing=False)
    data = work / "data"
    data.mkdir(exist_ok=True)
    (data / "pref_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spec["records"]))
    (data / "pref_eval.jsonl").write_text("")  # no eval, as on TRL's side
    final = reward_model.run(cfg, model_path=spec["model"], data_dir=str(data), out_dir=str(work / "model"),
                             metrics_path=str(work / "metrics.json"), calibration_path=str(work / "calibration.json"),
                             plots_path=str(work / "plots.csv"), checkpoint_dir=str(work / "ckpt"),
                             max_length=spec["max_length"], max_prompt_length=spec["max_prompt_length"],
                             seed=spec["seed"], track=False)
    pairs = spec["steps"] * spec["batch_size"]
    return {"loss": final["loss"], "accuracy": final["accuracy"], "margin": final["margin"], "pairs": pairs,
            "loop_s": pairs / final["pairs_per_second"]}


def child_trl(spec: dict, work: Path) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in spec["records"]])
    args = RewardConfig(
        output_dir=str(work / "trl"), max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        center_rewards_coefficient=spec["center"], max_length=spec["max_length"], logging_steps=spec["steps"],
        eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, seed=spec["seed"], data_seed=spec["seed"], disable_tqdm=True,
        dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"},
    )
    trainer = RewardTrainer(model=spec["model"], args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(work / "trl_model"))
    log = next(r for r in reversed(trainer.state.log_history) if "loss" in r)
    return {"loss": log["loss"], "accuracy": log["accuracy"], "margin": log["margin"],
            "pairs": spec["steps"] * spec["batch_size"], "trl_pairs_kept": len(trainer.train_dataset),
            "train_tokens": int(trainer._total_train_tokens),
            "loop_s": next(r["train_runtime"] for r in trainer.state.log_history if "train_runtime" in r)}


def child_main(kind: str, spec_path: str, out_path: str) -> None:
    started = time.perf_counter()  # before any heavy import: each side pays for its own stack, as a user does
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", str(os.cpu_count()))))
    spec = json.loads(Path(spec_path).read_text())
    work = Path(tempfile.mkdtemp(prefix=f"rm-bench-{kind}-"))
    result = child_ours(spec, work) if kind == "ours" else child_trl(spec, work)
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out_path).write_text(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)


def run_child(kind: str, spec_path: Path, work: Path, tag: str) -> dict:
    out = work / f"{tag}.json"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", kind, str(spec_path), str(out)], cwd=work,
                          env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - started
    result["pairs_per_s"] = result["pairs"] / result["wall_s"]
    return result


def our_train_tokens(spec: dict) -> int:
    """Non-padding tokens of ours' chosen and rejected sequences as its stage tokenises them (each response cut
    after its end-of-turn token), prompt counted in each, as TRL counts."""
    from components.core import training
    from components.core.generation import generation_eos
    from components.core.tokens import tokenize_pair
    from components.reward_model import end_at_turn

    tokenizer = training.load_tokenizer(spec["model"], False)
    eos = set(generation_eos(spec["model"], tokenizer))
    pairs = [end_at_turn(tokenize_pair(tokenizer, r, spec["max_length"], spec["max_prompt_length"]), eos)
             for r in spec["records"]]
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--center-rewards-coefficient", type=float, default=0.01)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: all cores)")
    parser.add_argument("--model", default=str(ROOT / "models/sft"))
    parser.add_argument("--data", default=str(ROOT / "data/prepared/pref_train.jsonl"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/reward_model_vs_trl_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)

    from components.core.io import read_jsonl

    records = read_jsonl(args.data)
    n = args.steps * args.batch_size  # one epoch's worth, in file order: both sides train on each pair once
    if len(records) < n:
        raise SystemExit(f"{args.data}: {len(records)} pairs, {n} needed for {args.steps} x {args.batch_size}")
    spec = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "center": args.center_rewards_coefficient, "max_length": args.max_length, "max_prompt_length": 96,
            "seed": 1234, "threads": int(os.environ.get("BENCH_THREADS", str(os.cpu_count()))),
            "records": [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in records[:n]]}
    work = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    spec["model"] = str(shutil.copytree(args.model, work / "sft"))  # one snapshot: a pipeline run may rewrite models/
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    rounds = []
    for r in range(args.rounds):
        order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
        results = {kind: run_child(kind, spec_path, work, f"{kind}_{r}") for kind in order}
        rounds.append(results)
        o, t = results["ours"], results["trl"]
        print(f"round {r + 1}: ours {o['wall_s']:.1f}s {o['pairs_per_s']:.0f} pairs/s {o['peak_rss_bytes'] / 2**20:.0f} MiB"
              f" | TRL {t['wall_s']:.1f}s {t['pairs_per_s']:.0f} pairs/s {t['peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)
    ours_tokens = our_train_tokens(spec)
    shutil.rmtree(work, ignore_errors=True)
    for x in rounds:
        x["ours"]["train_tokens"] = ours_tokens
    best = {k: min((x[k] for x in rounds), key=lambda x: x["wall_s"]) for k in ("ours", "trl")}
    summary = {
        "ours_wall_s": best["ours"]["wall_s"], "trl_wall_s": best["trl"]["wall_s"],
        "ours_pairs_per_s": best["ours"]["pairs_per_s"], "trl_pairs_per_s": best["trl"]["pairs_per_s"],
        "ours_peak_rss_mib": min(x["ours"]["peak_rss_bytes"] for x in rounds) / 2**20,
        "trl_peak_rss_mib": min(x["trl"]["peak_rss_bytes"] for x in rounds) / 2**20,
        "speedup_wall": best["trl"]["wall_s"] / best["ours"]["wall_s"],
        "peak_memory_ratio": min(x["ours"]["peak_rss_bytes"] for x in rounds)
        / min(x["trl"]["peak_rss_bytes"] for x in rounds),
        "trl_pairs_kept": best["trl"]["trl_pairs_kept"],
        "targets": {"speedup_wall": ">= 1.5"},
    }
    result = {"benchmark": "reward_model_vs_trl", "device": "cpu",
              "job": {k: v for k, v in spec.items() if k != "records"} | {"model": args.model, "pairs": len(spec["records"])},
              "rounds": rounds, "summary": summary,
              "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
