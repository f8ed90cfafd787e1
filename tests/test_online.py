"""Online DPO (--online, dpolab.online): pairs sampled from the policy being trained, judged, trained on."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dpolab
from conftest import copy_task_rows, quick_config, write_jsonl
from dpolab import online, trainer
from dpolab.data.batching import collate
from dpolab.data.tokenize import TokenizedPair
from dpolab.errors import ConfigError
from dpolab.reference import PrecomputedReference

SEEN: list[list[str]] = []
"""Every list of completions the test judge was asked to score."""


def longer(prompts, completions):
    """The test judge: longer completions are better (a reward of the text's length in characters)."""
    SEEN.append(list(completions))
    return [float(len(c)) for c in completions]


JUDGE = f"{__name__}:longer"


def rows_of(result):
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def config(tmp_path, model_dir, data, **overrides):
    return quick_config(tmp_path / "out", model_dir, data, **{
        "learning_rate": 1e-2, "batch_size": 4, "warmup_ratio": 0.0, "online": True, "judge": JUDGE,
        "online_max_new_tokens": 6, **overrides})


@pytest.fixture()
def copy_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", copy_task_rows(16))


@pytest.fixture()
def draws(monkeypatch):
    """Every OnlineDraw the run produced, with the optimizer step it was drawn for."""
    out = []
    original = online.OnlinePairs.sample

    def spy(self, step):
        drawn = original(self, step)
        out.append((step, drawn))
        return drawn

    monkeypatch.setattr(online.OnlinePairs, "sample", spy)
    return out


def test_online_metrics_are_logged_at_every_online_step(tmp_path, tiny_model_dir, copy_data):
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, max_steps=5, online_every=2,
                                 online_prompts=3))
    rows = [r for r in rows_of(result) if "online/pairs" in r]
    assert [r["step"] for r in rows] == [1, 3, 5]  # before 0-based steps 0, 2, 4
    for r in rows:
        assert r["online/pairs"] + r["online/ties"] == 3
        assert r["online/judge_reward"] > 0
    assert any(r["online/pairs"] > 0 for r in rows)


def test_chosen_has_the_higher_judge_score_and_the_pair_holds_the_sampled_ids(tmp_path, tiny_model_dir,
                                                                              copy_data, draws):
    SEEN.clear()
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, max_steps=2, online_prompts=6,
                                 online_samples=3))
    pairs = [(p, row) for _, d in draws for p, row in zip(d.pairs, d.rows)]
    assert len(pairs) >= 6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for pair, row in pairs:
        assert len(row["chosen"]) > len(row["rejected"]) and row["chosen_score"] > row["rejected_score"]
        # the trained ids are the sampled ones: they decode to the judged texts
        assert tok.decode(pair.chosen_ids, skip_special_tokens=True).split() == row["chosen"].split()
        assert tok.decode(pair.rejected_ids, skip_special_tokens=True).split() == row["rejected"].split()
        assert pair.index >= 16  # above every dataset index
        assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 6 + 6
    # best-worst of 3: the judged samples are 6 prompts x 3, the logged mean is over all 18 of them
    logged = [r["online/judge_reward"] for r in rows_of(result) if "online/judge_reward" in r]
    assert [len(s) for s in SEEN] == [18, 18]
    assert logged == pytest.approx([sum(map(len, s)) / 18 for s in SEEN])
    indices = [p.index for p, _ in pairs]
    assert len(set(indices)) == len(indices)


