"""LoRA through peft: parameter counts, the reference with adapters off, saving/merging, continuing an
adapter, resume, and one-line errors. Tiny Llamas on CPU in fp32; expectations come from hand counts,
a plain model without peft, or log-probs computed here from full logits (not dpolab's chunked path)."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("peft")

import dpolab  # noqa: E402
from conftest import copy_task_rows, make_word_tokenizer, write_jsonl  # noqa: E402
from dpolab import cli, lora  # noqa: E402
from dpolab.config import TrainConfig  # noqa: E402
from dpolab.data.batching import collate  # noqa: E402
from dpolab.errors import ConfigError  # noqa: E402
from dpolab.prepare import load_model, load_tokenizer, prepare_data  # noqa: E402
from dpolab.reference import ModelReference, score_pairs  # noqa: E402
from dpolab.runtime import Runtime  # noqa: E402

CPU = Runtime(device=torch.device("cpu"), precision="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("lora-data") / "train.jsonl", copy_task_rows(32, seed=3))


def cfg(model, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(model), data=str(data), output_dir=str(out), precision="fp32", learning_rate=2e-2,
                  batch_size=8, max_steps=4, logging_steps=1, progress=False, seed=0, lora_r=4)
    return TrainConfig(**{**values, **overrides})


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def plain_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel

    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(plain_model(base_dir), str(adapter_dir)).eval()


TEXTS = [("copy: red blue cat", " red blue cat"), ("copy: sun moon", " tree fish"), ("copy: dog", " dog star rock")]


@torch.no_grad()
def naive_logps(model, texts=TEXTS) -> torch.Tensor:
    """log π(completion | prompt) from the full logits of ``model(input_ids)``, one sequence at a time."""
    tok = make_word_tokenizer()
    out = []
    for prompt, completion in texts:
        n_prompt = len(tok(prompt)["input_ids"])
        ids = torch.tensor([tok(prompt + completion)["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        token_logps = logp.gather(1, ids[0, 1:, None])[:, 0]
        out.append(token_logps[n_prompt - 1:].sum())
    return torch.stack(out)


def reference_table(out) -> torch.Tensor:
    (cache,) = (out / "cache").glob("reference-*.pt")
    return torch.load(cache, weights_only=True)["train"]


def scored(model, config, with_adapters_off=False):
    pairs = prepare_data(config, load_tokenizer(config)).train
    scope = lora.adapters_disabled(model) if with_adapters_off else contextlib.nullcontext()
    with scope:
        return score_pairs(model, pairs, CPU, batch_size=16, pad_token_id=0, progress=False, layout=config.layout)


# ---------------------------------------------------------------------------------------------
# Parameters


def test_trainable_parameters_match_peft_and_a_hand_count(tiny_model_dir, data, tmp_path, capsys):
    model = load_model(cfg(tiny_model_dir, data, tmp_path), CPU)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Tiny Llama: hidden 32, 4 heads of 8, 2 KV heads (k/v out 16), MLP 64, 2 layers. r x (in + out) per layer:
    # q 4(32+32) + k 4(32+16) + v 4(32+16) + o 4(32+32) + gate 4(32+64) + up 4(32+64) + down 4(64+32) = 2048
    assert trainable == 2 * 2048 == model.get_nb_trainable_parameters()[0]
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.peft_config["default"].lora_alpha == 8  # default alpha = 2 r
    base = sum(p.numel() for p in plain_model(tiny_model_dir).parameters())
    assert model.get_nb_trainable_parameters()[1] == base + 4096
    only_qv = load_model(cfg(tiny_model_dir, data, tmp_path, lora_target_modules="q_proj,v_proj"), CPU)
    assert only_qv.get_nb_trainable_parameters()[0] == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    dpolab.train(cfg(tiny_model_dir, data, tmp_path / "out", max_steps=1))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("LoRA:"))
    assert "r=4, alpha=8" in line and f"4,096 trainable parameters of {base + 4096:,}" in line
    assert f"({100 * 4096 / (base + 4096):.2f}%)" in line


# ---------------------------------------------------------------------------------------------
# The reference: the same model with adapters off


def test_reference_with_adapters_disabled_is_the_base_model_even_after_training(tiny_model_dir, data, tmp_path):
    config = cfg(tiny_model_dir, data, tmp_path / "out", reference="precompute")
    result = dpolab.train(config)
    model, base = result.model, load_model(cfg(tiny_model_dir, data, tmp_path, lora_r=None), CPU)
    base_table = scored(base, config)
    assert not torch.equal(scored(model, config), base_table)  # training really moved the adapter
    assert torch.equal(scored(model, config, with_adapters_off=True), base_table)
    assert torch.equal(reference_table(tmp_path / "out"), base_table)  # what the run precomputed
    assert torch.equal(naive_logps(base), naive_logps(_disabled(model)))


def test_model_reference_shares_the_weights_and_stays_the_base_model(tiny_model_dir, data, tmp_path):
    config = cfg(tiny_model_dir, data, tmp_path, reference="model")
    model = load_model(config, CPU)
    reference = ModelReference(model, CPU)
    assert reference.model is model  # no second copy
    with torch.no_grad():  # what training does to the adapter: B leaves zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    pairs = prepare_data(config, load_tokenizer(config)).train
    batch = collate(pairs[:8], 0, layout=config.layout)
    base_table = scored(load_model(cfg(tiny_model_dir, data, tmp_path, lora_r=None), CPU), config)
    assert not torch.equal(scored(model, config)[batch.index], base_table[batch.index])
    model.train()
    chosen, rejected = reference.logps(batch, "train")
    assert model.training  # the reference pass restores the policy's mode
    assert torch.equal(torch.stack([chosen, rejected], 1), base_table[batch.index])
    trained = load_model(config, CPU)
    with torch.no_grad():
        next(p for n, p in trained.named_parameters() if ".lora_B." in n).fill_(0.1)
    with pytest.raises(ConfigError, match="'reference'"):  # a non-zero adapter is not the base model
        ModelReference(trained, CPU)


class _disabled(torch.nn.Module):
    """A model whose forward runs the wrapped peft model with its adapters off."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs):
        with lora.adapters_disabled(self.inner):
            return self.inner(**kwargs)


