"""Preference-optimisation stage (DPO and its family, chosen by `dpo.loss`).

    accelerate launch --config_file configs/accelerate/cpu.yaml -m components.dpo --params params.yaml

The policy starts from the SFT model; the reference log-probs come from the cached artifact of the
`reference` stage, so only one model sits in memory (with LoRA, that reference is exactly the base
with adapters disabled, and no second copy is ever made). Chosen and rejected go through one forward
pass; batches are bucketed by length. Same loop guarantees as SFT: accumulation, warmup + decay,
clipping, mixed precision on GPU, checkpoint + exact resume, NaN guard. Writes models/dpo/,
metrics/dpo.json (TRL's metric names), plots/dpo.csv and one MLflow run.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch

from components.core.algos import losses
from components.core.config import DPOConfig, Runtime
from components.core.data import token_store
from components.core.data.tokens import pair_length, pair_token_hash
from components.core.model import loading
from components.core.model.logprobs import StaleReferenceError, load_reference_logps, pair_logps
from components.core.ops import faults, logs, tracking
from components.core.ops.io import write_csv, write_json
from components.core.ops.logs import result_line, stage_main
from components.core.train import checkpoints, loop

log = logging.getLogger("alignflow.dpo")


def attach_reference(pairs: list[dict], reference: dict, path: str) -> None:
    """Each pair's cached reference log-probs, keyed by (record id, token hash): a reference computed on other
    tokens (another tokenizer or chat template, data.max_length / max_prompt_length changed) is refused."""
    missing = [p["id"] for p in pairs if p["id"] not in reference]
    if missing:
        raise StaleReferenceError(
            f"{path}: no reference log-probs for {len(missing)} pairs this run visits (e.g. id {missing[0]}); "
            "the data, or the run's plan (dpo.max_steps, batch_size, grad_accum, epochs, seed, number of processes), "
            "changed since the reference stage ran: re-run it (dvc repro reference)"
        )
    stale = []
    for p in pairs:
        _, _, ct, rt, token_hash = reference[p["id"]]
        counts_differ = (ct, rt) != (len(p["chosen_ids"]), len(p["rejected_ids"]))
        if counts_differ or (token_hash is not None and token_hash != pair_token_hash(p)):
            stale.append((p["id"], "token counts" if counts_differ else "tokens"))
    if stale:
        pid, what = stale[0]
        raise StaleReferenceError(
            f"{path}: the reference log-probs of {len(stale)} of {len(pairs)} pairs were computed on other tokens "
            f"(e.g. id {pid}: its {what} differ from this tokenisation). The tokenizer, chat template, "
            "data.max_length or data.max_prompt_length changed since the reference stage ran: re-run it "
            "(dvc repro reference)"
        )
    for p in pairs:
        p["ref_chosen"], p["ref_rejected"] = reference[p["id"]][:2]


def pair_losses(model, pairs: list[dict], pad_id: int, device, loss_kwargs: dict,
                kto_kl: torch.Tensor | None = None) -> tuple[losses.LossOutput, dict]:
    """Per-pair losses of a micro-batch and the tensors the metrics need (incl. the summed log-ratios).
    loss_kwargs: `loss_settings`'s; its `padding_free` picks the layout the pairs are scored in, the rest go to
    the loss."""
    loss_kwargs = dict(loss_kwargs)
    padding_free = loss_kwargs.pop("padding_free", False)
    pc, pr, nc, nr = pair_logps(model, pairs, pad_id, device, padding_free=padding_free)
    rc = torch.tensor([p["ref_chosen"] for p in pairs], device=device)
    rr = torch.tensor([p["ref_rejected"] for p in pairs], device=device)
    out = losses.preference_loss(
        policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc, reference_rejected_logps=rr,
        chosen_lengths=nc, rejected_lengths=nr, kto_kl=kto_kl, **loss_kwargs,
    )
    log_ratio_sum = ((pc - rc) + (pr - rr)).detach().sum()
    return out, {"pc": pc.detach(), "pr": pr.detach(), "log_ratio_sum": log_ratio_sum}


def reduce_means(accelerator, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Each named sum over all processes divided by the pair count over all processes (keys in sorted order)."""
    totals = loop.reduce_sums(accelerator, sums)
    total = accelerator.reduce(torch.tensor(float(count), device=accelerator.device), reduction="sum")
    return {k: (v / total.clamp_min(1)).item() for k, v in totals.items()}


