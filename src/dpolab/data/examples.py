"""KTO's unpaired examples as token ids, each with the mismatched completion of its KL row.

KTO's reference point z₀ estimates KL(π‖π_ref) from completions the policy was NOT asked for: the
example's own prompt followed by another example's completion. The partner is fixed once, here, with
a seeded shuffle, so that the reference log-probs of that row can be precomputed and cached like
every other; ``collate_examples`` puts both rows in the same forward pass. Tokenization follows the
rules of ``dpolab.data.tokenize`` exactly: the example and its KL completion are tokenized as a pair
sharing the prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dpolab.data.records import PreferencePair, UnpairedExample
from dpolab.data.tokenize import TokenizeStats, tokenize_pairs

PARTNER_TRIES = 16
"""How far along the shuffled order to look for a partner with another prompt and completion."""


@dataclass(frozen=True)
class TokenizedExample:
    """One unpaired example as token ids. The model sees ``prompt_ids + completion_ids`` (trained on) and
    ``prompt_ids + kl_completion_ids`` (scored only to estimate KL)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    kl_completion_ids: list[int]
    """Another example's completion, tokenized after this example's prompt."""
    label: bool
    """True for a desirable completion, False for an undesirable one."""
    index: int
    """Position of the example in the input list: a stable id, used as a cache key."""


def kl_partners(examples: list[UnpairedExample], seed: int) -> list[int]:
    """For each example, the position of the example whose completion forms its KL row.

    Examples are shuffled (seeded); each takes the first of the following ones (cyclically) with both
    another prompt and another completion, falling back to the next one. With one example it is its own
    partner.
    """
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partners = [0] * n
    for k, i in enumerate(order):
        following = [order[(k + step) % n] for step in range(1, min(PARTNER_TRIES, n - 1) + 1)] or [i]
        partners[i] = next((j for j in following if _unrelated(examples[i], examples[j])), following[0])
    return partners


def _unrelated(a: UnpairedExample, b: UnpairedExample) -> bool:
    return a.prompt != b.prompt and a.completion != b.completion


def tokenize_examples(examples: list[UnpairedExample], tokenizer, *, max_length: int, max_prompt_length: int,
                      seed: int = 0, show_progress: bool = False) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize unpaired examples with their KL completions; returns the kept examples and the stats.

    ``max_length`` bounds prompt + completion (and prompt + KL completion); an example whose prompt
    leaves no room is dropped as ``"prompt_too_long"``.
    """
    partners = kl_partners(examples, seed)
    pairs = [PreferencePair(e.prompt, e.completion, examples[j].completion, source=e.source, row=e.row)
             for e, j in zip(examples, partners)]
    tokenized, stats = tokenize_pairs(pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                      show_progress=show_progress, keep_identical=True)
    kept = [TokenizedExample(t.prompt_ids, t.chosen_ids, t.rejected_ids, examples[t.index].label, t.index)
            for t in tokenized]
    return kept, stats
