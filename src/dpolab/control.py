"""β schedules and KL control: the β the loss sees at each optimizer step, and a sampled KL(π‖π_ref).

The β of optimizer step t (0-based, T steps in all) is

    β_t = schedule(t) · m

* ``schedule(t) = beta_at(t, T, --beta-schedule, --beta-start, --beta-end)``: constant, or linear /
  cosine from ``beta_start`` at step 0 to ``beta_end`` at step T − 1 (both default to ``--beta``).
* ``m``, the adaptive multiplier, starts at 1 and changes only with ``--target-kl``: after each KL
  estimate (every ``--kl-eval-steps`` steps),

      m ← m · exp(η · clip(KL / target − 1, −0.2, 0.2)),   η = ``--kl-adapt-rate``

  so β rises when the policy has drifted further than the target and falls when it stays closer,
  by at most a factor e^(±0.2η) per estimate (the proportional controller of PPO-based RLHF's
  adaptive KL penalty, in multiplicative form so β stays positive).

The KL estimate is ``dpolab.evaluate``'s: one sample per held-out prompt from π at temperature 1,
the mean of log π(y|x) − log π_ref(y|x) over the exact sampled ids, ± its standard error. Its π_ref
is a model: the ``--reference model`` copy when there is one, the policy with its adapters off for a
fresh LoRA adapter, else a frozen copy of the initial weights kept **on the CPU** (the precomputed
reference holds only log-probs of the training pairs, not of fresh samples), made only when
``--kl-eval-steps`` is set.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from .errors import ConfigError

MAX_RELATIVE_ERROR = 0.2
"""The clip of (KL / target − 1) in the adaptive update: β moves by at most e^(±0.2·η) per estimate."""


def beta_at(step: int, total: int, schedule: str, start: float, end: float) -> float:
    """β of optimizer step ``step`` (0-based) of ``total``: ``start`` at step 0, ``end`` at the last step.

    linear: start + (end − start)·p; cosine: end + (start − end)·(1 + cos πp)/2, with p = step / (total − 1)
    clipped to [0, 1]; constant: start.
    """
    if schedule == "constant" or total <= 1:
        return float(start)
    p = min(1.0, max(0.0, step / (total - 1)))
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown beta schedule '{schedule}'")


def adapt_scale(scale: float, kl: float, target: float, rate: float = 1.0) -> float:
    """The adaptive multiplier after one KL estimate: scale · exp(rate · clip(kl / target − 1, −0.2, 0.2)).

    A non-finite estimate leaves it unchanged."""
    if not math.isfinite(kl):
        return scale
    error = min(MAX_RELATIVE_ERROR, max(-MAX_RELATIVE_ERROR, kl / target - 1.0))
    return scale * math.exp(rate * error)


class BetaControl:
    """The β of each step (schedule × adaptive multiplier) and what a KL estimate does to it."""

    def __init__(self, config, total_steps: int, scale: float = 1.0):
        self.config, self.total, self.scale = config, total_steps, scale

    def beta(self, step: int) -> float:
        c = self.config
        start = c.beta if c.beta_start is None else c.beta_start
        end = c.beta if c.beta_end is None else c.beta_end
        return beta_at(step, self.total, c.beta_schedule, start, end) * self.scale

    def due(self, step: int) -> bool:
        """Whether a KL estimate follows optimizer step ``step`` (1-based)."""
        every = self.config.kl_eval_steps
        return bool(every) and step % every == 0

    def update(self, kl: float) -> None:
        if self.config.target_kl is not None:
            self.scale = adapt_scale(self.scale, kl, self.config.target_kl, self.config.kl_adapt_rate)

    def over_limit(self, kl: float) -> bool:
        return self.config.max_kl is not None and math.isfinite(kl) and kl > self.config.max_kl


class KLMonitor:
    """KL(π‖π_ref) by sampling from the policy on a fixed set of prompt ids (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, reference, prompt_ids: list[list[int]], tokenizer, config, rt,
                 ref_model: torch.nn.Module | None = None):
        """``ref_model``: π_ref's model when it is not the policy's initial weights (``--reference-model``)."""
        from . import lora
        from .reference import ModelReference

        self.model, self.prompts, self.config, self.rt = model, prompt_ids, config, rt
        self.eos_ids = {tokenizer.eos_token_id}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if isinstance(reference, ModelReference):  # also a --reference-model held for --reference model
            self.ref_model, self.scope = reference.model, reference.scope
        elif ref_model is not None:  # --reference-model with precomputed log-probs: the loaded model itself
            self.ref_model, self.scope = ref_model, contextlib.nullcontext
        elif lora.is_lora(model) and lora.adapter_is_noop(model):
            self.ref_model, self.scope = model, lora.shared_reference(model)
        else:  # precomputed reference (or none): a frozen copy of the initial weights, on the CPU
            self.ref_model = copy.deepcopy(model).to("cpu").eval()
            self.ref_model.requires_grad_(False)
            self.scope = contextlib.nullcontext

    @torch.no_grad()
    def estimate(self) -> dict[str, float]:
        """{"kl", "kl_stderr"}: the same numbers on every process (each samples, then they are averaged)."""
        from .evaluate import completion_logps, mean_stderr
        from .generate import Sample, sample_batch

        c = self.config
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(c.seed)
        was_training = self.model.training
        self.model.eval()
        samples = []
        size = c.effective_eval_batch_size
        for start in range(0, len(self.prompts), size):
            chunk = self.prompts[start:start + size]
            drawn = sample_batch(self.model, chunk, max_new_tokens=c.kl_max_new_tokens, eos_ids=self.eos_ids,
                                 pad_id=self.pad_id, generator=generator)
            samples += [Sample("", "", p, ids, finished) for p, (ids, finished) in zip(chunk, drawn)]
        policy = completion_logps(self.model, samples, batch_size=size)
        with self.scope():
            reference = completion_logps(self.ref_model, samples, batch_size=size)
        self.model.train(was_training)
        kl, stderr = mean_stderr((policy - reference).double().tolist())
        both = self.rt.reduce_sum(torch.tensor([kl, stderr], dtype=torch.float64)) / self.rt.world_size
        return {"kl": float(both[0]), "kl_stderr": float(both[1])}


