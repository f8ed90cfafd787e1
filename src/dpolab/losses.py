"""Preference losses: a registry of pure functions.

Every loss has the same signature::

    fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta,
       chosen_lengths, rejected_lengths, **hyper) -> Tensor[B]      (one loss per pair)

The four log-prob tensors have shape [B] and hold SUMS of completion-token log-probabilities
(log π(y|x) = Σ_t log π(y_t | x, y_<t)); the lengths are completion token counts (for losses that
normalise by length). Reference-free losses are registered with ``reference_free=True``, accept
``ref_* = None``, and the trainer then skips the reference pass entirely.

Notation below: r_w = π_c − ref_c and r_l = π_r − ref_r are the log-ratios of the chosen (winning)
and rejected (losing) completions, and h = r_w − r_l.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[..., Tensor]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str, *, reference_free: bool = False, aliases: tuple[str, ...] = ()):
    """Decorator: add a loss function to ``LOSSES`` under ``name`` (and ``aliases``).

    Users can register their own loss the same way and select it with ``--loss NAME``.
    """

    def wrap(fn: LossFn) -> LossFn:
        fn.reference_free = reference_free
        for key in (name, *aliases):
            if key in LOSSES and LOSSES[key] is not fn:
                raise ValueError(f"a loss named '{key}' is already registered")
            LOSSES[key] = fn
        return fn

    return wrap


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss '{name}'; registered: {', '.join(sorted(LOSSES))}") from None


def log_ratio_margin(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                     ref_rejected: Tensor) -> Tensor:
    """h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


@register_loss("sigmoid", aliases=("dpo",))
def sigmoid_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                 *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(β·h).

    With ``label_smoothing`` ε > 0 this is conservative DPO (cDPO), which assumes a fraction ε of
    the labels are flipped: −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    """
    logits = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_loss("ipo")
def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             *, beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor, **_: object) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h̄ − 1/(2β))², with h̄ built from length-averaged log-ratios.

    The squared loss regresses the margin to 1/(2β) instead of pushing it to infinity, which guards
    against overfitting on deterministic preferences.
    """
    r_w = (policy_chosen - ref_chosen) / chosen_lengths.clamp(min=1)
    r_l = (policy_rejected - ref_rejected) / rejected_lengths.clamp(min=1)
    return (r_w - r_l - 1 / (2 * beta)) ** 2


@register_loss("hinge")
def hinge_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
               *, beta: float, **_: object) -> Tensor:
    """SLiC-HF style hinge (Zhao et al. 2023): max(0, 1 − β·h)."""
    return torch.relu(1 - beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


@register_loss("sft", reference_free=True)
def sft_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Optional[Tensor],
             ref_rejected: Optional[Tensor], *, chosen_lengths: Tensor, **_: object) -> Tensor:
    """Supervised fine-tuning on the chosen completion ("Preferred-FT"): −log π(y_w|x) / |y_w|.

    Reference-free; mixed with DPO it is the RPO objective (a later ``--loss sigmoid,sft``).
    """
    return -policy_chosen / chosen_lengths.clamp(min=1)


def preference_metrics(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Optional[Tensor],
                       ref_rejected: Optional[Tensor], beta: float) -> dict[str, Tensor]:
    """Per-pair quantities practitioners watch (shape [B] each; the caller averages).

    Implicit rewards are β·(log π − log π_ref); accuracy is 1 where the chosen reward is higher.
    """
    ref_c = ref_chosen if ref_chosen is not None else torch.zeros_like(policy_chosen)
    ref_r = ref_rejected if ref_rejected is not None else torch.zeros_like(policy_rejected)
    reward_c = beta * (policy_chosen - ref_c).detach()
    reward_r = beta * (policy_rejected - ref_r).detach()
    return {
        "rewards/chosen": reward_c,
        "rewards/rejected": reward_r,
        "rewards/accuracies": (reward_c > reward_r).float(),
        "rewards/margins": reward_c - reward_r,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }
