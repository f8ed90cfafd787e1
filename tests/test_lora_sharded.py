"""LoRA with sharded weights: --lora-r with --fsdp (FSDP2) and with --deepspeed (ZeRO-2, ZeRO-3), on CPU.

The expectation is the plain single-process LoRA run (tests/test_lora.py checks that one against peft
and a model without adapters): 2 sharded processes × batch 4 train like 1 process × batch 8 (per-step
losses, grad norms, eval metrics), final/ and the checkpoints hold the same adapter (peft's format,
nothing else), final-merged/ the same merged model, and a resumed run equals the uninterrupted one.
Each torchrun launch costs seconds of imports, so one launch serves several checks.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from dpolab.cli import main  # noqa: E402
from dpolab.toy import copy_task_rows, write_jsonl  # noqa: E402
from test_distributed import COMMON, TOL, TORCHRUN, launch, read_rows  # noqa: E402

ADAPTER = "adapter_model.safetensors"
LORA = ["--lora-r", "4", "--learning-rate", "1e-2", "--merge-lora"]  # the later --learning-rate wins over COMMON's


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """(folder, common arguments); the expectation, one unsharded process × batch 8, is root/single."""
    root = tmp_path_factory.mktemp("lora-sharded")
    data = write_jsonl(root / "train.jsonl", copy_task_rows(33, seed=5))
    eval_data = write_jsonl(root / "eval.jsonl", copy_task_rows(3, seed=6))
    for stage in (2, 3):
        (root / f"zero{stage}.json").write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    args = ["--model", tiny_model_dir, "--data", data, "--eval-data", eval_data, *COMMON, *LORA]
    assert main(["train", *map(str, args), "--batch-size", "8", "--output-dir", str(root / "single")]) == 0
    return root, args


@pytest.fixture(scope="module")
def fsdp_run(setup):
    root, args = setup
    proc = launch(TORCHRUN, [*args, "--fsdp", "--batch-size", "4", "--output-dir", root / "fsdp"], root)
    return root / "fsdp", proc


@pytest.fixture(scope="module")
def zero3_run(setup):
    root, args = setup
    out = root / "zero3"
    proc = launch(TORCHRUN, [*args, "--deepspeed", root / "zero3.json", "--batch-size", "4", "--output-dir", out], root)
    return out, proc


def assert_same_rows(run: Path, expected: Path) -> None:
    rows, want = read_rows(run), read_rows(expected)
    assert [(r["step"], sorted(r)) for r in rows] == [(r["step"], sorted(r)) for r in want]
    for got, row in zip(rows, want):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "eval_loss"):
            if key in row:
                assert got[key] == pytest.approx(row[key], abs=TOL), (row["step"], key)


def assert_same_files(run: Path, expected: Path, *files: str) -> None:
    for name in files:
        got, want = load_file(run / name), load_file(expected / name)
        assert got.keys() == want.keys(), name
        for key, weight in want.items():
            torch.testing.assert_close(got[key], weight, atol=TOL, rtol=0, msg=lambda m: f"{name} {key}: {m}")


def assert_adapter_outputs(run: Path, single: Path, base_dir) -> None:
    """final/ and the step-4 checkpoint hold the adapter only, equal to the unsharded run's; final-merged/
    is the same merged model; the training moved the adapter far more than the tolerance."""
    assert sorted(p.name for p in (run / "final").glob("*.safetensors")) == [ADAPTER]  # no base weights
    assert sorted(p.name for p in (run / "checkpoints" / "step-4").glob("*.safetensors")) == [ADAPTER]
    assert_same_files(run, single, f"final/{ADAPTER}", f"checkpoints/step-4/{ADAPTER}",
                      "final-merged/model.safetensors")
    adapter = load_file(run / "final" / ADAPTER)
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert len(adapter) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 decoder layers
    assert max(float(v.abs().max()) for k, v in adapter.items() if ".lora_B." in k) > 100 * TOL  # B starts at zero
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], Path(config["base_model_name_or_path"])) == (4, 8, Path(base_dir))


def peft_logits(base_dir, adapter_dir, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def plain_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()(input_ids=ids).logits


def assert_loads_with_peft(run: Path, base_dir) -> None:
    """peft puts final/ onto the base model; it computes what final-merged/ computes, not the base model."""
    ids = torch.tensor([[1, 5, 6, 7, 3, 5, 6, 7, 2]])
    with_adapter = peft_logits(base_dir, run / "final", ids)
    torch.testing.assert_close(with_adapter, plain_logits(run / "final-merged", ids), atol=1e-5, rtol=0)
    assert float((with_adapter - plain_logits(base_dir, ids)).abs().max()) > 1e-3


def test_fsdp_lora_two_processes_train_as_one_with_twice_the_batch(setup, fsdp_run, tiny_model_dir):
    root, _ = setup
    out, proc = fsdp_run
    assert_same_rows(out, root / "single")
    assert_adapter_outputs(out, root / "single", tiny_model_dir)
    assert_loads_with_peft(out, tiny_model_dir)
    assert proc.stdout.count("LoRA: r=4") == 1 and proc.stdout.count("done: 5 steps") == 1


def test_zero3_lora_two_processes_train_as_one_with_twice_the_batch(setup, zero3_run, tiny_model_dir):
    root, _ = setup
    out, proc = zero3_run
    assert "DeepSpeed ZeRO stage 3 on 2 process(es)" in proc.stdout
    assert_same_rows(out, root / "single")
    assert_adapter_outputs(out, root / "single", tiny_model_dir)
    assert_loads_with_peft(out, tiny_model_dir)


def test_zero2_lora_one_process_trains_exactly_as_without_deepspeed(setup, tiny_model_dir):
    root, args = setup
    out = root / "zero2"
    assert main(["train", *map(str, args), "--batch-size", "8", "--output-dir", str(out),
                 "--deepspeed", str(root / "zero2.json")]) == 0
    assert_same_rows(out, root / "single")
    assert_adapter_outputs(out, root / "single", tiny_model_dir)


def resume_from_step_2(out: Path, to: Path) -> Path:
    """Copy the run as it was after its step-2 checkpoint, resume it under torchrun; returns ``to``."""
    shutil.copytree(out, to, ignore=shutil.ignore_patterns("final", "final-merged", "step-4"))
    proc = launch(TORCHRUN, ["--config", to / "config.yaml", "--output-dir", to, "--resume"], to.parent)
    assert f"resumed from {to / 'checkpoints' / 'step-2'} at step 2" in proc.stdout
    return to


@pytest.mark.parametrize("run", ["fsdp_run", "zero3_run"])
def test_sharded_lora_resume_continues_as_the_uninterrupted_run(run, request, tmp_path):
    """The step-2 checkpoint (adapter + optimizer state; DeepSpeed also its own partitions) and the base
    weights loaded again: steps 3-5, final/ and final-merged/ equal the run that was never stopped."""
    out, _ = request.getfixturevalue(run)
    resumed = resume_from_step_2(out, tmp_path / "resumed")
    assert_same_rows(resumed, out)
    assert_same_files(resumed, out, f"final/{ADAPTER}", "final-merged/model.safetensors")


def test_resume_refuses_a_checkpoint_of_another_adapter(tmp_path):
    """The sharded resume maps peft's file names onto the model's own; another adapter is a ConfigError."""
    from peft import LoraConfig, get_peft_model

    from dpolab import lora
    from dpolab.errors import ConfigError
    from dpolab.toy import make_tiny_llama

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(make_tiny_llama(vocab_size=20, layers=1), LoraConfig(r=2, target_modules=["q_proj"]))
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    weights = {a: torch.ones(2, 32), b: torch.ones(32, 2)}
    assert sorted(lora.to_model_keys(model, weights, tmp_path)) == [a.replace(".lora_A.", ".lora_A.default."),
                                                                    b.replace(".lora_B.", ".lora_B.default.")]
    with pytest.raises(ConfigError, match="does not hold this run's LoRA adapter"):
        lora.to_model_keys(model, {a: weights[a]}, tmp_path)


@pytest.mark.parametrize("tie", [False, True])
def test_merging_gathered_weights_equals_peft_merging_the_model(tmp_path, tie):
    """--merge-lora of a sharded run rebuilds the model from the gathered weights (an uninitialized CPU
    copy, tied embeddings tied again) and merges there: the same model as peft's own in-place merge."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import make_word_tokenizer
    from dpolab import lora
    from dpolab.toy import make_tiny_llama

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(make_tiny_llama(vocab_size=20, tie=tie), LoraConfig(r=2, lora_alpha=4,
                                                                                  target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # what full_state_dict gives
    lora.save_merged_weights(tmp_path / "merged", model, gathered, make_word_tokenizer())
    want = copy.deepcopy(model).merge_and_unload().eval()
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 6, 7, 3, 9, 2]])
    with torch.no_grad(), lora.adapters_disabled(model):
        torch.testing.assert_close(got(input_ids=ids).logits, want(input_ids=ids).logits, atol=1e-5, rtol=0)
        base = model.eval()(input_ids=ids).logits
        assert float((got(input_ids=ids).logits - base).abs().max()) > 1e-3  # the merge changed the base model
    assert lora.is_lora(model)  # the model itself is left as it was (a sharded model cannot be merged in place)


