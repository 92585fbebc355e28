"""Evaluation stage: SFT vs DPO on held-out data, and an HTML report a person can read in a minute.

    python -m components.evaluate --params params.yaml

For both models it measures
- preference accuracy on held-out pairs: the DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x))
  against the cached reference log-probs (artifacts/ref_logps/eval.pt), and plain likelihood
  preference log pi(y_w|x) > log pi(y_l|x);
- generations on held-out prompts scored by a judge (the task's programmatic reward by default):
  mean reward, exact-solve rate, per-prompt win rate DPO vs SFT with a bootstrap interval;
- a Monte-Carlo estimate of KL(pi_dpo || pi_sft) on the DPO samples, response lengths, and held-out
  SFT perplexity.
Writes metrics/eval.json, plots/eval.csv (one row per prompt, for `dvc plots`), reports/eval/
(index.html with embedded PNGs, the PNGs, samples.jsonl) and one MLflow run.

`load_judge`, `generate_responses`, `score_prompts`, `eval_prompts` and `bootstrap_ci` are public:
the registry's promotion gate re-scores champion and challenger with exactly the same code.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import importlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from components import training
from components.batching import (
    collate_sequences,
    pair_logps,
    prompt_ids_for_generation,
    prompt_response_to_sequence,
    render,
    sequence_logps,
    tokenize_pair,
)

log = logging.getLogger("alignflow.evaluate")

Judge = Callable[[list[dict], str], float]


class JudgeError(ValueError):
    """The configured judge cannot be loaded; the message names judge / judge_path."""


# ----------------------------------------------------------------------------- judges


def last_user_text(prompt: Sequence[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _synthetic_judge(prompt: list[dict], response: str) -> float:
    from components import synthetic

    return synthetic.reward(last_user_text(prompt), response)


def _reward_model_judge(path: str) -> Judge:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not path:
        raise JudgeError("evaluate.judge=reward_model needs evaluate.judge_path (a sequence-classification checkpoint dir)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # OSError, ValueError, ... : whatever it is, say which path failed
        raise JudgeError(f"evaluate.judge_path={path!r}: cannot load a reward model from it ({type(e).__name__}: {e})") from e
    num_labels = model.config.num_labels
    if num_labels not in (1, 2):
        raise JudgeError(f"evaluate.judge_path={path!r}: reward model has {num_labels} labels; expected 1 (score) or 2")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    column = 0 if num_labels == 1 else 1  # 2 labels: the logit of the positive ("preferred") class

    @torch.no_grad()
    def judge(prompt: list[dict], response: str) -> float:
        text = render(tokenizer, list(prompt) + [{"role": "assistant", "content": response}])
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt", truncation=True)
        return float(model(**enc.to(device)).logits[0, column])

    return judge


def _function_judge(path: str) -> Judge:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise JudgeError(f"evaluate.judge_path={path!r}: a function judge is 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise JudgeError(f"evaluate.judge_path={path!r}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise JudgeError(f"evaluate.judge_path={path!r}: {attr} is not callable")

    def judge(prompt: list[dict], response: str) -> float:
        return float(fn(prompt, response))

    return judge


def load_judge(kind: str, path: str = "") -> Judge:
    """A callable (prompt messages, response text) -> score, higher is better.

    synthetic: the embedded task's programmatic reward in [0, 1] (on the last user message).
    reward_model: an AutoModelForSequenceClassification dir; scores the conversation rendered with its
      tokenizer's chat template; logit 0 (one label) or the positive-class logit (two labels).
    function: `package.module:function` taking (prompt_messages, response_text).
    """
    if kind == "synthetic":
        return _synthetic_judge
    if kind == "reward_model":
        return _reward_model_judge(path)
    if kind == "function":
        return _function_judge(path)
    raise JudgeError(f"evaluate.judge={kind!r}: expected synthetic, reward_model or function")


# ----------------------------------------------------------------------------- generation


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_tokens(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, temperature: float, top_p: float,
    batch_size: int, seed: int, desc: str = "generate",
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt_ids, response_ids) per prompt; response_ids end with the eos token when one was produced.

    Left-padded batches in the given order. Batch k samples under torch.manual_seed(seed + k), so a
    batch's samples do not depend on which batches ran before it, and two models evaluated on the same
    prompts draw the same random numbers (common random numbers: a less noisy comparison).
    Sampling is plain temperature / top-p: generation defaults a checkpoint may ship (top_k, repetition
    penalty, ...) are overridden, so the samples are from the policy and the KL estimate means something.
    """
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0}
        if temperature > 0 else {"do_sample": False}
    )
    model.eval()
    encoded = [prompt_ids_for_generation(tokenizer, p) for p in prompts]
    responses: list[list[int]] = []
    bar = training.progress(len(prompts), 0, desc, enabled=True)
    for k, start in enumerate(range(0, len(encoded), batch_size)):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)  # (B, T)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        torch.manual_seed(seed + k)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, min_new_tokens=0,
            num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos, pad_token_id=pad_id,
            use_cache=True, **sampling,
        )  # (B, T + new)
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            responses.append(row[:cut])
        bar.update(len(chunk))
    bar.close()
    return encoded, responses


