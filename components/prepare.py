"""Prepare: read the sources, validate, normalise to canonical chat records, dedupe, split by prompt.

    python -m components.prepare --params params.yaml

Why this file is long: a third of it is this docstring, the stage's contract (errors, drop reasons, split);
the rest is run() and its phases in the order it calls them (read_sources, check_kept, split_records,
prepare_metrics) plus the report. Reading and format parsing live in core/data/readers, core/data/formats.

Reads `data.sources` (local .jsonl/.json/.parquet/.csv files or directories of them; each is a DVC dep
through the `sources` stage) and `data.hub_sources` (hub datasets, pinned by revision), and writes
`data/prepared/{sft,pref,unpaired}_{train,eval}.jsonl`, their token ids in `tokens/`, `report.json` (per
file: format, read, kept, dropped per reason with the first locations), `metrics/prepare.json` (totals and
per file), and the same report to `reports/prepare.json` also when the stage fails.

Formats: core/formats.FORMATS (TRL, HH-RLHF, UltraFeedback, OpenAI chat and preference fine-tuning,
ShareGPT, LLaMA-Factory, Alpaca, xtuner), detected per file from its first record or narrowed with `kind`;
`columns` renames a file's fields first. The README's format table has an example of each.

The file is broken -> DataError, the run stops, nothing is written but reports/prepare.json (with the error). The message is one line,
`file:line: field 'x': problem`: missing file or empty directory, unsupported extension, invalid JSON
(unless data.skip_invalid_json), a CSV row with the wrong number of cells, a record that is not an object,
a first record matching no format (of the `kind` asked for), a later record of another format.
A file keeps less than data.min_kept_fraction of its records (or none) -> DataError naming the file and
its first drop reasons with their lines.
One record is bad -> it is dropped and counted under the first reason found (core/formats.REASONS):
    bad_utf8 / invalid_json     undecodable bytes or lone surrogates / a .jsonl line that is not JSON
    wrong_type / empty_field    a field of the wrong type or shape / null, empty list, empty content
    unsupported_content         a non-text content part (image, audio, file)
    tools_unsupported           tool turns, tool calls or tools, and a chat template that cannot render them
    pretemplated                text holding this tokenizer's chat template that cannot be parsed back
    identical_pair / duplicate  chosen == rejected / same content as a kept record (dedupe, across sources)
    prompt_too_long / too_long  prompt tokens > max_prompt_length / prompt+response tokens > max_length
    prompt_mismatch             a pair whose prompt tokens differ before chosen and before rejected
Token counts come from `core/tokens.encode_chat`, i.e. the exact template the trainers use, and the ids
counted are the ones written: `data/prepared/tokens/` (core/data/token_store.py) holds every kept SFT and preference
record's token ids and the tokenizer's fingerprint, and the training stages read those, never the text.

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

from components.core.config import DataConfig, Runtime
from components.core.data import token_store
from components.core.data.formats import (
    FORMATS,
    KINDS,
    REASONS,
    Drop,
    apply_columns,
    check_format,
    conversations,
    file_format,
    normalise,
    uses_tools,
    validate,
)
from components.core.data.readers import UNDECODABLE, DataError, InvalidJSON, open_hub, open_source
from components.core.data.tokens import chat_markers, holds_template, parse_rendered, template_supports_tools
from components.core.ops.io import atomic_dir, write_jsonl, write_text
from components.core.ops.logs import stage_main

log = logging.getLogger(__name__)

OUTPUT_PREFIX = {"sft": "sft", "preference": "pref", "unpaired": "unpaired"}

MAX_EXAMPLES = 5  # dropped-record locations kept per reason and file in report.json


# ----------------------------------------------------------------------------- lengths and identity


def _check_lengths(encoded: list[tuple[list[int], list[bool]]], kind: str, max_length: int,
                   max_prompt_length: int) -> None:
    prompts: set[tuple[int, ...]] = set()
    for ids, trained in encoded:
        prompt_tokens = trained.index(True) if True in trained else len(ids)
        prompts.add(tuple(ids[:prompt_tokens]))
        if kind == "preference" and len(prompts) > 1:  # scored as one shared prompt for both responses
            raise Drop("prompt_mismatch", "the chat template renders the prompt into other tokens before the "
                       "rejected response than before the chosen one")
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
    untemplated: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    hub: dict | None = None

    def drop(self, reason: str, loc: str, detail: str) -> None:
        self.dropped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(f"{loc}: {detail}")
        log.debug("drop %s %s: %s", reason, loc, detail)

    def first_reasons(self, n: int = 3) -> str:
        """'line 3: field 'chosen': ...; line 4: ...' for the most frequent reasons first."""
        shown = []
        for reason, _ in self.dropped.most_common():
            for example in self.examples.get(reason, []):
                loc, _, detail = example.partition(": ")
                shown.append(f"line {loc.rsplit(':', 1)[-1]}: {detail} [{reason}]")
        return "; ".join(shown[:n]) or "none"

    def as_dict(self) -> dict:
        out = {
            "source": self.source,
            "file": self.file,
            "format": self.format,
            "kind": self.kind,
            "read": self.read,
            "kept": self.kept,
            "untemplated": self.untemplated,
            "dropped": {r: self.dropped[r] for r in REASONS},
            "dropped_examples": self.examples,
        }
        if self.hub:
            out["hub"] = self.hub
        return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_jsonl(path, records, ensure_ascii=False)


def _write_outputs(out_dir: Path, files: dict[str, list[dict]], token_rows: dict[str, list[dict]], tokens: dict,
                   report: dict, metrics_path: Path, metrics: dict) -> None:
    """data/prepared (records, their tokens, the report) as one atomic directory, then the metrics file: a
    failure leaves the previous outputs."""
    with atomic_dir(out_dir) as tmp:
        for name, records in files.items():
            _write_jsonl(tmp / name, records)
        token_store.write(tmp, token_rows, **tokens)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")


def _untemplate(kind: str, content: dict, markers: dict | None) -> bool:
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


def _fail_loud(reports: list[_FileReport], min_kept_fraction: float) -> list[str]:
    """One line per file that lost too much: kept 0, or a kept share below min_kept_fraction."""
    problems = []
    for r in reports:
        if r.read and (r.kept / r.read < min_kept_fraction or (r.kept == 0 and min_kept_fraction > 0)):
            problems.append(f"{r.file}: kept {r.kept} of {r.read} (below data.min_kept_fraction "
                            f"{min_kept_fraction:g}): first reasons: {r.first_reasons()}")
    return problems


def _inputs(cfg: DataConfig):
    """(source label, kind, columns, file label, records, hub provenance) for every file of every source."""
    for source in cfg.sources:
        for label, records in open_source(source.path, cfg.skip_invalid_json):
            yield source.path, source.kind, source.columns, label, records, None
    for hub in cfg.hub_sources:
        if not hub.revision:
            log.warning("%s: hub dataset not pinned (no revision): a change on the hub will not re-run prepare; "
                        "set data.hub_sources[].revision to a commit", hub.name)
        label, records, provenance = open_hub(hub.name, hub.split, hub.revision)
        yield hub.name, hub.kind, hub.columns, label, records, provenance


# (kind, record as written, prompt key, token ids row) of every record kept
Kept = tuple[str, dict, str, dict | None]


def read_sources(cfg: DataConfig, tokenizer, reports: list[_FileReport] | None = None
                 ) -> tuple[list[Kept], list[_FileReport]]:
    """Read, validate, normalise, dedupe (across sources) and tokenise every record of every source, in order:
    the records kept, and one report per file (every drop counted under its reason), appended to `reports` as
    each file starts (so a caller holds the files read so far when a record stops the stage)."""
    markers = chat_markers(tokenizer)
    tools_ok = template_supports_tools(tokenizer)
    dedupe, max_length, max_prompt_length = cfg.dedupe, cfg.max_length, cfg.max_prompt_length
    kept: list[Kept] = []
    seen: set[str] = set()
    reports = [] if reports is None else reports
    for source, kind, columns, label, records, provenance in _inputs(cfg):
        report = _FileReport(source=source, file=label, hub=provenance)
        reports.append(report)
        schema, first_loc = None, ""
        for line, record in records:
            loc = f"{label}:{line}"
            report.read += 1
            if record is UNDECODABLE:
                report.drop("bad_utf8", loc, "line is not valid UTF-8")
                continue
            if isinstance(record, InvalidJSON):
                report.drop("invalid_json", loc, record.message)
                continue
            if isinstance(record, list) and record and all(isinstance(m, dict) for m in record):
                record = {"messages": record}  # a line that is a bare list of messages
            if not isinstance(record, dict):
                raise DataError(f"{loc}: record is a {type(record).__name__}, expected an object")
            record = apply_columns(record, columns)
            if schema is None:
                schema, first_loc = file_format(record, kind, loc), loc
                report.format, report.kind = schema, FORMATS[schema][0]
            else:
                check_format(record, schema, loc, first_loc)
            try:
                record_kind, content = normalise(schema, record)
                if _untemplate(record_kind, content, markers):
                    report.untemplated += 1
                if uses_tools(content) and not tools_ok:
                    raise Drop("tools_unsupported", "tool calls, tool results or tool definitions, and this "
                                                    "tokenizer's chat template does not render tools")
                rid = record_id(content)
                if dedupe and rid in seen:
                    raise Drop("duplicate", f"same content as an earlier record (id {rid})")
                encoded = token_store.encode(tokenizer, conversations(record_kind, content), content.get("tools"),
                                           prompt_turns=len(content.get("prompt", [])))
                _check_lengths(encoded, record_kind, max_length, max_prompt_length)
            except Drop as d:
                report.drop(d.reason, loc, d.detail)
                continue
            seen.add(rid)
            report.kept += 1
            out = {"id": rid, **content, "source": loc}
            kept.append((record_kind, out, _canonical(opening(record_kind, content)),
                         token_store.row(record_kind, rid, encoded, content)))
        if report.read == 0:
            log.warning("%s: no records", label)
        if report.untemplated:
            log.warning("%s: %d records held text already rendered with the chat template (%s); parsed back "
                        "into messages so it is not templated twice", label, report.untemplated,
                        ", ".join((markers or {}).get("special", [])[:3]))
    return kept, reports


def check_kept(kept: list[Kept], reports: list[_FileReport], settings: dict, min_kept_fraction: float,
               report_path: str | None) -> dict:
    """The files' report ({settings, files}), written to report_path first (failure included); raises DataError
    when a file lost too much or nothing is left."""
    read = sum(r.read for r in reports)
    dropped = Counter()
    for r in reports:
        dropped.update(r.dropped)
    files_report = {"settings": settings, "files": [r.as_dict() for r in reports]}
    if report_path:
        write_text(report_path, json.dumps(files_report, indent=2, ensure_ascii=False) + "\n")
    where = f" (full report: {report_path})" if report_path else ""
    problems = _fail_loud(reports, min_kept_fraction)
    if problems:
        raise DataError("\n".join(problems) + f"{where}; lower data.min_kept_fraction to accept such losses")
    if not kept:
        reasons = ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "none"
        detail = "; ".join(f"{r.file}: {r.first_reasons(1)}" for r in reports if r.read)
        raise DataError(f"no records left after filtering (read {read}; dropped: {reasons}){where}"
                        + (f": {detail}" if detail else ""))
    return files_report


def split_records(kept: list[Kept], eval_fraction: float, seed: int):
    """(records per output file, token rows per split, prompt keys per side): each record on the side of its
    conversation opening."""
    kinds_by_key: dict[str, set[str]] = {}
    for record_kind, _, key, _ in kept:
        kinds_by_key.setdefault(key, set()).add(record_kind)
    held_out = eval_keys(kinds_by_key, eval_fraction, seed)
    files: dict[str, list[dict]] = {
        f"{OUTPUT_PREFIX[k]}_{s}.jsonl": [] for k in KINDS for s in ("train", "eval")
    }
    token_rows: dict[str, list[dict]] = {name: [] for name in token_store.SPLITS}
    for record_kind, out, key, token_row in kept:
        name = f"{OUTPUT_PREFIX[record_kind]}_{'eval' if key in held_out else 'train'}"
        files[f"{name}.jsonl"].append(out)
        if token_row is not None:
            token_rows[name].append(token_row)
    prompts = {"train": len(kinds_by_key) - len(held_out), "eval": len(held_out)}
    return files, token_rows, prompts


def prepare_metrics(files: dict[str, list[dict]], reports: list[_FileReport], kept: int, prompts: dict) -> dict:
    """metrics/prepare.json: records per kind and side, prompts per side, totals, drops per reason, per file."""
    dropped = Counter()
    for r in reports:
        dropped.update(r.dropped)
    metrics: dict = {}
    for k in KINDS:
        for s in ("train", "eval"):
            metrics[f"{k}/{s}"] = len(files[f"{OUTPUT_PREFIX[k]}_{s}.jsonl"])
    metrics["prompts/train"] = prompts["train"]
    metrics["prompts/eval"] = prompts["eval"]
    metrics["files/total"] = len(reports)
    metrics["read/total"] = sum(r.read for r in reports)
    metrics["kept/total"] = kept
    metrics["dropped/total"] = sum(dropped.values())
    metrics["untemplated/total"] = sum(r.untemplated for r in reports)
    for reason in REASONS:
        metrics[f"dropped/{reason}"] = dropped[reason]
    for r in reports:  # per file, for `dvc metrics diff` when a source changes
        metrics[f"file/{r.file}/read"] = r.read
        metrics[f"file/{r.file}/kept"] = r.kept
        metrics[f"file/{r.file}/dropped"] = sum(r.dropped.values())
    return metrics


def run(
    cfg: DataConfig,
    *,
    tokenizer_path: str,
    out_dir: str = "data/prepared",
    metrics_path: str = "metrics/prepare.json",
    report_path: str | None = None,
    runtime: Runtime = Runtime(),
) -> dict:
    """Read, validate, normalise, dedupe and split the sources of `cfg` (the `data` params section) with the
    tokenizer of tokenizer_path; write out_dir and metrics_path. Returns metrics.

    A file that keeps less than `cfg.min_kept_fraction` of its records (or none) fails the stage with its first
    drop reasons. The report (per file: format, read, kept, drops per reason with their first lines) is
    written to `report_path` in every case, failure included, and to `out_dir/report.json` on success.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=runtime.trust_remote_code)
    settings = {"eval_fraction": cfg.eval_fraction, "max_length": cfg.max_length,
                "max_prompt_length": cfg.max_prompt_length, "dedupe": cfg.dedupe, "seed": runtime.seed,
                "min_kept_fraction": cfg.min_kept_fraction, "skip_invalid_json": cfg.skip_invalid_json}

    reports: list[_FileReport] = []
    try:
        kept, reports = read_sources(cfg, tokenizer, reports)
    except DataError as e:  # a record that stops the stage: the report says so too, with the files read until then
        if report_path:
            failed = {"settings": settings, "files": [r.as_dict() for r in reports], "error": str(e)}
            write_text(report_path, json.dumps(failed, indent=2, ensure_ascii=False) + "\n")
        raise
    files_report = check_kept(kept, reports, settings, cfg.min_kept_fraction, report_path)
    files, token_rows, prompts = split_records(kept, cfg.eval_fraction, runtime.seed)
    metrics = prepare_metrics(files, reports, len(kept), prompts)

    report = {**files_report, "totals": metrics}
    tokens = {"tokenizer": tokenizer, "tokenizer_path": tokenizer_path, "max_length": cfg.max_length,
              "max_prompt_length": cfg.max_prompt_length}
    _write_outputs(Path(out_dir), files, token_rows, tokens, report, Path(metrics_path), metrics)

    for r in reports:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items()))
        log.info("%s [%s]: read %d, kept %d%s", r.file, r.format, r.read, r.kept, f", dropped {drops}" if drops else "")
    log.info(
        "prepare: kept %d of %d (sft %d/%d, preference %d/%d, unpaired %d/%d train/eval) -> %s",
        len(kept),
        metrics["read/total"],
        *(metrics[f"{k}/{s}"] for k in KINDS for s in ("train", "eval")),
        out_dir,
    )
    return metrics


