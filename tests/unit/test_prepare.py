"""prepare: every input format normalises to the expected canonical records, every drop is counted
with its reason and line, broken files fail naming file:line:field, and the split never leaks a prompt."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import types
from pathlib import Path

import pytest

from components import prepare as prepare_stage
from components.core.config import DataConfig, Runtime, SourceConfig
from components.core.data.formats import REASONS
from components.core.data.readers import DataError

FIXTURES = Path(__file__).parents[1] / "data"
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 128
FORMAT_FILES = [
    "trl_pref_strings.jsonl",
    "trl_pref_messages.jsonl",
    "hh_rlhf.jsonl",
    "ultrafeedback.parquet",
    "sft_messages.jsonl",
    "sft_prompt_completion.csv",
    "kto_unpaired.json",
    "bad_utf8.jsonl",
]
OUTPUTS = [f"{p}_{s}.jsonl" for p in ("sft", "pref", "unpaired") for s in ("train", "eval")]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def prepare(tmp_path, tokenizer_dir, *paths, kind="auto", seed=0, report_path=None, **settings) -> dict:
    """prepare.run on `paths`; settings: keys of the data section (sources and hub_sources included)."""
    cfg = DataConfig(**{
        "sources": [{"path": p, "kind": kind} for p in paths],
        "eval_fraction": 0.25,
        "max_length": MAX_LENGTH,
        "max_prompt_length": MAX_PROMPT_LENGTH,
        "dedupe": True,
        "min_kept_fraction": 0.0,  # the fixtures drop records on purpose; fail-loud tests set their own
        **settings,
    })
    return prepare_stage.run(cfg, tokenizer_path=tokenizer_dir, out_dir=str(tmp_path / "prepared"),
                             metrics_path=str(tmp_path / "metrics" / "prepare.json"), report_path=report_path,
                             runtime=Runtime(seed=seed))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def records(out_dir: Path, prefix: str) -> list[dict]:
    """train + eval records of one kind, in source order."""
    rows = read_jsonl(out_dir / f"{prefix}_train.jsonl") + read_jsonl(out_dir / f"{prefix}_eval.jsonl")
    return sorted(rows, key=lambda r: (r["source"].rsplit(":", 1)[0], int(r["source"].rsplit(":", 1)[1])))


def by_line(rows: list[dict]) -> dict[int, dict]:
    return {
        int(r["source"].rsplit(":", 1)[1]): {k: v for k, v in r.items() if k not in ("id", "source")}
        for r in rows
    }


def drops_by_line(out_dir: Path) -> dict[int, str]:
    report = json.loads((out_dir / "report.json").read_text())
    out = {}
    for entry in report["files"]:
        for reason, examples in entry["dropped_examples"].items():
            for example in examples:
                out[int(example.split(":", 2)[1])] = reason
    return out


# ----------------------------------------------------------------------------- every format: counts and lines

CASES = {
    # file: (detected format, kind prefix, kept, {line: drop reason})
    "trl_pref_strings.jsonl": (
        "preference",
        "pref",
        6,
        {
            7: "identical_pair",
            8: "empty_field",
            9: "wrong_type",
            10: "too_long",
            11: "duplicate",
            12: "prompt_too_long",
        },
    ),
    "trl_pref_messages.jsonl": (
        "preference",
        "pref",
        5,
        {6: "wrong_type", 7: "wrong_type", 8: "empty_field", 9: "wrong_type"},
    ),
    "hh_rlhf.jsonl": (
        "preference_implicit",
        "pref",
        5,
        {5: "empty_field", 6: "identical_pair", 7: "wrong_type", 8: "wrong_type"},
    ),
    "ultrafeedback.parquet": ("preference", "pref", 5, {5: "identical_pair", 6: "empty_field"}),
    "sft_messages.jsonl": (
        "sft_messages",
        "sft",
        5,
        # line 6 has a tool turn: the tiny ChatML template cannot render tools
        {5: "wrong_type", 6: "tools_unsupported", 7: "empty_field", 8: "duplicate", 9: "wrong_type", 11: "too_long"},
    ),
    "sft_prompt_completion.csv": ("sft_prompt_completion", "sft", 5, {6: "empty_field"}),
    "kto_unpaired.json": ("unpaired", "unpaired", 7, {32: "wrong_type", 37: "empty_field"}),
    "bad_utf8.jsonl": ("preference", "pref", 2, {2: "bad_utf8", 3: "bad_utf8"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_fixture_counts_every_drop_by_reason_and_line(tmp_path, tiny_tokenizer_dir, name):
    fmt, prefix, kept, drops = CASES[name]
    metrics = prepare(tmp_path, tiny_tokenizer_dir, fixture(name))
    out = tmp_path / "prepared"
    assert drops_by_line(out) == drops
    assert metrics["kept/total"] == kept == len(records(out, prefix))
    assert metrics["read/total"] == kept + len(drops)
    for reason in REASONS:
        assert metrics[f"dropped/{reason}"] == sum(r == reason for r in drops.values())
    [entry] = json.loads((out / "report.json").read_text())["files"]
    assert (entry["format"], entry["read"], entry["kept"]) == (fmt, kept + len(drops), kept)


# ----------------------------------------------------------------------------- canonical records, hand-checked


def test_trl_strings_record_is_canonical_with_content_id(tmp_path, tiny_tokenizer_dir):
    prepare(tmp_path, tiny_tokenizer_dir, fixture("trl_pref_strings.jsonl"))
    first = records(tmp_path / "prepared", "pref")[0]
    content = {
        "prompt": [user("What is the capital of France?")],
        "chosen": [assistant("Paris.")],
        "rejected": [assistant("Lyon.")],
    }
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert first == {
        "id": hashlib.sha256(canonical.encode()).hexdigest()[:16],
        **content,
        "source": fixture("trl_pref_strings.jsonl") + ":1",
    }


def test_trl_messages_strip_repeated_prompt_and_empty_system(tmp_path, tiny_tokenizer_dir):
    prepare(tmp_path, tiny_tokenizer_dir, fixture("trl_pref_messages.jsonl"))
    got = by_line(records(tmp_path / "prepared", "pref"))
    assert got[2]["prompt"] == [system("You are terse."), user("Name a fruit.")]
    assert got[3] == {
        "prompt": [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke.")],
        "chosen": [assistant("Why did the chicken cross the road? To get to the other side.")],
        "rejected": [assistant("No.")],
    }
    assert got[4] == {  # chosen/rejected held the whole conversation
        "prompt": [user("What is the boiling point of water?")],
        "chosen": [assistant("100 C at sea level.")],
        "rejected": [assistant("50 C.")],
    }
    assert got[5]["prompt"] == [user("Pick a number.")]


def test_hh_transcripts_parse_into_turns(tmp_path, tiny_tokenizer_dir):
    prepare(tmp_path, tiny_tokenizer_dir, fixture("hh_rlhf.jsonl"))
    got = by_line(records(tmp_path / "prepared", "pref"))
    assert got[1] == {
        "prompt": [user("What is the capital of France?")],
        "chosen": [assistant("Paris.")],
        "rejected": [assistant("I don't know.")],
    }
    assert got[2] == {
        "prompt": [user("Can you help me bake bread?"), assistant("Sure, what kind?"), user("Sourdough.")],
        "chosen": [assistant("You need a starter, flour, water and salt.")],
        "rejected": [assistant("Buy some at the store.")],
    }


def test_hh_style_string_prompt_is_parsed(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "hh_prompt.jsonl"
    path.write_text(
        json.dumps({"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go."}) + "\n"
    )
    prepare(tmp_path, tiny_tokenizer_dir, str(path))
    [row] = records(tmp_path / "prepared", "pref")
    assert (row["prompt"], row["chosen"], row["rejected"]) == (
        [user("Hi")],
        [assistant("Hello!")],
        [assistant("Go.")],
    )


def test_ultrafeedback_ignores_extra_columns(tmp_path, tiny_tokenizer_dir):
    prepare(tmp_path, tiny_tokenizer_dir, fixture("ultrafeedback.parquet"))
    got = by_line(records(tmp_path / "prepared", "pref"))
    assert sorted(got) == [1, 2, 3, 4, 7]
    assert got[1] == {
        "prompt": [user("Explain photosynthesis in one sentence.")],
        "chosen": [assistant("Plants turn light, water and CO2 into sugar.")],
        "rejected": [assistant("Plant thing.")],
    }


def test_sft_messages(tmp_path, tiny_tokenizer_dir):
    prepare(tmp_path, tiny_tokenizer_dir, fixture("sft_messages.jsonl"))
    got = by_line(records(tmp_path / "prepared", "sft"))
    assert sorted(got) == [1, 2, 3, 4, 10]
    assert got[3]["messages"] == [user("Hi"), assistant("Hello!"), user("What's 3 times 3?"), assistant("9.")]
    assert got[4]["messages"] == [user("Name a planet."), assistant("Mars.")]  # empty system turn removed


def test_sft_csv_lines_quotes_and_json_cells(tmp_path, tiny_tokenizer_dir):
    prepare(tmp_path, tiny_tokenizer_dir, fixture("sft_prompt_completion.csv"))
    got = by_line(records(tmp_path / "prepared", "sft"))
    assert sorted(got) == [2, 3, 5, 7, 8]  # row 2 spans lines 3-4
    assert got[3]["messages"] == [
        user("Write two lines, with a comma."),
        assistant("First line, here.\nSecond line."),
    ]
    assert got[5]["messages"] == [user('Quote this: "hi"'), assistant('"hi"')]
    assert got[7]["messages"] == [user("Messages cell"), assistant("Decoded from JSON.")]


def test_kto_labels_and_json_list_lines(tmp_path, tiny_tokenizer_dir):
    prepare(tmp_path, tiny_tokenizer_dir, fixture("kto_unpaired.json"))
    rows = records(tmp_path / "prepared", "unpaired")
    assert [(int(r["source"].rsplit(":", 1)[1]), r["label"]) for r in rows] == [
        (2, True),
        (7, False),
        (12, True),
        (17, False),
        (22, True),
        (27, False),
        (42, True),
    ]
    assert by_line(rows)[42] == {
        "prompt": [user("Name a colour.")],
        "completion": [assistant("Blue.")],
        "label": True,
    }


@pytest.mark.parametrize("wrap", ["data", "lines"])
def test_json_data_object_and_json_lines(tmp_path, tiny_tokenizer_dir, wrap):
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."} for i in range(3)]
    path = tmp_path / "x.json"
    if wrap == "data":
        path.write_text(json.dumps({"meta": {"n": [1, 2]}, "data": rows}, indent=1))
        lines = [9, 14, 19]  # "{", meta (6 lines), "data": [, then 5 lines per record
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
        lines = [1, 2, 3]
    prepare(tmp_path, tiny_tokenizer_dir, str(path))
    assert sorted(by_line(records(tmp_path / "prepared", "pref"))) == lines


def test_directory_source_reads_every_supported_file_sorted(tmp_path, tiny_tokenizer_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("sft_messages.jsonl", "hh_rlhf.jsonl"):
        (raw / name).write_bytes((FIXTURES / name).read_bytes())
    (raw / "notes.txt").write_text("ignored")
    metrics = prepare(tmp_path, tiny_tokenizer_dir, str(raw))
    files = json.loads((tmp_path / "prepared" / "report.json").read_text())["files"]
    assert [Path(f["file"]).name for f in files] == ["hh_rlhf.jsonl", "sft_messages.jsonl"]
    assert metrics["files/total"] == 2 and metrics["kept/total"] == 10


def test_hub_dataset_name_goes_through_load_dataset(tmp_path, tiny_tokenizer_dir, monkeypatch):
    calls = []

    def load_dataset(name, split=None, revision=None):
        calls.append((name, split, revision))
        return [{"prompt": "Hub question?", "chosen": "Yes.", "rejected": "No."}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    prepare(tmp_path, tiny_tokenizer_dir, sources=[],
            hub_sources=[{"name": "org/prefs", "split": "train_prefs", "revision": "abc123"}])
    assert calls == [("org/prefs", "train_prefs", "abc123")]
    assert records(tmp_path / "prepared", "pref")[0]["source"] == "org/prefs[train_prefs]:1"
    [entry] = json.loads((tmp_path / "prepared" / "report.json").read_text())["files"]
    assert entry["hub"] == {"name": "org/prefs", "split": "train_prefs", "revision": "abc123", "fingerprint": None,
                            "rows": 1}
    # a hub name among the local sources: told where it goes (DVC cannot hash a hub dataset)
    with pytest.raises(DataError, match="org/prefs: not a local file or directory; a hub dataset goes under "
                                        "data.hub_sources"):
        prepare(tmp_path, tiny_tokenizer_dir, "org/prefs")


def test_dedupe_off_keeps_duplicates(tmp_path, tiny_tokenizer_dir):
    metrics = prepare(tmp_path, tiny_tokenizer_dir, fixture("trl_pref_strings.jsonl"), dedupe=False)
    assert metrics["dropped/duplicate"] == 0 and metrics["kept/total"] == 7


def test_duplicates_are_found_across_sources(tmp_path, tiny_tokenizer_dir):
    metrics = prepare(tmp_path, tiny_tokenizer_dir, fixture("hh_rlhf.jsonl"), fixture("hh_rlhf.jsonl"))
    assert metrics["dropped/duplicate"] == 5 and metrics["kept/total"] == 5


# ----------------------------------------------------------------------------- errors name file:line:field


def write(tmp_path, name: str, lines: list) -> str:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


PAIR = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}


def test_invalid_json_syntax_names_line(tmp_path, tiny_tokenizer_dir):
    path = fixture("broken_json.jsonl")
    with pytest.raises(DataError, match=f"^{path}:3: invalid JSON"):
        prepare(tmp_path, tiny_tokenizer_dir, path)


def test_missing_field_names_file_line_and_field(tmp_path, tiny_tokenizer_dir):
    path = fixture("bad_schema.jsonl")
    with pytest.raises(DataError) as e:
        prepare(tmp_path, tiny_tokenizer_dir, path)
    assert str(e.value).startswith(
        f"{path}:3: field 'chosen': missing (format 'preference' expects prompt/chosen/rejected"
    )


@pytest.mark.parametrize(
    "lines, kind, message",
    [
        ([{"question": "Q?", "answer": "A."}], "auto", ":1: record matches no known format"),
        (  # a typo'd field: the fix, not the 15 formats
            [{"prompt": "Q?", "choosen": "A.", "rejected": "B."}],
            "auto",
            ":1: field 'choosen': did you mean 'chosen'? (fields: choosen, prompt, rejected; format 'preference', "
            "TRL standard / conversational, expects prompt/chosen/rejected; rename it in the file or map it in "
            "params: data.sources[].columns: {chosen: choosen})",
        ),
        ([{"Messages": [{"role": "user", "content": "Q?"}]}], "sft", ":1: field 'Messages': did you mean 'messages'?"),
        ([{"prompt": "Q?", "completion": "A.", "lable": True}], "unpaired", ":1: field 'lable': did you mean 'label'?"),
        ([PAIR, [1, 2]], "auto", ":2: record is a list, expected an object"),
        (
            [{"prompt": "Q?", "completion": "A."}, {"prompt": "Q?", "completion": "A.", "label": True}],
            "auto",
            ":2: field 'label': unexpected, record looks like 'unpaired'",
        ),
        ([PAIR, {"prompt": "Q?", "chosen": "A."}], "auto", ":2: field 'rejected': missing"),
        (
            [PAIR],
            "sft",
            ":1: kind 'sft': record matches no sft format (fields: chosen, prompt, rejected); it looks like "
            "'preference' (preference data); the sft formats are: conversations (ShareGPT",
        ),
        (  # the error cites the schemas of the kind the user asked for, not another kind's
            [{"prompt": "Q?", "completion": "A."}],
            "preference",
            ":1: kind 'preference': record matches no preference format (fields: completion, prompt); it looks "
            "like 'sft_prompt_completion' (sft data); the preference formats are: "
            "input/preferred_output/non_preferred_output (OpenAI preference fine-tuning); ",
        ),
    ],
)
def test_schema_errors(tmp_path, tiny_tokenizer_dir, lines, kind, message):
    path = write(tmp_path, "x.jsonl", lines)
    with pytest.raises(DataError, match="^" + re.escape(path + message)):
        prepare(tmp_path, tiny_tokenizer_dir, path, kind=kind)


def test_file_level_errors(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        prepare(tmp_path, tiny_tokenizer_dir, str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported extension '.txt'"):
        prepare(tmp_path, tiny_tokenizer_dir, str(tmp_path / "x.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory holds no"):
        prepare(tmp_path, tiny_tokenizer_dir, str(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("prompt,completion\nQ?,A.\nQ?,A.,extra\n")
    with pytest.raises(DataError, match=r"x.csv:3: row has 3 cells, header has 2"):
        prepare(tmp_path, tiny_tokenizer_dir, str(tmp_path / "x.csv"))
    (tmp_path / "x.json").write_text('[{"prompt": "Q?"},\n{')
    with pytest.raises(DataError, match=r"x.json:2: invalid JSON"):
        prepare(tmp_path, tiny_tokenizer_dir, str(tmp_path / "x.json"))


def test_nothing_left_after_filtering_raises(tmp_path, tiny_tokenizer_dir):
    path = write(tmp_path, "x.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "A."}])
    with pytest.raises(
        DataError, match=r"no records left after filtering \(read 1; dropped: identical_pair=1\)"
    ):
        prepare(tmp_path, tiny_tokenizer_dir, path)


# ----------------------------------------------------------------------------- split


def prompt_of(prefix: str, row: dict) -> str:
    if prefix == "sft":
        first = next(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        return json.dumps(row["messages"][:first])
    return json.dumps(row["prompt"])


def opening_of(prefix: str, row: dict) -> str:
    """System turns + first user turn: what decides the side (multi-turn records follow their opening)."""
    turns = row["messages"] if prefix == "sft" else row["prompt"]
    first = next(i for i, m in enumerate(turns) if m["role"] == "user")
    return json.dumps(turns[: first + 1])


def split_sides(out_dir: Path, key=prompt_of) -> dict[str, set[str]]:
    """prompt -> the sides it appears on, over all kinds."""
    sides: dict[str, set[str]] = {}
    for prefix in ("sft", "pref", "unpaired"):
        for side in ("train", "eval"):
            for row in read_jsonl(out_dir / f"{prefix}_{side}.jsonl"):
                sides.setdefault(key(prefix, row), set()).add(side)
    return sides


def test_split_never_leaks_a_prompt_and_is_deterministic(tmp_path, tiny_tokenizer_dir):
    paths = [fixture(n) for n in FORMAT_FILES]
    metrics = prepare(tmp_path / "a", tiny_tokenizer_dir, *paths)
    prepare(tmp_path / "b", tiny_tokenizer_dir, *paths)
    out = tmp_path / "a" / "prepared"
    sides = split_sides(out)
    assert all(len(s) == 1 for s in sides.values())
    assert all(len(s) == 1 for s in split_sides(out, opening_of).values())
    # the France prompt has SFT, preference (TRL and HH) and unpaired records: all on one side
    assert len(sides[json.dumps([user("What is the capital of France?")])]) == 1
    for kind in ("sft", "preference", "unpaired"):
        assert metrics[f"{kind}/eval"] >= 1 and metrics[f"{kind}/train"] >= 1
    for name in [*OUTPUTS, "report.json"]:
        assert (out / name).read_bytes() == (tmp_path / "b" / "prepared" / name).read_bytes()
    other = prepare(tmp_path / "c", tiny_tokenizer_dir, *paths, seed=1)
    assert split_sides(tmp_path / "c" / "prepared") != sides
    assert other["kept/total"] == metrics["kept/total"]


def test_split_share_follows_eval_fraction(tmp_path, tiny_tokenizer_dir):
    path = write(tmp_path, "many.jsonl", [{"prompt": f"Q{i}?", "completion": "A."} for i in range(800)])
    metrics = prepare(tmp_path, tiny_tokenizer_dir, path, eval_fraction=0.1)
    assert 0.07 < metrics["sft/eval"] / 800 < 0.13
    assert metrics["prompts/eval"] == metrics["sft/eval"]


@pytest.mark.parametrize("eval_fraction", [0.01, 0.99])
def test_two_prompts_always_give_one_train_and_one_eval_prompt(tmp_path, tiny_tokenizer_dir, eval_fraction):
    path = write(tmp_path, "two.jsonl", [{**PAIR, "prompt": "One?"}, {**PAIR, "prompt": "Two?"}])
    for seed in range(3):
        metrics = prepare(tmp_path, tiny_tokenizer_dir, path, eval_fraction=eval_fraction, seed=seed)
        assert (metrics["preference/train"], metrics["preference/eval"]) == (1, 1)
    metrics = prepare(tmp_path, tiny_tokenizer_dir, write(tmp_path, "one.jsonl", [PAIR]), eval_fraction=0.99)
    assert (metrics["preference/train"], metrics["preference/eval"]) == (1, 0)


# ----------------------------------------------------------------------------- outputs


def snapshot(tmp_path) -> dict[str, bytes]:
    root = tmp_path / "prepared"
    files = sorted(f for f in root.rglob("*") if f.is_file())
    return {**{str(f.relative_to(root)): f.read_bytes() for f in files},
            "prepare.json": (tmp_path / "metrics" / "prepare.json").read_bytes()}


def test_failed_run_leaves_previous_outputs_intact(tmp_path, tiny_tokenizer_dir, monkeypatch):
    prepare(tmp_path, tiny_tokenizer_dir, fixture("hh_rlhf.jsonl"))
    before = snapshot(tmp_path)
    assert set(before) == {*OUTPUTS, "report.json", "prepare.json", "tokens/meta.json",
                           *(f"tokens/{name}.parquet" for name in ("sft_train", "sft_eval", "pref_train", "pref_eval"))}
    with pytest.raises(DataError):
        prepare(tmp_path, tiny_tokenizer_dir, fixture("sft_messages.jsonl"), fixture("broken_json.jsonl"))
    assert snapshot(tmp_path) == before

    calls = []

    def failing_open(path):  # dies half-way through writing the new outputs
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return open(path, "w", encoding="utf-8")

    monkeypatch.setattr(prepare_stage, "_open_output", failing_open)
    with pytest.raises(OSError, match="disk full"):
        prepare(tmp_path, tiny_tokenizer_dir, fixture("sft_messages.jsonl"))
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "prepared"]  # no temp dirs left
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["prepare.json"]


def test_report_and_metrics_add_up(tmp_path, tiny_tokenizer_dir):
    metrics = prepare(tmp_path, tiny_tokenizer_dir, *[fixture(n) for n in FORMAT_FILES])
    assert metrics == json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert all(isinstance(v, int) for v in metrics.values())
    assert all(f"dropped/{r}" in metrics for r in REASONS)
    report = json.loads((tmp_path / "prepared" / "report.json").read_text())
    for entry in report["files"]:
        assert entry["read"] == entry["kept"] + sum(entry["dropped"].values())
    assert metrics["read/total"] == sum(e["read"] for e in report["files"]) == 67
    assert metrics["kept/total"] == sum(case[2] for case in CASES.values()) == 40
    assert metrics["read/total"] == metrics["kept/total"] + metrics["dropped/total"]
    assert metrics["dropped/total"] == sum(metrics[f"dropped/{r}"] for r in REASONS)
    splits = sum(metrics[f"{k}/{s}"] for k in ("sft", "preference", "unpaired") for s in ("train", "eval"))
    assert splits == metrics["kept/total"] == sum(len(read_jsonl(tmp_path / "prepared" / n)) for n in OUTPUTS)
    assert metrics["prompts/train"] + metrics["prompts/eval"] == len(
        split_sides(tmp_path / "prepared", opening_of)
    )


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(tmp_path, tiny_tokenizer_dir, monkeypatch):
    from components.core.ops import io

    monkeypatch.setattr(io, "resolve_model_path", lambda path: tiny_tokenizer_dir)
    monkeypatch.chdir(tmp_path)

    def call(source: str) -> int:
        Path("params.yaml").write_text(
            f"data:\n  sources: [{{path: {source}}}]\n  max_length: {MAX_LENGTH}\n  max_prompt_length: {MAX_PROMPT_LENGTH}\n"
        )
        return prepare_stage.main(["--params", "params.yaml"])

    return call


def test_cli_writes_outputs(cli, tmp_path):
    assert cli(fixture("hh_rlhf.jsonl")) == 0
    assert json.loads((tmp_path / "metrics" / "prepare.json").read_text())["kept/total"] == 5
    assert {p.name for p in (tmp_path / "data" / "prepared").iterdir()} == {*OUTPUTS, "report.json", "tokens"}


def test_cli_data_error_is_one_line_and_marked_not_worth_retrying(cli, capsys):
    from components.core.ops.logs import INPUT_ERROR_MARK

    with pytest.raises(SystemExit) as e:
        cli(fixture("broken_json.jsonl"))
    assert e.value.code == 2
    first, mark = capsys.readouterr().err.strip().splitlines()
    assert first.startswith("prepare: error: ") and "broken_json.jsonl:3: invalid JSON" in first
    assert mark.startswith(INPUT_ERROR_MARK)  # the flow does not retry it (tests/integration/test_flow.py)


def test_a_format_error_still_writes_the_report_with_the_files_read(tmp_path, tiny_tokenizer_dir):
    good = write(tmp_path, "good.jsonl", [PAIR])
    bad = write(tmp_path, "bad.jsonl", [{"question": "Q?", "answer": "A."}])
    report = tmp_path / "reports" / "prepare.json"
    report.parent.mkdir()
    report.write_text('{"stale": "the previous run"}')
    cfg = DataConfig(sources=[SourceConfig(path=good), SourceConfig(path=bad)])
    with pytest.raises(DataError, match="record matches no known format"):
        prepare_stage.run(cfg, tokenizer_path=tiny_tokenizer_dir, out_dir=str(tmp_path / "out"),
                  metrics_path=str(tmp_path / "m.json"), report_path=str(report))
    written = json.loads(report.read_text())
    assert "record matches no known format" in written["error"]
    assert [f["file"] for f in written["files"]] == [good, bad] and written["files"][0]["kept"] == 1


def test_what_the_kept_data_means_is_said_before_the_stages_run(tmp_path):
    metrics = {"sft/train": 0, "preference/train": 30, "unpaired/train": 0}
    assert prepare_stage.data_warnings(metrics, 1, 50) == [
        "no SFT records kept: sft has nothing to train on (add SFT data to data.sources)",
        "evaluate will score 1 held-out prompts < register.gate.min_prompts 50: alignflow promote will refuse every "
        "version (add preference data, raise data.eval_fraction, or lower the gate's min_prompts)"]
    assert prepare_stage.data_warnings({"sft/train": 5, "preference/train": 5}, 50, 50) == []
    (tmp_path / "pref_eval.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": c}]}) + "\n"
                                                      for c in "aab"))
    assert prepare_stage.held_out_prompts(str(tmp_path / "pref_eval.jsonl"), 0) == 2  # distinct prompts
    assert prepare_stage.held_out_prompts(str(tmp_path / "pref_eval.jsonl"), 1) == 1  # evaluate.num_prompts caps it
    fingerprints = tmp_path / "fp"
    fingerprints.mkdir()
    for name in ("src0.json", "src1.json", "src2.json"):
        (fingerprints / name).write_text("{}")
    assert prepare_stage.stale_fingerprints(str(fingerprints), 2) == [fingerprints / "src2.json"]


def test_any_number_of_workers_writes_the_same_bytes(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Records cross to the workers in batches of 2 here, so a file spans many batches and a duplicate is found
    across them; every output, the report and the metrics are the same bytes for 1, 2 and 3 processes, and a
    run that stops on a broken file says the same, with the same files read."""
    monkeypatch.setattr(prepare_stage, "BATCH", 2)
    sources = [fixture(name) for name in CASES]
    outputs, failures = {}, {}
    for workers in (1, 2, 3):
        root = tmp_path / f"workers{workers}"
        prepare(root, tiny_tokenizer_dir, *sources, num_proc=workers)
        outputs[workers] = snapshot(root)
        failed = root / "failed.json"
        with pytest.raises(DataError, match="broken_json.jsonl:3"):
            prepare(root, tiny_tokenizer_dir, *sources, fixture("broken_json.jsonl"), num_proc=workers,
                    report_path=str(failed))
        failures[workers] = failed.read_bytes()
        assert snapshot(root) == outputs[workers]  # the failed run left the outputs as they were
    assert outputs[1] == outputs[2] == outputs[3]
    assert failures[1] == failures[2] == failures[3]
    assert json.loads(failures[1])["files"][-1]["read"] == 2  # broken_json.jsonl: 2 records before line 3


def test_a_parquet_source_is_read_in_batches_with_its_row_numbers(tmp_path, tiny_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}." if i != 2500 else f"Yes {i}."}
            for i in range(3000)]
    path = tmp_path / "many.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)  # 5 row groups, > 2 read batches
    prepare(tmp_path, tiny_tokenizer_dir, str(path))
    report = json.loads((tmp_path / "prepared" / "report.json").read_text())["files"][0]
    assert (report["read"], report["kept"]) == (3000, 2999)
    assert report["dropped_examples"]["identical_pair"][0].startswith(f"{path}:2501: ")
