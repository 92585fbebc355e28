"""Prepare: read raw sources, validate, normalise to canonical chat records, dedupe, split by prompt.

    python -m components.data --params params.yaml

Reads `data.sources` (local .jsonl/.json/.parquet/.csv files, directories of them, or hub dataset names
like `HuggingFaceH4/ultrafeedback_binarized`), writes `data/prepared/{sft,pref,unpaired}_{train,eval}.jsonl`
plus `report.json` (per file: format, read, kept, dropped per reason, where), and `metrics/prepare.json`.

Formats (detected per file from the first record's keys, or forced with `kind`):
    preference             prompt/chosen/rejected; strings or message lists. chosen/rejected may repeat the
                           prompt turns first (UltraFeedback-binarized); they are stripped. A string prompt
                           that is an HH transcript ("\\n\\nHuman: ...\\n\\nAssistant:") is parsed into turns.
    preference_implicit    chosen/rejected only, each a whole conversation (HH-RLHF transcript strings or
                           message lists); prompt = their shared turns up to the last shared user turn.
    sft_messages           messages (must hold an assistant turn)
    sft_prompt_completion  prompt/completion (strings or message lists)
    unpaired               prompt/completion/label (KTO); label bool, 0/1 or "true"/"false"
Other keys (prompt_id, score_chosen, messages next to chosen/rejected, ...) are ignored. Roles are
system/user/assistant; a string prompt becomes one user turn, a string response one assistant turn.

The file is broken -> DataError, the run stops, nothing is written. The message is one line,
`file:line: field 'x': problem`:
    missing file or empty directory, unsupported extension, invalid JSON syntax, undecodable .json file,
    a CSV row with the wrong number of cells, a record that is not an object, a first record matching no
    format, a later record missing a field of the file's schema or looking like another schema (one file
    holds one schema), `kind` disagreeing with the records, and nothing left after filtering.
One record is bad -> it is dropped and counted under the first reason found (metrics `dropped/<reason>`,
report.json keeps the first few locations per reason):
    bad_utf8        undecodable bytes in a .jsonl line (or a .csv/.json string), or lone surrogates
    wrong_type      a field of the wrong type (chosen: 42), a role outside system/user/assistant, no
                    assistant turn, a response holding user turns, a prompt not ending with a user turn
                    (preference/unpaired), a label that is not a boolean, HH text that is not a transcript
    empty_field     null, empty list, or empty/whitespace content (empty *system* turns are removed instead)
    identical_pair  chosen == rejected
    duplicate       same content as an already kept record (dedupe=true; across all sources)
    prompt_too_long prompt tokens > max_prompt_length (SFT: the turns before the first assistant turn)
    too_long        prompt+response tokens > max_length (both chosen and rejected are checked)
Token counts come from `batching.encode_chat`, i.e. the exact template the trainers use.

Split: a record's side is decided by its conversation opening (system turns + first user turn), hashed
with the seed: eval when hash/2^64 < eval_fraction. So a prompt's SFT, preference and unpaired records
land on the same side, multi-turn records continuing an eval conversation never land in train, and adding
data never moves an existing prompt across. Each kind gets at least one train opening, and at least one
eval opening when it has >= 2. Line numbers are physical lines (jsonl, json, csv) or 1-based rows (parquet, hub).
"""

from __future__ import annotations

import argparse
import codecs
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from components.batching import encode_chat

log = logging.getLogger(__name__)

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
REASONS = (
    "bad_utf8",
    "wrong_type",
    "empty_field",
    "identical_pair",
    "duplicate",
    "prompt_too_long",
    "too_long",
)
ROLES = ("system", "user", "assistant")
KINDS = ("sft", "preference", "unpaired")
OUTPUT_PREFIX = {"sft": "sft", "preference": "pref", "unpaired": "unpaired"}

# schema -> (kind, required fields, in the order they are named in messages)
SCHEMAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "preference": ("preference", ("prompt", "chosen", "rejected")),
    "preference_implicit": ("preference", ("chosen", "rejected")),
    "sft_messages": ("sft", ("messages",)),
    "sft_prompt_completion": ("sft", ("prompt", "completion")),
    "unpaired": ("unpaired", ("prompt", "completion", "label")),
}
MAX_EXAMPLES = 5  # dropped-record locations kept per reason and file in report.json

_UNDECODABLE = object()  # a jsonl line whose bytes are not UTF-8
_SURROGATE = re.compile("[\ud800-\udfff]")
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


