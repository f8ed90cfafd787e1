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
