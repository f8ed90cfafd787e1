"""Options that apply across pairwise losses, and the objective that applies them.

* f-DPO (``--f-divergence``): each log-ratio u = log π − log π_ref is replaced by f'(e^u) before the
  loss sees it, so any loss written in r_w and r_l regularizes with another f-divergence.
* WPO (``--wpo``): each pair's loss is weighted by how likely the policy is to write that pair now.
* LD-DPO (``--ld-alpha``) acts on the log-probs themselves: see ``dpolab.data.batching`` (the
  per-token weights) and ``dpolab.logprobs`` (the weighted sums).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import LossFn, per_token, preference_metrics

EXP_CAP = 50.0
"""Exponents are capped here so forward_kl/alpha stay finite for absurd log-ratios (e^50 ≈ 5e21)."""


def _forward_kl(u: Tensor, alpha: float) -> Tensor:
    return 1 - torch.exp((-u).clamp(max=EXP_CAP))


def _alpha(u: Tensor, alpha: float) -> Tensor:
    return torch.expm1(((alpha - 1) * u).clamp(max=EXP_CAP)) / (alpha - 1)


F_DIVERGENCES = {
    "reverse_kl": lambda u, alpha: u,                       # f(x) = x log x: f'(e^u) = u + 1
    "forward_kl": _forward_kl,                              # f(x) = −log x: f'(e^u) = −e^(−u)
    "js": lambda u, alpha: math.log(2) + F.logsigmoid(u),   # Jensen-Shannon: f'(e^u) = log(2e^u / (1 + e^u))
    "alpha": _alpha,                                        # (e^((α−1)u) − 1)/(α−1): α → 1 reverse, α = 0 forward
}
"""f'(e^u) for each f-divergence of f-DPO (Wang et al. 2023, "Beyond Reverse KL", 2309.16240), shifted
by a constant (which cancels in h) so that every transform is 0 at u = 0: a policy equal to its
reference still has zero log-ratios."""


def f_divergence_ratio(u: Tensor, kind: str, alpha: float = 0.5) -> Tensor:
    """The log-ratio u transformed for f-divergence ``kind`` (one of ``F_DIVERGENCES``)."""
    return F_DIVERGENCES[kind](u, alpha)


def wpo_weights(policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor,
                rejected_lengths: Tensor) -> Tensor:
    """WPO: exp(π_c/|y_w|) · exp(π_r/|y_l|), detached — the per-token (geometric mean) probability of the
    chosen completion times that of the rejected one under the current policy.

    Paper: Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization" (2406.11827).
    Pairs the policy would itself write weigh more, which makes off-policy data act closer to on-policy.
    """
    return torch.exp(per_token(policy_chosen, chosen_lengths) + per_token(policy_rejected, rejected_lengths)).detach()


def preference_objective(loss_fn: LossFn, policy: tuple[Tensor, Tensor],
                         ref: tuple[Optional[Tensor], Optional[Tensor]], batch, *, beta: float,
                         **hyper) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses [B] and metrics of a pairwise loss, with the f-divergence and WPO options applied.

    ``policy`` and ``ref`` are (chosen, rejected) summed log-probs; ``batch`` gives the completion
    lengths; ``hyper`` holds every loss hyperparameter and is passed on to ``loss_fn`` whole.
    """
    (policy_chosen, policy_rejected), (ref_chosen, ref_rejected) = policy, ref
    logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    kind = hyper.get("f_divergence", "reverse_kl")
    if kind != "reverse_kl":
        if ref_chosen is None:
            raise ValueError(f"f_divergence={kind} needs a reference model; reference-free losses have none")
        alpha = hyper.get("f_alpha", 0.5)
        zero = torch.zeros_like(policy_chosen)
        logps = (f_divergence_ratio(policy_chosen - ref_chosen, kind, alpha),
                 f_divergence_ratio(policy_rejected - ref_rejected, kind, alpha), zero, zero)
    losses = loss_fn(*logps, beta=beta, chosen_lengths=batch.chosen_lengths,
                     rejected_lengths=batch.rejected_lengths, **hyper)
    metrics = preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if hyper.get("wpo"):
        weights = wpo_weights(policy_chosen, policy_rejected, batch.chosen_lengths, batch.rejected_lengths)
        losses = losses * weights
        metrics["wpo/weights"] = weights
    metrics["loss"] = losses.detach()
    return losses, metrics
