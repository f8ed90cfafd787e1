"""Prompts → preference pairs: sample a policy, rank each prompt's samples with a judge, pair them.

The path shared by ``dpolab label``, iterative DPO (``dpolab iterate``) and online DPO
(``dpolab train --online``): N samples per prompt from the policy (batched, seeded), one judge
(``dpolab.judges``), and per prompt the best sample as ``chosen`` and the worst as ``rejected``
(``pairs="best-worst"``), or every two samples with different scores (``pairs="all"``). Prompts
whose samples all score the same, or are all the same text, give no pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .generate import Sample, generate
from .judges import Judge, rank_groups

PairRule = Literal["best-worst", "all"]


@dataclass(frozen=True)
class Labelled:
    """What one labelling pass produced: the pair rows and the scores of every sample."""

    rows: list[dict]
    """One dict per pair: prompt, chosen, rejected, chosen_score, rejected_score (``dpolab train`` reads it)."""
    samples: list[Sample]
    scores: list[float]
    """The judge's score of each sample (for pairwise judges: its mean win probability in its group)."""


def pair_rows(prompts: list[str], groups: list[list[str]], scores: list[list[float]],
              rule: PairRule = "best-worst") -> list[dict]:
    """Pair rows from each prompt's completions and scores; ties and identical texts make no pair."""
    rows = []
    for prompt, texts, marks in zip(prompts, groups, scores):
        ranked = sorted(range(len(texts)), key=lambda i: -marks[i])  # stable: ties keep sampling order
        if rule == "best-worst":
            candidates = [(ranked[0], ranked[-1])] if len(ranked) >= 2 else []
        else:
            candidates = [(ranked[a], ranked[b]) for a in range(len(ranked)) for b in range(a + 1, len(ranked))]
        for w, l in candidates:
            if marks[w] == marks[l] or texts[w] == texts[l]:
                continue
            rows.append({"prompt": prompt, "chosen": texts[w], "rejected": texts[l],
                         "chosen_score": marks[w], "rejected_score": marks[l]})
    return rows


def label_pairs(policy, tokenizer, prompts: list[str], judge: Judge, *, samples: int = 4,
                max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64, temperature: float = 1.0,
                top_p: float = 1.0, rule: PairRule = "best-worst", progress: bool = False) -> Labelled:
    """Sample ``samples`` completions of every prompt from ``policy``, rank them with ``judge``, pair them."""
    if samples < 2:
        raise ValueError("labelling needs at least 2 samples per prompt to make a pair")
    drawn = generate(policy, tokenizer, prompts, num_samples=samples, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, progress=progress,
                     desc="sampling for labels")
    return label_samples(prompts, drawn, judge, samples=samples, rule=rule)


def label_samples(prompts: list[str], drawn: list[Sample], judge: Judge, *, samples: int,
                  rule: PairRule = "best-worst") -> Labelled:
    """Rank already drawn samples (``samples`` per prompt, in prompt order, as ``generate`` returns them)
    with ``judge`` and pair them; several judges can label the same samples this way."""
    if len(drawn) != samples * len(prompts):
        raise ValueError(f"expected {samples} samples for each of {len(prompts)} prompts, got {len(drawn)}")
    groups = [[s.completion for s in drawn[i * samples:(i + 1) * samples]] for i in range(len(prompts))]
    scores = rank_groups(judge, prompts, groups)
    return Labelled(pair_rows(prompts, groups, scores, rule), drawn, [x for row in scores for x in row])
