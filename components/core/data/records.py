"""One record's way through prepare, as a pure function a worker process can run: check its format, normalise it
to a canonical chat record, parse back text already rendered with the chat template, encode it with the exact
template the trainers use, check its lengths, and serialise what is written. Plus the two things prepare keeps
per record while it streams (`IdSet` for dedupe, `eval_sides` for the split), at 8-9 bytes a record.

`process_batch` runs in prepare's workers (core/ops/parallel.ordered_map) over batches of read items; its
outcomes come back in order, and prepare applies them to the per-file report and the dedupe set exactly as a
one-process loop would: dedupe is the only step that depends on the records before, so it stays in the parent.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from typing import NamedTuple

from components.core.data import token_store
from components.core.data.formats import (
    Drop,
    apply_columns,
    check_format,
    conversations,
    normalise,
    uses_tools,
    validate,
)
from components.core.data.readers import DataError
from components.core.data.tokens import holds_template, parse_rendered

# what a read item is (the first element of an item)
RECORD, UNDECODABLE, INVALID_JSON, ERROR = range(4)
# what became of it
DROPPED, CHECKED, FAILED = range(3)


class Outcome(NamedTuple):
    """DROPPED: reason/detail (before dedupe). FAILED: detail is the DataError's message (the stage stops).
    CHECKED: rid is the content id for dedupe; reason/detail a length drop, or `kept` = (kind, split hash, blob):
    the blob is the pickled (kind, split hash, .jsonl line, token row), made here so the parent only moves bytes
    (spill_kept / read_kept)."""

    status: int
    untemplated: bool = False
    reason: str | None = None
    detail: str = ""
    rid: str | None = None
    kept: tuple | None = None


# ----------------------------------------------------------------------------- identity, split, lengths


def canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def record_id(content: dict) -> str:
    """First 16 hex digits of sha256 of the canonical JSON of a record's content (no id/source)."""
    return hashlib.sha256(canonical(content).encode()).hexdigest()[:16]


def opening(kind: str, content: dict) -> list[dict]:
    """The turns that decide a record's split: leading system turns and the first user turn."""
    messages = content["messages"] if kind == "sft" else content["prompt"]
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages) - 1)
    return [
        {"role": m["role"], "content": " ".join(m["content"].split())} for m in messages[: first_user + 1]
    ]


def split_hash(key: str, seed: int) -> int:
    """A prompt key's 64-bit split hash: its position in [0, 1) is split_hash / 2**64 (`split_unit`)."""
    return int(hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()[:16], 16)


def split_unit(key: str, seed: int) -> float:
    """Position of a prompt key in [0, 1): eval when below eval_fraction."""
    return split_hash(key, seed) / 2**64


def check_lengths(encoded: list[tuple[list[int], list[bool]]], kind: str, max_length: int,
                  max_prompt_length: int) -> None:
    prompts: set[tuple[int, ...]] = set()
    for ids, trained in encoded:
        prompt_tokens = trained.index(True) if True in trained else len(ids)
        prompts.add(tuple(ids[:prompt_tokens]))
        if kind == "preference" and len(prompts) > 1:  # scored as one shared prompt for both responses
            raise Drop("prompt_mismatch", "the chat template renders the prompt into other tokens before the "
                       "rejected response than before the chosen one")
        if prompt_tokens > max_prompt_length:
            raise Drop("prompt_too_long", f"prompt has {prompt_tokens} tokens > max_prompt_length {max_prompt_length}")
        if len(ids) > max_length:
            raise Drop("too_long", f"prompt+response has {len(ids)} tokens > max_length {max_length}")


def untemplate(kind: str, content: dict, markers: dict | None) -> bool:
    """Turns whose text already holds this tokenizer's chat template are parsed back into turns, so they are
    never templated twice. Returns whether any was; raises Drop("pretemplated") when one cannot be parsed."""
    changed = False
    for key in ("messages", "prompt", "chosen", "rejected", "completion"):
        turns = content.get(key)
        if not isinstance(turns, list) or not any(holds_template(t["content"], markers) for t in turns):
            continue
        parsed: list[dict] = []
        for turn in turns:
            if not holds_template(turn["content"], markers):
                parsed.append(turn)
                continue
            try:
                parsed += parse_rendered(turn["content"], markers, turn["role"])
            except ValueError as e:
                raise Drop("pretemplated", f"field '{key}': text already rendered with a chat template ({e}); "
                                           "give plain text or messages instead") from None
        content[key] = parsed
        changed = True
    if changed:
        validate(kind, content)
    return changed


# ----------------------------------------------------------------------------- the worker


_STATE: dict = {}  # the worker's tokenizer and settings (init_worker)


def init_worker(tokenizer, settings: dict) -> None:
    """settings: markers (tokens.chat_markers), tools_ok, max_length, max_prompt_length, seed."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker: the pool is the parallelism
    _STATE.update(settings, tokenizer=tokenizer)


def as_record(value: object, loc: str) -> dict:
    """A read value as a record object: a bare list of messages is an SFT conversation; anything else that is
    not an object is a DataError."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return {"messages": value}
    if not isinstance(value, dict):
        raise DataError(f"{loc}: record is a {type(value).__name__}, expected an object")
    return value


