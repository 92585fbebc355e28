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
longest sequence; ours plans length-bucketed batches (`loop.preference_plan`) and computes the prompt once
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
import shutil
import sys
import tempfile
from pathlib import Path

import harness  # benchmarks/harness.py: this script's directory is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child_ours(spec: dict, work: Path) -> dict:
    from components import reward_model
    from components.core.config import RewardModelConfig, Runtime

    cfg = RewardModelConfig(max_steps=spec["steps"], batch_size=spec["batch_size"], learning_rate=spec["lr"],
                            warmup_ratio=0.0, scheduler="constant", max_grad_norm=1.0, weight_decay=0.0,
                            center_rewards_coefficient=spec["center"], eval_every=10**6, save_every=10**6,
                            log_every=10**6, gradient_checkpointing=False)
    data = harness.records_dir(work, spec["records"])
    (data / "pref_eval.jsonl").write_text("")  # no eval, as on TRL's side
    # prepare's share of the pipeline: the token ids the stage reads (TRL tokenises inside its trainer)
    harness.prepare_aside(data, spec["model"])
    final = reward_model.run(cfg, model_path=spec["model"], data_dir=str(data), out_dir=str(work / "model"),
                             metrics_path=str(work / "metrics.json"), calibration_path=str(work / "calibration.json"),
                             plots_path=str(work / "plots.csv"), checkpoint_dir=str(work / "ckpt"),
                             runtime=Runtime(seed=spec["seed"], max_length=spec["max_length"],
                                             max_prompt_length=spec["max_prompt_length"]), track=False)
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


def our_train_tokens(spec: dict) -> int:
    """Non-padding tokens of ours' chosen and rejected sequences as its stage tokenises them (each response cut
    after its end-of-turn token), prompt counted in each, as TRL counts."""
    from components.core.data.tokens import tokenize_pair
    from components.core.model import loading
    from components.core.model.generation import generation_eos
    from components.reward_model import end_at_turn

    tokenizer = loading.load_tokenizer(spec["model"], False)
    eos = set(generation_eos(spec["model"], tokenizer))
    pairs = [end_at_turn(tokenize_pair(tokenizer, r, spec["max_length"], spec["max_prompt_length"]), eos)
             for r in spec["records"]]
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        harness.child_main(*sys.argv[2:5], ours=child_ours, trl=child_trl, prefix="rm-bench")
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
    harness.set_threads(args.threads)

    from components.core.ops.io import read_jsonl

    records = read_jsonl(args.data)
    n = args.steps * args.batch_size  # one epoch's worth, in file order: both sides train on each pair once
    if len(records) < n:
        raise SystemExit(f"{args.data}: {len(records)} pairs, {n} needed for {args.steps} x {args.batch_size}")
    spec = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "center": args.center_rewards_coefficient, "max_length": args.max_length, "max_prompt_length": 96,
            "seed": 1234, "threads": harness.bench_threads(),
            "records": [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in records[:n]]}
    work = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    spec["model"] = str(shutil.copytree(args.model, work / "sft"))  # one snapshot: a pipeline run may rewrite models/
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    rounds = harness.run_rounds(
        args.rounds, lambda kind, tag: harness.run_child(__file__, kind, spec_path, work, tag, ("pairs_per_s", "pairs")),
        "pairs_per_s", "pairs/s")
    ours_tokens = our_train_tokens(spec)
    shutil.rmtree(work, ignore_errors=True)
    for x in rounds:
        x["ours"]["train_tokens"] = ours_tokens
    summary = harness.summarize(rounds, "pairs_per_s", rate_ratio=False)
    summary["trl_pairs_kept"] = harness.best_rounds(rounds)["trl"]["trl_pairs_kept"]
    summary["targets"] = {"speedup_wall": ">= 1.5"}
    harness.write_results(args.out, "reward_model_vs_trl", spec, rounds, summary,
                          job={"model": args.model, "pairs": len(spec["records"])})


if __name__ == "__main__":
    main()
