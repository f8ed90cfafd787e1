"""Reference-free losses: no π_ref, so the trainer skips the reference pass (and its memory) entirely.

They receive ``ref_chosen = ref_rejected = None``. Notation: π_c, π_r are the summed log-probs of
the chosen and rejected completions, |y_w|, |y_l| their token counts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import per_token, register_loss

ORPO_MAX_MEAN_LOGP = -1e-6
"""ORPO's log odds are infinite at a per-token probability of exactly 1 (e.g. an empty completion):
the mean log-prob is capped just below 0 so the loss stays finite."""


@register_loss("simpo", reference_free=True)
def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Optional[Tensor],
               ref_rejected: Optional[Tensor], *, beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor,
               simpo_gamma: float = 0.5, **_: object) -> Tensor:
    """SimPO: −log σ(β·(π_c/|y_w| − π_r/|y_l|) − γ), γ = ``simpo_gamma``.

    Paper: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (2405.14734). The reward is the average per-token log-prob, which matches how generation scores
    text; γ is a target margin. The paper uses β ≈ 2–2.5 (``--beta 2``), not DPO's 0.1.
    Use it when: you want DPO-like results without a reference model's memory and compute.
    """
    margin = per_token(policy_chosen, chosen_lengths) - per_token(policy_rejected, rejected_lengths)
    return -F.logsigmoid(beta * margin - simpo_gamma)


@register_loss("cpo", reference_free=True)
def cpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Optional[Tensor],
             ref_rejected: Optional[Tensor], *, beta: float, chosen_lengths: Tensor, **_: object) -> Tensor:
    """CPO: −log σ(β·(π_c − π_r)) − π_c/|y_w|.

    Paper: Xu et al. 2024, "Contrastive Preference Optimization" (2401.08417): DPO with a uniform
    reference (which cancels) plus NLL on the chosen completion. Use it when: the chosen answers are
    high-quality targets (e.g. translation references) and memory rules out a reference model.
    """
    return -F.logsigmoid(beta * (policy_chosen - policy_rejected)) - per_token(policy_chosen, chosen_lengths)


def log_odds(logps: Tensor, lengths: Tensor) -> Tensor:
    """log(p / (1 − p)) of the per-token mean log-prob p̄ = π/|y|: p̄ − log(1 − exp(p̄))."""
    mean = per_token(logps, lengths).clamp(max=ORPO_MAX_MEAN_LOGP)
    return mean - torch.log(-torch.expm1(mean))  # log(1 − e^p̄) = log(−expm1(p̄)), exact near p̄ = 0


@register_loss("orpo", reference_free=True)
def orpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Optional[Tensor],
              ref_rejected: Optional[Tensor], *, beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor,
              **_: object) -> Tensor:
    """ORPO: −π_c/|y_w| + β·(−log σ(log odds_w − log odds_l)), log odds = p̄ − log(1 − exp(p̄)), p̄ = π/|y|.

    Paper: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (2403.07691); β is the paper's λ (about 0.1). SFT and preference alignment in one stage.
    Use it when: you start from a base model (no SFT stage yet) and want to skip SFT + DPO.
    """
    ratio = log_odds(policy_chosen, chosen_lengths) - log_odds(policy_rejected, rejected_lengths)
    return -per_token(policy_chosen, chosen_lengths) - beta * F.logsigmoid(ratio)


@register_loss("sft", reference_free=True)
def sft_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Optional[Tensor],
             ref_rejected: Optional[Tensor], *, chosen_lengths: Tensor, **_: object) -> Tensor:
    """SFT on the chosen completion ("Preferred-FT"): −π_c/|y_w|, the per-token NLL.

    Mixed with DPO it is RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    2404.19733): ``--loss sigmoid,sft --loss-weights 1,α``. Use it when: alone, as the SFT baseline on
    the chosen answers; in a mix, to keep DPO from lowering the chosen likelihood.
    """
    return -per_token(policy_chosen, chosen_lengths)
