"""The promotion gate: does a candidate replace the champion? Pure: per-prompt scores and metrics in,
decision out, so every rule is tested with hand-made numbers (tests/integration/test_registry.py).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

from components.core.algos.stats import bootstrap_ci

# (metric read from the candidate's version tags, gate key of its upper bound)
GUARDRAILS = (("eval/kl_to_reference", "max_kl"), ("eval/length_ratio", "max_length_ratio"))


@dataclasses.dataclass(frozen=True)
class Decision:
    passed: bool
    reasons: list[str]  # one line per check, "PASS ..." or "FAIL ..."
    delta: float | None = None  # mean per-prompt difference candidate - champion (None: no champion)
    ci_low: float | None = None
    ci_high: float | None = None


def gate_decision(
    candidate_scores: Sequence[float] | None,
    champion_scores: Sequence[float] | None,
    candidate_metrics: dict[str, float],
    gate: dict,
    n_resamples: int,
    seed: int,
    serving_parity: tuple[str, str] | None = None,
) -> Decision:
    """Does the candidate replace the champion? Pure: scores and metrics in, decision out.

    candidate_scores, champion_scores: per-prompt judge scores on the same prompts, same order, (N,).
    champion_scores None = there is no champion: the primary check is skipped ("no champion").
    Checks (all must pass):
    - primary: delta = mean(candidate - champion) >= gate["min_delta"], and the percentile-bootstrap
      interval of that mean at gate["confidence"] lies above zero (a paired comparison: prompt
      difficulty cancels out, so far fewer prompts are needed than comparing two means);
    - guardrails: candidate_metrics["eval/kl_to_reference"] <= gate["max_kl"] and
      candidate_metrics["eval/length_ratio"] <= gate["max_length_ratio"]. A missing or NaN guardrail
      metric fails: a guardrail that cannot be checked does not hold;
    - serving: serving_parity = (the version's `serving/parity` tag, its detail) must be ("pass", ...): a version
      that does not serve as it was evaluated, or was never checked (None), is not promoted.
    """
    reasons: list[str] = []
    delta = ci_low = ci_high = None
    min_prompts = gate.get("min_prompts", 1)
    if champion_scores is None:
        reasons.append("PASS no champion: the first candidate becomes champion")
        evaluated = candidate_metrics.get("eval/num_prompts")
        if evaluated is None or math.isnan(evaluated) or evaluated < min_prompts:
            reasons.append(f"FAIL evaluated on {_n(evaluated)} held-out prompts < gate.min_prompts {min_prompts}")
        else:
            reasons.append(f"PASS evaluated on {_n(evaluated)} held-out prompts >= gate.min_prompts {min_prompts}")
    else:
        if candidate_scores is None or len(candidate_scores) != len(champion_scores) or not champion_scores:
            n_cand = None if candidate_scores is None else len(candidate_scores)
            raise ValueError(f"paired scores needed: candidate has {n_cand}, champion {len(champion_scores)}")
        diffs = [c - b for c, b in zip(candidate_scores, champion_scores, strict=True)]  # (N,)
        _, ci_low, ci_high = bootstrap_ci(diffs, n_resamples, gate["confidence"], seed)
        delta = statistics.fmean(diffs)
        metric, min_delta, level = gate["primary_metric"], gate["min_delta"], f"{gate['confidence']:.0%}"
        ok = delta >= min_delta
        reasons.append(f"{'PASS' if ok else 'FAIL'} {metric} delta {delta:+.4f} >= min_delta {min_delta:+.4f} "
                       f"({len(diffs)} prompts)")
        ok = len(diffs) >= min_prompts
        reasons.append(f"{'PASS' if ok else 'FAIL'} compared on {len(diffs)} prompts "
                       f"{'>=' if ok else '<'} gate.min_prompts {min_prompts}")
        ok = ci_low > 0
        where = "lies above 0" if ok else "lies below 0" if ci_high < 0 else "includes 0"
        reasons.append(f"{'PASS' if ok else 'FAIL'} {level} CI of delta [{ci_low:+.4f}, {ci_high:+.4f}] {where}")
    for metric, key in GUARDRAILS:
        value, limit = candidate_metrics.get(metric), gate[key]
        if value is None or math.isnan(value):
            reasons.append(f"FAIL {metric} missing (guardrail {key} {limit})")
        else:
            reasons.append(f"{'PASS' if value <= limit else 'FAIL'} {metric} {value:.4f} <= {key} {limit}")
    reasons.append(_parity_reason(serving_parity))
    passed = all(r.startswith("PASS") for r in reasons)
    return Decision(passed, reasons, delta, ci_low, ci_high)


def _parity_reason(serving_parity: tuple[str, str] | None) -> str:
    if serving_parity is None or not serving_parity[0]:
        return "FAIL serving parity never checked on this version (alignflow serve-check VERSION)"
    status, detail = serving_parity
    return f"{'PASS' if status == 'pass' else 'FAIL'} serving parity: {detail}"


def _n(value: float | None) -> str:
    return "?" if value is None or math.isnan(value) else str(int(value))
