"""Prefix sharing and packing: the rows by hand, and the same log-probs (and gradients) as the plain
padded forward and as a naive one-sequence-at-a-time loop."""

import json

import pytest
import torch

import dpolab
from conftest import copy_task_rows, make_tiny_llama, write_jsonl
from dpolab import trainer
from dpolab.config import TrainConfig
from dpolab.data.batching import collate_examples, collate_pairs
from dpolab.data.examples import TokenizedExample
from dpolab.data.layout import Layout
from dpolab.data.tokenize import TokenizedPair, tokenize_pairs
from dpolab.data.load import load_pairs
from dpolab.logprobs import supports_custom_layout
from dpolab.reference import pair_logps
from test_logprobs import naive_logps, varied_pairs

SHARED = Layout(prefix_sharing=True)
PACKED = Layout(packing=True)
BOTH = Layout(prefix_sharing=True, packing=True)
LONG_ROWS = Layout(prefix_sharing=True, packing=True, pack_length=64)
LAYOUTS = [SHARED, PACKED, BOTH, LONG_ROWS]


def test_prefix_shared_row_by_hand():
    pair = TokenizedPair(prompt_ids=[1, 5], chosen_ids=[6, 2], rejected_ids=[7, 8, 2], index=0)
    batch = collate_pairs([pair], pad_token_id=0, layout=SHARED)
    assert batch.input_ids.tolist() == [[1, 5, 6, 2, 7, 8, 2]]
    # the rejected branch continues from the end of the prompt: positions 2, 3, 4
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert batch.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # rejected tokens see the prompt and themselves, never the chosen tokens
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 1, 1, 1],
    ]
    # chosen tokens 6, 2 are predicted at places 1, 2; rejected 7 from the prompt's last place (1), then 4, 5
    assert batch.score_positions.tolist() == [1, 2, 1, 4, 5]
    assert batch.score_targets.tolist() == [6, 2, 7, 8, 2]
    assert batch.score_sequences.tolist() == [0, 0, 1, 1, 1]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1]]
    assert batch.num_tokens == 2 * 2 + 2 + 3  # the prompt counted with each completion, as in two rows


def test_packed_rows_by_hand():
    pairs = [TokenizedPair([1, 5], [6], [7], 0), TokenizedPair([1], [9, 2], [4], 1)]
    batch = collate_pairs(pairs, pad_token_id=0, layout=Layout(packing=True, pack_length=6))
    # units x‖a in order [1,5,6] [1,9,2] [1,5,7] [1,4]; longest first (ties keep their order), first fit
    # into rows of 6: [1,5,6] + [1,9,2] in row 0, [1,5,7] + [1,4] in row 1
    assert batch.input_ids.tolist() == [[1, 5, 6, 1, 9, 2], [1, 5, 7, 1, 4, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 0]]
    block = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[:3, :3], expected[3:, 3:] = block, block
    assert batch.attention_mask[0, 0].long().tolist() == expected.tolist()
    assert batch.attention_mask[1, 0, 5].long().tolist() == [0, 0, 0, 0, 0, 1]  # padding sees only itself
    # sequences: pair 0 chosen = 0, pair 1 chosen = 1, pair 0 rejected = 2, pair 1 rejected = 3
    assert sorted(zip(batch.score_sequences.tolist(), batch.score_targets.tolist())) == [
        (0, 6), (1, 2), (1, 9), (2, 7), (3, 4)]
    assert batch.num_tokens == (2 * 2 + 1 + 1) + (2 * 1 + 2 + 1)


def logps_of(model, pairs, layout, **kwargs):
    return torch.cat(pair_logps(model, collate_pairs(pairs, pad_token_id=0, layout=layout, **kwargs)))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layouts_match_a_naive_loop(layout, attention):
    model = make_tiny_llama(seed=3)
    model.set_attn_implementation(attention)
    pairs = varied_pairs(seed=5)
    with torch.no_grad():
        got = logps_of(model, pairs, layout)
    expected = [naive_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs]
    expected += [naive_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-5)


