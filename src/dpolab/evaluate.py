"""How good is a policy, and how far did it move from its reference?

Two kinds of evaluation, shared by ``dpolab eval`` and ``dpolab demo``:

* **On held-out preference pairs** (no sampling): the trainer's own evaluation, ``steps.evaluate``,
  with the reference scored once up front: implicit-reward accuracy, margins, loss.
* **On held-out prompts** (sampling): one completion per prompt from π and one from π_ref, judged by
  a reward function. Reported: the mean reward of each; the **win rate** of π over π_ref,
  mean over prompts of [r(y_π) > r(y_ref)] + ½·[r(y_π) = r(y_ref)]; and the sequence-level
  **KL(π‖π_ref)** estimated by sampling from π,

      KL ≈ (1/n) Σ_i [log π(y_i|x_i) − log π_ref(y_i|x_i)],   y_i ~ π(·|x_i),

  in nats, with its standard error s/√n (s the sample standard deviation, ddof = 1). The estimator
  is unbiased only for samples of π itself, so these samples use temperature 1 and no top-p, and
  the log-probs are computed on the exact sampled token ids (never on re-tokenized text).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import ConfigError
from .generate import Sample, generate
from .logprobs import sequence_logps

Judge = Callable[[list[str], list[str]], Sequence[float]]
"""judge(prompts, completions) -> one reward per completion (higher is better)."""


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean = sample std (ddof 1) / √n); the error is nan for n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def win_outcomes(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> list[float]:
    """Per prompt: 1 when π's sample has the higher reward, 0 when lower, ½ on a tie."""
    if len(policy_rewards) != len(reference_rewards):
        raise ValueError("win rate needs one policy and one reference reward per prompt")
    return [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_rewards, reference_rewards)]


def win_rate(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> tuple[float, float]:
    """(win rate of π over π_ref with ties counted half, its standard error)."""
    return mean_stderr(win_outcomes(policy_rewards, reference_rewards))


# ------------------------------------------------------------------------------------------------
# Log-probs of sampled completions and the KL estimate
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def completion_logps(model: torch.nn.Module, samples: Sequence[Sample], *, batch_size: int = 64) -> Tensor:
    """log π(y|x) of each sample's exact ``completion_ids`` given its ``prompt_ids``: shape [N], fp32.

    Rows are right-padded (positions 0..n-1, as in training) and scored by ``sequence_logps``, the
    function the trainer uses, so the numbers are the trainer's numbers.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        width = max(len(s.prompt_ids) + len(s.completion_ids) for s in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        loss_mask = torch.zeros_like(ids)
        for row, s in enumerate(chunk):
            n, m = len(s.prompt_ids), len(s.completion_ids)
            ids[row, :n + m] = torch.tensor(s.prompt_ids + s.completion_ids)
            attention[row, :n + m] = 1
            loss_mask[row, n:n + m] = 1
        out.append(sequence_logps(model, ids.to(device), attention.to(device), loss_mask.to(device)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def kl_by_sampling(policy: torch.nn.Module, reference: torch.nn.Module, samples: Sequence[Sample], *,
                   batch_size: int = 64) -> dict[str, float]:
    """KL(π‖π_ref) in nats from samples of π: mean and standard error of log π(y|x) − log π_ref(y|x)."""
    diffs = (completion_logps(policy, samples, batch_size=batch_size)
             - completion_logps(reference, samples, batch_size=batch_size)).double().tolist()
    kl, stderr = mean_stderr(diffs)
    return {"kl": kl, "kl_stderr": stderr}


# ------------------------------------------------------------------------------------------------
# Judges
# ------------------------------------------------------------------------------------------------

def load_judge(spec: str) -> Judge:
    """``module:function`` -> the function, e.g. ``dpolab.demo.grammar:review_reward``."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError("judge", f"expected module:function, got '{spec}'",
                          "e.g. --judge dpolab.demo.grammar:review_reward")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except ImportError as e:
        raise ConfigError("judge", f"cannot import module '{module_name}': {e}",
                          "check the module name and that it is on PYTHONPATH") from None
    except AttributeError:
        raise ConfigError("judge", f"module '{module_name}' has no '{name}'", "check the function name") from None
    if not callable(fn):
        raise ConfigError("judge", f"'{spec}' is not a function", "give a function (prompts, completions) -> rewards")
    return fn


