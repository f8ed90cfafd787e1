"""Judges on hand-made cases: a callable that prefers longer text, and the AI judge's label log-probs,
both orders and position bias checked against independent computations on tiny models."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpolab.ai_judge import AIJudge, Votes
from dpolab.constitution import Constitution
from dpolab.errors import ConfigError
from dpolab.judges import CallableJudge, Judge, load_judge, rank_groups
from dpolab.label import pair_rows
from dpolab.toy import WORDS, make_tiny_llama, make_word_tokenizer

REPO = Path(__file__).resolve().parents[1]


def longer(prompts, completions):
    return [float(len(c)) for c in completions]


# ------------------------------------------------------------------------------------------------
# Callable judges, rank_groups, pair_rows
# ------------------------------------------------------------------------------------------------

def test_callable_judge_prefers_longer_text_and_pairs_follow():
    judge = CallableJudge(longer)
    groups = [["ab", "abcd", "a"], ["xy", "zw"]]  # second prompt: a tie of lengths
    scores = rank_groups(judge, ["p", "q"], groups)
    assert scores == [[2.0, 4.0, 1.0], [2.0, 2.0]]
    assert judge.compare(["p", "p", "p"], ["abc", "a", "ab"], ["a", "abc", "xy"]) == [1.0, 0.0, 0.5]
    best_worst = pair_rows(["p", "q"], groups, scores, "best-worst")
    assert best_worst == [{"prompt": "p", "chosen": "abcd", "rejected": "a", "chosen_score": 4.0,
                           "rejected_score": 1.0}]  # the tie of "q" makes no pair
    every = pair_rows(["p", "q"], groups, scores, "all")
    assert [(r["chosen"], r["rejected"]) for r in every] == [("abcd", "ab"), ("abcd", "a"), ("ab", "a")]


class LongerPairwise(Judge):
    """A pairwise-only judge: the longer text wins with probability 0.9."""

    pointwise = False

    def compare(self, prompts, first, second):
        return [0.9 if len(a) > len(b) else 0.1 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]


def test_rank_groups_with_a_pairwise_judge_averages_win_probabilities():
    scores = rank_groups(LongerPairwise(), ["p"], [["aaa", "a", "aa"]])
    # "aaa" beats both (0.9, 0.9); "a" loses both (0.1, 0.1); "aa": 0.1 vs aaa, 0.9 vs a
    assert scores == [[pytest.approx(0.9), pytest.approx(0.1), pytest.approx(0.5)]]
    rows = pair_rows(["p"], [["aaa", "a", "aa"]], scores)
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("aaa", "a")
    with pytest.raises(NotImplementedError):
        LongerPairwise().score(["p"], ["a"])


def test_load_judge_dispatches_callables_and_rejects_bad_specs():
    judge = load_judge("dpolab.demo.grammar:review_reward")
    assert isinstance(judge, CallableJudge) and judge.pointwise
    assert judge.score(["p", "p"], [" it was wonderful .", " it was awful ."])[0] > 0.5
    with pytest.raises(ConfigError, match="module:function"):
        load_judge("no_colon_here")
    with pytest.raises(ConfigError, match="constitution"):
        load_judge("ai:/nonexistent-model", constitution="/nonexistent.yaml")


# ------------------------------------------------------------------------------------------------
# The AI judge against independent computations
# ------------------------------------------------------------------------------------------------

JUDGE_WORDS = list(WORDS) + ["A", "B", "Which", "Answer:", "Response"]


@pytest.fixture(scope="module")
def word_judge_parts():
    tok = make_word_tokenizer(JUDGE_WORDS)
    return make_tiny_llama(vocab_size=len(tok), seed=3), tok


def label_logp(model, tok, question: str, continuation: str) -> float:
    """Independent: one plain forward over question + continuation, sum of the continuation's log-probs."""
    q = tok(question)["input_ids"]
    full = tok(question + continuation)["input_ids"]
    assert full[:len(q)] == q and len(full) > len(q)
    with torch.no_grad():
        logps = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
    return float(sum(logps[t - 1, full[t]] for t in range(len(q), len(full))))


def p_first_label(model, tok, rules: Constitution, question: str) -> float:
    a, b = (label_logp(model, tok, question, rules.answer_prefix + x) for x in rules.labels)
    return 1.0 / (1.0 + math.exp(b - a))


PRINCIPLES = ["Which is red?", "Which is a fish?"]


def test_ai_judge_probabilities_match_a_plain_forward_and_both_orders(word_judge_parts):
    model, tok = word_judge_parts
    rules = Constitution(principles=tuple(PRINCIPLES), template="{prompt} A {first} B {second} {principle} Answer:")
    judge = AIJudge(model, tok, rules, batch_size=3)
    prompts, first, second = ["cat dog", "sun"], ["red red fish", "moon"], ["blue", "tree star rock bird"]
    votes = judge.votes(prompts, first, second)
    for i in range(2):
        for k, principle in enumerate(PRINCIPLES):
            p_ab = p_first_label(model, tok, rules, rules.question(principle, prompts[i], first[i], second[i]))
            p_ba = p_first_label(model, tok, rules, rules.question(principle, prompts[i], second[i], first[i]))
            assert votes.first_order[i][k] == pytest.approx(p_ab, abs=1e-5)
            assert votes.second_order[i][k] == pytest.approx(1.0 - p_ba, abs=1e-5)
            assert votes.per_principle[i][k] == pytest.approx(0.5 * (p_ab + 1.0 - p_ba), abs=1e-5)
    forward = judge.compare(prompts, first, second)
    backward = judge.compare(prompts, second, first)
    assert forward == pytest.approx([sum(v) / 2 for v in votes.per_principle], abs=1e-12)
    assert [a + b for a, b in zip(forward, backward)] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert all(abs(p - 0.5) > 1e-4 for p in forward)  # a random model is not exactly indifferent


