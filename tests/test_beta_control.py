"""β schedules, the sampled KL estimate, adaptive β (--target-kl) and --max-kl (dpolab.control)."""

import json
import math

import pytest
import torch

import dpolab
from conftest import copy_task_rows, make_tiny_llama, make_word_tokenizer, quick_config, write_jsonl
from dpolab import steps
from dpolab.config import TrainConfig
from dpolab.control import BetaControl, KLMonitor, adapt_scale, beta_at
from dpolab.errors import ConfigError
from dpolab.runtime import Runtime


def rows_of(result):
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def config(tmp_path, model_dir, data, **overrides):
    return quick_config(tmp_path / "out", model_dir, data, **{"max_steps": 5, "warmup_ratio": 0.0, **overrides})


@pytest.fixture()
def copy_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", copy_task_rows(64))


# --- the pure functions ------------------------------------------------------------------------

def test_schedules_at_their_end_points_and_midpoint():
    for kind in ("linear", "cosine"):
        assert beta_at(0, 11, kind, 1.0, 0.1) == pytest.approx(1.0)
        assert beta_at(10, 11, kind, 1.0, 0.1) == pytest.approx(0.1)
        assert beta_at(5, 11, kind, 1.0, 0.1) == pytest.approx(0.55)  # the mean of the end points
        assert beta_at(99, 11, kind, 1.0, 0.1) == pytest.approx(0.1)  # past the end: stays at the end
    assert beta_at(1, 11, "linear", 1.0, 0.1) == pytest.approx(0.91)
    # cosine leaves the start slowly: at p = 1/4 it has covered (1 - cos(π/4))/2 = 14.6% of the way
    assert beta_at(1, 5, "cosine", 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert [beta_at(s, 11, "constant", 0.3, 0.9) for s in (0, 5, 10)] == [0.3, 0.3, 0.3]
    assert beta_at(0, 1, "linear", 0.3, 0.9) == 0.3  # a one-step run trains at the start value


def test_adaptive_update_moves_beta_in_the_right_direction():
    assert adapt_scale(1.0, kl=1.1, target=1.0) == pytest.approx(math.exp(0.1))  # 10% over: up by e^0.1
    assert adapt_scale(1.0, kl=0.9, target=1.0) == pytest.approx(math.exp(-0.1))  # 10% under: down
    assert adapt_scale(2.0, kl=50.0, target=1.0) == pytest.approx(2.0 * math.exp(0.2))  # clipped at +0.2
    assert adapt_scale(2.0, kl=-3.0, target=1.0) == pytest.approx(2.0 * math.exp(-0.2))  # a negative estimate
    assert adapt_scale(1.0, kl=50.0, target=1.0, rate=0.5) == pytest.approx(math.exp(0.1))
    assert adapt_scale(1.5, kl=1.0, target=1.0) == 1.5  # on target: unchanged
    assert adapt_scale(1.5, kl=math.nan, target=1.0) == 1.5


def test_beta_control_combines_schedule_and_adaptive_multiplier():
    c = TrainConfig(model="m", data="d.jsonl", output_dir="o", beta_schedule="linear", beta_start=0.4,
                    beta_end=0.2, kl_eval_steps=3, target_kl=2.0)
    control = BetaControl(c, total_steps=3)
    assert [control.beta(s) for s in range(3)] == pytest.approx([0.4, 0.3, 0.2])
    assert [control.due(s) for s in (1, 2, 3, 6)] == [False, False, True, True]
    control.update(4.0)  # twice the target: clipped, β × e^0.2 from now on
    assert control.beta(1) == pytest.approx(0.3 * math.exp(0.2))
    assert BetaControl(TrainConfig(model="m", data="d.jsonl", output_dir="o", beta=0.7), 10).beta(9) == 0.7


@pytest.mark.parametrize("overrides, field", [
    ({"target_kl": 1.0}, "target_kl"),
    ({"max_kl": 1.0}, "max_kl"),
    ({"beta_start": 0.0}, "beta_start"),
    ({"beta_end": -1.0, "beta_schedule": "linear"}, "beta_end"),
    ({"beta_end": 0.2}, "beta_end"),  # constant schedule: no end
    ({"kl_eval_steps": 0}, "kl_eval_steps"),
    ({"kl_eval_steps": 2, "target_kl": 1.0, "kl_adapt_rate": 0.0}, "kl_adapt_rate"),
    ({"kl_adapt_rate": 2.0}, "kl_adapt_rate"),  # without --target-kl
    ({"kl_eval_steps": 2, "fsdp": True}, "kl_eval_steps"),
])
def test_bad_options_are_refused_by_name(overrides, field):
    with pytest.raises(ConfigError) as e:
        TrainConfig(model="m", data="d.jsonl", output_dir="o", **overrides)
    assert e.value.field == field


# --- the KL estimate --------------------------------------------------------------------------

def test_kl_of_the_initial_policy_is_zero_and_of_a_moved_one_positive():
    tok = make_word_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    c = TrainConfig(model="m", data="d.jsonl", output_dir="o", kl_eval_steps=1, kl_prompts=8, kl_max_new_tokens=6)
    prompts = [tok("copy: red cat")["input_ids"], tok("copy: sun moon star")["input_ids"]] * 4
    monitor = KLMonitor(model, None, prompts, tok, c, Runtime.create("cpu", "fp32"))
    assert next(monitor.ref_model.parameters()).device.type == "cpu" and monitor.ref_model is not model
    same = monitor.estimate()
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["kl_stderr"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # sharper next-token distributions: π moves away from π_ref
    moved = monitor.estimate()
    assert moved["kl"] > 0.1 and moved["kl_stderr"] > 0


# --- in the training loop ---------------------------------------------------------------------

def test_the_loss_receives_the_scheduled_beta(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    seen = []

    def spy(loss_fn, policy, ref, batch, *, beta, **kw):
        seen.append(beta)
        return original(loss_fn, policy, ref, batch, beta=beta, **kw)

    original = steps.preference_objective
    monkeypatch.setattr(steps, "preference_objective", spy)
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, beta_schedule="linear", beta_start=0.5,
                                 beta_end=0.1))
    assert seen == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    assert [r["beta"] for r in rows_of(result)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])


