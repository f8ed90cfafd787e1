"""Multi-objective DPO on the demo's reviews task: a sweep over the objectives' weights traces a trade-off curve.

    python benchmarks/multi_objective.py [--quick] [--weights 0,0.25,0.5,0.75,1] [--out runs/multiobj]

The gold reward of the demo (``dpolab.demo.grammar.review_reward``) scores a verdict by the signed sum
of its sentiment words' weights, σ(Σ w / 2). Here that lexicon is split into two objectives that pull
apart: **positive**, the gold reward itself (the sign: how positive), and **calm**, exp(−Σ |w| / 4)
(the magnitude: how restrained; a word under a negation counts half, as in the gold reward). The best
verdict for one is not the best for the other: "superb ... highly recommended" is the most positive
and the least calm, "okay ... it is what it is" the calmest and neutral; mild praise ("good ... worth
a look") lies between.

π_ref is the demo's own reference policy (``dpolab.demo.base.build_reference``). It writes 4 verdicts
per held-in prompt, as ``dpolab.demo.pipeline.preference_data`` does; every two with different scores
make a pair ranked by each objective (``make_pairs``), tagged ``positive`` or ``calm`` in the data's
``objective`` column. One policy is trained per weight w of positive (calm gets 1 − w), with
``--objective positive=w --objective calm=1-w`` and otherwise the demo's settings (β = 1, lr 1e-3,
one epoch, batches of 32), and scored on held-out prompts: the mean of each objective over 4 samples
per prompt (± standard error over prompts), KL(π‖π_ref) by sampling, and the share of grammatical
verdicts. Prints the table and writes ``tradeoff.png`` (positive vs calm, one point per weight) and
``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dpolab.demo import grammar  # noqa: E402

_WORD = re.compile(r"[a-z']+")


def positive(prompts: list[str], completions: list[str]) -> list[float]:
    """Objective A: the demo's gold reward, P(positive) = σ(Σ w / 2)."""
    return grammar.review_reward(prompts, completions)


def calm(prompts: list[str], completions: list[str]) -> list[float]:
    """Objective B: exp(−Σ |w| / 4) over the same lexicon (a negated word counts half): 1 with no sentiment word."""
    out = []
    for text in completions:
        words = _WORD.findall(text.lower())
        total = 0.0
        for i, word in enumerate(words):
            weight = grammar.REVIEW_LEXICON.get(word)
            if weight is not None:
                negated = any(w in grammar.NEGATIONS for w in words[max(0, i - 2):i])
                total += abs(weight) * (0.5 if negated else 1.0)
        out.append(math.exp(-total / 4.0))
    return out


OBJECTIVES = {"positive": positive, "calm": calm}


def make_data(reference, tokenizer, args, out: Path) -> dict:
    """Pairs ranked by each objective on held-in prompts (tagged), the same on a few held-out prompts."""
    from dpolab.demo.pipeline import make_pairs, write_rows
    from dpolab.generate import generate

    train_prompts = grammar.review_prompts(args.train_prompts, args.seed)
    eval_prompts = grammar.review_prompts(args.eval_prompts, args.seed + 1, exclude=set(train_prompts))
    files = {}
    for split, prompts, seed in (("train", train_prompts, args.seed), ("eval", eval_prompts[:64], args.seed + 2)):
        samples = generate(reference, tokenizer, prompts, num_samples=4, max_new_tokens=40, seed=seed,
                           batch_size=128, progress=args.progress, desc=f"sampling π_ref ({split})")
        rows = []
        for name, judge in OBJECTIVES.items():
            scores = judge([s.prompt for s in samples], [s.completion for s in samples])
            rows += [{**r, "objective": name} for r in make_pairs(samples, scores, 4)]
        files[split] = write_rows(out / "data" / f"{split}.jsonl", rows)
        counts = {n: sum(r["objective"] == n for r in rows) for n in OBJECTIVES}
        print(f"{split}: {len(rows):,} pairs ({', '.join(f'{n} {c:,}' for n, c in counts.items())})")
    return {"files": files, "eval_prompts": eval_prompts}


def score(policy, reference, tokenizer, prompts: list[str], seed: int) -> dict:
    """Each objective's mean over 4 samples per held-out prompt (± stderr over prompts), KL, grammaticality."""
    from dpolab.evaluate import kl_by_sampling, mean_stderr
    from dpolab.generate import generate

    samples = generate(policy, tokenizer, prompts, num_samples=4, max_new_tokens=40, seed=seed, batch_size=128)
    row = {}
    for name, judge in OBJECTIVES.items():
        values = judge([s.prompt for s in samples], [s.completion for s in samples])
        per_prompt = [sum(values[i:i + 4]) / 4 for i in range(0, len(values), 4)]
        row[name], row[f"{name}_stderr"] = mean_stderr(per_prompt)
    row.update(kl_by_sampling(policy, reference, samples) if policy is not reference else {"kl": 0.0, "kl_stderr": 0.0})
    row["grammatical"] = sum(grammar.is_grammatical(s.completion) for s in samples) / len(samples)
    return row


