"""Evaluation: statistics by hand, log-probs of sampled ids, the KL estimator against exact enumeration,
and ``dpolab eval`` end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpolab import cli
from dpolab.errors import ConfigError
from dpolab.evaluate import (completion_logps, evaluate_by_sampling, kl_by_sampling, load_judge, mean_stderr,
                             reference_of_run, run_config, win_rate)
from dpolab.generate import Sample, encode_prompts, generate
from dpolab.toy import copy_task_rows, make_tiny_llama, make_word_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_word_tokenizer()


def peaky_llama(tok, seed: int, scale: float):
    """A tiny Llama whose next-token distributions are far from uniform (so two of them differ)."""
    m = make_tiny_llama(vocab_size=len(tok), hidden=32, layers=1, seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)
    return m.eval()


@pytest.fixture(scope="module")
def policy(tok):
    return peaky_llama(tok, seed=1, scale=12)


@pytest.fixture(scope="module")
def reference(tok):
    return peaky_llama(tok, seed=2, scale=12)


def test_mean_stderr_by_hand():
    mean, err = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert err == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3) / 2)
    assert math.isnan(mean_stderr([3.0])[1])


def test_win_rate_counts_ties_half():
    rate, err = win_rate([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.5])  # win, tie, loss, tie
    assert rate == pytest.approx(0.5)
    assert err == pytest.approx(math.sqrt((0.25 + 0 + 0.25 + 0) / 3) / 2)
    assert win_rate([1.0], [1.0])[0] == 0.5


def by_hand_logp(model, prompt_ids, completion_ids) -> float:
    """Σ log softmax over the completion with one unpadded forward (no masks, no chunks)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n = len(prompt_ids)
    return sum(float(logp[n - 1 + i, t]) for i, t in enumerate(completion_ids))


def test_completion_logps_and_kl_on_fixed_samples_by_hand(policy, reference, tok):
    samples = [Sample("copy: red", "", [1, 4, 6], [7, 8, 2], True),
               Sample("say:", "", [1, 5], [9], False),
               Sample("", "", [1], [10, 11, 12, 13, 2], True)]
    got = completion_logps(policy, samples, batch_size=2)
    want = [by_hand_logp(policy, s.prompt_ids, s.completion_ids) for s in samples]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    diffs = [w - by_hand_logp(reference, s.prompt_ids, s.completion_ids) for w, s in zip(want, samples)]
    kl = kl_by_sampling(policy, reference, samples, batch_size=2)
    assert kl["kl"] == pytest.approx(sum(diffs) / 3, abs=1e-4)
    assert kl["kl_stderr"] == pytest.approx(mean_stderr(diffs)[1], abs=1e-4)


def exact_kl(policy, reference, prompt_ids: list[int], max_new: int, eos: int) -> float:
    """KL(π‖π_ref) over every completion of at most ``max_new`` tokens (ending at EOS or cut at the
    budget, as the sampler does), by enumerating the tree of prefixes."""
    frontier = [([], 0.0, 0.0)]
    total = 0.0
    for depth in range(max_new):
        ids = torch.tensor([prompt_ids + prefix for prefix, _, _ in frontier])
        with torch.no_grad():
            lp = torch.log_softmax(policy(input_ids=ids).logits[:, -1].double(), -1)
            lq = torch.log_softmax(reference(input_ids=ids).logits[:, -1].double(), -1)
        grown = []
        for i, (prefix, a, b) in enumerate(frontier):
            for t in range(lp.shape[1]):
                pa, pb = a + float(lp[i, t]), b + float(lq[i, t])
                if t == eos or depth == max_new - 1:
                    total += math.exp(pa) * (pa - pb)
                else:
                    grown.append((prefix + [t], pa, pb))
        frontier = grown
    return total


