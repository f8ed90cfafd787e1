"""Read preference data from files, ``datasets`` folders and the Hugging Face Hub.

``load_pairs(source)`` is the one entry point: it reads raw rows (this module) and converts them into
``PreferencePair`` records (``dpolab.data.formats``). Every problem with the source surfaces as a
one-line ``DataError`` naming the file, row and field; no parser exception escapes.

Row numbers are 1-based. For ``.jsonl`` and ``.csv`` they are line numbers in the (decompressed) file,
so an editor jumps straight to them (a CSV header is line 1, its first data row line 2). For ``.json``,
``.parquet`` and ``datasets`` sources they count rows from 1.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import IO, Iterator

from dpolab.data.formats import FORMATS, LoadedData, to_examples, to_pairs
from dpolab.errors import DataError

__all__ = ["FORMATS", "LoadedData", "SUPPORTED_EXTENSIONS", "iter_rows", "load_examples", "load_pairs"]

_BASE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
SUPPORTED_EXTENSIONS = _BASE_EXTENSIONS + tuple(ext + ".gz" for ext in _BASE_EXTENSIONS)

# What a damaged gzip stream raises: BadGzipFile (an OSError) for a bad header, EOFError when
# truncated, zlib.error for corrupt deflate data.
_GZIP_ERRORS = (OSError, EOFError, zlib.error)

Rows = Iterator[tuple[int, dict]]


def load_pairs(source: str | os.PathLike, *, split: str = "train") -> LoadedData:
    """Load preference pairs from a file, a ``save_to_disk`` folder, or a Hub dataset name.

    ``split`` picks the split of a ``DatasetDict`` folder or Hub dataset (a single file or a saved
    ``Dataset`` has only one). The layout (standard, implicit prompt, conversational, ...) is
    detected from the first row; see ``dpolab.data.formats``.
    """
    name = os.fspath(source)
    return to_pairs(iter_rows(name, split=split), source=name)


def load_examples(source: str | os.PathLike, *, split: str = "train") -> LoadedData:
    """Load unpaired examples for KTO (``LoadedData.examples``) from the same sources as ``load_pairs``.

    Rows are ``{"prompt", "completion", "label"}``; a dataset of preference pairs is accepted too and
    each pair becomes a desirable (chosen) and an undesirable (rejected) example.
    """
    name = os.fspath(source)
    return to_examples(iter_rows(name, split=split), source=name)


def iter_rows(source: str | os.PathLike, *, split: str = "train") -> Rows:
    """Yield ``(row number, row dict)`` from any supported source, raising ``DataError`` on problems."""
    name = os.fspath(source)
    if not name.strip():
        raise DataError(repr(name), "no data source given",
                        fix="pass a file, folder or Hub dataset name")
    path = Path(name)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.exists():
        return _read_file(path)
    if _looks_like_path(name):
        raise DataError(name, "file not found",
                        fix="check the path; supported files: " + ", ".join(SUPPORTED_EXTENSIONS))
    return _read_hub(name, split)


def _looks_like_path(name: str) -> bool:
    """True when a missing ``name`` is a file path rather than a Hub id (``name`` or ``org/name``)."""
    return (Path(name).suffix != "" or os.path.isabs(name) or name.startswith(".")
            or name.count("/") > 1 or "\\" in name or name.strip() != name)


def _extension(path: Path) -> str:
    """The supported extension ``path`` ends with, or a DataError listing the supported ones."""
    lower = path.name.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    found = "".join(path.suffixes) or "no extension"
    raise DataError(str(path), f"unsupported file type ({found})",
                    fix="use one of " + ", ".join(SUPPORTED_EXTENSIONS))


def _read_file(path: Path) -> Rows:
    ext = _extension(path)
    if path.stat().st_size == 0:
        raise DataError(str(path), "the file is empty (0 bytes)",
                        fix="write at least one preference pair to it")
    gz = ext.endswith(".gz")
    base = ext[:-3] if gz else ext
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    return readers[base](path, gz)


def _open(path: Path, gz: bool) -> IO[bytes]:
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _gzip_error(path: Path, exc: BaseException, after: str = "") -> DataError:
    where = f" after {after}" if after else ""
    return DataError(str(path), f"the gzip data is truncated or corrupt{where} ({_brief(exc)})",
                     fix="re-download or re-compress the file")


def _brief(exc: BaseException) -> str:
    """The exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {text[0][:200]}" if text else "")


# ---------------------------------------------------------------------------------------------
# JSON Lines and JSON


def _read_jsonl(path: Path, gz: bool) -> Rows:
    """Stream a JSON Lines file one line at a time; blank lines are skipped but still counted."""
    number = 0
    with _open(path, gz) as handle:
        lines = iter(handle)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except _GZIP_ERRORS as exc:
                raise _gzip_error(path, exc, after=f"line {number}") from exc
            number += 1
            if raw.strip():
                yield number, _parse_jsonl_line(path, raw, number)


