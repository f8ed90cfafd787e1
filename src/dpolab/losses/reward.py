"""The Bradley–Terry reward-model loss: train a scalar score r(x, y) on preference pairs.

A reward model is the causal LM with a one-output linear head (``AutoModelForSequenceClassification``,
``num_labels=1``) read at the last token of prompt + completion. Under the Bradley–Terry model
P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), and the loss is its negative log-likelihood.

It plugs into the one training loop like any other loss, through three attributes the loop reads:

* ``reference_free``: no reference pass;
* ``forward``: used by ``steps.pair_losses`` instead of the log-prob forward; it returns the per-pair
  rewards (r_chosen [B], r_rejected [B], fp32) from the backbone's hidden state at each row's last
  token and the score head (``dpolab.reward.batch_rewards``);
* ``objective``: turns the rewards into per-pair losses and metrics (``accuracy``, ``rewards/*``).

``sequence_classifier`` tells ``prepare.load_model`` to load the score-head model, and ``plain_rows``
tells the trainer to lay batches out as plain padded rows (one sequence per row, whose last real token
is where the reward is read).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import LossFn, register_loss


def reward_objective(loss_fn: LossFn, policy: tuple[Tensor, Tensor], ref, batch, *, beta: float,
                     **hyper) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses [B] and metrics from the rewards (r_chosen, r_rejected) of ``reward_forward``.

    ``batch.margins`` (0 where a pair has none) is the margin each pair must clear. Metrics: ``accuracy``
    is 1 where r_w > r_l, 0 where r_w < r_l and ½ on an exact tie (as ``dpolab.judges`` counts ties, so
    a model that scores everything alike sits at chance, 0.5); ``rewards/accuracies`` is the same number
    under the name the other losses log; ``rewards/chosen``, ``rewards/rejected`` and ``rewards/margins``
    = r_w − r_l are the raw scores (no β).
    """
    chosen, rejected = policy
    margins = getattr(batch, "margins", None)
    if margins is None:
        margins = torch.zeros_like(chosen)
    losses = loss_fn(chosen, rejected, None, None, beta=beta, margins=margins.to(chosen), **hyper)
    chosen, rejected = chosen.detach(), rejected.detach()
    accuracy = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    metrics = {
        "loss": losses.detach(),
        "accuracy": accuracy,
        "rewards/accuracies": accuracy,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
    }
    return losses, metrics


def reward_forward(model: torch.nn.Module, batch) -> tuple[Tensor, Tensor]:
    """(r_chosen [B], r_rejected [B]) in fp32 for a plain-layout ``PairBatch``. Under DDP the model is a
    ``DataParallelPolicy``, whose ``score_batch`` runs this computation as the wrapped module's forward."""
    from ..reward import batch_rewards  # the model side lives with the reward-model code

    score = getattr(model, "score_batch", None)
    rewards = score(batch, fn=batch_rewards) if score is not None else batch_rewards(model, batch)
    return rewards[: batch.num_pairs], rewards[batch.num_pairs:]


@register_loss("bradley_terry", reference_free=True, aliases=("reward",), objective=reward_objective)
def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, ref_chosen: Optional[Tensor] = None,
                       ref_rejected: Optional[Tensor] = None, *, margins: Optional[Tensor] = None,
                       label_smoothing: float = 0.0, **_: object) -> Tensor:
    """Bradley–Terry reward model: −(1−ε)·log σ(d) − ε·log σ(−d), d = r(x, y_w) − r(x, y_l) − m.

    r is the reward model's scalar score, m the pair's ``margin`` column (0 without one), ε =
    ``label_smoothing``. Paper: Bradley & Terry 1952 (the pairwise model); as a reward model for RLHF,
    Stiennon et al. 2020 (2009.01325) and Ouyang et al. 2022 (2203.02155, eq. 1); the margin term as in
    Touvron et al. 2023 (Llama 2, 2307.09288, eq. 2). β plays no part. Use it when: you want a judge
    (``dpolab reward train``): to label samples for iterative or online DPO, to rank best-of-n, or to
    measure a policy, rather than to train the policy itself.
    """
    d = chosen_rewards - rejected_rewards
    if margins is not None:
        d = d - margins
    return -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)


bradley_terry_loss.forward = reward_forward
bradley_terry_loss.sequence_classifier = True
bradley_terry_loss.plain_rows = True
