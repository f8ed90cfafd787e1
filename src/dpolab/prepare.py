"""Everything before the first step: model, tokenizer and data, validated before anything is written."""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import lora, objectives
from .config import TrainConfig
from .data import cache as token_cache
from .data.examples import TokenizedExample, tokenize_examples
from .data.load import LoadedData, load_examples, load_pairs
from .data.records import PreferencePair
from .data.tokenize import TokenizedPair, tokenize_pairs
from .errors import ConfigError, DataError
from .losses import get_loss
from .runtime import Runtime


PROGRESS_MIN_PAIRS = 20_000
"""Tokenizing fewer pairs takes a second or two: no progress bar for it."""


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    """Human-readable lines: rows read, kept, dropped per reason, truncations."""
    cache_to: Path | None = None
    """Where ``save_token_cache`` writes these pairs (None: nothing to write, e.g. they came from the cache)."""


def load_tokenizer(config: TrainConfig):
    from transformers import AutoTokenizer

    name = config.model  # a path that is missing would otherwise surface as a confusing hub-id error
    if (Path(name).is_absolute() or name.startswith(".") or name.count("/") > 1) and not Path(name).exists():
        raise ConfigError("model", f"folder not found: {name}", "check the path, or pass a hub name like org/model")
    _check_weights_format(config)
    source = config.model  # an adapter folder without tokenizer files: the base model's tokenizer
    if lora.adapter_folder(source) is not None and not lora.has_tokenizer(source):
        source = lora.base_model_path(source)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"cannot load a tokenizer from '{config.model}': {_first_line(e)}",
                          "pass a folder with tokenizer files or a hub model name") from None
    if tok.pad_token_id is None:  # padding is masked out, any id works; EOS is always there
        tok.pad_token = tok.eos_token
    return tok


