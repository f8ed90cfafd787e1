"""The training loop end to end on tiny models (in process, CPU, fp32)."""

import json
import math

import pytest
import torch

import dpolab
from conftest import copy_task_rows, quick_config, write_jsonl
from dpolab import trainer
from dpolab.config import TrainConfig


def rows_of(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def config(tmp_path, model_dir, data, **overrides):
    return quick_config(tmp_path / "out", model_dir, data, **overrides)


@pytest.fixture()
def copy_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", copy_task_rows(64))


def test_loop_optimizes_a_synthetic_preference_task(tmp_path, tiny_model_dir, copy_data):
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, eval_data=str(copy_data), max_steps=200,
                                 logging_steps=50, warmup_ratio=0.05))
    rows = rows_of(result.output_dir)
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.steps == 200
    # the implicit reward ranks chosen above rejected on (nearly) every training pair
    assert result.eval_metrics["eval_rewards/accuracies"] > 0.9
    assert result.eval_metrics["eval_loss"] < 0.6 < math.log(2)
    assert rows[-1]["eval_rewards/margins"] > 0


def final_params(result):
    return torch.cat([p.detach().flatten() for p in result.model.parameters()])


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, tiny_model_dir, copy_data):
    one = dpolab.train(config(tmp_path / "a", tiny_model_dir, copy_data, batch_size=8, grad_accum=1,
                              max_grad_norm=0.0))
    two = dpolab.train(config(tmp_path / "b", tiny_model_dir, copy_data, batch_size=4, grad_accum=2,
                              max_grad_norm=0.0))
    start = torch.cat([p.flatten() for p in trainer.load_model(
        TrainConfig(model=str(tiny_model_dir), data="x", output_dir="y"), _cpu()).parameters()])
    moved = (final_params(one) - start).abs().max()
    assert moved > 1e-4  # the steps really changed the weights
    # Adam divides by sqrt(v): for gradients near zero, float summation-order noise moves a weight by a
    # visible fraction of one step (lr = 1e-3), so allow 1% of a step per weight and demand ~0 on average.
    diff = (final_params(one) - final_params(two)).abs()
    assert diff.max() < 1e-5 and diff.mean() < 1e-8
    assert rows_of(one.output_dir)[-1]["loss"] == pytest.approx(rows_of(two.output_dir)[-1]["loss"], abs=1e-6)


def _cpu():
    from dpolab.runtime import Runtime

    return Runtime.create("cpu", "fp32")


def test_frozen_model_reference_matches_precomputed(tmp_path, tiny_model_dir, copy_data):
    pre = dpolab.train(config(tmp_path / "pre", tiny_model_dir, copy_data, reference="precompute"))
    ref = dpolab.train(config(tmp_path / "ref", tiny_model_dir, copy_data, reference="model"))
    for a, b in zip(rows_of(pre.output_dir), rows_of(ref.output_dir)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_reference_cache_is_reused(tmp_path, tiny_model_dir, copy_data, capsys):
    cfg = config(tmp_path, tiny_model_dir, copy_data, max_steps=1)
    dpolab.train(cfg)
    caches = list((tmp_path / "out" / "cache").glob("reference-*.pt"))
    assert len(caches) == 1
    capsys.readouterr()
    dpolab.train(cfg)
    assert "reusing cache" in capsys.readouterr().out
    dpolab.train(config(tmp_path, tiny_model_dir, copy_data, max_steps=1, max_length=8, max_prompt_length=5))  # other tokens
    assert len(list((tmp_path / "out" / "cache").glob("reference-*.pt"))) == 2


def test_early_stopping_on_eval_loss(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    losses = iter([1.0, 0.9, 0.95, 0.97, 0.5, 0.4])  # best at the 2nd eval, then 2 without improvement

    def fake_evaluate(*args, **kwargs):
        return {"eval_loss": next(losses)}

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, eval_split=0.25, eval_steps=2,
                                 early_stopping_patience=2, max_steps=100))
    assert result.stopped_early and result.steps == 8
    evals = [r for r in rows_of(result.output_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert (result.output_dir / "final" / "model.safetensors").is_file()


def test_schedule_warmup_and_decay():
    from dpolab.steps import lr_factor

    factors = [lr_factor(s, 10, 2, "linear") for s in range(10)]
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3)
    assert factors[2] == pytest.approx(1.0) and factors[-1] == pytest.approx(1 - 7 / 8)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_same_seed_same_run_and_other_seed_differs(tmp_path, tiny_model_dir, copy_data):
    a = rows_of(dpolab.train(config(tmp_path / "a", tiny_model_dir, copy_data, max_steps=4)).output_dir)
    b = rows_of(dpolab.train(config(tmp_path / "b", tiny_model_dir, copy_data, max_steps=4)).output_dir)
    c = rows_of(dpolab.train(config(tmp_path / "c", tiny_model_dir, copy_data, max_steps=4, seed=1)).output_dir)
    drop = ("elapsed_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert [r["logps/chosen"] for r in a] != [r["logps/chosen"] for r in c]  # another shuffling order


def test_bf16_autocast_path_trains(tmp_path, tiny_model_dir, copy_data):
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, precision="bf16", max_steps=2))
    rows = rows_of(result.output_dir)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)  # reference and policy both in bf16
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert next(result.model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert "precision: bf16" in (result.output_dir / "config.yaml").read_text()


def test_reference_free_loss_skips_the_reference_pass(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    from dpolab import reference

    def refuse(*args, **kwargs):
        raise AssertionError("the reference pass ran for a reference-free loss")

    monkeypatch.setattr(reference.PrecomputedReference, "build", refuse)
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, loss="sft", max_steps=20))
    rows = rows_of(result.output_dir)
    assert rows[-1]["logps/chosen"] > rows[0]["logps/chosen"]  # NLL on chosen goes down
