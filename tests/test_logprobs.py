"""The batched, masked, chunked log-prob path against a naive per-sequence, per-token loop."""

import pytest
import torch

from conftest import make_tiny_llama
from dpolab import logprobs
from dpolab.data.batching import collate_pairs
from dpolab.data.records import PreferencePair
from dpolab.data.tokenize import TokenizedPair, tokenize_pairs
from dpolab.logprobs import sequence_logps
from dpolab.reference import pair_logps


def naive_logps(model, prompt, completion):
    """Run one unpadded sequence, full log-softmax, sum log p(token) over completion tokens one by one."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for pos in range(len(prompt), len(prompt) + len(completion)):
        total += float(logp[pos - 1, ids[0, pos]])
    return total


def varied_pairs(seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)

    def seq(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    # prompt and completion lengths vary so that padding sits on different sides of the layout
    shapes = [(1, 1, 9), (7, 2, 3), (3, 12, 1), (10, 5, 5), (2, 8, 13)]
    return [TokenizedPair([1] + seq(p), seq(c) + [2], seq(r) + [2], i) for i, (p, c, r) in enumerate(shapes)]


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_batched_logps_match_naive_loop(chunk):
    model = make_tiny_llama()
    pairs = varied_pairs()
    batch = collate_pairs(pairs, pad_token_id=0)
    with torch.no_grad():
        got = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_tokens=chunk)
    expected = [naive_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs]
    expected += [naive_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-5)


def test_pair_logps_splits_chosen_and_rejected():
    model = make_tiny_llama(tie=True)
    pairs = varied_pairs(seed=1)
    with torch.no_grad():
        chosen, rejected = pair_logps(model, collate_pairs(pairs, pad_token_id=0))
    for i, p in enumerate(pairs):
        assert chosen[i].item() == pytest.approx(naive_logps(model, p.prompt_ids, p.chosen_ids), abs=1e-4)
        assert rejected[i].item() == pytest.approx(naive_logps(model, p.prompt_ids, p.rejected_ids), abs=1e-4)


def test_recomputed_chunks_give_the_same_gradients(monkeypatch):
    pairs = varied_pairs(seed=2)
    batch = collate_pairs(pairs, pad_token_id=0)
    grads = []
    for threshold in (1 << 62, 0):  # never recompute, always recompute
        monkeypatch.setattr(logprobs, "RECOMPUTE_ABOVE", threshold)
        model = make_tiny_llama(seed=3)
        sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_tokens=4).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_fallback_path_for_unknown_layouts(monkeypatch):
    model = make_tiny_llama(seed=4)
    batch = collate_pairs(varied_pairs(seed=4), pad_token_id=0)
    with torch.no_grad():
        fast = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        monkeypatch.setattr(logprobs, "split_model", lambda m: None)
        full = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    assert torch.allclose(fast, full, atol=1e-5)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_real_model_and_conversational_row_match_naive_loop(stories_dir, stories_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tok = stories_tokenizer
    tok.chat_template = CHAT_TEMPLATE
    rows = [
        PreferencePair("Once upon a time", " there was a girl.", " the end"),
        PreferencePair("Tom had a big red ball. He", " threw it to his friend.", " ate"),
        PreferencePair([{"role": "user", "content": "Tell me about a cat."}],
                       [{"role": "assistant", "content": "The cat was soft."}],
                       [{"role": "assistant", "content": "No."}]),
    ]
    pairs, stats = tokenize_pairs(rows, tok, max_length=128, max_prompt_length=64)
    assert stats.kept == 3
    with torch.no_grad():
        chosen, rejected = pair_logps(model, collate_pairs(pairs, pad_token_id=tok.pad_token_id))
    for i, p in enumerate(pairs):
        assert chosen[i].item() == pytest.approx(naive_logps(model, p.prompt_ids, p.chosen_ids), abs=1e-3)
        assert rejected[i].item() == pytest.approx(naive_logps(model, p.prompt_ids, p.rejected_ids), abs=1e-3)


def test_logit_chunks_stay_within_budget_whatever_the_vocabulary(monkeypatch):
    """Memory does not grow with the vocabulary: no chunk of logits exceeds LOGITS_PER_CHUNK entries."""
    seen = []
    real = logprobs._token_logps

    def recording(head_fn, hidden, targets):
        out = real(head_fn, hidden, targets)
        seen.append(hidden.shape[0])
        return out

    monkeypatch.setattr(logprobs, "_token_logps", recording)
    monkeypatch.setattr(logprobs, "LOGITS_PER_CHUNK", 1 << 15)
    for vocab in (64, 512, 2048):
        seen.clear()
        model = make_tiny_llama(vocab_size=vocab, seed=1)
        pairs = varied_pairs(seed=3, vocab=vocab)
        batch = collate_pairs(pairs, pad_token_id=0)
        got = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        assert max(seen) * vocab <= 1 << 15 and len(seen) >= (3 if vocab == 2048 else 1) and sum(seen) == int((batch.loss_mask[:, 1:] != 0).sum())
        p = pairs[0]
        assert got[0].item() == pytest.approx(naive_logps(model, p.prompt_ids, p.chosen_ids), abs=1e-4)