class DataError(ValueError):
    """A broken input file or schema; the message names file:line and field."""


class _Drop(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- reading


def _read_jsonl(data: bytes, label: str) -> Iterator[tuple[int, object]]:
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.rstrip(b"\r")
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield line_no, _UNDECODABLE
            continue
        try:
            yield line_no, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _array_items(text: str, pos: int) -> Iterator[tuple[int, object]]:
    """(offset, value) of each item of the (already validated) JSON array starting at text[pos]."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, pos + 1)
    while text[pos] != "]":
        value, end = decoder.raw_decode(text, pos)
        yield pos, value
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)


def _data_member(text: str, pos: int) -> int:
    """Offset of the value of key "data" in the (already validated) JSON object starting at text[pos]."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, pos + 1)
    while True:
        key, end = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, end) + 1)  # past ':'
        if key == "data":
            return pos
        _, end = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, end) + 1)  # past ','


def _read_json(data: bytes, label: str) -> Iterator[tuple[int, object]]:
    # surrogateescape: stray bytes inside strings become lone surrogates -> that record drops as bad_utf8
    text = data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_jsonl(data, label)
            return
        raise DataError(f"{label}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        start = _data_member(text, _skip_ws(text, 0))
    elif isinstance(obj, list):
        start = _skip_ws(text, 0)
    elif isinstance(obj, dict):
        yield 1, obj  # a one-record JSON lines file
        return
    else:
        raise DataError(
            f'{label}:1: top level is a {type(obj).__name__}; expected a list of records or {{"data": [...]}}'
        )
    line, last = 1, 0
    for offset, value in _array_items(text, start):
        line += text.count("\n", last, offset)
        last = offset
        yield line, value


def _maybe_messages(cell: str) -> object:
    """CSV cells that hold a JSON list of message objects are decoded; anything else stays a string."""
    if cell.lstrip().startswith("[{"):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, list) and all(isinstance(m, dict) for m in value):
            return value
    return cell


def _read_csv(path: Path, label: str) -> Iterator[tuple[int, object]]:
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            start = reader.line_num + 1
            for row in reader:
                if not any(cell.strip() for cell in row):
                    start = reader.line_num + 1
                    continue
                if len(row) != len(header):
                    raise DataError(f"{label}:{start}: row has {len(row)} cells, header has {len(header)}")
                yield start, {k: _maybe_messages(v) for k, v in zip(header, row, strict=True)}
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{label}:{reader.line_num}: invalid CSV: {e}") from None


def _read_parquet(path: Path, label: str) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{label}: not a readable parquet file: {e}") from None
    yield from enumerate(rows, 1)


def _read_file(path: Path) -> Iterator[tuple[int, object]]:
    label = str(path)
    if path.suffix == ".csv":
        yield from _read_csv(path, label)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, label)
    elif path.suffix == ".json":
        yield from _read_json(path.read_bytes(), label)
    else:
        yield from _read_jsonl(path.read_bytes(), label)


def _read_hub(name: str, split: str | None) -> Iterator[tuple[int, object]]:
    import datasets  # heavy import; only for hub sources

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"{name}: cannot load hub dataset (split={split!r}): {e}") from None
    if isinstance(ds, dict):  # DatasetDict: split=None
        if len(ds) != 1:
            raise DataError(f"{name}: has splits {sorted(ds)}; set `split` on this source")
        ds = next(iter(ds.values()))
    yield from enumerate(ds, 1)


