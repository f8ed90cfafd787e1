"""Bradley–Terry reward models: the loss by hand, the reward read at the last completion token, training
through `dpolab reward train`, scoring files, the reward model as a judge, and the margin column."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

import dpolab.trainer
from conftest import make_tiny_llama, make_word_tokenizer, write_jsonl
from dpolab.cli import main
from dpolab.data import cache as token_cache
from dpolab.data.batching import collate
from dpolab.data.formats import to_pairs
from dpolab.data.tokenize import TokenizedPair
from dpolab.errors import DataError
from dpolab.judges import load_judge, rank_groups
from dpolab.losses import LOSSES, get_loss
from dpolab.losses.reward import reward_objective
from dpolab.reward import RewardModelJudge, batch_rewards, load_reward_model, score_completions
from dpolab.toy import WORDS


def logsig(x):
    return -math.log1p(math.exp(-x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# ------------------------------------------------------------------------------------------------
# The loss


def test_loss_and_metrics_by_hand():
    chosen, rejected = t(1.0, 0.3, 2.0, -1.0), t(0.5, 0.3, -1.0, 0.0)
    batch = SimpleNamespace(margins=torch.tensor([0.0, 0.0, 1.0, 0.0]))
    losses, m = reward_objective(get_loss("reward"), (chosen, rejected), (None, None), batch, beta=0.1)
    # d = r_w - r_l - margin = 0.5, 0, 2 (3 - 1), -1
    expected = [-logsig(0.5), math.log(2), -logsig(2.0), -logsig(-1.0)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert m["accuracy"].tolist() == [1.0, 0.5, 1.0, 0.0]  # on r_w vs r_l (the margin is not part of it); tie ½
    assert m["rewards/accuracies"].tolist() == m["accuracy"].tolist()
    assert m["rewards/margins"].tolist() == pytest.approx([0.5, 0.0, 3.0, -1.0])
    assert m["rewards/chosen"].tolist() == pytest.approx([1.0, 0.3, 2.0, -1.0])
    losses.sum().backward()  # dL/dr_w = -(1 - σ(d)) = -σ(-d)
    assert chosen.grad.tolist() == pytest.approx([-1 / (1 + math.exp(d)) for d in (0.5, 0.0, 2.0, -1.0)])
    assert rejected.grad.tolist() == pytest.approx([1 / (1 + math.exp(d)) for d in (0.5, 0.0, 2.0, -1.0)])


def test_label_smoothing_and_no_margins():
    loss = LOSSES["bradley_terry"](t(0.7), t(-0.3), beta=5.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(-0.9 * logsig(1.0) - 0.1 * logsig(-1.0), abs=1e-12)  # β plays no part
    losses, _ = reward_objective(LOSSES["bradley_terry"], (t(0.7), t(-0.3)), (None, None), SimpleNamespace(), beta=1)
    assert losses.item() == pytest.approx(-logsig(1.0), abs=1e-12)
    assert get_loss("reward") is get_loss("bradley_terry") and get_loss("reward").reference_free


# ------------------------------------------------------------------------------------------------
# The reward is read at the last completion token


def reward_model(tok, seed=0):
    from transformers import LlamaForSequenceClassification

    config = make_tiny_llama(vocab_size=len(tok)).config
    config.num_labels = 1
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


def alone(model, ids):
    """Independent: the backbone on one unpadded row, the head's weights on its last hidden state."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        return float(hidden @ model.score.weight[0])


@pytest.mark.parametrize("pad", ["<pad>", "</s>"])  # padding with EOS must not move the read position
def test_reward_is_read_at_each_rows_last_token(pad):
    tok = make_word_tokenizer()
    model = reward_model(tok)
    pad_id, eos = tok.convert_tokens_to_ids(pad), tok.eos_token_id
    pairs = [TokenizedPair([1, 4, 8], [8, 9, eos], [10, eos], 0),
             TokenizedPair([1, 5], [11, 12, 13, 14, eos], [8, 8, eos], 1),
             TokenizedPair([1, 4, 9, 10, 11], [12, eos], [13, 14, 15], 2)]  # a truncated completion: no EOS
    with torch.no_grad():
        rewards = batch_rewards(model, collate(pairs, pad_id)).tolist()
    expected = [alone(model, p.prompt_ids + p.chosen_ids) for p in pairs] + \
               [alone(model, p.prompt_ids + p.rejected_ids) for p in pairs]
    assert rewards == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# Training through the CLI on a trivially learnable preference: chosen answers contain "star"


