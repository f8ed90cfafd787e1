"""dpolab.head.HeadLogProbs: token log-probs through a linear head with a vocabulary-blocked backward.

Checked against torch's numerical gradients (float64 gradcheck, several token chunks and vocabulary
blocks) and against plain autograd through ``F.cross_entropy`` on the same weights, fp32 and bf16.
"""

import pytest
import torch
import torch.nn.functional as F

from dpolab import head as head_mod
from dpolab import logprobs
from dpolab.head import HeadLogProbs, head_token_logps


def _inputs(n=37, hidden=16, vocab=101, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, t


def test_gradients_match_numerical_ones(monkeypatch):
    monkeypatch.setattr(head_mod, "BLOCK_LOGITS", 37 * 10)  # 11 vocabulary blocks, the last one short
    h, w, t = _inputs()
    assert torch.autograd.gradcheck(lambda a, b: HeadLogProbs.apply(a, b, t, torch.float64, 8), (h, w))


def test_frozen_weight_gets_no_gradient_and_hidden_the_same_one(monkeypatch):
    monkeypatch.setattr(head_mod, "BLOCK_LOGITS", 100)
    h, w, t = _inputs(dtype=torch.float32)
    w.requires_grad_(False)
    g = torch.randn(h.shape[0])
    (HeadLogProbs.apply(h, w, t, torch.float32, 5) * g).sum().backward()
    fused = h.grad.clone()
    h.grad = None
    (-F.cross_entropy(h @ w.t(), t, reduction="none") * g).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(fused, h.grad, rtol=1e-5, atol=1e-5)


def _through_chunks(model_head, h, t, recompute_above, monkeypatch, autocast):
    monkeypatch.setattr(logprobs, "RECOMPUTE_ABOVE", recompute_above)
    head_fn = lambda x: model_head(x)  # noqa: E731
    head_fn.linear = model_head
    h = h.detach().clone().requires_grad_(True)
    model_head.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = logprobs.chunked_token_logps(head_fn, h, t, model_head.weight.shape[0], chunk_tokens=16)
    weights = torch.linspace(-1, 2, out.shape[0])
    (out * weights).sum().backward()
    return out.detach(), h.grad, model_head.weight.grad.clone()


@pytest.mark.parametrize("autocast,tol", [(False, 1e-5), (True, 2e-2)])
def test_logprobs_path_fused_equals_plain_autograd(monkeypatch, autocast, tol):
    monkeypatch.setattr(head_mod, "BLOCK_LOGITS", 64 * 50)
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(32, 300, bias=False)
    h, t = torch.randn(64, 32), torch.randint(0, 300, (64,))
    calls = []
    real = HeadLogProbs.apply
    monkeypatch.setattr(HeadLogProbs, "apply", lambda *a: calls.append(1) or real(*a))
    fused = _through_chunks(lm_head, h, t, 0, monkeypatch, autocast)          # recompute: fused path
    assert calls
    plain = _through_chunks(lm_head, h, t, 1 << 40, monkeypatch, autocast)   # stored chunks: autograd
    assert len(calls) == 1
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_heads_it_cannot_read_directly_are_left_to_autograd():
    h, _, t = _inputs(dtype=torch.float32)
    assert head_token_logps(torch.nn.Linear(16, 101, bias=True), h, t, 8) is None
    hooked = torch.nn.Linear(16, 101, bias=False)
    hooked.register_forward_pre_hook(lambda module, args: None)  # e.g. FSDP/DeepSpeed gathering the weight
    assert head_token_logps(hooked, h, t, 8) is None
    assert head_token_logps(torch.nn.Linear(16, 101, bias=False), h, t, 8) is not None
