"""eval/judges.py: the held-out prompts and each kind of judge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components.core.eval import judges
from components.core.eval.judges import JudgeError, load_judge


def test_eval_prompts_dedupes_orders_by_id_and_cuts(tmp_path):
    def rec(rid, text):
        return {"id": rid, "prompt": [{"role": "user", "content": text}],
                "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}

    records = [rec("c", "three"), rec("a", "one"), rec("d", "one"), rec("b", "two")]
    path = tmp_path / "pref_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [i for i, _ in judges.eval_prompts(str(path), 0)] == ["a", "b", "c"]
    assert judges.eval_prompts(str(path), 2) == [("a", records[1]["prompt"]), ("b", records[3]["prompt"])]


def test_synthetic_judge_scores_the_last_user_message():
    judge = load_judge("synthetic")
    prompt = [{"role": "system", "content": "Be brief: 9 9"}, {"role": "user", "content": "Sort ascending: 3 1 2"}]
    assert judge(prompt, "1 2 3") == 1.0
    assert judge(prompt, "1 3 2") == pytest.approx(1 / 3)
    assert judge(prompt, "no idea") == 0.0


def test_function_judge_imports_package_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text("def length(prompt, response):\n    return len(response)\nNAME = 'x'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_judge("function", "my_judges:length")([{"role": "user", "content": "hi"}], "abcd") == 4.0
    with pytest.raises(JudgeError, match="my_judges:NAME.*not callable"):
        load_judge("function", "my_judges:NAME")
    with pytest.raises(JudgeError, match="my_judges:missing.*AttributeError"):
        load_judge("function", "my_judges:missing")


@pytest.mark.parametrize(
    ("kind", "path", "message"),
    [
        ("function", "no_such_module_xyz:fn", r"judge_path='no_such_module_xyz:fn': cannot import"),
        ("function", "just_a_module", r"judge_path='just_a_module': a function judge is 'package.module:function'"),
        ("reward_model", "", r"needs evaluate.judge_path"),
        ("reward_model", "/nonexistent/rm", r"judge_path='/nonexistent/rm': cannot load a reward model"),
        ("oracle", "", r"evaluate.judge='oracle'"),
    ],
)
def test_judge_loading_errors_name_the_judge_path(kind, path, message):
    with pytest.raises(JudgeError, match=message):
        load_judge(kind, path)


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_judge_scores_with_a_sequence_classifier(tmp_path, num_labels):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from components.bootstrap import build_tokenizer
    from components.core import sorting as synthetic

    tok = build_tokenizer(synthetic.corpus(3, 4, 9, 0, n=100), 300)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = load_judge("reward_model", str(tmp_path))
    prompt = [{"role": "user", "content": "Sort ascending: 3 1 2"}]
    a, b = judge(prompt, "1 2 3"), judge(prompt, "3 2 1")
    assert isinstance(a, float) and np.isfinite(a) and a != b
    assert judge(prompt, "1 2 3") == a  # deterministic (eval mode)
