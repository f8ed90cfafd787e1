"""Batches of tokenized pairs: ordering and collation.

A batch of B pairs becomes 2B right-padded rows, chosen first then rejected, so both completions go
through the model in one forward pass. ``loss_mask`` marks the completion tokens that are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .tokenize import TokenizedPair


@dataclass
class PairBatch:
    """2B rows: rows [0, B) hold prompt+chosen, rows [B, 2B) hold prompt+rejected."""

    input_ids: Tensor        # [2B, T] long
    attention_mask: Tensor   # [2B, T] long, 1 on real tokens
    loss_mask: Tensor        # [2B, T] long, 1 on completion tokens
    index: Tensor            # [B] long, TokenizedPair.index of each pair (reference-cache key)
    chosen_lengths: Tensor   # [B] completion token counts
    rejected_lengths: Tensor  # [B]

    @property
    def num_pairs(self) -> int:
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens the model processes for this batch."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> PairBatch:
    """Lay out B pairs as 2B right-padded sequences (right padding keeps position ids 0..n-1)."""
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(a) + len(b) for a, b in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(seqs):
        n, m = len(prompt), len(completion)
        input_ids[row, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
        attention[row, : n + m] = 1
        loss_mask[row, n : n + m] = 1
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        index=torch.tensor([p.index for p in pairs], dtype=torch.long),
        chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.long),
        rejected_lengths=torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.long),
    )


def epoch_batches(num_items: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Item positions for each batch of one epoch; the order depends only on (seed, epoch)."""
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_items, generator=gen).tolist()
    else:
        order = list(range(num_items))
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]
