"""Reference log-prob stage: score the preference pairs once under the reference model.

    accelerate launch --config_file configs/accelerate/cpu.yaml -m components.reference --params params.yaml

Writes `artifacts/ref_logps/{train,eval}.pt` (per example id: summed log-probs of chosen and rejected,
token counts, and a hash of the exact tokens scored; per-token means are sum / count) and `meta.json`.
With `reference.pairs: planned` (default) it scores the training pairs of the dpo run's step plan (the same
`loop.preference_plan` dpo follows) and every eval pair, so a run shorter than an epoch pays only for
what it uses; `all` scores every pair. DVC caches the artifact and the stage reads only dpo's plan params
(max_steps, batch_size, grad_accum, epochs, seed), never beta or the loss, so a sweep over N betas (or
losses) pays for one reference pass, not N. TRL keeps precomputed reference log-probs in memory for one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from components.core.config import DPOConfig, ReferenceConfig, Runtime
from components.core.data import token_store
from components.core.data.tokens import pair_length, pair_token_hash
from components.core.model import loading, sharding
from components.core.model.logprobs import pair_logps
from components.core.ops import logs
from components.core.ops.io import atomic_dir, write_json
from components.core.ops.logs import result_line, stage_main
from components.core.train import loop

log = logging.getLogger("alignflow.reference")
SPLITS = ("train", "eval")


@torch.no_grad()
def score_pairs(model, accelerator, pairs: list[dict], batch_size: int, pad_id: int, desc: str,
                padding_free: bool = False) -> dict:
    """Reference log-probs of all pairs, sharded over processes and gathered, in input order. padding_free: each
    batch's pairs end to end without padding (`pair_logps`), the same numbers up to float rounding."""
    from accelerate.utils import gather_object

    batches = loop.sorted_batches([pair_length(p) for p in pairs], batch_size)
    # the same number of forwards on every process (FSDP gathers weights in each one)
    mine = loop.even_shard(batches, accelerator.process_index, accelerator.num_processes)
    results: list[tuple[int, float, float, int, int]] = []
    bar = logs.progress(len(mine), 0, desc, accelerator.is_local_main_process)
    for idx, padding in mine:
        with accelerator.autocast():
            c, r, ct, rt = pair_logps(model, [pairs[i] for i in idx], pad_id, accelerator.device,
                                      padding_free=padding_free)
        if not padding:
            results += zip(idx, c.tolist(), r.tolist(), ct.tolist(), rt.tolist(), strict=True)
        bar.update(1)
    bar.close()
    if accelerator.num_processes > 1:
        results = gather_object(results)
    results.sort()
    return {
        "ids": [pairs[i]["id"] for i, *_ in results],
        "chosen_logps": torch.tensor([x[1] for x in results], dtype=torch.float32),
        "rejected_logps": torch.tensor([x[2] for x in results], dtype=torch.float32),
        "chosen_tokens": torch.tensor([x[3] for x in results], dtype=torch.long),
        "rejected_tokens": torch.tensor([x[4] for x in results], dtype=torch.long),
        # what each log-prob was computed on: dpo refuses a reference whose tokens differ from its own
        "token_hashes": [pair_token_hash(pairs[i]) for i, *_ in results],
    }


def dpo_plan(cfg: ReferenceConfig, dpo: DPOConfig, seed: int) -> dict | None:
    """The settings of the dpo run's step plan whose training pairs get scored (reference.pairs: planned), or None
    to score them all."""
    if cfg.pairs != "planned":
        return None
    return {"batch_size": dpo.batch_size, "grad_accum": dpo.grad_accum, "max_steps": dpo.max_steps,
            "epochs": dpo.epochs, "seed": seed}


def run(
    cfg: ReferenceConfig,
    *,
    dpo: DPOConfig = DPOConfig(),
    model_path: str = "models/sft",
    data_dir: str = "data/prepared",
    out_dir: str = "artifacts/ref_logps",
    metrics_path: str = "metrics/reference.json",
    runtime: Runtime = Runtime(),
) -> dict:
    """Score the pairs of data_dir under model_path with `cfg` (the `reference` params section). dpo: the section
    whose step plan (batch_size, grad_accum, max_steps, epochs, and the seed) picks the training pairs to score
    when cfg.pairs is planned; beta and the loss never matter here."""
    plan = dpo_plan(cfg, dpo, runtime.seed)
    accelerator = loop.make_accelerator(runtime.mixed_precision, runtime.deterministic)
    tokenizer = loading.load_tokenizer(model_path, runtime.trust_remote_code)
    model = loading.load_model(model_path, runtime.trust_remote_code, frozen=True, mixed_precision=runtime.mixed_precision)
    model = sharding.prepare_frozen(accelerator, model)

    results, summary = {}, {}
    t0 = time.perf_counter()
    tokens = 0
    for split in SPLITS:
        pairs = token_store.load_pairs(Path(data_dir) / f"pref_{split}.jsonl", tokenizer, runtime.max_length,
                                       runtime.max_prompt_length)
        if split == "train" and plan is not None and pairs:
            steps = loop.preference_plan(pairs, world=accelerator.num_processes, **plan)
            summary["train/pairs_in_data"] = len(pairs)
            pairs = [pairs[i] for i in loop.planned_indices(steps)]
        results[split] = score_pairs(model, accelerator, pairs, cfg.batch_size, tokenizer.pad_token_id,
                                     f"reference {split}", cfg.padding_free)
        n = len(pairs)
        tokens += sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
        summary[f"{split}/pairs"] = n
        if n:
            summary[f"{split}/logps/chosen"] = results[split]["chosen_logps"].mean().item()
            summary[f"{split}/logps/rejected"] = results[split]["rejected_logps"].mean().item()
    elapsed = time.perf_counter() - t0
    summary.update({"seconds": elapsed, "tokens_per_second": tokens / max(elapsed, 1e-9)})

    if accelerator.is_main_process:
        with atomic_dir(out_dir) as tmp:
            for split, data in results.items():
                torch.save(data, tmp / f"{split}.pt")
            # only deterministic facts in the cached artifact (timings would change its hash every run
            # and make dpo look stale); timings go to metrics_path
            meta = {"model": model_path, "max_length": runtime.max_length, "max_prompt_length": runtime.max_prompt_length,
                    "mixed_precision": accelerator.mixed_precision, "scored": "planned" if plan else "all",
                    "plan": plan, "world_size": accelerator.num_processes,
                    **{k: v for k, v in summary.items() if k not in ("seconds", "tokens_per_second")}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_json(metrics_path, summary)
    accelerator.wait_for_everyone()
    return summary


@stage_main("reference")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description="reference log-prob stage")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/sft", help="reference model (default: the SFT model)")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--out", default="artifacts/ref_logps")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    result = run(p.reference, dpo=p.dpo, model_path=args.model, data_dir=args.data_dir, out_dir=args.out,
                 runtime=Runtime.of(p))
    log.info(result_line("reference", result, ("train/pairs", "eval/pairs", "tokens_per_second"),
                         "metrics/reference.json"))


if __name__ == "__main__":
    main()
