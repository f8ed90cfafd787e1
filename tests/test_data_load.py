"""Reading preference data from every supported source, and the one-line errors for broken ones."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datasets
from dpolab.data.load import LoadedData, load_pairs
from dpolab.errors import DataError

ROWS = [
    {"prompt": "Q1", "chosen": " yes", "rejected": " no", "id": 7},
    {"prompt": "Q2\n", "chosen": "A, b", "rejected": "", "id": 8},
    {"prompt": "Q3", "chosen": " up ", "rejected": " down", "id": 9},
]
# Written by hand: prompt/chosen/rejected verbatim (whitespace kept, empty answer kept, id ignored).
EXPECTED = [("Q1", " yes", " no"), ("Q2\n", "A, b", ""), ("Q3", " up ", " down")]


def triples(data: LoadedData) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in data.pairs]


def gzip_copy(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def assert_one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    """The message is a single line and names every expected part (file, row, field, problem)."""
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# Every source type gives the same pairs


WRITERS = {
    "jsonl": lambda d: write_jsonl(d / "pairs.jsonl", ROWS),
    "json_array": lambda d: _write_json(d / "pairs.json", ROWS),
    "json_columns": lambda d: _write_json(d / "pairs.json", {k: [r[k] for r in ROWS] for k in ROWS[0]}),
    "json_wrapped": lambda d: _write_json(d / "pairs.json", {"data": ROWS}),
    "parquet": lambda d: write_parquet(d / "pairs.parquet", ROWS),
    "csv": lambda d: write_csv(d / "pairs.csv", ROWS),
}


def _write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_file_type_loads_the_same_pairs(tmp_path, kind, gz):
    path = WRITERS[kind](tmp_path)
    if gz:
        path = gzip_copy(path)
        path.with_name(path.name[:-3]).unlink()
    data = load_pairs(path)
    assert triples(data) == EXPECTED
    assert data.format == "standard"
    assert data.rows_read == 3 and data.dropped == {}
    assert data.source == str(path)
    assert {p.source for p in data.pairs} == {str(path)}
    # CSV rows are line numbers (header on line 1; row 2 spans two lines because of "Q2\n").
    assert [p.row for p in data.pairs] == ([2, 3, 5] if kind == "csv" else [1, 2, 3])


def test_jsonl_rows_are_line_numbers_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "gaps.jsonl"
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), json.dumps(ROWS[2]), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    data = load_pairs(path)
    assert [p.row for p in data.pairs] == [1, 4, 5]
    assert data.rows_read == 3


def test_jsonl_accepts_path_string_and_utf8_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "h\u00e9", "chosen": "a", "rejected": "b"}).encode())
    assert triples(load_pairs(str(path))) == [("h\u00e9", "a", "b")]


def test_conversational_parquet_round_trip(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}]}]
    data = load_pairs(write_parquet(tmp_path / "chat.parquet", rows))
    assert data.format == "conversational"
    pair = data.pairs[0]
    assert pair.prompt == [{"role": "user", "content": "hi"}]
    assert pair.chosen == [{"role": "assistant", "content": "hello"}]
    assert pair.rejected == [{"role": "assistant", "content": "go away"}]


def test_save_to_disk_dataset_folder(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    data = load_pairs(tmp_path / "ds")
    assert triples(data) == EXPECTED
    assert [p.row for p in data.pairs] == [1, 2, 3]


def test_save_to_disk_dataset_dict_picks_split(tmp_path):
    other = [{"prompt": "T", "chosen": "c", "rejected": "r"}]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list(other)})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert triples(load_pairs(tmp_path / "dd")) == EXPECTED
    assert triples(load_pairs(tmp_path / "dd", split="test")) == [("T", "c", "r")]


def test_dataset_dict_unknown_split_lists_available(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list(ROWS)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as err:
        load_pairs(tmp_path / "dd", split="validation")
    assert_one_line(err, "dd", "'validation'", "'train'", "'test'")


def test_hub_name_calls_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_pairs("some-org/prefs", split="test")
    assert calls == [("some-org/prefs", {"split": "test"})]
    assert triples(data) == EXPECTED
    assert data.source == "some-org/prefs"
    load_pairs("prefs")
    assert calls[-1] == ("prefs", {"split": "train"})


def test_hub_failure_becomes_data_error_with_fix(monkeypatch):
    def offline(name, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nbecause offline mode is on")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_pairs("some-org/prefs")
    assert_one_line(err, "some-org/prefs", "ConnectionError", "Couldn't reach the Hub",
                    "HF_HUB_OFFLINE=0", "local file")


# ---------------------------------------------------------------------------------------------
# Errors: missing, unsupported, empty


@pytest.fixture
def no_hub(monkeypatch):
    """Fail loudly if a test that expects a path error reaches the Hub loader."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_dataset must not be called for a file path")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv.gz", "nested/dir/data"])