def _open_source(path: str, split: str | None) -> list[tuple[str, Iterator[tuple[int, object]]]]:
    """(label, records) per file of a source; records yield (line, record)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(
            f for f in p.iterdir() if f.is_file() and f.suffix in EXTENSIONS and not f.name.startswith(".")
        )
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(EXTENSIONS)} files")
        return [(str(f), _read_file(f)) for f in files]
    if p.is_file():
        if p.suffix not in EXTENSIONS:
            raise DataError(f"{path}: unsupported extension {p.suffix!r} (expected {', '.join(EXTENSIONS)})")
        return [(path, _read_file(p))]
    if _HUB_NAME.match(path) and p.suffix not in EXTENSIONS:
        return [(f"{path}[{split}]" if split else path, _read_hub(path, split))]
    raise DataError(f"{path}: file not found")


# ----------------------------------------------------------------------------- schemas


def _guess_schema(record: dict) -> str | None:
    if "chosen" in record or "rejected" in record:
        return "preference" if "prompt" in record else "preference_implicit"
    if "label" in record:
        return "unpaired"
    if "messages" in record:
        return "sft_messages"
    if "completion" in record:
        return "sft_prompt_completion"
    return None


def _missing_field(record: dict, schema: str, loc: str, note: str = "") -> None:
    required = SCHEMAS[schema][1]
    missing = [f for f in required if f not in record]
    if missing:
        raise DataError(
            f"{loc}: field '{missing[0]}': missing (schema '{schema}' expects {'/'.join(required)}){note}"
        )


def _file_schema(record: dict, kind: str, loc: str) -> str:
    """The schema of a file, from its first record (and the source's kind)."""
    guess = _guess_schema(record)
    keys = ", ".join(sorted(map(str, record))) or "none"
    if kind == "auto":
        if guess is None:
            raise DataError(
                f"{loc}: record matches no known format (fields: {keys}; expected prompt/chosen/rejected, "
                "chosen/rejected, messages, prompt/completion or prompt/completion/label)"
            )
        schema = guess
    elif guess is not None and SCHEMAS[guess][0] == kind:
        schema = guess
    else:
        schema = {
            "preference": "preference" if "prompt" in record else "preference_implicit",
            "sft": "sft_messages" if "messages" in record else "sft_prompt_completion",
            "unpaired": "unpaired",
        }[kind]
        note = f"; kind is '{kind}'" + (f" but the record looks like '{guess}'" if guess else "")
        _missing_field(record, schema, loc, note)
        raise DataError(
            f"{loc}: kind '{kind}' disagrees with the record, which looks like '{guess}' (fields: {keys})"
        )
    _missing_field(record, schema, loc)
    return schema


def _check_schema(record: dict, schema: str, loc: str, first_loc: str) -> None:
    """Every record of a file must have the file's schema."""
    _missing_field(record, schema, loc, f"; schema set by {first_loc}")
    guess = _guess_schema(record)
    if guess != schema:
        extra = next((f for f in SCHEMAS[guess][1] if f not in SCHEMAS[schema][1]), SCHEMAS[guess][1][0])
        raise DataError(
            f"{loc}: field '{extra}': unexpected, record looks like '{guess}' but the file's schema is "
            f"'{schema}' (set by {first_loc}); one file holds one schema"
        )


# ----------------------------------------------------------------------------- normalisation


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _as_messages(value: object, name: str, default_role: str | None) -> list[dict]:
    """A field as a non-empty list of {role, content} turns (a string becomes one default_role turn)."""
    if value is None:
        raise _Drop("empty_field", f"field '{name}': null")
    if isinstance(value, str) and default_role is not None:
        messages = [{"role": default_role, "content": value}]
    elif isinstance(value, list):
        messages = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _Drop("wrong_type", f"field '{name}': item {i} is not a {{role, content}} message")
            if m["role"] not in ROLES:
                raise _Drop(
                    "wrong_type",
                    f"field '{name}': item {i} has role {m['role']!r} (allowed: {', '.join(ROLES)})",
                )
            content = m.get("content")
            if content is not None and not isinstance(content, str):
                raise _Drop(
                    "wrong_type",
                    f"field '{name}': item {i} content is a {type(content).__name__}, not a string",
                )
            messages.append({"role": m["role"], "content": content or ""})
    else:
        expected = "a string or a list of messages" if default_role else "a list of messages"
        raise _Drop("wrong_type", f"field '{name}': expected {expected}, got {type(value).__name__}")
    return _non_empty(messages, name)


def _non_empty(messages: list[dict], name: str) -> list[dict]:
    # An empty system turn carries nothing; drop the turn rather than the record.
    messages = [m for m in messages if m["role"] != "system" or m["content"].strip()]
    if not messages:
        raise _Drop("empty_field", f"field '{name}': no turns")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise _Drop("empty_field", f"field '{name}': turn {i} ({m['role']}) is empty")
    return messages


def _parse_hh(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b] (contents stripped)."""
    parts = _HH_MARKER.split(text.lstrip())  # [before, speaker, content, speaker, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise _Drop("wrong_type", f"field '{name}': not a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _is_hh(value: object) -> bool:
    return isinstance(value, str) and value.lstrip(" \n").startswith("Human:")


def _prompt(value: object) -> list[dict]:
    if _is_hh(value):  # "\n\nHuman: q\n\nAssistant:" -> [user q] (the trailing empty cue is dropped)
        turns = _parse_hh(value, "prompt")
        if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns = turns[:-1]
        return _non_empty(turns, "prompt")
    return _as_messages(value, "prompt", "user")


def _ends_with_user(prompt: list[dict]) -> list[dict]:
    if prompt[-1]["role"] != "user":
        raise _Drop("wrong_type", f"field 'prompt': last turn is {prompt[-1]['role']}, expected user")
    return prompt


def _same_turn(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"].split() == b["content"].split()


def _response(value: object, prompt: list[dict], name: str, strip: bool = False) -> list[dict]:
    """Assistant turn(s) of a response; leading turns repeating the prompt (UltraFeedback) are removed."""
    if strip and isinstance(value, str):
        value = value.strip()
    turns = _as_messages(value, name, "assistant")
    if len(turns) > len(prompt) and all(_same_turn(t, p) for t, p in zip(turns, prompt, strict=False)):
        turns = turns[len(prompt) :]
    return _assistant_only(turns, name)


def _assistant_only(turns: list[dict], name: str) -> list[dict]:
    other = next((t["role"] for t in turns if t["role"] != "assistant"), None)
    if other:
        raise _Drop("wrong_type", f"field '{name}': has a {other} turn that is not part of the prompt")
    return turns


def _conversation(value: object, name: str) -> list[dict]:
    if isinstance(value, str):
        return _non_empty(_parse_hh(value, name), name)
    return _as_messages(value, name, None)


def _label(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value is None:
        raise _Drop("empty_field", "field 'label': null")
    raise _Drop("wrong_type", f"field 'label': {value!r} is not a boolean (true/false, 1/0)")


def _pair(chosen: list[dict], rejected: list[dict]) -> None:
    if chosen == rejected:
        raise _Drop("identical_pair", "fields 'chosen' and 'rejected' are identical")


def _normalise(schema: str, record: dict) -> tuple[str, dict]:
    """(kind, content) of one record in canonical form; raises _Drop for a bad record."""
    fields = SCHEMAS[schema][1]
    if any(_SURROGATE.search(s) for f in fields for s in _strings(record[f])):
        raise _Drop("bad_utf8", "undecodable bytes or lone surrogates in the text")
    if schema == "preference":
        hh = _is_hh(record["prompt"])
        prompt = _ends_with_user(_prompt(record["prompt"]))
        chosen = _response(record["chosen"], prompt, "chosen", strip=hh)
        rejected = _response(record["rejected"], prompt, "rejected", strip=hh)
        _pair(chosen, rejected)
        return "preference", {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if schema == "preference_implicit":
        chosen = _conversation(record["chosen"], "chosen")
        rejected = _conversation(record["rejected"], "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and _same_turn(chosen[shared], rejected[shared]):
            shared += 1
        while shared and chosen[shared - 1]["role"] != "user":
            shared -= 1
        if not shared:
            raise _Drop("wrong_type", "fields 'chosen'/'rejected': share no prompt ending with a user turn")
        prompt = chosen[:shared]
        responses = []
        for name, turns in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
            if not turns:
                raise _Drop("wrong_type", f"field '{name}': no assistant turn after the prompt")
            if any(t["role"] != "assistant" for t in turns):
                raise _Drop(
                    "wrong_type",
                    f"field '{name}': goes on with a user turn after the shared prompt "
                    "(chosen and rejected diverge before their final assistant turn)",
                )
            responses.append(turns)
        _pair(*responses)
        return "preference", {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}
    if schema == "sft_messages":
        messages = _as_messages(record["messages"], "messages", None)
        if not any(m["role"] == "assistant" for m in messages):
            raise _Drop("wrong_type", "field 'messages': no assistant turn")
        return "sft", {"messages": messages}
    if schema == "sft_prompt_completion":
        prompt = _prompt(record["prompt"])
        return "sft", {"messages": prompt + _response(record["completion"], prompt, "completion")}
    prompt = _ends_with_user(_prompt(record["prompt"]))
    completion = _response(record["completion"], prompt, "completion")
    return "unpaired", {"prompt": prompt, "completion": completion, "label": _label(record["label"])}


def _conversations(kind: str, content: dict) -> list[list[dict]]:
    if kind == "sft":
        return [content["messages"]]
    if kind == "preference":
        return [content["prompt"] + content["chosen"], content["prompt"] + content["rejected"]]
    return [content["prompt"] + content["completion"]]


def _check_lengths(tokenizer, kind: str, content: dict, max_length: int, max_prompt_length: int) -> None:
    for messages in _conversations(kind, content):
        ids, trained = encode_chat(tokenizer, messages)
        prompt_tokens = trained.index(True) if True in trained else len(ids)
        if prompt_tokens > max_prompt_length:
            raise _Drop(
                "prompt_too_long",
                f"prompt has {prompt_tokens} tokens > max_prompt_length {max_prompt_length}",
            )
        if len(ids) > max_length:
            raise _Drop("too_long", f"prompt+response has {len(ids)} tokens > max_length {max_length}")


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def record_id(content: dict) -> str:
    """First 16 hex digits of sha256 of the canonical JSON of a record's content (no id/source)."""
    return hashlib.sha256(_canonical(content).encode()).hexdigest()[:16]


def opening(kind: str, content: dict) -> list[dict]:
    """The turns that decide a record's split: leading system turns and the first user turn."""
    messages = content["messages"] if kind == "sft" else content["prompt"]
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages) - 1)
    return [
        {"role": m["role"], "content": " ".join(m["content"].split())} for m in messages[: first_user + 1]
    ]


