"""DPO's derivation checked by code (dpolab.theory): on a tabular policy over a few responses, the
expected DPO loss under Bradley–Terry preferences is minimised by π* = π_ref·exp(r/β)/Z."""

import math

import pytest
import torch

from dpolab.theory import (bradley_terry, expected_dpo_loss, fit_tabular_policy, optimal_policy,
                           pair_distribution, total_variation)

REWARDS = [1.0, 0.0, -0.5, 2.0]
REFS = {
    "uniform": [0.25, 0.25, 0.25, 0.25],
    "skewed": [0.6, 0.25, 0.1, 0.05],
    "peaked-on-best": [0.01, 0.02, 0.07, 0.9],
}


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_optimal_policy_by_hand_on_three_responses():
    ref, rewards, beta = [0.5, 0.3, 0.2], [1.0, 2.0, -1.0], 0.5
    unnormalised = [p * math.exp(r / beta) for p, r in zip(ref, rewards)]
    z = sum(unnormalised)  # 0.5 e^2 + 0.3 e^4 + 0.2 e^-2
    expected = [u / z for u in unnormalised]
    assert optimal_policy(ref, rewards, beta).tolist() == pytest.approx(expected, abs=1e-14)
    assert expected[1] == pytest.approx(0.3 * math.exp(4) / (0.5 * math.exp(2) + 0.3 * math.exp(4) + 0.2 * math.exp(-2)))


def test_bradley_terry_by_hand():
    p = bradley_terry([1.0, 0.0, 3.0])
    assert p[0, 1].item() == pytest.approx(math.exp(1) / (math.exp(1) + 1), abs=1e-14)
    assert p[2, 0].item() == pytest.approx(1 / (1 + math.exp(-2)), abs=1e-14)
    assert torch.allclose(p + p.T, torch.ones(3, 3, dtype=torch.float64))  # P(i≻j) + P(j≻i) = 1


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 5.0])
@pytest.mark.parametrize("ref_name", list(REFS))
def test_dpo_converges_to_closed_form_optimum(ref_name, beta):
    ref = REFS[ref_name]
    learned = fit_tabular_policy(ref, REWARDS, beta)
    target = optimal_policy(ref, REWARDS, beta)
    assert total_variation(learned, target) < 1e-3
    # and the implicit reward β·log(π/π_ref) is the true reward up to a constant (β·log Z)
    implicit = beta * torch.log(learned / f64(ref))
    shift = implicit - f64(REWARDS)
    assert (shift - shift.mean()).abs().max().item() < 1e-4


@pytest.mark.parametrize("beta", [0.2, 2.0])
def test_convergence_when_pairs_are_drawn_from_the_reference(beta):
    """The paper's setting: y1, y2 ~ π_ref (here unequal sampling weights, five responses)."""
    ref, rewards = [0.4, 0.3, 0.15, 0.1, 0.05], [0.3, -1.0, 1.5, 0.0, 0.7]
    learned = fit_tabular_policy(ref, rewards, beta, pair_probs=pair_distribution(5, ref))
    assert total_variation(learned, optimal_policy(ref, rewards, beta)) < 1e-3


def test_closed_form_optimum_is_a_stationary_point_of_the_expected_loss():
    ref, beta = f64(REFS["skewed"]), 0.7
    logits = torch.log(optimal_policy(ref, REWARDS, beta)).requires_grad_(True)
    expected_dpo_loss(logits, torch.log(ref), REWARDS, beta).backward()
    assert logits.grad.abs().max().item() < 1e-12
    # any other policy has a higher expected loss
    other = torch.log(ref).requires_grad_(False)
    assert expected_dpo_loss(other, torch.log(ref), REWARDS, beta) > expected_dpo_loss(logits.detach(), torch.log(ref), REWARDS, beta)


def test_loss_is_invariant_to_a_constant_added_to_all_logits():
    """The policy's normalisation is invisible to DPO: only softmax(logits) is identified."""
    logits, ref = f64([0.3, -1.2, 2.0, 0.1]), torch.log(f64(REFS["skewed"]))
    base = expected_dpo_loss(logits, ref, REWARDS, 0.5)
    for c in (-7.0, 0.5, 40.0):
        assert expected_dpo_loss(logits + c, ref, REWARDS, 0.5).item() == pytest.approx(base.item(), abs=1e-12)


def _expected_loss_by_hand(probs, ref, rewards, beta):
    """Σ_{i≠j} (2/(n(n−1))) · σ(r_i − r_j) · log(1 + exp(−β·h_ij)), uniform pair sampling, in math."""
    n = len(probs)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                h = (math.log(probs[i]) - math.log(ref[i])) - (math.log(probs[j]) - math.log(ref[j]))
                p_bt = 1 / (1 + math.exp(-(rewards[i] - rewards[j])))
                total += 2 / (n * (n - 1)) * p_bt * math.log1p(math.exp(-beta * h))
    return total


