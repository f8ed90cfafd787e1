"""Labelling: sample a tiny policy, rank with a judge, pair; ``dpolab label`` end to end (one judge, two
named judges with the objective column, an AI judge), its output read back by ``dpolab.data``."""

from __future__ import annotations

import json
import textwrap

import pytest

from dpolab import cli
from dpolab.data.load import load_pairs
from dpolab.generate import load_for_inference
from dpolab.judges import CallableJudge
from dpolab.label import label_pairs, label_samples
from dpolab.label_cli import parse_judge_specs
from dpolab.errors import ConfigError

PROMPTS = ["copy: red cat", "copy: sun moon tree", "say: fish"]


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    """A module on sys.path with two reward functions: longer text wins, shorter text wins."""
    (tmp_path / "lengths_judge.py").write_text(textwrap.dedent("""
        def longer(prompts, completions):
            return [float(len(c.split())) for c in completions]

        def shorter(prompts, completions):
            return [-float(len(c.split())) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "lengths_judge"


def words(text: str) -> int:
    return len(text.split())


def test_label_pairs_prefers_longer_samples(tiny_model_dir):
    import torch

    tokenizer, policy = load_for_inference(str(tiny_model_dir), torch.device("cpu"))
    judge = CallableJudge(lambda p, c: [float(words(x)) for x in c])
    out = label_pairs(policy, tokenizer, PROMPTS, judge, samples=4, max_new_tokens=8, seed=1, rule="all")
    assert len(out.samples) == 12 and out.scores == [float(words(s.completion)) for s in out.samples]
    expected = 0
    for i, prompt in enumerate(PROMPTS):  # every two samples of different length, longer one chosen
        group = [s.completion for s in out.samples[4 * i:4 * i + 4]]
        expected += sum(1 for a in range(4) for b in range(a + 1, 4)
                        if words(group[a]) != words(group[b]) and group[a] != group[b])
        for row in (r for r in out.rows if r["prompt"] == prompt):
            assert words(row["chosen"]) > words(row["rejected"])
            assert (row["chosen_score"], row["rejected_score"]) == (words(row["chosen"]), words(row["rejected"]))
    assert len(out.rows) == expected > 0
    again = label_samples(PROMPTS, out.samples, judge, samples=4, rule="best-worst")
    assert len(again.rows) <= 3 and all(r["chosen_score"] == max(
        words(s.completion) for s in out.samples if s.prompt == r["prompt"]) for r in again.rows)


def write_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def run_label(tmp_path, model, *extra):
    out = tmp_path / "pairs.jsonl"
    argv = ["label", "--model", model, "--prompts", write_prompts(tmp_path), "--samples", "4",
            "--max-new-tokens", "8", "--no-progress", "--output", out, *extra]
    return cli.main([str(a) for a in argv]), out


def test_label_command_with_one_callable_judge(tmp_path, tiny_model_dir, judge_module, capsys):
    code, out = run_label(tmp_path, tiny_model_dir, "--judge", f"{judge_module}:longer")
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(words(r["chosen"]) > words(r["rejected"]) and "objective" not in r for r in rows)
    assert len(rows) == len({r["prompt"] for r in rows}) <= 3  # best-worst: at most one pair per prompt
    printed = capsys.readouterr().out
    assert "prompts          3" in printed and f"{len(rows)} pairs, {3 - len(rows)} ties dropped" in printed
    loaded = load_pairs(out)
    assert [p.chosen for p in loaded.pairs] == [r["chosen"] for r in rows] and loaded.format == "standard"


def test_label_command_with_two_named_judges(tmp_path, tiny_model_dir, judge_module):
    code, out = run_label(tmp_path, tiny_model_dir, "--pairs", "all", "--judge", f"long={judge_module}:longer",
                          "--judge", f"short={judge_module}:shorter")
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    long = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows if r["objective"] == "long"]
    short = [(r["prompt"], r["rejected"], r["chosen"]) for r in rows if r["objective"] == "short"]
    assert long and sorted(long) == sorted(short)  # the same samples, every pair reversed
    assert len(long) + len(short) == len(rows)
    assert len(load_pairs(out).pairs) == len(rows)


def test_label_command_with_an_ai_judge(tmp_path, tiny_model_dir):
    constitution = tmp_path / "c.yaml"
    constitution.write_text("principles:\n- Which is red?\n- Which is a fish?\n"
                            "template: '{prompt} {first} moon {second} {principle}'\nlabels: [red, blue]\n")
    code, out = run_label(tmp_path, tiny_model_dir, "--judge", f"ai:{tiny_model_dir}", "--constitution", constitution)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # a pairwise judge's score is a sample's mean win probability within its group of 4
    assert rows and all(0 <= r["rejected_score"] < r["chosen_score"] <= 1 for r in rows)


def test_eval_with_a_pairwise_ai_judge_reports_a_win_rate(tmp_path, tiny_model_dir, capsys):
    constitution = tmp_path / "c.yaml"
    constitution.write_text("principles:\n- Which is red?\ntemplate: '{first} moon {second} {principle}'\n"
                            "labels: [red, blue]\n")
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--prompts",
                     str(write_prompts(tmp_path)), "--judge", f"ai:{tiny_model_dir}", "--constitution",
                     str(constitution), "--max-new-tokens", "6", "--no-progress", "--output", str(out)])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert 0 < metrics["win_rate"] < 1 and metrics["win_rate_stderr"] > 0 and "gold_reward_policy" not in metrics


def test_label_mistakes_are_one_line_errors(tmp_path, tiny_model_dir, judge_module, capsys):
    code, _ = run_label(tmp_path, tiny_model_dir, "--judge", f"{judge_module}:longer", "--judge", "x=a:b")
    assert code == 2 and "several judges need a name each" in capsys.readouterr().err
    code, _ = run_label(tmp_path, tiny_model_dir, "--judge", f"{judge_module}:longer", "--samples", "1")
    assert code == 2 and "'samples'" in capsys.readouterr().err
    code, out = run_label(tmp_path, tiny_model_dir, "--judge", "ai:nowhere", "--constitution", tmp_path / "no.yaml")
    assert code == 2 and "constitution" in capsys.readouterr().err and not out.exists()


def test_parse_judge_specs():
    assert parse_judge_specs(["m:f"]) == [(None, "m:f")]
    assert parse_judge_specs(["gold=m:f", "ai=ai:./lm"]) == [("gold", "m:f"), ("ai", "ai:./lm")]
    with pytest.raises(ConfigError, match="repeat"):
        parse_judge_specs(["a=m:f", "a=m:g"])