def star_rows(n, seed):
    rng, others = random.Random(seed), [w for w in WORDS if w != "star"]
    rows = []
    for i in range(n):
        words = rng.sample(others, 3)
        words.insert(rng.randrange(4), "star")
        row = {"prompt": "say: " + " ".join(rng.sample(others, 2)), "chosen": " " + " ".join(words),
               "rejected": " " + " ".join(rng.sample(others, 4))}
        if i % 3 == 0:
            row["margin"] = 0.5
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """`dpolab reward train` in process, with the trained model kept from the run (the result of train)."""
    tmp = tmp_path_factory.mktemp("reward")
    train = write_jsonl(tmp / "train.jsonl", star_rows(64, 0))
    heldout = write_jsonl(tmp / "eval.jsonl", star_rows(32, 1))
    results = []
    real = dpolab.trainer.train
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpolab.trainer, "train", lambda config: results.append(real(config)) or results[-1])
        code = main(["reward", "train", "--model", str(tiny_model_dir), "--data", str(train), "--eval-data",
                     str(heldout), "--output-dir", str(tmp / "rm"), "--learning-rate", "1e-2", "--batch-size", "8",
                     "--max-steps", "24", "--logging-steps", "4", "--eval-steps", "12", "--precision", "fp32",
                     "--no-progress"])
    assert code == 0
    return SimpleNamespace(out=tmp / "rm", result=results[0], train=train, heldout=heldout, tmp=tmp)


def test_cli_writes_metrics_and_a_loadable_final(trained):
    from transformers import AutoModelForSequenceClassification

    rows = [json.loads(line) for line in (trained.out / "metrics.jsonl").read_text().splitlines()]
    train_rows, eval_rows = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 4, 8, 12, 16, 20, 24] and [r["step"] for r in eval_rows] == [12, 24]
    assert all(0 <= r["accuracy"] <= 1 and "rewards/margins" in r for r in train_rows)
    assert all(0 <= r["eval_accuracy"] <= 1 for r in eval_rows)
    config = (trained.out / "config.yaml").read_text()
    assert "loss: bradley_terry" in config and "prefix_sharing: false" in config and "packing: false" in config
    loaded = AutoModelForSequenceClassification.from_pretrained(trained.out / "final").eval()
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == 0
    tok = make_word_tokenizer()
    prompts, completions = ["say: red cat", "say: dog"], [" star moon", " fish tree rock"]
    in_memory = score_completions(trained.result.model, tok, prompts, completions)
    from_disk = score_completions(loaded, tok, prompts, completions)
    assert from_disk == pytest.approx(in_memory, abs=1e-5)
    # the pad token differs from EOS here, so transformers' own pooling reads the same (last) token
    ids = [tok(p + c)["input_ids"] + [tok.eos_token_id] for p, c in zip(prompts, completions)]
    with torch.no_grad():
        own = [loaded(torch.tensor([row])).logits.item() for row in ids]
    assert own == pytest.approx(in_memory, abs=1e-5)


def test_learns_a_trivial_preference_well_above_chance(trained):
    assert trained.result.eval_metrics["eval_accuracy"] >= 0.9
    assert trained.result.eval_metrics["eval_loss"] < math.log(2) - 0.2


