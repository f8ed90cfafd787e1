"""Shared fixtures. Tests are CPU-only and offline; real assets are read in place from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpolab.toy import copy_task_rows, make_tiny_llama, make_word_tokenizer, save_toy_model, write_jsonl  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
HH_TEST = SHARED / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"


def independent_logps(model_dir, cfg):
    """log π(chosen|prompt), log π(rejected|prompt) of every training pair of ``cfg`` under the model in
    ``model_dir``: one plain forward per sequence, log-softmax over the vocabulary, the completion tokens'
    log-probs summed (no dpolab code on the model), as a [pairs, 2] float64 table."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.prepare import load_tokenizer, prepare_data

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = prepare_data(cfg, load_tokenizer(cfg)).train
    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    with torch.no_grad():
        for pair in pairs:
            for col, completion in enumerate((pair.chosen_ids, pair.rejected_ids)):
                ids = torch.tensor([pair.prompt_ids + completion])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                n = len(pair.prompt_ids)
                table[pair.index, col] = sum(logp[n + t - 1, tok] for t, tok in enumerate(completion))
    return table


def cached_reference_table(output_dir):
    """The precomputed reference log-probs of a run's training pairs, as float64."""
    import torch

    (path,) = (Path(output_dir) / "cache").glob("reference-*.pt")
    return torch.load(path, weights_only=True)["train"].double()


def quick_config(output_dir, model_dir, data, **overrides):
    """A small deterministic run for tests: fp32, 3 steps of 8 pairs at learning rate 1e-3, seed 0, a
    metrics row every step, no progress bars; ``overrides`` change any field."""
    from dpolab.config import TrainConfig

    values = dict(model=str(model_dir), data=str(data), output_dir=str(output_dir), precision="fp32",
                  learning_rate=1e-3, batch_size=8, max_steps=3, logging_steps=1, progress=False, seed=0)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The real pretrained 260K-parameter Llama (HF format) from ../shared."""
    assert STORIES.is_dir(), f"{STORIES} is missing: tests need ../shared beside the checkout"
    return STORIES


@pytest.fixture(scope="session")
def hh_path() -> Path:
    """2,312 real human preference pairs (Anthropic HH-RLHF harmless-base test split)."""
    assert HH_TEST.is_file(), f"{HH_TEST} is missing: tests need ../shared beside the checkout"
    return HH_TEST


@pytest.fixture(scope="session")
def stories_tokenizer(stories_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + word tokenizer saved with save_pretrained (what a user would pass to --model)."""
    return save_toy_model(tmp_path_factory.mktemp("tiny-model"))
