"""Supervised fine-tuning stage.

    accelerate launch --config_file configs/accelerate/cpu.yaml -m components.sft --params params.yaml

Loss on assistant tokens only (the ids and assistant masks prepare wrote, core/data/token_store.py), token-mean over the whole optimizer
step, so 1 process x 32 and 2 processes x 16 follow the same loss trajectory. The run is a fixed plan
of steps (core/loop.plan_steps): a re-run after a crash loads the newest checkpoint with the same
fingerprint and replays exactly the remaining steps, ending with the same weights as an uninterrupted
run. Writes models/sft/, metrics/sft.json, plots/sft.csv and one MLflow run.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from pathlib import Path

import torch

from components.core.config import Runtime, SFTConfig
from components.core.data import packing, token_store
from components.core.data.tokens import IGNORE_INDEX, collate_sequences
from components.core.model import loading, logprobs
from components.core.model.logprobs import batch_nll
from components.core.ops import faults, logs, tracking
from components.core.ops.io import write_csv, write_json
from components.core.ops.logs import result_line, stage_main
from components.core.train import checkpoints, loop

log = logging.getLogger("alignflow.sft")


@torch.no_grad()
def evaluate_loss(model, accelerator, examples, batch_size: int, pad_id: int) -> float:
    """Token-mean NLL over the eval set, sharded over processes."""
    model.eval()
    batches = loop.sorted_batches([len(x[0]) for x in examples], batch_size)
    total = torch.zeros(2, device=accelerator.device)
    # the same number of forwards on every process (FSDP gathers weights in each one); padding counts 0
    for idx, padding in loop.even_shard(batches, accelerator.process_index, accelerator.num_processes):
        nll, n = batch_nll(model, collate_sequences([examples[i] for i in idx], pad_id).to(accelerator.device))
        if not padding:
            total += torch.stack([nll.float(), n.float()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1].clamp_min(1)).item()


def load_data(model_path: str, train_path: str, eval_path: str, runtime: Runtime):
    """(tokenizer, train, evals): the token ids prepare wrote for the SFT records, as (input_ids, labels)."""
    tokenizer = loading.load_tokenizer(model_path, runtime.trust_remote_code)
    train = token_store.load_sft(train_path, tokenizer, runtime.max_length)
    evals = token_store.load_sft(eval_path, tokenizer, runtime.max_length) if Path(eval_path).exists() else []
    if not train:
        raise ValueError(f"{train_path}: no SFT training records")
    return tokenizer, train, evals


def load_training(cfg: SFTConfig, model_path: str, accelerator, total_steps: int, runtime: Runtime):
    """(model, optimizer, lr schedule, packing): the model placed for training, and whether rows are packed."""
    model = loading.load_model(model_path, runtime.trust_remote_code, cfg.lora.model_dump(),
                               mixed_precision=runtime.mixed_precision,
                               gradient_checkpointing=cfg.gradient_checkpointing)
    pack = cfg.packing
    probe = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft (LoRA) passes masks on
    if pack and not logprobs.shared_prompt_supported(probe):  # packing needs a custom 4D mask, as shared prompts
        log.warning("sft.packing: this model's attention cannot take a custom 4D mask (sliding windows, or not "
                    "sdpa/eager); training one row per example")
        pack = False
    model, optimizer = loop.prepare_training(accelerator, model, cfg.learning_rate, cfg.weight_decay,
                                             cfg.optimizer_in_backward)
    lr_schedule = loop.make_scheduler(optimizer, cfg.scheduler, int(cfg.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(lr_schedule)  # not prepared: it would step once per process
    return model, optimizer, lr_schedule, pack


def train_step(model, accelerator, micro_batches: list[list[int]], train: list, step_tokens: int, pad_id: int,
               pack_length: int | None) -> tuple[torch.Tensor, int]:
    """Forward and backward over one optimizer step's micro-batches (this process's share of each); returns
    (nll sum, tokens) of the step summed over all processes, and the tokens this process saw (padding included).
    pack_length: rows packed up to this length, or None for one row per example."""
    world, rank = accelerator.num_processes, accelerator.process_index
    step_loss = torch.zeros(2, device=accelerator.device)
    tokens_seen = 0
    for k, mb in enumerate(micro_batches):
        mine = [train[i] for i in loop.shard(mb, rank, world)]
        batch = packing.collate_packed(mine, pad_id, pack_length) if pack_length else collate_sequences(mine, pad_id)
        batch = batch.to(accelerator.device)
        sync = k == len(micro_batches) - 1
        with loop.maybe_no_sync(accelerator, model, sync):
            nll, n = batch_nll(model, batch)
            # DDP averages gradients over processes, hence * world: the step's gradient is
            # that of (sum of all token NLLs in the global step) / step_tokens.
            accelerator.backward(nll * world / step_tokens)
        step_loss += torch.stack([nll.detach().float(), n.float()])
        tokens_seen += batch.num_tokens
    return accelerator.reduce(step_loss, reduction="sum"), tokens_seen


def final_metrics(history: list[dict], total_steps: int, world: int, train_examples: int) -> dict:
    """metrics/sft.json: the last logged training loss, the held-out loss (first and last) and perplexity."""
    final = {
        "train/loss": next(r["train/loss"] for r in reversed(history) if "train/loss" in r),
        "steps": total_steps,
        "world_size": world,
        "train/examples": train_examples,
        "tokens_per_second": history[-1].get("tokens_per_second", 0.0),
    }
    eval_rows = [r for r in history if "eval/loss" in r]
    if eval_rows:
        final["eval/loss"] = eval_rows[-1]["eval/loss"]
        final["eval/loss_first"] = eval_rows[0]["eval/loss"]
        final["eval/perplexity"] = float(torch.tensor(final["eval/loss"]).exp())
    return final


def run(
    cfg: SFTConfig,
    *,
    model_path: str,
    train_path: str,
    eval_path: str,
    out_dir: str = "models/sft",
    metrics_path: str = "metrics/sft.json",
    plots_path: str = "plots/sft.csv",
    checkpoint_dir: str = "checkpoints/sft",
    runtime: Runtime = Runtime(),
    track: bool = True,
) -> dict:
    """Train `cfg` (the `sft` params section) from model_path on the SFT records of train_path."""
    # the run's identity (checkpoint fingerprint, tracked params): its section plus the settings it reads
    hyper = {**cfg.model_dump(), "max_length": runtime.max_length, "mixed_precision": runtime.mixed_precision,
             "seed": runtime.seed, "trust_remote_code": runtime.trust_remote_code}
    accelerator = loop.make_accelerator(runtime.mixed_precision, runtime.deterministic)
    world = accelerator.num_processes
    torch.manual_seed(runtime.seed)

    # ---------------------------------------------------------------- data
    tokenizer, train, evals = load_data(model_path, train_path, eval_path, runtime)
    # cfg.batch_size is per device: the global micro-batch is split over processes
    plan = loop.plan_steps([len(x[0]) for x in train], cfg.batch_size * world, cfg.grad_accum, cfg.max_steps,
                           cfg.epochs, runtime.seed, world)
    total_steps = len(plan)
    label_counts = [sum(t != IGNORE_INDEX for t in labels[1:]) for _, labels in train]  # trained tokens, once

    # ---------------------------------------------------------------- model, optimizer, schedule, resume
    model, optimizer, lr_schedule, pack = load_training(cfg, model_path, accelerator, total_steps, runtime)
    ckpt_dir = Path(checkpoint_dir)
    code = checkpoints.code_fingerprint("components.sft")
    fp = checkpoints.fingerprint(checkpoints.math_params(hyper), checkpoints.model_identity(model_path),
                                 str(token_store.tokens_path(train_path)), world, code)
    start_step, history, saved = checkpoints.resume(accelerator, ckpt_dir, fp, total_steps, model, optimizer)
    best = loop.KeepBest(cfg.best_metric if cfg.keep_best else None, cfg.best_mode, ckpt_dir / fp, history, start_step)
    guard = loop.DivergenceGuard(cfg.divergence_factor, ckpt_dir, saved.get("guard"))

    # ---------------------------------------------------------------- train
    pad_id = tokenizer.pad_token_id
    tracking_params = {**{k: v for k, v in hyper.items() if not k.endswith(("_path", "_dir"))}, "world_size": world}
    inputs = [model_path, str(Path(train_path).parent)]
    with tracking.stage_tracking(accelerator, "sft", tracking_params, inputs, track) as mlrun:
        if evals and start_step == 0:  # the curve starts from the base model
            history.append({"step": 0, "eval/loss": evaluate_loss(model, accelerator, evals, cfg.batch_size, pad_id)})
            tracking.log_step_metrics(mlrun, history[-1], 0)
        bar = logs.progress(total_steps, start_step, "sft", accelerator.is_local_main_process)
        model.train()
        tokens_seen, t0 = 0, time.perf_counter()
        window = torch.zeros(2, device=accelerator.device)  # (nll sum, tokens) since the last log row
        for step in range(start_step, total_steps):
            micro_batches = plan[step]
            # every rank knows the whole global step, so the token-mean needs no extra communication
            step_tokens = sum(label_counts[i] for mb in micro_batches for i in mb)
            step_loss, seen = train_step(model, accelerator, micro_batches, train, step_tokens, pad_id,
                                         runtime.max_length if pack else None)
            tokens_seen += seen
            loss = step_loss[0] / step_loss[1]
            loop.guard_finite(loss, step + 1, ckpt_dir)
            grad_norm = loop.update(accelerator, model, optimizer, cfg.max_grad_norm,
                                    functools.partial(guard.check, step + 1, loss.item()))
            lr_schedule.step()
            faults.maybe_crash(step + 1)
            window += step_loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # redraw at the bar's own pace

            done = step + 1
            row = None
            if done % cfg.log_every == 0 or done == total_steps:
                elapsed = time.perf_counter() - t0
                row = {
                    "step": done,
                    "train/loss": (window[0] / window[1]).item(),
                    "learning_rate": lr_schedule.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens_per_second": tokens_seen * world / max(elapsed, 1e-9),
                }
                window.zero_()
            if evals and (done % cfg.eval_every == 0 or done == total_steps):
                row = row or {"step": done}
                row["eval/loss"] = evaluate_loss(model, accelerator, evals, cfg.batch_size, pad_id)
                best.update(accelerator, model, tokenizer, row, loading.stored_dtype(model_path))
            if row:
                history.append(row)
                tracking.log_step_metrics(mlrun, row, done)
            if done % cfg.save_every == 0 and done < total_steps:
                checkpoints.save_checkpoint(accelerator, ckpt_dir, done, {"fingerprint": fp, "history": history,
                                                                          "guard": guard.state()},
                                            cfg.keep_checkpoints, model, optimizer)
        bar.close()

        # ------------------------------------------------------------ outputs
        kept = best.publish(accelerator, model, tokenizer, out_dir, loading.stored_dtype(model_path))
        final = final_metrics(history, total_steps, world, len(train)) | kept
        if accelerator.is_main_process:
            write_csv(plots_path, history)
            write_json(metrics_path, final)
            tracking.log_step_metrics(mlrun, {f"final/{k}": v for k, v in final.items()}, total_steps)
    checkpoints.clear_checkpoints(accelerator, ckpt_dir)
    return final


@stage_main("sft")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params
    from components.core.ops.io import resolve_model_path

    parser = argparse.ArgumentParser(description="SFT stage")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default=None, help="override: base model dir or hub id")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--out", default="models/sft")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    result = run(p.sft, model_path=args.model or resolve_model_path("models/base"),
                 train_path=f"{args.data_dir}/sft_train.jsonl", eval_path=f"{args.data_dir}/sft_eval.jsonl",
                 out_dir=args.out, runtime=Runtime.of(p))
    log.info(result_line("sft", result, ("train/loss", "eval/loss_first", "eval/loss", "steps", "tokens_per_second"),
                         "metrics/sft.json"))


if __name__ == "__main__":
    main()