def test_continued_adapter_under_zero3_is_its_own_reference(setup, tmp_path):
    """--model an adapter folder under ZeRO-3: whether the adapter is still a no-op is read before the
    weights are partitioned (a partition alone looks all-zero), so the reference is the adapter as
    loaded (step-1 loss ln 2), and the run equals the unsharded one."""
    root, _ = setup
    args = ["--model", root / "single" / "final", "--data", root / "train.jsonl", "--max-steps", "2",
            "--logging-steps", "1", "--learning-rate", "1e-2", "--batch-size", "8", "--precision", "fp32",
            "--device", "cpu", "--no-progress"]
    assert main(["train", *map(str, args), "--output-dir", str(tmp_path / "plain")]) == 0
    assert main(["train", *map(str, args), "--output-dir", str(tmp_path / "zero3"),
                 "--deepspeed", str(root / "zero3.json")]) == 0
    assert read_rows(tmp_path / "zero3")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_rows(tmp_path / "zero3", tmp_path / "plain")
    assert_same_files(tmp_path / "zero3", tmp_path / "plain", f"final/{ADAPTER}")


def test_fsdp_lora_in_bf16_trains_like_one_process(setup, tmp_path, tiny_model_dir):
    """bf16 compute, fp32 shards and gradient reduction: the reference pass (adapters off) is FSDP's first
    forward, where peft had marked the adapter frozen, so no gradient was cast back to fp32 (a crash).
    bf16 rounding differs between 2 × batch 4 and 1 × batch 8, hence the looser tolerance."""
    root, _ = setup
    args = ["--model", tiny_model_dir, "--lora-r", "4", "--data", root / "train.jsonl", "--max-steps", "3",
            "--logging-steps", "1", "--learning-rate", "1e-2", "--precision", "bf16", "--device", "cpu",
            "--no-progress"]
    assert main(["train", *map(str, args), "--batch-size", "8", "--output-dir", str(tmp_path / "one")]) == 0
    launch(TORCHRUN, [*args, "--fsdp", "--batch-size", "4", "--output-dir", tmp_path / "fsdp"], tmp_path)
    got, want = read_rows(tmp_path / "fsdp"), read_rows(tmp_path / "one")
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-3)
    adapter = load_file(tmp_path / "fsdp" / "final" / ADAPTER)
    assert {v.dtype for v in adapter.values()} == {torch.float32}  # the fp32 shards, gathered
