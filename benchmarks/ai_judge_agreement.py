"""How often does an AI judge agree with the demo's gold judge? And how much does asking both orders matter?

    python benchmarks/ai_judge_agreement.py [--task stories|reviews|both] [--prompts 200] [--seed 0]

For each task: the task's prompts, two samples per prompt from a policy, the pairs whose two samples
have different gold rewards (``dpolab.demo.grammar``), and an AI judge (``dpolab.ai_judge.AIJudge``)
with a short constitution. Printed per task: the agreement of the judge's both-orders vote with the
gold preference (± standard error over pairs; a vote of exactly ½ counts half), the agreement of each
single order alone, how often a single order picks the response shown first (position bias), and how
often the two orders pick the same response (consistency); and, as a control, the agreement under
the reversed principle ("Which story is sadder?"), which a judge that reads its principles turns
into 1 − its agreement under the real ones, and a judge that ignores them leaves about the same.

* ``stories``: prompts ``story_prompts``, gold ``story_reward`` (happy vs sad words), policy and judge
  the pretrained 260K-parameter TinyStories Llama at ``../shared/models/stories260K`` (the only
  pretrained LM available offline; read in place, never copied).
* ``reviews``: prompts ``review_prompts``, gold ``review_reward``, policy and judge the demo's own
  reviews π_ref (``dpolab.demo.base.build_reference``, the ``--quick`` size, cached under ``--cache``).

Both judge models are tiny and were never trained to answer questions, so agreement near ½ is the
expected honest result; the script exists to measure it, and to measure a bigger judge the same way
(``--judge-model DIR`` replaces the judge of both tasks).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from dpolab.ai_judge import AIJudge
from dpolab.constitution import Constitution
from dpolab.demo import grammar
from dpolab.evaluate import mean_stderr
from dpolab.generate import generate, load_for_inference

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K"

STORY_RULES = Constitution(
    principles=("Which story is happier?", "Which story has a nicer ending?"),
    template="{prompt}\n\nStory {label_first}: {first}\n\nStory {label_second}: {second}\n\n"
             "{principle} The answer is Story",
    source="benchmark: stories")
REVIEW_RULES = Constitution(
    principles=("Which review is more positive?", "Which review liked the movie more?"),
    template="{prompt}\n\nreview {label_first}: {first}\n\nreview {label_second}: {second}\n\n"
             "{principle} the answer is review",
    labels=("a", "b"), source="benchmark: reviews")


CONTROLS = {"stories": "Which story is sadder?", "reviews": "Which review is more negative?"}
"""A principle that reverses the task's: a judge that reads its principles agrees with gold 1 − as often."""


def agreement(probs: list[float], gold_first_better: list[bool]) -> list[float]:
    """Per pair: 1 when the vote picks the gold winner, 0 when it picks the loser, ½ for a vote of ½."""
    return [0.5 if p == 0.5 else float((p > 0.5) == g) for p, g in zip(probs, gold_first_better)]


def gold_pairs(policy, tokenizer, prompts: list[str], gold, *, max_new_tokens: int, seed: int):
    """(prompts, first, second, first-better) of the prompts whose two samples differ in gold reward."""
    drawn = generate(policy, tokenizer, prompts, num_samples=2, max_new_tokens=max_new_tokens, seed=seed,
                     batch_size=64, progress=True, desc="sampling")
    rewards = gold([s.prompt for s in drawn], [s.completion for s in drawn])
    out = ([], [], [], [])
    for i in range(len(prompts)):
        (a, ra), (b, rb) = (drawn[2 * i], rewards[2 * i]), (drawn[2 * i + 1], rewards[2 * i + 1])
        if ra != rb and a.completion != b.completion:
            for column, value in zip(out, (prompts[i], a.completion, b.completion, ra > rb)):
                column.append(value)
    return out


