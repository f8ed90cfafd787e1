"""The demo's reference policy π_ref: a tokenizer and a small Llama trained on the review corpus.

This is the demo's fixture, not a preference method: a plain next-token-prediction loop that turns
the seeded grammar of ``grammar.py`` into a model that writes reviews of every sentiment. The DPO
paper starts from a GPT-2 fine-tuned on IMDb; this is the same step in miniature, so the demo needs
no download.

The result is saved with ``save_pretrained`` (a folder any ``--model`` flag accepts) under
``CACHE/reference-KEY/``, where KEY hashes everything that shapes the model (corpus, tokenizer,
architecture, optimisation, library versions), so a second run with the same settings loads it
instead of training it again, and a run with other settings never picks up a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .grammar import review_corpus

BASE_VERSION = "1"
"""Bump when the grammar or the training loop changes, so old caches are not reused."""


@dataclass(frozen=True)
class BaseSpec:
    """What shapes π_ref; every field is part of the cache key."""

    corpus_size: int = 12_000
    vocab_size: int = 512
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 5e-3
    seed: int = 0

    def key(self) -> str:
        import tokenizers
        import transformers

        blob = json.dumps({**dataclasses.asdict(self), "version": BASE_VERSION, "torch": torch.__version__,
                           "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``: it decodes back to the exact text (spaces
    included), puts <s> in front of every encoding, and has </s> as EOS and <pad> for padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # No 256-byte initial alphabet: the corpus uses ~30 characters, so the merges go to whole words.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(spec: BaseSpec, vocab_size: int, tokenizer):
    """A small Llama (RMSNorm, RoPE, SwiGLU, tied embeddings) with head_dim = hidden / heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.hidden * 8 // 3,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.heads, max_position_embeddings=128, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def _batch(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that score only the completion tokens (-100
    elsewhere): π_ref's capacity goes to the verdicts it will be asked to write, not to the prompts."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, n_prompt) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, n_prompt:len(r)] = ids[i, n_prompt:len(r)]
    return ids, mask, labels


def pretrain(model, rows: list[tuple[list[int], int]], spec: BaseSpec, pad_id: int, progress: bool = True) -> float:
    """Next-token prediction on ``rows`` (BOS + review + EOS): AdamW, warmup then cosine decay.

    ``rows`` are (BOS + prompt + completion + EOS ids, number of prompt ids). Returns the mean loss of
    the last 10% of steps (nats per completion token), a fluency check for the log.
    """
    rng = random.Random(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    warmup = max(1, spec.steps // 20)
    tail: list[float] = []
    model.train()
    bar = tqdm(range(spec.steps), desc="pretraining π_ref", unit="step", disable=not progress)
    for step in bar:
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * step / spec.steps))
        for group in optimizer.param_groups:
            group["lr"] = spec.learning_rate * factor
        ids, mask, labels = _batch(rng.sample(rows, spec.batch_size), pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= spec.steps * 0.9:
            tail.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    model.eval()
    return sum(tail) / max(1, len(tail))


def build_reference(spec: BaseSpec, cache_dir: Path, *, progress: bool = True, say=print) -> Path:
    """The folder of π_ref for ``spec``: loaded from the cache when present, else trained and saved.

    Written to a temporary folder and renamed at the end, so an interrupted run never leaves a
    half-saved model that a later run would trust.
    """
    folder = Path(cache_dir) / f"reference-{spec.key()}"
    if (folder / "base.json").is_file():
        say(f"π_ref: reusing the cached reference model {folder}")
        return folder
    start = time.perf_counter()
    reviews = review_corpus(spec.corpus_size, spec.seed)
    tokenizer = train_tokenizer([p + c for p, c in reviews], spec.vocab_size)
    # The completion starts with a space, which byte-level BPE never merges with what precedes it,
    # so the prompt's ids are a prefix of the review's ids.
    rows = [(tokenizer(p + c)["input_ids"] + [tokenizer.eos_token_id], len(tokenizer(p)["input_ids"]))
            for p, c in reviews]
    model = make_model(spec, len(tokenizer), tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"π_ref: training a {n_params / 1e3:.0f}K-parameter Llama on {len(reviews):,} generated reviews "
        f"({sum(len(ids) for ids, _ in rows):,} tokens, vocabulary {len(tokenizer)})")
    final_loss = pretrain(model, rows, spec, tokenizer.pad_token_id, progress)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {"spec": dataclasses.asdict(spec), "parameters": n_params, "final_loss": final_loss,
            "seconds": round(time.perf_counter() - start, 1)}
    (tmp / "base.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    say(f"π_ref: final training loss {final_loss:.3f} nats per completion token, {info['seconds']}s; "
        f"saved to {folder}")
    return folder
