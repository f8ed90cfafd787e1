"""The DeepSpeed ZeRO configs shipped in examples/deepspeed: concrete values (no "auto", which only
the HF Trainer fills), and valid for DeepSpeed's own config class where deepspeed is installed.

dpolab does not drive DeepSpeed yet (README, "Scaling up"); these files are the starting point.
"""

import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "deepspeed"
STAGES = {"zero2.json": 2, "zero3.json": 3}


def values(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from values(v)
    else:
        yield tree


@pytest.mark.parametrize("name", sorted(STAGES))
def test_configs_are_concrete(name):
    config = json.loads((CONFIGS / name).read_text())
    assert config["zero_optimization"]["stage"] == STAGES[name]
    assert config["bf16"] == {"enabled": True}
    assert "auto" not in [v for v in values(config) if isinstance(v, str)]
    assert "train_batch_size" not in config  # DeepSpeed derives it: micro batch x accumulation x processes


@pytest.mark.parametrize("name", sorted(STAGES))
def test_configs_pass_deepspeeds_validation(name):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((CONFIGS / name).read_text())
    config = DeepSpeedConfig(raw)  # one process: train_batch_size = micro batch x accumulation
    assert config.zero_optimization_stage == STAGES[name]
    assert config.bfloat16_config.enabled
    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu) == (4, 4)
    raw["zero_optimization"]["stage3_prefetch_bucket"] = 1  # a misspelt key: the validation has teeth
    with pytest.raises(Exception, match="stage3_prefetch_bucket"):
        DeepSpeedConfig(raw)
