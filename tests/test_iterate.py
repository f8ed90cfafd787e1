"""dpolab iterate: rounds of sample → judge → pair → DPO → evaluate, end to end on a tiny model."""

import json
import math

import pytest
import torch

from conftest import cached_reference_table, independent_logps, make_word_tokenizer
from dpolab.cli import main
from dpolab.errors import ConfigError
from dpolab.iterate import iterate, round_prompts
from dpolab.iterate_cli import IterateConfig
from dpolab.judges import Judge

KEYS = {"round", "judge_reward", "judge_reward_stderr", "win_rate_vs_initial", "win_rate_stderr", "kl", "kl_stderr",
        "pairs", "seconds"}
WORDS = ["red", "blue", "green", "cat", "dog", "sun"]


def word_judge(prompts, completions):
    """Reward: how many of the completion's words are in WORDS (a judge the tiny model's samples separate)."""
    return [float(sum(w in WORDS for w in c.split())) for c in completions]


@pytest.fixture()
def prompt_files(tmp_path):
    train = tmp_path / "prompts.txt"
    train.write_text("".join(f"say: {a} {b}\n" for a in WORDS for b in WORDS[:2]))
    held = tmp_path / "held.txt"
    held.write_text("".join(f"copy: {a}\n" for a in WORDS))
    return train, held


def small(tmp_path, model_dir, prompt_files, **overrides) -> IterateConfig:
    train, held = prompt_files
    values = dict(model=str(model_dir), prompts=str(train), eval_prompts=str(held), judge="test_iterate:word_judge",
                  rounds=2, samples_per_prompt=3, max_new_tokens=4, output_dir=str(tmp_path / "iter"),
                  batch_size=4, learning_rate=1e-2, beta=0.5, precision="fp32", device="cpu", progress=False)
    return IterateConfig(**{**values, **overrides})


def read_rows(config):
    path = config.output_dir + "/rounds.jsonl"
    return [json.loads(line) for line in open(path)]


def independent_reference(model_dir, pairs_path, config_dir):
    """log π(y|x) of chosen and rejected of every pair of round-2's data under the model in ``model_dir``,
    on the tokens the trainer used (conftest.independent_logps: a plain forward per sequence)."""
    from dpolab.config import TrainConfig

    return independent_logps(model_dir, TrainConfig(model=str(config_dir), data=str(pairs_path), output_dir="-",
                                                    max_length=1024))


@pytest.mark.parametrize("reference_policy", ["previous", "initial"])
def test_two_rounds_end_to_end(tmp_path, tiny_model_dir, prompt_files, reference_policy):
    config = small(tmp_path, tiny_model_dir, prompt_files, reference_policy=reference_policy)
    rows = iterate(config)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows == read_rows(config)
    for row in rows:
        assert KEYS <= set(row) and all(math.isfinite(row[k]) for k in KEYS - {"round"})
    assert rows[0]["kl"] == 0.0 and rows[0]["kl_stderr"] == 0.0 and rows[0]["pairs"] == 0
    assert rows[1]["pairs"] > 0 and rows[2]["pairs"] > 0
    out = tmp_path / "iter"
    for k in (1, 2):
        lines = (out / f"round-{k}" / "pairs.jsonl").read_text().splitlines()
        assert len(lines) == rows[k]["pairs"]
        pair = json.loads(lines[0])
        assert pair["chosen_score"] > pair["rejected_score"]  # best over worst, by the judge
        assert (out / f"round-{k}" / "final" / "config.json").is_file()
    # round 2 trains from round 1's policy; its reference is round 1's policy or the initial model
    config2 = (out / "round-2" / "config.yaml").read_text()
    assert f"model: {out / 'round-1' / 'final'}" in config2
    right = out / "round-1" / "final" if reference_policy == "previous" else tiny_model_dir
    wrong = tiny_model_dir if reference_policy == "previous" else out / "round-1" / "final"
    expected = independent_reference(right, out / "round-2" / "pairs.jsonl", tiny_model_dir)
    assert torch.allclose(cached_reference_table(out / "round-2"), expected, atol=1e-4)
    assert (independent_reference(wrong, out / "round-2" / "pairs.jsonl", tiny_model_dir) - expected).abs().max() > 1e-3


