"""Multi-objective DPO (--objective NAME=WEIGHT[:PATH]): the weighted loss, its gradient, metrics, config, errors."""

import json
import math

import pytest
import torch
import yaml

import dpolab
from conftest import copy_task_rows, write_jsonl
from dpolab import cli
from dpolab.config import TrainConfig
from dpolab.data.batching import collate
from dpolab.errors import ConfigError, DataError
from dpolab.losses import get_loss
from dpolab.objectives import ObjectiveScales, pair_scales
from dpolab.prepare import load_model, load_tokenizer, prepare_data
from dpolab.reference import ModelReference
from dpolab.runtime import Runtime
from dpolab.steps import pair_losses

BASE = {"model": "org/model", "data": "prefs.jsonl", "output_dir": "runs/x"}


def tagged_rows(names: list[str], seed: int = 0) -> list[dict]:
    """Copy-task rows, the i-th tagged names[i] (None: no objective column)."""
    rows = copy_task_rows(len(names), seed=seed)
    return [{**r, "objective": n} if n else r for r, n in zip(rows, names)]


def cfg(tmp_path, model_dir, data, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "out"), precision="fp32",
                  progress=False, seed=0, learning_rate=1e-3, batch_size=4, max_steps=2, logging_steps=1)
    return TrainConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------
# The weighted loss


def test_pair_scales_match_a_hand_computation():
    # c_k = w_k N / (N_k Σw): weights 0.7 / 0.3, 3 pairs of the first objective and 1 of the second
    assert pair_scales([0.7, 0.3], [3, 1]).tolist() == pytest.approx([0.7 * 4 / 3, 0.3 * 4 / 1])
    # an objective without pairs gets 0 and leaves Σw: weights 1, 5, 3 over counts 2, 0, 2 -> Σw = 4
    assert pair_scales([1.0, 5.0, 3.0], [2, 0, 2]).tolist() == pytest.approx([0.5, 0.0, 1.5])
    # over the whole split, the mean weighted loss is Σ_k w_k mean_k / Σw: (0.7·2 + 0.3·10) / 1 = 4.4
    losses, ids = torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([0, 0, 0, 1])
    assert float((losses * pair_scales([0.7, 0.3], [3, 1])[ids]).mean()) == pytest.approx(4.4)


def _policy_and_reference(config):
    """The tiny policy, moved away from its frozen reference so that per-pair losses differ."""
    rt = Runtime.create("cpu", "fp32")
    model = load_model(config, rt)
    reference = ModelReference(model, rt)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model, reference, rt


def _losses(config, model, reference, rt, objectives=True):
    tok = load_tokenizer(config)
    data = prepare_data(config, tok)
    scales = ObjectiveScales.build(config, {"train": data.train}) if objectives else None
    batch = collate(data.train, tok.pad_token_id)
    return pair_losses(model, batch, reference, get_loss(config.loss), config, rt, "train", objectives=scales), batch


def test_weighted_batch_loss_equals_the_weighted_mean_of_objective_means(tmp_path, tiny_model_dir):
    names = ["a", "b", "a", "a", "b", "a", "a", "b"]  # 5 of a, 3 of b
    config = cfg(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", tagged_rows(names)),
                 objective=["a=0.25", "b=0.75"])
    model, reference, rt = _policy_and_reference(config)
    (plain, _), batch = _losses(config, model, reference, rt, objectives=False)
    plain = plain.detach()
    (weighted, metrics), _ = _losses(config, model, reference, rt)
    assert plain.std() > 1e-3  # the pairs' losses really differ
    ids = batch.objective.tolist()
    mean_a = sum(float(x) for x, k in zip(plain, ids) if k == 0) / 5
    mean_b = sum(float(x) for x, k in zip(plain, ids) if k == 1) / 3
    # the loop's step loss over a whole-data batch: Σ_i c_k ℓ_i / N
    assert float(weighted.detach().sum()) / 8 == pytest.approx(0.25 * mean_a + 0.75 * mean_b, rel=1e-5)
    assert float(metrics["loss"].mean()) == pytest.approx(0.25 * mean_a + 0.75 * mean_b, rel=1e-5)
    assert float(metrics["objective/a/loss"].mean()) == pytest.approx(mean_a, rel=1e-5)
    assert metrics["objective/b/rewards/margins"].shape == (3,)