def _sequence_logp(model, prompt, completion):
    """log π(completion | prompt): a plain forward, summed log-softmax over the completion tokens."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1:].sum()


def test_the_step_gradient_is_that_of_one_batch_of_offline_and_online_pairs(tmp_path, tiny_model_dir, draws,
                                                                              monkeypatch):
    rows = copy_task_rows(4, seed=3)
    data = write_jsonl(tmp_path / "four.jsonl", rows)
    grads = {}
    original_clip = trainer.clip_gradients

    def record(model, max_norm):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return original_clip(model, max_norm)

    monkeypatch.setattr(trainer, "clip_gradients", record)
    cfg = config(tmp_path, tiny_model_dir, data, max_steps=1, online_prompts=4, max_grad_norm=0.0, beta=0.5)
    dpolab.train(cfg)
    (_, drawn), = draws
    assert drawn.pairs, "no online pair to test with"
    # by hand: the 4 data pairs (tokenized here) and the online pairs, one mean over all of them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.eos_token_id
    offline = [(tok(r["prompt"])["input_ids"], tok(r["chosen"], add_special_tokens=False)["input_ids"] + [eos],
                tok(r["rejected"], add_special_tokens=False)["input_ids"] + [eos]) for r in rows]
    everything = offline + [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in drawn.pairs]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    losses = []
    for prompt, chosen, rejected in everything:
        c, r = _sequence_logp(model, prompt, chosen), _sequence_logp(model, prompt, rejected)
        margin = (c - c.detach()) - (r - r.detach())  # π = π_ref at the first step
        losses.append(-F.logsigmoid(0.5 * margin))
    torch.stack(losses).mean().backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    assert set(grads) == set(expected)
    assert max(float((grads[n] - expected[n]).abs().max()) for n in grads) < 1e-6
    assert max(float(g.abs().max()) for g in expected.values()) > 1e-4  # a real gradient


def test_sampling_runs_without_grad_in_eval_mode_and_training_resumes(tmp_path, tiny_model_dir, copy_data,
                                                                       monkeypatch):
    seen, forwards = [], []
    original_sample, original_losses = online.sample_batch, trainer.pair_losses

    def sample_spy(model, *args, **kwargs):
        seen.append((model.training, torch.is_grad_enabled()))
        return original_sample(model, *args, **kwargs)

    def losses_spy(model, batch, *args, **kwargs):
        forwards.append((model.training, torch.is_grad_enabled()))
        return original_losses(model, batch, *args, **kwargs)

    monkeypatch.setattr(online, "sample_batch", sample_spy)
    monkeypatch.setattr(trainer, "pair_losses", losses_spy)
    dpolab.train(config(tmp_path, tiny_model_dir, copy_data, max_steps=2))
    assert seen and all(s == (False, False) for s in seen)
    assert forwards and all(f == (True, True) for f in forwards)


def test_online_only_trains_on_sampled_pairs_alone(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    indices = []
    original = trainer.pair_losses

    def spy(model, batch, *args, **kwargs):
        indices.extend(batch.index.tolist())
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(trainer, "pair_losses", spy)
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, online_only=True, online_prompts=5))
    online_rows = [r for r in rows_of(result) if "online/pairs" in r]
    assert len(indices) == sum(r["online/pairs"] for r in online_rows) > 0
    assert min(indices) >= 16


def test_identical_reruns_give_identical_metrics(tmp_path, tiny_model_dir, copy_data):
    a = dpolab.train(config(tmp_path / "a", tiny_model_dir, copy_data, max_steps=3))
    b = dpolab.train(config(tmp_path / "b", tiny_model_dir, copy_data, max_steps=3))
    assert without_time(rows_of(a)) == without_time(rows_of(b))
    c = dpolab.train(config(tmp_path / "c", tiny_model_dir, copy_data, max_steps=3, seed=1))
    assert [r for r in rows_of(a) if "online/pairs" in r] != [r for r in rows_of(c) if "online/pairs" in r]


def test_resume_continues_the_same_online_run(tmp_path, tiny_model_dir, copy_data):
    kw = dict(max_steps=4, save_steps=2)
    whole = dpolab.train(config(tmp_path / "a", tiny_model_dir, copy_data, **kw))
    resumed = dpolab.train(config(tmp_path / "b", tiny_model_dir, copy_data, **kw,
                                  resume=str(whole.output_dir / "checkpoints" / "step-2")))
    tail = [r for r in without_time(rows_of(whole)) if r["step"] > 2]
    assert [r["step"] for r in tail] == [3, 3, 4, 4]
    assert without_time(rows_of(resumed)) == tail


def test_a_precomputed_reference_is_switched_to_the_model_and_says_so(tmp_path, tiny_model_dir, copy_data, capsys):
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, max_steps=1))
    assert "using --reference model" in capsys.readouterr().out
    assert "reference: model" in (result.output_dir / "config.yaml").read_text()


def test_the_precomputed_reference_refuses_pairs_it_never_scored():
    reference = PrecomputedReference({"train": torch.zeros(3, 2)})
    known = collate([TokenizedPair([1, 5], [6, 2], [7, 2], 2)], 0)
    assert reference.logps(known, "train")[0].tolist() == [0.0]
    fresh = collate([TokenizedPair([1, 5], [6, 2], [7, 2], 3)], 0)
    with pytest.raises(KeyError, match="--reference model"):
        reference.logps(fresh, "train")


def test_prompts_are_taken_in_turn_and_sharded_runs_are_refused():
    cfg = SimpleNamespace(online_prompts=2, batch_size=8, online_every=2)
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    pairs = online.OnlinePairs(cfg, None, tok, None, [[1], [2], [3]], 10, SimpleNamespace(world_size=1))
    assert [pairs.step_prompts(s) for s in (0, 2, 4)] == [[[1], [2]], [[3], [1]], [[2], [3]]]
    assert [pairs.due(s) for s in range(4)] == [True, False, True, False]
    with pytest.raises(ConfigError, match="one process"):
        online.OnlinePairs(cfg, None, tok, None, [[1]], 10, SimpleNamespace(world_size=2))
    # distinct prompts, seeded order
    data = [TokenizedPair([1, k % 3], [4], [5], k) for k in range(9)]
    assert sorted(online.distinct_prompts(data, 0)) == [[1, 0], [1, 1], [1, 2]]
    assert online.step_seed(0, 5) == online.step_seed(0, 5) != online.step_seed(0, 6)


@pytest.mark.parametrize("overrides, field", [
    (dict(judge=None), "judge"),
    (dict(online_every=0), "online_every"),
    (dict(online_samples=1), "online_samples"),
    (dict(online_prompts=0), "online_prompts"),
    (dict(online_temperature=0.0), "online_temperature"),
    (dict(online_only=True, online_every=2), "online_every"),
    (dict(online=False), "judge"),  # a judge without --online does nothing
    (dict(constitution="rules.txt"), "constitution"),
    (dict(streaming=True), "streaming"),
    (dict(loss="kto"), "loss"),
    (dict(fsdp=True), "fsdp"),
])
def test_bad_online_options_are_refused_by_name(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, "m", "d.jsonl", **overrides)
    assert err.value.field == field


def test_a_bad_judge_fails_before_anything_is_written(tmp_path, tiny_model_dir, copy_data):
    with pytest.raises(ConfigError, match="judge"):
        dpolab.train(config(tmp_path, tiny_model_dir, copy_data, judge="no_such_module_xyz:f"))
    assert not (tmp_path / "out").exists()


def test_with_lora_the_reference_is_the_model_with_its_adapter_off(tmp_path, tiny_model_dir, copy_data,
                                                                  monkeypatch):
    built = []
    original = trainer.ModelReference.__init__

    def spy(self, model, rt, **kwargs):
        original(self, model, rt, **kwargs)
        built.append((self, model))

    monkeypatch.setattr(trainer.ModelReference, "__init__", spy)
    result = dpolab.train(config(tmp_path, tiny_model_dir, copy_data, lora_r=4, max_steps=2, kl_eval_steps=2,
                                 kl_prompts=4, kl_max_new_tokens=4))
    (reference, model), = built
    assert reference.model is model  # no copy: the same weights, scored with the adapter off
    rows = rows_of(result)
    assert [r["step"] for r in rows if "online/pairs" in r] == [1, 2]
    kl_rows = [r for r in rows if "kl" in r]  # the KL monitor shares that reference too
    assert [r["step"] for r in kl_rows] == [2] and math.isfinite(kl_rows[0]["kl"])