def _parse_jsonl_line(path: Path, raw: bytes, number: int) -> dict:
    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"byte {exc.start + 1} of the line is not valid UTF-8",
                        row=number, fix="save the file as UTF-8") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(str(path), f"not valid JSON: {exc.msg} at column {exc.colno}", row=number,
                        fix="each line must hold exactly one JSON object") from exc
    if not isinstance(value, dict):
        raise DataError(str(path), f"expected a JSON object, found {_json_kind(value)}", row=number,
                        fix="each line must hold one object like {\"prompt\": ..., \"chosen\": ...}")
    return value


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    return {str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _read_json(path: Path, gz: bool) -> Rows:
    """A JSON file: an array of rows, an object of equal-length columns, or ``{"key": [rows]}``."""
    try:
        with _open(path, gz) as handle:
            data = handle.read()
    except _GZIP_ERRORS as exc:
        raise _gzip_error(path, exc) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(str(path), f"bytes on line {line} are not valid UTF-8",
                        fix="save the file as UTF-8") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(str(path), f"not valid JSON: {exc.msg} at line {exc.lineno} column "
                        f"{exc.colno}",
                        fix="check the file, or use .jsonl (one object per line)") from exc
    return _json_rows(path, _json_table(path, value))


def _json_table(path: Path, value: object) -> list:
    """The list of row objects inside a parsed JSON document, whichever layout it uses."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (inner,) = value.values()
        if isinstance(inner, list) and (not inner or isinstance(inner[0], dict)):
            return inner
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {k: len(v) for k, v in value.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k!r}: {n}" for k, n in lengths.items())
            raise DataError(str(path), f"columns have different lengths ({shown})",
                            fix="every column list must have one entry per row")
        columns = list(value)
        return [dict(zip(columns, cells)) for cells in zip(*value.values())]
    raise DataError(str(path), f"expected an array of row objects, found {_json_kind_doc(value)}",
                    fix='use [{"prompt": ..., "chosen": ..., "rejected": ...}, ...], an object of '
                        'column lists, or {"data": [rows]}')


def _json_kind_doc(value: object) -> str:
    if isinstance(value, dict):
        return "an object that is neither column lists nor a single key holding the rows"
    return _json_kind(value)


def _json_rows(path: Path, table: list) -> Rows:
    for number, row in enumerate(table, 1):
        if not isinstance(row, dict):
            raise DataError(str(path), f"expected a JSON object, found {_json_kind(row)}", row=number,
                            fix="each row must be an object like {\"prompt\": ..., \"chosen\": ...}")
        yield number, row


# ---------------------------------------------------------------------------------------------
# Parquet and CSV


def _read_parquet(path: Path, gz: bool) -> Rows:
    """Stream a Parquet file batch by batch (a ``.parquet.gz`` is decompressed into memory first)."""
    import pyarrow
    import pyarrow.parquet as pq

    target: Path | io.BytesIO = path
    if gz:
        try:
            with _open(path, gz) as handle:
                target = io.BytesIO(handle.read())
        except _GZIP_ERRORS as exc:
            raise _gzip_error(path, exc) from exc
    number = 0
    try:
        for batch in pq.ParquetFile(target).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        after = f" after row {number}" if number else ""
        raise DataError(str(path), f"cannot read the Parquet data{after} ({_brief(exc)})",
                        fix="check that it is a complete Parquet file (re-export or re-download it)"
                        ) from exc


def _read_csv(path: Path, gz: bool) -> Rows:
    """Stream a CSV file with a header row; every value is text, empty cells are empty strings."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # whole transcripts exceed 128 KiB
    line = 0
    try:
        with _open(path, gz) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
            reader = csv.reader(text, strict=True)  # a stray quote is an error, not a merged row
            header = next(reader, None)
            if header is None:
                return
            line = reader.line_num
            for record in reader:
                start, line = line + 1, reader.line_num
                if record:
                    yield start, _csv_row(path, header, record, start)
    except UnicodeDecodeError as exc:
        raise DataError(str(path), "bytes that are not valid UTF-8", row=line + 1,
                        fix="save the file as UTF-8") from exc
    except csv.Error as exc:
        raise DataError(str(path), f"cannot parse CSV ({_brief(exc)})", row=line + 1,
                        fix="check the quoting on that line") from exc
    except _GZIP_ERRORS as exc:
        raise _gzip_error(path, exc, after=f"line {line}") from exc


def _csv_row(path: Path, header: list[str], record: list[str], number: int) -> dict:
    if len(record) != len(header):
        raise DataError(str(path), f"found {len(record)} values but the header has {len(header)} "
                        "columns", row=number, fix="quote values that contain commas or newlines")
    return dict(zip(header, record))


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets: save_to_disk folders and the Hub


def _read_saved_dataset(path: Path, split: str) -> Rows:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and not (path / "state.json").is_file():
        raise DataError(str(path), "is a folder but not one written by datasets' save_to_disk "
                        "(no dataset_dict.json or state.json)",
                        fix="pass a data file (" + ", ".join(SUPPORTED_EXTENSIONS) + ") or a "
                        "save_to_disk folder")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder; report any of them
        raise DataError(str(path), f"cannot load the saved dataset ({_brief(exc)})",
                        fix="re-save it with save_to_disk") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(str(path), f"no split {split!r}; available splits: "
                            + ", ".join(repr(s) for s in loaded), fix="pass one of them as split")
        loaded = loaded[split]
    return _dataset_rows(loaded)


def _read_hub(name: str, split: str) -> Rows:
    """A dataset on the Hugging Face Hub (or in the local ``datasets`` cache), one split."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth, missing repo or split, offline mode, bad data files
        raise DataError(name, f"cannot load Hub dataset {name!r} split {split!r} ({_brief(exc)})",
                        fix="check the dataset name and split; when offline, set HF_HUB_OFFLINE=0 and "
                        "HF_DATASETS_OFFLINE=0 with network access, or pass a local file") from exc
    return _dataset_rows(loaded)


def _dataset_rows(dataset) -> Rows:
    for number, row in enumerate(dataset, 1):
        yield number, dict(row)
