"""Serving: the registered chat model answers as the pipeline generated, over HTTP (`alignflow serve`, which runs
`mlflow models serve`), in process (serving parity, recorded by register and `alignflow serve-check`, required by
the gate) and after `alignflow export` (plain transformers).

One registry per module (a tiny real model registered and promoted to champion, with the token artifact prepare
would write); each test adds to it what it needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_registry import NAME, make_workspace, stage_candidate  # tests/integration is on sys.path

from components import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import serving_load  # noqa: E402

pytestmark = pytest.mark.integration
MAX_TOKENS = 6  # evaluate.max_new_tokens of the workspace's params


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_models, empty_store):
    """A project whose `champion` is tiny model a, registered by the register stage and promoted through the gate."""
    from components.core.data import token_store
    from components.core.model.loading import load_tokenizer

    with pytest.MonkeyPatch.context() as mp:
        root = make_workspace(tmp_path_factory.mktemp("serving"), empty_store, mp)
        token_store.write_for("data/prepared", load_tokenizer(str(tiny_models["a"])))  # as prepare writes it
        stage_candidate(tiny_models["a"], reward_mean=0.4)
        assert cli.main(["register"]) == 0 and cli.main(["promote"]) == 0
        yield root


def held_out(n: int) -> list[list[dict]]:
    from components.core.eval.judges import eval_prompts

    return [m for _, m in eval_prompts("data/prepared/pref_eval.jsonl", n)]


def pipeline_greedy(model_dir: Path, prompts: list[list[dict]], max_tokens: int = MAX_TOKENS):
    """The pipeline's own greedy generation (evaluate's code), one prompt at a time: (token ids, text) per prompt."""
    from components.core.model.generation import generate_tokens, load_causal_lm

    model, tokenizer = load_causal_lm(str(model_dir))
    _, answers = generate_tokens(model, tokenizer, prompts, max_tokens, 0.0, 1.0, 1, 0)
    return [(ids, tokenizer.decode(ids, skip_special_tokens=True).strip()) for ids in answers]


def readme_curl_body() -> dict:
    """The JSON body of the README's `curl` to the served champion."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = re.search(r"^curl .*?(?=\n[^ ])", readme, re.M | re.S).group(0).replace("\\\n", " ")
    args = shlex.split(command)
    return json.loads(args[args.index("-d") + 1])


def version_tags(version: str) -> dict[str, str]:
    import mlflow

    return dict(mlflow.MlflowClient().get_model_version(NAME, version).tags)


def test_register_records_serving_parity_on_the_version(registry):
    report = json.loads(Path("reports/registration.json").read_text())
    tags = version_tags(report["version"])
    assert tags["serving/parity"] == "pass" and tags["serving/parity_prompts"] == "8"
    assert tags["serving/parity_detail"].startswith("8/8 held-out prompts identical (prompt tokens vs the token artifact")
    assert report["serving_parity"] == tags["serving/parity_detail"]


def test_the_served_champion_answers_as_the_pipeline_over_http(registry, tiny_models):
    port = serving_load.free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "components.cli", "serve", "--alias", "champion", "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        serving_load.wait_up(base, server)
        prompts = held_out(4)
        want = pipeline_greedy(tiny_models["a"], prompts)
        for messages, (ids, text) in zip(prompts, want, strict=True):
            status, out, _ = serving_load.post(f"{base}/invocations", {"messages": messages, "temperature": 0,
                                                                       "max_tokens": MAX_TOKENS})
            assert status == 200, out
            assert out["object"] == "chat.completion" and out["model"] == NAME and out["id"].startswith("chatcmpl-")
            (choice,) = out["choices"]
            assert choice["message"] == {"role": "assistant", "content": text}
            assert out["usage"]["completion_tokens"] == len(ids)
            assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + len(ids)
        # max_tokens is honoured: one token, cut for length (the pipeline's first token does not end the turn)
        status, out, _ = serving_load.post(f"{base}/invocations", {"messages": prompts[0], "temperature": 0,
                                                                   "max_tokens": 1})
        assert status == 200 and out["usage"]["completion_tokens"] == 1
        assert out["choices"][0]["finish_reason"] == ("length" if len(want[0][0]) > 1 else "stop")

        # a bounded load: well-formed requests 8 at a time, a malformed body after every 4th; the server stays up
        requests = [{"messages": m, "temperature": 0, "max_tokens": MAX_TOKENS} for m in held_out(0)] * 3
        result = serving_load.load_test(f"{base}/invocations", requests, concurrency=8, malformed_every=4)
        assert result["failures"] == [] and result["malformed"] == len(requests) // 4
        for name, body, reason in serving_load.MALFORMED:  # every kind of bad request: a 400 that says why
            status, out, _ = serving_load.post(f"{base}/invocations", body)
            assert status == 400 and reason.lower() in str(out).lower(), (name, status, out)
        assert serving_load.post(f"{base}/invocations", requests[0])[0] == 200
        status, out, _ = serving_load.post(f"{base}/invocations", readme_curl_body())  # the README's example
        assert status == 200 and out["choices"][0]["message"]["role"] == "assistant", out
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "Traceback" not in err.split("Shutting down")[0], err[-3000:]


