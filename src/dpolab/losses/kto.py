"""KTO: preference optimization from unpaired examples labelled desirable or undesirable.

Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (2402.01306).
A batch of B examples is laid out as 2B rows (``dpolab.data.batching.ExampleBatch``): rows [0, B)
are prompt_i + completion_i, rows [B, 2B) are prompt_i + another example's completion. The second
half is scored only to estimate the reference point z₀ = KL(π‖π_ref) on mismatched pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import LossFn, register_loss


def kl_estimate(policy_kl: Tensor, ref_kl: Tensor) -> Tensor:
    """z₀: the batch mean of log π − log π_ref on mismatched (prompt, completion) rows, ≥ 0, detached."""
    return (policy_kl - ref_kl).mean().clamp(min=0).detach()


def kto_objective(loss_fn: LossFn, policy: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor], batch, *,
                  beta: float, **hyper) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example losses [B] and metrics for an ``ExampleBatch``; ``policy``/``ref`` are (completion, KL row)
    summed log-probs.

    Metrics: ``rewards/chosen`` and ``logps/chosen`` average over desirable examples only,
    ``rewards/rejected`` and ``logps/rejected`` over undesirable ones; ``rewards/margins`` is the
    reward's distance from z₀ in the direction the label asks for, β·(r − z₀) or β·(z₀ − r), and
    ``rewards/accuracies`` the fraction of examples on that side; ``kl`` is z₀.
    """
    (policy_logps, policy_kl), (ref_logps, ref_kl) = policy, ref
    labels = batch.labels.bool()
    losses = loss_fn(policy_logps, policy_kl, ref_logps, ref_kl, beta=beta, labels=labels, **hyper)
    z0 = kl_estimate(policy_kl, ref_kl)
    reward = beta * (policy_logps - ref_logps).detach()
    signed = torch.where(labels, reward - beta * z0, beta * z0 - reward)
    metrics = {
        "loss": losses.detach(),
        "kl": z0.expand_as(reward),
        "rewards/chosen": reward[labels],
        "rewards/rejected": reward[~labels],
        "rewards/margins": signed,
        "rewards/accuracies": (signed > 0).float(),
        "logps/chosen": policy_logps.detach()[labels],
        "logps/rejected": policy_logps.detach()[~labels],
    }
    return losses, metrics


@register_loss("kto", objective=kto_objective, unpaired=True)
def kto_loss(policy_logps: Tensor, policy_kl: Tensor, ref_logps: Tensor, ref_kl: Tensor, *, beta: float,
             labels: Tensor, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             **_: object) -> Tensor:
    """KTO: λ_D·(1 − σ(β(r − z₀))) for desirable examples, λ_U·(1 − σ(β(z₀ − r))) for undesirable ones.

    r = log π(y|x) − log π_ref(y|x) of the example; z₀ = ``kl_estimate`` of the mismatched rows;
    λ_D, λ_U = ``desirable_weight``, ``undesirable_weight`` (the paper keeps λ_D·n_D / (λ_U·n_U) in
    [1, 4/3]). Paper: Ethayarajh et al. 2024 (2402.01306). Unlike the pairwise losses, the arguments
    are (example, KL row) log-probs and the labels (True = desirable). Use it when: your feedback is
    thumbs up / thumbs down on single answers rather than pairs, or the two kinds are imbalanced.
    """
    z0 = kl_estimate(policy_kl, ref_kl)
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(labels.bool(), desirable, undesirable)
