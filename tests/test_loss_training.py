"""Every loss trains: twenty high-learning-rate steps on the tiny copy task move the implicit rewards the
way the loss promises. Also: reference-free losses skip the reference forward, TR-DPO moves the reference."""

import json

import pytest
import torch

import dpolab
from conftest import copy_task_rows, make_tiny_llama, write_jsonl
from dpolab import reference as reference_module
from dpolab import trainer
from dpolab.config import TrainConfig
from dpolab.losses import LOSSES
from dpolab.reference import ModelReference, sync_reference
from dpolab.runtime import Runtime

STEPS = 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: a tiny model's matmuls gain nothing from two, and on shared, busy cores two
    threads waiting for each other made these runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Per-loss settings for the test: simpo's beta is the paper's scale; discopop's paper tau = 0.05 has a local
# minimum just below h = 0 (see test_losses.py), so from policy = reference it is trained with a larger tau.
OVERRIDES = {"simpo": dict(beta=2.0), "robust": dict(label_smoothing=0.1), "discopop": dict(discopop_tau=0.2)}
CASES = [(name, OVERRIDES.get(name, {})) for name in sorted(LOSSES) if name not in ("dpo", "kto", "reward")] + [
    ("sigmoid,sft", dict(loss_weights="1,0.5")),
    ("sigmoid", dict(f_divergence="js")),
    ("sigmoid", dict(f_divergence="alpha", f_alpha=0.5)),
    ("sigmoid", dict(wpo=True)),
    ("ipo", dict(ld_alpha=0.5)),
]


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    rows = copy_task_rows(32)
    for i, row in enumerate(rows[::2]):  # rejected answers of other lengths, so that LD-DPO has tails to weigh
        row["rejected"] = " " + " ".join(row["rejected"].split()[: 2 + i % 4] * 2)
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def train(tmp_path, model_dir, data, loss, **overrides):
    values = dict(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "out"), precision="fp32", loss=loss,
                  learning_rate=2e-2, batch_size=8, max_steps=STEPS, logging_steps=STEPS, warmup_ratio=0.0,
                  progress=False)
    result = dpolab.train(TrainConfig(**{**values, **overrides}))
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss, overrides", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_loss_raises_the_margin(tmp_path, tiny_model_dir, copy_data, loss, overrides):
    first, last = train(tmp_path, tiny_model_dir, copy_data, loss, **overrides)
    assert first["step"] == 1 and last["step"] == STEPS
    if loss == "apo_down":  # lowers both likelihoods below the reference, the rejected one more
        assert last["rewards/rejected"] < last["rewards/chosen"] < 0
    assert last["rewards/margins"] > first["rewards/margins"] + 0.02
    assert last["rewards/accuracies"] > 0.5


def test_reference_free_losses_run_one_forward_per_batch(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    calls = []
    real = reference_module.batch_logps

    def counting(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(reference_module, "batch_logps", counting)
    train(tmp_path / "a", tiny_model_dir, copy_data, "simpo", reference="model", max_steps=3)
    assert len(calls) == 3 and len({id(m) for m in calls}) == 1  # the policy only
    calls.clear()
    train(tmp_path / "b", tiny_model_dir, copy_data, "simpo,cpo", reference="model", max_steps=3)
    assert len(calls) == 3
    calls.clear()
    train(tmp_path / "c", tiny_model_dir, copy_data, "sigmoid,sft", reference="model", max_steps=3)
    assert len(calls) == 6 and len({id(m) for m in calls}) == 2  # policy and frozen reference, every batch


def test_sync_reference_by_hand():
    policy, rt = make_tiny_llama(seed=1), Runtime.create("cpu", "fp32")
    ref = ModelReference(make_tiny_llama(seed=2), rt)
    before = [p.detach().clone() for p in ref.model.parameters()]
    config = TrainConfig(model="m", data="d", output_dir="o", reference="model", ref_sync_steps=3, ref_sync_alpha=0.25)
    assert not sync_reference(ref, policy, 2, config)  # only every 3 steps
    assert all(torch.equal(a, b) for a, b in zip(before, ref.model.parameters()))
    assert sync_reference(ref, policy, 3, config)
    for old, new, p in zip(before, ref.model.parameters(), policy.parameters()):
        assert torch.allclose(new, 0.25 * p + 0.75 * old, atol=1e-7)
    assert not sync_reference(None, policy, 3, config)


def test_tr_dpo_moves_the_reference_during_training(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    synced = []

    def spy(reference, model, step, config):
        old = [p.detach().clone() for p in reference.model.parameters()]
        updated = sync_reference(reference, model, step, config)
        if updated:
            for o, new, p in zip(old, reference.model.parameters(), model.parameters()):
                assert torch.allclose(new, 0.5 * p + 0.5 * o, atol=1e-6)
            synced.append(step)
        return updated

    monkeypatch.setattr(trainer, "sync_reference", spy)
    first, last = train(tmp_path, tiny_model_dir, copy_data, "sigmoid", reference="model", ref_sync_steps=2,
                        ref_sync_alpha=0.5, max_steps=6, logging_steps=6)
    assert synced == [2, 4, 6]
    assert last["rewards/margins"] > 0


def test_tr_dpo_is_refused_with_precomputed_reference(tmp_path, tiny_model_dir, copy_data):
    from dpolab.errors import ConfigError

    with pytest.raises(ConfigError, match="--reference model"):
        train(tmp_path, tiny_model_dir, copy_data, "sigmoid", ref_sync_steps=2)
    assert not (tmp_path / "out").exists()