@torch.no_grad()
def evaluate_pairs(model, accelerator, pairs, batch_size, pad_id, loss_kwargs, kto_kl=None) -> dict[str, float]:
    model.eval()
    batches = loop.sorted_batches([pair_length(p) for p in pairs], batch_size)
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=accelerator.device))
    count = 0
    # the same number of forwards on every process (FSDP gathers weights in each one); padding counts 0
    for idx, padding in loop.even_shard(batches, accelerator.process_index, accelerator.num_processes):
        out, lp = pair_losses(model, [pairs[i] for i in idx], pad_id, accelerator.device, loss_kwargs, kto_kl)
        count += 0 if padding else len(idx)
        for k, v in losses.preference_metric_sums(out, lp["pc"], lp["pr"]).items():  # same keys on every rank
            sums[k] = sums[k] + (0.0 if padding else v)
    model.train()
    return {f"eval/{k}": v for k, v in reduce_means(accelerator, dict(sums), count).items()}


def loss_settings(cfg: DPOConfig) -> dict:
    """The keyword arguments of `losses.preference_loss` that come from the section, and `padding_free`, which
    `pair_losses` takes out (the pairs' layout: it travels with these to every place pairs are scored)."""
    return {"name": cfg.loss, "beta": cfg.beta, "label_smoothing": cfg.label_smoothing,
            "simpo_gamma": cfg.simpo_gamma, "orpo_alpha": cfg.orpo_alpha,
            "kto_desirable_weight": cfg.kto_desirable_weight,
            "kto_undesirable_weight": cfg.kto_undesirable_weight, "rpo_alpha": cfg.rpo_alpha,
            "padding_free": cfg.padding_free}


def load_data(cfg: DPOConfig, model_path: str, data_dir: str, reference_dir: str, world: int, runtime: Runtime):
    """(tokenizer, train, evals, plan): the tokenised pairs, the run's step plan, and the cached reference
    log-probs attached to every pair the plan visits and every eval pair."""
    tokenizer = loading.load_tokenizer(model_path, runtime.trust_remote_code)
    splits = {split: token_store.load_pairs(Path(data_dir) / f"pref_{split}.jsonl", tokenizer, runtime.max_length,
                                            runtime.max_prompt_length) for split in ("train", "eval")}
    train, evals = splits["train"], splits["eval"]
    if not train:
        raise ValueError(f"{data_dir}/pref_train.jsonl: no preference pairs")
    plan = loop.preference_plan(train, cfg.batch_size, cfg.grad_accum, cfg.max_steps, cfg.epochs, runtime.seed, world)
    # reference log-probs for the pairs this run visits (the reference stage may have scored only those)
    for split, needed in (("train", [train[i] for i in loop.planned_indices(plan)]), ("eval", evals)):
        ref_path = Path(reference_dir) / f"{split}.pt"
        attach_reference(needed, load_reference_logps(ref_path), str(ref_path))
    return tokenizer, train, evals, plan


