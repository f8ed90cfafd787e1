"""--streaming: pairs read lazily from JSON Lines, reference log-probs scored in chunks into a memory-mapped
file that equals the in-memory path's table, training from a bounded shuffle buffer, bad combinations refused."""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest
import torch

from dpolab import streaming
from dpolab.config import TrainConfig
from dpolab.data.layout import Layout
from dpolab.prepare import load_model, load_tokenizer, prepare_data
from dpolab.reference import score_pairs
from dpolab.runtime import Runtime
from dpolab.streaming import PairStream, buffer_shuffle, build_reference
from dpolab.toy import copy_task_rows, write_jsonl
from dpolab.trainer import train

from test_cli import invoke, the_error_line

CPU = Runtime(device=torch.device("cpu"), precision="fp32")


@pytest.fixture
def data_file(tmp_path):
    """30 copy-task pairs, with an identical pair (dropped before counting) and one whose completions differ
    only past max_length=12 (dropped by tokenization): the kept pairs' indices are not simply 0..n-1."""
    rows = copy_task_rows(30, seed=3)
    rows[4] = {"prompt": "copy: red", "chosen": " blue", "rejected": " blue"}
    dogs = " dog" * 12
    rows[11] = {"prompt": "copy: red", "chosen": dogs + " red", "rejected": dogs + " blue"}
    return write_jsonl(tmp_path / "prefs.jsonl", rows)


def config_for(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), max_length=12, max_prompt_length=6,
                batch_size=4, progress=False, device="cpu", precision="fp32", max_steps=3)
    return TrainConfig(**{**base, **kw})


def test_stream_yields_the_in_memory_pairs(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK", 7)  # several chunks, so offsets matter
    config = config_for(tiny_model_dir, data_file, tmp_path / "out", streaming=True)
    tok = load_tokenizer(config)
    memory = prepare_data(config_for(tiny_model_dir, data_file, tmp_path / "out"), tok).train
    stream = prepare_data(config, tok).train
    assert isinstance(stream, PairStream) and len(stream) == len(memory) == 28
    streamed = [p for _, _, chunk in stream.chunks() for p in chunk]
    assert streamed == memory  # same ids and the same indices (the pair dropped by tokenization leaves a gap)
    assert [p.index for p in memory][9:11] == [9, 11]  # row 11 is pair 10 (row 4 was dropped before)


def test_memory_mapped_reference_equals_score_pairs(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK", 7)
    config = config_for(tiny_model_dir, data_file, tmp_path / "out", streaming=True)
    tok = load_tokenizer(config)
    stream = prepare_data(config, tok).train
    model = load_model(config, CPU)
    memory = prepare_data(config_for(tiny_model_dir, data_file, tmp_path / "out"), tok).train
    expected = score_pairs(model, memory, CPU, batch_size=5, pad_token_id=tok.pad_token_id, progress=False)
    ref = build_reference(model, {"train": stream}, CPU, cache_dir=tmp_path / "cache", batch_size=3,
                          pad_token_id=tok.pad_token_id, progress=False, say=lambda *a: None, layout=Layout())
    table = ref.tables["train"]
    (path,) = (tmp_path / "cache").glob("reference-stream-*.f32")
    assert path.stat().st_size == 29 * 2 * 4  # one float32 row pair per pair read (29 after the identical one)
    kept = torch.tensor([p.index for p in memory])
    assert torch.allclose(table[kept], expected[kept], atol=1e-5, rtol=0)
    assert torch.isnan(table[10]).all()  # the pair dropped by tokenization has no log-probs
    assert (table[kept] < 0).all()


def test_streaming_training_starts_at_ln2(tiny_model_dir, data_file, tmp_path):
    gz = tmp_path / "prefs.jsonl.gz"
    gz.write_bytes(gzip.compress(data_file.read_bytes()))
    out = tmp_path / "run"
    result = train(config_for(tiny_model_dir, gz, out, streaming=True, max_steps=4, logging_steps=1,
                              learning_rate=1e-3, eval_data=str(data_file)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert result.steps == 4 and "eval_loss" in result.eval_metrics
    assert len(list((out / "cache").glob("reference-stream-*.f32"))) == 1
    assert (out / "final" / "config.json").is_file()


def test_buffer_shuffle_is_a_seeded_bounded_permutation():
    items = list(range(100))
    once = list(buffer_shuffle(iter(items), 10, random.Random(1)))
    assert sorted(once) == items and once != items
    assert once == list(buffer_shuffle(iter(items), 10, random.Random(1)))
    seen = []
    for i, item in enumerate(buffer_shuffle(iter(items), 10, random.Random(2))):
        seen.append(item)
        assert item <= i + 10  # an item leaves the buffer at most 10 places ahead of its reading position


BAD = {
    "no max steps": ([], ["max_steps", "--max-steps"]),
    "eval split": (["--max-steps", "2", "--eval-split", "0.1"], ["eval_split", "--eval-data"]),
    "kto": (["--max-steps", "2", "--loss", "kto"], ["loss", "unpaired"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_combinations_exit_2_with_one_line(name, tiny_model_dir, data_file, tmp_path, capsys):
    extra, needles = BAD[name]
    data = data_file
    out = tmp_path / "out"
    code = invoke(["train", "--model", tiny_model_dir, "--data", data, "--output-dir", out, "--streaming",
                   "--no-progress", *extra])
    assert code == 2
    the_error_line(capsys.readouterr().err, *needles)
    assert not out.exists()