def gradients(model, pairs, layout, weights, **kwargs):
    model.zero_grad()
    (logps_of(model, pairs, layout, **kwargs) * weights).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_layouts_give_the_plain_gradients(layout):
    model = make_tiny_llama(seed=4, tie=True)
    pairs = varied_pairs(seed=6)
    weights = torch.linspace(-1, 1, 2 * len(pairs))
    plain = gradients(model, pairs, Layout(), weights, ld_alpha=0.5)
    got = gradients(model, pairs, layout, weights, ld_alpha=0.5)  # LD-DPO's fractional weights too
    assert plain.abs().max() > 1e-3
    assert torch.allclose(got, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_layouts_under_bf16_autocast_stay_within_bf16_noise(layout):
    model = make_tiny_llama(seed=7, hidden=64)
    pairs = varied_pairs(seed=8)
    with torch.no_grad():
        exact = logps_of(model, pairs, Layout())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = logps_of(model, pairs, Layout())
            got = logps_of(model, pairs, layout)
    # bf16 keeps 8 bits of mantissa: per-token log-probs move by ~1e-2; the layout adds no more than that
    noise = (plain - exact).abs().max()
    assert noise > 0  # autocast really ran in bf16
    assert (got - exact).abs().max() <= 3 * noise + 1e-3
    assert torch.allclose(got, exact, rtol=2e-2, atol=0.1)


def test_kto_examples_share_their_prompt_too():
    model = make_tiny_llama(seed=9)
    examples = [TokenizedExample([1, 4, 5], [6, 7, 2], [8, 2], True, i) for i in range(1)]
    examples += [TokenizedExample([1, 9], [10, 2], [11, 12, 13, 2], False, 1)]
    with torch.no_grad():
        plain = torch.cat(pair_logps(model, collate_examples(examples, 0)))
        shared = torch.cat(pair_logps(model, collate_examples(examples, 0, layout=BOTH)))
    expected = [naive_logps(model, e.prompt_ids, e.completion_ids) for e in examples]
    expected += [naive_logps(model, e.prompt_ids, e.kl_completion_ids) for e in examples]
    assert torch.allclose(shared.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(shared, plain, atol=1e-5)


def test_real_model_on_real_pairs(stories_dir, stories_tokenizer, hh_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    rows = load_pairs(str(hh_path)).pairs[:6]
    pairs, _ = tokenize_pairs(rows, stories_tokenizer, max_length=192, max_prompt_length=96)
    with torch.no_grad():
        plain = logps_of(model, pairs, Layout())
        for layout in (BOTH, LONG_ROWS):
            assert torch.allclose(logps_of(model, pairs, layout), plain, atol=1e-3, rtol=1e-5)
    p = pairs[0]
    assert plain[0].item() == pytest.approx(naive_logps(model, p.prompt_ids, p.chosen_ids), abs=1e-3)


def train_rows(tmp_path, model_dir, data, **overrides):
    values = dict(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "out"), precision="fp32",
                  learning_rate=1e-3, batch_size=8, max_steps=4, logging_steps=1, progress=False, seed=0,
                  max_grad_norm=0.0)
    result = dpolab.train(TrainConfig(**{**values, **overrides}))
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    return result, [json.loads(line) for line in lines]


def test_training_with_each_switch_gives_the_same_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(32, seed=2))
    _, plain = train_rows(tmp_path / "plain", tiny_model_dir, data, prefix_sharing=False, packing=False)
    for name, flags in {"fast": {}, "checkpointed": {"gradient_checkpointing": True}}.items():
        result, rows = train_rows(tmp_path / name, tiny_model_dir, data, **flags)
        for a, b in zip(rows, plain):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["logps/chosen"] == pytest.approx(b["logps/chosen"], abs=1e-4)
            assert a["tokens"] == b["tokens"]  # tokens are counted the same whatever the layout
    flag = "is_activation_checkpointing" if hasattr(result.model, "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    assert getattr(result.model, flag)


def test_models_without_custom_masks_fall_back_to_plain_rows(tmp_path, tiny_model_dir, monkeypatch, capsys):
    model = make_tiny_llama()
    assert supports_custom_layout(model)
    model.config._attn_implementation = "flash_attention_2"
    assert not supports_custom_layout(model)
    monkeypatch.setattr(trainer, "supports_custom_layout", lambda model: False)
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(16))
    result, rows = train_rows(tmp_path, tiny_model_dir, data, max_steps=2)
    assert "training with plain padded rows" in capsys.readouterr().out
    assert result.steps == 2 and rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_match_the_plain_layout(arch):
    """Learned absolute positions (GPT-2) and another RoPE family (Qwen2, with biases) take the masks too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    else:
        cfg = AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert supports_custom_layout(model)
    pairs = varied_pairs(seed=11)
    with torch.no_grad():
        expected = [naive_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs]
        expected += [naive_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs]
        for layout in (BOTH, LONG_ROWS):
            got = logps_of(model, pairs, layout)
            assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
