"""Our `ppo` stage against TRL 0.26's experimental `PPOTrainer` on the same job: wall time, tokens/s, memory.

    .venv/bin/python benchmarks/ppo_vs_trl.py                                     # CPU, 20 steps x 16 prompts, 2 rounds
    .venv/bin/python benchmarks/ppo_vs_trl.py --steps 2 --rounds 1 --out /tmp/ppo_smoke.json   # smoke

TRL 1.16 (the venv's) has no PPO trainer; TRL 0.26.0 still ships one, `trl.experimental.ppo.PPOTrainer`. The script
installs that wheel, without its dependencies and outside the venv (`pip install --no-deps --target <dir>`, by default
<tmp>/alignflow-bench-trl-0.26.0, from `--trl-wheel`, else `pip download trl==0.26.0 --no-deps`), and runs TRL's child
with `PYTHONPATH=<dir>`: `import trl` is 0.26.0 there, while transformers, accelerate, datasets and torch are the
venv's (5.23 / 1.15 / 5.2 / 2.13, the versions ours runs on; recorded in the JSON). TRL 0.26 asks for
transformers >= 4.56.1 (no upper bound); its PPO trainer imports and runs on 5.23 unpatched (only transformers'
FutureWarnings: `gradient_checkpointing` is now `activation_checkpointing`; `generation_config` passed together
with other generate() arguments).

Same on both sides: the policy (models/sft), the reference (models/sft, loaded as a second copy), the reward model
(a one-label `AutoModelForSequenceClassification`: `--reward-model`, by default models/reward_model, or
/tmp/rm_real when models/reward_model has no config.json, e.g. a disabled stage's placeholder) and the value model
initialised from it (TRL: `value_model` = that class from the reward model's path; ours `value_init="reward_model"`),
the prompts (the first `steps x prompts` distinct prompts of data/prepared/pref_train.jsonl whose rendering is at
most `max_prompt_length` 96 tokens, so each is used once; TRL gets them as `input_ids` rendered exactly as ours
does, `components.core.data.tokens.prompt_ids_for_generation`: the chat template with add_generation_prompt=True,
left-padded by TRL's collator; TRL in its seeded shuffle, ours in its seeded order over the same set), one
completion per prompt, `--prompts` prompts per round (ours `prompts_per_step`; TRL `per_device_train_batch_size`
x `gradient_accumulation_steps` 1; `total_episodes` = steps x prompts), one generate() call per round (ours
`generation_batch_size`, TRL `local_rollout_forward_batch_size` = prompts: also TRL's chunk for the no-grad
scoring forwards, where ours uses `micro_batch_size` = prompts), max new tokens (ours `max_completion_length`, TRL
`response_length`), temperature 1 (TRL's default is 0.7), top_p 1, top_k off, stop token `<|im_end|>` (the eos;
TRL `stop_token="eos"`), per-token reward -kl_coef x k1 KL (0.05) plus the score, no reward whitening, no
missing-EOS penalty, GAE (gamma 1, lam 0.95), whitened advantages, `num_ppo_epochs` passes over each round in
`num_mini_batches` shuffled minibatches with one optimizer step each (4 x 2: 8 updates per round, each one forward
+ backward of prompts / num_mini_batches = 8 sequences), the clipped policy loss (0.2) + vf_coef 0.1 x the clipped
value loss (0.2), policy and value model under one optimizer, torch AdamW (0.9, 0.95, eps 1e-8), weight decay 0,
constant lr 1e-4, no gradient clipping (TRL's PPO loop never clips, whatever `max_grad_norm` says; ours
`max_grad_norm=0`), fp32 on CPU, HF `generate` with the KV cache, no eval, no checkpoints, no gradient
checkpointing (TRL's default is on), no sample generations during training (TRL `num_sample_generations=0`), no
trackers, final policy saved. Both load the models from one snapshot copied per invocation.

Differences, by design or TRL's choices (measured as they are):
- old log-probs: TRL takes them from generate()'s scores (`output_scores=True`, the logits of every sampled
  step); ours recomputes them with a policy forward pass (in one call with the value forward). Per round TRL runs
  reference + value + reward forwards after generating, ours policy + value + reference + reward.
- the forwards themselves: ours applies the LM head to the completion positions only (TRL to every position of
  query + response); TRL runs the policy and the value backbone on left-padded rows with position ids from the
  mask, ours on its own collated rows. Same models, same tokens.
- where the score lands: both read the reward model at the same token, the completion's last one (`<|im_end|>`,
  or the cut-off token), TRL by truncating the response after the stop token and reading the last non-pad token of
  the padded query + response (checked: TRL's `get_reward` and ours' `scorers.group_end_scores` give the same
  scores on the same sampled completions). TRL then adds the score to the per-token reward one position *after* that token (a
  pad position, `sequence_lengths + 1`, when the response is shorter than the batch's widest) and trains values on
  that extra position too (`padding_mask_p1`); ours adds it at the last completion token and masks values to the
  completion. So the GAE returns differ a little; the compute does not.
- what else each does per round: ours also computes the reward functions (the sorting task's true reward, logged
  beside the score), writes a rollout table and computes per-step metrics; TRL logs its metrics every step
  (`logging_steps=1`; a handful of `.item()` calls), and keeps the (B, L, vocab) generate scores.
- losses: TRL averages each micro-batch's losses over its tokens (one micro-batch per minibatch here, so the same);
  ours averages over the minibatch's tokens.
- generated tokens: ours counts every completion's tokens up to and including `<|im_end|>` (`generated_tokens`);
  TRL does not log lengths, so its child wraps `batch_generation` (the only call that samples) and counts the same
  way on its output (the first `<|im_end|>` + 1, else the whole width); `trl_response_widths` records each
  round's generated width, to show that generation stops when every row has ended.

Each run is its own subprocess (`--child`), rounds alternate the order (ours, TRL / TRL, ours):
- wall_s: from the child's first line, before it imports torch, to the final model on disk: each side pays for
  its own imports and set-up (TRL: trl, datasets, pandas, tokenising the prompts, four model loads; ours:
  tokenising the prompts, four model loads); `process_s` is the whole subprocess incl. interpreter start;
- generated tokens / s = generated completion tokens / wall_s;
- peak memory: `ru_maxrss` of the child (imports included);
- loop_s (diagnostic): the training loop alone (TRL: `trainer.train()` timed by the child; ours: its `seconds`,
  plus its per-phase `time/*_total`).
Ratios: speed = TRL wall / ours wall, tokens/s ours / TRL, memory = ours peak RSS / TRL peak RSS, best rounds.
Writes benchmarks/results/ppo_vs_trl_cpu.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness  # benchmarks/harness.py: this script's directory is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OFFLINE_ENV = harness.OFFLINE_ENV | {"TRL_EXPERIMENTAL_SILENCE": "1"}
TRL_VERSION = "0.26.0"
DEFAULT_WHEEL = Path(tempfile.gettempdir()) / "trlold" / f"trl-{TRL_VERSION}-py3-none-any.whl"
DEFAULT_TRL_DIR = Path(tempfile.gettempdir()) / f"alignflow-bench-trl-{TRL_VERSION}"


def child_ours(spec: dict, work: Path) -> dict:
    from components.core.config import PPOConfig

    p = spec["prompts"]
    cfg = PPOConfig(reward="reward_model", value_init="reward_model", max_steps=spec["steps"], prompts_per_step=p,
                    generation_batch_size=p, micro_batch_size=p,
                    max_completion_length=spec["max_completion_length"], temperature=1.0, top_p=1.0,
                    learning_rate=spec["lr"], weight_decay=0.0, warmup_ratio=0.0, scheduler="constant",
                    max_grad_norm=0.0, kl_coef=spec["kl_coef"], kl_estimator="k1", adaptive_kl=False,
                    num_ppo_epochs=spec["num_ppo_epochs"], num_mini_batches=spec["num_mini_batches"], cliprange=0.2,
                    cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False,
                    missing_eos_penalty=None, save_every=10**6, log_every=10**6, gradient_checkpointing=False)
    final, result = harness.ours_ppo(cfg, "ppo", spec, work)
    if final["train/prompts"] != len(spec["records"]):
        raise SystemExit(f"ours kept {final['train/prompts']} of {len(spec['records'])} prompts")
    return {**result, "value_loss_last": final.get("loss/value_avg")}


def child_trl(spec: dict, work: Path) -> dict:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_trainer
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from components.core.data.tokens import prompt_ids_for_generation

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"trl {trl.__version__} imported from {trl.__file__}, {TRL_VERSION} expected")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")  # TRL's PPO pads queries left
    dataset = Dataset.from_list([{"input_ids": prompt_ids_for_generation(tokenizer, r["prompt"])}
                                 for r in spec["records"]])
    f32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], **f32)
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["model"], **f32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, **f32)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, **f32)

    # count the completion tokens sampled, as ours does: up to and including the first stop token (TRL logs none)
    eos, counted = tokenizer.eos_token_id, {"tokens": 0, "widths": []}
    sample = ppo_trainer.batch_generation

    def counting_batch_generation(model, queries, *args, **kwargs):
        query_responses, logits = sample(model, queries, *args, **kwargs)
        response = query_responses[:, queries.shape[1]:]
        ended = response == eos
        n = torch.where(ended.any(1), ended.int().argmax(1) + 1, torch.full_like(ended[:, 0], response.shape[1],
                                                                                 dtype=torch.long))
        counted["tokens"] += int(n.sum())
        counted["widths"].append(int(response.shape[1]))
        return query_responses, logits

    ppo_trainer.batch_generation = counting_batch_generation
    p = spec["prompts"]
    args = PPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=p, gradient_accumulation_steps=1,
        num_mini_batches=spec["num_mini_batches"], num_ppo_epochs=spec["num_ppo_epochs"],
        total_episodes=spec["steps"] * p, local_rollout_forward_batch_size=p,
        response_length=spec["max_completion_length"], temperature=1.0, stop_token="eos",
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,  # unused by PPO
        kl_coef=spec["kl_coef"], kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0,
        lam=0.95, whiten_rewards=False, missing_eos_penalty=None, num_sample_generations=0, logging_steps=1,
        eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, seed=spec["seed"], disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model)
    t0 = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - t0
    trainer.save_model(str(work / "trl_model"))
    logs = [r for r in trainer.state.log_history if "objective/scores" in r]
    if len(logs) != spec["steps"]:
        raise SystemExit(f"TRL ran {len(logs)} rounds, {spec['steps']} expected")
    return {"generated_tokens": counted["tokens"], "score_first": logs[0]["objective/scores"],
            "score_last": logs[-1]["objective/scores"], "kl_last": logs[-1]["objective/kl"],
            "value_loss_last": logs[-1]["loss/value_avg"], "num_eos_tokens": sum(r["val/num_eos_tokens"] for r in logs),
            "trl_response_widths": counted["widths"], "loop_s": loop_s,
            "versions": {"trl": trl.__version__, "trl_path": str(Path(trl.__file__).parent),
                         "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                         "datasets": datasets.__version__, "torch": torch.__version__}}


def run_child(kind: str, spec_path: Path, work: Path, tag: str, trl_dir: Path) -> dict:
    env = {**os.environ, **OFFLINE_ENV}
    env.pop("PYTHONPATH", None)
    if kind == "trl":
        env["PYTHONPATH"] = str(trl_dir)  # trl 0.26 ahead of the venv's 1.16; the rest from the venv
    return harness.run_child(__file__, kind, spec_path, work, tag, ("tokens_per_s", "generated_tokens"), env)


def ensure_trl(trl_dir: Path, wheel: Path) -> Path:
    """TRL 0.26.0 installed without dependencies into trl_dir (once; later runs reuse it)."""
    if (trl_dir / "trl" / "experimental" / "ppo" / "ppo_trainer.py").exists():
        return trl_dir
    trl_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="trl-install-", dir=trl_dir.parent))
    try:
        if not wheel.exists():
            print(f"{wheel}: not there; pip download trl=={TRL_VERSION}", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", f"trl=={TRL_VERSION}", "--no-deps",
                            "--only-binary", ":all:", "-d", str(staging / "wheel")], check=True)
            wheel = next((staging / "wheel").glob("trl-*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target",
                        str(staging / "site"), str(wheel)], check=True, stdout=subprocess.DEVNULL)
        if not (staging / "site" / "trl" / "experimental" / "ppo" / "ppo_trainer.py").exists():
            raise SystemExit(f"{wheel}: no trl/experimental/ppo in it")
        (staging / "site").rename(trl_dir)  # atomic: a half-finished install never looks complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return trl_dir


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        harness.child_main(*sys.argv[2:5], ours=child_ours, trl=child_trl, prefix="ppo-bench")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="rounds (ours max_steps; TRL total_episodes / batch)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per round")
    parser.add_argument("--max-completion-length", type=int, default=24, help="TRL response_length")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="num_ppo_epochs, both sides")
    parser.add_argument("--mini-batches", type=int, default=2, help="num_mini_batches, both sides")
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: all cores)")
    parser.add_argument("--model", default=str(ROOT / "models/sft"))
    parser.add_argument("--reward-model", default=None,
                        help="default: models/reward_model, or /tmp/rm_real when that has no config.json")
    parser.add_argument("--data", default=str(ROOT / "data/prepared/pref_train.jsonl"))
    parser.add_argument("--trl-wheel", default=str(DEFAULT_WHEEL),
                        help=f"trl-{TRL_VERSION} wheel (absent: pip download trl=={TRL_VERSION} --no-deps)")
    parser.add_argument("--trl-dir", default=str(DEFAULT_TRL_DIR), help="where TRL 0.26.0 is (or gets) installed")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ppo_vs_trl_cpu.json"))
    args = parser.parse_args()
    harness.set_threads(args.threads)
    if args.prompts % args.mini_batches:
        raise SystemExit("--prompts must be a multiple of --mini-batches (TRL requires it)")
    reward_model = args.reward_model
    if reward_model is None:
        reward_model = str(ROOT / "models/reward_model")
        if not (Path(reward_model) / "config.json").exists():
            reward_model = str(Path(tempfile.gettempdir()) / "rm_real")
    if not (Path(reward_model) / "config.json").exists():
        raise SystemExit(f"{reward_model}: no reward model; train one (python -m components.reward_model) "
                         "or pass --reward-model")
    trl_dir = ensure_trl(Path(args.trl_dir), Path(args.trl_wheel))

    from transformers import AutoTokenizer

    from components.core.data.tokens import prompt_ids_for_generation
    from components.core.ops.io import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    max_prompt_length = 96
    n = args.steps * args.prompts  # one epoch's worth of distinct prompts: both sides use each prompt once
    records, seen, too_long = [], set(), 0
    for r in read_jsonl(args.data):
        key = json.dumps(r["prompt"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if len(prompt_ids_for_generation(tokenizer, r["prompt"])) > max_prompt_length:
            too_long += 1  # ours would skip it; TRL would train on it: neither gets it
            continue
        records.append({"id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"]})
        if len(records) == n:
            break
    if len(records) < n:
        raise SystemExit(f"{args.data}: {len(records)} distinct prompts of <= {max_prompt_length} tokens, {n} needed")
    spec = {"model": args.model, "reward_model": reward_model, "steps": args.steps, "prompts": args.prompts,
            "max_completion_length": args.max_completion_length, "num_ppo_epochs": args.ppo_epochs,
            "num_mini_batches": args.mini_batches, "kl_coef": args.kl_coef, "lr": args.lr, "seed": 1234,
            "max_prompt_length": max_prompt_length,
            "threads": harness.bench_threads(), "records": records}
    work = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    # both sides read one snapshot of the models: a pipeline run on the box may rewrite models/ meanwhile
    spec["model"] = str(shutil.copytree(args.model, work / "sft"))
    spec["reward_model"] = str(shutil.copytree(reward_model, work / "reward_model"))
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    rounds = harness.run_rounds(
        args.rounds, lambda kind, tag: run_child(kind, spec_path, work, tag, trl_dir), "tokens_per_s", "tok/s")
    shutil.rmtree(work, ignore_errors=True)
    summary = harness.summarize(rounds, "tokens_per_s")
    summary["targets"] = {"speedup_wall": ">= 1.5"}
    harness.write_results(args.out, "ppo_vs_trl", spec, rounds, summary, head={"trl": rounds[0]["trl"].get("versions")},
                          job={"model": args.model, "reward_model": reward_model, "prompts_total": len(records),
                               "prompts_skipped_too_long": too_long})


if __name__ == "__main__":
    main()