def process_batch(job: tuple) -> list[Outcome]:
    """job: ((schema, first_loc, columns), [(loc, item kind, value), ...]) -> one Outcome per item, in order."""
    (schema, first_loc, columns), items = job
    return [process_item(schema, first_loc, columns, loc, what, value) for loc, what, value in items]


def process_item(schema: str | None, first_loc: str, columns: dict, loc: str, what: int, value) -> Outcome:
    if what == ERROR:
        return Outcome(FAILED, detail=value)
    if what == UNDECODABLE:
        return Outcome(DROPPED, reason="bad_utf8", detail="line is not valid UTF-8")
    if what == INVALID_JSON:
        return Outcome(DROPPED, reason="invalid_json", detail=value)
    try:
        record = apply_columns(as_record(value, loc), columns)
        if loc != first_loc:  # the first record set the format
            check_format(record, schema, loc, first_loc)
    except DataError as e:
        return Outcome(FAILED, detail=str(e))
    untemplated = False
    try:
        record_kind, content = normalise(schema, record)
        untemplated = untemplate(record_kind, content, _STATE["markers"])
        if uses_tools(content) and not _STATE["tools_ok"]:
            raise Drop("tools_unsupported", "tool calls, tool results or tool definitions, and this "
                                            "tokenizer's chat template does not render tools")
    except Drop as d:
        return Outcome(DROPPED, untemplated, d.reason, d.detail)
    rid = record_id(content)
    try:
        encoded = token_store.encode(_STATE["tokenizer"], conversations(record_kind, content), content.get("tools"),
                                     prompt_turns=len(content.get("prompt", [])))
        check_lengths(encoded, record_kind, _STATE["max_length"], _STATE["max_prompt_length"])
    except Drop as d:
        return Outcome(CHECKED, untemplated, d.reason, d.detail, rid)
    key = split_hash(canonical(opening(record_kind, content)), _STATE["seed"])
    line = json.dumps({"id": rid, **content, "source": loc}, ensure_ascii=False) + "\n"
    blob = pickle.dumps((record_kind, key, line, token_store.row(record_kind, rid, encoded, content)),
                        protocol=pickle.HIGHEST_PROTOCOL)
    return Outcome(CHECKED, untemplated, rid=rid, kept=(record_kind, key, blob))


def spill_kept(blobs: list[bytes], spill) -> None:
    """Append kept records (their blobs, in order) to an open spill file."""
    pickle.dump(blobs, spill, protocol=pickle.HIGHEST_PROTOCOL)


def read_kept(spill):
    """The kept records of a spill file, in order: (kind, split hash, .jsonl line, token row or None)."""
    while True:
        try:
            blobs = pickle.load(spill)
        except EOFError:
            return
        for blob in blobs:
            yield pickle.loads(blob)


# ----------------------------------------------------------------------------- per-record state while streaming


class IdSet:
    """A set of 64-bit ids (16-hex-digit record ids) at ~8 bytes an id: a sorted numpy array, plus a small set of
    recent ids merged into it every `merge_every` additions. What dedupe keeps across every source."""

    def __init__(self, merge_every: int = 1 << 16):
        import numpy as np

        self._np = np
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._merge_every = merge_every

    def __contains__(self, rid: str) -> bool:
        x = int(rid, 16)
        if x in self._recent:
            return True
        i = int(self._np.searchsorted(self._sorted, self._np.uint64(x)))
        return i < len(self._sorted) and int(self._sorted[i]) == x

    def add(self, rid: str) -> None:
        self._recent.add(int(rid, 16))
        if len(self._recent) >= self._merge_every:
            np = self._np
            self._sorted = np.union1d(self._sorted, np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent)))
            self._recent.clear()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)


def eval_sides(keys, kinds, kind_names: tuple[str, ...], eval_fraction: float) -> tuple[set[int], dict]:
    """The split from each kept record's prompt key (`split_hash`, uint64 array) and kind (index into kind_names,
    uint8 array). A key is held out when its unit (key / 2**64) < eval_fraction; then each kind gets at least one
    train key (its highest-unit key leaves eval when all of them are held out) and, when it has >= 2 keys, one eval
    key (its lowest) — train first, eval last, as the eval guarantee is the one that must hold.

    Returns (the keys whose side differs from the threshold's, {"train": keys, "eval": keys}): a record is on the
    eval side when `(key / 2**64 < eval_fraction) != (key in flipped)`."""
    import numpy as np

    if len(keys) == 0:
        return set(), {"train": 0, "eval": 0}
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    distinct = sorted_keys[starts]  # ascending: by unit
    masks = np.bitwise_or.reduceat((np.uint8(1) << kinds[order].astype(np.uint8)), starts)
    threshold = distinct.astype(np.float64) / 2.0**64 < eval_fraction
    held = threshold.copy()
    for guarantee_eval in (False, True):
        for code in range(len(kind_names)):
            idx = np.flatnonzero(masks & np.uint8(1 << code))
            if guarantee_eval and len(idx) >= 2 and not held[idx].any():
                held[idx[0]] = True
            if not guarantee_eval and len(idx) and held[idx].all():
                held[idx[-1]] = False
    flipped = {int(k) for k in distinct[held != threshold]}
    return flipped, {"train": int(len(distinct) - held.sum()), "eval": int(held.sum())}


def is_eval(key: int, eval_fraction: float, flipped: set[int]) -> bool:
    return (key / 2**64 < eval_fraction) != (key in flipped)