@stage_main("prepare")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare canonical SFT / preference / unpaired data.")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from components.core.config import Runtime, load_params
    from components.core.ops.io import resolve_model_path

    params = load_params(args.params)  # a ParamsError / DataError: one line + the input-error mark, exit 2
    for path in stale_fingerprints(FINGERPRINTS, len(params.data.sources)):
        path.unlink()
        log.info("removed %s: data.sources has no source %s any more", path, path.stem)
    metrics = run(params.data, tokenizer_path=resolve_model_path("models/base"), out_dir="data/prepared",
                  metrics_path="metrics/prepare.json", report_path="reports/prepare.json", runtime=Runtime.of(params))
    evaluated = held_out_prompts("data/prepared/pref_eval.jsonl", params.evaluate.num_prompts)
    for warning in data_warnings(metrics, evaluated, params.registry.gate.min_prompts):
        log.warning(warning)
    return 0


FINGERPRINTS = "data/fingerprints"  # the `sources` stages' outputs: src<i>.json for data.sources[i]


def stale_fingerprints(directory: str, num_sources: int) -> list[Path]:
    """Fingerprint files of sources that params no longer list (DVC leaves a removed matrix item's output)."""
    current = {f"src{i}.json" for i in range(num_sources)}
    root = Path(directory)
    return sorted(p for p in root.glob("*.json") if p.name not in current) if root.is_dir() else []


