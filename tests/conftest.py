"""Shared fixtures. Tests are CPU-only and offline; real assets are read in place from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
HH_TEST = SHARED / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"


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


def make_tiny_llama(vocab_size: int = 64, hidden: int = 32, layers: int = 2, seed: int = 0, tie: bool = False):
    """A randomly initialised Llama small enough to train in seconds on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock"]


def make_word_tokenizer(words=WORDS):
    """A word-level tokenizer with <s> added in front of every encoding and </s> as EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + ["copy:", "say:"] + list(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def copy_task_rows(n: int, seed: int = 0, length: int = 4):
    """Synthetic preferences: the chosen answer copies the prompt's words, the rejected one shuffles others."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, length)
        other = rng.sample(WORDS, length)
        rows.append({"prompt": "copy: " + " ".join(words), "chosen": " " + " ".join(words),
                     "rejected": " " + " ".join(other)})
    return rows


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + word tokenizer saved with save_pretrained (what a user would pass to --model)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tok = make_word_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=32, layers=2, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path