def measure(name: str, policy_dir: Path, judge_dir: Path, rules: Constitution, prompts: list[str], gold, args):
    start = time.perf_counter()
    device = torch.device(args.device)
    tokenizer, policy = load_for_inference(str(policy_dir), device)
    p, first, second, first_better = gold_pairs(policy, tokenizer, prompts, gold,
                                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    same = judge_dir == policy_dir
    judge_tok, judge_model = (tokenizer, policy) if same else load_for_inference(str(judge_dir), device)
    judge = AIJudge(judge_model, judge_tok, rules, batch_size=args.batch_size, progress=True)
    votes = judge.votes(p, first, second)
    n_rules = len(rules.principles)
    mean = lambda rows: [sum(r) / n_rules for r in rows]  # noqa: E731
    both = votes.aggregate("mean")
    ab, ba = mean(votes.first_order), mean(votes.second_order)
    print(f"\n== {name}: policy {policy_dir.name}, judge {judge_dir.name}, {len(prompts)} prompts -> "
          f"{len(p)} pairs with different gold rewards ({time.perf_counter() - start:.0f}s)")
    print(f"   constitution: {list(rules.principles)}; labels {list(rules.labels)}")
    rows = [("both orders (mean of principles)", agreement(both, first_better)),
            ("both orders (majority of principles)", agreement(votes.aggregate("majority"), first_better)),
            ("first order only (sample 1 shown as A)", agreement(ab, first_better)),
            ("second order only (sample 1 shown as B)", agreement(ba, first_better))]
    for k, principle in enumerate(rules.principles):
        rows.append((f"principle {k + 1}: {principle}", agreement([v[k] for v in votes.per_principle], first_better)))
    control = dataclasses.replace(rules, principles=(CONTROLS[name],))  # a reading judge: 1 − the above
    reversed_votes = AIJudge(judge_model, judge_tok, control, batch_size=args.batch_size).compare(p, first, second)
    rows.append((f"control, reversed: {CONTROLS[name]}", agreement(reversed_votes, first_better)))
    for label, values in rows:
        m, se = mean_stderr(values)
        print(f"   agreement with gold, {label:52s} {m:.3f} ± {se:.3f}")
    shown_first = [float(x > 0.5) for x in ab] + [float(x < 0.5) for x in ba]  # picks the response shown first
    consistent = [float((x > 0.5) == (y > 0.5)) for x, y in zip(ab, ba)]
    m, se = mean_stderr(shown_first)
    print(f"   single order picks the response shown first (position bias)          {m:.3f} ± {se:.3f}")
    m, se = mean_stderr(consistent)
    print(f"   both orders pick the same response (consistency)                     {m:.3f} ± {se:.3f}")
    m, se = mean_stderr([abs(x - 0.5) for x in both])
    print(f"   mean |P(first better) − ½| of the both-orders vote (confidence)      {m:.4f} ± {se:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("stories", "reviews", "both"), default="both")
    parser.add_argument("--prompts", type=int, default=200, help="prompts per task (two samples each)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--judge-model", type=Path, help="judge of both tasks (default: each task's policy)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench-cache",
                        help="where the reviews π_ref is trained once and cached")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.task in ("stories", "both"):
        if not STORIES.is_dir():
            print(f"ai_judge_agreement: {STORIES} is missing; the stories task needs ../shared beside the "
                  "repository (run with --task reviews without it)", file=sys.stderr)
            return 1
        prompts = grammar.story_prompts(args.prompts, args.seed + 1000)
        measure("stories", STORIES, args.judge_model or STORIES, STORY_RULES, prompts, grammar.story_reward, args)
    if args.task in ("reviews", "both"):
        from dpolab.demo.base import BaseSpec, build_reference

        reference = build_reference(BaseSpec(corpus_size=3000, steps=120, batch_size=32, seed=0), args.cache)
        prompts = grammar.review_prompts(args.prompts, args.seed + 2000)
        measure("reviews", reference, args.judge_model or reference, REVIEW_RULES, prompts, grammar.review_reward,
                args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
