"""Where training rows come from: files, folders and in-memory data, as ``(key, record)`` pairs.

Accepted sources (every dataset class and ``trainer.train(data)`` take any of them):

* a ``.jsonl``/``.ndjson`` file: one JSON object per line (blank lines skipped);
* a ``.json`` file: an array of objects (pretty-printed or not), or JSON Lines under a ``.json``
  name (what ``datasets.Dataset.to_json`` writes);
* a ``.parquet`` file, read with ``pyarrow`` when it is installed;
* a folder in mlx-lm's layout (``train.jsonl``, ``valid.jsonl``, ``test.jsonl``): its train split;
* a Python list (or tuple) of dicts;
* a Hugging Face ``datasets.Dataset`` (or a ``DatasetDict``: its ``train`` split), recognised by
  its type's module, so ``datasets`` is never imported here.

A record's key says where it came from in every :class:`DataError`: the 1-based line of a JSON Lines
file; the 0-based row of an array, a parquet file or in-memory data (with the line of a JSON array
element when there is one). :class:`SourceName` turns a key into that place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

LINE_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED_SUFFIXES = (*LINE_SUFFIXES, ".json", ".parquet")
#: mlx-lm's data folder: one file per split
SPLITS = ("train", "valid", "test")
_SPLIT_SUFFIXES = (".jsonl", ".json", ".parquet")
_WHITESPACE = " \t\r\n"


class SourceName(str):
    """The name of a data source as messages show it (the file path, ``list``, ``datasets.Dataset``).
    ``kind`` says what a record key is: ``lines`` (a 1-based line), ``array`` (a 0-based row whose
    line is ``lines[row]``) or ``rows`` (a 0-based row, no line)."""

    def __new__(cls, name, kind: str = "lines", lines: list[int] | None = None):
        self = super().__new__(cls, str(name))
        self.kind, self.lines = kind, lines
        return self

    def locate(self, key) -> tuple[int | None, int | None]:
        """``(line, row)`` of record ``key``."""
        if key is None or self.kind == "lines":
            return key, None
        if self.kind == "array" and self.lines is not None and 0 <= key < len(self.lines):
            return self.lines[key], key
        return None, key

    def where(self, key) -> str:
        """Record ``key`` as messages name it: ``file:line``, ``file:line (row r)`` or ``name row r``."""
        return place(self, *self.locate(key))


def place(file, line: int | None, row: int | None) -> str:
    where = str(file) + (f":{line}" if line is not None else "")
    if row is not None:
        where += f" (row {row})" if line is not None else f" row {row}"
    return where


class DataError(ValueError):
    """Bad training data. ``file``, ``line`` (1-based, or None), ``row`` (0-based index in an array
    or in-memory data, or None) and ``field`` say where. Given a :class:`SourceName`, ``line`` is a
    record key and is turned into the line and row it stands for."""

    def __init__(self, file, line: int | None, field: str | None, problem: str, more: int = 0, *,
                 row: int | None = None):
        if isinstance(file, SourceName) and row is None:
            line, row = file.locate(line)
        self.file, self.line, self.row, self.field, self.problem = str(file), line, row, field, problem
        where = place(self.file, line, row)
        what = f" field '{field}':" if field else ""
        unit = "line" if row is None else "row"
        extra = f" (and {more} more bad {unit}{'s' if more != 1 else ''})" if more else ""
        super().__init__(f"{where}:{what} {problem}{extra}")

    def counting(self, more: int) -> DataError:
        """This error, saying that ``more`` other records are bad too."""
        return DataError(self.file, self.line, self.field, self.problem, more=more, row=self.row)


def collect_errors(errors: list[DataError]) -> None:
    """Raise the first of ``errors`` (counting the others), if any."""
    if errors:
        raise errors[0].counting(len(errors) - 1)


# ------------------------------------------------------------------------------------------ files
def _text(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, line, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def read_jsonl(path) -> list[tuple[int, dict]]:
    """Parse a JSONL file into ``(line_number, record)`` pairs; blank lines are skipped."""
    path = Path(path)
    _check_file(path)
    records, errors = [], []
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    # Split on newline bytes only: JSON strings may hold U+2028 and friends, which str.splitlines
    # would treat as line breaks.
    for n, data in enumerate(raw.split(b"\n"), start=1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(DataError(path, n, None, f"not UTF-8 text (byte 0x{data[e.start]:02x} at byte "
                                                   f"{e.start + 1} of the line)"))
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(DataError(path, n, None, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        except RecursionError:
            errors.append(DataError(path, n, None, "malformed JSON (nested too deeply)"))
            continue
        if not isinstance(rec, dict):
            errors.append(DataError(path, n, None, f"expected a JSON object, got {type(rec).__name__}"))
            continue
        records.append((n, rec))
    if errors and raw.lstrip().startswith(b"["):
        e = errors[0]
        errors[0] = DataError(e.file, e.line, e.field, e.problem + " (the file looks like a JSON array: name it .json)")
    collect_errors(errors)
    if not records:
        raise DataError(path, None, None, "file is empty (no records)")
    return records


def read_json_array(path) -> tuple[list[int], list[tuple[int, dict]]]:
    """A ``.json`` file holding one array of objects: ``(lines, records)``, records keyed by their
    0-based row, ``lines[row]`` the line where the row starts."""
    path = Path(path)
    text = _text(path)
    dec, lines, rows, errors = json.JSONDecoder(), [], [], []
    pos, line = 0, 1

    def skip(p):
        while p < len(text) and text[p] in _WHITESPACE:
            p += 1
        return p

    def advance(to):  # the line at position ``to`` (positions only move forward)
        nonlocal pos, line
        line += text.count("\n", pos, to)
        pos = to
        return line

    at = skip(0)
    if at >= len(text) or text[at] != "[":
        raise DataError(path, None, None, "expected a JSON array of objects")
    at = skip(at + 1)
    if at < len(text) and text[at] == "]":
        at = skip(at + 1)
    else:
        while True:
            start = advance(at)
            try:
                obj, end = dec.raw_decode(text, at)
            except json.JSONDecodeError as e:
                raise DataError(path, e.lineno, None, f"malformed JSON ({e.msg} at column {e.colno})",
                                row=len(rows)) from None
            except RecursionError:
                raise DataError(path, start, None, "malformed JSON (nested too deeply)", row=len(rows)) from None
            if not isinstance(obj, dict):
                errors.append(DataError(path, start, None, f"expected a JSON object, got {type(obj).__name__}",
                                        row=len(rows)))
            lines.append(start)
            rows.append((len(rows), obj))
            at = skip(end)
            if at < len(text) and text[at] == ",":
                at = skip(at + 1)
                continue
            if at < len(text) and text[at] == "]":
                at = skip(at + 1)
                break
            raise DataError(path, advance(min(at, len(text))), None,
                            "malformed JSON (expected ',' or ']' after this row)", row=len(rows) - 1)
    if at < len(text):
        raise DataError(path, advance(at), None, "malformed JSON (extra data after the array)")
    collect_errors(errors)
    if not rows:
        raise DataError(path, None, None, "file is empty (no records)")
    return lines, rows


def _read_json(path: Path) -> tuple[SourceName, list[tuple[int, dict]]]:
    """An array of objects, or JSON Lines under a ``.json`` name."""
    head = _text(path).lstrip(_WHITESPACE)
    if head.startswith("["):
        lines, rows = read_json_array(path)
        return SourceName(path, "array", lines), rows
    try:
        return SourceName(path), read_jsonl(path)
    except DataError as e:
        try:
            whole = json.loads(head)
        except (json.JSONDecodeError, RecursionError):
            raise e from None
        if isinstance(whole, dict):
            raise DataError(path, None, None, "holds one JSON object; expected an array of rows ([{...}, ...]) "
                                              "or JSON Lines (one object per line)") from None
        raise


def _read_parquet(path: Path) -> tuple[SourceName, list[tuple[int, dict]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, None, None, "reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a damaged file
        raise DataError(path, None, None, f"not a readable parquet file ({type(e).__name__}: {e})") from None
    name = SourceName(path, "rows")
    return name, _rows(name, table.to_pylist())


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, None, "is a directory, expected a .jsonl file")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(path, None, None, f"unsupported file type '{path.suffix}'; expected JSON Lines (.jsonl), "
                                          "a JSON array (.json) or parquet (.parquet)")


def split_file(folder, split: str) -> Path | None:
    """The file of ``split`` (``train``/``valid``/``test``) in an mlx-lm data folder, or None."""
    for suffix in _SPLIT_SUFFIXES:
        f = Path(folder) / f"{split}{suffix}"
        if f.is_file():
            return f
    return None


def data_splits(path) -> dict[str, Path]:
    """The split files of an mlx-lm data folder (``{"train": .../train.jsonl, "valid": ...}``); a file
    is its own ``train`` split."""
    path = Path(path)
    if not path.is_dir():
        return {"train": path}
    return {s: f for s in SPLITS if (f := split_file(path, s)) is not None}


def _folder(path: Path) -> Path:
    found = split_file(path, "train")
    if found is None:
        have = sorted(p.name for p in path.iterdir())[:8]
        raise DataError(path, None, None, "is a folder without train.jsonl (mlx-lm's layout: train.jsonl, "
                                          f"valid.jsonl, test.jsonl); it holds: {', '.join(have) or 'nothing'}")
    return found


def read_file(path) -> tuple[SourceName, list[tuple[int, dict]]]:
    """Records of a file (or of an mlx-lm folder's train split), by suffix."""
    path = Path(path)
    if path.is_dir():
        path = _folder(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    return SourceName(path), read_jsonl(path)


# ------------------------------------------------------------------------------------------ in memory
def is_hf_dataset(data) -> bool:
    """A Hugging Face ``datasets`` object (Dataset, DatasetDict, IterableDataset), known by its type's
    module: ``datasets`` is not imported to find out."""
    module = type(data).__module__ or ""
    return module == "datasets" or module.startswith("datasets.")


def is_data_source(data) -> bool:
    """Whether ``data`` is something :func:`load_records` reads (rather than a built dataset)."""
    return isinstance(data, (str, os.PathLike, list, tuple)) or is_hf_dataset(data)


def _rows(name: SourceName, rows) -> list[tuple[int, dict]]:
    out, errors = [], []
    for i, rec in enumerate(rows):
        if isinstance(rec, Mapping):
            out.append((i, dict(rec)))
        else:
            errors.append(DataError(name, i, None, f"expected a dict (one record), got {type(rec).__name__}"))
    collect_errors(errors)
    if not out:
        raise DataError(name, None, None, "is empty (no records)")
    return out


def _hf_rows(data) -> tuple[SourceName, list[tuple[int, dict]]]:
    if isinstance(data, Mapping):  # a DatasetDict: its train split
        if "train" not in data:
            raise DataError(SourceName(f"datasets.{type(data).__name__}", "rows"), None, None,
                            f"has no 'train' split (has: {', '.join(map(str, data))}); pass one split")
        data = data["train"]
    name = SourceName(f"datasets.{type(data).__name__}", "rows")
    return name, _rows(name, iter(data))


def load_records(data) -> tuple[SourceName, list[tuple[int, dict]]]:
    """``(name, [(key, record), ...])`` of any accepted source (see the module doc)."""
    if isinstance(data, (str, os.PathLike)):
        return read_file(data)
    if isinstance(data, (list, tuple)):
        name = SourceName("list", "rows")
        return name, _rows(name, data)
    if is_hf_dataset(data):
        return _hf_rows(data)
    raise TypeError(f"expected training data as a path (.jsonl, .json, .parquet, or an mlx-lm folder), a list of "
                    f"dicts or a datasets.Dataset, got {type(data).__name__}")
