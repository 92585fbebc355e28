"""The tokenised-records artifact (core/token_store.py): prepare writes, once, the ids the stages train on; they equal
the text path's tokenisation, carry their token hash, follow the stage's length limits, and a model whose
tokenizer or chat template differs from the one they were made with is refused, naming the stage to re-run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from components import prepare as prepare_stage
from components.core.config import DataConfig, Runtime
from components.core.data import token_store
from components.core.data.formats import conversations
from components.core.data.tokens import IGNORE_INDEX, encode_chat, pair_token_hash, tokenize_pair
from components.core.ops.io import read_jsonl

FIXTURES = Path(__file__).parents[2] / "data"


@pytest.fixture()
def prepared(tmp_path, tiny_tokenizer_dir) -> Path:
    """prepare on a TRL preference file (with a `margin` on one record) and a messages SFT file."""
    pref = [json.loads(line) for line in (FIXTURES / "trl_pref_messages.jsonl").read_text().splitlines()]
    pref[0]["margin"] = 2.5
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    cfg = DataConfig(sources=[{"path": str(tmp_path / "pref.jsonl")}, {"path": str(FIXTURES / "sft_messages.jsonl")}],
                     eval_fraction=0.25, max_length=256, max_prompt_length=128, dedupe=True, min_kept_fraction=0.0)
    prepare_stage.run(cfg, tokenizer_path=tiny_tokenizer_dir, out_dir=str(tmp_path / "prepared"),
                      metrics_path=str(tmp_path / "m.json"), runtime=Runtime(seed=0))
    return tmp_path / "prepared"


def _labels(ids, mask):
    return [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def test_prepare_writes_the_ids_the_text_path_gives(prepared, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    meta = json.loads((prepared / "tokens/meta.json").read_text())
    assert meta["tokenizer"] == token_store.fingerprint(tok) and meta["format"] == token_store.FORMAT
    n_pairs = 0
    for split in ("train", "eval"):
        records = read_jsonl(prepared / f"pref_{split}.jsonl")
        pairs = token_store.load_pairs(prepared / f"pref_{split}.jsonl", tok, 256, 128)
        assert [p["id"] for p in pairs] == [r["id"] for r in records]
        for pair, record in zip(pairs, records, strict=True):
            assert {k: pair[k] for k in ("id", "prompt_ids", "chosen_ids", "rejected_ids")} == \
                tokenize_pair(tok, record, 256, 128)
            assert pair.get("margin") == record.get("margin")
        rows = pq.read_table(prepared / f"tokens/pref_{split}.parquet").to_pylist()
        assert [r["token_hash"] for r in rows] == [pair_token_hash(p) for p in pairs]
        n_pairs += len(pairs)
        sft_records = read_jsonl(prepared / f"sft_{split}.jsonl")
        expected = [_labels(*encode_chat(tok, r["messages"])) for r in sft_records]
        assert [labels for _, labels in token_store.load_sft(prepared / f"sft_{split}.jsonl", tok, 256)] == expected
        assert meta["rows"][f"sft_{split}"] == len(sft_records)
    assert n_pairs == meta["rows"]["pref_train"] + meta["rows"]["pref_eval"] > 0
    assert any(p.get("margin") == 2.5 for s in ("train", "eval")
               for p in token_store.load_pairs(prepared / f"pref_{s}.jsonl", tok, 256, 128))


def test_stage_limits_cut_the_stored_ids_as_trl_does(prepared, tiny_tokenizer_dir):
    """data.max_length lowered after prepare ran: the stage cuts the stored ids exactly as the text path would,
    so their token hashes change and a reference computed before is refused (test_training)."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    records = read_jsonl(prepared / "pref_train.jsonl")
    cut = token_store.load_pairs(prepared / "pref_train.jsonl", tok, 12, 8)
    assert [{k: p[k] for k in ("id", "prompt_ids", "chosen_ids", "rejected_ids")} for p in cut] == \
        [tokenize_pair(tok, r, 12, 8) for r in records]
    assert all(len(p["prompt_ids"]) <= 8 and len(p["prompt_ids"]) + len(p["chosen_ids"]) <= 12 for p in cut)
    sft = token_store.load_sft(prepared / "sft_train.jsonl", tok, 10)
    assert sft and all(len(ids) <= 10 and len(labels) == len(ids) for ids, labels in sft)


