"""prepare on every public format a user brings: each fixture (tests/data, shaped as the format's public
documentation shows it) is parsed field by field, and what cannot be used is dropped with its reason.
Also: column mapping, lenient JSONL, pre-templated strings, tools, and the fail-loud threshold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_prepare import assistant, by_line, fixture, prepare, records, system, user

from components.core.data.readers import DataError
from components.core.data.tokens import encode_chat


def drops(out: Path) -> dict[int, str]:
    report = json.loads((out / "report.json").read_text())
    return {int(e.split(":", 2)[1]): reason for f in report["files"] for reason, es in f["dropped_examples"].items()
            for e in es}


def file_entry(out: Path) -> dict:
    [entry] = json.loads((out / "report.json").read_text())["files"]
    return entry


WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}<tool_call>{{ call.function | tojson }}"
    "</tool_call>{%- endfor %}{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture
def tools_tokenizer_dir(tiny_tokenizer_dir, tmp_path) -> str:
    """The tiny tokenizer with a chat template that renders tools (as Qwen2.5's and Llama 3.1's do)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(tmp_path / "tools_tok")
    return str(tmp_path / "tools_tok")


# ----------------------------------------------------------------------------- OpenAI


def test_openai_chat_typed_parts_flattened_images_dropped_tools_need_a_template(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    metrics = prepare(tmp_path, tiny_tokenizer_dir, fixture("openai_chat.jsonl"))
    got = by_line(records(out, "sft"))
    assert file_entry(out)["format"] == "sft_messages"
    assert got[1]["messages"] == [system("You are terse."), user("Capital of Italy?"), assistant("Rome.")]
    assert got[2]["messages"] == [user("Describe a cat\nin three words."), assistant("Small, furry, aloof.")]
    assert drops(out) == {3: "unsupported_content", 4: "tools_unsupported"}  # ChatML renders no tools
    assert "'image_url' part" in file_entry(out)["dropped_examples"]["unsupported_content"][0]
    assert metrics["dropped/unsupported_content"] == 1 and metrics["dropped/tools_unsupported"] == 1


def test_openai_tool_calls_kept_and_rendered_when_the_template_supports_tools(tmp_path, tools_tokenizer_dir):
    from transformers import AutoTokenizer

    out = tmp_path / "prepared"
    # the tool schema goes into the prompt: byte-level tokens of a 400-token toy BPE need room
    prepare(tmp_path, tools_tokenizer_dir, fixture("openai_chat.jsonl"), max_length=1024, max_prompt_length=900)
    got = by_line(records(out, "sft"))
    assert sorted(got) == [1, 2, 4]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}  # decoded JSON
    assert got[4]["messages"] == [
        user("Weather in Paris?"),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "18C, sunny", "tool_call_id": "call_1"},
        assistant("18C and sunny."),
    ]
    assert got[4]["tools"][0]["function"]["name"] == "get_weather"
    tok = AutoTokenizer.from_pretrained(tools_tokenizer_dir)
    ids, trained = encode_chat(tok, got[4]["messages"], got[4]["tools"])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nTools: [{") and '"arguments": {"city": "Paris"}}</tool_call>' in text
    trained_text = tok.decode([i for i, t in zip(ids, trained, strict=True) if t])
    assert '"get_weather"' in trained_text and "18C and sunny." in trained_text and "18C, sunny" not in trained_text


def test_openai_preference_format(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    prepare(tmp_path, tiny_tokenizer_dir, fixture("openai_preference.jsonl"))
    got = by_line(records(out, "pref"))
    assert file_entry(out)["format"] == "openai_preference"
    assert got[1] == {"prompt": [user("Hello, can you tell me how cold San Francisco is today?")],
                      "chosen": [assistant("Today in San Francisco, it is not quite cold as expected.")],
                      "rejected": [assistant("It is not particularly cold in San Francisco today.")]}  # tools: [] left out
    assert got[2]["prompt"] == [system("Answer in French."), user("Say thanks.")]


# ----------------------------------------------------------------------------- ShareGPT, LLaMA-Factory, Alpaca, xtuner


def test_sharegpt_conversations_with_system_and_tool_turns(tmp_path, tools_tokenizer_dir):
    out = tmp_path / "prepared"
    prepare(tmp_path, tools_tokenizer_dir, fixture("sharegpt.json"), max_length=1024, max_prompt_length=900)
    got = by_line(records(out, "sft"))
    lines = {r["source"]: r for r in records(out, "sft")}
    assert file_entry(out)["format"] == "sharegpt" and len(lines) == 3
    first, second, tools = (got[k] for k in sorted(got))
    assert first["messages"] == [user("Who are you?"), assistant("An assistant."), user("What can you do?"),
                                 assistant("Answer questions.")]
    assert second["messages"] == [system("Be brief."), user("2+2?"), assistant("4")]
    assert tools["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert tools["messages"][2] == {"role": "tool", "content": "-3C"}
    assert tools["tools"] == [WEATHER]  # LLaMA-Factory's JSON string, decoded
    assert list(drops(out).values()) == ["wrong_type"]  # the 'narrator' turn
    assert "role 'narrator'" in file_entry(out)["dropped_examples"]["wrong_type"][0]


def test_llamafactory_sharegpt_preference(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    prepare(tmp_path, tiny_tokenizer_dir, fixture("llamafactory_sharegpt_pref.json"))
    assert file_entry(out)["format"] == "sharegpt_preference"
    got = [r for _, r in sorted(by_line(records(out, "pref")).items())]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in got] == [
        ([user("Name a fruit.")], [assistant("Apple.")], [assistant("Carrot.")]),
        ([system("Be kind."), user("Rate my poem.")], [assistant("It has lovely imagery.")], [assistant("Bad.")]),
    ]


def test_alpaca_with_input_system_and_history(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    prepare(tmp_path, tiny_tokenizer_dir, fixture("alpaca.json"))
    assert file_entry(out)["format"] == "alpaca"
    got = [r for _, r in sorted(by_line(records(out, "sft")).items())]
    assert got[0]["messages"] == [user("Give three tips for staying healthy."), assistant("Eat well, sleep, exercise.")]
    assert got[1]["messages"] == [system("You translate."), user("Translate to French: yes"), assistant("oui"),
                                  user("Translate to French.\nGood morning"), assistant("Bonjour")]
    assert list(drops(out).values()) == ["empty_field"]


def test_alpaca_preference_and_kto_tag(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    prepare(tmp_path, tiny_tokenizer_dir, fixture("alpaca_preference.json"))
    [pair] = records(out, "pref")
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ([user("Pick the larger number.\n3 or 7")],
                                                                  [assistant("7")], [assistant("3")])
    prepare(tmp_path, tiny_tokenizer_dir, fixture("alpaca_kto.json"))
    assert file_entry(out)["format"] == "alpaca_unpaired"
    got = [r for _, r in sorted(by_line(records(out, "unpaired")).items())]
    assert [(r["prompt"], r["completion"], r["label"]) for r in got] == [
        ([user("Is the sky green?")], [assistant("No, it is usually blue.")], True),
        ([user("Is the sky green?")], [assistant("Yes.")], False),
    ]


def test_messages_with_label_are_unpaired(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    prepare(tmp_path, tiny_tokenizer_dir, fixture("kto_messages.jsonl"))
    got = by_line(records(out, "unpaired"))
    assert got == {1: {"prompt": [user("Best pet?")], "completion": [assistant("It depends on you.")], "label": True},
                   2: {"prompt": [user("Best pet?")], "completion": [assistant("A rock.")], "label": False}}
    assert drops(out) == {3: "wrong_type"}


def test_xtuner_conversation_and_bare_message_lists(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    prepare(tmp_path, tiny_tokenizer_dir, fixture("xtuner.json"))
    [record] = records(out, "sft")
    assert record["messages"] == [system("You are a chef."), user("Salt or sugar for pasta water?"), assistant("Salt."),
                                  user("How much?"), assistant("A tablespoon per litre.")]
    prepare(tmp_path, tiny_tokenizer_dir, fixture("bare_lists.jsonl"))
    got = by_line(records(out, "sft"))
    assert got == {1: {"messages": [user("Ping?"), assistant("Pong.")]},
                   2: {"messages": [system("Count."), user("After 1?"), assistant("2")]}}


def test_hh_single_newline_transcripts_and_single_message_dicts(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    prepare(tmp_path, tiny_tokenizer_dir, fixture("hh_single_newline.jsonl"))
    got = by_line(records(out, "pref"))
    assert got[1] == {"prompt": [user("Is it raining?")], "chosen": [assistant("I cannot see outside.")],
                      "rejected": [assistant("Yes.")]}
    assert got[2]["prompt"] == [user("Hi"), assistant("Hello!"), user("Joke?")]
    assert (got[2]["chosen"], got[2]["rejected"]) == ([assistant("Knock knock.")], [assistant("No.")])
    prepare(tmp_path, tiny_tokenizer_dir, fixture("pref_message_dicts.jsonl"))
    [pair] = records(out, "pref")
    assert (pair["chosen"], pair["rejected"]) == ([assistant("Jupiter.")], [assistant("Mars.")])


# ----------------------------------------------------------------------------- templated text, columns, lenient JSONL


def test_pretemplated_strings_are_parsed_back_never_templated_twice(tmp_path, tiny_tokenizer_dir, caplog):
    from transformers import AutoTokenizer

    out = tmp_path / "prepared"
    metrics = prepare(tmp_path, tiny_tokenizer_dir, fixture("pretemplated_chatml.jsonl"))
    got = by_line(records(out, "pref"))
    assert got[1] == {"prompt": [system("Be exact."), user("What is 2+2?")], "chosen": [assistant("4")],
                      "rejected": [assistant("5")]}
    assert got[2]["prompt"] == [user("Plain question?")]  # plain text is untouched
    assert metrics["untemplated/total"] == 1 and file_entry(out)["untemplated"] == 1
    assert "already rendered with the chat template" in caplog.text
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids, _ = encode_chat(tok, got[1]["prompt"] + got[1]["chosen"])
    assert tok.decode(ids).count("<|im_end|>") == 3  # one per turn: no doubled end-of-turn


def test_unparseable_template_text_is_dropped_with_a_reason(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "chosen": "A <|im_start|> B", "rejected": "C."}) + "\n"
                    + json.dumps({"prompt": "Q2?", "chosen": "A.", "rejected": "B."}) + "\n")
    prepare(tmp_path, tiny_tokenizer_dir, str(path))
    assert drops(tmp_path / "prepared") == {1: "pretemplated"}


def test_column_mapping_renames_a_files_fields(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    prepare(tmp_path, tiny_tokenizer_dir, sources=[{"path": fixture("custom_columns.jsonl"), "columns": columns}])
    [pair] = records(out, "pref")
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ([user("Colour of snow?")], [assistant("White.")],
                                                                  [assistant("Green.")])
    assert "meta" not in pair  # unknown fields are not carried


def test_invalid_json_lines_skipped_and_counted_only_when_asked(tmp_path, tiny_tokenizer_dir):
    path = fixture("some_invalid_json.jsonl")
    with pytest.raises(DataError, match=r"some_invalid_json.jsonl:2: invalid JSON.*skip_invalid_json"):
        prepare(tmp_path, tiny_tokenizer_dir, path)
    metrics = prepare(tmp_path, tiny_tokenizer_dir, path, skip_invalid_json=True)
    assert metrics["dropped/invalid_json"] == 1 and metrics["kept/total"] == 2
    assert drops(tmp_path / "prepared") == {2: "invalid_json"}


# ----------------------------------------------------------------------------- no file lost without a word


def test_a_file_that_keeps_nothing_fails_naming_file_line_and_field(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": "Q?", "chosen": {"text": "A"}, "rejected": "B"}) + "\n"
                           for _ in range(3)))
    good = fixture("trl_pref_strings.jsonl")
    report = tmp_path / "reports" / "prepare.json"
    with pytest.raises(DataError) as e:
        prepare(tmp_path, tiny_tokenizer_dir, good, str(bad), min_kept_fraction=0.5, report_path=str(report))
    message = str(e.value)
    assert message.startswith(f"{bad}: kept 0 of 3 (below data.min_kept_fraction 0.5): first reasons: line 1: "
                              "field 'chosen': expected a string or a list of messages, got dict")
    assert "trl_pref_strings" not in message  # the good file is fine
    assert not (tmp_path / "prepared").exists()  # nothing half-written
    files = {Path(f["file"]).name: f for f in json.loads(report.read_text())["files"]}  # the report is there anyway
    assert files["bad.jsonl"]["kept"] == 0 and files["bad.jsonl"]["dropped"]["wrong_type"] == 3
    # lowering the threshold accepts the loss, and the metrics say so per file
    metrics = prepare(tmp_path, tiny_tokenizer_dir, good, str(bad), min_kept_fraction=0.0, report_path=str(report))
    assert metrics[f"file/{bad}/kept"] == 0 and metrics[f"file/{bad}/read"] == 3
    assert metrics[f"file/{good}/kept"] == 6 and metrics[f"file/{good}/dropped"] == 6


def test_a_file_that_loses_more_than_the_threshold_fails(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(DataError, match=r"sft_messages.jsonl: kept 5 of 11 \(below data.min_kept_fraction 0.5\)"):
        prepare(tmp_path, tiny_tokenizer_dir, fixture("sft_messages.jsonl"), min_kept_fraction=0.5)
    prepare(tmp_path, tiny_tokenizer_dir, fixture("sft_messages.jsonl"), min_kept_fraction=0.45)


def test_readme_format_table_lists_every_format():
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    from components.core.data.formats import FORMATS

    for name in FORMATS:
        assert f"`{name}`" in readme, f"README format table: add {name}"


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[2] / "data").iterdir()
                                        if p.suffix in (".json", ".jsonl") and not p.name.startswith(("bad_", "broken"))))
def test_every_fixture_loads(tmp_path, tiny_tokenizer_dir, name):
    if name in ("some_invalid_json.jsonl", "custom_columns.jsonl"):
        pytest.skip("needs skip_invalid_json / a column mapping (tested above)")
    shutil.copy(fixture(name), tmp_path / name)
    assert prepare(tmp_path, tiny_tokenizer_dir, str(tmp_path / name))["kept/total"] > 0