def sequence_logp(model, prompt_ids, completion_ids):
    logp = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + completion_ids])).logits[0].double(), -1)
    return float(sum(logp[len(prompt_ids) + t - 1, tok] for t, tok in enumerate(completion_ids)))


def test_kl_and_reward_are_measured_against_the_initial_policy(tmp_path, tiny_model_dir, prompt_files):
    """Round 2's row recomputed by hand: π_2's samples on the held-out prompts (the sampler's seed), then
    mean log π_2 − log π_0 by plain forwards; against π_1 (the round's reference) the number differs."""
    from transformers import AutoModelForCausalLM

    from dpolab.generate import generate, read_prompts

    config = small(tmp_path, tiny_model_dir, prompt_files)
    rows = iterate(config)
    out = tmp_path / "iter"
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    policy, initial, previous = load(out / "round-2" / "final"), load(tiny_model_dir), load(out / "round-1" / "final")
    samples = generate(policy, make_word_tokenizer(), read_prompts(config.eval_prompts), max_new_tokens=4,
                       seed=config.seed + 2, batch_size=64)
    with torch.no_grad():
        mine = [sequence_logp(policy, s.prompt_ids, s.completion_ids) for s in samples]
        kl_initial = sum(a - sequence_logp(initial, s.prompt_ids, s.completion_ids) for a, s in zip(mine, samples))
        kl_previous = sum(a - sequence_logp(previous, s.prompt_ids, s.completion_ids) for a, s in zip(mine, samples))
    assert rows[2]["kl"] == pytest.approx(kl_initial / len(samples), abs=1e-4)
    assert abs(kl_previous - kl_initial) / len(samples) > 1e-3
    lines = [json.loads(x) for x in (out / "round-2" / "eval_samples.jsonl").read_text().splitlines()]
    assert [line["completion"] for line in lines] == [s.completion for s in samples]
    assert rows[2]["judge_reward"] == pytest.approx(sum(word_judge([], [s.completion for s in samples])) / 6)


def test_rerun_skips_finished_rounds_and_continues(tmp_path, tiny_model_dir, prompt_files, capsys):
    first = iterate(small(tmp_path, tiny_model_dir, prompt_files, rounds=1))
    more = iterate(small(tmp_path, tiny_model_dir, prompt_files, rounds=2))
    assert "round 1: finished earlier" in capsys.readouterr().out
    assert more[:2] == first and [r["round"] for r in more] == [0, 1, 2]
    with pytest.raises(ConfigError, match="output_dir.*other options.*train"):
        iterate(small(tmp_path, tiny_model_dir, prompt_files, rounds=2, beta=0.3))


def test_cli_runs_one_round(tmp_path, tiny_model_dir, prompt_files):
    train, held = prompt_files
    code = main(["iterate", "--model", str(tiny_model_dir), "--prompts", str(train), "--eval-prompts", str(held),
                 "--judge", "test_iterate:word_judge", "--rounds", "1", "--samples-per-prompt", "2",
                 "--max-new-tokens", "3", "--batch-size", "4", "--device", "cpu", "--no-progress",
                 "--output-dir", str(tmp_path / "cli")])
    assert code == 0
    assert [json.loads(x)["round"] for x in (tmp_path / "cli" / "rounds.jsonl").read_text().splitlines()] == [0, 1]


def test_round_prompts_are_distinct_slices():
    prompts = [f"p{i}" for i in range(5)]
    assert round_prompts(prompts, None, 3) == prompts
    assert round_prompts(prompts, 2, 1) == ["p0", "p1"] and round_prompts(prompts, 2, 2) == ["p2", "p3"]
    assert round_prompts(prompts, 2, 3) == ["p4", "p0"]  # wraps around when the prompts run out


