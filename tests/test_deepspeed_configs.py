"""The DeepSpeed ZeRO configs shipped in examples/deepspeed: concrete values (no "auto", which only
the HF Trainer fills). DeepSpeed itself is not installed by CI (its build would pull a CUDA torch);
`python examples/deepspeed/validate.py` checks them with DeepSpeed's own config class where it is.

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
