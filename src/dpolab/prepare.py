"""Everything before the first step: model, tokenizer and data, validated before anything is written."""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .data.load import LoadedData, load_pairs
from .data.records import PreferencePair
from .data.tokenize import TokenizedPair, tokenize_pairs
from .errors import ConfigError, DataError
from .runtime import Runtime


PROGRESS_MIN_PAIRS = 20_000
"""Tokenizing fewer pairs takes a second or two: no progress bar for it."""


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    """Human-readable lines: rows read, kept, dropped per reason, truncations."""


def load_tokenizer(config: TrainConfig):
    from transformers import AutoTokenizer

    name = config.model  # a path that is missing would otherwise surface as a confusing hub-id error
    if (Path(name).is_absolute() or name.startswith(".") or name.count("/") > 1) and not Path(name).exists():
        raise ConfigError("model", f"folder not found: {name}", "check the path, or pass a hub name like org/model")
    try:
        tok = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"cannot load a tokenizer from '{config.model}': {_first_line(e)}",
                          "pass a folder with tokenizer files or a hub model name") from None
    if tok.pad_token_id is None:  # padding is masked out, any id works; EOS is always there
        tok.pad_token = tok.eos_token
    return tok


def load_model(config: TrainConfig, rt: Runtime) -> torch.nn.Module:
    """The policy, with fp32 master weights (bf16 compute comes from autocast) and dropout off."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not config.progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32,
                                                     trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"cannot load a causal LM from '{config.model}': {_first_line(e)}",
                          "pass a folder written by save_pretrained or a hub model name") from None
    disable_dropout(model)
    model.config.use_cache = False
    return model.to(rt.device)


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of the policy and the reference: both must be deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):  # functional dropout rates kept as floats
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def check_tracker(report_to: str) -> None:
    """Refuse a missing tracker package up front, before anything is written."""
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError("report_to", f"{module} is not installed",
                          f"pip install 'dpolab[{module}]' or use --report-to none")


def _load_line(name: str, loaded: LoadedData) -> str:
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(loaded.dropped.items())) or "none"
    return (f"{name}: {loaded.rows_read:,} rows read from {loaded.source} (format: {loaded.format}); "
            f"{len(loaded.pairs):,} pairs kept, dropped {dropped}")


def _tokenize(name: str, source: str, pairs: list[PreferencePair], tokenizer,
              config: TrainConfig) -> tuple[list[TokenizedPair], list[str]]:
    tokenized, stats = tokenize_pairs(pairs, tokenizer, max_length=config.max_length,
                                      max_prompt_length=config.max_prompt_length,
                                      show_progress=config.progress and len(pairs) >= PROGRESS_MIN_PAIRS)
    if not tokenized:
        raise DataError(source, f"no {name} pair fits max_length={config.max_length} "
                        f"(dropped: {stats.dropped})", fix="raise --max-length or lower --max-prompt-length")
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(stats.dropped.items())) or "none"
    lines = [f"{name}: {stats.kept:,} pairs tokenized, dropped {dropped}; {stats.prompt_truncated:,} prompts "
             f"and {stats.completion_truncated:,} completions truncated"]
    if stats.boundary_fallbacks:
        lines.append(f"{name}: {stats.boundary_fallbacks:,} completions tokenized apart from their prompt "
                     "(a token merged across the prompt/completion boundary)")
    return tokenized, lines


def prepare_data(config: TrainConfig, tokenizer) -> PreparedData:
    """Load, normalise, split and tokenize the training (and eval) data; raises DataError on bad input."""
    loaded = load_pairs(config.data, split=config.data_split)
    summary = [_load_line("train", loaded)]
    train_pairs, eval_pairs = loaded.pairs, []
    if config.eval_data:
        eval_loaded = load_pairs(config.eval_data, split=config.data_split)
        eval_pairs = eval_loaded.pairs
        summary.append(_load_line("eval", eval_loaded))
    elif config.eval_split > 0:
        train_pairs, eval_pairs = split_pairs(train_pairs, config.eval_split, config.seed, config.data)
        summary.append(f"eval: {len(eval_pairs):,} pairs held out of {len(loaded.pairs):,} "
                       f"(--eval-split {config.eval_split})")
    train, lines = _tokenize("train", config.data, train_pairs, tokenizer, config)
    result = PreparedData(train=train, summary=summary + lines)
    if eval_pairs:
        result.eval, lines = _tokenize("eval", config.eval_data or config.data, eval_pairs, tokenizer, config)
        result.summary += lines
    return result


def split_pairs(pairs: list, fraction: float, seed: int, source: str) -> tuple[list, list]:
    """A seeded random split: (train, held out), the held-out part being round(fraction * n) >= 1 pairs."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(order)))
    if n_eval >= len(order):
        raise DataError(source, f"eval_split={fraction} leaves no training pairs out of {len(order)}",
                        fix="lower --eval-split or pass --eval-data")
    held = set(order[:n_eval])
    return ([p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held])


def check_output_dir(config: TrainConfig) -> None:
    """Refuse an output path that is a file up front, before the model is loaded."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("output_dir", f"'{out}' exists and is not a folder", "choose another --output-dir")


def prepare_output_dir(config: TrainConfig, rt: Runtime) -> Path:
    out = Path(config.output_dir)
    check_output_dir(config)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out
