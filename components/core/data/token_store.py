"""Tokenised records: the artifact every training and scoring stage reads, written once by prepare.

    data/prepared/tokens/{sft,pref}_{train,eval}.parquet   one row per record of the .jsonl beside it
    data/prepared/tokens/meta.json                          the tokenizer fingerprint, lengths, row counts

Each parquet file also carries the format and the tokenizer fingerprint in its schema metadata: that is what a
stage checks, so it depends on its own files only (meta.json is for people).

prepare tokenises each record once, when it checks its lengths (`encode`), and writes the ids it checked.
sft, reference, dpo, reward_model and evaluate load these ids (`load_pairs`, `load_sft`) instead of templating
and tokenising the records again, on every process (evaluate still renders its held-out prompts to sample
from them; the online stages render theirs).

Rows: sft `input_ids` + `assistant_mask` (the tokens trained on); preference `prompt_ids`, `chosen_ids`,
`rejected_ids` (the prompt shared by both responses, each response its assistant turn(s) as the template
renders them, as `tokens.encode_prompt_response`) and `margin` when the record has one. Each row carries `token_hash`, the
identity of its exact tokens, which the cached reference log-probs are keyed by (with the record id).

`fingerprint(tokenizer)` hashes what decides the ids: the tokenizer's vocabulary, merges, normalisation and
added tokens, the chat template and the special tokens it may name. A stage whose model carries another
tokenizer or template than the one the records were tokenised with stops and says to re-run prepare.
Stages cut the stored ids to their own data.max_length / max_prompt_length as TRL does (`tokens.truncate_pair`),
so a lowered limit takes effect (and is caught by the reference's token hashes) before prepare runs again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from components.core.data.tokens import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    encode_chat,
    pair_token_hash,
    split_response,
    truncate_pair,
)

FORMAT = 2  # 2: a pair's response starts after its prompt's own assistant turns (multi-turn prompts)
DIRNAME = "tokens"
META = "meta.json"
SPLITS = ("sft_train", "sft_eval", "pref_train", "pref_eval")


class TokenizedError(ValueError):
    """The tokenised records are missing or belong to another tokenizer: re-run prepare."""


# Encoded by `fingerprint`: a conversation that exercises what Python-side tokenizer settings change (case,
# unicode normalisation, special-token text inside content, spaces, digits), so settings the serialised
# tokenizer does not hold (slow tokenizers, split_special_tokens, ...) still change the fingerprint.
_PROBE = [{"role": "system", "content": "You are Ünïcödé-safe. <|im_end|> </s> <s> [INST]"},
          {"role": "user", "content": "Sort  3 1 2\tand SAY ÇA: café, naïve, 日本語, 12345."},
          {"role": "assistant", "content": " 1 2 3\n\nDone!"}]


def fingerprint(tokenizer) -> str:
    """sha256 (16 hex digits) of everything that decides a record's token ids: the tokenizer (its tokenizer.json
    without padding/truncation settings, or its class and vocabulary for a slow tokenizer), the chat template,
    the special tokens a template may name, and the ids of a probe conversation. Unchanged by save_pretrained /
    from_pretrained and by setting a pad token (tested on the embedded tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items()), "class": type(tokenizer).__name__}
    template = tokenizer.chat_template or CHATML_TEMPLATE
    special = {k: v for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if k != "pad_token"}
    probe = encode_chat(tokenizer, _PROBE)
    blob = json.dumps({"tokenizer": spec, "chat_template": template, "special": special, "probe": probe},
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_token_hash(input_ids: Sequence[int], assistant_mask: Sequence[bool]) -> str:
    blob = ",".join(map(str, input_ids)) + "|" + "".join("1" if m else "0" for m in assistant_mask)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- writing (prepare)


def encode(tokenizer, conversations: Sequence[Sequence[dict]], tools: list[dict] | None = None,
           prompt_turns: int = 0) -> list[tuple[list[int], list[bool]]]:
    """(ids, trained mask) of each conversation of a record (`formats.conversations`): what prepare checks the
    lengths of and what `row` stores. `prompt_turns`: the turns of a pair's prompt (its assistant turns are
    prompt, not response; 0 for SFT, where every assistant turn is trained). The conversations share their
    prompt's render and ids."""
    cache: dict = {}
    return [encode_chat(tokenizer, list(m), tools, cache, train_from=prompt_turns) for m in conversations]


def row(kind: str, record_id: str, encoded: list[tuple[list[int], list[bool]]], content: dict) -> dict | None:
    """The tokens row of one kept record (None for kinds no stage reads as tokens). Ids are int32 arrays: they
    cross from prepare's workers and wait in its spill file and row-group buffers, and a Python int list costs
    ~9x more."""
    import numpy as np

    def ids(x):
        return np.asarray(x, dtype=np.int32)

    if kind == "sft":
        [(input_ids, mask)] = encoded
        return {"id": record_id, "input_ids": ids(input_ids), "assistant_mask": np.asarray(mask, dtype=bool),
                "token_hash": sft_token_hash(input_ids, mask)}
    if kind == "preference":
        (prompt, chosen), (_, rejected) = (split_response(*e) for e in encoded)
        pair = {"id": record_id, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        return {"id": record_id, "prompt_ids": ids(prompt), "chosen_ids": ids(chosen), "rejected_ids": ids(rejected),
                "token_hash": pair_token_hash(pair),
                "margin": float(content["margin"]) if content.get("margin") is not None else None}
    return None


def _schema(kind: str):
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    if kind == "sft":
        return pa.schema([("id", pa.string()), ("input_ids", ids), ("assistant_mask", pa.list_(pa.bool_())),
                          ("token_hash", pa.string())])
    return pa.schema([("id", pa.string()), ("prompt_ids", ids), ("chosen_ids", ids), ("rejected_ids", ids),
                      ("token_hash", pa.string()), ("margin", pa.float64())])


ROW_GROUP_ROWS, ROW_GROUP_TOKENS = 16384, 4_000_000  # a row group is cut at whichever comes first


class TokenWriter:
    """Writes `<out_dir>/tokens/` row by row (inside a directory being written atomically, e.g. prepare's): the
    rows of a split are buffered up to a row group (ROW_GROUP_ROWS rows or ROW_GROUP_TOKENS ids), so memory is
    flat in the number of records. The row groups depend on the rows only, never on how they arrived."""

    def __init__(self, out_dir: Path, tokenizer, tokenizer_path: str, max_length: int, max_prompt_length: int):
        import pyarrow.parquet as pq

        self._target = Path(out_dir) / DIRNAME
        self._target.mkdir(parents=True, exist_ok=True)
        self._fp = fingerprint(tokenizer)
        # each file carries what its reader checks (format, tokenizer), so a stage depends on its own files only
        identity = {"alignflow.format": str(FORMAT), "alignflow.tokenizer": self._fp,
                    "alignflow.tokenizer_path": str(tokenizer_path)}
        self._schemas = {name: _schema(name.split("_")[0]).with_metadata(identity) for name in SPLITS}
        self._writers = {name: pq.ParquetWriter(self._target / f"{name}.parquet", self._schemas[name],
                                                compression="zstd") for name in SPLITS}
        self._buffers: dict[str, list[dict]] = {name: [] for name in SPLITS}
        self._buffered_tokens = dict.fromkeys(SPLITS, 0)
        self._flushed = dict.fromkeys(SPLITS, False)
        self.rows, self.tokens = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
        self._meta = {"max_length": max_length, "max_prompt_length": max_prompt_length,
                      "tokenizer_path": str(tokenizer_path)}

    def add(self, split: str, token_row: dict) -> None:
        n = sum(len(token_row[k]) for k in token_row if k.endswith("_ids"))
        self._buffers[split].append(token_row)
        self.rows[split] += 1
        self.tokens[split] += n
        self._buffered_tokens[split] += n
        if len(self._buffers[split]) >= ROW_GROUP_ROWS or self._buffered_tokens[split] >= ROW_GROUP_TOKENS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        import pyarrow as pa

        rows = self._buffers[split]
        if rows or not self._flushed[split]:  # an empty split is written as one empty table, as write_table does
            self._writers[split].write_table(pa.Table.from_pylist(rows, schema=self._schemas[split]))
        self._buffers[split], self._buffered_tokens[split], self._flushed[split] = [], 0, True

    def close(self) -> dict:
        """Flush, close, write meta.json. Returns the meta written."""
        for name in SPLITS:
            if self._buffers[name] or not self._flushed[name]:
                self._flush(name)
            self._writers[name].close()
        meta = {"format": FORMAT, "tokenizer": self._fp, "tokenizer_path": self._meta["tokenizer_path"],
                "max_length": self._meta["max_length"], "max_prompt_length": self._meta["max_prompt_length"],
                "rows": dict(self.rows), "tokens": {name: int(self.tokens[name]) for name in SPLITS}}
        (self._target / META).write_text(json.dumps(meta, indent=2) + "\n")
        return meta


def write(out_dir: Path, rows: dict[str, list[dict]], tokenizer, tokenizer_path: str, max_length: int,
          max_prompt_length: int) -> dict:
    """Write `<out_dir>/tokens/` from rows held in memory: split name (SPLITS) -> rows in the order of that split's
    .jsonl. Returns the meta written."""
    writer = TokenWriter(out_dir, tokenizer, tokenizer_path, max_length, max_prompt_length)
    for name in SPLITS:
        for token_row in rows.get(name, []):
            writer.add(name, token_row)
    return writer.close()


def write_for(data_dir: str | Path, tokenizer, max_length: int = 10**9, max_prompt_length: int = 10**9) -> dict:
    """Tokenise prepared-format .jsonl files already in data_dir (canonical records, e.g. written by hand for a
    test or a benchmark) into data_dir/tokens, as prepare would have (without its checks and drops, but a pair
    whose prompt tokenises differently before its two responses is refused). Missing splits are written empty."""
    from components.core.ops.io import read_jsonl

    data_dir = Path(data_dir)
    rows: dict[str, list[dict]] = {}
    for name in SPLITS:
        path = data_dir / f"{name}.jsonl"
        rows[name] = []
        for r in read_jsonl(path) if path.exists() else []:
            if name.startswith("sft"):
                rows[name].append(row("sft", str(r["id"]), encode(tokenizer, [r["messages"]], r.get("tools")), r))
                continue
            convs = [r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]]
            encoded = encode(tokenizer, convs, r.get("tools"), prompt_turns=len(r["prompt"]))
            if len({tuple(split_response(*e)[0]) for e in encoded}) > 1:
                raise ValueError(f"{path}: record {r['id']}: the chat template renders the prompt into other "
                                 "tokens before the rejected response than before the chosen one")
            rows[name].append(row("preference", str(r["id"]), encoded, r))
    return write(data_dir, rows, tokenizer, getattr(tokenizer, "name_or_path", ""), max_length, max_prompt_length)


# ----------------------------------------------------------------------------- reading (the stages)


def tokens_path(jsonl_path: str | Path) -> Path:
    """data/prepared/pref_train.jsonl -> data/prepared/tokens/pref_train.parquet"""
    p = Path(jsonl_path)
    return p.parent / DIRNAME / f"{p.stem}.parquet"


def _read(jsonl_path: str | Path, tokenizer) -> list[dict]:
    import pyarrow.parquet as pq

    path = tokens_path(jsonl_path)
    if not path.exists():
        raise TokenizedError(f"{path}: no tokenised records for {jsonl_path}; prepare writes them "
                             "(dvc repro prepare)")
    # ParquetFile, not read_table: read_table goes through pyarrow.dataset, whose libraries cost ~45 MB of
    # resident memory in every stage process for nothing here
    parquet = pq.ParquetFile(path)
    meta = {k.decode(): v.decode() for k, v in (parquet.schema_arrow.metadata or {}).items()}
    if meta.get("alignflow.format") != str(FORMAT):
        raise TokenizedError(f"{path}: tokenised records of format {meta.get('alignflow.format')}, this code reads "
                             f"format {FORMAT}: re-run prepare (dvc repro prepare)")
    mine = fingerprint(tokenizer)
    if meta.get("alignflow.tokenizer") != mine:
        raise TokenizedError(
            f"{path}: the records were tokenised with another tokenizer or chat template (fingerprint "
            f"{meta.get('alignflow.tokenizer')}, from {meta.get('alignflow.tokenizer_path')}) than this model's "
            f"({mine}, {getattr(tokenizer, 'name_or_path', '?')}): re-run prepare with this model's tokenizer "
            "(dvc repro prepare; `dvc repro -f prepare` if DVC finds it up to date)")
    return parquet.read().to_pylist()


def load_pairs(jsonl_path: str | Path, tokenizer, max_length: int, max_prompt_length: int) -> list[dict]:
    """The preference pairs of a prepared split as the stages score them: {id, prompt_ids, chosen_ids,
    rejected_ids[, margin]}, cut to max_length / max_prompt_length (`tokens.truncate_pair`)."""
    out = []
    for r in _read(jsonl_path, tokenizer):
        pair = truncate_pair({k: r[k] for k in ("id", "prompt_ids", "chosen_ids", "rejected_ids")}, max_length,
                             max_prompt_length)
        if r.get("margin") is not None:
            pair["margin"] = r["margin"]
        out.append(pair)
    return out


def load_sft(jsonl_path: str | Path, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per SFT record, cut to max_length; labels are IGNORE_INDEX outside assistant turns."""
    out = []
    for r in _read(jsonl_path, tokenizer):
        ids, mask = r["input_ids"][:max_length], r["assistant_mask"][:max_length]
        out.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]))
    return out


def stored_prompt_ids(jsonl_path: str | Path, tokenizer) -> dict[str, list[int]]:
    """Record id -> the prompt ids prepare stored for a preference split (uncut): what serving must reproduce."""
    return {str(r["id"]): list(r["prompt_ids"]) for r in _read(jsonl_path, tokenizer)}
