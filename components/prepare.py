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
import json
import logging
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from components.core.config import DataConfig, Runtime
from components.core.data import records as records_mod
from components.core.data import token_store
from components.core.data.formats import FORMATS, KINDS, REASONS, apply_columns, file_format
from components.core.data.readers import UNDECODABLE, DataError, InvalidJSON, open_hub, open_source
from components.core.data.tokens import chat_markers, template_supports_tools
from components.core.ops.io import atomic_dir, write_text
from components.core.ops.logs import stage_main
from components.core.ops.parallel import ordered_map, resolve_workers

log = logging.getLogger(__name__)

OUTPUT_PREFIX = {"sft": "sft", "preference": "pref", "unpaired": "unpaired"}

MAX_EXAMPLES = 5  # dropped-record locations kept per reason and file in report.json


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


BATCH = 256  # records per job sent to a worker


def _jobs(cfg: DataConfig, reports: list[_FileReport]):
    """((report, locs), ((schema, first_loc, columns), items)) per batch of read items, file after file; a file's
    format is set by its first record here, so the workers check the others against it. A file that cannot be
    read on (or a first record of no format) becomes a failing item in its place, and reading stops there."""
    inputs = _inputs(cfg)
    while True:
        try:
            source, kind, columns, label, records, provenance = next(inputs)
        except StopIteration:
            return
        except DataError as e:  # a source that cannot be opened: the stage stops there, after the files before it
            yield (None, [None]), ((None, "", {}), [(None, records_mod.ERROR, str(e))])
            return
        report = _FileReport(source=source, file=label, hub=provenance)
        reports.append(report)
        ctx, batch = (None, "", columns), []
        try:
            for line, value in records:
                loc = f"{label}:{line}"
                if value is UNDECODABLE:
                    item = (loc, records_mod.UNDECODABLE, None)
                elif isinstance(value, InvalidJSON):
                    item = (loc, records_mod.INVALID_JSON, value.message)
                else:
                    item = (loc, records_mod.RECORD, value)
                    if ctx[0] is None:
                        try:
                            schema = file_format(apply_columns(records_mod.as_record(value, loc), columns), kind, loc)
                        except DataError as e:
                            item = (loc, records_mod.ERROR, str(e))
                        else:
                            if batch:
                                yield (report, [i[0] for i in batch]), (ctx, batch)
                                batch = []
                            ctx = (schema, loc, columns)
                            report.format, report.kind = schema, FORMATS[schema][0]
                batch.append(item)
                if item[1] == records_mod.ERROR:
                    break
                if len(batch) >= BATCH:
                    yield (report, [i[0] for i in batch]), (ctx, batch)
                    batch = []
        except DataError as e:  # the reader's: the file cannot be read on (not a record: not counted as read)
            batch.append((None, records_mod.ERROR, str(e)))
        if batch:
            yield (report, [i[0] for i in batch]), (ctx, batch)
        if batch and batch[-1][1] == records_mod.ERROR:
            return


@dataclass
class Pass1:
    """What read_sources keeps in memory: the kept count and each kept record's prompt key and kind (9 bytes a
    record); the records themselves wait in the spill file, in order."""

    kept: int = 0
    keys: array = field(default_factory=lambda: array("Q"))
    kinds: array = field(default_factory=lambda: array("B"))


