"""Online vs offline DPO on the demo's reviews task, for the same number of gradient steps.

    python benchmarks/online_dpo.py                  # π_ref of `dpolab demo --quick`, 40 steps of 32 pairs
    python benchmarks/online_dpo.py --steps 80 --seeds 0,1,2

π_ref is the demo's own small Llama (``dpolab.demo.base.build_reference``, quick-sized, cached under
--workdir). Both policies start from it and train with the same β, learning rate, schedule, batch size
and number of optimizer steps (``dpolab.train``, sigmoid loss):

* **offline**: pairs made once from π_ref's samples, the demo's recipe (4 samples per held-in prompt,
  every two with different gold rewards make a pair), shuffled in batches of --batch-size;
* **online**: ``--online --online-only``: before every step the current policy samples 2 completions
  for each of --batch-size held-in prompts and the gold judge (``review_reward``) picks chosen and
  rejected (ties make no pair, so a step may train on fewer pairs than offline).

Both are then evaluated like ``dpolab eval`` on held-out prompts (``evaluate_by_sampling``, one sample
per prompt, the same π_ref samples for both): gold reward ± standard error, KL(π‖π_ref) ± standard
error by sampling, win rate over π_ref. With several --seeds every row is one training seed.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path


def train_pair_data(reference, tokenizer, prompts, args, workdir: Path) -> Path:
    from dpolab.demo.grammar import review_reward
    from dpolab.demo.pipeline import make_pairs, write_rows
    from dpolab.generate import generate

    samples = generate(reference, tokenizer, prompts, num_samples=4, max_new_tokens=args.max_new_tokens,
                       seed=args.data_seed, batch_size=128)
    rows = make_pairs(samples, review_reward([s.prompt for s in samples], [s.completion for s in samples]), 4)
    print(f"offline data: {len(rows):,} pairs from {len(prompts)} held-in prompts x 4 π_ref samples")
    return write_rows(workdir / "offline.jsonl", rows)


def run(kind: str, seed: int, reference_dir: Path, data: Path, args, workdir: Path):
    import dpolab
    from dpolab.config import TrainConfig

    out = workdir / f"{kind}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    online = dict(online=True, online_only=True, judge="dpolab.demo.grammar:review_reward",
                  online_max_new_tokens=args.max_new_tokens) if kind == "online" else {}
    config = TrainConfig(model=str(reference_dir), data=str(data), output_dir=str(out), beta=args.beta,
                         learning_rate=args.learning_rate, batch_size=args.batch_size, max_steps=args.steps,
                         reference="model", max_length=128, max_prompt_length=64, precision="fp32", seed=seed,
                         logging_steps=max(1, args.steps // 4), progress=False, **online)
    start = time.perf_counter()
    with open(workdir / f"{kind}-seed{seed}.log", "w") as log, contextlib.redirect_stdout(log):  # keep the table clean
        result = dpolab.train(config)
    return result.model.eval(), time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of each policy")
    ap.add_argument("--batch-size", type=int, default=32, help="pairs (offline) / prompts (online) per step")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--train-prompts", type=int, default=512, help="held-in prompts (offline pairs, online prompts)")
    ap.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts for the evaluation")
    ap.add_argument("--seeds", default="0", help="comma list of training seeds")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of π_ref, the prompts and the offline data")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/dpolab-bench/online", help="π_ref cache, data and runs")
    args = ap.parse_args(argv)

    import torch

    from dpolab.demo.base import BaseSpec, build_reference
    from dpolab.demo.grammar import is_grammatical, review_prompts, review_reward
    from dpolab.evaluate import evaluate_by_sampling, mean_stderr
    from dpolab.generate import generate, load_for_inference

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = BaseSpec(corpus_size=3000, steps=120, batch_size=32, seed=args.data_seed)  # `dpolab demo --quick`
    reference_dir = build_reference(spec, workdir / "cache", progress=False)
    tokenizer, reference = load_for_inference(str(reference_dir), "cpu")
    train_prompts = review_prompts(args.train_prompts, args.data_seed)
    eval_prompts = review_prompts(args.eval_prompts, args.data_seed + 1, exclude=set(train_prompts))
    data = train_pair_data(reference, tokenizer, train_prompts, args, workdir)
    reference_samples = generate(reference, tokenizer, eval_prompts, max_new_tokens=args.max_new_tokens,
                                 seed=args.data_seed + 4, batch_size=128)
    print(f"{args.steps} steps x batch {args.batch_size}, β {args.beta}, lr {args.learning_rate}; "
          f"evaluated on {len(eval_prompts)} held-out prompts (gold judge review_reward)")
    header = (f"{'run':<16}{'seed':>5}{'gold reward':>20}{'KL (nats)':>18}{'win rate':>18}{'fluent':>8}"
              f"{'train s':>9}")
    print(header)
    print("-" * len(header))
    gold: dict[str, list[float]] = {"offline": [], "online": []}
    kl: dict[str, list[float]] = {"offline": [], "online": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        for kind in ("offline", "online"):
            policy, seconds = run(kind, seed, reference_dir, data, args, workdir)
            ev = evaluate_by_sampling(policy, reference, tokenizer, eval_prompts, judge=review_reward,
                                      max_new_tokens=args.max_new_tokens, seed=args.data_seed + 3, batch_size=128,
                                      reference_samples=reference_samples)
            m = ev.metrics
            fluent = sum(is_grammatical(s.completion) for s in ev.policy_samples) / len(ev.policy_samples)
            gold[kind].append(m["gold_reward_policy"])
            kl[kind].append(m["kl"])
            print(f"{kind:<16}{seed:>5}{m['gold_reward_policy']:>12.3f} ± {m['gold_reward_policy_stderr']:.3f}"
                  f"{m['kl']:>10.2f} ± {m['kl_stderr']:<5.2f}{m['win_rate']:>10.3f} ± {m['win_rate_stderr']:.3f}"
                  f"{fluent:>8.2f}{seconds:>9.1f}", flush=True)
    ref_fluent = sum(is_grammatical(s.completion) for s in reference_samples) / len(reference_samples)
    print(f"{'π_ref':<16}{'':>5}{m['gold_reward_reference']:>12.3f} ± {m['gold_reward_reference_stderr']:.3f}"
          f"{'':>36}{ref_fluent:>8.2f}")
    if len(gold["online"]) > 1:  # the spread over training seeds, besides the sampling error of each row
        for kind, values in gold.items():
            (mean, stderr), (kl_mean, kl_stderr) = mean_stderr(values), mean_stderr(kl[kind])
            print(f"{kind}: mean over {len(values)} seeds: gold reward {mean:.3f} ± {stderr:.3f}, "
                  f"KL {kl_mean:.2f} ± {kl_stderr:.2f}")
        wins = sum(on > off for on, off in zip(gold["online"], gold["offline"]))
        print(f"online above offline in {wins} of {len(gold['online'])} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
