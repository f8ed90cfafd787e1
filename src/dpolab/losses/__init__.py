"""Preference losses: a registry of pure functions, selected by name with ``--loss``.

==================  =====================================================================
``registry``        ``LOSSES``, ``register_loss``, ``get_loss`` (names and ``a,b`` mixes),
                    the signature every loss follows, ``preference_metrics``
``pairwise``        DPO and the losses against a reference model (sigmoid, robust, hinge,
                    ipo, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down,
                    discopop, dpop, sigmoid_norm)
``reference_free``  simpo, cpo, orpo, sft: no reference pass at all
``kto``             KTO on unpaired desirable/undesirable examples
``reward``          bradley_terry (alias reward): a scalar reward model, not a policy
``modifiers``       f-divergence (f-DPO) and WPO weighting, applied to any pairwise loss
==================  =====================================================================

Importing this package registers every built-in loss.
"""

from . import kto, pairwise, reference_free, reward  # noqa: F401  (registers the built-in losses)
from .modifiers import F_DIVERGENCES, f_divergence_ratio, preference_objective, wpo_weights
from .registry import (LOSSES, LossFn, LossMix, get_loss, log_ratio_margin, loss_names, per_token,
                       preference_metrics, register_loss)

__all__ = [
    "F_DIVERGENCES", "LOSSES", "LossFn", "LossMix", "f_divergence_ratio", "get_loss", "log_ratio_margin",
    "loss_names", "per_token", "preference_metrics", "preference_objective", "register_loss", "wpo_weights",
]