def load_training(cfg: DPOConfig, model_path: str, accelerator, total_steps: int, runtime: Runtime):
    """(model, optimizer, lr schedule): the policy placed for training."""
    model = loading.load_model(model_path, runtime.trust_remote_code, cfg.lora.model_dump(),
                               mixed_precision=runtime.mixed_precision,
                               gradient_checkpointing=cfg.gradient_checkpointing)
    model, optimizer = loop.prepare_training(accelerator, model, cfg.learning_rate, cfg.weight_decay,
                                             cfg.optimizer_in_backward)
    lr_schedule = loop.make_scheduler(optimizer, cfg.scheduler, int(cfg.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(lr_schedule)
    return model, optimizer, lr_schedule


def train_step(model, accelerator, micro_batches: list[list[int]], train: list[dict], pad_id: int,
               loss_kwargs: dict, kto_kl: torch.Tensor, window: dict[str, torch.Tensor]) -> tuple:
    """Forward and backward over one optimizer step's micro-batches (this process's share of each), adding the
    metric sums to `window`. Returns (mean loss over the step's pairs, next KTO reference point, this process's
    pairs, its tokens), the first two over all processes."""
    world, rank = accelerator.num_processes, accelerator.process_index
    step_pairs = sum(len(mb) for mb in micro_batches)
    step_loss = torch.zeros((), device=accelerator.device)
    step_log_ratio = torch.zeros((), device=accelerator.device)
    pairs, tokens = 0, 0
    for k, mb in enumerate(micro_batches):
        mine = [train[i] for i in loop.shard(mb, rank, world)]
        with loop.maybe_no_sync(accelerator, model, k == len(micro_batches) - 1):
            with accelerator.autocast():
                out, lp = pair_losses(model, mine, pad_id, accelerator.device, loss_kwargs, kto_kl)
            # mean over all pairs of the global step; * world undoes DDP's gradient averaging
            accelerator.backward(out.losses.sum() * world / step_pairs)
        step_loss += out.losses.detach().sum()
        step_log_ratio += lp["log_ratio_sum"]
        for key, v in losses.preference_metric_sums(out, lp["pc"], lp["pr"]).items():
            window[key] = window[key] + v
        pairs += len(mine)
        tokens += sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in mine)
    loss_value = accelerator.reduce(step_loss, reduction="sum") / step_pairs
    # KTO's reference point z0: this step's mean log-ratio over all its pairs on all processes
    kto_kl = (accelerator.reduce(step_log_ratio, reduction="sum") / (2 * step_pairs)).clamp(min=0)
    return loss_value, kto_kl, pairs, tokens


def final_metrics(history: list[dict], total_steps: int, world: int, train_pairs: int, beta: float) -> dict:
    """metrics/dpo.json: the last logged training row (TRL's names), the last held-out row, and the run's size."""
    last_train = next(r for r in reversed(history) if "loss" in r)
    final = {k: v for k, v in last_train.items() if k not in ("step", "learning_rate", "grad_norm")}
    eval_rows = [r for r in history if "eval/loss" in r]
    if eval_rows:
        final.update({k: v for k, v in eval_rows[-1].items() if k.startswith("eval/")})
        final["eval/rewards/accuracies_first"] = eval_rows[0]["eval/rewards/accuracies"]
    final.update({"steps": total_steps, "world_size": world, "train/pairs": train_pairs, "beta": beta})
    return final


def run(
    cfg: DPOConfig,
    *,
    model_path: str,
    data_dir: str = "data/prepared",
    reference_dir: str = "artifacts/ref_logps",
    out_dir: str = "models/dpo",
    metrics_path: str = "metrics/dpo.json",
    plots_path: str = "plots/dpo.csv",
    checkpoint_dir: str = "checkpoints/dpo",
    runtime: Runtime = Runtime(),
    track: bool = True,
) -> dict:
    """Train `cfg` (the `dpo` params section) from model_path on the pairs of data_dir and their cached reference."""
    # the run's identity (checkpoint fingerprint, tracked params): its section plus the settings it reads
    hyper = {**cfg.model_dump(), "max_length": runtime.max_length, "max_prompt_length": runtime.max_prompt_length,
             "mixed_precision": runtime.mixed_precision, "seed": runtime.seed,
             "trust_remote_code": runtime.trust_remote_code}
    loss_kwargs = loss_settings(cfg)
    accelerator = loop.make_accelerator(runtime.mixed_precision, runtime.deterministic)
    world = accelerator.num_processes
    torch.manual_seed(runtime.seed)

    # ---------------------------------------------------------------- data + cached reference
    tokenizer, train, evals, plan = load_data(cfg, model_path, data_dir, reference_dir, world, runtime)
    total_steps = len(plan)

    # ---------------------------------------------------------------- model, optimizer, schedule, resume
    model, optimizer, lr_schedule = load_training(cfg, model_path, accelerator, total_steps, runtime)
    ckpt_dir = Path(checkpoint_dir)
    code = checkpoints.code_fingerprint("components.dpo")
    fp = checkpoints.fingerprint(checkpoints.math_params(hyper), checkpoints.model_identity(model_path),
                                 str(token_store.tokens_path(Path(data_dir) / "pref_train.jsonl")),
                                 str(Path(reference_dir) / "train.pt"), code, world)
    start_step, history, saved = checkpoints.resume(accelerator, ckpt_dir, fp, total_steps, model, optimizer)
    best = loop.KeepBest(cfg.best_metric if cfg.keep_best else None, cfg.best_mode, ckpt_dir / fp, history, start_step)
    guard = loop.DivergenceGuard(cfg.divergence_factor, ckpt_dir, saved.get("guard"))
    # KTO's reference point z0: the previous step's mean log-ratio over all its pairs on all processes
    kto_kl = torch.tensor(float(saved.get("kto_kl", 0.0)), device=accelerator.device)

    # ---------------------------------------------------------------- train
    pad_id = tokenizer.pad_token_id
    tracking_params = {**{k: v for k, v in hyper.items() if not k.endswith(("_path", "_dir"))}, "world_size": world}
    inputs = [model_path, data_dir, reference_dir]
    with tracking.stage_tracking(accelerator, "dpo", tracking_params, inputs, track) as mlrun:
        bar = logs.progress(total_steps, start_step, f"dpo ({cfg.loss})", accelerator.is_local_main_process)
        model.train()
        window: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=accelerator.device))
        window_pairs, tokens_seen, t0 = 0, 0, time.perf_counter()
        for step in range(start_step, total_steps):
            loss_value, kto_kl, pairs, tokens = train_step(model, accelerator, plan[step], train, pad_id, loss_kwargs,
                                                           kto_kl, window)
            window_pairs += pairs
            tokens_seen += tokens
            loop.guard_finite(loss_value, step + 1, ckpt_dir)
            grad_norm = loop.update(accelerator, model, optimizer, cfg.max_grad_norm,
                                    functools.partial(guard.check, step + 1, loss_value.item()))
            lr_schedule.step()
            faults.maybe_crash(step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value.item():.4f}", refresh=False)  # redraw at the bar's own pace

            done = step + 1
            row = None
            if done % cfg.log_every == 0 or done == total_steps:
                elapsed = time.perf_counter() - t0
                row = {"step": done, **reduce_means(accelerator, dict(window), window_pairs),
                       "learning_rate": lr_schedule.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "tokens_per_second": tokens_seen * world / max(elapsed, 1e-9)}
                window.clear()
                window_pairs = 0
            if evals and (done % cfg.eval_every == 0 or done == total_steps):
                row = row or {"step": done}
                row.update(evaluate_pairs(model, accelerator, evals, cfg.batch_size, pad_id, loss_kwargs, kto_kl))
                best.update(accelerator, model, tokenizer, row, loading.stored_dtype(model_path))
            if row:
                history.append(row)
                tracking.log_step_metrics(mlrun, row, done)
            if done % cfg.save_every == 0 and done < total_steps:
                checkpoints.save_checkpoint(accelerator, ckpt_dir, done, {"fingerprint": fp, "history": history,
                                                                          "guard": guard.state(), "kto_kl": kto_kl.item()},
                                            cfg.keep_checkpoints, model, optimizer)
        bar.close()

        # ------------------------------------------------------------ outputs
        kept = best.publish(accelerator, model, tokenizer, out_dir, loading.stored_dtype(model_path))
        final = final_metrics(history, total_steps, world, len(train), cfg.beta) | kept
        if accelerator.is_main_process:
            write_csv(plots_path, history)
            write_json(metrics_path, final)
            tracking.log_step_metrics(mlrun, {f"final/{k}": v for k, v in final.items()}, total_steps)
    checkpoints.clear_checkpoints(accelerator, ckpt_dir)
    return final


@stage_main("dpo")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description="preference optimisation stage")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/sft", help="policy init (default: the SFT model)")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--reference-dir", default="artifacts/ref_logps")
    parser.add_argument("--out", default="models/dpo")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    result = run(p.dpo, model_path=args.model, data_dir=args.data_dir, reference_dir=args.reference_dir,
                 out_dir=args.out, runtime=Runtime.of(p))
    log.info(result_line("dpo", result, ("loss", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "steps"),
                         "metrics/dpo.json"))


if __name__ == "__main__":
    main()
