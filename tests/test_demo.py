"""The demo: the task and its gold rewards by hand, then ``dpolab demo --quick`` end to end (self-trained
π_ref, cached on the second run) and on the real pretrained stories260K model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest

from dpolab import cli
from dpolab.demo.grammar import (is_grammatical, review_corpus, review_prompts, review_reward, story_prompts,
                                 story_reward)
from dpolab.demo.options import DemoConfig
from dpolab.config import field_docs
from dpolab.generate import Sample

SUMMARY_KEYS = {"win_rate", "kl", "kl_stderr", "gold_reward_policy", "gold_reward_reference",
                "eval_reward_accuracy", "beta", "seconds"}
PLOTS = {"frontier.png", "loss.png", "accuracy.png", "margins.png", "logps.png"}


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_review_reward_by_hand():
    texts = [" the acting was wonderful .", " the plot was not good .",
             " the plot was dull but the music was superb . highly recommended .", " nothing to say here"]
    want = [sigmoid(2.0 / 2), sigmoid(-0.5 * 1.0 / 2), sigmoid((-1.0 + 2.2 + 1.5) / 2), 0.5]
    assert review_reward([""] * 4, texts) == pytest.approx(want)


def test_story_reward_by_hand():
    texts = ["She was happy and smiled.", "He cried because he was sad.", "They were not happy at all."]
    want = [sigmoid(3.0 / 2), sigmoid(-3.0 / 2), sigmoid(-0.75 / 2)]
    assert story_reward([""] * 3, texts) == pytest.approx(want)


def test_corpus_is_seeded_grammatical_and_spans_sentiments():
    reviews = review_corpus(400, seed=0)
    assert reviews == review_corpus(400, seed=0) and reviews != review_corpus(400, seed=1)
    assert all(is_grammatical(c) for _, c in reviews)
    rewards = review_reward([p for p, _ in reviews], [c for _, c in reviews])
    assert min(rewards) < 0.15 and max(rewards) > 0.85
    assert not is_grammatical(" the cast was old sailor . skip it .")


@pytest.mark.parametrize("make", [review_prompts, story_prompts])
def test_held_out_prompts_are_distinct_and_unseen(make):
    train = make(60, 0)
    held = make(30, 1, exclude=set(train))
    assert len(set(train)) == 60 and len(set(held)) == 30 and not set(train) & set(held)


def test_too_many_prompts_for_the_grammar_is_a_config_error():
    from dpolab.demo.grammar import distinct_prompts
    from dpolab.errors import ConfigError

    assert sorted(distinct_prompts(lambda rng: rng.choice("abc"), 3, 0)) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="only 1 distinct prompts besides the 2 held-in"):
        distinct_prompts(lambda rng: rng.choice("abc"), 2, 0, exclude={"a", "b"})


def test_pairs_from_higher_and_lower_rewards():
    from dpolab.demo.pipeline import make_pairs

    texts = ["a", "b", "c", "d", "e", "e"]
    samples = [Sample("p", t, [1], [2], True) for t in texts[:4]] + [Sample("q", t, [1], [2], True) for t in texts[4:]]
    rows = make_pairs(samples, [0.9, 0.1, 0.5, 0.5, 0.7, 0.2], per_prompt=4)
    rows += make_pairs(samples[4:], [0.7, 0.2], per_prompt=2)
    got = {(r["chosen"], r["rejected"]) for r in rows}
    assert got == {("a", "b"), ("a", "c"), ("a", "d"), ("c", "b"), ("d", "b")}  # tie c/d and twin texts e/e: none


def test_demo_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = "".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(DemoConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert "".join(field_docs(DemoConfig)[f.name].split()) in text


@pytest.mark.parametrize("argv, needle", [(["--sweep-beta", "0.1,x"], "sweep_beta"), (["--beta", "0"], "beta"),
                                          (["--train-prompts", "0"], "train_prompts")])
def test_demo_bad_options_are_one_line(argv, needle, tmp_path, capsys):
    assert cli.main(["demo", "--output-dir", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "d").exists()


def run_demo(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "dpolab", "demo", "--no-progress", "--threads", "1",
                           *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def check_report(out, summary: dict) -> None:
    assert SUMMARY_KEYS <= set(summary)
    assert 0 <= summary["win_rate"] <= 1 and math.isfinite(summary["kl"]) and summary["kl_stderr"] >= 0
    page = (out / "report.html").read_text()
    referenced = set(re.findall(r'src="([^"]+\.png)"', page))
    assert PLOTS <= referenced and all((out / p).stat().st_size > 1000 for p in referenced)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == summary["eval_prompts"] and {"prompt", "reference", "policy"} <= set(rows[0])


def test_demo_quick_end_to_end_and_cached_reference(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(["--quick", "--output-dir", out], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    check_report(out, summary)
    assert summary["task"] == "reviews" and summary["beta"] == 1.0
    assert [p["name"] for p in summary["policies"]] == ["dpo-beta1", "preferred-ft"]
    for name in ("dpo-beta1", "preferred-ft"):
        assert (out / "policies" / name / "final" / "model.safetensors").is_file()
        assert (out / "policies" / name / "metrics.jsonl").is_file()
    assert "training a" in first.stdout and "win rate vs π_ref" in first.stdout  # the printed table
    cached = list((out / "cache").glob("reference-*/model.safetensors"))
    assert len(cached) == 1

    second = run_demo(["--quick", "--output-dir", out, "--train-prompts", 12, "--eval-prompts", 8,
                       "--no-preferred-ft", "--sweep-beta", "0.5"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the cached reference model" in second.stdout and "training a" not in second.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [p["beta"] for p in summary["policies"]] == [1.0, 0.5] and summary["eval_prompts"] == 8


def test_demo_on_pretrained_stories260k(tmp_path, stories_dir):
    out = tmp_path / "stories"
    proc = run_demo(["--quick", "--model", stories_dir, "--output-dir", out, "--no-preferred-ft"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    check_report(out, summary)
    assert summary["task"] == "stories" and summary["reference_model"] == str(stories_dir)
    assert not (out / "cache").exists()  # nothing trained for π_ref
