"""Options across losses, by hand: mixes, f-divergences, WPO weights, LD-DPO token weights, and their config."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_llama
from dpolab.cli import build_parser, config_from_args
from dpolab.config import TrainConfig
from dpolab.data.batching import collate_pairs
from dpolab.data.tokenize import TokenizedPair
from dpolab.errors import ConfigError
from dpolab.losses import LOSSES, LossMix, f_divergence_ratio, get_loss, preference_objective, wpo_weights
from dpolab.reference import pair_logps
from dpolab.runtime import Runtime
from dpolab.steps import MetricSums

BASE = dict(model="m", data="d.jsonl", output_dir="out")


def t(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def logsig(x):
    return -math.log1p(math.exp(-x))


def lengths(*values):
    return torch.tensor(values)


# ---------------------------------------------------------------------------------------------
# Mixes


def test_mix_is_the_weighted_sum_by_hand():
    mix = get_loss("sigmoid,sft")
    assert isinstance(mix, LossMix) and not mix.reference_free
    # sigmoid: beta h = 0.5 * 2 = 1; sft: -(-10)/5 = 2
    loss = mix(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, chosen_lengths=lengths(5),
               rejected_lengths=lengths(5), loss_weights=(0.8, 0.2), label_smoothing=0.0)
    assert loss.item() == pytest.approx(0.8 * -logsig(1.0) + 0.2 * 2.0, abs=1e-12)
    unweighted = mix(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, chosen_lengths=lengths(5),
                     rejected_lengths=lengths(5))
    assert unweighted.item() == pytest.approx(-logsig(1.0) + 2.0, abs=1e-12)


def test_mix_reference_free_only_when_every_part_is():
    assert get_loss("simpo,sft").reference_free
    assert not get_loss("sft,ipo").reference_free
    with pytest.raises(ValueError, match="cannot be mixed"):
        get_loss("kto,sigmoid")


def test_loss_flags_from_the_command_line():
    ns = build_parser().parse_args(["train", "--model", "m", "--data", "d.jsonl", "--output-dir", "o", "--loss",
                                    "sigmoid,sft", "--loss-weights", "1,0.3", "--wpo", "--ld-alpha", "0.5",
                                    "--f-divergence", "js"])
    cfg = config_from_args(ns)
    hyper = cfg.loss_hyperparameters()
    assert hyper["loss_weights"] == (1.0, 0.3) and hyper["wpo"] and hyper["ld_alpha"] == 0.5
    assert hyper["f_divergence"] == "js"
    assert TrainConfig(**BASE, loss=["ipo", "sft"], loss_weights=[2, 1]).loss_weight_values == (2.0, 1.0)  # YAML lists


@pytest.mark.parametrize("overrides, field, message", [
    (dict(loss="sigmoid,sftt"), "loss", "did you mean 'sft'"),
    (dict(loss="sigmoid,sft", loss_weights="1"), "loss_weights", "1 weights for 2 losses"),
    (dict(loss="sigmoid,sft", loss_weights="1,x"), "loss_weights", "comma-separated numbers"),
    (dict(loss="sigmoid,sft", loss_weights="0,0"), "loss_weights", "not all 0"),
    (dict(loss_weights="1"), "loss_weights", "two or more"),
    (dict(loss="kto,sft"), "loss", "cannot be mixed"),
    (dict(exo_epsilon=0), "exo_epsilon", "(0, 0.5)"),
    (dict(discopop_tau=0), "discopop_tau", "(0, 1]"),
    (dict(dpop_lambda=-1), "dpop_lambda", ">= 0"),
    (dict(f_alpha=1), "f_alpha", "[0, 1)"),
    (dict(ld_alpha=1.5), "ld_alpha", "[0, 1]"),
    (dict(desirable_weight=0), "desirable_weight", "> 0"),
    (dict(ref_sync_alpha=0), "ref_sync_alpha", "(0, 1]"),
    (dict(ref_sync_steps=0, reference="model"), "ref_sync_steps", ">= 1"),
    (dict(ref_sync_steps=4), "ref_sync_steps", "--reference model"),
    (dict(ref_sync_steps=4, reference="model", loss="simpo"), "ref_sync_steps", "reference-free"),
    (dict(ref_sync_steps=4, reference="model", resume="latest"), "resume", "TR-DPO reference"),
    (dict(f_divergence="js", loss="orpo"), "f_divergence", "reference-free"),
    (dict(wpo=True, loss="kto"), "wpo", "unpaired"),
    (dict(ld_alpha=0.5, loss="kto"), "ld_alpha", "unpaired"),
    (dict(f_divergence="forward"), "f_divergence", "did you mean 'forward_kl'"),
])
def test_invalid_options_name_the_field(overrides, field, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{**BASE, **overrides})
    assert err.value.field == field and message in str(err.value)


def test_every_hyperparameter_reaches_the_losses():
    cfg = TrainConfig(**BASE)
    hyper = cfg.loss_hyperparameters()
    for name in ("label_smoothing", "exo_epsilon", "discopop_tau", "dpop_lambda", "simpo_gamma", "loss_weights",
                 "f_divergence", "f_alpha", "wpo", "ld_alpha", "desirable_weight", "undesirable_weight",
                 "ref_sync_steps", "ref_sync_alpha"):
        assert name in hyper and hyper[name] == getattr(cfg, name if name != "loss_weights" else "loss_weight_values")


# ---------------------------------------------------------------------------------------------
# f-divergences and WPO


@pytest.mark.parametrize("u", [-1.0, 0.0, 2.0])
def test_f_divergence_transforms_by_hand(u):
    x = torch.tensor([u], dtype=torch.float64)
    assert f_divergence_ratio(x, "reverse_kl").item() == pytest.approx(u)
    assert f_divergence_ratio(x, "forward_kl").item() == pytest.approx(1 - math.exp(-u))
    assert f_divergence_ratio(x, "js").item() == pytest.approx(math.log(2) + logsig(u))
    assert f_divergence_ratio(x, "alpha", 0.5).item() == pytest.approx((math.exp(-0.5 * u) - 1) / -0.5)
    assert f_divergence_ratio(x, "alpha", 0.0).item() == pytest.approx(1 - math.exp(-u))  # alpha = 0: forward KL


def pair_batch(chosen_len=4, rejected_len=4):
    return SimpleNamespace(chosen_lengths=lengths(chosen_len), rejected_lengths=lengths(rejected_len))


def test_f_divergence_in_the_objective_by_hand():
    # r_w = 1, r_l = -1; forward KL: f(1) = 1 - e^-1, f(-1) = 1 - e
    policy, ref = (t(-10.0), t(-12.0)), (t(-11.0), t(-11.0))
    losses, metrics = preference_objective(LOSSES["sigmoid"], policy, ref, pair_batch(), beta=0.5,
                                           f_divergence="forward_kl", f_alpha=0.5, label_smoothing=0.0)
    margin = (1 - math.exp(-1)) - (1 - math.e)
    assert losses.item() == pytest.approx(-logsig(0.5 * margin), abs=1e-12)
    assert metrics["rewards/margins"].item() == pytest.approx(1.0)  # metrics keep the plain log-ratios
    same, _ = preference_objective(LOSSES["sigmoid"], (t(-3.0), t(-5.0)), (t(-3.0), t(-5.0)), pair_batch(),
                                   beta=0.5, f_divergence="js")
    assert same.item() == pytest.approx(math.log(2))  # every transform is 0 at u = 0


def test_wpo_weights_by_hand_and_detached():
    pc, pr = t(-6.0), t(-8.0)  # per-token -2 (3 tokens) and -2 (4 tokens): weight e^-4
    assert wpo_weights(pc, pr, lengths(3), lengths(4)).item() == pytest.approx(math.exp(-4.0))
    losses, metrics = preference_objective(LOSSES["sigmoid"], (pc, pr), (t(-7.0), t(-7.0)), pair_batch(3, 4),
                                           beta=0.5, wpo=True)
    assert losses.item() == pytest.approx(math.exp(-4.0) * -logsig(1.0), abs=1e-12)  # beta h = 0.5 * 2
    assert metrics["wpo/weights"].item() == pytest.approx(math.exp(-4.0))
    losses.backward()  # the weight is a constant: gradient = e^-4 * d(-log sigma(beta h))/d pc
    assert pc.grad.item() == pytest.approx(math.exp(-4.0) * -0.5 / (1 + math.e), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# LD-DPO


def naive_weighted(model, prompt, completion, shared, alpha):
    """Full logits, one unpadded sequence: sum of log p over the first ``shared`` completion tokens plus
    alpha times the rest."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = 0.0
    for k, pos in enumerate(range(len(prompt), len(prompt) + len(completion))):
        total += (1.0 if k < shared else alpha) * float(logp[pos - 1, ids[0, pos]])
    return total


