"""--reference-model: π_ref from another model than --model (iterative DPO's "reference = initial policy")."""

import json
import math
import shutil

import pytest
import torch

import dpolab
from conftest import (cached_reference_table, copy_task_rows, independent_logps, make_tiny_llama, make_word_tokenizer,
                      quick_config, save_toy_model, write_jsonl)
from dpolab.errors import ConfigError


def rows_of(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


config = quick_config


@pytest.fixture()
def copy_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", copy_task_rows(24))


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """The same architecture and tokenizer as the tiny model, other random weights."""
    return save_toy_model(tmp_path_factory.mktemp("other-model"), seed=1)


def test_a_copy_of_the_model_as_reference_gives_the_default_run(tmp_path, tiny_model_dir, copy_data):
    same = tmp_path / "same-model"
    shutil.copytree(tiny_model_dir, same)
    default = dpolab.train(config(tmp_path / "a", tiny_model_dir, copy_data))
    other = dpolab.train(config(tmp_path / "b", tiny_model_dir, copy_data, reference_model=str(same)))
    first = rows_of(other.output_dir)[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    drop = lambda row: {k: v for k, v in row.items() if k != "elapsed_s"}  # noqa: E731
    assert [drop(r) for r in rows_of(default.output_dir)] == [drop(r) for r in rows_of(other.output_dir)]


def test_precomputed_reference_is_the_other_model(tmp_path, tiny_model_dir, other_model_dir, copy_data):
    cfg = config(tmp_path / "out", tiny_model_dir, copy_data, reference_model=str(other_model_dir))
    result = dpolab.train(cfg)
    expected = independent_logps(other_model_dir, cfg)
    assert torch.allclose(cached_reference_table(result.output_dir), expected, atol=1e-4)
    # ... and not the policy's own initial weights: those give other numbers
    assert (independent_logps(tiny_model_dir, cfg) - expected).abs().max() > 0.1
    # step 1: policy = tiny model, reference = other model, so the loss is −log σ(β·h) with h from both
    policy = independent_logps(tiny_model_dir, cfg)
    h = (policy[:, 0] - expected[:, 0]) - (policy[:, 1] - expected[:, 1])
    first = rows_of(result.output_dir)[0]
    batch = dpolab.trainer.epoch_batches(len(policy), 8, seed=0, epoch=0)[0]
    want = float(-torch.nn.functional.logsigmoid(cfg.beta * h[batch]).mean())
    assert first["loss"] == pytest.approx(want, abs=1e-4) and abs(want - math.log(2)) > 1e-3


def test_model_reference_holds_the_other_model(tmp_path, tiny_model_dir, other_model_dir, copy_data):
    """--reference model with --reference-model: the same run as the precomputed one."""
    pre = dpolab.train(config(tmp_path / "a", tiny_model_dir, copy_data, reference_model=str(other_model_dir)))
    held = dpolab.train(config(tmp_path / "b", tiny_model_dir, copy_data, reference_model=str(other_model_dir),
                               reference="model"))
    for a, b in zip(rows_of(pre.output_dir), rows_of(held.output_dir)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/chosen"] == pytest.approx(b["rewards/chosen"], abs=1e-5)


def test_kl_monitor_measures_against_the_other_model(tmp_path, tiny_model_dir, copy_data):
    """A copy of --model as reference: the first KL estimate is taken against identical weights."""
    same = tmp_path / "same-model"
    shutil.copytree(tiny_model_dir, same)
    result = dpolab.train(config(tmp_path / "out", tiny_model_dir, copy_data, reference_model=str(same),
                                 kl_eval_steps=1, kl_prompts=4, kl_max_new_tokens=4, max_steps=1,
                                 learning_rate=1e-9))
    kl_rows = [r for r in rows_of(result.output_dir) if "kl" in r]
    assert kl_rows and abs(kl_rows[0]["kl"]) < 1e-3


def test_refusals(tmp_path, tiny_model_dir, copy_data):
    mismatched = tmp_path / "mismatched"  # a word tokenizer over other words: other token ids
    make_tiny_llama(vocab_size=64).save_pretrained(mismatched)
    make_word_tokenizer(["alpha", "beta", "gamma"]).save_pretrained(mismatched)
    with pytest.raises(ConfigError, match="reference_model.*another tokenizer"):
        dpolab.train(config(tmp_path / "out", tiny_model_dir, copy_data, reference_model=str(mismatched)))
    assert not (tmp_path / "out" / "final").exists()
    with pytest.raises(ConfigError, match="reference_model.*folder not found"):
        dpolab.train(config(tmp_path / "out2", tiny_model_dir, copy_data, reference_model=str(tmp_path / "nope")))
    for extra, words in (({"loss": "simpo"}, "reference-free"), ({"lora_r": 4}, "adapter off"),
                         ({"fsdp": True}, "whole on every process"), ({"reference_model": " "}, "empty")):
        with pytest.raises(ConfigError, match=words):
            config(tmp_path / "x", tiny_model_dir, copy_data, **{"reference_model": str(tiny_model_dir), **extra})


def test_dpolab_eval_defaults_to_the_runs_reference_model(tmp_path):
    from dpolab.evaluate import reference_of_run

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("model: runs/round-1/final\nreference_model: ./sft\n")
    assert reference_of_run(str(run / "final")) == "./sft"
    (run / "config.yaml").write_text("model: ./sft\nreference_model: null\n")
    assert reference_of_run(str(run / "final")) == "./sft"