@pytest.mark.parametrize("labels", [("red cat", "red dog"), ("red cat fish", "blue"), ("blue", "red cat")])
def test_multi_token_labels_are_scored_in_full(word_judge_parts, labels):
    model, tok = word_judge_parts
    rules = Constitution(principles=("Which is red?",), template="{first} B {second} {principle} Answer:",
                         labels=labels)
    judge = AIJudge(model, tok, rules, batch_size=2)
    questions = [rules.question("Which is red?", "", "sun moon", "cat"), rules.question("Which is red?", "", "a", "b")]
    got = judge.first_label_probabilities(questions)
    assert got == pytest.approx([p_first_label(model, tok, rules, q) for q in questions], abs=1e-5)


def test_stories_tokenizer_labels_of_different_token_counts(stories_dir):
    """stories260K's tokenizer makes " A" two tokens and " B" one; both continuations count in full."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    rules = Constitution(principles=("Which story is happier?",), template="{first} {second} {principle} Answer:")
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert count(" A") != count(" B")
    judge = AIJudge(model, tok, rules)
    q = rules.question("Which story is happier?", "", "Lily was happy.", "Tom was sad.")
    assert judge.first_label_probabilities([q]) == pytest.approx([p_first_label(model, tok, rules, q)], abs=1e-5)


class AlwaysA(torch.nn.Module):
    """A 'model' whose next-token logits never depend on the text: token A at 3, token B at 1, others 0."""

    def __init__(self, vocab: int, a: int, b: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        self.bias.data[a], self.bias.data[b] = 3.0, 1.0
        self.config = SimpleNamespace(max_position_embeddings=512)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_position_bias_cancels_in_both_orders():
    tok = make_word_tokenizer(JUDGE_WORDS)
    model = AlwaysA(len(tok), tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B"))
    judge = AIJudge(model, tok, Constitution(principles=("Which is red?",), template="{first} {second} {principle}"))
    votes = judge.votes(["", ""], ["red", "cat dog"], ["blue", "sun"])
    sigma2 = 1.0 / (1.0 + math.exp(-2.0))
    flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
    assert flat(votes.first_order) == pytest.approx([sigma2, sigma2], abs=1e-6)  # one order: "first" wins 88%
    assert flat(votes.second_order) == pytest.approx([1 - sigma2, 1 - sigma2], abs=1e-6)
    assert judge.compare(["", ""], ["red", "cat dog"], ["blue", "sun"]) == pytest.approx([0.5, 0.5], abs=1e-12)


def test_votes_aggregate_mean_and_majority():
    votes = Votes([[0.9, 0.2, 0.5]], [[0.7, 0.4, 0.5]])  # per principle: 0.8, 0.3, 0.5
    assert votes.per_principle[0] == pytest.approx([0.8, 0.3, 0.5])
    assert votes.aggregate("mean") == [pytest.approx(1.6 / 3)]
    assert votes.aggregate("majority") == [pytest.approx(1.5 / 3)]


def test_long_responses_are_cut_to_the_context_and_said_once(word_judge_parts, capsys):
    model, tok = word_judge_parts
    rules = Constitution(principles=("Which is red?", "Which is a fish?"), template="{prompt} {first} B {second} "
                         "{principle} Answer:")
    judge = AIJudge(model, tok, rules, context=40)
    long_a, long_b = " ".join(["red"] * 60), " ".join(["fish"] * 9)
    probs = judge.compare(["cat", "dog"], [long_a, "sun"], [long_b, long_a])
    assert len(probs) == 2 and all(0 < p < 1 for p in probs)
    assert capsys.readouterr().err.count("cut to fit") == 1
    q = judge._fit("Which is red?", "cat", long_a, long_b)
    # room = 40 − 1 (label) − 2 (slack) = 37; 7 tokens without responses; the 9-token response is kept
    # whole and the 60-token one keeps the other 21
    assert len(tok(q)["input_ids"]) == 37 and q.count("fish") == 9 and q.count("red ") == 21
    tight = AIJudge(model, tok, rules, context=8)
    with pytest.raises(ConfigError, match="context of 8 tokens"):
        tight.compare(["cat"], [long_a], [long_b])


# ------------------------------------------------------------------------------------------------
# Constitution files
# ------------------------------------------------------------------------------------------------

def test_example_constitution_parses():
    rules = Constitution.read(REPO / "examples" / "constitution.yaml")
    assert len(rules.principles) >= 2 and "{first}" in rules.template
    assert Constitution.read(None) == Constitution.default()


@pytest.mark.parametrize("text, match", [
    ("- just a list", "mapping"),
    ("principles: []", "non-empty list"),
    ("principles: [ok, ok]", "repeats"),
    ("principles: [ok]\nrules: 1", "unknown key"),
    ("principles: [ok]\ntemplate: '{first} {principle}'", "lacks {second}"),
    ("principles: [ok]\ntemplate: '{first} {second} {principle} {answer}'", "unknown field {answer}"),
    ("principles: [ok]\ntemplate: '{first} {second} {principle} {'", "not a valid template"),
    ("principles: [ok]\nlabels: [A, A]", "two different"),
    ("principles: [ok]\naggregate: vote", "mean, majority"),
    ("principles: [ok\n", "not valid YAML"),
])
def test_constitution_errors_name_the_key_and_the_fix(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        Constitution.read(path)


def test_missing_constitution_file():
    with pytest.raises(ConfigError, match="file not found"):
        Constitution.read("/nonexistent/constitution.yaml")
