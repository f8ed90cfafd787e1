"""--deepspeed: training under DeepSpeed's ZeRO engine, on CPU with gloo.

The expectation is the plain single-process run, as for DDP and FSDP (tests/test_distributed.py):
ZeRO-2 and ZeRO-3 in one process train exactly like it; 2 ZeRO-3 processes × batch 4 under torchrun
train like 1 process × batch 8; final/ is a plain model. Also: the shipped configs are valid for
DeepSpeed's own config class, dpolab fills "auto" values, and contradictions are refused.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.config import TrainConfig
from dpolab.errors import ConfigError
from dpolab.runtime import Runtime
from dpolab.toy import copy_task_rows, write_jsonl
from test_distributed import (COMMON, TOL, TORCHRUN, assert_resumed_as_uninterrupted, assert_same_run, copy_for_resume,
                              launch, read_rows)

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "deepspeed"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("deepspeed")
    data = write_jsonl(root / "train.jsonl", copy_task_rows(33, seed=5))
    eval_data = write_jsonl(root / "eval.jsonl", copy_task_rows(3, seed=6))
    for stage in (2, 3):  # batch, accumulation, clipping and bf16 left to dpolab ("auto" or missing)
        (root / f"zero{stage}.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                                                            "zero_optimization": {"stage": stage}}))
    args = ["--model", tiny_model_dir, "--data", data, "--eval-data", eval_data, *COMMON]
    assert main(["train", *map(str, args), "--batch-size", "8", "--output-dir", str(root / "single")]) == 0
    return root, args


@pytest.fixture(scope="module")
def one_process(setup):
    """stage -> the output folder of a --deepspeed run in this process (batch 8), made on first use."""
    root, args = setup
    made = {}

    def run(stage: int) -> Path:
        if stage not in made:
            made[stage] = root / f"one-zero{stage}"
            assert main(["train", *map(str, args), "--batch-size", "8", "--output-dir", str(made[stage]),
                         "--deepspeed", str(root / f"zero{stage}.json")]) == 0
        return made[stage]
    return run


@pytest.fixture(scope="module")
def two_processes(setup):
    """2 ZeRO-3 processes x batch 4 under torchrun: (output folder, the launcher's output)."""
    root, args = setup
    out = root / "two-zero3"
    proc = launch(TORCHRUN, [*args, "--batch-size", "4", "--output-dir", out, "--deepspeed", root / "zero3.json"], root)
    return out, proc


@pytest.mark.parametrize("stage", [2, 3])
def test_one_process_trains_exactly_as_without_deepspeed(setup, one_process, tiny_model_dir, stage):
    root, _ = setup
    assert_same_run(one_process(stage), root / "single", tiny_model_dir)  # losses, grad norms, eval, final weights


def test_two_zero3_processes_train_as_one_with_twice_the_batch(setup, two_processes, tiny_model_dir):
    root, _ = setup
    out, proc = two_processes
    assert_same_run(out, root / "single", tiny_model_dir)
    assert [r["step"] for r in read_rows(out) if "loss" in r] == [1, 2, 3, 4, 5]
    assert "DeepSpeed ZeRO stage 3 on 2 process(es)" in proc.stdout
    assert proc.stdout.count("done: 5 steps") == 1  # only rank 0 prints and writes
    for name, weight in load_file(root / "single" / "checkpoints" / "step-4" / "model.safetensors").items():
        got = load_file(out / "checkpoints" / "step-4" / "model.safetensors")[name]
        torch.testing.assert_close(got, weight, atol=TOL, rtol=0)


def test_resume_under_deepspeed_continues_as_the_uninterrupted_run(one_process, two_processes, tmp_path):
    """DeepSpeed's own checkpoint (partitions, fp32 master weights, AdamW state) under
    checkpoints/deepspeed/step-N: steps 3-5 and final/ equal the run that was never stopped, in one
    process and in two (each reloads its own partitions)."""
    out = one_process(3)
    assert sorted(p.name for p in (out / "checkpoints" / "deepspeed").glob("step-*")) == ["step-2", "step-4"]
    resumed = copy_for_resume(out, tmp_path / "resumed")
    assert main(["train", "--config", str(resumed / "config.yaml"), "--output-dir", str(resumed), "--resume"]) == 0
    assert_resumed_as_uninterrupted(resumed, out)
    out, _ = two_processes
    resumed = copy_for_resume(out, tmp_path / "resumed-two")
    proc = launch(TORCHRUN, ["--config", resumed / "config.yaml", "--output-dir", resumed, "--resume"], tmp_path)
    assert "at step 2" in proc.stdout
    assert_resumed_as_uninterrupted(resumed, out)


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_shipped_configs_are_valid_for_deepspeed(name, stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    from dpolab.zero import resolve_config

    config = TrainConfig(model="m", data="d.jsonl", output_dir="o", batch_size=4, grad_accum=2, max_grad_norm=0.5,
                         deepspeed=str(CONFIGS / name))
    raw = resolve_config(config.deepspeed, config, Runtime(device=torch.device("cpu"), precision="bf16"))
    assert (raw["train_micro_batch_size_per_gpu"], raw["gradient_accumulation_steps"], raw["train_batch_size"],
            raw["gradient_clipping"], raw["bf16"]["enabled"]) == (4, 2, 8, 0.5, True)
    checked = DeepSpeedConfig(raw)  # DeepSpeed's own validation (one process)
    assert checked.zero_optimization_stage == stage
    raw["zero_optimization"]["stage3_prefetch_bucket"] = 1  # a misspelt key is refused by DeepSpeed
    with pytest.raises(Exception, match="stage3_prefetch_bucket"):
        DeepSpeedConfig(raw)


def test_values_that_contradict_the_options_are_refused(tmp_path):
    from dpolab.zero import resolve_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    config = TrainConfig(model="m", data="d.jsonl", output_dir="o", batch_size=4, deepspeed=str(path))
    with pytest.raises(ConfigError, match="--batch-size"):
        resolve_config(str(path), config, Runtime(device=torch.device("cpu"), precision="fp32"))
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="--precision bf16"):
        resolve_config(str(path), config, Runtime(device=torch.device("cpu"), precision="fp32"))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_config(str(path), config, Runtime(device=torch.device("cpu"), precision="fp32"))


def test_a_missing_config_fails_before_anything_is_written(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(4, seed=1))
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "out"),
                 "--deepspeed", str(tmp_path / "missing.json"), "--no-progress"])
    assert code == 2
    assert "missing.json' is not a file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, field", [({"fsdp": True}, "fsdp"), ({"reference": "model"}, "reference"),
                                          ({"kl_eval_steps": 5}, "kl_eval_steps"),
                                          ({"online": True, "judge": "pkg.mod:reward"}, "online"),
                                          ({"reference_model": "other-model"}, "reference_model")])
def test_deepspeed_refuses_what_it_does_not_combine_with(extra, field):
    base = {"model": "m", "data": "d.jsonl", "output_dir": "o", "deepspeed": "ds.json"}
    with pytest.raises(ConfigError) as info:
        TrainConfig(**base, **extra)
    assert info.value.field == field
    TrainConfig(**{**base, "deepspeed": None}, **extra)  # fine without --deepspeed
