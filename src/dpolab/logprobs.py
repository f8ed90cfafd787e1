"""Per-sequence log-probabilities of completion tokens.

log π(y|x) = Σ_t log softmax(W·h_t)[y_t], summed over completion positions only (prompt and padding
are masked). The LM head and the log-softmax are applied only to the hidden states that predict a
completion token, in chunks of at most ``LOGITS_PER_CHUNK`` logits, so the full batch × length ×
vocabulary logits tensor is never built; during training, when all the chunks together would hold more
than ``RECOMPUTE_ABOVE`` logits, each chunk is recomputed in the backward pass instead of being stored
(for a plain linear head by ``dpolab.head.HeadLogProbs``, whose backward walks the vocabulary in blocks).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import lora
from .head import head_token_logps

# Logits (tokens × vocabulary) per chunk: at most 16M (64 MB in fp32; 110 tokens of a 152k vocabulary)
# and at most CHUNK_TOKENS tokens: a chunk whose logits stay in the CPU's caches is up to 1.8x faster
# (measured on 2 cores, 2,720 tokens, forward / forward+backward: vocab 8k 74 → 41 ms / 193 → 125 ms at
# 256 tokens instead of 2,048; vocab 32k 311 → 275 / 1,012 → 872 ms at 256 instead of 524). Smaller
# chunks of a 152k vocabulary (55 tokens) were faster still but made oneDNN's primitive cache hold
# up to 2.5 GB more in some runs, so 16M stays.
LOGITS_PER_CHUNK = 1 << 24
CHUNK_TOKENS = 256
# Above this many logits in a whole batch (512 MB in fp32), chunks are recomputed in backward, not stored.
RECOMPUTE_ABOVE = 1 << 27


def split_model(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor]] | None:
    """(backbone that returns hidden states, head that maps them to logits), or None if unknown.

    Works for any transformers ``*ForCausalLM`` whose base model sits under ``base_model_prefix``
    and whose output embedding is the LM head; final-logit soft-capping (Gemma 2) and logit scaling
    (Cohere) are applied as those models do. A peft (LoRA) model is split as the transformers model it
    wraps: its LoRA layers sit inside that model's modules, so its backbone runs them.
    """
    model = lora.unwrap(model)
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is model:
        return None
    cfg = getattr(model, "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)

    def head_fn(h: Tensor) -> Tensor:
        logits = head(h)
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    head_fn.linear = head if scale is None and softcap is None else None  # for dpolab.head
    return backbone, head_fn


def _token_logps(head_fn: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor) -> Tensor:
    """log softmax(head(hidden))[targets] in fp32, for a [N, H] chunk (cross-entropy is the fused kernel
    for it: one pass forward and backward instead of gather + logsumexp)."""
    return -F.cross_entropy(head_fn(hidden).float(), targets, reduction="none")


def chunked_token_logps(head_fn: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor,
                        vocab_size: int, chunk_tokens: int | None = None) -> Tensor:
    """Token log-probs for [N, H] hidden states, ``chunk_tokens`` rows at a time (default: as many as
    fit in ``LOGITS_PER_CHUNK`` logits, at most ``CHUNK_TOKENS``)."""
    parts = []
    chunk_tokens = chunk_tokens or max(16, min(CHUNK_TOKENS, LOGITS_PER_CHUNK // vocab_size))
    recompute = torch.is_grad_enabled() and hidden.shape[0] * vocab_size > RECOMPUTE_ABOVE
    if recompute and getattr(head_fn, "linear", None) is not None:  # a plain linear head: vocabulary-blocked backward
        fused = head_token_logps(head_fn.linear, hidden, targets, chunk_tokens)
        if fused is not None:
            return fused
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if recompute:
            parts.append(checkpoint(_token_logps, head_fn, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(head_fn, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def attention_input(model: torch.nn.Module, mask: Tensor) -> Tensor:
    """A layout's attention mask as the model's attention implementation takes it: a 2-D padding mask
    as is; a 4-D boolean mask (True = may attend) as is for SDPA, as an additive float mask for eager."""
    if mask.dim() == 4 and getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min)
    return mask


def supports_custom_layout(model: torch.nn.Module) -> bool:
    """Whether the model takes the 4-D masks and position ids of the prefix-shared and packed layouts
    (transformers models with SDPA or eager attention); others train with the plain padded layout."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    parts = split_model(model)
    forward = (parts[0] if parts else model).forward
    return impl in ("sdpa", "eager") and "position_ids" in inspect.signature(forward).parameters


def scored_logps(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None,
                 positions: Tensor, targets: Tensor, weights: Tensor, sequences: Tensor, num_sequences: int,
                 *, chunk_tokens: int | None = None) -> Tensor:
    """Weighted log-prob sums [num_sequences] (fp32) of the scored tokens of laid-out rows.

    Scored token k is ``targets[k]``, predicted by the hidden state at flat place ``positions[k]``
    (row · T + column), weighing ``weights[k]`` in the sum of sequence ``sequences[k]``.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_input(model, attention_mask), "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    parts = split_model(model)
    if parts is None:  # unknown layout: fall back to the full logits the model returns
        logits = model(**kwargs).logits
        hidden, head_fn, vocab = logits.flatten(0, 1)[positions], (lambda x: x), logits.shape[-1]
    else:
        backbone, head_fn = parts
        hidden = backbone(**kwargs).last_hidden_state.flatten(0, 1)[positions]
        vocab = model.config.vocab_size
    token_logps = chunked_token_logps(head_fn, hidden, targets, vocab, chunk_tokens)
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=input_ids.device)
    return sums.index_add(0, sequences, token_logps * weights.float())


def sequence_logps(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                   *, chunk_tokens: int | None = None) -> Tensor:
    """Weighted sum of log π(token | prefix) over the tokens ``loss_mask`` marks, per right-padded row: [B] fp32.

    ``loss_mask[b, t]`` is the weight of ``input_ids[b, t]`` in its row's sum: 1 on completion tokens,
    0 on the rest (prompt, padding), and for LD-DPO a weight α in between on a completion's tail (see
    ``dpolab.data.batching``). Position t is predicted by the hidden state at t − 1, so the first token
    of a row is never scored.
    """
    predict = loss_mask[:, 1:] != 0  # which next-token predictions count
    rows, cols = predict.nonzero(as_tuple=True)
    width = input_ids.shape[1]
    return scored_logps(model, input_ids, attention_mask, None, rows * width + cols, input_ids[:, 1:][predict],
                        loss_mask[:, 1:][predict], rows, input_ids.shape[0], chunk_tokens=chunk_tokens)


def batch_logps(model: torch.nn.Module, batch, *, chunk_tokens: int | None = None) -> Tensor:
    """Log-prob sums [2B] of a batch's sequences (first completions, then second ones), any layout."""
    return scored_logps(model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.score_positions,
                        batch.score_targets, batch.score_weights, batch.score_sequences, 2 * batch.num_pairs,
                        chunk_tokens=chunk_tokens)
