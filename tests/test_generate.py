"""Batched sampling: seeded, left-padded, EOS-aware, exact ids kept; checked against plain loops."""

from __future__ import annotations

import json

import pytest
import torch

from dpolab import cli
from dpolab.data.records import PreferencePair
from dpolab.data.tokenize import tokenize_pairs
from dpolab.errors import ConfigError, DataError
from dpolab.generate import encode_prompts, generate, next_token, read_prompts
from dpolab.toy import make_tiny_llama, make_word_tokenizer

PROMPTS = ["copy: red", "copy: red blue green cat dog fish", "say:", ""]


@pytest.fixture(scope="module")
def tok():
    return make_word_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = make_tiny_llama(vocab_size=len(tok), hidden=64, layers=2, seed=3)
    with torch.no_grad():  # peakier than a fresh init, so samples differ between seeds and greedy is unambiguous
        m.lm_head.weight.mul_(30)
    return m


def greedy_by_hand(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Argmax decoding with a full forward of the unpadded sequence at every step (no cache, no batch)."""
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out


def test_prompts_are_encoded_as_the_trainer_encodes_them(tok):
    pairs = [PreferencePair(p, " red", " cat") for p in PROMPTS]
    tokenized, _ = tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=32)
    assert encode_prompts(tok, PROMPTS) == [t.prompt_ids for t in tokenized]
    assert encode_prompts(tok, [""]) == [[tok.bos_token_id]]


def test_same_seed_same_samples_other_seed_other_samples(model, tok):
    a = generate(model, tok, PROMPTS, num_samples=3, max_new_tokens=8, seed=7, batch_size=5)
    b = generate(model, tok, PROMPTS, num_samples=3, max_new_tokens=8, seed=7, batch_size=5)
    c = generate(model, tok, PROMPTS, num_samples=3, max_new_tokens=8, seed=8, batch_size=5)
    assert a == b
    assert [s.completion_ids for s in a] != [s.completion_ids for s in c]


def test_num_samples_are_adjacent_and_numbered(model, tok):
    samples = generate(model, tok, PROMPTS, num_samples=3, max_new_tokens=4, seed=0)
    assert len(samples) == 12
    assert [s.prompt for s in samples] == [p for p in PROMPTS for _ in range(3)]
    assert [s.sample for s in samples] == [0, 1, 2] * 4
    assert all(1 <= len(s.completion_ids) <= 4 for s in samples)


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1e-6)])
def test_greedy_equals_argmax_decoding_by_hand(model, tok, temperature, top_p):
    samples = generate(model, tok, PROMPTS, max_new_tokens=6, temperature=temperature, top_p=top_p, seed=1)
    for s, ids in zip(samples, encode_prompts(tok, PROMPTS)):
        assert s.prompt_ids == ids
        assert s.completion_ids == greedy_by_hand(model, ids, 6, tok.eos_token_id)


def test_eos_stops_each_row_on_its_own(model, tok):
    """EOS is forced right after a chosen token X: rows that emit X stop there, the others run on."""
    free = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0)
    x = free[0].completion_ids[1]

    def force_eos_after_x(module, args, kwargs, output):
        last = kwargs["input_ids"][:, -1]
        output.logits[:, -1, tok.eos_token_id] = torch.where(last == x, 1e4, -1e4)
        return output

    handle = model.register_forward_hook(force_eos_after_x, with_kwargs=True)
    try:
        samples = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0)
    finally:
        handle.remove()
    for s, f in zip(samples, free):
        if x in f.completion_ids:
            cut = f.completion_ids.index(x) + 1
            assert s.completion_ids == f.completion_ids[:cut] + [tok.eos_token_id] and s.finished
        else:
            assert s.completion_ids == f.completion_ids and not s.finished
    assert samples[0].finished and "</s>" not in samples[0].completion


def test_completion_text_is_what_follows_the_prompt(model, tok):
    for s in generate(model, tok, PROMPTS[:3], max_new_tokens=5, seed=2):
        body = [t for t in s.completion_ids if t != tok.eos_token_id]
        full = tok.decode(s.prompt_ids + body, skip_special_tokens=True)
        assert full == tok.decode(s.prompt_ids, skip_special_tokens=True) + s.completion


def test_next_token_nucleus_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(next_token(logits, 1.0, 0.75, gen)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.75 needs the second token; 0.8 >= 0.75 stops before the third
    assert {int(next_token(logits, 1.0, 0.5, gen)) for _ in range(100)} == {0}


@pytest.mark.parametrize("kwargs, field", [({"num_samples": 0}, "num_samples"), ({"top_p": 0.0}, "top_p"),
                                           ({"temperature": -1.0}, "temperature"),
                                           ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_sampling_settings_are_config_errors(model, tok, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        generate(model, tok, ["say:"], **kwargs)


def test_read_prompts_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond one\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["first prompt", "second one"]
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    with pytest.raises(DataError, match="row 1, field 'prompt'"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_generate_command_writes_jsonl(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    code = cli.main(["generate", "--model", str(tiny_model_dir), "--prompt", "copy: red", "--prompt", "say:",
                     "--num-samples", "2", "--max-new-tokens", "3", "--output", str(out), "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("copy: red", 0), ("copy: red", 1), ("say:", 0), ("say:", 1)]
    assert set(rows[0]) == {"prompt", "completion", "sample", "finished"}


def test_generate_command_bad_top_p_is_one_line(tiny_model_dir, capsys):
    code = cli.main(["generate", "--model", str(tiny_model_dir), "--prompt", "say:", "--top-p", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "top_p" in err[0]
