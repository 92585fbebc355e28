"""Every shipped params file validates; bad keys and values fail at start and name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.core.config import ParamsError, load_params

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [REPO / "params.yaml", *sorted((REPO / "configs" / "params").glob("*.yaml"))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_params_file_loads(path):
    params = load_params(path)
    assert params.data.sources or params.data.hub_sources


def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["sft"].update(learning_rte=1e-3), r"sft\.learning_rte: unknown key"),
        (lambda r: r["dpo"].update(beta=-1), r"dpo\.beta: Input should be greater than 0"),
        (lambda r: r["dpo"].update(loss="dpo++"), r"dpo\.loss: Input should be 'sigmoid'"),
        (lambda r: r["dpo"].update(label_smoothing=0.1), r"label_smoothing=0.1 only applies to loss cdpo"),
        (lambda r: r["dpo"].update(loss="robust"), r"needs label_smoothing > 0"),
        (lambda r: r["compute"].update(accelerate_config="../tpu"), r"compute\.accelerate_config"),
        (lambda r: r["model"].update(num_heads=3), r"divisible by num_heads"),
        (lambda r: r["evaluate"].update(judge="function", judge_path="nocolon"), r"package\.module:function"),
        (lambda r: r.update(extra_section={}), r"extra_section: unknown key"),
        (lambda r: r["register"]["gate"].update(max_kl="lots"), r"register\.gate\.max_kl"),
        (lambda r: r["ppo"].update(prompts_per_step=9, num_mini_batches=2), r"multiple of num_mini_batches"),
        (lambda r: r["ppo"].update(adaptive_kl=True, kl_coef=0.0), r"start it above 0"),
        (lambda r: r["ppo"]["rloo"].update(num_ppo_epochz=1), r"rloo: .*num_ppo_epochz"),
        (lambda r: r["ppo"].update(reward="functions", rewards=[]), r"at least one entry in rewards"),
        (lambda r: r["grpo"].update(loss_type="luspo"), r"grpo: .*luspo .*needs importance_sampling_level: sequence"),
        (lambda r: r["grpo"].update(importance_sampling_level="group"), r"grpo\.importance_sampling_level"),
        (lambda r: r["grpo"].update(loss_type="online_dpo", beta=0.04), r"online_dpo .*set beta: 0"),
        (lambda r: r["grpo"].update(loss_type="online_dpo", max_staleness=1), r"online_dpo .*max_staleness must be 0"),
        (lambda r: r["grpo"].update(is_correction_mode="token_clip"), r"grpo.is_correction_mode"),
        (lambda r: r["grpo"].update(keep_best=True), r"keep_best needs eval_every > 0"),
        (lambda r: r["grpo"].update(eval_every=5, max_staleness=1), r"eval_every with max_staleness > 0"),
        (lambda r: r["data"].update(num_proc=-1), r"data\.num_proc"),
        (lambda r: r["grpo"].update(max_turns=0), r"grpo\.max_turns"),
        (lambda r: r["ppo"].update(keep_best=True), r"ppo: .*keep_best needs eval_every > 0"),
        (lambda r: r["ppo"]["rloo"].update(keep_best=True), r"rloo: .*keep_best needs eval_every > 0"),
        (lambda r: (r["grpo"].update(environment="lockers"), r["compute"].update(accelerate_config="fsdp")),
         r"grpo\.environment with compute\.accelerate_config: fsdp is not supported"),
        (lambda r: r["synthetic"].update(tool_call_share=1.5), r"synthetic\.tool_call_share"),
        (lambda r: r["grpo"].update(rewards=[]), r"rewards: at least one reward function \(or an environment"),
        (lambda r: r["grpo"].update(prompts="tool"), r"grpo\.prompts"),
        (lambda r: r["sft"].update(keep_best=True, lora={"enabled": True}), r"keep_best with lora\.enabled"),
        (lambda r: r["dpo"].update(best_metric="loss"), r"dpo\.best_metric"),
        (lambda r: r["reward_model"].update(keep_best=True), r"keep_best is sft's and dpo's"),
        (lambda r: r["sft"].update(optimizer_in_backward=True), r"sft: .*optimizer_in_backward needs max_grad_norm: 0"),
        (lambda r: r["dpo"].update(optimizer_in_backward=True, max_grad_norm=0, grad_accum=2),
         r"dpo: .*optimizer_in_backward needs grad_accum: 1, not 2"),
        (lambda r: (r["sft"].update(optimizer_in_backward=True, max_grad_norm=0),
                    r["compute"].update(accelerate_config="fsdp")),
         r"sft\.optimizer_in_backward needs one process, not compute\.accelerate_config: fsdp"),
    ],
)
def test_bad_params_fail_naming_the_key(tmp_path, mutate, expected):
    with pytest.raises(ParamsError, match=expected):
        load_params(_write(tmp_path, mutate))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def _dvc_param_keys() -> set[str]:
    """Every params.yaml key dvc.yaml names (stage `params:` lists and `${...}` interpolations)."""
    import re

    text = (REPO / "dvc.yaml").read_text()
    keys = set(re.findall(r"\$\{([a-z_][\w.]*)\}", text)) - {"key"}
    for stage in yaml.safe_load(text)["stages"].values():
        keys |= {k for k in stage.get("params", []) if isinstance(k, str)}
    return {k for k in keys if not k.startswith("item.")}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_params_file_has_what_dvc_reads(path):
    """`cp configs/params/X.yaml params.yaml && dvc repro` must not stop at a key dvc.yaml reads from the file
    itself (DVC reads params.yaml, not the validated config with its defaults)."""
    raw = yaml.safe_load(path.read_text())

    def present(key: str) -> bool:
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = sorted(k for k in _dvc_param_keys() if not present(k))
    assert not missing, f"{path.name} lacks {missing}"
