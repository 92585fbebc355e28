"""Prepare: read raw sources, validate, normalise to canonical chat records, dedupe, split by prompt.

    python -m components.prepare --params params.yaml

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
Token counts come from `core/tokens.encode_chat`, i.e. the exact template the trainers use.

Split: a record's side is decided by its conversation opening (system turns + first user turn), hashed
with the seed: eval when hash/2^64 < eval_fraction. So a prompt's SFT, preference and unpaired records
land on the same side, multi-turn records continuing an eval conversation never land in train, and adding
data never moves an existing prompt across. Each kind gets at least one train opening, and at least one
eval opening when it has >= 2. Line numbers are physical lines (jsonl, json, csv) or 1-based rows (parquet, hub).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from components.core.formats import (
    KINDS,
    REASONS,
    SCHEMAS,
    Drop,
    check_schema,
    conversations,
    file_schema,
    normalise,
)
from components.core.io import atomic_dir, write_text
from components.core.readers import UNDECODABLE, DataError, open_source
from components.core.tokens import encode_chat

log = logging.getLogger(__name__)

OUTPUT_PREFIX = {"sft": "sft", "preference": "pref", "unpaired": "unpaired"}

MAX_EXAMPLES = 5  # dropped-record locations kept per reason and file in report.json


# ----------------------------------------------------------------------------- lengths and identity


def _check_lengths(tokenizer, kind: str, content: dict, max_length: int, max_prompt_length: int) -> None:
    for messages in conversations(kind, content):
        ids, trained = encode_chat(tokenizer, messages)
        prompt_tokens = trained.index(True) if True in trained else len(ids)
        if prompt_tokens > max_prompt_length:
            raise Drop(
                "prompt_too_long",
                f"prompt has {prompt_tokens} tokens > max_prompt_length {max_prompt_length}",
            )
        if len(ids) > max_length:
            raise Drop("too_long", f"prompt+response has {len(ids)} tokens > max_length {max_length}")


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


def _write_outputs(
    out_dir: Path, files: dict[str, list[dict]], report: dict, metrics_path: Path, metrics: dict
) -> None:
    """data/prepared as one atomic directory, then the metrics file: a failure leaves the previous outputs."""
    with atomic_dir(out_dir) as tmp:
        for name, records in files.items():
            _write_jsonl(tmp / name, records)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")


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
        for label, records in open_source(path, split):
            report = _FileReport(source=path, file=label)
            reports.append(report)
            schema, first_loc = None, ""
            for line, record in records:
                loc = f"{label}:{line}"
                report.read += 1
                if record is UNDECODABLE:
                    report.drop("bad_utf8", loc, "line is not valid UTF-8")
                    continue
                if not isinstance(record, dict):
                    raise DataError(f"{loc}: record is a {type(record).__name__}, expected an object")
                if schema is None:
                    schema, first_loc = file_schema(record, kind, loc), loc
                    report.format, report.kind = schema, SCHEMAS[schema][0]
                else:
                    check_schema(record, schema, loc, first_loc)
                try:
                    record_kind, content = normalise(schema, record)
                    rid = record_id(content)
                    if dedupe and rid in seen:
                        raise Drop("duplicate", f"same content as an earlier record (id {rid})")
                    _check_lengths(tokenizer, record_kind, content, max_length, max_prompt_length)
                except Drop as d:
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
    from components.core.config import ParamsError, load_params
    from components.core.io import resolve_model_path
    from components.core.logs import setup_logging

    setup_logging()

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
