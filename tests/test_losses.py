"""Loss values computed by hand from the formulas (math.log/exp on literal numbers), not by the code.

Every pairwise loss against a reference: its value at a literal point, its edge cases, and the
direction in which gradient descent moves the chosen and rejected log-probs.
"""

import math

import pytest
import torch

from dpolab.losses import LOSSES, get_loss, preference_metrics, register_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return -math.log1p(math.exp(-x))


# policy chosen/rejected, reference chosen/rejected: r_w = 1, r_l = -1, h = 2 (beta = 0.5: beta*h = 1)
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.0


def value(name, beta=0.5, pc=PC, pr=PR, rc=RC, rr=RR, lengths=(1, 1), **hyper):
    loss = LOSSES[name](t(pc), t(pr), t(rc), t(rr), beta=beta, chosen_lengths=torch.tensor([lengths[0]]),
                        rejected_lengths=torch.tensor([lengths[1]]), **hyper)
    return loss.item()


def descent(name, beta=0.5, pc=-6.0, pr=-6.0, rc=-6.0, rr=-6.0, lengths=(1, 1), **hyper):
    """(−∂L/∂π_c, −∂L/∂π_r): the direction one gradient-descent step moves each log-prob."""
    c, r = t(pc), t(pr)
    refs = (None, None) if LOSSES[name].reference_free else (t(rc), t(rr))
    loss = LOSSES[name](c, r, *refs, beta=beta, chosen_lengths=torch.tensor([lengths[0]]),
                        rejected_lengths=torch.tensor([lengths[1]]), **hyper)
    loss.sum().backward()
    return -c.grad.item(), -(r.grad.item() if r.grad is not None else 0.0)


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


def test_robust_by_hand_and_at_the_bounds_of_epsilon():
    expected = (-0.9 * logsig(1.0) + 0.1 * logsig(-1.0)) / 0.8
    assert value("robust", label_smoothing=0.1) == pytest.approx(expected, abs=1e-12)
    assert value("robust", label_smoothing=0.0) == pytest.approx(value("sigmoid"), abs=1e-12)
    near_half = value("robust", label_smoothing=0.499)  # 1/(1-2eps) = 500: large but finite
    assert near_half == pytest.approx((-0.501 * logsig(1.0) + 0.499 * logsig(-1.0)) / 0.002, rel=1e-9)
    # unbiased: averaged over the label being flipped with probability eps, it is the clean DPO loss
    eps = 0.2
    flipped = value("robust", pc=PR, pr=PC, rc=RR, rr=RC, label_smoothing=eps)
    assert (1 - eps) * value("robust", label_smoothing=eps) + eps * flipped == pytest.approx(-logsig(1.0), abs=1e-12)