@pytest.mark.parametrize("overrides, field", [
    ({"rounds": 0}, "rounds"),
    ({"samples_per_prompt": 1}, "samples_per_prompt"),
    ({"eval_prompts": None}, "eval_prompts"),
    ({"eval_fraction": 0.2}, "eval_fraction"),  # with --eval-prompts
    ({"judge": None}, "judge"),
    ({"model": ""}, "model"),
    ({"reference_policy": "latest"}, "reference_policy"),
    ({"constitution": "rules.txt"}, "constitution"),
    ({"eval_prompt_count": 5}, "eval_prompt_count"),
])
def test_bad_options(tmp_path, tiny_model_dir, prompt_files, overrides, field):
    with pytest.raises(ConfigError) as e:
        small(tmp_path, tiny_model_dir, prompt_files, **overrides)
    assert e.value.field == field


def test_bad_options_found_before_any_work(tmp_path, tiny_model_dir, prompt_files):
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("data: other.jsonl\n")
    with pytest.raises(ConfigError, match="train_config.*'data'.*set by dpolab iterate"):
        iterate(small(tmp_path, tiny_model_dir, prompt_files, train_config=str(yaml_file)))
    yaml_file.write_text("lora_r: 4\n")
    with pytest.raises(ConfigError, match="train_config.*LoRA"):
        iterate(small(tmp_path, tiny_model_dir, prompt_files, train_config=str(yaml_file)))
    yaml_file.write_text("warmup_ratio: 2\n")
    with pytest.raises(ConfigError, match="warmup_ratio"):
        iterate(small(tmp_path, tiny_model_dir, prompt_files, train_config=str(yaml_file)))
    with pytest.raises(ConfigError, match="prompts_per_round"):
        iterate(small(tmp_path, tiny_model_dir, prompt_files, prompts_per_round=99))
    assert not (tmp_path / "iter" / "rounds.jsonl").exists()


def test_a_judge_that_ties_everything_stops_the_round(tmp_path, tiny_model_dir, prompt_files):
    with pytest.raises(ConfigError, match="judge.*same score"):
        iterate(small(tmp_path, tiny_model_dir, prompt_files, rounds=1), judge=lambda p, c: [0.0] * len(c))


def test_cli_mistakes_are_one_line(capsys):
    assert main(["iterate", "--rounds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'model': is required" in err
    assert main(["iterate", "--demo", "--prompts", "p.txt"]) == 2
    assert "--demo makes its own prompts" in capsys.readouterr().err


class LongerIsBetter(Judge):
    """A pairwise-only judge: P(first better) = 1 when it has more words, 0 when fewer, ½ on a tie."""

    name, pointwise = "longer", False

    def compare(self, prompts, first, second):
        return [0.5 if len(a.split()) == len(b.split()) else float(len(a.split()) > len(b.split()))
                for a, b in zip(first, second)]


def test_pairwise_judge_and_prompts_per_round(tmp_path, tiny_model_dir, prompt_files):
    config = small(tmp_path, tiny_model_dir, prompt_files, prompts_per_round=4, max_new_tokens=6)
    rows = iterate(config, judge=LongerIsBetter())
    assert all(math.isnan(r["judge_reward"]) for r in rows)  # a pairwise judge gives no reward ...
    assert [r["judge_reward"] for r in read_rows(config)] == [None] * 3  # ... written as null
    assert all(0 <= r["win_rate_vs_initial"] <= 1 for r in rows)
    prompts = open(config.prompts).read().splitlines()
    for k, expected in ((1, prompts[:4]), (2, prompts[4:8])):  # distinct prompts per round, in order
        pairs = [json.loads(x) for x in (tmp_path / "iter" / f"round-{k}" / "pairs.jsonl").read_text().splitlines()]
        assert pairs and {p["prompt"] for p in pairs} <= set(expected)
        assert all(len(p["chosen"].split()) > len(p["rejected"].split()) for p in pairs)
    samples = [json.loads(x) for x in (tmp_path / "iter" / "round-1" / "eval_samples.jsonl").read_text().splitlines()]
    assert rows[1]["win_rate_vs_initial"] == pytest.approx(sum(s["score"] for s in samples) / len(samples))
