"""Tokenized pairs cached under OUTPUT_DIR/cache and reused; --num-proc tokenization."""

import json
import os

import pytest
import torch

import dpolab
from conftest import copy_task_rows, quick_config, write_jsonl
from dpolab import prepare
from dpolab.data import tokenize
from dpolab.data.load import load_pairs
from dpolab.prepare import load_tokenizer, prepare_data, save_token_cache


config = quick_config


@pytest.fixture()
def copy_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", copy_task_rows(64))


@pytest.fixture()
def calls(monkeypatch):
    """How many times prepare tokenized a list of pairs."""
    count = {"n": 0}
    real = prepare.tokenize_pairs

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "tokenize_pairs", counting)
    return count


def cache_files(out):
    return sorted((out / "cache").glob("tokenized-*.safetensors"))


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r.get("loss"), r.get("eval_loss")) for r in rows]


def test_second_run_reuses_the_cache_and_trains_identically(tmp_path, tiny_model_dir, copy_data, calls, capsys):
    out = tmp_path / "out"
    first = dpolab.train(config(out, tiny_model_dir, copy_data, eval_split=0.25))
    assert calls["n"] == 2  # train and eval
    assert len(cache_files(out)) == 1
    assert "tokenized pairs: reusing cache" not in capsys.readouterr().out
    first_losses, first_weights = losses(out), {k: v.clone() for k, v in first.model.state_dict().items()}

    second = dpolab.train(config(out, tiny_model_dir, copy_data, eval_split=0.25))
    assert calls["n"] == 2  # not called again
    assert f"tokenized pairs: reusing cache {cache_files(out)[0]}" in capsys.readouterr().out
    assert losses(out)[len(first_losses):] == first_losses  # metrics.jsonl is appended to
    assert second.eval_metrics == first.eval_metrics
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, first_weights[name]), name


def test_cached_pairs_equal_a_fresh_tokenization(tmp_path, tiny_model_dir, hh_path, stories_dir):
    cfg = config(tmp_path / "out", stories_dir, hh_path, max_length=64, max_prompt_length=40, eval_split=0.1)
    tokenizer = load_tokenizer(cfg)
    fresh = prepare_data(cfg, tokenizer)  # no cache: the plain path
    written = prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert written.cache_to is not None
    save_token_cache(written)
    read = prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert read.cache_to is None
    assert (read.train, read.eval) == (fresh.train, fresh.eval)
    assert len(fresh.train) > 1000 and fresh.eval
    assert read.summary[:-1] == fresh.summary
    assert read.summary[-1].startswith("tokenized pairs: reusing cache ")


def test_cache_misses_when_max_length_or_the_data_change(tmp_path, tiny_model_dir, copy_data, calls):
    tokenizer = load_tokenizer(config(tmp_path, tiny_model_dir, copy_data))

    def run(**overrides):
        data = prepare_data(config(tmp_path, tiny_model_dir, copy_data, **overrides), tokenizer,
                            cache_dir=tmp_path / "cache")
        save_token_cache(data)
        return data

    run()
    run()
    assert calls["n"] == 1
    shorter = run(max_length=8, max_prompt_length=5)
    assert calls["n"] == 2 and len(cache_files(tmp_path)) == 2
    assert max(len(p.prompt_ids) + len(p.chosen_ids) for p in shorter.train) <= 8

    rows = copy_task_rows(64)[:40]  # other content: a new fingerprint (size and mtime)
    write_jsonl(copy_data, rows)
    os.utime(copy_data, ns=(1, 1))
    changed = run()
    assert calls["n"] == 3 and len(changed.train) <= 40
    os.utime(copy_data, ns=(2, 2))  # the same content touched: a miss too (only a fingerprint is compared)
    again = run()
    assert calls["n"] == 4 and again.train == changed.train


def test_a_damaged_cache_file_is_rebuilt(tmp_path, tiny_model_dir, copy_data, calls):
    cfg = config(tmp_path, tiny_model_dir, copy_data)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    save_token_cache(data)
    (path,) = cache_files(tmp_path)
    path.write_bytes(path.read_bytes()[:50])
    rebuilt = prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert calls["n"] == 2 and rebuilt.train == data.train and rebuilt.cache_to == path


def test_num_proc_2_gives_what_1_process_gives(hh_path, stories_tokenizer, monkeypatch):
    pairs = load_pairs(hh_path).pairs
    monkeypatch.setattr(tokenize, "PARALLEL_MIN_PAIRS", 0)
    parallel, real = [], tokenize._tokenize_parallel
    monkeypatch.setattr(tokenize, "_tokenize_parallel", lambda *a, **k: parallel.append(1) or real(*a, **k))
    one, one_stats = tokenize.tokenize_pairs(pairs, stories_tokenizer, max_length=48, max_prompt_length=32)
    two, two_stats = tokenize.tokenize_pairs(pairs, stories_tokenizer, max_length=48, max_prompt_length=32,
                                             num_proc=2)
    assert parallel == [1]  # really through the worker processes
    assert two == one
    assert two_stats == one_stats
    assert one_stats.dropped and one_stats.prompt_truncated  # the merge of drops and truncations is exercised
    assert [p.index for p in one] == sorted(p.index for p in one)
