"""A toy preference task that needs no download: a word-level tokenizer, a tiny random Llama, and
synthetic pairs whose chosen answer copies the prompt's words while the rejected one does not.

Used by ``examples/quickstart.py`` and the tests; small enough to train in seconds on one CPU core.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock"]


def make_word_tokenizer(words=WORDS):
    """A word-level tokenizer that puts <s> in front of every encoding and uses </s> as EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + ["copy:", "say:"] + list(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


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


def copy_task_rows(n: int, seed: int = 0, length: int = 4) -> list[dict]:
    """Preference rows: the chosen answer repeats the prompt's words, the rejected one other words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, length)
        other = rng.sample(WORDS, length)
        rows.append({"prompt": "copy: " + " ".join(words), "chosen": " " + " ".join(words),
                     "rejected": " " + " ".join(other)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save_toy_model(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny Llama + its tokenizer with save_pretrained, as any --model folder would be."""
    tok = make_word_tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=hidden, layers=layers, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
