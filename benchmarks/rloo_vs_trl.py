"""Our `rloo` stage against TRL 1.16 `RLOOTrainer` on the same job: wall time, tokens/s, peak memory.

    .venv/bin/python benchmarks/rloo_vs_trl.py                          # CPU, reward model, 20 steps x 8 x G=4, 2 rounds
    .venv/bin/python benchmarks/rloo_vs_trl.py --reward functions       # the sorting reward function instead
    .venv/bin/python benchmarks/rloo_vs_trl.py --steps 3 --rounds 1 --out /tmp/rloo_smoke.json   # smoke

TRL 1.16 has no PPO trainer; our `ppo` stage is benchmarked against TRL 0.26's `trl.experimental.ppo` by
benchmarks/ppo_vs_trl.py.

Same on both sides: the policy (models/sft; its copy is the reference), the reward (`--reward reward_model`: the
one-label `AutoModelForSequenceClassification` in models/reward_model, scored at the last token of prompt +
completion, TRL given its path as `reward_funcs`; `--reward functions`: the sorting reward of
`components.core.algos.reward_functions`, wrapped into TRL's `f(prompts, completions, **kw) -> list[float]`), the prompts (the
first `steps x prompts` distinct prompts of data/prepared/pref_train.jsonl, so each is used once; TRL in file
order, `shuffle_dataset=False`; ours in its seeded order over the same set), G completions per prompt, `--prompts`
prompts per optimizer step, max completion length, temperature 1, top_p 1, top_k off, beta (ours: `kl_coef`;
both fold the k1 sequence KL, sum of log π - log π_ref over the completion, into the reward: r - beta * KL),
the leave-one-out baseline, no advantage normalisation, the clipped sequence-level ratio loss (epsilon 0.2, mean
over sequences), one iteration per generation round (ours: `num_ppo_epochs=1, num_mini_batches=1`: one optimizer
step per round over all prompts x G completions; TRL: `num_iterations=1`, per-device batch = prompts x G, one
generation per step), torch AdamW (0.9, 0.95), weight decay 0, a constant lr, clipping at 1.0, fp32 on CPU, HF
`generate` with the KV cache, no vLLM, no eval, no checkpoints, no gradient checkpointing (TRL's default is on),
final model saved. TRL's defaults that would make the comparison unequal are set to ours: `bf16=False`,
`gradient_checkpointing=False`, `optim="adamw_torch"`, `lr_scheduler_type="constant"`, `adam_beta2=0.95`.
Work that differs by design and is measured: ours also computes the reward functions next to the reward model's
score (the logged `true_reward`) and writes a rollout table per round (artifacts/rollouts_rloo); TRL re-renders
prompt + completion through the chat template and re-tokenises it for the reward model, and logs every step
(`logging_steps=1`, needed to count its generated tokens). The two read the reward model at different tokens
(same compute: one forward over prompt + completion): TRL at the last token of the re-rendered text, the
template's "\\n" after `<|im_end|>` (where TRL's RewardTrainer reads it in training), ours at the last sampled
token (`<|im_end|>`, or the cut-off token), where our reward_model stage trains it; so the logged scores
(`score_*`) are not comparable across sides, and TRL optimises our reward model read at a token it was not
trained at (models/reward_model on 64 held-out pairs, 2026-12-01: accuracy 0.94 read at `<|im_end|>`, 0.77 at
the "\\n").
Both sides load the models from one snapshot copied per invocation (a pipeline run may rewrite models/).

Each run is its own subprocess (`--child`), rounds alternate the order (ours, TRL / TRL, ours):
- wall_s: from the child's first line, before it imports torch, to the final model on disk: each side pays for
  its own imports and set-up; `process_s` is the whole subprocess incl. interpreter start;
- generated tokens: completion tokens sampled (TRL: the sum of its logged `completions/mean_length` x completions;
  ours: `generated_tokens` of its metrics); tokens/s = generated tokens / wall_s;
- peak memory: `ru_maxrss` of the child (imports included);
- loop_s (diagnostic): the training loop alone (TRL: its `train_runtime`; ours: its `seconds`, plus its
  per-phase `time/*_total`).
Ratios: speed = TRL wall / ours wall, tokens/s ours / TRL, memory = ours peak RSS / TRL peak RSS, best rounds.
Writes benchmarks/results/rloo_vs_trl_cpu.json (`--reward functions`: ..._functions.json; or `--out`).
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
    from components.core.config import PPOConfig, RewardSpec

    n = spec["prompts"] * spec["G"]
    cfg = PPOConfig(reward=spec["reward"], rewards=[RewardSpec(name="sorting")], max_steps=spec["steps"],
                    prompts_per_step=spec["prompts"], num_generations=spec["G"],
                    generation_batch_size=spec["prompts"], micro_batch_size=n,
                    max_completion_length=spec["max_completion_length"], temperature=1.0, top_p=1.0,
                    learning_rate=spec["lr"], weight_decay=0.0, warmup_ratio=0.0, scheduler="constant",
                    max_grad_norm=1.0, kl_coef=spec["beta"], kl_estimator="k1", adaptive_kl=False,
                    num_ppo_epochs=1, num_mini_batches=1, cliprange=0.2, normalize_advantages=False,
                    missing_eos_penalty=None, save_every=10**6, log_every=10**6, gradient_checkpointing=False)
    return harness.ours_ppo(cfg, "rloo", spec, work)[1]


def child_trl(spec: dict, work: Path) -> dict:
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    if spec["reward"] == "reward_model":
        reward_funcs = spec["reward_model"]  # TRL loads it: AutoModelForSequenceClassification, num_labels=1
    else:
        from components.core.algos.reward_functions import load_reward_function

        fn = load_reward_function("sorting")

        def sorting(prompts, completions, **_):  # TRL's signature; conversational completions
            return [fn(p, c[-1]["content"] if isinstance(c, list) else c, "")
                    for p, c in zip(prompts, completions, strict=True)]

        reward_funcs = sorting
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in spec["records"]])
    n = spec["prompts"] * spec["G"]
    args = RLOOConfig(
        output_dir=str(work / "trl"), max_steps=spec["steps"], per_device_train_batch_size=n,
        num_generations=spec["G"], max_completion_length=spec["max_completion_length"], temperature=1.0,
        top_p=1.0, top_k=0, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=1.0, beta=spec["beta"], num_iterations=1, epsilon=0.2, normalize_advantages=False,
        logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, use_vllm=False, seed=spec["seed"], shuffle_dataset=False,
        disable_tqdm=True, dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"},
    )
    trainer = RLOOTrainer(model=spec["model"], reward_funcs=reward_funcs, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(work / "trl_model"))
    logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    tokens = sum(r["completions/mean_length"] for r in logs) * n
    return {"generated_tokens": int(round(tokens)), "score_first": logs[0]["reward"], "score_last": logs[-1]["reward"],
            "kl_last": logs[-1].get("kl"),
            "loop_s": next(r["train_runtime"] for r in trainer.state.log_history if "train_runtime" in r)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        harness.child_main(*sys.argv[2:5], ours=child_ours, trl=child_trl, prefix="rloo-bench")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", choices=("reward_model", "functions"), default="reward_model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=4, help="G")
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--beta", type=float, default=0.05, help="KL weight in the reward (ours: kl_coef)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: all cores)")
    parser.add_argument("--model", default=str(ROOT / "models/sft"))
    parser.add_argument("--reward-model", default=str(ROOT / "models/reward_model"))
    parser.add_argument("--data", default=str(ROOT / "data/prepared/pref_train.jsonl"))
    parser.add_argument("--out", default=None, help="default: benchmarks/results/rloo_vs_trl_cpu[_functions].json")
    args = parser.parse_args()
    harness.set_threads(args.threads)
    out = Path(args.out or ROOT / "benchmarks/results" / (
        "rloo_vs_trl_cpu.json" if args.reward == "reward_model" else "rloo_vs_trl_cpu_functions.json"))
    if args.reward == "reward_model" and not (Path(args.reward_model) / "config.json").exists():
        raise SystemExit(f"{args.reward_model}: no reward model; train one (python -m components.reward_model) "
                         "or pass --reward functions")

    from components.core.ops.io import read_jsonl

    n = args.steps * args.prompts  # one epoch's worth of distinct prompts: both sides use each prompt once
    records, seen = [], set()
    for r in read_jsonl(args.data):
        key = json.dumps(r["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append({"id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"]})
        if len(records) == n:
            break
    if len(records) < n:
        raise SystemExit(f"{args.data}: {len(records)} distinct prompts, {n} needed")
    spec = {"model": args.model, "reward_model": args.reward_model, "reward": args.reward, "steps": args.steps,
            "prompts": args.prompts, "G": args.generations, "max_completion_length": args.max_completion_length,
            "beta": args.beta, "lr": args.lr, "seed": 1234, "max_prompt_length": 96,
            "threads": harness.bench_threads(), "records": records}
    work = Path(tempfile.mkdtemp(prefix="rloo-bench-"))
    # both sides read one snapshot of the models: a pipeline run on the box may rewrite models/ meanwhile
    spec["model"] = str(shutil.copytree(args.model, work / "sft"))
    if args.reward == "reward_model":
        spec["reward_model"] = str(shutil.copytree(args.reward_model, work / "reward_model"))
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    rounds = harness.run_rounds(
        args.rounds, lambda kind, tag: harness.run_child(__file__, kind, spec_path, work, tag,
                                                         ("tokens_per_s", "generated_tokens")),
        "tokens_per_s", "tok/s")
    shutil.rmtree(work, ignore_errors=True)
    summary = harness.summarize(rounds, "tokens_per_s")
    summary["targets"] = {"speedup_wall": ">= 1.5"}
    harness.write_results(out, "rloo_vs_trl", spec, rounds, summary,
                          job={"model": args.model, "reward_model": args.reward_model, "prompts_total": len(records)})


if __name__ == "__main__":
    main()
