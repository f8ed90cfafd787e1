"""The pieces the training loop calls: one batch's loss and metrics, evaluation, optimizer, schedule.

``pair_losses`` is the single place where a batch becomes per-pair losses; training, evaluation and
every later method go through it.
"""

from __future__ import annotations

import math
from collections import defaultdict
import torch
from torch import Tensor

from .config import TrainConfig
from .data.batching import PairBatch, collate_pairs
from .data.tokenize import TokenizedPair
from .losses import LossFn, preference_metrics
from .reference import pair_logps
from .runtime import Runtime


def pair_losses(model: torch.nn.Module, batch: PairBatch, reference, loss_fn: LossFn, config: TrainConfig,
                rt: Runtime, split: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses [B] (fp32, differentiable) and per-pair metrics for one batch on ``rt.device``."""
    with rt.autocast():
        policy_chosen, policy_rejected = pair_logps(model, batch)
    ref_chosen, ref_rejected = reference.logps(batch, split) if reference is not None else (None, None)
    losses = loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=config.beta,
                     chosen_lengths=batch.chosen_lengths, rejected_lengths=batch.rejected_lengths,
                     **config.loss_hyperparameters())
    metrics = preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config.beta)
    metrics["loss"] = losses.detach()
    return losses, metrics


class MetricSums:
    """Running sums of per-pair metrics, averaged over pairs (and over processes) on read."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.pairs = 0

    def add(self, metrics: dict[str, Tensor]) -> None:
        for key, values in metrics.items():
            self.sums[key] += float(values.float().sum())
        self.pairs += next(iter(metrics.values())).shape[0]

    def means(self, rt: Runtime, prefix: str = "") -> dict[str, float]:
        keys = sorted(self.sums)
        packed = rt.reduce_sum(torch.tensor([self.sums[k] for k in keys] + [self.pairs], dtype=torch.float64))
        count = max(float(packed[-1]), 1.0)
        return {prefix + k: float(v) / count for k, v in zip(keys, packed[:-1].tolist())}


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: list[TokenizedPair], reference, loss_fn: LossFn, config: TrainConfig,
             rt: Runtime, pad_token_id: int) -> dict[str, float]:
    """Mean loss and preference metrics over held-out pairs, keys prefixed ``eval_``."""
    was_training = model.training
    model.eval()
    sums = MetricSums()
    size = config.effective_eval_batch_size
    for start in range(rt.rank * size, len(pairs), size * rt.world_size):  # each process takes its share
        batch = collate_pairs(pairs[start:start + size], pad_token_id).to(rt.device)
        _, metrics = pair_losses(model, batch, reference, loss_fn, config, rt, "eval")
        sums.add(metrics)
    model.train(was_training)
    return sums.means(rt, prefix="eval_")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on biases and norm scales)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate, betas=(0.9, 0.999),
                             eps=1e-8, foreach=True)


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


def plan_steps(num_pairs: int, config: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    batches = math.ceil(num_pairs / config.batch_size)
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

