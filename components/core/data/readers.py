"""Reading a user's data files record by record: .jsonl, .json, .csv, .parquet, directories of them, and
hub datasets. Each reader yields (line, record) with the physical line number (1-based row for parquet
and hub datasets), so every later message can say `file:line`.

A file that cannot be read is a `DataError` naming file:line; a .jsonl line whose bytes are not UTF-8
is yielded as `UNDECODABLE` so the caller can drop and count it, and so is a line that is not valid JSON
(`InvalidJSON`, with the parser's message) when the source asks for lenient reading.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


UNDECODABLE = object()  # a jsonl line whose bytes are not UTF-8
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


class InvalidJSON:
    """A .jsonl line that does not parse, yielded instead of raising when reading leniently."""

    def __init__(self, message: str):
        self.message = message


class DataError(ValueError):
    """A broken input file or schema; the message names file:line and field."""


def _read_jsonl(lines: Iterable[bytes], label: str, lenient: bool = False) -> Iterator[tuple[int, object]]:
    """lines: a file opened in binary (read line by line: memory flat in the file's size) or bytes split on \\n."""
    for line_no, raw in enumerate(lines, 1):
        raw = raw.removesuffix(b"\n").rstrip(b"\r")
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield line_no, UNDECODABLE
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            message = f"invalid JSON: {e.msg} (column {e.colno})"
            if not lenient:
                raise DataError(f"{label}:{line_no}: {message} (data.skip_invalid_json: true "
                                "skips such lines and counts them)") from None
            yield line_no, InvalidJSON(message)
            continue
        yield line_no, value


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


def _read_json(data: bytes, label: str, lenient: bool = False) -> Iterator[tuple[int, object]]:
    # surrogateescape: stray bytes inside strings become lone surrogates -> that record drops as bad_utf8
    text = data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_jsonl(data.split(b"\n"), label, lenient)
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

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024):  # a row group at a time, not the whole file
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, ValueError, TypeError) as e:  # pyarrow's errors for a bad file (ArrowException subclasses)
        raise DataError(f"{label}: not a readable parquet file (row {row + 1}): {e}") from None


def _read_file(path: Path, lenient: bool = False) -> Iterator[tuple[int, object]]:
    label = str(path)
    if path.suffix == ".csv":
        yield from _read_csv(path, label)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, label)
    elif path.suffix == ".json":
        yield from _read_json(path.read_bytes(), label, lenient)
    else:
        with open(path, "rb") as f:
            yield from _read_jsonl(f, label, lenient)


def open_hub(name: str, split: str | None, revision: str | None) -> tuple[str, Iterator[tuple[int, object]], dict]:
    """(label, records, provenance) of a hub dataset; provenance records what was read (for lineage)."""
    import datasets  # heavy import; only for hub sources

    try:
        ds = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as e:
        raise DataError(f"{name}: cannot load hub dataset (split={split!r}, revision={revision!r}): {e}") from None
    if isinstance(ds, dict):  # DatasetDict: split=None
        if len(ds) != 1:
            raise DataError(f"{name}: has splits {sorted(ds)}; set `split` on this hub source")
        ds = next(iter(ds.values()))
    provenance = {"name": name, "split": split, "revision": revision,
                  "fingerprint": getattr(ds, "_fingerprint", None), "rows": len(ds)}
    label = f"{name}[{split}]" if split else name
    return label, enumerate(ds, 1), provenance


def open_source(path: str, lenient: bool = False) -> list[tuple[str, Iterator[tuple[int, object]]]]:
    """(label, records) per file of a local source (a file or a directory of files); records yield (line, record)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(
            f for f in p.iterdir() if f.is_file() and f.suffix in EXTENSIONS and not f.name.startswith(".")
        )
        if not files:
            raise DataError(f"{path}: directory holds no {'/'.join(EXTENSIONS)} files")
        return [(str(f), _read_file(f, lenient)) for f in files]
    if p.is_file():
        if p.suffix not in EXTENSIONS:
            raise DataError(f"{path}: unsupported extension {p.suffix!r} (expected {', '.join(EXTENSIONS)})")
        return [(path, _read_file(p, lenient))]
    if HUB_NAME.match(path) and p.suffix not in EXTENSIONS:
        raise DataError(f"{path}: not a local file or directory; a hub dataset goes under data.hub_sources "
                        f"(e.g. {{name: {path}, split: train, revision: <commit>}}), pinned by revision")
    raise DataError(f"{path}: file not found")
