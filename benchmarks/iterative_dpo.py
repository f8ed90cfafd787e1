"""Iterative vs offline DPO on the demo's reviews task (gold reward known exactly): figures, not a test.

    python benchmarks/iterative_dpo.py                                  # gold judge, seeds 0,1,2
    python benchmarks/iterative_dpo.py --judge runs/rm/final            # a reward model labels the pairs
    python benchmarks/iterative_dpo.py --offline-betas 1,2,4 --seeds 0  # offline β sweep: compare at similar KL
    python benchmarks/iterative_dpo.py --rm-judge                       # gold judge vs a learned reward model

Every run is ``dpolab iterate --demo`` in process (``dpolab.iterate.iterate``): the demo's self-trained
π_ref (cached under --workdir), the same 3·P training prompts and the same held-out prompts for all runs,
evaluation always by the gold reward (``--judge`` only chooses who labels the training pairs):

- offline: one round on all 3·P prompts, pairs from π_ref's samples, then DPO;
- iterative (reference previous / initial): three rounds of P new prompts each, pairs from the current
  policy's samples, DPO from the previous round's weights.

Budgets match: every run samples N completions on each of the same 3·P prompts and makes one
(best, worst) pair per prompt, so the runs train on about the same number of pairs with the same batch
size and one epoch: the same total number of gradient steps (the table prints them), split into three
rounds (each with its own warmup and cosine decay) or done in one. Same β, learning rate and batch.
Reported per round: gold reward of one sample per held-out prompt ± standard error, KL(π‖π_0) by sampling
± standard error, win rate over π_0's samples, and the share of grammatical verdicts.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules (reward_model, _rm_judge)


def run(workdir: Path, name: str, seed: int, args, judge: str | None = None, **options) -> list[dict]:
    from dpolab.iterate import iterate

    config = make_config(workdir, name, seed, args, judge, **options)
    if args.verbose:
        return iterate(config)
    log = Path(config.output_dir + ".log")  # the training runs print their own lines: keep them in a file
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        return iterate(config)


def make_config(workdir: Path, name: str, seed: int, args, judge: str | None = None, **options):
    from dpolab.iterate_cli import IterateConfig

    return IterateConfig(demo=True, output_dir=str(workdir / f"seed{seed}" / name), cache_dir=str(workdir / "cache"),
                           judge=judge, seed=seed, samples_per_prompt=args.samples_per_prompt,
                           eval_prompt_count=args.eval_prompts, learning_rate=args.learning_rate,
                           progress=False, **options)


def folder_name(name: str) -> str:
    return name.replace(" ", "").replace(",", "-").replace("=", "")


def fmt(mean, err, digits=3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f} ± {err:.{digits}f}" if err is not None and not math.isnan(err) else f"{mean:.{digits}f}"


def table(results: dict[str, list[dict]]) -> None:
    head = f"{'run':34s} {'round':>5s} {'pairs':>5s} {'steps':>5s}  {'gold reward':15s} {'KL(π‖π_0) nats':15s} " \
           f"{'win rate vs π_0':15s} {'grammatical':>11s}"
    print(head)
    print("-" * len(head))
    for i, (name, rows) in enumerate(results.items()):
        steps = 0
        for r in rows[(1 if i else 0):]:  # round 0 (π_0 itself) is the same in every run: once
            steps += r["steps"]
            label = "π_0" if r["round"] == 0 else name
            print(f"{label:34s} {r['round']:5d} {r['pairs']:5d} {steps:5d}  "
                  f"{fmt(r['judge_reward'], r['judge_reward_stderr']):15s} {fmt(r['kl'], r['kl_stderr'], 2):15s} {fmt(r['win_rate_vs_initial'], r['win_rate_stderr']):15s} "
                  f"{r.get('grammatical', math.nan):11.0%}")


def mean_of(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", default=None, help="who labels the training pairs (module:function, reward-model "
                    "folder, ai:MODEL); default: the gold reward. Evaluation is always by the gold reward")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the iterative runs")
    ap.add_argument("--prompts-per-round", type=int, default=256, help="P: new prompts per iterative round "
                    "(the offline run gets rounds x P at once)")
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="N: samples per prompt")
    ap.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts")
    ap.add_argument("--beta", type=float, default=1.0, help="β of every run (the demo's)")
    ap.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (the demo's)")
    ap.add_argument("--offline-betas", default="", help="extra β values for offline runs (e.g. 2,4): where the "
                    "offline frontier passes the iterative run's KL")
    ap.add_argument("--offline-epochs", default="", help="extra offline runs at --beta with more epochs (e.g. "
                    "2,3; more steps than the iterative runs): the offline frontier at larger KL")
    ap.add_argument("--no-initial", action="store_true", help="skip the iterative run with reference = π_0")
    ap.add_argument("--seeds", default="0,1,2", help="seeds (π_ref, prompts, sampling, training) to average over")
    ap.add_argument("--workdir", default="/tmp/dpolab-bench/iterative", help="π_ref cache and run folders")
    ap.add_argument("--verbose", action="store_true", help="print every run's log")
    ap.add_argument("--rm-judge", action="store_true", help="instead of the offline comparison: train a reward "
                    "model per seed as benchmarks/reward_model.py does (π_ref's samples of 256 prompts paired by the "
                    "gold reward) and run the iterative arm (ref previous) with the gold judge and with it")
    ap.add_argument("--rm-prompts", choices=("disjoint", "shared"), default="disjoint", help="--rm-judge: the "
                    "reward model's 256 prompts avoid every prompt of the iterative runs (disjoint), or are "
                    "benchmarks/reward_model.py's own, which are round 1's training prompts (shared); never "
                    "held-out ones")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.rm_judge:
        from _rm_judge import compare_judges

        return compare_judges(args)
    workdir = Path(args.workdir)
    seeds = [int(s) for s in args.seeds.split(",")]
    P, K = args.prompts_per_round, args.rounds
    runs = {f"offline β={args.beta:g}": dict(rounds=1, prompts_per_round=K * P, beta=args.beta)}
    for b in filter(None, (x.strip() for x in args.offline_betas.split(","))):
        runs[f"offline β={float(b):g}"] = dict(rounds=1, prompts_per_round=K * P, beta=float(b))
    for e in filter(None, (x.strip() for x in args.offline_epochs.split(","))):
        runs[f"offline β={args.beta:g}, {float(e):g} epochs"] = dict(rounds=1, prompts_per_round=K * P, beta=args.beta,
                                                                  epochs=float(e))
    runs[f"iterative β={args.beta:g}, ref previous"] = dict(rounds=K, prompts_per_round=P, beta=args.beta)
    if not args.no_initial:
        runs[f"iterative β={args.beta:g}, ref initial"] = dict(rounds=K, prompts_per_round=P, beta=args.beta,
                                                               reference_policy="initial")
    print(f"demo reviews task; judge for the pairs: {args.judge or 'gold reward'}; evaluation: gold reward on "
          f"{args.eval_prompts} held-out prompts; {K}x{P} training prompts, {args.samples_per_prompt} samples each, "
          f"best-worst pairs, batch 32, lr {args.learning_rate:g}, 1 epoch per round; seeds {seeds}")
    finals: dict[str, list[dict]] = {name: [] for name in runs}
    nearest: dict[str, list[tuple[str, dict, dict]]] = {name: [] for name in runs if name.startswith("iterative")}
    for seed in seeds:
        results = {}
        for name, options in runs.items():
            started = time.perf_counter()
            results[name] = run(workdir, folder_name(name), seed, args, judge=args.judge, **options)
            finals[name].append(results[name][-1])
            print(f"  seed {seed}: {name} done in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        print(f"\nseed {seed}:")
        table(results)
        offline = [(name, rows[-1]) for name, rows in results.items() if name.startswith("offline")]
        for name in nearest:  # the offline run whose KL is closest to this iterative run's last round
            last = results[name][-1]
            other, row = min(offline, key=lambda item: abs(item[1]["kl"] - last["kl"]))
            nearest[name].append((other, row, last))
    print(f"\nlast round, mean over seeds {seeds} (± standard error across seeds):")
    print(f"{'run':34s} {'gold reward':15s} {'KL(π‖π_0) nats':15s} {'win rate vs π_0':15s} {'grammatical':>11s}")
    for name, rows in finals.items():
        reward, kl, win = (mean_of([r[k] for r in rows]) for k in ("judge_reward", "kl", "win_rate_vs_initial"))
        gram = mean_of([r.get("grammatical", math.nan) for r in rows])[0]
        print(f"{name:34s} {fmt(*reward):15s} {fmt(*kl, 2):15s} {fmt(*win):15s} {gram:11.0%}")
    print("\neach iterative run's last round vs the offline run with the closest KL (same seed):")
    for name, matches in nearest.items():
        for seed, (other, row, last) in zip(seeds, matches):
            print(f"  seed {seed}: {name}: reward {last['judge_reward']:.3f} at KL {last['kl']:.2f}; {other}: "
                  f"{row['judge_reward']:.3f} at KL {row['kl']:.2f}; difference "
                  f"{last['judge_reward'] - row['judge_reward']:+.3f}")
        diff = mean_of([last["judge_reward"] - row["judge_reward"] for _, row, last in matches])
        print(f"  {name}: mean reward difference {fmt(*diff)} (± standard error across seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