def load_model(config: TrainConfig, rt: Runtime, pad_token_id: int | None = None) -> torch.nn.Module:
    """The policy, with fp32 master weights (bf16 compute comes from autocast) and dropout off; with LoRA
    (``--lora-r``, or an adapter folder as ``--model``) wrapped by peft (``dpolab.lora``). For the reward
    loss, the causal LM with a one-output score head (``dpolab.reward.load_score_model``), whose config
    gets ``pad_token_id`` (the tokenizer's)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not config.progress:
        hf_logging.disable_progress_bar()
    if getattr(get_loss(config.loss), "sequence_classifier", False):
        from .reward import load_score_model

        model = load_score_model(config, pad_token_id, say=print if rt.is_main else None)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(lora.base_model_path(config.model), dtype=torch.float32,
                                                         trust_remote_code=config.trust_remote_code,
                                                         use_safetensors=None if config.allow_pickle else True)
        except (OSError, ValueError) as e:
            raise ConfigError("model", f"cannot load a causal LM from '{config.model}': {_first_line(e)}",
                              "pass a folder written by save_pretrained or a hub model name") from None
    disable_dropout(model)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError("gradient_checkpointing", f"{type(model).__name__} does not support it",
                              "drop --gradient-checkpointing (or lower --batch-size to save memory)")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lora.apply(model, config).to(rt.device)


def load_reference_model(config: TrainConfig, rt: Runtime, tokenizer, policy: torch.nn.Module) -> torch.nn.Module:
    """--reference-model: π_ref loaded as the policy is (fp32, dropout off), frozen, in eval mode.

    Refused, naming the reason: an adapter folder (LoRA's reference is its base with the adapter off, so
    pass that base), a LoRA policy (its reference is itself with the adapter off), another tokenizer
    (DPO compares log-probs of the same token ids under both models), and with TR-DPO weights of another
    shape (the reference is pulled towards the policy weight by weight).
    """
    import dataclasses

    name = config.reference_model
    if lora.adapter_folder(name) is not None:
        raise ConfigError("reference_model", f"'{name}' is a LoRA adapter, not a whole model",
                          "pass a full model folder (e.g. the adapter's base, or a --merge-lora final-merged/)")
    if lora.is_lora(policy):
        raise ConfigError("reference_model", f"'{config.model}' is a LoRA adapter, whose reference is its base "
                          "model with the adapter off", "drop --reference-model, or train a full model")
    probe = dataclasses.replace(config, model=name, reference_model=None, lora_r=None, lora_alpha=None,
                                lora_dropout=0.0, lora_target_modules=None, merge_lora=False,
                                gradient_checkpointing=False)
    try:
        ref_tokenizer = load_tokenizer(probe)
        reference = load_model(probe, rt)
    except ConfigError as e:  # the same checks as --model, reported under this option's name
        raise ConfigError("reference_model", e.problem, e.fix) from None
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError("reference_model", f"'{name}' has another tokenizer than --model '{config.model}'",
                          "use a reference with the same tokenizer (e.g. the model the policy was trained from)")
    if config.ref_sync_steps is not None:
        shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
        if shapes(reference) != shapes(policy):
            raise ConfigError("reference_model", f"'{name}' has weights of other shapes than --model, so TR-DPO "
                              "cannot move it towards the policy", "drop --ref-sync-steps or --reference-model")
    reference.requires_grad_(False)
    return reference.eval()


def _check_weights_format(config: TrainConfig) -> None:
    """Pickle checkpoints can run arbitrary code when loaded: refuse them unless --allow-pickle."""
    folder = Path(lora.base_model_path(config.model))  # an adapter folder: check its base model
    if not folder.is_dir():
        return
    if not (folder / "config.json").is_file():
        raise ConfigError("model", f"'{folder}' has no config.json, so it is not a saved model",
                          "pass a folder written by save_pretrained (config.json + weights + tokenizer)")
    has_safe = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if not has_safe and pickles and not config.allow_pickle:
        raise ConfigError("model", f"'{folder}' holds only pickle weights ({pickles[0]}), which can run code when "
                          "loaded", "convert them to safetensors, or pass --allow-pickle if you trust the files")


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


STRICT_REASONS = {
    "identical": "chosen equals rejected",
    "prompt_too_long": "the prompt leaves no room for a completion within max_length",
    "identical_after_truncation": "chosen and rejected are identical after truncation to max_length",
    "prompt_truncated": "the prompt is longer than max_prompt_length",
}


def _check_strict(config: TrainConfig, loaded: LoadedData) -> None:
    if config.strict and loaded.first_dropped:
        reason, row = min(loaded.first_dropped.items(), key=lambda item: item[1])
        raise DataError(loaded.source, f"unusable pair ({STRICT_REASONS.get(reason, reason)}) and --strict is on",
                        row=row, fix="fix or remove the row, or drop --strict to skip such rows")


def _load_line(name: str, loaded: LoadedData) -> str:
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(loaded.dropped.items())) or "none"
    return (f"{name}: {loaded.rows_read:,} rows read from {loaded.source} (format: {loaded.format}); "
            f"{len(loaded.pairs):,} pairs kept, dropped {dropped}")


def _tokenize(name: str, source: str, pairs: list[PreferencePair], tokenizer,
              config: TrainConfig) -> tuple[list[TokenizedPair], list[str]]:
    tokenized, stats = tokenize_pairs(pairs, tokenizer, max_length=config.max_length,
                                      max_prompt_length=config.max_prompt_length, num_proc=config.num_proc,
                                      show_progress=config.progress and len(pairs) >= PROGRESS_MIN_PAIRS)
    _check_strict_tokens(config, source, stats, pairs)
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


def _check_strict_tokens(config: TrainConfig, source: str, stats, records: list) -> None:
    """--strict: a row is used as written, or the run refuses it (``records[i].row`` names the row)."""
    problems = dict(stats.first_dropped)
    if stats.first_prompt_truncated is not None:
        problems["prompt_truncated"] = stats.first_prompt_truncated
    if config.strict and problems:
        reason, index = min(problems.items(), key=lambda item: item[1])
        raise DataError(source, f"unusable pair ({STRICT_REASONS.get(reason, reason)}) and --strict is on",
                        row=records[index].row or None, fix="fix or remove the row, or drop --strict to skip such rows")


def _load_sources(config: TrainConfig, load, line):
    """Read --data (and --eval-data), refuse unusable rows under --strict, describe what was read.

    Returns (train source, eval source or None, summary lines); pairs and KTO examples share it.
    """
    loaded = load(config.data, split=config.data_split)
    _check_strict(config, loaded)
    summary = [line("train", loaded)]
    eval_loaded = None
    if config.eval_data:
        eval_loaded = load(config.eval_data, split=config.data_split)
        _check_strict(config, eval_loaded)
        summary.append(line("eval", eval_loaded))
    return loaded, eval_loaded, summary


def prepare_data(config: TrainConfig, tokenizer, cache_dir: Path | None = None) -> PreparedData:
    """Load, normalise, split and tokenize the training (and eval) data; raises DataError on bad input.

    Losses that train on unpaired examples (kto) get ``TokenizedExample`` records instead of pairs.
    With ``cache_dir``, tokenized pairs are saved there and a later call with the same data, tokenizer and
    settings reads them back instead of loading and tokenizing again (``dpolab.data.cache``).
    """
    if getattr(get_loss(config.loss), "unpaired", False):
        return prepare_examples(config, tokenizer)
    if config.streaming:  # read lazily, never held whole (dpolab.streaming); no token cache
        from .streaming import prepare_streaming

        return prepare_streaming(config, tokenizer)
    if cache_dir is None:
        return _prepare_pairs(config, tokenizer)
    path = token_cache.cache_path(cache_dir, token_cache.cache_key(config, tokenizer))
    cached = token_cache.load(path)
    if cached is not None:
        splits, summary = cached
        return PreparedData(train=splits["train"], eval=splits.get("eval", []),
                            summary=summary + [f"tokenized pairs: reusing cache {path}"])
    result = _prepare_pairs(config, tokenizer)
    result.cache_to = path  # written by save_token_cache once the output folder exists
    return result


def save_token_cache(data: PreparedData) -> None:
    """Write the tokenized pairs that ``prepare_data`` was asked to cache (once; the main process only)."""
    if data.cache_to is not None:
        token_cache.save(data.cache_to, {"train": data.train, "eval": data.eval}, data.summary)
        data.cache_to = None


def _prepare_pairs(config: TrainConfig, tokenizer) -> PreparedData:
    loaded, eval_loaded, summary = _load_sources(config, load_pairs, _load_line)
    train_pairs, eval_pairs = loaded.pairs, []
    if config.objective:  # the objectives' own files join --data's pairs (dpolab.objectives)
        extra, lines = objectives.load_files(config, load_pairs, _check_strict)
        train_pairs, summary = train_pairs + extra, summary + lines
    if eval_loaded is not None:
        eval_pairs = eval_loaded.pairs
    elif config.eval_split > 0:
        total = len(train_pairs)
        train_pairs, eval_pairs = split_pairs(train_pairs, config.eval_split, config.seed, config.data)
        summary.append(f"eval: {len(eval_pairs):,} pairs held out of {total:,} (--eval-split {config.eval_split})")
    tags = {"train": objectives.tag(config, train_pairs), "eval": objectives.tag(config, eval_pairs)} \
        if config.objective else None  # before tokenizing: an unknown objective fails fast
    train, lines = _tokenize("train", config.data, train_pairs, tokenizer, config)
    result = PreparedData(train=train, summary=summary + lines)
    if eval_pairs:
        result.eval, lines = _tokenize("eval", config.eval_data or config.data, eval_pairs, tokenizer, config)
        result.summary += lines
    if tags is not None:
        result.train, result.eval = objectives.attach(result.train, tags["train"]), objectives.attach(
            result.eval, tags["eval"])
        objectives.check_counts(config, config.data, result.train)
        result.summary.append(objectives.summary_line(config, {"train": result.train, "eval": result.eval}))
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


# ---------------------------------------------------------------------------------------------
# Unpaired examples (KTO)


def prepare_examples(config: TrainConfig, tokenizer) -> PreparedData:
    """KTO: load unpaired examples (or pairs, each split in two), hold out eval rows, tokenize with KL rows."""
    loaded, eval_loaded, summary = _load_sources(config, load_examples, _examples_line)
    train, held = loaded.examples, []
    if eval_loaded is not None:
        held = eval_loaded.examples
    elif config.eval_split > 0:  # hold out whole rows: both halves of a split pair stay together
        _, held_rows = split_pairs(sorted({e.row for e in train}), config.eval_split, config.seed, config.data)
        held_rows = set(held_rows)
        train, held = [e for e in train if e.row not in held_rows], [e for e in train if e.row in held_rows]
        summary.append(f"eval: {len(held):,} examples held out of {len(loaded.examples):,} "
                       f"(--eval-split {config.eval_split})")
    result = PreparedData(train=[], summary=summary)
    result.train, lines = _tokenize_examples("train", config.data, train, tokenizer, config)
    result.summary += lines
    if held:
        result.eval, lines = _tokenize_examples("eval", config.eval_data or config.data, held, tokenizer, config)
        result.summary += lines
    return result


def _examples_line(name: str, loaded: LoadedData) -> str:
    origin = "" if "unpaired" in loaded.format else f", 2 per pair ({len(loaded.pairs):,} pairs)"
    return (f"{name}: {loaded.rows_read:,} rows read from {loaded.source} (format: {loaded.format}); "
            f"{len(loaded.examples):,} examples{origin}")


def _tokenize_examples(name: str, source: str, examples: list, tokenizer,
                       config: TrainConfig) -> tuple[list[TokenizedExample], list[str]]:
    tokenized, stats = tokenize_examples(examples, tokenizer, max_length=config.max_length,
                                         max_prompt_length=config.max_prompt_length, seed=config.seed,
                                         show_progress=config.progress and len(examples) >= PROGRESS_MIN_PAIRS)
    _check_strict_tokens(config, source, stats, examples)
    if not tokenized:
        raise DataError(source, f"no {name} example fits max_length={config.max_length} (dropped: {stats.dropped})",
                        fix="raise --max-length or lower --max-prompt-length")
    good = sum(e.label for e in tokenized)
    bad = len(tokenized) - good
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(stats.dropped.items())) or "none"
    lines = [f"{name}: {len(tokenized):,} examples tokenized ({good:,} desirable, {bad:,} undesirable), dropped "
             f"{dropped}; {stats.prompt_truncated:,} prompts and {stats.completion_truncated:,} completions "
             "(KL rows included) truncated"]
    balance = (config.desirable_weight * good) / max(config.undesirable_weight * bad, 1e-9)
    if name == "train" and not 1 <= balance <= 4 / 3:
        lines.append(f"train: desirable_weight x desirable / (undesirable_weight x undesirable) = {balance:.2f}; "
                     "the KTO paper recommends 1 to 4/3 (adjust --desirable-weight / --undesirable-weight)")
    return tokenized, lines