def test_ld_dpo_token_weights_by_hand():
    pair = TokenizedPair([1, 5], [6, 7, 2], [8, 9, 10, 11, 2], 0)  # completions of 3 and 5 tokens: shared 3
    batch = collate_pairs([pair], pad_token_id=0, ld_alpha=0.3)
    assert torch.allclose(batch.loss_mask, torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0.3, 0.3]]))
    assert collate_pairs([pair], pad_token_id=0).loss_mask.tolist() == [[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert batch.chosen_lengths.tolist() == [3] and batch.rejected_lengths.tolist() == [5]  # counts unchanged


def test_ld_dpo_logps_split_at_the_shorter_completion():
    model = make_tiny_llama()
    pairs = [TokenizedPair([1, 5], [6, 7, 2], [8, 9, 10, 11, 2], 0),
             TokenizedPair([1, 5, 9, 9], [12, 13, 14, 15, 16, 2], [17, 2], 1)]
    with torch.no_grad():
        chosen, rejected = pair_logps(model, collate_pairs(pairs, pad_token_id=0, ld_alpha=0.3))
    for i, p in enumerate(pairs):
        shared = min(len(p.chosen_ids), len(p.rejected_ids))
        assert chosen[i].item() == pytest.approx(naive_weighted(model, p.prompt_ids, p.chosen_ids, shared, 0.3),
                                                 abs=1e-4)
        assert rejected[i].item() == pytest.approx(
            naive_weighted(model, p.prompt_ids, p.rejected_ids, shared, 0.3), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Metrics that cover only some items (KTO's per-class rewards)


def test_metric_means_count_each_key_over_its_own_items():
    sums = MetricSums()
    sums.add({"loss": torch.tensor([1.0, 2.0, 3.0]), "rewards/chosen": torch.tensor([4.0])})
    sums.add({"loss": torch.tensor([5.0]), "rewards/chosen": torch.tensor([6.0]), "rewards/rejected": torch.zeros(0)})
    means = sums.means(Runtime(torch.device("cpu"), "fp32"))
    assert means["loss"] == pytest.approx(11 / 4) and means["rewards/chosen"] == pytest.approx(5.0)
    assert "rewards/rejected" not in means and sums.pairs == 4  # no values: no mean