def generate_responses(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, temperature: float, top_p: float,
    batch_size: int, seed: int, desc: str = "generate",
) -> list[str]:
    """Response text per prompt (batched, left-padded, seeded per batch, greedy when temperature is 0)."""
    _, responses = generate_tokens(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, seed, desc)
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]


def load_causal_lm(model_dir: str, trust_remote_code: bool = False):
    """(model, tokenizer) for evaluation: fp32 weights on the GPU if there is one, else the CPU."""
    from transformers import AutoModelForCausalLM

    tokenizer = training.load_tokenizer(model_dir, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code, dtype=torch.float32)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


def score_prompts(
    model_dir: str, prompts: list[list[dict]], judge: Judge, *, max_new_tokens: int, temperature: float,
    top_p: float, batch_size: int, seed: int,
) -> tuple[list[str], list[float]]:
    """Load the model in model_dir, generate one response per prompt, and judge each."""
    model, tokenizer = load_causal_lm(model_dir)
    texts = generate_responses(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, seed,
                               desc=f"generate {Path(model_dir).name}")
    return texts, [judge(p, t) for p, t in zip(prompts, texts, strict=True)]


def eval_prompts(pref_eval_path: str, num_prompts: int) -> list[tuple[str, list[dict]]]:
    """Held-out prompts (id, prompt messages): one per distinct prompt, ordered by record id, first num_prompts.

    Ordering by id (a content hash) makes the subset independent of file order and a fair sample of
    the file when num_prompts is smaller than it; 0 means all.
    """
    seen: set[str] = set()
    out: list[tuple[str, list[dict]]] = []
    for record in sorted(training.read_jsonl(pref_eval_path), key=lambda r: str(r["id"])):
        key = json.dumps(record["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((str(record["id"]), record["prompt"]))
    return out[:num_prompts] if num_prompts else out


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(values: Sequence[float], n_resamples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13)."""
    x = np.asarray(values, dtype=np.float64)  # (N,)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // x.size)  # bound memory: (chunk, N) indices at a time
    for start in range(0, n_resamples, chunk):
        n = min(chunk, n_resamples - start)
        means[start : start + n] = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(x.mean()), float(low), float(high)


def win_values(challenger: Sequence[float], baseline: Sequence[float], tol: float = 1e-9) -> list[float]:
    """Per-prompt outcome of challenger vs baseline: win 1, tie 0.5, loss 0 (ties within tol)."""
    return [0.5 if abs(c - b) <= tol else float(c > b) for c, b in zip(challenger, baseline, strict=True)]


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, Eq. 5); (N,)."""
    return beta * (policy_logps - reference_logps)


# ----------------------------------------------------------------------------- scoring with a model


def _autocast(device: torch.device, mixed_precision: str):
    mp = training.resolve_mixed_precision(mixed_precision)
    if device.type != "cuda" or mp == "no":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if mp == "bf16" else torch.float16)


@torch.no_grad()
def preference_logps(model, pairs: list[dict], batch_size: int, pad_id: int, mixed_precision: str = "auto"):
    """Summed response log-probs of every pair, in input order, scored exactly as the reference stage does
    (batching.tokenize_pair + batching.pair_logps). Returns (chosen (N,), rejected (N,), chosen_tokens (N,),
    rejected_tokens (N,))."""
    device = next(model.parameters()).device
    columns: list[list[torch.Tensor]] = [[], [], [], []]
    for start in range(0, len(pairs), batch_size):
        with _autocast(device, mixed_precision):
            outputs = pair_logps(model, pairs[start : start + batch_size], pad_id, device)
        for column, t in zip(columns, outputs, strict=True):
            column.append(t.cpu())
    chosen, rejected, chosen_tokens, rejected_tokens = (torch.cat(c) for c in columns)
    return chosen.float(), rejected.float(), chosen_tokens, rejected_tokens


@torch.no_grad()
def response_logps(model, prompt_ids: list[list[int]], response_ids: list[list[int]], batch_size: int,
                   pad_id: int, mixed_precision: str = "auto") -> torch.Tensor:
    """log pi(y|x) summed over response tokens, per (prompt, response); (N,)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [prompt_response_to_sequence(p, r) for p, r in
                zip(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], strict=True)]
        batch = collate_sequences(seqs, pad_id).to(device)
        with _autocast(device, mixed_precision):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        out.append(sequence_logps(logits, batch.labels)[0].cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def heldout_perplexity(model, tokenizer, records: list[dict], max_length: int, batch_size: int,
                       mixed_precision: str = "auto") -> float:
    """exp(token-mean NLL) over assistant tokens of held-out SFT conversations (as sft.evaluate_loss)."""
    from components.sft import batch_nll, tokenize_sft

    examples = sorted(tokenize_sft(tokenizer, records, max_length), key=lambda e: len(e[0]))
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate_sequences(examples[start : start + batch_size], tokenizer.pad_token_id).to(device)
        with _autocast(device, mixed_precision):
            batch_sum, batch_tokens = batch_nll(model, batch)
        nll += float(batch_sum)
        tokens += int(batch_tokens)
    return math.exp(nll / tokens) if tokens else float("nan")


def response_length(response_ids: list[int], eos: list[int]) -> int:
    """Generated tokens, the closing eos not counted."""
    return len(response_ids) - (1 if response_ids and response_ids[-1] in eos else 0)


# ----------------------------------------------------------------------------- report

PALETTE = {"sft": "#8c96a8", "dpo": "#3b6fd9", "win": "#2e9e6b", "tie": "#c9cdd6", "loss": "#d9534f"}


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _read_curves(path: str) -> list[dict]:
    import csv

    if not path or not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], column: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        try:
            x, y = float(r["step"]), float(r.get(column) or "nan")
        except (KeyError, ValueError):
            continue
        if math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot_training_curves(sft_rows: list[dict], dpo_rows: list[dict]) -> bytes | None:
    """One panel per quantity that exists: SFT loss, DPO loss, DPO reward margins, DPO accuracies."""
    import matplotlib.pyplot as plt

    panels = [
        ("SFT loss", sft_rows, [("train/loss", "train"), ("eval/loss", "held-out")]),
        ("DPO loss", dpo_rows, [("train/loss", "train"), ("loss", "train"), ("eval/loss", "held-out")]),
        ("DPO reward margin", dpo_rows, [("rewards/margins", "train"), ("eval/rewards/margins", "held-out")]),
        ("DPO preference accuracy", dpo_rows,
         [("rewards/accuracies", "train"), ("eval/rewards/accuracies", "held-out")]),
    ]
    panels = [(t, rows, [(c, lab, _series(rows, c)) for c, lab in cols]) for t, rows, cols in panels]
    # keep the first non-empty column per label (dpo.csv calls its train loss "loss")
    panels = [(t, rows, [s for s in cols if s[2][0]]) for t, rows, cols in panels]
    panels = [(t, rows, [s for i, s in enumerate(cols) if s[1] not in {c[1] for c in cols[:i]}])
              for t, rows, cols in panels]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, _, cols) in zip(axes[0], panels, strict=True):
        for i, (_, label, (xs, ys)) in enumerate(cols):
            style = {"color": "#3b6fd9", "lw": 1.4} if i == 0 else {"color": "#e08a2c", "lw": 2, "marker": "o", "ms": 3}
            ax.plot(xs, ys, label=label, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.tight_layout()
    return _figure_png(fig)


def _hist(ax, data: dict[str, Sequence[float]], bins: int = 30, integer: bool = False) -> None:
    """Histograms on shared bins, bars side by side (an overlay hides one model when they agree)."""
    values = [v for vs in data.values() for v in vs]
    if not values:
        return
    lo, hi = min(values), max(values)
    if integer:
        edges = np.arange(math.floor(lo) - 0.5, math.ceil(hi) + 1.5, max(1, math.ceil((hi - lo + 1) / bins)))
    else:
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    width = (edges[1] - edges[0]) / len(data)
    for k, (name, vs) in enumerate(data.items()):
        counts, _ = np.histogram(vs, bins=edges)
        ax.bar(edges[:-1] + k * width, counts, width=width, align="edge", color=PALETTE[name], alpha=0.85,
               label=f"{name.upper()} (mean {np.mean(vs):.2f})", edgecolor="white", linewidth=0.4)
        ax.axvline(float(np.mean(vs)), color=PALETTE[name], lw=1.5, ls="--")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
    if integer:  # a few empty units either side, so a one-value distribution still reads as a bar at n
        ax.set_xlim(min(edges[0], lo - 3), max(edges[-1], hi + 3))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot_margins(sft_margin: list[float], dpo_margin: list[float], dpo_reward_margin: list[float], beta: float) -> bytes:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    _hist(a, {"sft": sft_margin, "dpo": dpo_margin})
    a.axvline(0, color="black", lw=0.8)
    a.set_title("log π(chosen) − log π(rejected), held-out pairs", fontsize=10)
    a.set_xlabel("nats (right of 0 = prefers the chosen answer)", fontsize=9)
    _hist(b, {"dpo": dpo_reward_margin})
    b.axvline(0, color="black", lw=0.8)
    b.set_title(f"DPO implicit reward margin (β = {beta:g})", fontsize=10)
    b.set_xlabel("β·[(log π − log π_ref)(chosen) − (…)(rejected)]", fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def plot_win_rate(wins: list[float], rate: float, low: float, high: float, confidence: float) -> bytes:
    import matplotlib.pyplot as plt

    n = len(wins)
    shares = {"win": wins.count(1.0) / n, "tie": wins.count(0.5) / n, "loss": wins.count(0.0) / n}
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 2.6), gridspec_kw={"height_ratios": [1, 1]})
    left = 0.0
    for name, label in (("win", "DPO better"), ("tie", "tie"), ("loss", "SFT better")):
        share = shares[name]
        a.barh(0, share, left=left, color=PALETTE[name], height=0.6)
        if share >= 0.06:
            a.text(left + share / 2, 0, f"{label}\n{share:.0%}", ha="center", va="center", fontsize=8,
                   color="white" if name != "tie" else "#333")
        left += share
    a.set_xlim(0, 1)
    a.axis("off")
    a.set_title(f"Per-prompt outcome, DPO vs SFT ({n} prompts)", fontsize=10)
    b.errorbar([rate], [0], xerr=[[rate - low], [high - rate]], fmt="o", color=PALETTE["dpo"], capsize=6,
               ms=8, lw=2)
    b.axvline(0.5, color="#555", ls="--", lw=1)
    b.text(0.505, -0.5, "no difference", ha="left", fontsize=7, color="#555")
    b.set_xlim(0, 1)
    b.set_ylim(-0.6, 0.6)
    b.set_yticks([])
    b.set_title(f"Win rate {rate:.1%}, {confidence:.0%} bootstrap interval [{low:.1%}, {high:.1%}]", fontsize=10)
    b.tick_params(labelsize=8)
    for side in ("top", "right", "left"):
        b.spines[side].set_visible(False)
    fig.tight_layout()
    return _figure_png(fig)


def plot_distributions(sft_lengths: list[int], dpo_lengths: list[int], sft_scores: list[float],
                       dpo_scores: list[float]) -> bytes:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    _hist(a, {"sft": sft_lengths, "dpo": dpo_lengths}, bins=25, integer=True)
    a.set_title("Response length (tokens)", fontsize=10)
    _hist(b, {"sft": sft_scores, "dpo": dpo_scores}, bins=20)
    b.set_title("Judge score per response", fontsize=10)
    fig.tight_layout()
    return _figure_png(fig)


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f6fa;color:#1f2430}
main{max-width:1180px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:34px 0 12px;color:#2b3242}
.sub{color:#5f6878;font-size:13px;margin-bottom:22px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:14px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(20,30,60,.08);border-top:4px solid #3b6fd9}
.card.good{border-top-color:#2e9e6b}.card.bad{border-top-color:#d9534f}.card.neutral{border-top-color:#8c96a8}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#5f6878}
.card .value{font-size:28px;font-weight:650;margin:6px 0 2px}
.card .detail{font-size:12.5px;color:#5f6878}
.arrow{color:#8c96a8;font-weight:400;font-size:20px;margin:0 4px}
figure{background:#fff;border-radius:10px;padding:12px;margin:0 0 14px;box-shadow:0 1px 3px rgba(20,30,60,.08)}
figure img{max-width:100%;display:block;margin:0 auto}
figcaption{font-size:12.5px;color:#5f6878;margin-top:6px}
table{border-collapse:collapse;width:100%;background:#fff;border-radius:10px;overflow:hidden;
      box-shadow:0 1px 3px rgba(20,30,60,.08);font-size:13px}
th,td{padding:8px 10px;border-bottom:1px solid #e7eaf0;vertical-align:top;text-align:left}
th{background:#eef1f7;font-weight:600;color:#2b3242}
td.text{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
td.num{font-variant-numeric:tabular-nums;text-align:right;white-space:nowrap}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-size:11.5px;font-weight:600;color:#fff}
.badge.win{background:#2e9e6b}.badge.loss{background:#d9534f}.badge.tie{background:#a3aab8}
.metrics{display:grid;grid-template-columns:1fr 1fr;gap:14px;align-items:start}
footer{margin-top:30px;font-size:12px;color:#8a92a3}
"""


def _card(label: str, value: str, detail: str, tone: str = "") -> str:
    return (f'<div class="card {tone}"><div class="label">{html.escape(label)}</div>'
            f'<div class="value">{value}</div><div class="detail">{detail}</div></div>')


def render_html(metrics: dict, samples: list[dict], images: dict[str, bytes], setup: dict, confidence: float) -> str:
    m = metrics
    esc = html.escape
    delta = m["eval/reward_delta"]
    win_tone = "good" if m["eval/win_rate_ci_low"] > 0.5 else "bad" if m["eval/win_rate_ci_high"] < 0.5 else "neutral"
    cards = [
        _card("Judge reward", f'{m["eval/sft/reward_mean"]:.3f}<span class="arrow">→</span>{m["eval/reward_mean"]:.3f}',
              f'SFT → DPO, Δ {delta:+.3f} [{m["eval/reward_delta_ci_low"]:+.3f}, {m["eval/reward_delta_ci_high"]:+.3f}]',
              "good" if m["eval/reward_delta_ci_low"] > 0 else "bad" if m["eval/reward_delta_ci_high"] < 0 else "neutral"),
        _card("Win rate vs SFT", f'{m["eval/win_rate_vs_sft"]:.1%}',
              f'{confidence:.0%} CI [{m["eval/win_rate_ci_low"]:.1%}, {m["eval/win_rate_ci_high"]:.1%}]; ties count ½',
              win_tone),
        _card("KL to reference", f'{m["eval/kl_to_reference"]:.2f}',
              "nats per response, KL(π_DPO ‖ π_SFT), Monte-Carlo on DPO samples"),
        _card("Length ratio", f'{m["eval/length_ratio"]:.2f}×',
              f'DPO {m["eval/length_mean"]:.1f} vs SFT {m["eval/sft/length_mean"]:.1f} tokens'),
        _card("Preference accuracy", f'{m["eval/rewards/accuracies"]:.1%}',
              f'DPO implicit reward, held-out pairs; likelihood: SFT {m["eval/sft/logp_accuracy"]:.1%} '
              f'→ DPO {m["eval/logp_accuracy"]:.1%}'),
    ]
    if "eval/reward_eq_1" in m:
        cards.append(_card("Exactly solved", f'{m["eval/sft/reward_eq_1"]:.1%}<span class="arrow">→</span>'
                                             f'{m["eval/reward_eq_1"]:.1%}', "SFT → DPO, share of prompts with reward 1"))
    if "eval/sft/perplexity" in m:
        cards.append(_card("Held-out perplexity", f'{m["eval/sft/perplexity"]:.3f}<span class="arrow">→</span>'
                                                  f'{m["eval/perplexity"]:.3f}', "SFT → DPO, assistant tokens", "neutral"))

    captions = {
        "win_rate.png": "Each held-out prompt is answered once by each model (same random numbers) and judged; "
                        "the interval is a percentile bootstrap over prompts.",
        "margins.png": "Left: how much more likely each model finds the preferred answer. Right: the DPO implicit "
                       "reward margin against the cached reference log-probs; accuracy = share right of 0.",
        "distributions.png": "Dashed lines are means. A DPO length distribution far right of SFT's hints at length "
                             "exploitation.",
        "training_curves.png": "From plots/sft.csv and plots/dpo.csv.",
    }
    figures = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(captions.get(name, ''))}</figcaption></figure>"
        for name, png in images.items()
    )

    rows = []
    for s in samples:
        outcome = {1.0: ("win", "DPO"), 0.5: ("tie", "tie"), 0.0: ("loss", "SFT")}[s["win"]]
        rows.append(
            f'<tr><td class="text">{esc(s["prompt_text"])}</td>'
            f'<td class="text">{esc(s["sft_response"])}</td><td class="num">{s["sft_score"]:.3f}</td>'
            f'<td class="text">{esc(s["dpo_response"])}</td><td class="num">{s["dpo_score"]:.3f}</td>'
            f'<td><span class="badge {outcome[0]}">{outcome[1]}</span></td></tr>'
        )
    sample_table = (
        '<table class="samples"><thead><tr><th style="width:28%">Prompt</th><th>SFT response</th><th>score</th>'
        "<th>DPO response</th><th>score</th><th>better</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        if rows else "<p>No samples requested (evaluate.num_samples_in_report = 0).</p>"
    )
    items = sorted(m.items())
    half = (len(items) + 1) // 2
    metric_tables = "".join(
        '<table><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>'
        + "".join(f'<tr><td>{esc(k)}</td><td class="num">{v:.6g}</td></tr>' for k, v in part)
        + "</tbody></table>"
        for part in (items[:half], items[half:]) if part
    )
    setup_text = " · ".join(f"{esc(str(k))} = {esc(str(v))}" for k, v in setup.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>alignflow evaluation: DPO vs SFT</title><style>{CSS}</style></head>
<body><main>
<h1>DPO vs SFT on held-out data</h1>
<div class="sub">{setup_text}</div>
<div class="cards">{"".join(cards)}</div>
<h2>Results</h2>
{figures}
<h2>Sample generations</h2>
{sample_table}
<h2>All metrics</h2>
<div class="metrics">{metric_tables}</div>
<footer>Generated by components/evaluate.py (alignflow). Scores: judge = {esc(str(setup.get("judge", "")))}.</footer>
</main></body></html>
"""


def _swap_dir(tmp: Path, dest: Path) -> None:
    """Replace dest by tmp: the old report is moved aside, never deleted before the new one is in place."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.replace(old)
    tmp.replace(dest)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- stage


def run(
    sft_dir: str = "models/sft",
    dpo_dir: str = "models/dpo",
    pref_eval_path: str = "data/prepared/pref_eval.jsonl",
    sft_eval_path: str = "data/prepared/sft_eval.jsonl",
    reference_path: str = "artifacts/ref_logps/eval.pt",
    sft_curves_path: str = "plots/sft.csv",
    dpo_curves_path: str = "plots/dpo.csv",
    metrics_path: str = "metrics/eval.json",
    plots_path: str = "plots/eval.csv",
    report_dir: str = "reports/eval",
    num_prompts: int = 200,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    judge: str = "synthetic",
    judge_path: str = "",
    bootstrap_samples: int = 1000,
    num_samples_in_report: int = 12,
    confidence: float = 0.95,
    beta: float = 0.1,
    max_length: int = 128,
    max_prompt_length: int = 96,
    mixed_precision: str = "auto",
    seed: int = 1234,
    trust_remote_code: bool = False,
    track: bool = True,
) -> dict:
    hyper = {k: v for k, v in locals().items() if k != "track"}
    torch.manual_seed(seed)
    judge_fn = load_judge(judge, judge_path)  # fail before any model work when the judge is broken

    # ---------------------------------------------------------------- data
    pref_records = training.read_jsonl(pref_eval_path)
    if not pref_records:
        raise ValueError(f"{pref_eval_path}: no held-out preference pairs")
    prompts = eval_prompts(pref_eval_path, num_prompts)
    prompt_messages = [p for _, p in prompts]
    sft_records = training.read_jsonl(sft_eval_path) if Path(sft_eval_path).exists() else []
    reference = torch.load(reference_path, weights_only=True)
    position = {rid: i for i, rid in enumerate(reference["ids"])}
    missing = [r["id"] for r in pref_records if r["id"] not in position]
    if missing:
        raise ValueError(f"{reference_path}: no reference log-probs for {len(missing)} of {len(pref_records)} "
                         f"records of {pref_eval_path} (first: {missing[0]}); re-run the reference stage")
    rows = torch.tensor([position[r["id"]] for r in pref_records])
    ref_chosen = reference["chosen_logps"].float()[rows]  # (N,)
    ref_rejected = reference["rejected_logps"].float()[rows]

    # ---------------------------------------------------------------- both models
    sft_model, tokenizer = load_causal_lm(sft_dir, trust_remote_code)
    dpo_model, _ = load_causal_lm(dpo_dir, trust_remote_code)
    pad_id = tokenizer.pad_token_id
    eos = _eos_ids(dpo_model, tokenizer)
    pairs = [tokenize_pair(tokenizer, r, max_length, max_prompt_length) for r in pref_records]

    logps: dict[str, tuple[torch.Tensor, ...]] = {}
    generated: dict[str, tuple[list[list[int]], list[list[int]]]] = {}
    perplexity: dict[str, float] = {}
    for name, model in (("sft", sft_model), ("dpo", dpo_model)):
        logps[name] = preference_logps(model, pairs, batch_size, pad_id, mixed_precision)
        generated[name] = generate_tokens(model, tokenizer, prompt_messages, max_new_tokens, temperature, top_p,
                                          batch_size, seed, desc=f"generate {name}")
        if sft_records:
            perplexity[name] = heldout_perplexity(model, tokenizer, sft_records, max_length, batch_size, mixed_precision)
    # Cheap guard against silently comparing different token sequences with the cached reference.
    if "chosen_tokens" in reference and "rejected_tokens" in reference:
        same = (torch.equal(logps["sft"][2], reference["chosen_tokens"].long()[rows])
                and torch.equal(logps["sft"][3], reference["rejected_tokens"].long()[rows]))
        if not same:
            raise ValueError(f"{reference_path}: token counts differ from this tokenisation of {pref_eval_path}; "
                             "the reference log-probs were computed with another tokenizer or max_length")

    # KL(pi_dpo || pi_sft) ~ E_{y ~ pi_dpo}[log pi_dpo(y|x) - log pi_sft(y|x)], summed over the response
    dpo_prompt_ids, dpo_response_ids = generated["dpo"]
    kl_terms = (response_logps(dpo_model, dpo_prompt_ids, dpo_response_ids, batch_size, pad_id, mixed_precision)
                - response_logps(sft_model, dpo_prompt_ids, dpo_response_ids, batch_size, pad_id, mixed_precision))
    del sft_model, dpo_model

    # ---------------------------------------------------------------- judge the generations
    texts = {name: [tokenizer.decode(r, skip_special_tokens=True).strip() for r in generated[name][1]]
             for name in ("sft", "dpo")}
    scores = {name: [float(judge_fn(p, t)) for p, t in zip(prompt_messages, texts[name], strict=True)]
              for name in ("sft", "dpo")}
    lengths = {name: [response_length(r, eos) for r in generated[name][1]] for name in ("sft", "dpo")}
    wins = win_values(scores["dpo"], scores["sft"])

    # ---------------------------------------------------------------- metrics
    dpo_chosen_r = implicit_rewards(logps["dpo"][0], ref_chosen, beta)
    dpo_rejected_r = implicit_rewards(logps["dpo"][1], ref_rejected, beta)
    margins = dpo_chosen_r - dpo_rejected_r
    logp_margin = {name: (logps[name][0] - logps[name][1]) for name in ("sft", "dpo")}
    win_rate, win_low, win_high = bootstrap_ci(wins, bootstrap_samples, confidence, seed)
    deltas = [d - s for d, s in zip(scores["dpo"], scores["sft"], strict=True)]
    delta, delta_low, delta_high = bootstrap_ci(deltas, bootstrap_samples, confidence, seed)
    reward_mean, reward_low, reward_high = bootstrap_ci(scores["dpo"], bootstrap_samples, confidence, seed)
    sft_mean, sft_low, sft_high = bootstrap_ci(scores["sft"], bootstrap_samples, confidence, seed)
    sft_len, dpo_len = float(np.mean(lengths["sft"])), float(np.mean(lengths["dpo"]))
    metrics: dict[str, float] = {
        "eval/rewards/chosen": dpo_chosen_r.mean().item(),
        "eval/rewards/rejected": dpo_rejected_r.mean().item(),
        "eval/rewards/margins": margins.mean().item(),
        "eval/rewards/accuracies": (margins > 0).float().mean().item(),
        "eval/logp_accuracy": (logp_margin["dpo"] > 0).float().mean().item(),
        "eval/sft/logp_accuracy": (logp_margin["sft"] > 0).float().mean().item(),
        "eval/logp_margin": logp_margin["dpo"].mean().item(),
        "eval/sft/logp_margin": logp_margin["sft"].mean().item(),
        "eval/reward_mean": reward_mean,
        "eval/reward_mean_ci_low": reward_low,
        "eval/reward_mean_ci_high": reward_high,
        "eval/sft/reward_mean": sft_mean,
        "eval/sft/reward_mean_ci_low": sft_low,
        "eval/sft/reward_mean_ci_high": sft_high,
        "eval/reward_delta": delta,
        "eval/reward_delta_ci_low": delta_low,
        "eval/reward_delta_ci_high": delta_high,
        "eval/win_rate_vs_sft": win_rate,
        "eval/win_rate_ci_low": win_low,
        "eval/win_rate_ci_high": win_high,
        "eval/kl_to_reference": kl_terms.mean().item(),
        "eval/length_mean": dpo_len,
        "eval/sft/length_mean": sft_len,
        # floor of one token: an SFT model that always stops at once must not make the ratio infinite
        "eval/length_ratio": dpo_len / max(sft_len, 1.0),
        "eval/num_prompts": len(prompts),
        "eval/num_pairs": len(pref_records),
    }
    if judge == "synthetic":  # the task reward is 1.0 exactly for a correct answer
        metrics["eval/reward_eq_1"] = float(np.mean([s == 1.0 for s in scores["dpo"]]))
        metrics["eval/sft/reward_eq_1"] = float(np.mean([s == 1.0 for s in scores["sft"]]))
    if perplexity:
        metrics["eval/sft/perplexity"] = perplexity["sft"]
        metrics["eval/perplexity"] = perplexity["dpo"]

    # ---------------------------------------------------------------- report (built aside, then swapped in)
    samples = [
        {"id": pid, "prompt": prompt, "prompt_text": last_user_text(prompt),
         "sft_response": texts["sft"][i], "dpo_response": texts["dpo"][i],
         "sft_score": scores["sft"][i], "dpo_score": scores["dpo"][i],
         "sft_length": lengths["sft"][i], "dpo_length": lengths["dpo"][i],
         "win": wins[i], "kl_term": float(kl_terms[i])}
        for i, (pid, prompt) in enumerate(prompts)
    ]
    images: dict[str, bytes] = {
        "win_rate.png": plot_win_rate(wins, win_rate, win_low, win_high, confidence),
        "margins.png": plot_margins(logp_margin["sft"].tolist(), logp_margin["dpo"].tolist(), margins.tolist(), beta),
        "distributions.png": plot_distributions(lengths["sft"], lengths["dpo"], scores["sft"], scores["dpo"]),
    }
    curves = plot_training_curves(_read_curves(sft_curves_path), _read_curves(dpo_curves_path))
    if curves:
        images["training_curves.png"] = curves
    setup = {"prompts": len(prompts), "pairs": len(pref_records), "judge": judge, "β": beta,
             "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    page = render_html(metrics, samples[:num_samples_in_report], images, setup, confidence)

    report = Path(report_dir)
    report.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=report.name + ".tmp.", dir=report.parent))
    try:
        for name, png in images.items():
            (tmp / name).write_bytes(png)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
        training.write_json(str(tmp / "metrics.json"), metrics)
        _swap_dir(tmp, report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    training.write_csv(plots_path, [
        {"prompt": i, "sft/reward": s["sft_score"], "dpo/reward": s["dpo_score"],
         "sft/length": s["sft_length"], "dpo/length": s["dpo_length"], "win": s["win"]}
        for i, s in enumerate(samples)
    ])
    training.write_json(metrics_path, metrics)

    # ---------------------------------------------------------------- tracking
    from components import tracking
    from components.config import params_hash

    tracking_params = {k: v for k, v in hyper.items() if not k.endswith(("_path", "_dir"))}
    inputs = [sft_dir, dpo_dir, pref_eval_path, sft_eval_path, reference_path]
    with tracking.stage_run("evaluate", tracking_params, inputs, params_hash(tracking_params), enabled=track) as mlrun:
        tracking.log_metrics(mlrun, metrics)
        if mlrun is not None:
            import mlflow

            mlflow.log_artifacts(str(report), artifact_path="report")
    return metrics


def main(argv: list[str] | None = None) -> None:
    from components.config import load_params

    parser = argparse.ArgumentParser(description="Evaluation stage: SFT vs DPO on held-out data, HTML report")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sft", default="models/sft")
    parser.add_argument("--dpo", default="models/dpo")
    parser.add_argument("--data-dir", default="data/prepared")
    parser.add_argument("--reference", default="artifacts/ref_logps/eval.pt")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--plots", default="plots/eval.csv")
    parser.add_argument("--report", default="reports/eval")
    parser.add_argument("--no-track", action="store_true", help="skip MLflow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ALIGNFLOW_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    p = load_params(args.params)
    result = run(
        sft_dir=args.sft,
        dpo_dir=args.dpo,
        pref_eval_path=f"{args.data_dir}/pref_eval.jsonl",
        sft_eval_path=f"{args.data_dir}/sft_eval.jsonl",
        reference_path=args.reference,
        metrics_path=args.metrics,
        plots_path=args.plots,
        report_dir=args.report,
        beta=p.dpo.beta,
        max_length=p.data.max_length,
        max_prompt_length=p.data.max_prompt_length,
        mixed_precision=p.compute.mixed_precision,
        seed=p.seed,
        trust_remote_code=p.model.trust_remote_code,
        track=not args.no_track,
        **p.evaluate.model_dump(),
    )
    log.info("evaluate done: %s", json.dumps(result))


if __name__ == "__main__":
    main()