@pytest.mark.parametrize("prompt_shift", [0.0, -3.0, 12.5])
def test_partition_function_cancels(prompt_shift):
    """Adding f(x) to every reward of a prompt leaves BT preferences and the DPO loss unchanged."""
    prompts = {  # per prompt: reference, rewards, policy being scored
        "x1": ([0.5, 0.3, 0.2], [1.0, 2.0, -1.0], [0.2, 0.5, 0.3]),
        "x2": ([0.1, 0.6, 0.3], [-0.4, 0.9, 0.2], [0.3, 0.3, 0.4]),
    }
    beta = 0.5
    for k, (ref, rewards, probs) in enumerate(prompts.values()):
        shifted = [r + prompt_shift * (k + 1) for r in rewards]  # a different f(x) per prompt
        p, p_shifted = bradley_terry(rewards), bradley_terry(shifted)
        for i in range(3):
            for j in range(3):
                by_hand = math.exp(shifted[i]) / (math.exp(shifted[i]) + math.exp(shifted[j]))
                assert p_shifted[i, j].item() == pytest.approx(by_hand, abs=1e-12)
        assert torch.allclose(p, p_shifted, atol=1e-14, rtol=0)
        logits, ref_logps = torch.log(f64(probs)), torch.log(f64(ref))
        loss = expected_dpo_loss(logits, ref_logps, rewards, beta).item()
        loss_shifted = expected_dpo_loss(logits, ref_logps, shifted, beta).item()
        assert loss_shifted == pytest.approx(loss, abs=1e-12)
        assert loss == pytest.approx(_expected_loss_by_hand(probs, ref, rewards, beta), abs=1e-12)
        assert loss_shifted == pytest.approx(_expected_loss_by_hand(probs, ref, shifted, beta), abs=1e-12)
        # and π* does not move either: Z(x) absorbs the shift
        assert torch.allclose(optimal_policy(ref, rewards, beta), optimal_policy(ref, shifted, beta), atol=1e-14)


def test_large_beta_stays_at_the_reference():
    ref = REFS["skewed"]
    distances = [total_variation(fit_tabular_policy(ref, REWARDS, beta), ref) for beta in (1.0, 10.0, 100.0, 1000.0)]
    assert distances == sorted(distances, reverse=True)
    assert distances[-1] < 1e-3


def test_small_beta_concentrates_on_the_best_response():
    ref = REFS["skewed"]  # the best response (index 3) has the smallest reference mass, 0.05
    best = max(range(len(REWARDS)), key=REWARDS.__getitem__)
    mass = [fit_tabular_policy(ref, REWARDS, beta)[best].item() for beta in (1.0, 0.3, 0.1, 0.05)]
    assert mass == sorted(mass)
    assert mass[-1] > 0.99


def test_a_connected_comparison_graph_suffices():
    """Pairs (0,1) and (1,2) only: r_0 − r_2 is never compared directly, yet π* is recovered."""
    q = f64([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]])
    ref, rewards = [0.5, 0.3, 0.2], [1.0, 2.0, -1.0]
    assert total_variation(fit_tabular_policy(ref, rewards, 0.5, pair_probs=q), optimal_policy(ref, rewards, 0.5)) < 1e-3


def test_pairs_without_support_leave_the_optimum_unidentified():
    """Pairs drawn only within {0,1} and within {2,3}: moving mass between the groups is invisible."""
    q = f64([[0, 0.25, 0, 0], [0.25, 0, 0, 0], [0, 0, 0, 0.25], [0, 0, 0.25, 0]])
    ref = torch.log(f64(REFS["uniform"]))
    at_optimum = torch.log(optimal_policy(REFS["uniform"], REWARDS, 0.5))
    moved = at_optimum + f64([0, 0, 3.0, 3.0])  # a different policy (group {2,3} gains mass)
    assert total_variation(torch.softmax(moved, 0), torch.softmax(at_optimum, 0)) > 0.1
    assert expected_dpo_loss(moved, ref, REWARDS, 0.5, pair_probs=q).item() == pytest.approx(
        expected_dpo_loss(at_optimum, ref, REWARDS, 0.5, pair_probs=q).item(), abs=1e-12)


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="ref_probs"):
        optimal_policy([0.5, 0.5, 0.0], [1.0, 0.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="pair_probs"):
        expected_dpo_loss(f64([0.0, 0.0]), f64([-0.7, -0.7]), [1.0, 0.0], 1.0, pair_probs=torch.eye(2, dtype=torch.float64))