def kl_prompt_ids(data, count: int) -> list[list[int]]:
    """The first ``count`` distinct prompts (as token ids) of the eval pairs, else of the training pairs."""
    seen: dict[tuple[int, ...], None] = {}
    for pair in (data.eval or data.train):
        seen.setdefault(tuple(pair.prompt_ids), None)
        if len(seen) >= count:
            break
    return [list(p) for p in seen]


def validate(c) -> None:
    """The β schedule and KL-control options of a ``TrainConfig``."""
    def check(ok: bool, name: str, problem: str, fix: str) -> None:
        if not ok:
            raise ConfigError(name, problem, fix)

    for name in ("beta_start", "beta_end", "target_kl", "max_kl"):
        v = getattr(c, name)
        check(v is None or (v > 0 and math.isfinite(v)), name, f"must be > 0, got {v}", "give a positive number")
    check(c.kl_adapt_rate > 0 and math.isfinite(c.kl_adapt_rate), "kl_adapt_rate",
          f"must be > 0, got {c.kl_adapt_rate}", "try 1.0")
    check(not (c.beta_schedule == "constant" and c.beta_end is not None), "beta_end",
          "has no effect with --beta-schedule constant", "add --beta-schedule linear or cosine, or drop --beta-end")
    for name in ("kl_eval_steps", "kl_prompts", "kl_max_new_tokens"):
        v = getattr(c, name)
        check(v is None or v >= 1, name, f"must be >= 1, got {v}", "use a positive integer")
    for name in ("target_kl", "max_kl"):
        check(getattr(c, name) is None or c.kl_eval_steps is not None, name, "needs KL estimates",
              "add --kl-eval-steps N (estimate KL every N optimizer steps)")
    check(c.kl_adapt_rate == 1.0 or c.target_kl is not None, "kl_adapt_rate", "has no effect without --target-kl",
          "add --target-kl X, or drop --kl-adapt-rate")
    check(c.kl_eval_steps is None or not c.fsdp, "kl_eval_steps", "sampling from a --fsdp sharded policy is not "
          "supported", "drop --fsdp, or estimate KL afterwards with dpolab eval")
    check(c.kl_eval_steps is None or c.eval_data or not getattr(c, "streaming", False), "kl_eval_steps",
          "with --streaming the KL prompts come from the eval pairs", "add --eval-data")