def test_kl_estimator_matches_exact_enumeration(policy, reference, tok):
    prompt = "copy: red blue"
    exact = exact_kl(policy, reference, encode_prompts(tok, [prompt])[0], 3, tok.eos_token_id)
    assert exact > 0.5  # the two models really differ
    samples = generate(policy, tok, [prompt], num_samples=3000, max_new_tokens=3, seed=0, batch_size=1000)
    est = kl_by_sampling(policy, reference, samples, batch_size=1000)
    assert abs(est["kl"] - exact) < 4 * est["kl_stderr"]
    assert est["kl_stderr"] < 0.1 * exact


def test_kl_of_a_model_to_itself_is_zero(policy, tok):
    samples = generate(policy, tok, ["say:", "copy: cat"], num_samples=4, max_new_tokens=4)
    kl = kl_by_sampling(policy, policy, samples)
    assert kl["kl"] == 0.0 and kl["kl_stderr"] == 0.0


def test_evaluate_by_sampling_with_a_judge(policy, reference, tok):
    def judge(prompts, completions):
        return [float(c.count("red")) for c in completions]

    prompts = ["copy: red", "say:", "copy: blue cat", "copy: fish"]
    ev = evaluate_by_sampling(policy, reference, tok, prompts, judge=judge, max_new_tokens=5, seed=3)
    m = ev.metrics
    assert m["num_prompts"] == 4 and len(ev.policy_samples) == len(ev.reference_samples) == 4
    assert ev.policy_rewards == judge(prompts, [s.completion for s in ev.policy_samples])
    assert m["win_rate"] == pytest.approx(win_rate(ev.policy_rewards, ev.reference_rewards)[0])
    assert m["gold_reward_policy"] == pytest.approx(sum(ev.policy_rewards) / 4)
    assert m["kl"] == pytest.approx(kl_by_sampling(policy, reference, ev.policy_samples)["kl"], abs=1e-5)


def test_load_judge():
    assert load_judge("dpolab.demo.grammar:review_reward")([""], [" it was wonderful ."])[0] > 0.7
    for spec, needle in [("nocolon", "module:function"), ("no.such.module:f", "cannot import"),
                         ("dpolab.demo.grammar:nope", "has no 'nope'")]:
        with pytest.raises(ConfigError, match=needle):
            load_judge(spec)


def test_reference_of_run(tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("model: ./sft-model\nbeta: 0.1\n")
    assert reference_of_run(str(tmp_path / "run" / "final")) == "./sft-model"
    assert run_config(str(tmp_path / "run" / "final"))["beta"] == 0.1
    assert reference_of_run(str(tmp_path / "elsewhere")) is None and run_config(str(tmp_path / "elsewhere")) == {}


def test_eval_command_policy_equal_to_reference(tiny_model_dir, tmp_path, capsys):
    """π = π_ref: KL exactly 0, implicit rewards 0 (so loss log 2, accuracy 0), win rate from the judge."""
    data = write_jsonl(tmp_path / "pairs.jsonl", copy_task_rows(6, seed=4))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("copy: red blue\nsay:\ncopy: cat\n")
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--data", str(data),
                     "--prompts", str(prompts), "--judge", "dpolab.demo.grammar:review_reward",
                     "--max-new-tokens", "4", "--output", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    assert m["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and m["eval_rewards/accuracies"] == 0.0
    assert m["kl"] == 0.0 and m["num_prompts"] == 3
    assert 0 <= m["win_rate"] <= 1 and {"gold_reward_policy", "gold_reward_reference", "kl_stderr"} <= set(m)
    assert "win_rate" in capsys.readouterr().out


def test_eval_command_without_reference_compares_log_probs(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", copy_task_rows(6, seed=4))
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["reference"] is None and m["beta"] == 0.1 and 0 <= m["eval_rewards/accuracies"] <= 1


@pytest.mark.parametrize("extra, needle", [([], "nothing to evaluate"),
                                           (["--prompts", "p.txt", "--judge", "x"], "module:function"),
                                           (["--judge", "dpolab.demo.grammar:review_reward", "--data", "d.jsonl"],
                                            "needs prompts")])
def test_eval_command_errors_are_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("say:\n")
    code = cli.main(["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
