"""The evaluate stage end to end on tiny models: metrics, report, MLflow, and what a browser shows."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from components import evaluate
from components.bootstrap import build_model, build_tokenizer
from components.core import sorting as synthetic
from components.core.config import EvaluateConfig, Runtime
from components.core.data import token_store
from components.core.data.tokens import pair_token_hash, tokenize_pair
from components.core.model.generation import load_causal_lm
from components.core.model.logprobs import pair_logps

pytestmark = pytest.mark.integration

SEED = 7
MAX_LENGTH = 64
MAX_PROMPT_LENGTH = 48
HOSTILE = "<script>alert('x')</script> & Sort ascending: 3 1 2"


def _reference_logps(model, tokenizer, records: list[dict]) -> dict:
    """eval.pt as the reference stage writes it, computed independently of evaluate.py."""
    pairs = [tokenize_pair(tokenizer, r, MAX_LENGTH, MAX_PROMPT_LENGTH) for r in records]
    with torch.no_grad():
        chosen, rejected, n_chosen, n_rejected = pair_logps(model, pairs, tokenizer.pad_token_id, "cpu")
    return {"ids": [r["id"] for r in records], "chosen_logps": chosen, "rejected_logps": rejected,
            "chosen_tokens": n_chosen, "rejected_tokens": n_rejected,
            "token_hashes": [pair_token_hash(p) for p in pairs]}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = build_tokenizer(synthetic.corpus(3, 4, 9, SEED, n=300), 300)
    sft = build_model(tokenizer, 32, 2, 2, 1, 64, 128, SEED)
    sft.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    torch.manual_seed(SEED + 1)
    with torch.no_grad():  # a "DPO" model that differs a little from its reference
        for p in sft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sft.save_pretrained(root / "dpo")
    tokenizer.save_pretrained(root / "dpo")

    sft_records, pref_records = synthetic.generate(4, 7, 3, 4, 9, 0.4, SEED)
    pref_records.append({"prompt": [{"role": "user", "content": HOSTILE}],
                         "chosen": [{"role": "assistant", "content": "1 2 3"}],
                         "rejected": [{"role": "assistant", "content": "<b>2 1 3</b>"}]})
    pref_records.append(dict(pref_records[0]))  # duplicate prompt: evaluated once
    pref_records = [{"id": f"p{i:02d}", **r} for i, r in enumerate(pref_records)]
    data = root / "prepared"
    data.mkdir()
    (data / "pref_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref_records))
    (data / "sft_eval.jsonl").write_text("".join(json.dumps({"id": f"s{i}", **r}) + "\n"
                                                  for i, r in enumerate(sft_records)))
    token_store.write_for(data, tokenizer)  # the token ids prepare writes beside the records

    reference = load_causal_lm(str(root / "sft"))[0]  # the SFT model is the reference
    (root / "ref").mkdir()
    torch.save(_reference_logps(reference, tokenizer, pref_records), root / "ref" / "eval.pt")

    plots = root / "plots"
    plots.mkdir()
    with open(plots / "sft.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["step", "train/loss", "eval/loss"])
        w.writeheader()
        w.writerows([{"step": s, "train/loss": 3 / s, "eval/loss": 3.2 / s if s % 20 == 0 else ""}
                     for s in range(10, 101, 10)])
    # as the dpo stage writes it: train loss is "loss"; no eval/loss column (skipped gracefully)
    with open(plots / "dpo.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["step", "loss", "rewards/margins", "rewards/accuracies",
                               "eval/rewards/accuracies"])
        w.writeheader()
        w.writerows([{"step": s, "loss": 0.69 - s / 200, "rewards/margins": s / 50,
                      "rewards/accuracies": 0.5 + s / 250, "eval/rewards/accuracies": 0.5 + s / 300}
                     for s in range(10, 61, 10)])
    return {"root": root, "n_pairs": len(pref_records), "n_prompts": len(pref_records) - 1}


def _run(ws: dict, out: str, dpo: str = "dpo", track: bool = False, tools=None, **settings) -> tuple[dict, Path]:
    """evaluate.run on the workspace; settings: keys of the evaluate section."""
    root = ws["root"]
    cfg = EvaluateConfig(**{"num_prompts": 0, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "batch_size": 4,
                            "bootstrap_samples": 200, "num_samples_in_report": ws["n_prompts"], **settings})
    metrics = evaluate.run(
        cfg, beta=0.1, policies={"sft": str(root / "sft"), "dpo": str(root / dpo)},
        data_dir=str(root / "prepared"), reference_path=str(root / "ref/eval.pt"), curves_dir=str(root / "plots"),
        metrics_path=str(root / out / "metrics/eval.json"), plots_path=str(root / out / "plots/eval.csv"),
        report_dir=str(root / out / "reports/eval"),
        runtime=Runtime(seed=SEED, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH), track=track,
        tools=tools,
    )
    return metrics, root / out


def test_evaluate_stage_writes_metrics_and_report(workspace):
    metrics, out = _run(workspace, "run1")

    # ------------------------------------------------------------ metrics
    expected = {
        "eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen", "eval/rewards/rejected",
        "eval/logp_accuracy", "eval/sft/logp_accuracy", "eval/reward_mean", "eval/sft/reward_mean",
        "eval/reward_eq_1", "eval/sft/reward_eq_1", "eval/win_rate_vs_sft", "eval/win_rate_ci_low",
        "eval/win_rate_ci_high", "eval/reward_delta", "eval/reward_delta_ci_low", "eval/reward_delta_ci_high",
        "eval/kl_to_reference", "eval/length_mean", "eval/sft/length_mean", "eval/length_ratio",
        "eval/sft/perplexity", "eval/perplexity",
    }
    assert expected <= metrics.keys()
    on_disk = json.loads((out / "metrics/eval.json").read_text())
    assert on_disk == pytest.approx(metrics)
    assert all(isinstance(v, int | float) and v == v for v in on_disk.values())  # flat, numeric, no NaN
    assert metrics["eval/num_pairs"] == workspace["n_pairs"]
    assert metrics["eval/num_prompts"] == workspace["n_prompts"]
    for key in ("eval/rewards/accuracies", "eval/logp_accuracy", "eval/sft/logp_accuracy", "eval/reward_mean",
                "eval/sft/reward_mean", "eval/reward_eq_1", "eval/win_rate_vs_sft"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["eval/win_rate_ci_low"] <= metrics["eval/win_rate_vs_sft"] <= metrics["eval/win_rate_ci_high"]
    assert metrics["eval/rewards/margins"] == pytest.approx(
        metrics["eval/rewards/chosen"] - metrics["eval/rewards/rejected"], abs=1e-5)
    assert 0 < metrics["eval/length_mean"] <= 8 and 0 < metrics["eval/sft/length_mean"] <= 8
    # a random 300-token model: perplexity around the vocabulary size, and the perturbed one differs
    assert 10 < metrics["eval/sft/perplexity"] < 3000
    assert metrics["eval/perplexity"] != metrics["eval/sft/perplexity"]
    assert metrics["eval/kl_to_reference"] != 0.0

    # ------------------------------------------------------------ report
    report = out / "reports/eval"
    page = (report / "index.html").read_text()
    assert page.count("<img") >= 4 and "data:image/png;base64," in page
    assert 'class="samples"' in page and page.count('<span class="badge') == workspace["n_prompts"]
    assert "<script>" not in page and "&lt;script&gt;" in page  # model and user text is escaped
    for name in ("win_rate.png", "margins.png", "distributions.png", "training_curves.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    samples = [json.loads(line) for line in (report / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == workspace["n_prompts"]
    assert {"id", "prompt", "sft_response", "dpo_response", "sft_score", "dpo_score"} <= samples[0].keys()
    rows = list(csv.DictReader(open(out / "plots/eval.csv")))
    assert len(rows) == workspace["n_prompts"] and "dpo/reward" in rows[0]
    assert not list(report.parent.glob("*.tmp.*")) and not (report.parent / "eval.old").exists()

    # ------------------------------------------------------------ what a browser shows
    if shutil.which("chromium") is None:
        pytest.skip("chromium not installed: report rendering not checked (apt-get install -y chromium)")
    spec = importlib.util.spec_from_file_location("render_report", Path(__file__).parents[2] / "scripts/render_report.py")
    render_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_report)
    png = render_report.render(report / "index.html", out / "screenshot.png", width=1280, height=2400)
    assert png.stat().st_size > 50_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[:, :, :3]  # (H, W, 3) floats in [0, 1]
    colours = {tuple(c) for c in (pixels[::8, ::8].reshape(-1, 3) * 255).astype(int).tolist()}
    assert len(colours) > 50, "screenshot looks blank"


def test_identical_models_tie_and_log_to_mlflow(workspace, monkeypatch):
    """DPO == SFT: zero implicit rewards, zero KL, all ties (same seeds, same samples); tracked in MLflow."""
    db = workspace["root"] / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(workspace["root"])  # the artifact store lands in the tmp dir, not the repo
    metrics, out = _run(workspace, "run2", dpo="sft", num_prompts=4, num_samples_in_report=2, track=True)

    assert metrics["eval/num_prompts"] == 4
    assert metrics["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["eval/kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["eval/win_rate_vs_sft"] == 0.5
    assert (metrics["eval/win_rate_ci_low"], metrics["eval/win_rate_ci_high"]) == (0.5, 0.5)
    assert metrics["eval/length_ratio"] == 1.0
    assert metrics["eval/perplexity"] == pytest.approx(metrics["eval/sft/perplexity"])
    assert (out / "reports/eval/index.html").read_text().count('<span class="badge') == 2

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["alignflow"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["alignflow/stage"] == "evaluate"
    assert run.data.metrics["eval/win_rate_vs_sft"] == 0.5
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert {"report/index.html", "report/samples.jsonl", "report/win_rate.png"} <= logged


def test_missing_reference_fails_clearly_and_keeps_old_report(workspace, tmp_path):
    root = workspace["root"]
    partial = torch.load(root / "ref/eval.pt", weights_only=True)
    partial = {k: v[1:] for k, v in partial.items()}  # the first record's log-probs are missing
    torch.save(partial, tmp_path / "eval.pt")
    report = tmp_path / "reports/eval"
    report.mkdir(parents=True)
    (report / "index.html").write_text("previous good report")
    with pytest.raises(ValueError, match="no reference log-probs for 1 of"):
        evaluate.run(EvaluateConfig(), beta=0.1, policies={"sft": str(root / "sft"), "dpo": str(root / "dpo")},
                     data_dir=str(root / "prepared"), reference_path=str(tmp_path / "eval.pt"),
                     report_dir=str(report), metrics_path=str(tmp_path / "m.json"), track=False)
    assert (report / "index.html").read_text() == "previous good report"


def test_kl_is_estimated_on_untempered_policy_samples(workspace, monkeypatch):
    """Sampling at T=0.5 for the judge must not bias the KL guardrail: the KL samples come from the
    policy itself (T=1, top_p=1), and the estimate carries a bootstrap interval."""
    calls = []
    real = evaluate.generate_tokens

    def recording(model, tokenizer, prompts, max_new_tokens, temperature, top_p, *args, **kwargs):
        calls.append((kwargs.get("desc"), temperature, top_p))
        return real(model, tokenizer, prompts, max_new_tokens, temperature, top_p, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_tokens", recording)
    metrics, _ = _run(workspace, "tempered", temperature=0.5, top_p=0.9)
    assert ("generate dpo (KL)", 1.0, 1.0) in calls
    assert [c for c in calls if c[0] in ("generate sft", "generate dpo")] == [("generate sft", 0.5, 0.9),
                                                                              ("generate dpo", 0.5, 0.9)]
    assert metrics["eval/kl_to_reference_ci_low"] <= metrics["eval/kl_to_reference"] <= metrics["eval/kl_to_reference_ci_high"]
    assert metrics["eval/length_ratio_ci_low"] <= metrics["eval/length_ratio"] <= metrics["eval/length_ratio_ci_high"]
    calls.clear()
    _run(workspace, "untempered")
    assert all(c[0] != "generate dpo (KL)" for c in calls)  # T=1, top_p=1: the judged samples serve


def test_with_an_environment_every_policy_is_measured_with_and_without_its_tools(workspace):
    """grpo.environment set: task success with and without the tools for sft and dpo, CIs and the delta vs SFT,
    the same on a second run (same seeds), and a card in the report."""
    from components.core.eval.tool_use import ToolEval

    spec = ToolEval("lockers", max_turns=2, max_new_tokens=12, prompts="pref")
    metrics, out = _run(workspace, "tools", tools=spec)
    again, _ = _run(workspace, "tools_again", tools=spec)
    for name in ("sft", "dpo"):
        p = f"eval/{name}/tool/"
        for key in ("success", "success_without_tool", "tool_gain"):
            assert metrics[p + key + "_ci_low"] <= metrics[p + key] <= metrics[p + key + "_ci_high"], p + key
        assert 0.0 <= metrics[p + "success"] <= 1.0 and metrics[p + "calls_per_episode"] >= 0.0
    assert "eval/dpo/tool/success_delta_vs_sft" in metrics and "eval/sft/tool/success_delta_vs_sft" not in metrics
    assert {k: v for k, v in metrics.items() if "/tool/" in k} == {k: v for k, v in again.items() if "/tool/" in k}
    assert "Task success with the tool" in (out / "reports/eval/index.html").read_text()
