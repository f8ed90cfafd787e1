"""--streaming reads every source --data takes (CSV, Parquet and JSON files; save_to_disk folders, folders of
data files and Hub names through datasets' IterableDataset): the same pairs with the same row numbers, and the same
one-line errors naming the row, as the in-memory readers; an unreachable Hub is a clear error."""

from __future__ import annotations

import csv
import gzip
import json
import math

import pytest

from dpolab.data.formats import LoadedData, iter_pairs
from dpolab.data.load import load_pairs
from dpolab.data.stream import stream_rows
from dpolab.errors import DataError
from dpolab.prepare import load_tokenizer, prepare_data
from dpolab.toy import copy_task_rows, write_jsonl
from dpolab.trainer import train

from test_cli import invoke, the_error_line
from test_streaming import config_for


def rows_for_test() -> list[dict]:
    rows = copy_task_rows(20, seed=4)
    rows[3] = {"prompt": "copy: red", "chosen": " blue", "rejected": " blue"}  # dropped: identical
    rows[7]["margin"] = 1.5
    return rows


def write(kind: str, root, rows: list[dict]):
    """``rows`` as a source of kind ``kind``; returns (source, split)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = [{**r, "margin": r.get("margin")} for r in rows]  # one schema for columnar files
    if kind == "csv":
        path = root / "prefs.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["prompt", "chosen", "rejected", "margin"])
            writer.writeheader()
            writer.writerows({**r, "margin": "" if r["margin"] is None else r["margin"]} for r in table)
        return path, "train"
    if kind == "parquet":
        path = root / "prefs.parquet"
        pq.write_table(pa.Table.from_pylist(table), path)
        return path, "train"
    if kind in ("json", "json.gz"):
        path = root / f"prefs.{kind}"
        text = json.dumps(rows).encode()
        path.write_bytes(gzip.compress(text) if kind.endswith(".gz") else text)
        return path, "train"
    if kind == "json-object":
        path = root / "prefs-object.json"
        path.write_text(json.dumps({"data": rows}))
        return path, "train"
    if kind == "json-columns":
        path = root / "prefs-columns.json"
        path.write_text(json.dumps({k: [r[k] for r in table] for k in table[0]}))
        return path, "train"
    if kind == "saved":
        path = root / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(table[:2]),
                              "test": datasets.Dataset.from_list(table)}).save_to_disk(str(path))
        return path, "test"
    if kind == "folder":  # a folder of data files, read by load_dataset(folder) as a Hub dataset would be
        path = root / "folder"
        write_jsonl(path / "train.jsonl", table[5:10])  # datasets takes the columns' types from the first file
        write_jsonl(path / "test.jsonl", table)
        return path, "test"
    raise AssertionError(kind)


KINDS = ["csv", "parquet", "json", "json.gz", "json-object", "json-columns", "saved", "folder"]


def streamed_pairs(source, split="train") -> tuple[list, LoadedData]:
    counts = LoadedData(pairs=[], format="", rows_read=0, source=str(source))
    return list(iter_pairs(stream_rows(source, split=split), counts)), counts


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_streams_the_in_memory_pairs(kind, tmp_path):
    rows = rows_for_test()
    source, split = write(kind, tmp_path, rows)
    pairs, counts = streamed_pairs(source, split)
    expected = load_pairs(write_jsonl(tmp_path / "same.jsonl", rows)).pairs  # line n = row n
    first_row = 2 if kind == "csv" else 1  # a CSV row is named by its line; the header is line 1
    assert [(p.prompt, p.chosen, p.rejected, p.margin, p.row) for p in pairs] == [
        (p.prompt, p.chosen, p.rejected, p.margin, p.row - 1 + first_row) for p in expected]
    assert len(pairs) == 19 and pairs[3].row == 5 - 1 + first_row  # row 4 (identical) was dropped
    assert pairs[6].margin == 1.5 and pairs[0].margin is None
    assert counts.rows_read == 20 and counts.dropped == {"identical": 1} and counts.format == "standard"
    if kind != "folder":  # the in-memory reader takes the same source (not a folder of data files)
        assert [(p.prompt, p.row) for p in load_pairs(source, split=split).pairs] == [(p.prompt, p.row) for p in pairs]


@pytest.mark.parametrize("kind", ["parquet", "json", "saved", "folder"])
def test_a_bad_row_gives_the_in_memory_error(kind, tmp_path):
    rows = rows_for_test()
    rows[12]["chosen"] = 7 if kind == "json" else None  # row 13: a number; a null in a text column
    source, split = write(kind, tmp_path, rows)
    with pytest.raises(DataError) as streamed:
        streamed_pairs(source, split)
    if kind != "folder":
        with pytest.raises(DataError) as memory:
            load_pairs(source, split=split)
        assert str(streamed.value) == str(memory.value)
    assert streamed.value.row == 13 and ("number 7" if kind == "json" else "null") in str(streamed.value)
    assert streamed.value.field == "chosen"


def test_a_missing_split_and_an_unreachable_hub_are_one_line_errors(tmp_path, tiny_model_dir, capsys):
    source, _ = write("folder", tmp_path, rows_for_test())
    with pytest.raises(DataError, match="split 'validation'.*--data-split"):
        streamed_pairs(source, "validation")
    out = tmp_path / "out"
    code = invoke(["train", "--model", tiny_model_dir, "--data", "someorg/no-such-set", "--output-dir", out,
                   "--streaming", "--max-steps", "2", "--no-progress"])
    assert code == 2
    the_error_line(capsys.readouterr().err, "someorg/no-such-set", "split 'train' of the Hub dataset", "HF_HUB_OFFLINE")
    assert not out.exists()


def test_streaming_trains_from_a_datasets_iterable_dataset(tiny_model_dir, tmp_path):
    source, split = write("saved", tmp_path, copy_task_rows(24, seed=9))  # read through to_iterable_dataset
    out = tmp_path / "run"
    config = config_for(tiny_model_dir, source, out, streaming=True, max_steps=3, logging_steps=1, data_split=split)
    tok = load_tokenizer(config)
    memory = prepare_data(config_for(tiny_model_dir, source, out, data_split=split), tok).train
    assert [p for _, _, chunk in prepare_data(config, tok).train.chunks() for p in chunk] == memory
    result = train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and result.steps == 3
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1


def test_a_damaged_file_is_one_line(tmp_path, tiny_model_dir, capsys):
    source, _ = write("parquet", tmp_path, rows_for_test())
    source.write_bytes(source.read_bytes()[:200])  # cut: no Parquet footer
    saved, _ = write("saved", tmp_path, rows_for_test())
    (saved / "test" / "dataset_info.json").write_text("{")  # damaged: datasets cannot load it
    capsys.readouterr()  # save_to_disk's progress bar
    code = invoke(["train", "--model", tiny_model_dir, "--data", saved, "--data-split", "test", "--output-dir",
                   tmp_path / "out", "--streaming", "--max-steps", "2", "--no-progress"])
    assert code == 2
    the_error_line(capsys.readouterr().err, "saved", "cannot stream the rows", "check the data")
    code = invoke(["train", "--model", tiny_model_dir, "--data", source, "--output-dir", tmp_path / "out",
                   "--streaming", "--max-steps", "2", "--no-progress"])
    assert code == 2
    the_error_line(capsys.readouterr().err, "prefs.parquet", "cannot read the Parquet data", "complete Parquet")
