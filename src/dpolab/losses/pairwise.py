"""Pairwise losses against a reference model: DPO and the family that changes its link function.

Each takes the four summed log-probs of a preference pair (see ``dpolab.losses.registry``) and
returns one loss per pair. Notation: r_w = π_c − ref_c, r_l = π_r − ref_r, h = r_w − r_l, and a
bar means divided by the completion length (|y_w| for chosen, |y_l| for rejected).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import log_ratio_margin, per_token, register_loss


@register_loss("sigmoid", aliases=("dpo",))
def sigmoid_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                 *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """DPO: −(1−ε)·log σ(βh) − ε·log σ(−βh), ε = ``label_smoothing`` (0 = plain DPO).

    Paper: Rafailov et al. 2023, "Direct Preference Optimization" (2305.18290), eq. 7; ε > 0 is
    conservative DPO (cDPO, Mitchell 2023), which assumes a fraction ε of the labels are flipped.
    Use it when: you have preference pairs and a reference model: the default, the baseline to beat.
    """
    logits = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_loss("robust")
def robust_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                *, beta: float, label_smoothing: float = 0.0, **_: object) -> Tensor:
    """Robust DPO: [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1−2ε), ε = ``label_smoothing``.

    Paper: Chowdhury et al. 2024, "Provably Robust DPO" (2403.00409). An unbiased estimate of the
    clean-label DPO loss when each label is flipped with probability ε (ε = 0 is plain DPO).
    Use it when: you know (or can estimate) the label noise rate of your preference data.
    """
    logits = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


@register_loss("hinge")
def hinge_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
               *, beta: float, **_: object) -> Tensor:
    """Hinge: max(0, 1 − βh).

    Paper: Zhao et al. 2023, "SLiC-HF" (2305.10425), the rank-calibration loss on log-ratios.
    Use it when: pairs already separated by a margin of 1/β should stop contributing (no push to ∞).
    """
    return torch.relu(1 - beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


@register_loss("ipo")
def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             *, beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor, **_: object) -> Tensor:
    """IPO: (h̄ − 1/(2β))², h̄ = r_w/|y_w| − r_l/|y_l|.

    Paper: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (2310.12036), eq. 17. The squared loss regresses the margin to 1/(2β) instead of
    pushing it to infinity. Use it when: preferences are (near) deterministic and DPO overfits,
    driving both log-probs down.
    """
    h_bar = per_token(policy_chosen - ref_chosen, chosen_lengths) - per_token(policy_rejected - ref_rejected,
                                                                              rejected_lengths)
    return (h_bar - 1 / (2 * beta)) ** 2


@register_loss("exo_pair")
def exo_pair_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                  *, beta: float, exo_epsilon: float = 1e-3, **_: object) -> Tensor:
    """ExO (pairwise): σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε), ε = ``exo_epsilon``.

    Paper: Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment"
    (2402.00856). The reverse KL from the model's preference probability to the ε-smoothed label; its
    minimum is at βh = log((1−ε)/ε). Use it when: you want the mode-seeking (reverse-KL) solution of
    the RLHF objective rather than DPO's mean-seeking one.
    """
    logits = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-exo_epsilon))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(exo_epsilon)))


@register_loss("nca_pair")
def nca_pair_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                  *, beta: float, **_: object) -> Tensor:
    """NCA (pairwise): −log σ(βr_w) − ½·log σ(−βr_w) − ½·log σ(−βr_l).

    Paper: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
    (2402.05369). Optimizes absolute log-ratios, not only their difference, so the chosen likelihood
    does not fall. Use it when: DPO lowers the chosen log-prob (e.g. reasoning or math answers).
    """
    r_w, r_l = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register_loss("bco_pair")
def bco_pair_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                  *, beta: float, **_: object) -> Tensor:
    """BCO (pairwise): −log σ(βr_w) − log σ(−βr_l).

    Paper: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"
    (2404.04656), without the reward shift δ. Each completion is classified on its own (chosen
    log-ratio up, rejected down). Use it when: you want chosen and rejected judged independently,
    e.g. when the pair's two answers are of unequal difficulty.
    """
    r_w, r_l = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)


@register_loss("sppo_hard")
def sppo_hard_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                   *, beta: float, **_: object) -> Tensor:
    """SPPO (hard labels): (r_w − 1/(2β))² + (r_l + 1/(2β))².

    Paper: Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment"
    (2405.00675), with win probabilities 1 and 0. Regresses each log-ratio to ±1/(2β).
    Use it when: you run iterative self-play rounds and want each round's log-ratios pinned.
    """
    r_w, r_l = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    return (r_w - 1 / (2 * beta)) ** 2 + (r_l + 1 / (2 * beta)) ** 2


@register_loss("apo_zero")
def apo_zero_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                  *, beta: float, **_: object) -> Tensor:
    """APO-zero: (1 − σ(βr_w)) + σ(βr_l).

    Paper: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"
    (2408.06266). Raises the chosen likelihood and lowers the rejected one, each anchored at the
    reference. Use it when: the chosen answers are better than what the model writes now.
    """
    chosen_ratio, rejected_ratio = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return (1 - torch.sigmoid(chosen_ratio)) + torch.sigmoid(rejected_ratio)


@register_loss("apo_down")
def apo_down_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                  *, beta: float, **_: object) -> Tensor:
    """APO-down: σ(βr_w) + (1 − σ(βh)).

    Paper: D'Oosterlinck et al. 2024 (2408.06266). Lowers both likelihoods, the rejected one more.
    Use it when: even the chosen answers are worse than the model's own outputs, but the ranking
    between them still carries signal.
    """
    logits = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return torch.sigmoid(beta * (policy_chosen - ref_chosen)) + (1 - torch.sigmoid(logits))


@register_loss("discopop")
def discopop_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                  *, beta: float, discopop_tau: float = 0.05, **_: object) -> Tensor:
    """DiscoPOP: with m = σ(βh/τ): (1−m)·(−log σ(βh)) + m·exp(−βh), τ = ``discopop_tau``.

    Paper: Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models" (2406.08414), the LLM-discovered log-ratio modulated loss: logistic for negative margins,
    exponential for positive ones. m·exp(−βh) is computed as exp(log σ(βh/τ) − βh), which stays
    finite for any margin when τ ≤ 1. The loss is not convex: with the paper's τ = 0.05 it has a local
    minimum at βh ≈ −0.12 and a local maximum at βh ≈ 0.07, so from policy = reference (h = 0) the
    first steps lower the margin slightly (for τ above about 0.1 the slope at 0 raises it).
    Use it when: you want a drop-in DPO replacement that the paper found stronger on chat benchmarks
    (MT-Bench, AlpacaEval).
    """
    logits = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    modulation = torch.sigmoid(logits / discopop_tau)
    return (1 - modulation) * -F.logsigmoid(logits) + torch.exp(F.logsigmoid(logits / discopop_tau) - logits)


@register_loss("dpop")
def dpop_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
              *, beta: float, dpop_lambda: float = 50.0, **_: object) -> Tensor:
    """DPO-Positive: −log σ(β·(h − λ·max(0, ref_c − π_c))), λ = ``dpop_lambda``.

    Paper: Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive"
    (2402.13228). Penalizes any drop of the chosen log-prob below the reference. Use it when: chosen
    and rejected differ in a few tokens (edit distance small, e.g. math), where DPO lowers both.
    """
    penalty = torch.clamp(ref_chosen - policy_chosen, min=0)
    h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * (h - dpop_lambda * penalty))


@register_loss("sigmoid_norm")
def sigmoid_norm_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                      *, beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor, **_: object) -> Tensor:
    """Length-normalized DPO: −log σ(β·h̄), h̄ = r_w/|y_w| − r_l/|y_l|.

    Paper: DPO (Rafailov et al. 2023, 2305.18290) on per-token log-ratios, the length normalization
    SimPO (Meng et al. 2024, 2405.14734) uses, kept with a reference. Use it when: DPO rewards length
    (chosen answers tend to be longer) and the model learns verbosity; use a larger β than for DPO,
    since h̄ is per token.
    """
    h_bar = per_token(policy_chosen - ref_chosen, chosen_lengths) - per_token(policy_rejected - ref_rejected,
                                                                              rejected_lengths)
    return -F.logsigmoid(beta * h_bar)
