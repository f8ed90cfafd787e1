"""The typed config: docs for every field, validation that names the field, YAML reading."""

import dataclasses

import pytest

from conftest import REPO
from dpolab.config import TrainConfig, field_docs, read_yaml
from dpolab.errors import ConfigError

BASE = dict(model="m", data="d.jsonl", output_dir="out")


def test_every_field_has_a_docstring_and_a_readme_row():
    docs = field_docs()
    readme = (REPO / "README.md").read_text()
    for f in dataclasses.fields(TrainConfig):
        assert len(docs.get(f.name, "")) > 10, f.name
        assert f"| `--{f.name.replace('_', '-')}` |" in readme, f"README config table lacks {f.name}"


@pytest.mark.parametrize("overrides, field", [
    (dict(beta=0), "beta"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_prompt_length=1024, max_length=1024), "max_prompt_length"),
    (dict(eval_split=0.1, eval_data="e.jsonl"), "eval_split"),
    (dict(eval_steps=10), "eval_steps"),
    (dict(early_stopping_patience=2, eval_split=0.1), "early_stopping_patience"),
    (dict(loss="dpoo"), "loss"),
    (dict(lr_scheduler="cosin"), "lr_scheduler"),
    (dict(beta="abc"), "beta"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(progress="maybe"), "progress"),
    (dict(model=""), "model"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{**BASE, **overrides})
    assert err.value.field == field and "\n" not in str(err.value)


def test_values_from_text_are_converted():
    cfg = TrainConfig(**BASE, beta="0.2", batch_size="4", progress="false", max_steps=None)
    assert cfg.beta == 0.2 and cfg.batch_size == 4 and cfg.progress is False


def test_suggestions_for_typos():
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        TrainConfig(**BASE, loss="sigmod")
    with pytest.raises(ConfigError, match="did you mean 'simpo'"):
        TrainConfig(**BASE, loss="sigmoid,simpoo")  # each name of a mix is checked


def test_yaml_keys_with_dashes_and_unknown_keys(tmp_path):
    good = tmp_path / "a.yaml"
    good.write_text("model: m\ndata: d.jsonl\noutput-dir: out\nlearning-rate: 1e-5\n")
    assert TrainConfig.from_yaml(good, beta=0.3).learning_rate == 1e-5
    bad = tmp_path / "b.yaml"
    bad.write_text("model: m\nlearning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        read_yaml(bad)
