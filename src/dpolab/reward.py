"""Bradley–Terry reward models: the model side of ``--loss bradley_terry`` and the reward model as a judge.

A reward model is a causal LM with a one-output linear head, ``AutoModelForSequenceClassification``
with ``num_labels=1``, trained by ``dpolab reward train`` (the one training loop, with the loss of
``dpolab.losses.reward``) and saved in Hugging Face format. Its reward r(x, y) is the head applied to
the backbone's hidden state at the LAST token of prompt + completion (the completion's EOS unless it
was truncated). We compute that ourselves instead of calling the model's own pooling, which looks for
the first padding token: when the tokenizer pads with EOS (most causal LMs), that pooling would read
the token before the completion's EOS instead of the EOS itself.

``score_completions`` tokenizes exactly as training does (``dpolab.data.tokenize``), so a judge scores
the very ids the model was trained on; ``RewardModelJudge`` is that as a ``dpolab.judges.Judge``, which
``dpolab.judges.load_judge(folder)`` returns for a saved reward model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import lora
from .errors import ConfigError
from .judges import Judge

DEFAULT_MAX_LENGTH, DEFAULT_MAX_PROMPT_LENGTH = 1024, 512
"""Lengths ``score_completions`` cuts to when the reward model's run does not say (``TrainConfig``'s defaults)."""


def is_reward_loss(name: str) -> bool:
    from .losses import LOSSES

    return bool(getattr(LOSSES.get(name.strip()), "sequence_classifier", False))


def validate(c) -> None:
    """``TrainConfig`` rules of the reward-model loss: what a reward model does not combine with."""
    from .losses import loss_names

    names = loss_names(c.loss)
    if not any(is_reward_loss(n) for n in names):
        return
    checks = (
        (len(names) == 1, "loss", f"'{c.loss}' mixes the reward-model loss with others, but a reward model is "
         "trained on its own", "train it alone: dpolab reward train (--loss bradley_terry)"),
        (not c.lora_r, "lora_r", "a reward model's new score head is trained with all weights, not a LoRA adapter",
         "drop --lora-r"),
        (not c.fsdp, "fsdp", "reward models are not sharded with --fsdp yet", "drop --fsdp (DDP under torchrun works)"),
        (c.kl_eval_steps is None, "kl_eval_steps", "a reward model writes no text, so there is no KL to sample",
         "drop --kl-eval-steps"),
        (not c.wpo, "wpo", "weights pairs by the policy's log-probs, which a reward model does not compute",
         "drop --wpo"),
        (c.ld_alpha == 1, "ld_alpha", "weighs completion tokens in log-probs; a reward model reads one score per "
         "sequence", "drop --ld-alpha"),
    )
    for ok, field, problem, fix in checks:
        if not ok:
            raise ConfigError(field, problem, fix)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The one-output linear head of a sequence-classification model (``model.score``: Llama, Qwen2,
    Mistral, Gemma, GPT-2, ...), or a ConfigError for architectures that keep it elsewhere."""
    model = lora.unwrap(model)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ConfigError("model", f"{type(model).__name__} has no one-output 'score' head, so dpolab cannot read "
                          "a reward from it", "use a causal LM whose *ForSequenceClassification class has a 'score' "
                          "layer (Llama, Qwen2, Mistral, Gemma, GPT-2, ...)")
    return head


def load_score_model(config, pad_token_id: int | None, say: Callable | None = None) -> torch.nn.Module:
    """``config.model`` as ``AutoModelForSequenceClassification(num_labels=1)`` in fp32, its config's
    ``pad_token_id`` set. A causal LM checkpoint gets a new, randomly initialised score head: said in one
    line (``say``) instead of transformers' warning."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if lora.adapter_folder(config.model) is not None:
        raise ConfigError("model", f"'{config.model}' is a LoRA adapter; a reward model trains all weights of a full "
                          "model", "pass a full model folder (write one with --merge-lora)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            config.model, num_labels=1, dtype=torch.float32, trust_remote_code=config.trust_remote_code,
            use_safetensors=None if config.allow_pickle else True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError("model", f"cannot load '{config.model}' as a reward model (a causal LM with a one-output "
                          f"score head): {first}", "pass a causal LM folder or hub name, or a folder that "
                          "dpolab reward train saved") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    head = score_head(model)
    if say is not None and any(k.split(".")[0] == "score" for k in info.get("missing_keys", [])):
        say(f"note: '{config.model}' has no reward head: a new score head ({head.in_features} -> 1, random "
            "initialisation) is trained from scratch")
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    elif model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return model


def last_token_rewards(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """r per right-padded row [R] (fp32): the score head on the backbone's hidden state at the row's last
    real token (the last position its 2-D ``attention_mask`` marks)."""
    head = score_head(model)
    inner = lora.unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.long().sum(dim=1) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked).squeeze(-1).float()


def batch_rewards(model: torch.nn.Module, batch) -> Tensor:
    """Rewards [2B] of a plain-layout ``PairBatch``: the chosen rows, then the rejected ones."""
    if batch.position_ids is not None or batch.attention_mask.dim() != 2:
        raise ConfigError("prefix_sharing", "the reward model reads each sequence's last token from plain padded "
                          "rows, not prefix-shared or packed ones", "pass --no-prefix-sharing --no-packing "
                          "(dpolab reward train does)")
    return last_token_rewards(model, batch.input_ids, batch.attention_mask)


# ------------------------------------------------------------------------------------------------
# Loading and scoring
# ------------------------------------------------------------------------------------------------

def _check_reward_folder(path: str) -> None:
    """A local folder must hold a one-output sequence classifier (what ``dpolab reward train`` saves):
    loading a causal LM as a judge would give it a random head and random scores."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return  # a hub name, or a folder load_tokenizer refuses with its own message
    data = json.loads(config.read_text(encoding="utf-8"))
    archs = data.get("architectures") or ["(no architecture)"]
    labels = len(data.get("id2label") or {}) or data.get("num_labels", 2)
    classifier = any(str(a).endswith("ForSequenceClassification") for a in archs)
    if not classifier or labels != 1:
        what = f"a classifier with {labels} labels" if classifier else f"config.json names {archs[0]}"
        raise ConfigError("model", f"'{path}' is not a reward model ({what}, not a one-output score head)",
                          "train one with dpolab reward train and pass its final/ folder")


