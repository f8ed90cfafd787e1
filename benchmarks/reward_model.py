"""How well a Bradley–Terry reward model learns the demo's gold reward (reviews task).

The demo's own recipe for preference data (``dpolab.demo.pipeline``): π_ref (``dpolab.demo.base``)
writes ``--samples`` verdicts per prompt, the gold reward ``dpolab.demo.grammar:review_reward`` scores
them, every two with different rewards make a pair. A reward model is trained from π_ref's weights on
the held-in pairs with the code ``dpolab reward train`` runs, then measured on held-out prompts against
the gold reward:

* held-out pair accuracy (r_w > r_l on pairs labelled by the gold reward; ties ½);
* Spearman rank correlation of RM scores with gold rewards over all held-out samples;
* best-of-n: mean gold reward of the sample the RM ranks first per prompt, against a random sample
  (the mean) and the gold-best sample (the ceiling).

With ``--margin-scale S`` > 0 a second reward model is trained on the same pairs with a margin column,
S × (gold_w − gold_l). Prints the figures; the README's "Reward models" subsection quotes them.

    python benchmarks/reward_model.py              # about 2-3 minutes on 2 CPU cores with a cached π_ref
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dpolab.config import TrainConfig  # noqa: E402
from dpolab.demo import grammar  # noqa: E402
from dpolab.demo.base import BaseSpec, build_reference  # noqa: E402
from dpolab.demo.pipeline import MAX_LENGTH, MAX_PROMPT_LENGTH, make_pairs, write_rows  # noqa: E402
from dpolab.generate import generate, load_for_inference  # noqa: E402
from dpolab.reward import RewardModelJudge  # noqa: E402
from dpolab.trainer import train  # noqa: E402


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var


def sample(reference, tokenizer, prompts, n, seed, max_new_tokens):
    samples = generate(reference, tokenizer, prompts, num_samples=n, max_new_tokens=max_new_tokens, seed=seed,
                       batch_size=128, progress=False)
    return samples, grammar.review_reward([s.prompt for s in samples], [s.completion for s in samples])


def make_data(reference, tokenizer, out: Path, args, exclude: frozenset[str] = frozenset()) -> SimpleNamespace:
    """The demo's pairs: π_ref's samples of ``args.train_prompts`` prompts (seed ``args.seed``) and of
    ``args.eval_prompts`` other prompts, paired by the gold reward; written under ``out/data``. Prompts in
    ``exclude`` are skipped (e.g. another run's prompts, which the reward model must not see)."""
    train_prompts = grammar.review_prompts(args.train_prompts, args.seed, exclude=set(exclude))
    eval_prompts = grammar.review_prompts(args.eval_prompts, args.seed + 1, exclude=set(train_prompts) | set(exclude))
    samples, rewards = sample(reference, tokenizer, train_prompts, args.samples, args.seed, args.max_new_tokens)
    held, gold = sample(reference, tokenizer, eval_prompts, args.samples, args.seed + 2, args.max_new_tokens)
    train_rows, eval_rows = make_pairs(samples, rewards, args.samples), make_pairs(held, gold, args.samples)
    return SimpleNamespace(train_prompts=train_prompts, eval_prompts=eval_prompts, held=held, gold=gold,
                           train_rows=train_rows, eval_rows=eval_rows,
                           train_file=write_rows(out / "data" / "train.jsonl", train_rows),
                           eval_file=write_rows(out / "data" / "eval.jsonl", eval_rows))


def train_rm(reference_dir, train_file, eval_file, out, args, name):
    config = TrainConfig(model=str(reference_dir), data=str(train_file), eval_data=str(eval_file),
                         output_dir=str(out / name), loss="bradley_terry", prefix_sharing=False, packing=False,
                         learning_rate=args.learning_rate, batch_size=args.batch_size, epochs=args.epochs,
                         warmup_ratio=0.1, logging_steps=10, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                         precision="fp32", seed=args.seed, progress=False)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    print(f"\n== {name}: dpolab reward train --model {reference_dir} --data {train_file} --eval-data {eval_file} "
          f"--learning-rate {args.learning_rate} --batch-size {args.batch_size} --epochs {args.epochs} "
          f"--max-length {MAX_LENGTH} --max-prompt-length {MAX_PROMPT_LENGTH} --precision fp32")
    started = time.perf_counter()
    result = train(config)
    return result, time.perf_counter() - started


def measure(result, tokenizer, held, gold, n):
    """Figures of one trained reward model on the held-out samples (groups of ``n`` per prompt)."""
    judge = RewardModelJudge(result.model.eval(), tokenizer, batch_size=64, max_length=MAX_LENGTH,
                             max_prompt_length=MAX_PROMPT_LENGTH)
    scores = judge.score([s.prompt for s in held], [s.completion for s in held])
    picked = []
    for start in range(0, len(held), n):
        group = range(start, start + n)
        picked.append(gold[max(group, key=lambda i: scores[i])])
    return {"eval_accuracy": result.eval_metrics["eval_accuracy"], "eval_loss": result.eval_metrics["eval_loss"],
            "spearman": spearman(scores, gold), "best_of_n": sum(picked) / len(picked)}


def parser() -> argparse.ArgumentParser:
    """The options (``benchmarks/iterative_dpo.py --rm-judge`` takes their defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/bench-reward-model")
    parser.add_argument("--cache-dir", default="runs/demo/cache", help="where π_ref is cached (the demo's by default)")
    parser.add_argument("--train-prompts", type=int, default=256)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--margin-scale", type=float, default=0.0, help="> 0: also train with margin = S x gold gap")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.output_dir)
    reference_dir = build_reference(BaseSpec(seed=args.seed), Path(args.cache_dir), progress=False)
    tokenizer, reference = load_for_inference(str(reference_dir), torch.device("cpu"))
    data = make_data(reference, tokenizer, out, args)
    train_rows, eval_rows, train_file, eval_file = data.train_rows, data.eval_rows, data.train_file, data.eval_file
    held, gold = data.held, data.gold
    print(f"data: {len(train_rows):,} training pairs from {len(data.train_prompts)} prompts x {args.samples} "
          f"samples; {len(eval_rows):,} held-out pairs from {len(data.eval_prompts)} other prompts")
    runs = [("rm", train_file)]
    if args.margin_scale > 0:
        rows = [{**r, "margin": args.margin_scale * (r["chosen_reward"] - r["rejected_reward"])} for r in train_rows]
        runs.append((f"rm-margin{args.margin_scale:g}", write_rows(out / "data" / "train-margin.jsonl", rows)))
    table = []
    for name, file in runs:
        result, seconds = train_rm(reference_dir, file, eval_file, out, args, name)
        table.append({"name": name, "steps": result.steps, "seconds": round(seconds, 1),
                      **measure(result, tokenizer, held, gold, args.samples)})
    n = args.samples
    random_pick = sum(gold) / len(gold)
    oracle = sum(max(gold[i:i + n]) for i in range(0, len(gold), n)) / (len(gold) // n)
    print(f"\nheld-out: {len(eval_rows):,} pairs, {len(held):,} samples of {len(data.eval_prompts)} prompts; "
          f"gold reward of a random sample {random_pick:.3f}, of the gold-best of {n} {oracle:.3f}")
    print(f"{'model':16s} {'steps':>5s} {'train s':>7s} {'pair acc.':>9s} {'eval loss':>9s} {'Spearman':>8s} "
          f"{'best-of-' + str(n) + ' gold':>15s}")
    for row in table:
        print(f"{row['name']:16s} {row['steps']:5d} {row['seconds']:7.1f} {row['eval_accuracy']:9.3f} "
              f"{row['eval_loss']:9.4f} {row['spearman']:8.3f} {row['best_of_n']:15.3f}")
    (out / "results.json").write_text(json.dumps({"runs": table, "random": random_pick, "oracle": oracle,
                                                  "args": vars(args)}, indent=1))
    print(f"\ntotal {time.perf_counter() - started:.0f}s; results in {out / 'results.json'}")


if __name__ == "__main__":
    random.seed(0)
    main()
