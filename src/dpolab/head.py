"""Token log-probs through a large-vocabulary LM head without per-chunk weight gradients.

For log p_t = z_t[y_t] − logsumexp(z_t), z_t = W·h_t, the gradient is ∂/∂z_t = g_t·(onehot(y_t) − softmax(z_t)).
Autograd over token chunks of the head (``dpolab.logprobs``) gives every chunk its own full [V, H]
gradient of the weight, summed chunk after chunk in the compute dtype (bf16 under autocast): for a 152k
vocabulary that is a fresh 78 MB tensor per 110 tokens. ``HeadLogProbs`` instead saves the hidden
states and the per-token logsumexp in the forward, and in the backward walks the *vocabulary* in
blocks: each block's logits are recomputed for all tokens, and that block's rows of the weight
gradient come out of one matmul over all tokens (rounded once, written straight into the fp32
gradient), while the hidden-state gradient is summed over blocks in fp32. Same work as recomputing
the chunks (one more head matmul than storing them), bounded memory, no bf16 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Logits per block in the backward pass (tokens × vocabulary rows): 16M fp32 = 64 MB.
BLOCK_LOGITS = 1 << 24


def _plain_weight(head: torch.nn.Module) -> Tensor | None:
    """The head's weight if the head is a bias-free ``nn.Linear`` holding an ordinary tensor, else None.

    Sharded weights (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions, gathered by module hooks) and wrapped
    heads (a LoRA layer on the head) are left to autograd: this function reads the weight directly.
    """
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if head._forward_hooks or head._forward_pre_hooks:
        return None
    weight = head.weight
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or hasattr(weight, "ds_id"):
        return None
    return weight


class HeadLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weightᵀ)[targets] for [N, H] hidden states: matmuls in ``dtype``, softmax and
    sums in fp32 (fp64 for fp64 inputs); the weight's gradient in the weight's dtype."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype,
                chunk_tokens: int) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.detach().to(dtype)
            acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 (fp64 in gradcheck)
            out = torch.empty(h.shape[0], dtype=acc, device=h.device)
            lse = torch.empty_like(out)
            for start in range(0, h.shape[0], chunk_tokens):
                logits = (h[start:start + chunk_tokens] @ w.t()).to(acc)
                tgt = targets[start:start + chunk_tokens]
                nll = F.cross_entropy(logits, tgt, reduction="none")  # faster on CPU than logsumexp
                out[start:start + chunk_tokens] = -nll
                lse[start:start + chunk_tokens] = logits.gather(1, tgt[:, None])[:, 0] + nll
        ctx.save_for_backward(h, w, targets, lse)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, w, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = lse.dtype
        grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
        grad_w = torch.empty(w.shape, dtype=acc, device=w.device) if need_w else None
        rows = max(1, BLOCK_LOGITS // max(1, h.shape[0]))
        grad = grad.to(acc)
        with torch.autocast(h.device.type, enabled=False):
            for v0 in range(0, w.shape[0], rows):
                block = w[v0:v0 + rows]
                # d log p / d z = onehot(y) − softmax(z), times the incoming gradient of each token
                dz = torch.exp((h @ block.t()).to(acc) - lse[:, None]).mul_(-grad[:, None])
                hit = (targets >= v0) & (targets < v0 + block.shape[0])
                dz[hit, targets[hit] - v0] += grad[hit]
                dz = dz.to(h.dtype)
                if need_w:
                    grad_w[v0:v0 + block.shape[0]] = dz.t() @ h
                if need_h:
                    grad_h += dz @ block
        if need_w:
            grad_w = grad_w.to(ctx.weight_dtype)
        return (grad_h.to(ctx.hidden_dtype) if need_h else None), grad_w, None, None, None


def head_token_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor | None:
    """Token log-probs through ``head`` with ``HeadLogProbs``, or None where it does not apply (see
    ``_plain_weight``). Matmuls run in bf16 under bf16 autocast, else in the weight's dtype."""
    weight = _plain_weight(head)
    if weight is None:
        return None
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return HeadLogProbs.apply(hidden, weight, targets, dtype, chunk_tokens)
