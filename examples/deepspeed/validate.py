"""Validate the ZeRO configs beside this file with DeepSpeed's own config class (needs deepspeed).

    python examples/deepspeed/validate.py

dpolab does not drive DeepSpeed yet (README, "Scaling up"); this checks that the files are what
DeepSpeed accepts, and that its validation rejects a misspelt key.
"""

import json
from pathlib import Path

from deepspeed.runtime.config import DeepSpeedConfig

HERE = Path(__file__).resolve().parent
STAGES = {"zero2.json": 2, "zero3.json": 3}

for name, stage in STAGES.items():
    raw = json.loads((HERE / name).read_text())
    config = DeepSpeedConfig(raw)  # one process: train_batch_size = micro batch x accumulation
    assert config.zero_optimization_stage == stage
    assert config.bfloat16_config.enabled
    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu) == (4, 4)
    raw["zero_optimization"]["stage3_prefetch_bucket"] = 1  # a misspelt key must be refused
    try:
        DeepSpeedConfig(raw)
    except Exception as e:  # DeepSpeed raises a pydantic validation error
        assert "stage3_prefetch_bucket" in str(e)
    else:
        raise AssertionError(f"{name}: DeepSpeed accepted a misspelt key")
    print(f"{name}: valid for DeepSpeed (ZeRO stage {stage}, bf16, micro batch 4)")