# ----------------------------------------------------------------------------- split


def split_unit(key: str, seed: int) -> float:
    """Position of a prompt key in [0, 1): eval when below eval_fraction."""
    return int(hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()[:16], 16) / 2**64


def eval_keys(kinds_by_key: dict[str, set[str]], eval_fraction: float, seed: int) -> set[str]:
    """The prompt keys held out. Each kind gets at least one train key, and one eval key when it has >= 2."""
    unit = {key: split_unit(key, seed) for key in kinds_by_key}
    held_out = {key for key, u in unit.items() if u < eval_fraction}
    for guarantee_eval in (False, True):  # eval last: it is the guarantee that must hold
        for kind in KINDS:
            keys = sorted((k for k, kinds in kinds_by_key.items() if kind in kinds), key=unit.__getitem__)
            if guarantee_eval and len(keys) >= 2 and not any(k in held_out for k in keys):
                held_out.add(keys[0])
            if not guarantee_eval and keys and all(k in held_out for k in keys):
                held_out.discard(keys[-1])
    return held_out


# ----------------------------------------------------------------------------- run


@dataclass
class _FileReport:
    source: str
    file: str
    format: str = "empty"
    kind: str = ""
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def drop(self, reason: str, loc: str, detail: str) -> None:
        self.dropped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(f"{loc}: {detail}")
        log.debug("drop %s %s: %s", reason, loc, detail)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "file": self.file,
            "format": self.format,
            "kind": self.kind,
            "read": self.read,
            "kept": self.kept,
            "dropped": {r: self.dropped[r] for r in REASONS},
            "dropped_examples": self.examples,
        }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a fully written tmp dir onto dest; the old dest survives until the new one is in place."""
    backup = dest.with_name(f".{dest.name}.old")
    if backup.exists():
        shutil.rmtree(backup)
    if dest.exists():
        os.replace(dest, backup)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if backup.exists():
            os.replace(backup, dest)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _write_outputs(
    out_dir: Path, files: dict[str, list[dict]], report: dict, metrics_path: Path, metrics: dict
) -> None:
    """Everything is written to temp paths first: a failure leaves the previous outputs untouched."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    fd, tmp_metrics = tempfile.mkstemp(prefix=f".{metrics_path.name}.", dir=metrics_path.parent)
    os.close(fd)
    try:
        for name, records in files.items():
            _write_jsonl(tmp / name, records)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        Path(tmp_metrics).write_text(json.dumps(metrics, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
        os.replace(tmp_metrics, metrics_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(tmp_metrics):
            os.unlink(tmp_metrics)


def run(
    sources: list[dict],
    out_dir: str,
    metrics_path: str,
    tokenizer_path: str,
    eval_fraction: float,
    max_length: int,
    max_prompt_length: int,
    dedupe: bool,
    seed: int,
) -> dict:
    """Read, validate, normalise, dedupe and split `sources`; write out_dir and metrics_path. Returns metrics."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    # ------------------------------------------------------------------ read and validate
    kept: list[tuple[str, dict, str]] = []  # (kind, record, prompt key)
    seen: set[str] = set()
    reports: list[_FileReport] = []
    for source in sources:
        path, kind, split = source["path"], source.get("kind") or "auto", source.get("split")
        if kind not in ("auto", *KINDS):
            raise DataError(f"{path}: kind {kind!r} is not one of auto, {', '.join(KINDS)}")
        for label, records in _open_source(path, split):
            report = _FileReport(source=path, file=label)
            reports.append(report)
            schema, first_loc = None, ""
            for line, record in records:
                loc = f"{label}:{line}"
                report.read += 1
                if record is _UNDECODABLE:
                    report.drop("bad_utf8", loc, "line is not valid UTF-8")
                    continue
                if not isinstance(record, dict):
                    raise DataError(f"{loc}: record is a {type(record).__name__}, expected an object")
                if schema is None:
                    schema, first_loc = _file_schema(record, kind, loc), loc
                    report.format, report.kind = schema, SCHEMAS[schema][0]
                else:
                    _check_schema(record, schema, loc, first_loc)
                try:
                    record_kind, content = _normalise(schema, record)
                    rid = record_id(content)
                    if dedupe and rid in seen:
                        raise _Drop("duplicate", f"same content as an earlier record (id {rid})")
                    _check_lengths(tokenizer, record_kind, content, max_length, max_prompt_length)
                except _Drop as d:
                    report.drop(d.reason, loc, d.detail)
                    continue
                seen.add(rid)
                report.kept += 1
                out = {"id": rid, **content, "source": loc}
                kept.append((record_kind, out, _canonical(opening(record_kind, content))))
            if report.read == 0:
                log.warning("%s: no records", label)

    read = sum(r.read for r in reports)
    dropped = Counter()
    for r in reports:
        dropped.update(r.dropped)
    if not kept:
        reasons = ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "none"
        raise DataError(f"no records left after filtering (read {read}; dropped: {reasons})")

    # ------------------------------------------------------------------ split by prompt
    kinds_by_key: dict[str, set[str]] = {}
    for record_kind, _, key in kept:
        kinds_by_key.setdefault(key, set()).add(record_kind)
    held_out = eval_keys(kinds_by_key, eval_fraction, seed)
    files: dict[str, list[dict]] = {
        f"{OUTPUT_PREFIX[k]}_{s}.jsonl": [] for k in KINDS for s in ("train", "eval")
    }
    for record_kind, out, key in kept:
        files[f"{OUTPUT_PREFIX[record_kind]}_{'eval' if key in held_out else 'train'}.jsonl"].append(out)

    # ------------------------------------------------------------------ metrics, report, write
    metrics: dict = {}
    for k in KINDS:
        for s in ("train", "eval"):
            metrics[f"{k}/{s}"] = len(files[f"{OUTPUT_PREFIX[k]}_{s}.jsonl"])
    metrics["prompts/train"] = len(kinds_by_key) - len(held_out)
    metrics["prompts/eval"] = len(held_out)
    metrics["files/total"] = len(reports)
    metrics["read/total"] = read
    metrics["kept/total"] = len(kept)
    metrics["dropped/total"] = sum(dropped.values())
    for reason in REASONS:
        metrics[f"dropped/{reason}"] = dropped[reason]
    report = {
        "settings": {
            "eval_fraction": eval_fraction,
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
            "dedupe": dedupe,
            "seed": seed,
        },
        "files": [r.as_dict() for r in reports],
        "totals": metrics,
    }
    _write_outputs(Path(out_dir), files, report, Path(metrics_path), metrics)

    for r in reports:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items()))
        log.info(
            "%s [%s]: read %d, kept %d%s",
            r.file,
            r.format,
            r.read,
            r.kept,
            f", dropped {drops}" if drops else "",
        )
    log.info(
        "prepare: kept %d of %d (sft %d/%d, preference %d/%d, unpaired %d/%d train/eval) -> %s",
        len(kept),
        read,
        *(metrics[f"{k}/{s}"] for k in KINDS for s in ("train", "eval")),
        out_dir,
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare canonical SFT / preference / unpaired data.")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from components.bootstrap import resolve_model_path
    from components.config import ParamsError, load_params

    try:
        params = load_params(args.params)
        run(
            sources=[s.model_dump() for s in params.data.sources],
            out_dir="data/prepared",
            metrics_path="metrics/prepare.json",
            tokenizer_path=resolve_model_path("models/base"),
            eval_fraction=params.data.eval_fraction,
            max_length=params.data.max_length,
            max_prompt_length=params.data.max_prompt_length,
            dedupe=params.data.dedupe,
            seed=params.seed,
        )
    except (DataError, ParamsError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
