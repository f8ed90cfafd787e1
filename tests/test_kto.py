"""KTO: the loss by hand, unpaired data (formats, KL partners, tokenization, batches), and training end to end."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import dpolab
from conftest import copy_task_rows, make_word_tokenizer, write_jsonl
from dpolab.config import TrainConfig
from dpolab.data.batching import ExampleBatch, collate, collate_examples
from dpolab.data.examples import TokenizedExample, kl_partners, tokenize_examples
from dpolab.data.formats import to_examples
from dpolab.data.load import load_examples, load_pairs
from dpolab.data.records import UnpairedExample
from dpolab.errors import DataError
from dpolab.losses import LOSSES
from dpolab.losses.kto import kto_objective


def t(*values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def sig(x):
    return 1 / (1 + math.exp(-x))


# two examples: r = [1, -1]; KL rows: log-ratios [1, 0] -> z0 = 0.5
POLICY, REF, POLICY_KL, REF_KL = (-5.0, -7.0), (-6.0, -6.0), (-9.0, -10.0), (-10.0, -10.0)
LABELS = torch.tensor([True, False])


def test_kto_loss_by_hand():
    kto = LOSSES["kto"]
    assert kto.unpaired and not kto.reference_free
    loss = kto(t(*POLICY), t(*POLICY_KL), t(*REF), t(*REF_KL), beta=0.5, labels=LABELS, desirable_weight=2.0,
               undesirable_weight=0.5)
    assert loss[0].item() == pytest.approx(2.0 * (1 - sig(0.5 * (1 - 0.5))), abs=1e-12)
    assert loss[1].item() == pytest.approx(0.5 * (1 - sig(0.5 * (0.5 - -1))), abs=1e-12)


def test_kto_reference_point_is_clamped_and_detached():
    policy_kl = t(-11.0, -12.0)  # log-ratios -1, -2: the estimate is clamped to 0
    loss = LOSSES["kto"](t(*POLICY), policy_kl, t(*REF), t(*REF_KL), beta=0.5, labels=LABELS)
    assert loss[0].item() == pytest.approx(1 - sig(0.5), abs=1e-12)
    loss.sum().backward()
    assert policy_kl.grad is None or torch.all(policy_kl.grad == 0)  # z0 carries no gradient


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    policy = t(*POLICY)
    LOSSES["kto"](policy, t(*POLICY_KL), t(*REF), t(*REF_KL), beta=0.5, labels=LABELS).sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]


def test_kto_metrics_by_hand():
    batch = SimpleNamespace(labels=LABELS)
    losses, m = kto_objective(LOSSES["kto"], (t(*POLICY), t(*POLICY_KL)), (t(*REF), t(*REF_KL)), batch, beta=0.5)
    assert m["kl"].tolist() == [0.5, 0.5]
    assert m["rewards/chosen"].tolist() == [0.5] and m["rewards/rejected"].tolist() == [-0.5]
    assert m["rewards/margins"].tolist() == pytest.approx([0.5 - 0.25, 0.25 + 0.5])  # beta (r - z0), beta (z0 - r)
    assert m["rewards/accuracies"].tolist() == [1.0, 1.0]
    assert m["logps/chosen"].tolist() == [-5.0] and m["logps/rejected"].tolist() == [-7.0]
    assert torch.equal(m["loss"], losses.detach())


# ---------------------------------------------------------------------------------------------
# Data


def rows(*items):
    return list(enumerate(items, start=1))


def test_unpaired_rows_become_examples():
    data = to_examples(rows({"prompt": "p", "completion": " a", "label": True},
                            {"prompt": "q", "completion": " b", "label": "false", "id": 7},
                            {"prompt": "r", "completion": " c", "label": 1}), "x.jsonl")
    assert data.format == "unpaired" and data.rows_read == 3 and not data.pairs
    assert [(e.prompt, e.completion, e.label, e.row) for e in data.examples] == [
        ("p", " a", True, 1), ("q", " b", False, 2), ("r", " c", True, 3)]


def test_conversational_unpaired_rows():
    prompt = [{"role": "user", "content": "hi"}]
    data = to_examples(rows({"prompt": prompt, "completion": {"role": "assistant", "content": "yo"}, "label": False}),
                       "x")
    assert data.format == "conversational_unpaired"
    assert data.examples[0] == UnpairedExample(prompt, [{"role": "assistant", "content": "yo"}], False, "x", 1)


def test_pairs_split_into_a_desirable_and_an_undesirable_example():
    data = to_examples(rows({"prompt": "p", "chosen": " good", "rejected": " bad"}), "x")
    assert data.format == "standard" and len(data.pairs) == 1
    assert [(e.completion, e.label) for e in data.examples] == [(" good", True), (" bad", False)]


@pytest.mark.parametrize("items, field, message", [
    (({"prompt": "p", "completion": "a", "label": "maybe"},), "label", "expected true"),
    (({"prompt": "p", "completion": "a", "label": 2},), "label", "expected true"),
    (({"prompt": "p", "completion": 5, "label": True},), "completion", "expected text"),
    (({"completion": "a", "label": True},), None, "missing key 'prompt'"),
    (({"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "chosen": "a", "rejected": "b"}), None,
     "not an unpaired example"),
    (({"prompt": "p", "completion": "a", "label": True},
      {"prompt": [{"role": "user", "content": "x"}], "completion": {"role": "assistant", "content": "a"},
       "label": True}), None, "row 2 is conversational_unpaired but row 1 is unpaired"),
])
def test_bad_unpaired_rows_name_the_row_and_field(items, field, message):
    with pytest.raises(DataError) as err:
        to_examples(rows(*items), "x.jsonl")
    assert message in str(err.value) and (field is None or err.value.field == field)


def test_unpaired_file_given_to_a_pairwise_loss_says_use_kto(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    with pytest.raises(DataError, match="--loss kto"):
        load_pairs(path)
    assert len(load_examples(path).examples) == 1


def test_strict_refuses_unusable_rows_for_kto_too(tmp_path):
    from dpolab.prepare import prepare_data

    tok = make_word_tokenizer()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "copy: red", "chosen": " red", "rejected": " cat"},
                                                   {"prompt": "copy: cat", "chosen": " dog", "rejected": " dog"}])
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "copy: red", "completion": " red", "label": True},
                                                 {"prompt": "copy: " + "red " * 20, "completion": " red", "label": True}])
    config = dict(model="m", output_dir=str(tmp_path / "out"), loss="kto", max_length=16, max_prompt_length=8)
    assert len(prepare_data(TrainConfig(data=str(pairs), **config), tok).train) == 2  # identical pair dropped
    with pytest.raises(DataError, match="row 2.*--strict"):
        prepare_data(TrainConfig(data=str(pairs), strict=True, **config), tok)
    with pytest.raises(DataError, match="row 2.*--strict"):
        prepare_data(TrainConfig(data=str(long), strict=True, **config), tok)


def test_kl_partners_pick_another_prompt_and_completion():
    examples = [UnpairedExample(f"p{i // 2}", f"c{i}", i % 2 == 0) for i in range(10)]
    partners = kl_partners(examples, seed=3)
    assert partners == kl_partners(examples, seed=3) != kl_partners(examples, seed=4)
    for i, j in enumerate(partners):
        assert examples[i].prompt != examples[j].prompt and examples[i].completion != examples[j].completion
    assert kl_partners(examples[:1], seed=0) == [0]


def test_tokenized_examples_share_the_prompt_with_their_kl_row():
    tok = make_word_tokenizer()
    examples = [UnpairedExample("copy: red", " red", True), UnpairedExample("copy: cat", " red", False)]
    tokenized, stats = tokenize_examples(examples, tok, max_length=16, max_prompt_length=8)
    assert stats.kept == 2 and not stats.dropped  # equal completions (the KL row) are kept
    red, cat, eos = tok.convert_tokens_to_ids(["red", "cat", "</s>"])
    first = tokenized[0]
    assert first.prompt_ids == tok("copy: red")["input_ids"] and first.completion_ids == [red, eos]
    assert first.kl_completion_ids == [red, eos] and first.label and not tokenized[1].label


def test_example_batch_layout():
    examples = [TokenizedExample([1, 4], [5, 2], [6, 7, 2], True, 0), TokenizedExample([1], [8, 2], [5, 2], False, 1)]
    batch = collate(examples, pad_token_id=0, ld_alpha=0.5)  # LD-DPO does not apply to examples
    assert isinstance(batch, ExampleBatch) and batch.num_pairs == 2
    assert batch.input_ids.tolist() == [[1, 4, 5, 2, 0], [1, 8, 2, 0, 0], [1, 4, 6, 7, 2], [1, 5, 2, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch.labels.tolist() == [True, False] and batch.kl_lengths.tolist() == [3, 2]
    assert collate_examples(examples, 0).completion_lengths.tolist() == [2, 2]


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.fixture()
def one_thread():
    """One intra-op thread for the tiny model (see test_loss_training.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unpaired_rows(n):
    """Copy task as thumbs up / down: even rows copy the prompt (desirable), odd rows do not."""
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
            for i, r in enumerate(copy_task_rows(n))]