def test_a_broken_template_fails_parity_and_says_what_differs(registry, tiny_models, monkeypatch, capsys):
    from components.core.release import serving

    stage = serving.stage_hf_dir

    def broken_template(model_dir, dst, *args, **kwargs):  # the served template lost its generation prompt
        out = stage(model_dir, dst, *args, **kwargs)
        (out / "chat_template.jinja").write_text(
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}")
        return out

    monkeypatch.setattr(serving, "stage_hf_dir", broken_template)
    before = version_tags("1")
    stage_candidate(tiny_models["b"], reward_mean=0.6)
    capsys.readouterr()
    assert cli.main(["register"]) == 1
    err = capsys.readouterr().err
    assert "does not serve as it was evaluated, so it is not challenger" in err
    assert "prompt tokens differ at token" in err and "vs the token artifact" in err
    import mlflow

    client = mlflow.MlflowClient()
    newest = max(int(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    assert version_tags(str(newest))["serving/parity"] == "fail"
    assert {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()} == {"champion": "1"}
    assert version_tags("1") == before


def test_serve_check_records_parity_and_the_gate_requires_it(registry, tiny_models, capsys):
    import mlflow

    client = mlflow.MlflowClient()
    stage_candidate(tiny_models["b"], reward_mean=0.7)  # other metrics: a new version
    assert cli.main(["register"]) == 0
    version = json.loads(Path("reports/registration.json").read_text())["version"]
    for tag in ("serving/parity", "serving/parity_detail"):
        client.delete_model_version_tag(NAME, version, tag)  # as a version registered before the check existed

    def parity_reason() -> str:
        capsys.readouterr()
        assert cli.main(["promote", "--version", version, "--dry-run", "--json"]) == 0
        return next(r for r in json.loads(capsys.readouterr().out)["reasons"] if "serving parity" in r)

    assert parity_reason().startswith("FAIL serving parity never checked")
    capsys.readouterr()
    assert cli.main(["serve-check", version]) == 0
    assert f"v{version}: serving parity PASS: 8/8 held-out prompts identical" in capsys.readouterr().out
    assert version_tags(version)["serving/parity"] == "pass"
    assert parity_reason().startswith("PASS serving parity: 8/8")
    assert cli.main(["serve-check", "nosuchalias"]) == 1


def test_export_reloads_in_transformers_and_generates_the_same_tokens(registry, tiny_models, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    assert cli.main(["export", "champion", "--out", str(out)]) == 0
    lineage = json.loads((out / "alignflow_lineage.json").read_text())
    assert lineage["version"] == "1" and "champion" in lineage["aliases"]
    assert lineage["tags"]["serving/parity"] == "pass" and lineage["tags"]["alignflow/candidate"] == "dpo"
    assert (out / "README.md").read_text().startswith("---\nlicense: other")

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = held_out(3)
    for messages, (want, _) in zip(prompts, pipeline_greedy(tiny_models["a"], prompts), strict=True):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():  # the exported generation config ends the turn: no eos_token_id passed here
            got = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert got.tolist() == want
    capsys.readouterr()
    assert cli.main(["export", "champion", "--out", str(out)]) == 1  # not over a non-empty directory
    assert "exists and is not empty" in capsys.readouterr().err
