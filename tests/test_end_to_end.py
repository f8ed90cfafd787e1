"""The real pretrained model (stories260K) on real human preferences (HH-RLHF), through the CLI."""

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpolab
from dpolab.config import TrainConfig
from dpolab.data.batching import collate_pairs
from dpolab.prepare import prepare_data
from dpolab.reference import pair_logps

METRIC_KEYS = {"step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
               "rewards/margins", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens",
               "elapsed_s"}


@pytest.fixture()
def hh_subset(tmp_path, hh_path):
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(24)]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hh_file_loads_as_is(hh_path, stories_dir, stories_tokenizer):
    cfg = TrainConfig(model=str(stories_dir), data=str(hh_path), output_dir="unused", max_length=512,
                      max_prompt_length=256, progress=False)
    data = prepare_data(cfg, stories_tokenizer)
    text = "\n".join(data.summary)
    assert "2,312 rows read" in text and "format: implicit_prompt" in text
    assert "pairs tokenized, dropped" in text
    assert 0 < len(data.train) <= 2312
    assert all(p.prompt_ids[0] == stories_tokenizer.bos_token_id for p in data.train)
    decoded = stories_tokenizer.decode(data.train[0].prompt_ids, skip_special_tokens=True)
    assert decoded.rstrip().endswith("Assistant:")


def test_cli_trains_stories260k_on_hh_pairs(tmp_path, stories_dir, hh_subset):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dpolab", "train", "--model", str(stories_dir), "--data", str(hh_subset),
           "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4", "--max-length", "192",
           "--max-prompt-length", "96", "--eval-split", "0.25", "--eval-steps", "2", "--logging-steps", "1",
           "--learning-rate", "1e-3", "--save-steps", "2", "--precision", "fp32", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "24 rows read" in proc.stdout and "held out" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "final/config.json", "final/model.safetensors",
                 "final/tokenizer.json", "checkpoints/step-2/model.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(METRIC_KEYS <= set(r) for r in train_rows)
    assert train_rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at step 1
    assert train_rows[-1]["tokens"] > train_rows[0]["tokens"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and "eval_rewards/accuracies" in evals[0]


def test_final_model_reloads_with_the_same_logps(tmp_path, stories_dir, hh_subset):
    result = dpolab.train(TrainConfig(model=str(stories_dir), data=str(hh_subset), output_dir=str(tmp_path / "r"),
                                      max_steps=2, batch_size=4, max_length=160, max_prompt_length=80,
                                      learning_rate=1e-3, precision="fp32", progress=False))
    tok = AutoTokenizer.from_pretrained(result.output_dir / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir / "final", dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    data = prepare_data(TrainConfig(model=str(stories_dir), data=str(hh_subset), output_dir="x", max_length=160,
                                    max_prompt_length=80, progress=False), tok)
    batch = collate_pairs(data.train[:6], tok.pad_token_id)
    with torch.no_grad():
        trained = torch.cat(pair_logps(result.model.eval(), batch))
        again = torch.cat(pair_logps(reloaded, batch))
        before = torch.cat(pair_logps(original, batch))
    assert torch.allclose(trained, again, atol=1e-4)
    assert (trained - before).abs().max() > 1e-2  # training changed the model that was saved