def train_one(reference_dir: Path, data: dict, weight: float, args, out: Path):
    from dpolab.config import TrainConfig
    from dpolab.trainer import train

    config = TrainConfig(model=str(reference_dir), data=str(data["files"]["train"]),
                         eval_data=str(data["files"]["eval"]), output_dir=str(out / "policies" / f"w{weight:g}"),
                         objective=[f"positive={weight:g}", f"calm={1 - weight:g}"], beta=args.beta,
                         learning_rate=args.learning_rate, batch_size=32, epochs=1.0, warmup_ratio=0.1,
                         logging_steps=10, seed=args.seed, max_length=128, max_prompt_length=64,
                         precision="fp32", progress=args.progress)
    print(f"\n== w_positive = {weight:g}: dpolab train --model {config.model} --data {config.data} --eval-data "
          f"{config.eval_data} --objective positive={weight:g} --objective calm={1 - weight:g} --beta {args.beta} "
          f"--learning-rate {args.learning_rate} --batch-size 32")
    return train(config)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    policies = [r for r in rows if r["weight"] is not None]
    ax.errorbar([r["calm"] for r in policies], [r["positive"] for r in policies],
                xerr=[r["calm_stderr"] for r in policies], yerr=[r["positive_stderr"] for r in policies],
                fmt="o-", color="tab:blue", capsize=3, label="DPO, one policy per weight")
    for r in policies:
        ax.annotate(f"w={r['weight']:g}", (r["calm"], r["positive"]), textcoords="offset points", xytext=(6, 4))
    ref = next(r for r in rows if r["weight"] is None)
    ax.errorbar([ref["calm"]], [ref["positive"]], xerr=[ref["calm_stderr"]], yerr=[ref["positive_stderr"]],
                fmt="s", color="gray", capsize=3, label="π_ref")
    ax.set_xlabel("calm: exp(−Σ|w|/4), mean on held-out prompts")
    ax.set_ylabel("positive: gold reward σ(Σw/2)")
    ax.set_title("Multi-objective DPO: weight of 'positive' swept")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/multiobj", help="output folder (data, policies, plot, results)")
    parser.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="weights of 'positive' to sweep")
    parser.add_argument("--quick", action="store_true", help="the demo's quick π_ref and 64 held-in prompts")
    parser.add_argument("--train-prompts", type=int, default=None, help="held-in prompts (default 256; quick 64)")
    parser.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts for the scores")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    args.train_prompts = args.train_prompts or (64 if args.quick else 256)

    import torch

    from dpolab.demo.base import BaseSpec, build_reference
    from dpolab.generate import load_for_inference
    from dpolab.runtime import seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = BaseSpec(corpus_size=3000, steps=120, batch_size=32, seed=args.seed) if args.quick else BaseSpec(seed=args.seed)
    reference_dir = build_reference(spec, out / "cache", progress=args.progress)
    tokenizer, reference = load_for_inference(str(reference_dir), "cpu")
    data = make_data(reference, tokenizer, args, out)
    prompts = data["eval_prompts"]
    rows = [{"weight": None, "name": "π_ref", **score(reference, reference, tokenizer, prompts, args.seed + 3)}]
    for weight in [float(w) for w in args.weights.split(",")]:
        result = train_one(reference_dir, data, weight, args, out)
        row = {"weight": weight, "name": f"w={weight:g}", "steps": result.steps,
               **score(result.model.eval(), reference, tokenizer, prompts, args.seed + 3),
               **{k: result.eval_metrics.get(f"eval_objective/{n}/rewards/accuracies")
                  for n, k in (("positive", "acc_positive"), ("calm", "acc_calm"))}}
        rows.append(row)
        print(f"w_positive={weight:g}: positive {row['positive']:.3f}, calm {row['calm']:.3f}, KL {row['kl']:.2f}")
    print(f"\nheld-out prompts: {len(prompts)} x 4 samples; {time.perf_counter() - start:.0f}s in all\n")
    print(f"{'policy':8}  {'positive (gold)':15}  {'calm':15}  {'KL(π‖π_ref) nats':17}  {'pair acc. pos/calm':18}  "
          "grammatical")
    for r in rows:
        acc = "–" if r["weight"] is None else f"{r['acc_positive']:.2f} / {r['acc_calm']:.2f}"
        print(f"{r['name']:8}  {r['positive']:.3f} ± {r['positive_stderr']:.3f}    {r['calm']:.3f} ± "
              f"{r['calm_stderr']:.3f}    {r['kl']:5.2f} ± {r['kl_stderr']:.2f}       {acc:18}  "
              f"{r['grammatical']:.0%}")
    plot(rows, out / "tradeoff.png")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out / 'tradeoff.png'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