def held_out_prompts(pref_eval_path: str, num_prompts: int) -> int:
    """How many held-out prompts evaluate will score (distinct prompts of pref_eval, at most evaluate.num_prompts)."""
    distinct = {json.dumps(json.loads(line)["prompt"], sort_keys=True)
                for line in Path(pref_eval_path).read_text().splitlines() if line.strip()}
    return len(distinct) if num_prompts == 0 else min(len(distinct), num_prompts)


def data_warnings(metrics: dict, evaluated: int, min_prompts: int) -> list[str]:
    """What the kept data means for the stages after prepare, said before they run (evaluated: held_out_prompts)."""
    out = []
    if metrics.get("sft/train", 0) == 0:
        out.append("no SFT records kept: sft has nothing to train on (add SFT data to data.sources)")
    if metrics.get("preference/train", 0) == 0 and metrics.get("unpaired/train", 0) == 0:
        out.append("no preference or unpaired records kept: reference and dpo have nothing to train on")
    if evaluated < min_prompts:
        out.append(f"evaluate will score {evaluated} held-out prompts < register.gate.min_prompts {min_prompts}: "
                   "alignflow promote will refuse every version (add preference data, raise data.eval_fraction, or "
                   "lower the gate's min_prompts)")
    return out


if __name__ == "__main__":
    sys.exit(main())