def test_fingerprint_survives_a_save_and_load_and_sees_a_template_change(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.save_pretrained(tmp_path / "copy")
    copy = AutoTokenizer.from_pretrained(tmp_path / "copy")
    copy.pad_token = copy.eos_token  # padding never changes an id
    assert token_store.fingerprint(copy) == token_store.fingerprint(tok)
    copy.chat_template = tok.chat_template.replace("<|im_end|>", "<|im_end|> ")
    assert copy.chat_template != tok.chat_template
    assert token_store.fingerprint(copy) != token_store.fingerprint(tok)
    copy.chat_template = tok.chat_template
    copy.add_tokens(["<extra>"])
    assert token_store.fingerprint(copy) != token_store.fingerprint(tok)


def test_a_model_with_another_template_is_refused_naming_prepare(prepared, tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(token_store.TokenizedError, match=r"another tokenizer or chat template.*dvc repro prepare"):
        token_store.load_pairs(prepared / "pref_train.jsonl", tok, 256, 128)
    with pytest.raises(token_store.TokenizedError, match=r"tokens/sft_train.parquet: .*dvc repro -f prepare"):
        token_store.load_sft(prepared / "sft_train.jsonl", tok, 256)


def test_missing_tokens_are_refused_naming_the_file(prepared, tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(prepared / "pref_train.jsonl", bare / "pref_train.jsonl")
    with pytest.raises(token_store.TokenizedError, match=r"bare/tokens/pref_train.parquet.*dvc repro prepare"):
        token_store.load_pairs(bare / "pref_train.jsonl", tok, 256, 128)
    # hand-made prepared-format records (a test, a benchmark) get the same ids prepare would write
    token_store.write_for(bare, tok)
    assert token_store.load_pairs(bare / "pref_train.jsonl", tok, 256, 128) == \
        token_store.load_pairs(prepared / "pref_train.jsonl", tok, 256, 128)
    assert token_store.load_sft(bare / "sft_train.jsonl", tok, 256) == []  # a split without records: empty


def test_rows_follow_the_record_conversations(tiny_tokenizer_dir):
    """A preference row's prompt is the one both responses share; each response is its assistant turn as the
    template renders it (ChatML: through "<|im_end|>\\n"), as the text path's encode_prompt_response."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    record = {"prompt": [{"role": "user", "content": "Sort 3 1 2"}],
              "chosen": [{"role": "assistant", "content": "1 2 3"}],
              "rejected": [{"role": "assistant", "content": "2 1 3"}]}
    row = token_store.row("preference", "r1", token_store.encode(tok, conversations("preference", record)), record)
    assert {"id": row["id"], **{k: row[k].tolist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")}} == \
        tokenize_pair(tok, {"id": "r1", **record}, 10**6, 10**6)
    assert tok.decode(row["chosen_ids"].tolist()) == "1 2 3<|im_end|>\n" and row["margin"] is None
    assert token_store.row("unpaired", "u", [], {}) is None


def test_a_multi_turn_prompt_keeps_its_assistant_turns(tiny_tokenizer_dir, tmp_path):
    """HH-RLHF-style pairs: the prompt holds earlier assistant turns. They are prompt (shared, never scored);
    the response is only the final assistant turn, in prepare's artifact and in the text path alike."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    prompt = [{"role": "user", "content": "Bake bread?"}, {"role": "assistant", "content": "Sure, what kind?"},
              {"role": "user", "content": "Rye."}]
    record = {"id": "hh1", "prompt": prompt, "chosen": [{"role": "assistant", "content": "Mix rye flour."}],
              "rejected": [{"role": "assistant", "content": "No."}]}
    (tmp_path / "pref_train.jsonl").write_text(json.dumps(record) + "\n")
    token_store.write_for(tmp_path, tok)
    [pair] = token_store.load_pairs(tmp_path / "pref_train.jsonl", tok, 10**6, 10**6)
    assert "Sure, what kind?" in tok.decode(pair["prompt_ids"]) and "Rye." in tok.decode(pair["prompt_ids"])
    assert tok.decode(pair["chosen_ids"]) == "Mix rye flour.<|im_end|>\n"
    assert tok.decode(pair["rejected_ids"]) == "No.<|im_end|>\n"
    assert {k: pair[k] for k in ("id", "prompt_ids", "chosen_ids", "rejected_ids")} == \
        tokenize_pair(tok, record, 10**6, 10**6)
    # in SFT every assistant turn is trained
    ids, mask = encode_chat(tok, prompt + record["chosen"])
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "Sure, what kind?" in trained and "Mix rye flour." in trained
