"""DPO's derivation, executable: the closed-form optimum and the loss that recovers it.

One prompt x, a small finite set of responses y_1..y_n, a reward r(y) and a reference π_ref(y) > 0.

* The KL-constrained objective  max_π E_π[r] − β·KL(π ‖ π_ref)  has the closed-form optimum
  π*(y) = π_ref(y)·exp(r(y)/β) / Z,  Z = Σ_y π_ref(y)·exp(r(y)/β)          (``optimal_policy``)
* Preferences follow Bradley–Terry: P(y_i ≻ y_j) = σ(r_i − r_j)            (``bradley_terry``)
  Adding any f(x) to every reward of the prompt cancels in r_i − r_j, so neither the preferences
  nor the DPO loss can see it; that is why Z(x) never has to be computed.
* The DPO loss, in expectation over how pairs are drawn and labelled, is   (``expected_dpo_loss``)
  L(π) = Σ_{i≠j} s_ij · P(y_i ≻ y_j) · −log σ(β·[(log π_i − log π_ref,i) − (log π_j − log π_ref,j)])
  with s_ij = q_ij + q_ji the probability that the pair {i, j} is drawn (``pair_distribution``).
  Each pair's term is minimised exactly when β·(h_i − h_j) = r_i − r_j, h = log π − log π_ref.
  When every pair has support (s_ij > 0; strictly, a connected comparison graph suffices), these
  conditions force log π = log π_ref + r/β + const, i.e. π = π*. Pairs never drawn constrain
  nothing, and with a disconnected comparison graph the optimum is not unique.

The policy is a tabular softmax, π = softmax(logits). The loss only sees differences of log π, so
it is invariant to adding a constant to all logits: the optimum is identified up to that constant,
and the *probabilities* are what match π* (``fit_tabular_policy`` returns them).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from dpolab.losses import LOSSES

ArrayLike = Union[Tensor, Sequence[float]]


def _vec(x: ArrayLike, name: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"{name} must be a 1-D vector over at least 2 responses, got shape {tuple(t.shape)}")
    return t


def _ref_logps(ref_probs: ArrayLike) -> Tensor:
    p = _vec(ref_probs, "ref_probs")
    if (p <= 0).any():
        raise ValueError("ref_probs must be > 0 for every response (π* and the loss need log π_ref)")
    return torch.log(p / p.sum())


def optimal_policy(ref_probs: ArrayLike, rewards: ArrayLike, beta: float) -> Tensor:
    """π*(y) = π_ref(y)·exp(r(y)/β) / Z, computed in log space (stable for small β). float64 [n]."""
    return torch.softmax(_ref_logps(ref_probs) + _vec(rewards, "rewards") / beta, dim=0)


def bradley_terry(rewards: ArrayLike) -> Tensor:
    """Matrix P with P[i, j] = P(y_i ≻ y_j) = σ(r_i − r_j) = exp(r_i) / (exp(r_i) + exp(r_j))."""
    r = _vec(rewards, "rewards")
    return torch.sigmoid(r[:, None] - r[None, :])


def pair_distribution(n: int, sampling_probs: Optional[ArrayLike] = None) -> Tensor:
    """How the data draws a pair before labelling it: q[i, j] = P(y1 = y_i, y2 = y_j).

    y1 and y2 are drawn independently from ``sampling_probs`` (default uniform; the DPO paper draws
    them from π_SFT ≈ π_ref), conditioned on y1 ≠ y2: identical responses carry no preference.
    Every pair has support when every sampling probability is > 0.
    """
    mu = torch.full((n,), 1.0 / n, dtype=torch.float64) if sampling_probs is None else _vec(sampling_probs, "sampling_probs")
    q = (mu[:, None] * mu[None, :]).fill_diagonal_(0.0)
    return q / q.sum()


def expected_dpo_loss(logits: Tensor, ref_logps: ArrayLike, rewards: ArrayLike, beta: float, *,
                      pair_probs: Optional[Tensor] = None) -> Tensor:
    """Expected DPO loss of the tabular policy softmax(logits) (scalar, differentiable in logits).

    Every ordered pair (chosen=i, rejected=j), i ≠ j, is scored with the registry's
    ``LOSSES["sigmoid"]`` and weighted by s_ij · P(y_i ≻ y_j), where s_ij = q_ij + q_ji is the
    probability of drawing the pair under ``pair_probs`` q (default ``pair_distribution(n)``:
    uniform over i ≠ j) and P is ``bradley_terry(rewards)``. The weights sum to 1.
    """
    policy_logps = torch.log_softmax(logits, dim=0)
    ref = _vec(ref_logps, "ref_logps").to(policy_logps)
    n = policy_logps.numel()
    q = pair_distribution(n) if pair_probs is None else torch.as_tensor(pair_probs, dtype=torch.float64)
    if q.shape != (n, n) or (q < 0).any() or q.diagonal().any() or abs(q.sum().item() - 1) > 1e-9:
        raise ValueError("pair_probs must be an n x n probability matrix with a zero diagonal")
    weights = (q + q.T) * bradley_terry(rewards)
    i, j = torch.where(~torch.eye(n, dtype=torch.bool))
    per_pair = LOSSES["sigmoid"](policy_logps[i], policy_logps[j], ref[i], ref[j], beta=beta)
    return (weights[i, j].to(per_pair) * per_pair).sum()


def fit_tabular_policy(ref_probs: ArrayLike, rewards: ArrayLike, beta: float, *,
                       pair_probs: Optional[Tensor] = None, max_iter: int = 500) -> Tensor:
    """Minimise ``expected_dpo_loss`` over free logits; return the learned probabilities softmax(logits).

    Full-batch L-BFGS (strong Wolfe line search) in float64 from π = π_ref: deterministic, and it
    converges to machine-precision gradients on these small convex problems. Only the softmax is
    returned, because the logits are identified only up to an additive constant.
    """
    ref = _ref_logps(ref_probs)
    logits = ref.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-14,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = expected_dpo_loss(logits, ref, rewards, beta, pair_probs=pair_probs)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(logits.detach(), dim=0)


def total_variation(p: ArrayLike, q: ArrayLike) -> float:
    """TV(p, q) = ½·Σ|p − q| (0 = identical, 1 = disjoint)."""
    return 0.5 * (torch.as_tensor(p, dtype=torch.float64) - torch.as_tensor(q, dtype=torch.float64)).abs().sum().item()