def expected_scores(folder, prompts, completions):
    """Independent: transformers' own forward of each (unpadded) row; training tokenization of the word
    tokenizer is text split on spaces, BOS in front, EOS appended."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return [model(torch.tensor([tok(p + c)["input_ids"] + [tok.eos_token_id]])).logits.item()
                for p, c in zip(prompts, completions)]


def test_score_pairs_file(trained, capsys):
    out = trained.tmp / "scores.jsonl"
    assert main(["reward", "score", "--model", str(trained.out / "final"), "--data", str(trained.heldout),
                 "--output", str(out), "--batch-size", "5", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    source = [json.loads(line) for line in trained.heldout.read_text().splitlines()]
    assert len(rows) == len(source) and rows[0]["prompt"] == source[0]["prompt"]
    prompts = [r["prompt"] for r in source]
    chosen = expected_scores(trained.out / "final", prompts, [r["chosen"] for r in source])
    rejected = expected_scores(trained.out / "final", prompts, [r["rejected"] for r in source])
    assert [r["chosen_score"] for r in rows] == pytest.approx(chosen, abs=1e-5)
    assert [r["rejected_score"] for r in rows] == pytest.approx(rejected, abs=1e-5)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    assert f"accuracy {accuracy:.4f}" in capsys.readouterr().out


def test_score_completions_file(trained, capsys):
    rows = [{"prompt": "say: red", "completion": " star"}, {"prompt": "say: cat dog", "completion": " moon sun"}]
    out = trained.tmp / "completion-scores.jsonl"
    assert main(["reward", "score", "--model", str(trained.out / "final"), "--data",
                 str(write_jsonl(trained.tmp / "completions.jsonl", rows)), "--output", str(out), "--no-progress"]) == 0
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    assert scores == pytest.approx(expected_scores(trained.out / "final", [r["prompt"] for r in rows],
                                                   [r["completion"] for r in rows]), abs=1e-5)
    assert "2 completions scored" in capsys.readouterr().out


def test_reward_model_judge_through_load_judge(trained):
    folder = str(trained.out / "final")
    judge = load_judge(folder, device="cpu", batch_size=2)
    assert isinstance(judge, RewardModelJudge) and judge.pointwise and judge.max_length == 1024
    prompts, a, b = ["say: red", "say: cat"], [" star fish", " rock"], [" tree", " star"]
    expected_a, expected_b = expected_scores(folder, prompts, a), expected_scores(folder, prompts, b)
    assert judge.score(prompts, a) == pytest.approx(expected_a, abs=1e-5)
    assert judge.compare(prompts, a, b) == pytest.approx(
        [1 / (1 + math.exp(y - x)) for x, y in zip(expected_a, expected_b)], abs=1e-5)
    ranked = rank_groups(judge, prompts, [[a[0], b[0]], [a[1], b[1]]])
    assert [x for group in ranked for x in group] == pytest.approx(
        [expected_a[0], expected_b[0], expected_a[1], expected_b[1]], abs=1e-5)


# ------------------------------------------------------------------------------------------------
# The margin column, and mistakes


def test_margin_column_is_read_cached_and_batched(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5},
            {"prompt": "p", "chosen": "a", "rejected": "c", "margin": "0.5"},  # CSV gives text
            {"prompt": "p", "chosen": "a", "rejected": "d", "margin": None},
            {"prompt": "p", "chosen": "a", "rejected": "e"}]
    assert [p.margin for p in to_pairs(enumerate(rows, 1), "x.jsonl").pairs] == [1.5, 0.5, None, None]
    for bad in ("high", True, float("nan")):
        with pytest.raises(DataError, match="margin"):
            to_pairs([(1, {**rows[0], "margin": bad})], "x.jsonl")
    pairs = [TokenizedPair([1], [5], [6], 0, margin=1.5), TokenizedPair([1], [5], [7], 1)]
    path = tmp_path / "tokens.safetensors"
    token_cache.save(path, {"train": pairs}, [])
    assert [p.margin for p in token_cache.load(path)[0]["train"]] == [1.5, None]
    assert collate(pairs, 0).margins.tolist() == [1.5, 0.0]


def test_margin_reaches_the_training_loss(tmp_path, tiny_model_dir):
    from dpolab.config import TrainConfig
    from dpolab.prepare import load_tokenizer, prepare_data

    rows = star_rows(4, 2)
    for row in rows:
        row["margin"] = 2.0
    config = TrainConfig(model=str(tiny_model_dir), data=str(write_jsonl(tmp_path / "m.jsonl", rows)),
                         output_dir=str(tmp_path / "out"), loss="reward", progress=False)
    pairs = prepare_data(config, load_tokenizer(config), cache_dir=tmp_path / "cache").train
    assert [p.margin for p in pairs] == [2.0] * 4


@pytest.mark.parametrize("args, field", [
    (["--loss", "sigmoid"], "'loss'"),
    (["--loss", "reward,sft"], "'loss'"),
    (["--lora-r", "4"], "'lora_r'"),
    (["--kl-eval-steps", "2"], "'kl_eval_steps'"),
    (["--wpo"], "'wpo'"),
])
def test_bad_train_options_are_config_errors(args, field, tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", star_rows(4, 0))
    code = main(["reward", "train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir",
                 str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dpolab: config error: " + field) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_score_inputs(trained, tiny_model_dir, tmp_path, capsys):
    pairs = str(trained.heldout)
    assert main(["reward", "score", "--model", str(tiny_model_dir), "--data", pairs, "--output", "x.jsonl"]) == 2
    assert "is not a reward model" in capsys.readouterr().err  # a causal LM would score with a random head
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "say: red", "answer": " star"}])
    assert main(["reward", "score", "--model", str(trained.out / "final"), "--data", str(bad), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "'completion'" in err
    with pytest.raises(Exception, match="not a reward model"):
        load_reward_model(str(tiny_model_dir), "cpu")
    assert main(["reward"]) == 2


def test_torchrun_two_processes_train_the_reward_model_as_one(tmp_path, tiny_model_dir):
    """DDP runs the reward forward as the wrapped module's forward: 2 processes x batch 4 = 1 x batch 8."""
    from safetensors.torch import load_file
    from test_distributed import TORCHRUN, launch

    data = write_jsonl(tmp_path / "train.jsonl", star_rows(20, 3))
    args = ["--model", tiny_model_dir, "--data", data, "--max-steps", "3", "--logging-steps", "1", "--learning-rate",
            "1e-3", "--precision", "fp32", "--device", "cpu", "--no-progress"]
    assert main(["reward", "train", *map(str, args), "--batch-size", "8", "--output-dir", str(tmp_path / "one")]) == 0
    launch([*TORCHRUN[:-1], "reward", "train"], [*args, "--batch-size", "4", "--output-dir", tmp_path / "two"],
           tmp_path)
    one, two = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["accuracy"] for r in two] == pytest.approx([r["accuracy"] for r in one], abs=1e-6)
    final_one, final_two = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "two"))
    assert "score.weight" in final_two
    for name, weight in final_one.items():
        torch.testing.assert_close(final_two[name], weight, atol=1e-5, rtol=0)