def load_reward_model(path: str, device: str = "auto") -> tuple[object, torch.nn.Module]:
    """(tokenizer, reward model in fp32, eval mode) from a folder ``dpolab reward train`` saved (or a hub
    name), with the trainer's loading rules (safetensors only, pad = EOS when the tokenizer has none)."""
    from .config import TrainConfig
    from .prepare import load_model, load_tokenizer
    from .runtime import Runtime, resolve_device

    probe = TrainConfig(model=str(path), data="-", output_dir="-", progress=False, loss="bradley_terry",
                        prefix_sharing=False, packing=False)
    tokenizer = load_tokenizer(probe)
    _check_reward_folder(str(path))
    model = load_model(probe, Runtime(device=resolve_device(device), precision="fp32"),
                       pad_token_id=tokenizer.pad_token_id)
    return tokenizer, model.eval()


@torch.no_grad()
def score_completions(model: torch.nn.Module, tokenizer, prompts: Sequence, completions: Sequence, *,
                      batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH,
                      max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH, progress: bool = False) -> list[float]:
    """r(prompt, completion) for each pair of the two lists, in order.

    Prompts and completions are texts (or chat messages, rendered with the chat template) and are
    tokenized by the training rules (``dpolab.data.tokenize``: exact boundary, EOS appended, prompt
    kept to its last ``max_prompt_length`` tokens, completion cut to ``max_length``), then scored
    longest first in right-padded batches of ``batch_size``.
    """
    from .data.records import PreferencePair
    from .data.tokenize import tokenize_pairs

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}", "use e.g. 16")
    pairs = [PreferencePair(p, c, c, row=i + 1) for i, (p, c) in enumerate(zip(prompts, completions))]
    tokenized, _ = tokenize_pairs(pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                  keep_identical=True)
    rows = [t.prompt_ids + t.chosen_ids for t in tokenized]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # masked out
    scores = [math.nan] * len(rows)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        part = order[start:start + batch_size]
        width = max(len(rows[i]) for i in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for k, i in enumerate(part):
            ids[k, :len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            mask[k, :len(rows[i])] = 1
        for i, r in zip(part, last_token_rewards(model, ids.to(device), mask.to(device)).tolist()):
            scores[i] = r
    model.train(was_training)
    return scores


class RewardModelJudge(Judge):
    """A trained reward model as a judge: ``score`` is r(x, y); ``compare`` is the Bradley–Terry
    probability σ(r(x, a) − r(x, b)) that the first completion is the better one."""

    pointwise = True

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 16, name: str = "reward model",
                 max_length: int = DEFAULT_MAX_LENGTH, max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    @classmethod
    def load(cls, path: str, *, device: str = "auto", batch_size: int = 16) -> "RewardModelJudge":
        """The reward model in ``path``; the lengths it cuts to are its run's (``config.yaml`` beside it)."""
        from .evaluate import run_config

        tokenizer, model = load_reward_model(path, device)
        run = run_config(path)
        return cls(model, tokenizer, batch_size=batch_size, name=str(path),
                   max_length=int(run.get("max_length", DEFAULT_MAX_LENGTH)),
                   max_prompt_length=int(run.get("max_prompt_length", DEFAULT_MAX_PROMPT_LENGTH)))

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return score_completions(self.model, self.tokenizer, list(prompts), list(completions),
                                 batch_size=self.batch_size, max_length=self.max_length,
                                 max_prompt_length=self.max_prompt_length)

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        a, b = self.score(prompts, first), self.score(prompts, second)
        return [1.0 / (1.0 + math.exp(y - x)) if y - x < 700 else 0.0 for x, y in zip(a, b)]

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        """A judge is also a reward function (``dpolab.evaluate`` calls it directly)."""
        return self.score(prompts, completions)
