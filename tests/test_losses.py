"""Loss values computed by hand from the formulas (math.log/exp on literal numbers), not by the code."""

import math

import pytest
import torch

from dpolab.losses import LOSSES, get_loss, preference_metrics, register_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# policy chosen/rejected, reference chosen/rejected: h = (-10 + 11) - (-12 + 11) = 2
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.0


def test_sigmoid_equals_log2_when_policy_is_reference():
    loss = LOSSES["sigmoid"](t(-3.0, -7.5), t(-4.0, -1.0), t(-3.0, -7.5), t(-4.0, -1.0), beta=0.1)
    assert torch.allclose(loss, torch.full((2,), math.log(2), dtype=torch.float64))


def test_sigmoid_value_and_gradient_by_hand():
    pc, pr, rc, rr = t(PC), t(PR), t(RC), t(RR)
    loss = LOSSES["dpo"](pc, pr, rc, rr, beta=0.5)
    # -log sigma(beta*h) = log(1 + exp(-beta*h)) with beta*h = 1
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-12)
    loss.sum().backward()
    # d/d pc of -log sigma(beta h) = -beta * sigma(-beta h) = -0.5 / (1 + e)
    expected = -0.5 / (1 + math.e)
    assert pc.grad.item() == pytest.approx(expected, abs=1e-12)
    assert pr.grad.item() == pytest.approx(-expected, abs=1e-12)
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen and lowers rejected


def test_cdpo_label_smoothing_by_hand():
    loss = LOSSES["sigmoid"](t(PC), t(PR), t(RC), t(RR), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_ipo_uses_length_normalised_margin():
    loss = LOSSES["ipo"](t(PC), t(PR), t(RC), t(RR), beta=0.5, chosen_lengths=torch.tensor([4]),
                         rejected_lengths=torch.tensor([2]))
    # r_w = 1/4, r_l = -1/2, h_bar = 0.75, target 1/(2*0.5) = 1 -> (0.75 - 1)^2
    assert loss.item() == pytest.approx(0.0625, abs=1e-12)


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.25
    h = t(1 / (2 * beta))  # chosen log-ratio per token = 2, lengths 1
    loss = LOSSES["ipo"](h, t(0.0), t(0.0), t(0.0), beta=beta, chosen_lengths=torch.tensor([1]),
                         rejected_lengths=torch.tensor([1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_hinge_by_hand():
    assert LOSSES["hinge"](t(PC), t(PR), t(RC), t(RR), beta=0.5).item() == pytest.approx(0.0)
    assert LOSSES["hinge"](t(PC), t(PR), t(RC), t(RR), beta=0.1).item() == pytest.approx(0.8)
    assert LOSSES["hinge"](t(PR), t(PC), t(RC), t(RR), beta=0.1).item() == pytest.approx(1.2)


def test_metrics_by_hand():
    m = preference_metrics(t(PC), t(PR), t(RC), t(RR), beta=0.5)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margins"].item() == pytest.approx(1.0)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == PC and m["logps/rejected"].item() == PR


def test_registry_accepts_user_losses():
    @register_loss("test_user_margin", reference_free=True)
    def user_loss(pc, pr, rc, rr, *, beta, **_):
        return -(pc - pr) * beta

    try:
        assert get_loss("test_user_margin") is user_loss and user_loss.reference_free
        assert not LOSSES["sigmoid"].reference_free
        with pytest.raises(ValueError):
            register_loss("sigmoid")(lambda *a, **k: None)
        with pytest.raises(KeyError, match="registered"):
            get_loss("nope")
    finally:
        LOSSES.pop("test_user_margin")


def test_sft_is_length_normalised_nll_of_chosen():
    pc = t(-6.0)
    loss = LOSSES["sft"](pc, t(-1.0), None, None, beta=0.1, chosen_lengths=torch.tensor([3]),
                         rejected_lengths=torch.tensor([1]))
    loss.backward()
    assert LOSSES["sft"].reference_free
    assert loss.item() == pytest.approx(2.0) and pc.grad.item() == pytest.approx(-1 / 3)
