"""The pieces the training loop calls: one batch's loss and metrics, evaluation, optimizer, schedule.

``pair_losses`` is the single place where a batch becomes per-pair losses; training, evaluation and
every later method go through it.
"""

from __future__ import annotations

import math
from collections import defaultdict
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .config import TrainConfig
from .data.batching import PairBatch, collate
from .data.tokenize import TokenizedPair
from .losses import LossFn, preference_objective
from .reference import pair_logps
from .runtime import Runtime


def pair_losses(model: torch.nn.Module, batch: PairBatch, reference, loss_fn: LossFn, config: TrainConfig,
                rt: Runtime, split: str, beta: float | None = None,
                objectives=None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses [B] (fp32, differentiable) and per-pair metrics for one batch on ``rt.device``.

    ``beta``: the β of this step (``dpolab.control``: scheduled / adaptive); None takes ``config.beta``.
    ``objectives``: --objective's ``dpolab.objectives.ObjectiveScales``: each pair's loss is weighted by
    its objective (the sum over a batch then estimates the weighted loss) and per-objective metrics added.

    One forward of the policy over both halves of the batch (chosen and rejected rows), one lookup of
    the reference (none for reference-free losses); the loss's objective turns the log-probs into
    losses: ``preference_objective`` for pairwise losses (with f-divergence and WPO), KTO its own.
    A loss with its own ``forward`` (the reward model's scores) replaces the log-prob forward.
    """
    forward = getattr(loss_fn, "forward", None) or pair_logps
    with rt.autocast():
        policy = forward(model, batch)
    ref = reference.logps(batch, split) if reference is not None else (None, None)
    objective = getattr(loss_fn, "objective", None) or preference_objective
    beta = config.beta if beta is None else beta
    losses, metrics = objective(loss_fn, policy, ref, batch, beta=beta, **config.loss_hyperparameters())
    if objectives is not None:  # the loss functions stay pure: the weights multiply their output
        losses, metrics = objectives.apply(losses, metrics, batch, split)
    return losses, metrics


COUNT = "count:"
"""``sums[COUNT + key]`` counts the values added for ``key``: a metric may cover only some items (KTO's
``rewards/chosen`` averages over desirable examples only)."""


class MetricSums:
    """Running sums of per-pair metrics, each averaged over the items it was given for (and over
    processes) on read."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.pairs = 0

    def add(self, metrics: dict[str, Tensor]) -> None:
        for key, values in metrics.items():
            self.sums[key] += float(values.float().sum())
            self.sums[COUNT + key] += values.shape[0]
        self.pairs += max(values.shape[0] for values in metrics.values())

    @classmethod
    def restore(cls, sums: dict[str, float], pairs: int) -> "MetricSums":
        out = cls()
        out.sums.update(sums)
        out.pairs = pairs
        return out

    def merge(self, other: "MetricSums") -> None:
        for key, value in other.sums.items():
            self.sums[key] += value
        self.pairs += other.pairs

    def all_finite(self, rt: Runtime) -> bool:
        """True when every summed value is finite on every process (a NaN anywhere skips the step)."""
        bad = sum(0 if math.isfinite(v) else 1 for v in self.sums.values())
        return float(rt.reduce_sum(torch.tensor(float(bad)))) == 0

    def means(self, rt: Runtime, prefix: str = "") -> dict[str, float]:
        keys = sorted(k for k in self.sums if not k.startswith(COUNT))
        if rt.world_size > 1:  # a process that saw no item (a short eval split) has no keys: take them all
            keys = sorted(set().union(*rt.gather_objects(keys)))
        counts = [self.sums.get(COUNT + k, self.pairs) for k in keys]
        values = [self.sums.get(k, 0.0) for k in keys]
        packed = rt.reduce_sum(torch.tensor(values + counts, dtype=torch.float64)).tolist()
        totals, counts = packed[:len(keys)], packed[len(keys):]
        return {prefix + k: total / count for k, total, count in zip(keys, totals, counts) if count > 0}


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: list[TokenizedPair], reference, loss_fn: LossFn, config: TrainConfig,
             rt: Runtime, pad_token_id: int, beta: float | None = None, objectives=None) -> dict[str, float]:
    """Mean loss and preference metrics over held-out pairs, keys prefixed ``eval_`` (at ``beta``, with
    ``objectives``, as ``pair_losses``)."""
    was_training = model.training
    model.eval()
    sums = MetricSums()
    size = config.effective_eval_batch_size
    starts = range(rt.rank * size, len(pairs), size * rt.world_size)  # each process takes its share
    if getattr(model, "lockstep", False):  # FSDP: every process runs each forward, counted or not
        starts = range(rt.rank * size, math.ceil(len(pairs) / size) * size + rt.rank * size, size * rt.world_size)
    for start in starts:
        part = pairs[start:start + size]
        batch = collate(part or pairs[:1], pad_token_id, ld_alpha=config.ld_alpha, layout=config.layout)
        _, metrics = pair_losses(model, batch.to(rt.device), reference, loss_fn, config, rt, "eval", beta,
                                 objectives)
        if part:
            sums.add(metrics)
    model.train(was_training)
    return sums.means(rt, prefix="eval_")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on biases and norm scales)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel (one pass over each tensor) is ~3x faster than foreach on CPU
        if any(isinstance(p, DTensor) for p in params):  # FSDP2 shards (DTensors): foreach, not fused
            raise ValueError("fused AdamW is not used on DTensor shards")
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, ValueError):  # devices/dtypes without a fused kernel
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan_steps(num_pairs: int, config: TrainConfig, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps); each step takes ``batch_size`` pairs per process."""
    batches = math.ceil(num_pairs / (config.batch_size * world_size))
    per_epoch = math.ceil(batches / config.grad_accum)
    total = config.max_steps if config.max_steps is not None else max(1, math.ceil(config.epochs * per_epoch))
    return per_epoch, total


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to ``max_norm`` (0 = measure only) and return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit, foreach=True))