def test_kl_is_logged_every_n_steps(tmp_path, tiny_model_dir, copy_data):
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, kl_eval_steps=2, kl_prompts=8,
                                 kl_max_new_tokens=6, learning_rate=1e-2))
    kl_rows = [r for r in rows_of(result) if "kl" in r]
    assert [r["step"] for r in kl_rows] == [2, 4]
    assert all(math.isfinite(r["kl"]) and r["kl_stderr"] >= 0 and r["beta_next"] == 0.1 for r in kl_rows)


def test_target_kl_raises_beta_when_kl_overshoots(tmp_path, tiny_model_dir, copy_data):
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, kl_eval_steps=1, kl_prompts=16,
                                 kl_max_new_tokens=6, learning_rate=5e-2, target_kl=1e-6, max_steps=4))
    rows = rows_of(result)
    betas = [r["beta"] for r in rows if "beta" in r]
    assert betas == pytest.approx([0.1 * math.exp(0.2 * k) for k in range(4)])  # clipped: × e^0.2 per estimate
    assert all(r["kl"] > 1e-6 for r in rows if "kl" in r)


def test_target_kl_lowers_beta_when_kl_stays_under(tmp_path, tiny_model_dir, copy_data):
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, kl_eval_steps=2, kl_prompts=4,
                                 kl_max_new_tokens=4, target_kl=1e3, max_steps=5))
    betas = [r["beta"] for r in rows_of(result) if "beta" in r]
    assert betas == pytest.approx([0.1, 0.1, 0.1 * math.exp(-0.2), 0.1 * math.exp(-0.2), 0.1 * math.exp(-0.4)])


def test_max_kl_stops_the_run_and_saves_final(tmp_path, tiny_model_dir, copy_data, capsys):
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, kl_eval_steps=2, kl_prompts=8,
                                 kl_max_new_tokens=6, learning_rate=5e-2, max_kl=1e-6, max_steps=10))
    assert result.stopped_early and result.steps == 2
    assert (result.output_dir / "final" / "config.json").is_file()
    assert "exceeds --max-kl" in capsys.readouterr().out


def test_resume_restores_the_adaptive_beta(tmp_path, tiny_model_dir, copy_data):
    kw = dict(kl_eval_steps=1, kl_prompts=4, kl_max_new_tokens=4, target_kl=1e3, max_steps=4, save_steps=2)
    whole = dpolab.train(config(tmp_path / "a", tiny_model_dir, copy_data, **kw))
    resumed = dpolab.train(config(tmp_path / "b", tiny_model_dir, copy_data, **kw,
                                  resume=str(whole.output_dir / "checkpoints" / "step-2")))
    betas = [r["beta"] for r in rows_of(whole) if "beta" in r]
    assert betas == pytest.approx([0.1 * math.exp(-0.2 * k) for k in range(4)])
    # the resumed run logs steps 3 and 4, continuing the decay from the checkpoint's multiplier
    assert [r["beta"] for r in rows_of(resumed) if "beta" in r] == pytest.approx(betas[2:])
