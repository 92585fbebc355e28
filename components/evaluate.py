"""Evaluation stage: SFT vs DPO (and GRPO, PPO, RLOO) on held-out data, and an HTML report read in a minute.

    python -m components.evaluate --params params.yaml

For both models it measures
- preference accuracy on held-out pairs: the DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x))
  against the cached reference log-probs (artifacts/ref_logps/eval.pt), and plain likelihood
  preference log pi(y_w|x) > log pi(y_l|x);
- generations on held-out prompts scored by a judge (the task's programmatic reward by default):
  mean reward, exact-solve rate, per-prompt win rate DPO vs SFT with a bootstrap interval;
- a Monte-Carlo estimate of KL(pi_dpo || pi_sft) on the DPO samples, response lengths, and held-out
  SFT perplexity.
Pairs and SFT conversations are the token ids prepare wrote (data/prepared/tokens, core/data/token_store.py); the
held-out prompts are rendered for generation, and the judge reads their text.
The online policies (models/grpo, models/ppo, models/rloo, those that were trained) are measured the same way
on the same prompts and seeds: `eval/<name>/...` (reward with CI, exact solves, win rate vs SFT and vs DPO, KL
to SFT, length ratio). With a reward model (models/reward_model), every policy's samples also get its score,
`.../rm_score_mean` beside the judge's reward: a policy that raises the first and not the second is hacking it.
With `evaluate.base`, the model SFT started from (models/base) is measured too (`eval/base/...`), and
`eval/sft/reward_delta_vs_base` (with its CI) says what SFT did to the reward. With `grpo.environment`: task
success with and without its tools, every policy (core/eval/tool_use.py, `eval/<name>/tool/...`).
Writes metrics/eval.json, plots/eval.csv (one row per prompt, for `dvc plots`), reports/eval/ (index.html with
embedded PNGs, the PNGs, samples.jsonl) and one MLflow run.

The file reads top to bottom: `score_models` (everything that needs a model), `summarise` (pure: per-item
numbers in, metrics out), the stage's phases (`load_heldout`, `judge_samples`, the report's rows), then `run`,
which calls them in order and writes metrics, report and the MLflow run. Judges, sampling, statistics and the
report's rendering are in core/ (eval/judges, model/generation, algos/stats, eval/report), shared with `promote`.

Why this file is long: it is the one stage that measures every trained policy on the same prompts and seeds
(SFT, DPO and the online GRPO / PPO / RLOO, with the reward model's view beside the judge's); splitting the
scoring from the metrics it feeds would scatter that one contract over files.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.core.algos.reward_functions import last_user_text
from components.core.algos.stats import bootstrap_ci, bootstrap_ratio_ci, implicit_rewards, win_values
from components.core.config import EvaluateConfig, Runtime, params_hash
from components.core.data import token_store
from components.core.data.tokens import collate_sequences, pair_token_hash
from components.core.eval import report as report_html
from components.core.eval.judges import eval_prompts, load_judge
from components.core.eval.tool_use import ToolEval, evaluate_tools, heldout_prompts
from components.core.model.generation import eos_ids, generate_tokens, load_eval_model, response_length
from components.core.model.loading import autocast, load_tokenizer
from components.core.model.logprobs import StaleReferenceError, batch_nll, preference_logps, response_logps
from components.core.ops import determinism
from components.core.ops.io import read_jsonl, write_csv, write_json
from components.core.ops.logs import result_line, stage_main

log = logging.getLogger("alignflow.evaluate")
ONLINE = ("grpo", "ppo", "rloo")  # the online policies evaluated beside DPO, when trained (models/<name>)
BASE = "base"  # models/base, with evaluate.base: the model SFT started from
CONFIDENCE = 0.95  # of every bootstrap interval in the metrics and the report


# ----------------------------------------------------------------------------- scoring with a model


@torch.no_grad()
def heldout_perplexity(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                       mixed_precision: str = "auto") -> float:
    """exp(token-mean NLL) over assistant tokens of held-out SFT conversations (as sft.evaluate_loss);
    examples: (input_ids, labels) as `token_store.load_sft` gives them."""
    examples = sorted(examples, key=lambda e: len(e[0]))
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate_sequences(examples[start : start + batch_size], pad_id).to(device)
        with autocast(device, mixed_precision):
            batch_sum, batch_tokens = batch_nll(model, batch)
        nll += float(batch_sum)
        tokens += int(batch_tokens)
    return math.exp(nll / tokens) if tokens else float("nan")


def score_models(policies: dict[str, str], tokenizer, pairs: list[dict], prompt_messages: list[list[dict]],
                 sft_examples: list[tuple[list[int], list[int]]], cfg: EvaluateConfig, runtime: Runtime) -> dict:
    """Everything evaluate needs a model for, per held-out item, for SFT, DPO and the online policies.

    policies: name -> model directory, `sft` first, then `dpo` and the online ones. Returns logps[name] = (chosen
    (N,), rejected (N,), chosen_tokens (N,), rejected_tokens (N,)) on the pairs, generated[name] = (prompt_ids,
    response_ids) per prompt, perplexity[name] (when there are SFT records), kl_terms[name] (P,) = log pi_name(y|x)
    - log pi_sft(y|x) on name's untempered samples, and the eos ids. Every policy samples the same prompts with
    the same seed (common random numbers).
    """
    trust, mixed_precision, seed = runtime.trust_remote_code, runtime.mixed_precision, runtime.seed
    batch_size, max_new_tokens = cfg.batch_size, cfg.max_new_tokens
    sft_model = load_eval_model(policies["sft"], trust)
    others = {name: load_eval_model(path, trust) for name, path in policies.items() if name != "sft"}
    pad_id = tokenizer.pad_token_id

    logps: dict[str, tuple[torch.Tensor, ...]] = {}
    generated: dict[str, tuple[list[list[int]], list[list[int]]]] = {}
    perplexity: dict[str, float] = {}
    for name, model in (("sft", sft_model), *others.items()):
        logps[name] = preference_logps(model, pairs, batch_size, pad_id, mixed_precision)
        generated[name] = generate_tokens(model, tokenizer, prompt_messages, max_new_tokens, cfg.temperature,
                                          cfg.top_p, batch_size, seed, desc=f"generate {name}")
        if sft_examples:
            perplexity[name] = heldout_perplexity(model, sft_examples, pad_id, batch_size, mixed_precision)

    # KL(pi || pi_sft) ~ E_{y ~ pi}[log pi(y|x) - log pi_sft(y|x)], summed over the response.
    # The estimator needs samples of the policy itself: at another temperature / top-p they come from a
    # different distribution (biased, even negative), so then the policy samples again, untempered.
    kl_terms = {}
    for name, model in others.items():
        if cfg.temperature == 1.0 and cfg.top_p == 1.0:
            prompt_ids, response_ids = generated[name]
        else:
            prompt_ids, response_ids = generate_tokens(model, tokenizer, prompt_messages, max_new_tokens, 1.0, 1.0,
                                                       batch_size, seed + 1, desc=f"generate {name} (KL)")
        kl_terms[name] = (response_logps(model, prompt_ids, response_ids, batch_size, pad_id, mixed_precision)
                          - response_logps(sft_model, prompt_ids, response_ids, batch_size, pad_id, mixed_precision))
    return {"logps": logps, "generated": generated, "perplexity": perplexity, "kl_terms": kl_terms,
            "eos": eos_ids(others["dpo"], tokenizer)}


# ----------------------------------------------------------------------------- metrics (pure)


def policy_vs_sft(name: str, scores: dict[str, Sequence[float]], lengths: dict[str, Sequence[int]],
                  kl_terms: torch.Tensor, bootstrap_samples: int, confidence: float, seed: int,
                  exact_reward: bool, rm_scores: dict[str, Sequence[float]] | None = None) -> dict[str, float]:
    """One policy against SFT on the same prompts: judge reward, paired delta and win rate, KL to SFT, length
    ratio, each with its bootstrap CI. Keys without prefix (the caller adds `eval/` or `eval/grpo/`)."""
    wins = win_values(scores[name], scores["sft"])
    win_rate, win_low, win_high = bootstrap_ci(wins, bootstrap_samples, confidence, seed)
    deltas = [d - s for d, s in zip(scores[name], scores["sft"], strict=True)]
    delta, delta_low, delta_high = bootstrap_ci(deltas, bootstrap_samples, confidence, seed)
    reward_mean, reward_low, reward_high = bootstrap_ci(scores[name], bootstrap_samples, confidence, seed)
    kl, kl_low, kl_high = bootstrap_ci(kl_terms.tolist(), bootstrap_samples, confidence, seed)
    # floor of one token: an SFT model that always stops at once must not make the ratio infinite
    ratio, ratio_low, ratio_high = bootstrap_ratio_ci(lengths[name], lengths["sft"], bootstrap_samples, confidence,
                                                      seed)
    rm = {"rm_score_mean": float(np.mean(rm_scores[name]))} if rm_scores else {}
    out = {
        "reward_mean": reward_mean, "reward_mean_ci_low": reward_low, "reward_mean_ci_high": reward_high,
        "reward_delta": delta, "reward_delta_ci_low": delta_low, "reward_delta_ci_high": delta_high,
        "win_rate_vs_sft": win_rate, "win_rate_ci_low": win_low, "win_rate_ci_high": win_high,
        "kl_to_reference": kl, "kl_to_reference_ci_low": kl_low, "kl_to_reference_ci_high": kl_high,
        "length_mean": float(np.mean(lengths[name])),
        "length_ratio": ratio, "length_ratio_ci_low": ratio_low, "length_ratio_ci_high": ratio_high, **rm,
    }
    if exact_reward:  # share of exact solves, and its paired difference to SFT with a bootstrap CI
        solved = [float(s == 1.0) for s in scores[name]]
        gained = [a - float(b == 1.0) for a, b in zip(solved, scores["sft"], strict=True)]
        out["reward_eq_1"] = float(np.mean(solved))
        d, d_low, d_high = bootstrap_ci(gained, bootstrap_samples, confidence, seed)
        out.update({"reward_eq_1_delta": d, "reward_eq_1_delta_ci_low": d_low, "reward_eq_1_delta_ci_high": d_high})
    return out


def summarise(
    *,
    scores: dict[str, Sequence[float]],
    lengths: dict[str, Sequence[int]],
    logps: dict[str, tuple[torch.Tensor, torch.Tensor]],
    reference_logps: tuple[torch.Tensor, torch.Tensor],
    kl_terms: torch.Tensor | dict[str, torch.Tensor],
    beta: float,
    bootstrap_samples: int,
    confidence: float,
    seed: int,
    perplexity: dict[str, float] | None = None,
    exact_reward: bool = False,
    rm_scores: dict[str, Sequence[float]] | None = None,
) -> dict[str, float]:
    """The stage's metrics from per-item numbers; no model involved.

    scores[name], lengths[name]: judge score and generated length per held-out prompt (P,), for
    name in sft, dpo and optionally the ONLINE policies (same prompts, same order). logps[name] = (chosen (N,),
    rejected (N,)): summed response log-probs on the held-out pairs; reference_logps = (chosen (N,), rejected
    (N,)): the reference's, one per held-out pair. kl_terms[name] (P,): log pi_name - log pi_sft on name's untempered samples (a tensor
    means DPO's). DPO's metrics keep their plain `eval/` names (the gate's); an online policy's are
    `eval/<name>/...`, plus its win rate against DPO on the same prompts. rm_scores[name] (P,): the reward
    model's score of each sample, when there is a reward model. exact_reward: the judge gives 1.0 exactly for a
    correct answer (the synthetic task), so the share of 1.0 scores is reported too.
    """
    kl_terms = kl_terms if isinstance(kl_terms, dict) else {"dpo": kl_terms}
    ref_chosen, ref_rejected = reference_logps
    dpo_chosen_r = implicit_rewards(logps["dpo"][0], ref_chosen, beta)
    dpo_rejected_r = implicit_rewards(logps["dpo"][1], ref_rejected, beta)
    margins = dpo_chosen_r - dpo_rejected_r
    logp_margin = {name: (logps[name][0] - logps[name][1]) for name in logps}
    sft_mean, sft_low, sft_high = bootstrap_ci(scores["sft"], bootstrap_samples, confidence, seed)
    metrics: dict[str, float] = {
        "eval/rewards/chosen": dpo_chosen_r.mean().item(),
        "eval/rewards/rejected": dpo_rejected_r.mean().item(),
        "eval/rewards/margins": margins.mean().item(),
        "eval/rewards/accuracies": (margins > 0).float().mean().item(),
        "eval/logp_accuracy": (logp_margin["dpo"] > 0).float().mean().item(),
        "eval/sft/logp_accuracy": (logp_margin["sft"] > 0).float().mean().item(),
        "eval/logp_margin": logp_margin["dpo"].mean().item(),
        "eval/sft/logp_margin": logp_margin["sft"].mean().item(),
        "eval/sft/reward_mean": sft_mean,
        "eval/sft/reward_mean_ci_low": sft_low,
        "eval/sft/reward_mean_ci_high": sft_high,
        "eval/sft/length_mean": float(np.mean(lengths["sft"])),
        "eval/num_prompts": len(scores["dpo"]),
        "eval/num_pairs": len(ref_chosen),
    }
    for name in ("dpo", *ONLINE, BASE):
        if name not in scores:
            continue
        prefix = "eval/" if name == "dpo" else f"eval/{name}/"
        metrics.update({prefix + k: v for k, v in policy_vs_sft(
            name, scores, lengths, kl_terms[name], bootstrap_samples, confidence, seed, exact_reward,
            rm_scores).items()})
        if name != "dpo":
            metrics[prefix + "logp_accuracy"] = (logp_margin[name] > 0).float().mean().item()
            rate, low, high = bootstrap_ci(win_values(scores[name], scores["dpo"]), bootstrap_samples, confidence, seed)
            metrics.update({prefix + "win_rate_vs_dpo": rate, prefix + "win_rate_vs_dpo_ci_low": low,
                            prefix + "win_rate_vs_dpo_ci_high": high})
        if perplexity and name in perplexity:
            metrics[prefix + "perplexity"] = perplexity[name]
    if BASE in scores:  # what SFT did: its reward minus the base model's, paired by prompt
        p = f"eval/{BASE}/"
        metrics.update({"eval/sft/reward_delta_vs_base": -metrics[p + "reward_delta"],
                        "eval/sft/reward_delta_vs_base_ci_low": -metrics[p + "reward_delta_ci_high"],
                        "eval/sft/reward_delta_vs_base_ci_high": -metrics[p + "reward_delta_ci_low"]})
    if rm_scores:
        metrics["eval/sft/rm_score_mean"] = float(np.mean(rm_scores["sft"]))
    if exact_reward:
        metrics["eval/sft/reward_eq_1"] = float(np.mean([s == 1.0 for s in scores["sft"]]))
    if perplexity:
        metrics["eval/sft/perplexity"] = perplexity["sft"]
    return dict(sorted(metrics.items()))


def _check_reference_tokens(reference: dict, rows: torch.Tensor, pairs: list[dict], reference_path: str,
                            pref_eval_path: str) -> None:
    """Refuse a cached reference computed on other tokens than these held-out pairs (by token hash; by token
    counts for an artifact written before hashes were recorded)."""
    if "token_hashes" in reference:
        same = [pair_token_hash(p) for p in pairs] == [reference["token_hashes"][i] for i in rows.tolist()]
    elif "chosen_tokens" in reference:
        counts = torch.tensor([[len(p["chosen_ids"]), len(p["rejected_ids"])] for p in pairs], dtype=torch.long)
        same = torch.equal(counts, torch.stack([reference["chosen_tokens"].long()[rows],
                                                reference["rejected_tokens"].long()[rows]], 1))
    else:
        same = True
    if not same:
        raise StaleReferenceError(f"{reference_path}: computed on other tokens than the held-out pairs of "
                                  f"{pref_eval_path} (another tokenizer, chat template, data.max_length or "
                                  "max_prompt_length): re-run the reference stage (dvc repro reference)")


def _reference_for(reference_path: str, pref_eval_path: str, pref_records: list[dict]) -> tuple[dict, torch.Tensor]:
    """The cached reference artifact and the row of each held-out pair in it (refusing missing ids)."""
    reference = torch.load(reference_path, weights_only=True)
    position = {rid: i for i, rid in enumerate(reference["ids"])}
    missing = [r["id"] for r in pref_records if r["id"] not in position]
    if missing:
        raise ValueError(f"{reference_path}: no reference log-probs for {len(missing)} of {len(pref_records)} "
                         f"records of {pref_eval_path} (first: {missing[0]}); re-run the reference stage")
    return reference, torch.tensor([position[r["id"]] for r in pref_records])


# ----------------------------------------------------------------------------- stage phases


@dataclass(frozen=True)
class HeldOut:
    """The held-out data every policy is measured on, checked against each other before any model work."""

    records: list[dict]  # the preference records of pref_eval.jsonl (N,)
    prompts: list[tuple[str, list[dict]]]  # (id, messages) of the prompts to generate from (P,)
    pairs: list[dict]  # the records' token ids, as prepare wrote them (N,)
    sft_examples: list[tuple[list[int], list[int]]]  # held-out SFT conversations (input_ids, labels)
    reference_logps: tuple[torch.Tensor, torch.Tensor]  # cached reference (chosen (N,), rejected (N,))
    tokenizer: object  # the SFT model's

    @property
    def prompt_messages(self) -> list[list[dict]]:
        return [p for _, p in self.prompts]


def load_heldout(sft_dir: str, data_dir: str, reference_path: str, num_prompts: int, runtime: Runtime) -> HeldOut:
    """The held-out pairs, prompts and SFT conversations of data_dir with the cached reference log-probs; the token
    ids prepare wrote are refused when they belong to another tokenizer than the SFT model's, or to other records
    or tokens than the reference's."""
    pref_eval_path, sft_eval_path = f"{data_dir}/pref_eval.jsonl", f"{data_dir}/sft_eval.jsonl"
    pref_records = read_jsonl(pref_eval_path)
    if not pref_records:
        raise ValueError(f"{pref_eval_path}: no held-out preference pairs")
    prompts = eval_prompts(pref_eval_path, num_prompts)
    reference, rows = _reference_for(reference_path, pref_eval_path, pref_records)
    reference_logps = (reference["chosen_logps"].float()[rows], reference["rejected_logps"].float()[rows])  # (N,)
    tokenizer = load_tokenizer(sft_dir, runtime.trust_remote_code)
    pairs = token_store.load_pairs(pref_eval_path, tokenizer, runtime.max_length, runtime.max_prompt_length)
    sft_examples = (token_store.load_sft(sft_eval_path, tokenizer, runtime.max_length)
                    if Path(sft_eval_path).exists() else [])
    if [p["id"] for p in pairs] != [r["id"] for r in pref_records]:
        raise token_store.TokenizedError(f"{token_store.tokens_path(pref_eval_path)} does not hold the records of "
                                       f"{pref_eval_path} in its order: the two were written by different prepare "
                                       "runs (dvc repro prepare)")
    _check_reference_tokens(reference, rows, pairs, reference_path, pref_eval_path)
    return HeldOut(pref_records, prompts, pairs, sft_examples, reference_logps, tokenizer)


def judge_samples(generated: dict, held_out: HeldOut, judge_fn, eos: list[int], reward_model_dir: str | None,
                  batch_size: int, trust_remote_code: bool) -> dict:
    """Each policy's samples decoded, scored by the judge, measured in tokens, and (with a reward model) scored by
    it too: {texts, scores, lengths: name -> per prompt (P,), rm_scores: name -> (P,) or None}."""
    tokenizer, names = held_out.tokenizer, list(generated)  # sft, dpo, then the online policies
    texts = {name: [tokenizer.decode(r, skip_special_tokens=True).strip() for r in generated[name][1]]
             for name in names}
    scores = {name: [float(judge_fn(p, t)) for p, t in zip(held_out.prompt_messages, texts[name], strict=True)]
              for name in names}
    lengths = {name: [response_length(r, eos) for r in generated[name][1]] for name in names}
    rm_scores = None
    if reward_model_dir:  # the proxy the RLHF policies were trained on, beside the judge's true reward
        from components.core.model.heads import batched_end_scores, load_scorer

        rm = load_scorer(reward_model_dir, trust_remote_code, pad_token_id=tokenizer.pad_token_id, frozen=True)
        rm.to("cuda" if torch.cuda.is_available() else "cpu")
        rm_scores = {name: batched_end_scores(rm, *generated[name], tokenizer.pad_token_id, batch_size)
                     for name in names}
        del rm
    return {"texts": texts, "scores": scores, "lengths": lengths, "rm_scores": rm_scores}


def report_samples(prompts: list[tuple[str, list[dict]]], judged: dict, wins: list[float],
                   kl_terms: dict[str, torch.Tensor], online: list[str]) -> list[dict]:
    """One row per held-out prompt: every policy's response, score and length, DPO's outcome against SFT (wins),
    the KL terms (and the reward model's scores): the report's samples.jsonl and plots/eval.csv."""
    texts, scores, lengths, rm_scores = judged["texts"], judged["scores"], judged["lengths"], judged["rm_scores"]
    names = list(texts)
    return [
        {"id": pid, "prompt": prompt, "prompt_text": last_user_text(prompt),
         **{f"{n}_response": texts[n][i] for n in names}, **{f"{n}_score": scores[n][i] for n in names},
         **{f"{n}_length": lengths[n][i] for n in names},
         "win": wins[i], "kl_term": float(kl_terms["dpo"][i]),
         **{f"{n}_kl_term": float(kl_terms[n][i]) for n in online},
         **({f"{n}_rm_score": rm_scores[n][i] for n in names} if rm_scores else {})}
        for i, (pid, prompt) in enumerate(prompts)
    ]


def plot_rows(samples: list[dict], names: list[str]) -> list[dict]:
    """plots/eval.csv: each policy's reward and length per prompt, and DPO's outcome against SFT."""
    return [
        {"prompt": i, **{f"{n}/reward": s[f"{n}_score"] for n in names}, **{f"{n}/length": s[f"{n}_length"] for n in names},
         "win": s["win"]}
        for i, s in enumerate(samples)
    ]


# ----------------------------------------------------------------------------- stage


def run(
    cfg: EvaluateConfig,
    *,
    beta: float,
    policies: dict[str, str] | None = None,
    reward_model_dir: str | None = None,
    data_dir: str = "data/prepared",
    reference_path: str = "artifacts/ref_logps/eval.pt",
    curves_dir: str = "plots",
    metrics_path: str = "metrics/eval.json",
    plots_path: str = "plots/eval.csv",
    report_dir: str = "reports/eval",
    runtime: Runtime = Runtime(),
    track: bool = True,
    tools: ToolEval | None = None,
) -> dict:
    """Measure `policies` (name -> model dir: `sft`, `dpo`, the ONLINE ones that were trained, and `base`; default
    models/sft and models/dpo) on the held-out data of data_dir with `cfg` (the `evaluate` params section).

    beta: dpo.beta, the scale of DPO's implicit reward; reward_model_dir: also score every sample with this reward
    model. curves_dir: where the training stages wrote their curves (<name>.csv) and the reward model its
    calibration, shown in the report. tools: also measure task success with and without an environment's tools.
    Why so many parameters: every input and output path is one, so tests and flows point the stage anywhere.
    """
    policies = policies or {"sft": "models/sft", "dpo": "models/dpo"}
    unknown = set(policies) - {"sft", "dpo", *ONLINE, BASE}
    if "sft" not in policies or "dpo" not in policies or unknown:
        raise ValueError(f"policies: needs sft and dpo, and only {', '.join((*ONLINE, BASE))} beside them; "
                         f"got {sorted(policies)}")
    policies = {"sft": policies["sft"], "dpo": policies["dpo"], **policies}  # sft, dpo, then the online ones
    online = [n for n in policies if n in ONLINE]
    determinism.apply(runtime.deterministic)
    torch.manual_seed(runtime.seed)
    judge_fn = load_judge(cfg.judge, cfg.judge_path)  # fail before any model work when the judge is broken

    # ---------------------------------------------------------------- data, every model, the judge
    held_out = load_heldout(policies["sft"], data_dir, reference_path, cfg.num_prompts, runtime)
    scored = score_models(policies, held_out.tokenizer, held_out.pairs, held_out.prompt_messages,
                          held_out.sft_examples, cfg, runtime)
    logps, kl_terms = scored["logps"], scored["kl_terms"]
    judged = judge_samples(scored["generated"], held_out, judge_fn, scored["eos"], reward_model_dir, cfg.batch_size,
                           runtime.trust_remote_code)
    scores, lengths = judged["scores"], judged["lengths"]

    # ---------------------------------------------------------------- metrics
    metrics = summarise(scores=scores, lengths=lengths, logps={n: logps[n][:2] for n in scores},
                        reference_logps=held_out.reference_logps, kl_terms=kl_terms, beta=beta,
                        bootstrap_samples=cfg.bootstrap_samples, confidence=CONFIDENCE, seed=runtime.seed,
                        perplexity=scored["perplexity"], exact_reward=cfg.judge == "synthetic",
                        rm_scores=judged["rm_scores"])
    if tools is not None:  # every policy in the environment, with and without its tools (core/eval/tool_use.py)
        metrics.update(evaluate_tools(policies, heldout_prompts(data_dir, tools, cfg.num_prompts), tools, judge_fn,
                                      temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                                      seed=runtime.seed,
                                      bootstrap_samples=cfg.bootstrap_samples, confidence=CONFIDENCE))

    # ---------------------------------------------------------------- report (built aside, then swapped in)
    wins = win_values(scores["dpo"], scores["sft"])
    samples = report_samples(held_out.prompts, judged, wins, kl_terms, online)
    ref_chosen, ref_rejected = held_out.reference_logps
    margins = implicit_rewards(logps["dpo"][0], ref_chosen, beta) - implicit_rewards(logps["dpo"][1], ref_rejected, beta)
    setup = {"prompts": len(held_out.prompts), "pairs": len(held_out.records), "judge": cfg.judge, "β": beta,
             "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
             "seed": runtime.seed}
    images, page = report_html.build_report(
        metrics, samples, wins=wins, logp_margins={n: (logps[n][0] - logps[n][1]).tolist() for n in ("sft", "dpo")},
        reward_margins=margins.tolist(), lengths=lengths, scores=scores,
        curves={n: f"{curves_dir}/{n}.csv" for n in ("sft", "dpo", *online)},
        reward_model_report=f"{curves_dir}/reward_model_calibration.json" if reward_model_dir else "",
        setup=setup, confidence=CONFIDENCE, num_samples=cfg.num_samples_in_report)
    from components.core.train.checkpoints import model_identity

    # which models these metrics are about: register refuses to tag another model with them
    evaluated = {**{n: model_identity(d) for n, d in policies.items()},
                 **({"reward_model": model_identity(reward_model_dir)} if reward_model_dir else {})}
    report_html.write_report(report_dir, images, page, samples, metrics, {"evaluated_models.json": evaluated})
    write_csv(plots_path, plot_rows(samples, list(scores)))
    write_json(metrics_path, metrics)

    # ---------------------------------------------------------------- tracking
    from components.core.ops import tracking

    tracking_params = {**cfg.model_dump(), "beta": beta, "confidence": CONFIDENCE, **runtime.model_dump()}
    inputs = [*policies.values(), *([reward_model_dir] if reward_model_dir else []),
              f"{data_dir}/pref_eval.jsonl", f"{data_dir}/sft_eval.jsonl", reference_path]
    with tracking.stage_run("evaluate", tracking_params, inputs, params_hash(tracking_params), enabled=track) as mlrun:
        tracking.log_metrics(mlrun, metrics)
        if mlrun is not None:
            import mlflow

            mlflow.log_artifacts(str(report_dir), artifact_path="report")
    return metrics


@stage_main("evaluate")
def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params

    parser = argparse.ArgumentParser(description="Evaluation stage: SFT vs DPO on held-out data, HTML report")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sft", default="models/sft")
    parser.add_argument("--dpo", default="models/dpo")
    parser.add_argument("--models-dir", default="models", help="the online policies: <dir>/grpo, ppo, rloo when trained")
    parser.add_argument("--base", default="models/base", help="the model SFT started from (with evaluate.base)")
    parser.add_argument("--reward-model", default="models/reward_model", help="also score samples with it ('' = none)")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--reference", default="artifacts/ref_logps/eval.pt")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--plots", default="plots/eval.csv")
    parser.add_argument("--report", default="reports/eval")
    parser.add_argument("--no-track", action="store_true", help="skip MLflow")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    online = {n: f"{args.models_dir}/{n}" for n in ONLINE
              if (Path(args.models_dir) / n / "config.json").exists()}  # trained, not disabled placeholders
    if p.evaluate.base:
        from components.core.ops.io import resolve_model_path

        online[BASE] = resolve_model_path(args.base)
    trained_rm = args.reward_model and (Path(args.reward_model) / "config.json").exists()
    result = run(p.evaluate, beta=p.dpo.beta, policies={"sft": args.sft, "dpo": args.dpo, **online},
                 reward_model_dir=args.reward_model if trained_rm else None, data_dir=args.data_dir,
                 reference_path=args.reference, metrics_path=args.metrics, plots_path=args.plots,
                 report_dir=args.report, runtime=Runtime.of(p), track=not args.no_track,
                 tools=ToolEval(p.grpo.environment, p.grpo.max_turns, p.grpo.max_completion_length, p.grpo.prompts)
                 if p.grpo.environment else None)
    log.info(result_line("evaluate", result, ("eval/reward_mean", "eval/win_rate_vs_sft", "eval/grpo/reward_mean", "eval/ppo/reward_mean", "eval/rloo/reward_mean", "eval/num_prompts"),
                         "metrics/eval.json, reports/eval/index.html"))


if __name__ == "__main__":
    main()