def test_reference_model_shares_the_weights_and_matches_precompute(tiny_model_dir, data, tmp_path):
    pre = dpolab.train(cfg(tiny_model_dir, data, tmp_path / "pre"))
    shared = dpolab.train(cfg(tiny_model_dir, data, tmp_path / "shared", reference="model"))
    a, b = rows_of(tmp_path / "pre"), rows_of(tmp_path / "shared")
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    assert naive_logps(pre.model) == pytest.approx(naive_logps(shared.model), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Outputs: the adapter in final/, the merged model in final-merged/


def test_final_holds_an_adapter_that_peft_loads_with_the_same_log_probs(tiny_model_dir, data, tmp_path):
    result = dpolab.train(cfg(tiny_model_dir, data, tmp_path / "out"))
    final = tmp_path / "out" / "final"
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names  # the adapter, not a whole model
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    reloaded = peft_model(tiny_model_dir, final)
    expected = naive_logps(result.model)
    assert torch.equal(naive_logps(reloaded), expected)
    assert not torch.equal(expected, naive_logps(plain_model(tiny_model_dir)))
    # the eval/generate commands load an adapter folder the same way (base from adapter_config.json)
    probe = TrainConfig(model=str(final), data="-", output_dir="-", progress=False)
    assert torch.equal(naive_logps(load_model(probe, CPU).eval()), expected)


MERGED_SCRIPT = """
import sys, torch
sys.modules["peft"] = None  # any import of peft fails: the merged model must load without it
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
assert not any("lora" in name for name, _ in model.named_parameters())
ids = torch.tensor([[1, 4, 6, 7, 8, 6, 7, 8, 2]])
with torch.no_grad():
    print(repr(torch.log_softmax(model(input_ids=ids).logits.double(), -1).flatten().tolist()))
"""


def test_merge_lora_writes_a_plain_model_equal_to_the_merged_adapter(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--model", tiny_model_dir, "--data", data, "--output-dir", out, "--lora-r", "4",
            "--lora-alpha", "16", "--merge-lora", "--max-steps", "4", "--learning-rate", "0.02",
            "--precision", "fp32", "--no-progress"]
    assert cli.main([str(a) for a in args]) == 0, capsys.readouterr().err
    merged = out / "final-merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    proc = subprocess.run([sys.executable, "-c", MERGED_SCRIPT, str(merged)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    from_disk = torch.tensor(eval(proc.stdout), dtype=torch.float64)
    adapter = peft_model(tiny_model_dir, out / "final")  # the unmerged adapter on the base, via peft
    in_memory = adapter.merge_and_unload()
    ids = torch.tensor([[1, 4, 6, 7, 8, 6, 7, 8, 2]])
    with torch.no_grad():
        expected = torch.log_softmax(in_memory(input_ids=ids).logits.double(), -1).flatten()
    assert torch.allclose(from_disk, expected, atol=1e-5, rtol=0)
    # the merged weight is W + (alpha / r) B A, by hand from the adapter file
    from safetensors.torch import load_file

    tensors = load_file(str(out / "final" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    w = plain_model(tiny_model_dir).model.layers[0].self_attn.q_proj.weight
    by_hand = w + (16 / 4) * tensors[key.format("B")] @ tensors[key.format("A")]
    assert not torch.allclose(by_hand, w)
    assert torch.allclose(plain_model(merged).model.layers[0].self_attn.q_proj.weight, by_hand, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Continuing an adapter, resuming a LoRA run


def test_continued_adapter_is_its_own_reference(tiny_model_dir, data, tmp_path):
    first = tmp_path / "first"
    dpolab.train(cfg(tiny_model_dir, data, first, max_steps=6))
    adapter = first / "final"
    second = tmp_path / "second"
    result = dpolab.train(cfg(adapter, data, second, lora_r=None, max_steps=2, learning_rate=1e-3))
    assert lora.is_lora(result.model)
    assert rows_of(second)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy at step 1 = reference
    config = cfg(tiny_model_dir, data, second, lora_r=None)
    loaded = peft_model(tiny_model_dir, adapter)  # the adapter as it was before this run
    table = reference_table(second)
    assert torch.equal(table, scored(loaded, config))
    assert not torch.allclose(table, scored(plain_model(tiny_model_dir), config), atol=1e-3)
    saved = json.loads((second / "final" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model_dir.resolve())


def test_resumed_lora_run_repeats_the_uninterrupted_one(tiny_model_dir, data, tmp_path):
    out = tmp_path / "out"
    whole = dpolab.train(cfg(tiny_model_dir, data, out, max_steps=4, save_steps=2))
    expected = naive_logps(whole.model)
    before = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_of(out)]
    assert (out / "checkpoints" / "step-2" / "adapter_model.safetensors").is_file()
    again = dpolab.train(cfg(tiny_model_dir, data, out, max_steps=4, save_steps=2, resume="latest"))
    after = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows_of(out)]
    assert after == before and torch.equal(naive_logps(again.model), expected)


# ---------------------------------------------------------------------------------------------
# Mistakes: one line, exit 2


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("dpolab: config error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("flags, needles", [
    (["--lora-r", "-1"], ["'lora_r'", ">= 0"]),
    (["--lora-r", "4", "--lora-dropout", "1"], ["'lora_dropout'", "[0, 1)"]),
    (["--lora-r", "4", "--lora-alpha", "0"], ["'lora_alpha'", "> 0"]),
    (["--lora-alpha", "16"], ["'lora_alpha'", "--lora-r"]),
    (["--lora-target-modules", "q_proj"], ["'lora_target_modules'", "--lora-r"]),
    (["--lora-r", "4", "--lora-target-modules", "q_proj,,v_proj"], ["'lora_target_modules'", "comma list"]),
    (["--lora-r", "4", "--reference", "model", "--ref-sync-steps", "2"], ["'ref_sync_steps'", "LoRA"]),
    (["--merge-lora"], ["'merge_lora'", "--lora-r"]),
    (["--lora-r", "4", "--lora-target-modules", "nonexistent_proj"], ["'lora_target_modules'", "nonexistent_proj"]),
])
def test_bad_lora_options_exit_2_with_one_line(flags, needles, tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--model", tiny_model_dir, "--data", data, "--output-dir", out, "--no-progress", *flags]
    assert cli.main([str(a) for a in args]) == 2
    one_line_error(capsys, *needles)
    assert not out.exists()  # refused before anything is written


def test_continuing_an_adapter_refuses_conflicting_settings(tiny_model_dir, data, tmp_path, capsys):
    dpolab.train(cfg(tiny_model_dir, data, tmp_path / "first", max_steps=1))
    adapter = tmp_path / "first" / "final"
    for flags, needles in ((["--lora-r", "8"], ["'lora_r'", "r=4", "drop --lora-r"]),
                           (["--reference", "model"], ["'reference'", "--reference precompute"])):
        args = ["train", "--model", adapter, "--data", data, "--output-dir", tmp_path / "x", "--no-progress", *flags]
        assert cli.main([str(a) for a in args]) == 2
        one_line_error(capsys, *needles)


def test_lora_without_peft_says_how_to_install_it(tiny_model_dir, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ConfigError) as err:
        load_model(cfg(tiny_model_dir, data, tmp_path), CPU)
    assert err.value.field == "lora_r" and "pip install peft" in str(err.value) and "\n" not in str(err.value)
