"""Judges: one interface for everything that says which completion is better.

A judge scores one completion (``score``: a reward, higher is better) or compares two
(``compare``: the probability that the first is better). Three kinds build on it:

* a Python function ``module:function`` taking (prompts, completions) and returning rewards, e.g.
  the demo's gold reward ``dpolab.demo.grammar:review_reward`` (``CallableJudge``);
* a trained Bradley–Terry reward model (``dpolab.reward``);
* an AI judge: a causal LM asked, for each principle of a constitution, which of two responses
  follows it better (``dpolab.ai_judge``); it only compares.

Labelling, iterative and online DPO rank a prompt's samples with ``rank_groups``, which works for
both kinds: pointwise judges score each sample, pairwise judges compare every two of a group.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from .errors import ConfigError


class Judge:
    """Base class: override ``score`` (pointwise judges) or ``compare`` (pairwise judges), or both."""

    name: str = "judge"
    pointwise: bool = True
    """True when ``score`` is available; a pairwise-only judge sets it False."""

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        raise NotImplementedError(f"{self.name} compares two completions; it does not score one")

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        """P(first is better than second) per prompt; from scores: 1, 0, or ½ on a tie."""
        a, b = self.score(prompts, first), self.score(prompts, second)
        return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


class CallableJudge(Judge):
    """A function (prompts, completions) -> rewards, checked to give one finite number per completion."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]], name: str = "callable"):
        self.fn, self.name = fn, name

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return checked_rewards(self.fn(list(prompts), list(completions)), len(completions), self.name)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        """A judge is also a reward function, so ``dpolab.evaluate`` can use it directly."""
        return self.score(prompts, completions)


def checked_rewards(rewards, expected: int, name: str) -> list[float]:
    rewards = list(rewards)
    if len(rewards) != expected or not all(isinstance(r, (int, float)) and math.isfinite(r) for r in rewards):
        raise ConfigError("judge", f"{name} must return one finite number per completion ({expected} expected, "
                          f"got {len(rewards)})", "return a list of floats, one per (prompt, completion)")
    return [float(r) for r in rewards]


def rank_groups(judge: Judge, prompts: list[str], groups: list[list[str]]) -> list[list[float]]:
    """One score per completion of each prompt's group, higher is better.

    Pointwise judges: their scores (one call for all groups). Pairwise judges: each completion's mean
    probability of beating the others of its group (every two compared once; ``compare`` is expected
    to cancel position bias itself), so a group of two gets (p, 1 − p).
    """
    if len(prompts) != len(groups):
        raise ValueError("rank_groups needs one group of completions per prompt")
    if judge.pointwise:
        flat_prompts = [p for p, g in zip(prompts, groups) for _ in g]
        flat = judge.score(flat_prompts, [c for g in groups for c in g])
        out, start = [], 0
        for g in groups:
            out.append(flat[start:start + len(g)])
            start += len(g)
        return out
    jobs = [(k, i, j) for k, g in enumerate(groups) for i in range(len(g)) for j in range(i + 1, len(g))]
    wins = [[0.0] * len(g) for g in groups]
    if jobs:
        probs = judge.compare([prompts[k] for k, _, _ in jobs], [groups[k][i] for k, i, _ in jobs],
                              [groups[k][j] for k, _, j in jobs])
        for (k, i, j), p in zip(jobs, probs):
            wins[k][i] += p
            wins[k][j] += 1.0 - p
    return [[w / max(1, len(g) - 1) for w in row] for row, g in zip(wins, groups)]


def load_judge(spec: str, *, device: str = "auto", constitution: str | None = None, batch_size: int = 16) -> Judge:
    """A judge from its command-line spec:

    * ``module:function`` — a reward function (``CallableJudge``), e.g. ``dpolab.demo.grammar:review_reward``;
    * a folder holding a reward model that ``dpolab reward train`` saved (``dpolab.reward.RewardModelJudge``);
    * ``ai:MODEL`` — a causal LM judging by the principles of ``constitution`` (``dpolab.ai_judge.AIJudge``).
    """
    from pathlib import Path

    if spec.startswith("ai:"):
        from .ai_judge import AIJudge

        return AIJudge.load(spec[3:], constitution=constitution, device=device, batch_size=batch_size)
    if Path(spec).is_dir():
        from .reward import RewardModelJudge

        return RewardModelJudge.load(spec, device=device, batch_size=batch_size)
    from .evaluate import load_judge as load_function

    return CallableJudge(load_function(spec), name=spec)
