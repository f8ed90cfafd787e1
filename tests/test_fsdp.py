"""Sharded training (--fsdp, PyTorch FSDP2) under torchrun on CPU with gloo.

The expectation is the single-process run, as for DDP (tests/test_distributed.py): 2 sharded
processes x batch 4 train like 1 process x batch 8, and final/ is a plain model with its weights.
"""

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.config import TrainConfig
from dpolab.errors import ConfigError
from dpolab.toy import copy_task_rows, make_tiny_llama, write_jsonl
from test_distributed import (COMMON, TOL, TORCHRUN, assert_resumed_as_uninterrupted, assert_same_run, copy_for_resume,
                              launch, read_rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """(sharded run, single-process run, torchrun output). 33 pairs in batches of 8: the last step's
    second share is empty, and the reference pass gives process 0 one batch more than process 1, so
    both loops must pad with a batch that does not count (FSDP's all-gathers need every process)."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_jsonl(root / "train.jsonl", copy_task_rows(33, seed=5))
    eval_data = write_jsonl(root / "eval.jsonl", copy_task_rows(3, seed=6))
    args = ["--model", tiny_model_dir, "--data", data, "--eval-data", eval_data, *COMMON]
    assert main(["train", *map(str, args), "--batch-size", "8", "--output-dir", str(root / "single")]) == 0
    proc = launch(TORCHRUN, [*args, "--fsdp", "--batch-size", "4", "--output-dir", root / "fsdp"], root)
    return root / "fsdp", root / "single", proc


def test_fsdp_two_processes_train_as_one_with_twice_the_batch(runs, tiny_model_dir):
    out, single, proc = runs
    assert_same_run(out, single, tiny_model_dir)  # per-step loss, grad norm, eval metrics, final weights
    rows = read_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    for name, weight in load_file(single / "checkpoints" / "step-4" / "model.safetensors").items():
        got = load_file(out / "checkpoints" / "step-4" / "model.safetensors")[name]
        torch.testing.assert_close(got, weight, atol=TOL, rtol=0)
    assert proc.stdout.count("done: 5 steps") == 1


def test_fsdp_final_loads_as_a_plain_model(runs):
    from transformers import AutoModelForCausalLM

    out, single, _ = runs
    got = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).state_dict()
    want = AutoModelForCausalLM.from_pretrained(single / "final", dtype=torch.float32).state_dict()
    assert got.keys() == want.keys()
    for name, weight in want.items():
        assert not hasattr(got[name], "device_mesh")  # whole tensors, not shards
        torch.testing.assert_close(got[name], weight, atol=TOL, rtol=0)


@pytest.mark.parametrize("extra, field", [({"reference": "model"}, "reference")])
def test_fsdp_refuses_what_it_does_not_shard(extra, field):
    base = {"model": "m", "data": "d.jsonl", "output_dir": "o", "fsdp": True}
    with pytest.raises(ConfigError) as info:
        TrainConfig(**base, **extra)
    assert info.value.field == field
    TrainConfig(**{**base, "fsdp": False}, **extra)  # fine without --fsdp


def test_fsdp_resume_continues_as_the_uninterrupted_run(runs, tmp_path, tiny_model_dir):
    """Resume the sharded run from its step-2 checkpoint (whole weights and AdamW state, read by every
    process): steps 3-5 and final/ are those of the run that was never stopped."""
    out, _, _ = runs
    resumed = copy_for_resume(out, tmp_path / "resumed")
    proc = launch(TORCHRUN, ["--config", resumed / "config.yaml", "--output-dir", resumed, "--resume"], tmp_path)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert_resumed_as_uninterrupted(resumed, out)


def test_units_and_mixed_precision():
    from dpolab.sharding import decoder_layers, mixed_precision

    model = make_tiny_llama(vocab_size=20, layers=3)
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 3
    assert list(decoder_layers(model)) == list(model.model.layers)
    assert mixed_precision("bf16").param_dtype == torch.bfloat16
    assert mixed_precision("bf16").reduce_dtype == torch.float32
    assert mixed_precision("fp32").param_dtype is None  # the parameters' own dtype: fp32