def _grads(config, model, reference, rt) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    (losses, _), batch = _losses(config, model, reference, rt)
    (losses.sum() / batch.num_pairs).backward()  # what the loop does with one micro-batch
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_weight_zero_removes_an_objectives_gradient(tmp_path, tiny_model_dir):
    rows = tagged_rows(["a", "b"] * 4)
    both = write_jsonl(tmp_path / "both.jsonl", rows)
    only_a = write_jsonl(tmp_path / "a.jsonl", [r for r in rows if r["objective"] == "a"])
    zero_b = cfg(tmp_path, tiny_model_dir, both, objective=["a=1", "b=0"])
    model, reference, rt = _policy_and_reference(zero_b)
    grads = _grads(zero_b, model, reference, rt)
    alone = _grads(cfg(tmp_path, tiny_model_dir, only_a, objective=["a=1"]), model, reference, rt)
    with_b = _grads(cfg(tmp_path, tiny_model_dir, both, objective=["a=1", "b=0.5"]), model, reference, rt)
    assert torch.allclose(grads, alone, atol=1e-7, rtol=1e-5)
    assert (grads - with_b).abs().max() > 1e-4  # b's pairs do move the gradient when weighted


# ---------------------------------------------------------------------------------------------
# Training runs


def test_per_objective_metrics_in_metrics_jsonl(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", tagged_rows(["helpful", "harmless"] * 8))
    held = write_jsonl(tmp_path / "eval.jsonl", tagged_rows(["helpful", "harmless"] * 2, seed=1))
    result = dpolab.train(cfg(tmp_path, tiny_model_dir, data, eval_data=str(held),
                              objective=["helpful=0.7", "harmless=0.3"]))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {f"objective/{n}/{m}" for n in ("helpful", "harmless")
            for m in ("loss", "rewards/accuracies", "rewards/margins")}
    assert keys <= set(rows[0]) and {"eval_" + k for k in keys} <= set(rows[-1])
    assert rows[0]["objective/helpful/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert "objectives: helpful (weight 0.7): 8 train, 2 eval; harmless (weight 0.3): 8 train, 2 eval pairs" \
        in capsys.readouterr().out


def test_objective_files_and_untagged_pairs(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "helpful.jsonl", copy_task_rows(6))  # no objective column: the default
    harmless = write_jsonl(tmp_path / "harmless.jsonl", copy_task_rows(4, seed=2))
    dpolab.train(cfg(tmp_path, tiny_model_dir, data, objective=["helpful=1", f"harmless=2:{harmless}"]))
    out = capsys.readouterr().out
    assert "helpful (weight 1): 6 train; harmless (weight 2): 4 train pairs" in out
    assert f"objective harmless: 4 rows read from {harmless}" in out


def test_untagged_pairs_need_a_single_default_objective(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", tagged_rows(["a", None, "b"]))
    with pytest.raises(DataError, match=r"d.jsonl, row 2, field 'objective': the pair has no 'objective' column"):
        prepare_data(cfg(tmp_path, tiny_model_dir, data, objective=["a=1", "b=1"]), load_tokenizer(
            cfg(tmp_path, tiny_model_dir, data)))


def test_unknown_objective_names_the_row(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", tagged_rows(["a", "a", "helpfull"]))
    config = cfg(tmp_path, tiny_model_dir, data, objective=["a=1", "helpful=1"])
    with pytest.raises(DataError, match=r"d.jsonl, row 3, field 'objective': unknown objective 'helpfull': "
                                        r"--objective lists a, helpful \(add --objective helpfull=WEIGHT"):
        prepare_data(config, load_tokenizer(config))


def test_a_weighted_objective_without_pairs_is_refused(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", tagged_rows(["a", "a"]))
    config = cfg(tmp_path, tiny_model_dir, data, objective=["a=1", "b=1:" + str(data)])
    assert len(prepare_data(config, load_tokenizer(config)).train) == 4  # b's file (the same rows) counts
    config = cfg(tmp_path, tiny_model_dir, data, objective=["a=1", "b=1"])
    with pytest.raises(DataError, match="objective 'b' \\(weight 1\\) has no training pair"):
        prepare_data(config, load_tokenizer(config))


def test_objective_column_must_be_text(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{**copy_task_rows(1)[0], "objective": 3}])
    config = cfg(tmp_path, tiny_model_dir, data, objective=["a=1"])
    with pytest.raises(DataError, match="row 1, field 'objective': expected the name of an objective"):
        prepare_data(config, load_tokenizer(config))


# ---------------------------------------------------------------------------------------------
# Configuration: CLI and YAML forms, bad values


def parse(argv) -> TrainConfig:
    return cli.config_from_args(cli.build_parser().parse_args([str(a) for a in argv]))


def test_cli_repeated_flag_and_yaml_forms(tmp_path):
    flags = ["train", "--model", "org/model", "--data", "prefs.jsonl", "--output-dir", "runs/x"]
    config = parse(flags + ["--objective", "helpful=0.7", "--objective", "harmless=0.3:harmless.jsonl"])
    assert config.objective == ["helpful=0.7", "harmless=0.3:harmless.jsonl"]
    for form in (["helpful=0.7", "harmless=0.3:harmless.jsonl"], {"helpful": 0.7, "harmless": "0.3:harmless.jsonl"},
                 [{"helpful": 0.7}, {"harmless": "0.3:harmless.jsonl"}]):
        path = tmp_path / "exp.yaml"
        path.write_text(yaml.safe_dump({**BASE, "objective": form}, sort_keys=False))
        assert parse(["train", "--config", path]).objective == config.objective
    path.write_text(yaml.safe_dump({**BASE, "objective": ["a=1"]}))  # the flag replaces the file's list
    assert parse(["train", "--config", path, "--objective", "b=2"]).objective == ["b=2"]
    assert TrainConfig(**BASE, objective="a=1").objective == ["a=1"]


@pytest.mark.parametrize("specs, message", [
    (["helpful"], "expected NAME=WEIGHT or NAME=WEIGHT:PATH, got 'helpful'"),
    (["a/b=1"], "expected NAME=WEIGHT"),
    (["a=heavy"], "the weight 'heavy' is not a number"),
    (["a=-0.5", "b=1"], "the weight of 'a' must be finite and >= 0, got -0.5"),
    (["a=nan"], "the weight of 'a' must be finite"),
    (["a=inf"], "the weight of 'a' must be finite"),
    (["a=0", "b=0"], "every weight is 0"),
    (["a=1", "a=2"], "'a' is given more than once"),
    (["a=1:"], "no file after ':'"),
    ([3], "expected text"),
])
def test_bad_objectives_are_refused(specs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**BASE, objective=specs)


def test_objectives_refuse_streaming_and_unpaired_losses():
    with pytest.raises(ConfigError, match="'streaming': cannot be combined with --objective"):
        TrainConfig(**BASE, objective=["a=1"], streaming=True, max_steps=3)
    with pytest.raises(ConfigError, match="'objective': weighs preference pairs, not 'kto'"):
        TrainConfig(**BASE, objective=["a=1"], loss="kto")


def test_cli_reports_an_unknown_objective_in_one_line(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", tagged_rows(["a", "b"]))
    out = tmp_path / "out"
    code = cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                     "--objective", "a=1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "d.jsonl, row 2, field 'objective': unknown objective 'b'" in err
    assert not out.exists()  # nothing written before the data validates


def test_online_pairs_have_no_objective_so_the_two_are_not_combined():
    base = {"model": "m", "data": "d.jsonl", "output_dir": "o", "online": True, "judge": "pkg.mod:reward"}
    with pytest.raises(ConfigError) as info:
        TrainConfig(**base, objective=["helpful=1"])
    assert info.value.field == "objective"
    TrainConfig(**base)  # fine alone