def read_sources(cfg: DataConfig, tokenizer, reports: list[_FileReport], spill, seed: int, workers: int = 1) -> Pass1:
    """Read, validate, normalise, dedupe (across sources) and tokenise every record of every source, in order,
    tokenising on `workers` processes: each kept record goes to `spill` (pickled batches of `Outcome.kept`), each
    file gets a report (every drop counted under its reason), appended to `reports` as it starts (so a caller
    holds the files read so far when a record stops the stage). The outcome is the same for any `workers`."""
    settings = {"markers": chat_markers(tokenizer), "tools_ok": template_supports_tools(tokenizer),
                "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "seed": seed}
    seen = records_mod.IdSet() if cfg.dedupe else None
    out = Pass1()
    results = ordered_map(records_mod.process_batch, _jobs(cfg, reports), workers,
                          initializer=records_mod.init_worker, initargs=(tokenizer, settings))
    for (report, locs), outcomes in results:
        kept = []
        for loc, o in zip(locs, outcomes, strict=True):
            if o.status == records_mod.FAILED:
                if loc is not None:  # a record that stops the stage (not a file that cannot be read on)
                    report.read += 1
                raise DataError(o.detail)
            report.read += 1
            report.untemplated += o.untemplated
            if o.status == records_mod.CHECKED and seen is not None and o.rid in seen:
                report.drop("duplicate", loc, f"same content as an earlier record (id {o.rid})")
            elif o.reason:
                report.drop(o.reason, loc, o.detail)
            else:
                if seen is not None:
                    seen.add(o.rid)
                report.kept += 1
                out.keys.append(o.kept[1])
                out.kinds.append(KINDS.index(o.kept[0]))
                kept.append(o.kept[2])
        if kept:
            records_mod.spill_kept(kept, spill)
    out.kept = len(out.keys)
    for r in reports:
        if r.read == 0:
            log.warning("%s: no records", r.file)
        if r.untemplated:
            log.warning("%s: %d records held text already rendered with the chat template (%s); parsed back "
                        "into messages so it is not templated twice", r.file, r.untemplated,
                        ", ".join((settings["markers"] or {}).get("special", [])[:3]))
    return out

def check_kept(kept: int, reports: list[_FileReport], settings: dict, min_kept_fraction: float,
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


def _open_output(path: Path):
    return open(path, "w", encoding="utf-8")


def write_split(spill_path: Path, out_dir: Path, pass1: Pass1, eval_fraction: float, tokens: dict
                ) -> tuple[dict[str, int], dict]:
    """Pass 2: the spilled records, in order, each to the .jsonl and token file of its side (its conversation
    opening's, `records.eval_sides`). Returns (records per output file, prompts per side)."""
    import numpy as np

    flipped, prompts = records_mod.eval_sides(np.frombuffer(pass1.keys, dtype=np.uint64),
                                              np.frombuffer(pass1.kinds, dtype=np.uint8), KINDS, eval_fraction)
    names = [f"{OUTPUT_PREFIX[k]}_{s}" for k in KINDS for s in ("train", "eval")]
    counts = dict.fromkeys((f"{n}.jsonl" for n in names), 0)
    token_writer = token_store.TokenWriter(out_dir, **tokens)
    outputs = {}
    try:
        for name in names:
            outputs[name] = _open_output(out_dir / f"{name}.jsonl")
        with open(spill_path, "rb") as spill:
            for record_kind, key, line, token_row in records_mod.read_kept(spill):
                side = "eval" if records_mod.is_eval(key, eval_fraction, flipped) else "train"
                name = f"{OUTPUT_PREFIX[record_kind]}_{side}"
                outputs[name].write(line)
                counts[f"{name}.jsonl"] += 1
                if token_row is not None:
                    token_writer.add(name, token_row)
    finally:
        for f in outputs.values():
            f.close()
    token_writer.close()
    return counts, prompts


def prepare_metrics(files: dict[str, int], reports: list[_FileReport], kept: int, prompts: dict) -> dict:
    """metrics/prepare.json: records per kind and side, prompts per side, totals, drops per reason, per file."""
    dropped = Counter()
    for r in reports:
        dropped.update(r.dropped)
    metrics: dict = {}
    for k in KINDS:
        for s in ("train", "eval"):
            metrics[f"{k}/{s}"] = files[f"{OUTPUT_PREFIX[k]}_{s}.jsonl"]
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

    workers = resolve_workers(cfg.num_proc)
    reports: list[_FileReport] = []
    tokens = {"tokenizer": tokenizer, "tokenizer_path": tokenizer_path, "max_length": cfg.max_length,
              "max_prompt_length": cfg.max_prompt_length}
    # data/prepared is written as one atomic directory (records, their tokens, the report), then the metrics
    # file: a failure leaves the previous outputs. The kept records wait in a spill file inside it until the split
    # is known; a killed run's temp directory is swept by the next.
    with atomic_dir(out_dir) as tmp:
        spill_path = tmp / ".kept.spill"
        try:
            with open(spill_path, "wb") as spill:
                pass1 = read_sources(cfg, tokenizer, reports, spill, runtime.seed, workers)
        except DataError as e:  # a record that stops the stage: the report says so too, with the files read so far
            if report_path:
                failed = {"settings": settings, "files": [r.as_dict() for r in reports], "error": str(e)}
                write_text(report_path, json.dumps(failed, indent=2, ensure_ascii=False) + "\n")
            raise
        files_report = check_kept(pass1.kept, reports, settings, cfg.min_kept_fraction, report_path)
        files, prompts = write_split(spill_path, tmp, pass1, cfg.eval_fraction, tokens)
        spill_path.unlink()
        metrics = prepare_metrics(files, reports, pass1.kept, prompts)
        report = {**files_report, "totals": metrics}
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")

    for r in reports:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items()))
        log.info("%s [%s]: read %d, kept %d%s", r.file, r.format, r.read, r.kept, f", dropped {drops}" if drops else "")
    log.info(
        "prepare: kept %d of %d (sft %d/%d, preference %d/%d, unpaired %d/%d train/eval) -> %s",
        pass1.kept,
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