def test_ipo_uses_length_normalised_margin():
    # r_w = 1/4, r_l = -1/2, h_bar = 0.75, target 1/(2*0.5) = 1 -> (0.75 - 1)^2
    assert value("ipo", lengths=(4, 2)) == pytest.approx(0.0625, abs=1e-12)
    assert value("ipo", lengths=(0, 0)) == pytest.approx((2 - 1) ** 2, abs=1e-12)  # zero length counts as 1


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.25
    h = t(1 / (2 * beta))  # chosen log-ratio per token = 2, lengths 1
    loss = LOSSES["ipo"](h, t(0.0), t(0.0), t(0.0), beta=beta, chosen_lengths=torch.tensor([1]),
                         rejected_lengths=torch.tensor([1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_hinge_by_hand():
    assert value("hinge", beta=0.5) == pytest.approx(0.0)
    assert value("hinge", beta=0.1) == pytest.approx(0.8)
    assert value("hinge", beta=0.1, pc=PR, pr=PC) == pytest.approx(1.2)


def test_exo_pair_by_hand_and_its_minimum():
    eps = 1e-3
    expected = sig(1) * (logsig(1) - math.log(1 - eps)) + sig(-1) * (logsig(-1) - math.log(eps))
    assert value("exo_pair", exo_epsilon=eps) == pytest.approx(expected, abs=1e-12)
    # the reverse KL to the smoothed label is 0, with zero slope, where sigma(beta h) = 1 - eps
    for eps in (1e-6, 0.1, 0.49):
        h = t(math.log((1 - eps) / eps) / 0.5)
        loss = LOSSES["exo_pair"](h, t(0.0), t(0.0), t(0.0), beta=0.5, exo_epsilon=eps)
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-9) and h.grad.item() == pytest.approx(0.0, abs=1e-9)


def test_nca_and_bco_pair_by_hand():
    # beta r_w = 0.5, beta r_l = -0.5
    assert value("nca_pair") == pytest.approx(-logsig(0.5) - 0.5 * logsig(-0.5) - 0.5 * logsig(0.5), abs=1e-12)
    assert value("bco_pair") == pytest.approx(-logsig(0.5) - logsig(0.5), abs=1e-12)
    # NCA keeps pushing the chosen log-ratio up on its own, even when the margin is already large
    assert descent("nca_pair", pc=-6.0, pr=-56.0)[0] > 0


def test_sppo_hard_by_hand():
    # 1/(2 beta) = 2: (1 - 2)^2 + (-1 + 2)^2
    assert value("sppo_hard", beta=0.25) == pytest.approx(2.0, abs=1e-12)
    assert value("sppo_hard", beta=0.5) == pytest.approx(0.0, abs=1e-12)  # both ratios on target +-1


def test_apo_zero_by_hand():
    assert value("apo_zero") == pytest.approx((1 - sig(0.5)) + sig(-0.5), abs=1e-12)


def test_apo_down_lowers_both_and_the_rejected_more():
    assert value("apo_down") == pytest.approx(sig(0.5) + (1 - sig(1.0)), abs=1e-12)
    # at the reference: dL/d pc = beta sig'(0) - beta sig'(0) = 0, dL/d pr = beta sig'(0) = beta / 4
    up_c, up_r = descent("apo_down")
    assert up_c == pytest.approx(0.0, abs=1e-12) and up_r == pytest.approx(-0.5 / 4, abs=1e-12)
    # once the margin opens (|beta r_w| < |beta h|), descent lowers the chosen log-prob too
    up_c, up_r = descent("apo_down", pc=-6.5, pr=-9.0)
    beta_rw, beta_h = -0.25, 1.25
    assert up_c == pytest.approx(-0.5 * (sig(beta_rw) * sig(-beta_rw) - sig(beta_h) * sig(-beta_h)), abs=1e-12)
    assert up_c < 0 and up_r < 0


def test_discopop_by_hand_and_its_slope_at_zero():
    m = sig(1.0 / 0.05)
    assert value("discopop", discopop_tau=0.05) == pytest.approx((1 - m) * -logsig(1.0) + m * math.exp(-1.0),
                                                                 rel=1e-12)
    # at h = 0: dL/dx = (1 - log 2)/(4 tau) - 3/4 with x = beta h: positive for the paper's tau = 0.05
    for tau in (0.05, 0.25):
        up_c, _ = descent("discopop", discopop_tau=tau)
        assert up_c == pytest.approx(-0.5 * ((1 - math.log(2)) / (4 * tau) - 0.75), abs=1e-12)
    assert descent("discopop", discopop_tau=0.05)[0] < 0 < descent("discopop", discopop_tau=0.25)[0]


def test_dpop_penalizes_chosen_below_reference():
    assert value("dpop", dpop_lambda=50.0) == pytest.approx(value("sigmoid"), abs=1e-12)  # pc > rc: no penalty
    # pc = -12 < rc = -11: penalty 1; h = (-1) - (-3) = 2 -> -log sigma(0.5 * (2 - 50))
    assert value("dpop", pc=-12.0, pr=-14.0, dpop_lambda=50.0) == pytest.approx(-logsig(-24.0), abs=1e-9)
    up_c, _ = descent("dpop", pc=-12.0, pr=-14.0, dpop_lambda=50.0)
    assert up_c == pytest.approx(0.5 * 51 * sig(24.0), abs=1e-9)  # beta (1 + lambda) sigma(-logits)


def test_sigmoid_norm_by_hand():
    # h_bar = 1/4 + 1/2 = 0.75
    assert value("sigmoid_norm", lengths=(4, 2)) == pytest.approx(-logsig(0.375), abs=1e-12)
    assert value("sigmoid_norm", lengths=(0, 0)) == pytest.approx(value("sigmoid"), abs=1e-12)


PAIRWISE = [n for n in sorted(LOSSES) if not getattr(LOSSES[n], "unpaired", False) and n != "dpo"]


@pytest.mark.parametrize("name", [n for n in PAIRWISE if n not in ("apo_down", "discopop", "sft")])
def test_descent_raises_chosen_and_lowers_rejected(name):
    up_c, up_r = descent(name, lengths=(3, 5))
    assert up_c > 0 > up_r


@pytest.mark.parametrize("name", PAIRWISE)
@pytest.mark.parametrize("margin", [-4.0, 4.0])
def test_large_beta_stays_finite(name, margin):
    c, r = t(-20.0 + margin), t(-20.0)
    refs = (None, None) if LOSSES[name].reference_free else (t(-20.0), t(-20.0))
    loss = LOSSES[name](c, r, *refs, beta=1e4, chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([4]),
                        label_smoothing=0.1, exo_epsilon=1e-3)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and math.isfinite(c.grad.item())
    assert r.grad is None or math.isfinite(r.grad.item())


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
        assert get_loss("sigmoid, test_user_margin").names == ("sigmoid", "test_user_margin")
        with pytest.raises(ValueError):
            register_loss("sigmoid")(lambda *a, **k: None)
        with pytest.raises(ValueError, match="','"):
            register_loss("a,b")
        with pytest.raises(KeyError, match="registered"):
            get_loss("nope")
    finally:
        LOSSES.pop("test_user_margin")


def test_every_loss_documents_formula_paper_and_use():
    for name in set(LOSSES) - {"dpo"}:
        doc = LOSSES[name].__doc__ or ""
        assert "Use it when" in doc, name
        assert any(ch.isdigit() for ch in doc) and ("Paper" in doc or "et al." in doc), name
