"""Batches of tokenized records: ordering and collation.

A batch of B pairs holds 2B sequences, chosen (0..B-1) then rejected (B..2B-1), that go through the
model in one forward pass, laid out in rows as ``dpolab.data.layout`` describes (plain padded rows,
prefix-shared, packed). Each scored token has a weight: 1 on completion tokens, and for LD-DPO
(``ld_alpha`` < 1) α on the completion tokens past the shorter completion of the pair. KTO's unpaired
examples (``ExampleBatch``) have the same shape: each example, then the same prompt with another
example's completion for the KL estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .tokenize import TokenizedPair
from .examples import TokenizedExample
from .layout import Layout, Rows, build_rows


class _Rows:
    """What the loop asks of any batch: its item count, its tokens, and a copy on a device."""

    @property
    def num_pairs(self) -> int:
        """Items (pairs, or KTO examples) in the batch: the loop weighs every item the same."""
        return self.index.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens of the batch's sequences, prompt counted with each completion (2·|x| + |a| + |b| per item),
        whatever the layout: the same count for every layout, and the one other trainers report."""
        return self.tokens

    def to(self, device: torch.device | str):
        return type(self)(**{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                             for k, v in self.__dict__.items()})


@dataclass
class PairBatch(Rows, _Rows):
    """B pairs. In the plain layout, rows [0, B) hold prompt+chosen and rows [B, 2B) prompt+rejected."""

    index: Tensor = None            # [B] long, TokenizedPair.index of each pair (reference-cache key)
    chosen_lengths: Tensor = None   # [B] completion token counts
    rejected_lengths: Tensor = None  # [B]
    tokens: int = 0
    margins: Tensor = None           # [B] float, each pair's reward margin (0 where none); the reward loss uses it
    objective: Tensor = None        # [B] long, TokenizedPair.objective (-1: untagged; dpolab.objectives)


@dataclass
class ExampleBatch(Rows, _Rows):
    """KTO: B examples; each one's completion (sequence i) and, with the same prompt, its KL completion
    (sequence B + i: another example's completion, scored only to estimate KL(π‖π_ref))."""

    index: Tensor = None              # [B] long, TokenizedExample.index (reference-cache key)
    completion_lengths: Tensor = None  # [B]
    kl_lengths: Tensor = None          # [B]
    labels: Tensor = None              # [B] bool, True = desirable
    tokens: int = 0


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, *, ld_alpha: float = 1.0,
                  layout: Layout = Layout()) -> PairBatch:
    """Lay out B pairs in rows (the plain layout by default: chosen rows, then rejected rows).

    LD-DPO (Liu et al. 2024, 2409.06411): with ``ld_alpha`` α < 1, completion tokens past the shorter
    completion of the pair weigh α in the log-prob sum, log π̂(y|x) = Σ_{t ≤ ℓ} log π + α·Σ_{t > ℓ}
    log π with ℓ = min(|y_w|, |y_l|), which removes most of DPO's pull towards longer answers.
    """
    prompts = [p.prompt_ids for p in pairs]
    chosen, rejected = [p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs]
    shared = [min(len(a), len(b)) for a, b in zip(chosen, rejected)]

    def weights(completions):
        return [[1.0 if k < keep else ld_alpha for k in range(len(c))] for c, keep in zip(completions, shared)]

    rows = build_rows(prompts, chosen, rejected, weights(chosen), weights(rejected), pad_token_id, layout)
    return PairBatch(
        **vars(rows),
        index=torch.tensor([p.index for p in pairs], dtype=torch.long),
        chosen_lengths=torch.tensor([len(c) for c in chosen], dtype=torch.long),
        rejected_lengths=torch.tensor([len(c) for c in rejected], dtype=torch.long),
        tokens=sum(map(item_tokens, pairs)),
        margins=torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32),
        objective=torch.tensor([p.objective for p in pairs], dtype=torch.long),
    )


def collate_examples(examples: list[TokenizedExample], pad_token_id: int, *,
                     layout: Layout = Layout()) -> ExampleBatch:
    """Lay out B unpaired examples: each example, then its prompt with its KL completion."""
    prompts = [e.prompt_ids for e in examples]
    answers, kl = [e.completion_ids for e in examples], [e.kl_completion_ids for e in examples]
    ones = lambda seqs: [[1.0] * len(c) for c in seqs]  # noqa: E731
    rows = build_rows(prompts, answers, kl, ones(answers), ones(kl), pad_token_id, layout)
    return ExampleBatch(
        **vars(rows),
        index=torch.tensor([e.index for e in examples], dtype=torch.long),
        completion_lengths=torch.tensor([len(c) for c in answers], dtype=torch.long),
        kl_lengths=torch.tensor([len(c) for c in kl], dtype=torch.long),
        labels=torch.tensor([e.label for e in examples], dtype=torch.bool),
        tokens=sum(map(item_tokens, examples)),
    )


def collate(items: list, pad_token_id: int, *, ld_alpha: float = 1.0,
            layout: Layout = Layout()) -> PairBatch | ExampleBatch:
    """The batch for tokenized records: a ``PairBatch`` for pairs, an ``ExampleBatch`` for KTO examples."""
    if items and isinstance(items[0], TokenizedExample):
        return collate_examples(items, pad_token_id, layout=layout)
    return collate_pairs(items, pad_token_id, ld_alpha=ld_alpha, layout=layout)


def completions(item) -> tuple[list[int], list[int]]:
    """A record's two completions: (chosen, rejected) of a pair, (completion, KL completion) of a KTO example."""
    if isinstance(item, TokenizedExample):
        return item.completion_ids, item.kl_completion_ids
    return item.chosen_ids, item.rejected_ids


def row_length(item) -> int:
    """Tokens in the longer of a record's two rows (prompt + completion), to sort by length."""
    return len(item.prompt_ids) + max(map(len, completions(item)))


def item_tokens(item) -> int:
    """Tokens of a record counted as batches count them: the prompt with each completion."""
    first, second = completions(item)
    return 2 * len(item.prompt_ids) + len(first) + len(second)


def epoch_batches(num_items: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Item positions for each batch of one epoch; the order depends only on (seed, epoch)."""
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_items, generator=gen).tolist()
    else:
        order = list(range(num_items))
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]