def train_kto(tmp_path, model_dir, data, **overrides):
    values = dict(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "out"), precision="fp32", loss="kto",
                  learning_rate=1e-2, batch_size=8, max_steps=30, logging_steps=30, warmup_ratio=0.0, progress=False)
    result = dpolab.train(TrainConfig(**{**values, **overrides}))
    return result, [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_kto_trains_on_an_unpaired_file(tmp_path, tiny_model_dir, capsys, one_thread):
    data = write_jsonl(tmp_path / "unpaired.jsonl", unpaired_rows(64))
    result, rows = train_kto(tmp_path, tiny_model_dir, data, eval_split=0.25)
    out = capsys.readouterr().out
    assert "format: unpaired" in out and "desirable" in out
    first, last = rows[0], rows[-2]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: 1 - sigma(0)
    assert last["loss"] < first["loss"] and last["kl"] >= 0
    assert last["rewards/chosen"] > last["rewards/rejected"] and last["rewards/margins"] > 0
    assert {"eval_loss", "eval_kl", "eval_rewards/chosen", "eval_rewards/rejected"} <= set(result.eval_metrics)
    assert rows[-1] == {"step": 30, "epoch": rows[-1]["epoch"], **result.eval_metrics}


def test_kto_accepts_a_paired_file(tmp_path, tiny_model_dir, capsys, one_thread):
    data = write_jsonl(tmp_path / "pairs.jsonl", copy_task_rows(32))
    result, rows = train_kto(tmp_path, tiny_model_dir, data, reference="model", max_steps=20, logging_steps=20)
    assert "64 examples, 2 per pair (32 pairs)" in capsys.readouterr().out
    assert rows[-1]["rewards/chosen"] > rows[-1]["rewards/rejected"]
