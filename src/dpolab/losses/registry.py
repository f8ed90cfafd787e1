"""The loss registry: names -> pure per-pair loss functions, weighted mixes of them, and metrics.

Every pairwise loss has the same signature::

    fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, chosen_lengths,
       rejected_lengths, **hyper) -> Tensor[B]      (one loss per pair)

The four log-prob tensors have shape [B] and hold SUMS of completion-token log-probabilities
(log π(y|x) = Σ_t log π(y_t | x, y_<t)); the lengths are completion token counts (for losses that
normalise by length). ``hyper`` holds every hyperparameter of ``TrainConfig.loss_hyperparameters()``;
a loss takes the ones it uses by name and ignores the rest (``**_``). Reference-free losses are
registered with ``reference_free=True`` and accept ``ref_* = None``; the trainer then skips the
reference pass entirely. A loss that needs another data shape (KTO: unpaired examples) also names its
``objective``, the function that turns a batch's log-probs into losses and metrics.

Notation: r_w = π_c − ref_c and r_l = π_r − ref_r are the log-ratios of the chosen (winning) and
rejected (losing) completions, h = r_w − r_l, and a bar means divided by the completion length.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

LossFn = Callable[..., Tensor]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str, *, reference_free: bool = False, aliases: tuple[str, ...] = (),
                  objective: Optional[Callable] = None, unpaired: bool = False):
    """Decorator: add a loss function to ``LOSSES`` under ``name`` (and ``aliases``).

    Users can register their own loss the same way and select it with ``--loss NAME`` (also inside a
    mix: ``--loss sigmoid,NAME``). ``objective`` and ``unpaired`` are only for losses that do not
    take preference pairs (``dpolab.losses.kto``: unpaired examples); pairwise losses leave them unset.
    """
    if "," in name or any("," in a for a in aliases):
        raise ValueError(f"loss names cannot contain ',' (it separates the parts of a mix): {name!r}")

    def wrap(fn: LossFn) -> LossFn:
        fn.reference_free = reference_free
        fn.objective = objective
        fn.unpaired = unpaired
        for key in (name, *aliases):
            if key in LOSSES and LOSSES[key] is not fn:
                raise ValueError(f"a loss named '{key}' is already registered")
            LOSSES[key] = fn
        return fn

    return wrap


def loss_names(spec: str) -> list[str]:
    """The names in a ``--loss`` value: ``"sigmoid"`` -> ["sigmoid"], ``"sigmoid, sft"`` -> ["sigmoid", "sft"]."""
    return [part.strip() for part in spec.split(",")]


def get_loss(spec: str) -> LossFn:
    """The registered loss ``spec``, or for ``"a,b,..."`` a ``LossMix`` of registered losses."""
    names = loss_names(spec)
    for name in names:
        if name not in LOSSES:
            raise KeyError(f"unknown loss '{name}'; registered: {', '.join(sorted(LOSSES))}")
    return LOSSES[names[0]] if len(names) == 1 else LossMix(names)


class LossMix:
    """The weighted sum Σ_k w_k · loss_k of registered losses (``--loss a,b --loss-weights 0.8,0.2``).

    This is the "MPO" mix (mixed preference optimization: several losses, one weighted sum), and with
    ``sigmoid,sft`` the RPO objective of Pang et al. 2024 (2404.19733). The weights arrive like every
    other hyperparameter, as ``loss_weights`` (default: 1 each). The mix is reference-free only when
    every part is; the parts must share one objective (KTO, which trains on unpaired examples, does
    not mix with pair losses).
    """

    def __init__(self, names: list[str]):
        self.names = tuple(names)
        self.parts = tuple(LOSSES[n] for n in names)
        self.reference_free = all(getattr(p, "reference_free", False) for p in self.parts)
        objectives = {getattr(p, "objective", None) for p in self.parts}
        if len(objectives) > 1:
            raise ValueError(f"losses {', '.join(names)} cannot be mixed: they train on different data "
                             "(kto takes unpaired examples, the others preference pairs)")
        self.objective = objectives.pop()
        self.unpaired = any(getattr(p, "unpaired", False) for p in self.parts)

    def __call__(self, *logps: Optional[Tensor], loss_weights: Optional[tuple[float, ...]] = None,
                 **hyper) -> Tensor:
        weights = tuple(loss_weights) if loss_weights else (1.0,) * len(self.parts)
        if len(weights) != len(self.parts):
            raise ValueError(f"{len(weights)} loss weights for {len(self.parts)} losses ({', '.join(self.names)})")
        return sum(w * fn(*logps, **hyper) for w, fn in zip(weights, self.parts))

    def __repr__(self) -> str:
        return f"LossMix({','.join(self.names)})"


def log_ratio_margin(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                     ref_rejected: Tensor) -> Tensor:
    """h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """A sum over completion tokens divided by their count; a zero-length completion counts as 1 token."""
    return logps / lengths.clamp(min=1).to(logps.dtype)


def preference_metrics(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Optional[Tensor],
                       ref_rejected: Optional[Tensor], beta: float) -> dict[str, Tensor]:
    """Per-pair quantities practitioners watch (shape [B] each; the caller averages).

    Implicit rewards are β·(log π − log π_ref) (β·log π for reference-free losses); accuracy is 1
    where the chosen reward is higher.
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
