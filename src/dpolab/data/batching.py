"""Batches of tokenized records: ordering and collation.

A batch of B pairs becomes 2B right-padded rows, chosen first then rejected, so both completions go
through the model in one forward pass. ``loss_mask`` holds the weight of each token in its row's
log-prob sum: 1 on completion tokens, 0 on prompt and padding, and for LD-DPO (``ld_alpha`` < 1) α
on the completion tokens past the shorter completion of the pair. KTO's unpaired examples use the
same two-halves layout (``ExampleBatch``): each example, then the same prompt with another example's
completion for the KL estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .tokenize import TokenizedPair
from .examples import TokenizedExample


class _Rows:
    """What the loop asks of any batch: its item count, its real tokens, and a copy on a device."""

    @property
    def num_pairs(self) -> int:
        """Items (pairs, or KTO examples) in the batch: the loop weighs every item the same."""
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens the model processes for this batch."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str):
        return type(self)(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


@dataclass
class PairBatch(_Rows):
    """2B rows: rows [0, B) hold prompt+chosen, rows [B, 2B) hold prompt+rejected."""

    input_ids: Tensor        # [2B, T] long
    attention_mask: Tensor   # [2B, T] long, 1 on real tokens
    loss_mask: Tensor        # [2B, T] float weight of each token in the log-prob sum (0 off the completion)
    index: Tensor            # [B] long, TokenizedPair.index of each pair (reference-cache key)
    chosen_lengths: Tensor   # [B] completion token counts
    rejected_lengths: Tensor  # [B]


@dataclass
class ExampleBatch(_Rows):
    """KTO: 2B rows: rows [0, B) hold prompt_i + completion_i, rows [B, 2B) prompt_i + the KL completion
    (another example's completion, scored only to estimate KL(π‖π_ref))."""

    input_ids: Tensor           # [2B, T] long
    attention_mask: Tensor      # [2B, T] long
    loss_mask: Tensor           # [2B, T] float, 1 on completion tokens
    index: Tensor               # [B] long, TokenizedExample.index (reference-cache key)
    completion_lengths: Tensor  # [B]
    kl_lengths: Tensor          # [B]
    labels: Tensor              # [B] bool, True = desirable


def _layout(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int, *,
            full_weight: list[int] | None = None, tail_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded rows prompt + completion (right padding keeps position ids 0..n-1).

    Returns input ids, attention mask and token weights: 1 on the first ``full_weight[row]``
    completion tokens (all of them by default), ``tail_weight`` on the rest, 0 elsewhere.
    """
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    weights = torch.zeros((len(prompts), width), dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        n, m = len(prompt), len(completion)
        input_ids[row, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
        attention[row, : n + m] = 1
        weights[row, n : n + m] = 1.0
        if full_weight is not None and full_weight[row] < m:
            weights[row, n + full_weight[row] : n + m] = tail_weight
    return input_ids, attention, weights


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, *, ld_alpha: float = 1.0) -> PairBatch:
    """Lay out B pairs as 2B right-padded sequences (chosen rows, then rejected rows).

    LD-DPO (Liu et al. 2024, 2409.06411): with ``ld_alpha`` α < 1, completion tokens past the shorter
    completion of the pair weigh α in the log-prob sum, log π̂(y|x) = Σ_{t ≤ ℓ} log π + α·Σ_{t > ℓ}
    log π with ℓ = min(|y_w|, |y_l|), which removes most of DPO's pull towards longer answers.
    """
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    shared = [min(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs] * 2
    input_ids, attention, weights = _layout(prompts, completions, pad_token_id, full_weight=shared,
                                            tail_weight=ld_alpha)
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=weights,
        index=torch.tensor([p.index for p in pairs], dtype=torch.long),
        chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long),
        rejected_lengths=torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.long),
    )


def collate_examples(examples: list[TokenizedExample], pad_token_id: int) -> ExampleBatch:
    """Lay out B unpaired examples as 2B rows: each example, then its prompt with its KL completion."""
    prompts = [e.prompt_ids for e in examples] * 2
    completions = [e.completion_ids for e in examples] + [e.kl_completion_ids for e in examples]
    input_ids, attention, weights = _layout(prompts, completions, pad_token_id)
    return ExampleBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=weights,
        index=torch.tensor([e.index for e in examples], dtype=torch.long),
        completion_lengths=torch.tensor([len(e.completion_ids) for e in examples], dtype=torch.long),
        kl_lengths=torch.tensor([len(e.kl_completion_ids) for e in examples], dtype=torch.long),
        labels=torch.tensor([e.label for e in examples], dtype=torch.bool),
    )


def collate(items: list, pad_token_id: int, *, ld_alpha: float = 1.0) -> PairBatch | ExampleBatch:
    """The batch for tokenized records: a ``PairBatch`` for pairs, an ``ExampleBatch`` for KTO examples."""
    if items and isinstance(items[0], TokenizedExample):
        return collate_examples(items, pad_token_id)
    return collate_pairs(items, pad_token_id, ld_alpha=ld_alpha)


def row_length(item) -> int:
    """Tokens in the longer of a record's two rows (prompt + completion), to sort by length."""
    if isinstance(item, TokenizedExample):
        return len(item.prompt_ids) + max(len(item.completion_ids), len(item.kl_completion_ids))
    return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))


def epoch_batches(num_items: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Item positions for each batch of one epoch; the order depends only on (seed, epoch)."""
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_items, generator=gen).tolist()
    else:
        order = list(range(num_items))
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]
