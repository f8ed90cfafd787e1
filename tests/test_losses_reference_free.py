"""Reference-free losses by hand: SimPO, CPO, ORPO, SFT (they receive no reference log-probs at all)."""

import math

import pytest
import torch

from dpolab.losses import LOSSES


def t(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def logsig(x):
    return -math.log1p(math.exp(-x))


def call(name, pc, pr, lengths=(3, 4), beta=0.1, **hyper):
    return LOSSES[name](pc, pr, None, None, beta=beta, chosen_lengths=torch.tensor([lengths[0]]),
                        rejected_lengths=torch.tensor([lengths[1]]), **hyper)


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo", "sft"])
def test_declared_reference_free(name):
    assert LOSSES[name].reference_free


def test_simpo_by_hand():
    # per-token log-probs: -6/3 = -2 and -12/4 = -3, margin 1; beta = 2, gamma = 0.5
    loss = call("simpo", t(-6.0), t(-12.0), beta=2.0, simpo_gamma=0.5)
    assert loss.item() == pytest.approx(-logsig(2.0 * 1 - 0.5), abs=1e-12)
    zero_gamma = call("simpo", t(-6.0), t(-12.0), beta=2.0, simpo_gamma=0.0)
    assert zero_gamma.item() == pytest.approx(-logsig(2.0), abs=1e-12)
    # zero-length completions count as one token: margin = -6 - (-12) = 6
    assert call("simpo", t(-6.0), t(-12.0), lengths=(0, 0), beta=2.0, simpo_gamma=0.5).item() == pytest.approx(
        -logsig(11.5), abs=1e-12)


def test_cpo_by_hand():
    pc = t(-6.0)
    loss = call("cpo", pc, t(-12.0), beta=0.1)
    assert loss.item() == pytest.approx(-logsig(0.1 * 6.0) + 2.0, abs=1e-12)
    loss.backward()
    # d/d pc: -beta sigma(-beta (pc - pr)) - 1/|y_w|
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.6)) - 1 / 3, abs=1e-12)


def log_odds(mean_logp):
    return mean_logp - math.log(1 - math.exp(mean_logp))


def test_orpo_by_hand():
    # p_bar = -2 (chosen, 3 tokens) and -3 (rejected, 4 tokens)
    loss = call("orpo", t(-6.0), t(-12.0), beta=0.1)
    expected = 2.0 + 0.1 * -logsig(log_odds(-2.0) - log_odds(-3.0))
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_orpo_stays_finite_at_probability_one():
    # an empty (or certain) completion has mean log-prob 0: odds are infinite, the cap keeps them finite
    pc = t(0.0)
    loss = call("orpo", pc, t(-4.0), lengths=(0, 4), beta=0.1)
    loss.backward()
    assert math.isfinite(loss.item()) and math.isfinite(pc.grad.item())
    near_one = call("orpo", t(-1e-4), t(-4.0), lengths=(1, 4), beta=0.1).item()
    assert near_one == pytest.approx(1e-4 + 0.1 * -logsig(log_odds(-1e-4) - log_odds(-1.0)), rel=1e-9)


def test_sft_is_length_normalised_nll_of_chosen():
    pc = t(-6.0)
    loss = call("sft", pc, t(-1.0), lengths=(3, 1))
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and pc.grad.item() == pytest.approx(-1 / 3)