def test_missing_file(tmp_path, no_hub, name):
    with pytest.raises(DataError) as err:
        load_pairs(tmp_path / name)
    assert_one_line(err, name, "file not found")


def test_unsupported_extension_lists_supported(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("hello")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "pairs.txt", "unsupported file type (.txt)", ".jsonl", ".parquet.gz", ".csv")


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError) as err:
        load_pairs(tmp_path / "stuff")
    assert_one_line(err, "stuff", "save_to_disk")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "empty.jsonl", "empty")


def _empty_parquet(path: Path) -> Path:
    schema = pa.schema([(k, pa.string()) for k in ("prompt", "chosen", "rejected")])
    pq.write_table(schema.empty_table(), path)
    return path


@pytest.mark.parametrize("name,make", [
    ("blank.jsonl", lambda p: p.write_text("\n  \n\n")),
    ("blank.jsonl.gz", lambda p: p.write_bytes(gzip.compress(b"\n\n"))),
    ("array.json", lambda p: p.write_text("[]")),
    ("wrapped.json", lambda p: p.write_text('{"data": []}')),
    ("header.csv", lambda p: p.write_text("prompt,chosen,rejected\n")),
    ("zero.parquet", _empty_parquet),
])
def test_no_rows(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, name, "no rows")


# ---------------------------------------------------------------------------------------------
# Errors: bad JSON, bad bytes, bad compression, unreadable files


def test_jsonl_invalid_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": }\n')
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "bad.jsonl", "row 3", "not valid JSON", "column")


@pytest.mark.parametrize("line,found", [("[1, 2]", "an array"), ('"text"', "a string"),
                                        ("5", "a number"), ("null", "null")])
def test_jsonl_line_that_is_not_an_object(tmp_path, line, found):
    path = tmp_path / "scalar.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "scalar.jsonl", "row 2", f"expected a JSON object, found {found}")


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_undecodable_bytes_names_line(tmp_path, gz):
    raw = json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n'
    path = tmp_path / ("latin1.jsonl.gz" if gz else "latin1.jsonl")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, path.name, "row 2", "not valid UTF-8")


def test_json_and_csv_undecodable_bytes(tmp_path):
    js = tmp_path / "latin1.json"
    js.write_bytes(b'[\n{"prompt": "caf\xe9"}]')
    with pytest.raises(DataError) as err:
        load_pairs(js)
    assert_one_line(err, "latin1.json", "line 2", "not valid UTF-8")
    cs = tmp_path / "latin1.csv"
    cs.write_bytes(b"prompt,chosen,rejected\na,b,c\ncaf\xe9,b,c\n")
    with pytest.raises(DataError) as err:
        load_pairs(cs)
    assert_one_line(err, "latin1.csv", "not valid UTF-8")


@pytest.mark.parametrize("kind", ["jsonl", "json_array", "parquet", "csv"])
def test_truncated_gzip(tmp_path, kind):
    plain = WRITERS[kind](tmp_path)
    path = tmp_path / (plain.name + ".gz")
    path.write_bytes(gzip.compress(plain.read_bytes())[:-12])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, path.name, "truncated or corrupt")


def test_file_named_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "fake.jsonl.gz"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "fake.jsonl.gz", "truncated or corrupt", "BadGzipFile")


def test_corrupt_gzip_long_jsonl_names_last_good_line(tmp_path):
    """A stream cut in the middle of a large file reports how far reading got."""
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}" * 50, "rejected": f"r{i}"} for i in range(3000)]
    raw = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    msg = assert_one_line(err, "cut.jsonl.gz", "truncated or corrupt", "after line")
    assert "after line 0 " not in msg


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "junk.parquet", "cannot read the Parquet data")


def test_csv_wrong_number_of_values(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,e,f,g\n")
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "ragged.csv", "row 3", "4 values", "3 columns")


def test_csv_unterminated_quote(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('prompt,chosen,rejected\na,b,c\n"d,e,f\n')
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "quote.csv", "row 3", "cannot parse CSV")


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a",\n   "chosen": "b" "rejected": "c"}\n]')
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "broken.json", "not valid JSON", "line 3")


@pytest.mark.parametrize("doc", ['"just text"', "42", '{"prompt": "a", "chosen": "b", "rejected": "c"}'])
def test_json_document_that_holds_no_rows(tmp_path, doc):
    path = tmp_path / "odd.json"
    path.write_text(doc)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "odd.json", "expected an array of row objects")


def test_json_columns_of_different_lengths(tmp_path):
    path = _write_json(tmp_path / "cols.json", {"prompt": ["a", "b"], "chosen": ["c"], "rejected": ["d", "e"]})
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "cols.json", "different lengths", "'chosen': 1")


def test_json_array_item_that_is_not_an_object(tmp_path):
    path = _write_json(tmp_path / "mixed.json", [ROWS[0], ["a", "b", "c"]])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert_one_line(err, "mixed.json", "row 2", "found an array")