def judge_samples(judge: Judge, samples: Sequence[Sample]) -> list[float]:
    """Rewards of ``samples`` from ``judge``, checked to be one finite number per sample."""
    rewards = list(judge([s.prompt for s in samples], [s.completion for s in samples]))
    if len(rewards) != len(samples) or not all(isinstance(r, (int, float)) and math.isfinite(r) for r in rewards):
        raise ConfigError("judge", f"must return one finite number per completion ({len(samples)} expected)",
                          "return a list of floats, one per (prompt, completion)")
    return [float(r) for r in rewards]


# ------------------------------------------------------------------------------------------------
# The two evaluations
# ------------------------------------------------------------------------------------------------

@dataclass
class SampledEval:
    """What ``evaluate_by_sampling`` measured, and the samples it measured it on."""

    metrics: dict[str, float]
    policy_samples: list[Sample] = field(default_factory=list)
    reference_samples: list[Sample] = field(default_factory=list)
    policy_rewards: list[float] = field(default_factory=list)
    reference_rewards: list[float] = field(default_factory=list)


def evaluate_by_sampling(policy, reference, tokenizer, prompts: list[str], *, judge: Judge | None = None,
                         max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64, progress: bool = False,
                         reference_samples: list[Sample] | None = None) -> SampledEval:
    """One sample per prompt from π (and from π_ref when there is a judge): KL(π‖π_ref) ± stderr, and
    with a judge the mean rewards and the win rate of π over π_ref.

    ``reference_samples`` lets several policies be compared with the same π_ref samples (as the demo
    does for its β sweep), which also makes their win rates directly comparable.
    """
    policy_samples = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed,
                              batch_size=batch_size, progress=progress, desc="sampling π")
    metrics = kl_by_sampling(policy, reference, policy_samples, batch_size=batch_size)
    metrics["num_prompts"] = len(prompts)
    metrics["length_policy"] = sum(len(s.completion_ids) for s in policy_samples) / max(1, len(prompts))
    result = SampledEval(metrics, policy_samples)
    if judge is None:
        return result
    if reference_samples is None:
        reference_samples = generate(reference, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     seed=seed + 1, batch_size=batch_size, progress=progress,
                                     desc="sampling π_ref")
    result.reference_samples = reference_samples
    result.policy_rewards = judge_samples(judge, policy_samples)
    result.reference_rewards = judge_samples(judge, reference_samples)
    metrics["gold_reward_policy"], metrics["gold_reward_policy_stderr"] = mean_stderr(result.policy_rewards)
    metrics["gold_reward_reference"], metrics["gold_reward_reference_stderr"] = mean_stderr(result.reference_rewards)
    metrics["win_rate"], metrics["win_rate_stderr"] = win_rate(result.policy_rewards, result.reference_rewards)
    metrics["length_reference"] = sum(len(s.completion_ids) for s in reference_samples) / max(1, len(prompts))
    return result


class ZeroReference:
    """A reference that assigns log-prob 0 to everything: implicit rewards become β·log π, so accuracy
    says how often the model alone prefers the chosen completion. Used when no reference is given."""

    def logps(self, batch, split: str) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros(batch.num_pairs, device=batch.input_ids.device)
        return zeros, zeros


def evaluate_pairs(model, reference_model, pairs, config, rt, pad_token_id: int) -> dict[str, float]:
    """Held-out preference metrics (``eval_*`` keys) through the trainer's ``steps.evaluate``.

    The reference model scores the pairs once (the trainer's precomputed reference, not cached on
    disk); with ``reference_model=None`` the reference log-probs are 0 (see ``ZeroReference``).
    """
    from .losses import get_loss
    from .reference import PrecomputedReference
    from .steps import evaluate

    if reference_model is None:
        reference = ZeroReference()
    else:
        reference = PrecomputedReference.build(reference_model, {"eval": pairs}, rt, cache_dir=None,
                                               batch_size=config.effective_eval_batch_size,
                                               pad_token_id=pad_token_id, progress=False, say=lambda *a: None)
    return evaluate(model, pairs, reference, get_loss("sigmoid"), config, rt, pad_token_id)


def run_config(model_dir: str) -> dict:
    """The resolved config of the dpolab run whose ``final/`` (or checkpoint) folder ``model_dir`` is,
    read from the run's ``config.yaml``; empty when ``model_dir`` is not inside a run."""
    import yaml

    path = Path(model_dir).resolve()
    for folder in (path.parent, path.parent.parent):
        cfg = folder / "config.yaml"
        if cfg.is_file():
            try:
                data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def reference_of_run(model_dir: str) -> str | None:
    """The run's π_ref (its --reference-model, else the model it started from): the natural reference to
    evaluate its policy against."""
    run = run_config(model_dir)
    model = run.get("reference_model") or run.get("model")
    return str(model) if model else None
