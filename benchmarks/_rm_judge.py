"""``benchmarks/iterative_dpo.py --rm-judge``: iterative DPO labelled by a learned reward model vs the gold judge.

Per seed: a Bradley–Terry reward model is trained exactly as ``benchmarks/reward_model.py`` trains it
(its ``make_data``/``train_rm``/``measure``: π_ref's 4 samples of each of 256 prompts drawn with the
seed, paired by the gold reward, 2 epochs from π_ref's weights), then the iterative arm (reference =
previous policy) runs twice on the same π_ref, training prompts, held-out prompts and sampling seeds:
once with the gold judge labelling the pairs, once with the reward model. Evaluation is by the gold
reward in both. The RM's training prompts are checked against the runs' held-out prompts (none may be
among them; the overlap with the training rounds is printed).

Reported per round and judge: gold reward ± stderr, KL(π‖π_0), win rate vs π_0, the RM's own mean score
of the same held-out samples (is the learned judge's score running ahead of the gold reward?), the
Spearman correlation of RM and gold scores on those samples, and how often RM and gold order the round's
training pairs the same way (gold arm: the RM's accuracy on gold-made pairs; RM arm: the gold reward's
agreement with the RM-made pairs; ties ½).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import iterative_dpo as it
import reward_model as rmb


def run_prompts(workdir: Path, name: str, seed: int, args) -> tuple[list[str], list[str]]:
    """The iterative runs' training and held-out prompts, as ``dpolab iterate --demo`` resolves them."""
    from dpolab.iterate import resolve

    setup = resolve(it.make_config(workdir, name, seed, args, None, rounds=args.rounds,
                                   prompts_per_round=args.prompts_per_round, beta=args.beta), say=lambda *a: None)
    return setup.train_prompts, setup.eval_prompts


def train_reward_model(workdir: Path, seed: int, mode: str, exclude: frozenset[str]) -> tuple[Path, dict]:
    """The seed's reward model (reused when its folder and figures exist): (its final/ folder, figures).
    Its prompts skip ``exclude``."""
    import torch

    from dpolab.demo.base import BaseSpec, build_reference
    from dpolab.demo.pipeline import idle_cores
    from dpolab.generate import load_for_inference

    out = workdir / f"seed{seed}" / f"rm-{mode}"
    final, info_path = out / "rm" / "final", out / "rm.json"
    if final.is_dir() and info_path.exists():
        return final, json.loads(info_path.read_text())
    args = rmb.parser().parse_args(["--seed", str(seed), "--cache-dir", str(workdir / "cache"),
                                    "--output-dir", str(out)])
    torch.set_num_threads(idle_cores(torch.get_num_threads()))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rm.log", "w") as log, contextlib.redirect_stdout(log):
        reference_dir = build_reference(BaseSpec(seed=seed), workdir / "cache", progress=False)
        tokenizer, reference = load_for_inference(str(reference_dir), torch.device("cpu"))
        data = rmb.make_data(reference, tokenizer, out, args, exclude)
        result, _ = rmb.train_rm(reference_dir, data.train_file, data.eval_file, out, args, "rm")
        figures = rmb.measure(result, tokenizer, data.held, data.gold, args.samples)
    info = {"train_prompts": data.train_prompts, "pairs": len(data.train_rows), "eval_pairs": len(data.eval_rows),
            "eval_prompt_count": len(data.eval_prompts), "steps": result.steps, **figures,
            "seconds": round(time.perf_counter() - started, 1)}
    info_path.write_text(json.dumps(info))
    return final, info


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def agreement(first: list[float], second: list[float]) -> float:
    """Share of pairs where ``first`` (chosen) beats ``second`` (rejected); ties ½."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(first, second)) / len(first)


def add_rm_figures(rows: list[dict], folder: Path, rm, arm: str) -> None:
    """Per round: the RM's mean score of the held-out samples, its Spearman with gold there, and how often
    RM and gold order the round's training pairs alike."""
    from dpolab.demo.grammar import review_reward

    for row in rows:
        k = row["round"]
        samples = read_jsonl(folder / f"round-{k}" / "eval_samples.jsonl")
        prompts, texts, gold = ([s[key] for s in samples] for key in ("prompt", "completion", "score"))
        scores = rm.score(prompts, texts)
        row["rm_score"], row["rm_gold_spearman"] = sum(scores) / len(scores), rmb.spearman(scores, gold)
        row["pair_agreement"] = float("nan")
        if k == 0:
            continue
        pairs = read_jsonl(folder / f"round-{k}" / "pairs.jsonl")
        prompts = [p["prompt"] for p in pairs]
        if arm == "gold":  # pairs made by gold: does the RM order them the same way?
            first, second = (rm.score(prompts, [p[key] for p in pairs]) for key in ("chosen", "rejected"))
        else:  # pairs made by the RM: does gold agree?
            first, second = (review_reward(prompts, [p[key] for p in pairs]) for key in ("chosen", "rejected"))
        row["pair_agreement"] = agreement(first, second)


def check_prompts(rm_prompts: list[str], folder: Path, rounds: int) -> str:
    """Refuse RM training prompts among the held-out ones; return how many of them each round trained on."""
    held = {s["prompt"] for s in read_jsonl(folder / "round-0" / "eval_samples.jsonl")}
    clash = held & set(rm_prompts)
    if clash:
        raise SystemExit(f"{len(clash)} of the reward model's training prompts are held-out prompts of {folder}")
    trained = [{p["prompt"] for p in read_jsonl(folder / f"round-{k}" / "pairs.jsonl")} for k in range(1, rounds + 1)]
    return " / ".join(str(len(set(rm_prompts) & prompts)) for prompts in trained)


ARMS = ("gold", "RM")
COLUMNS = f"{'round':>5s} {'judge':5s}  {'gold reward':15s} {'KL(π‖π_0) nats':15s} {'win rate vs π_0':15s} " \
          f"{'RM score':15s} {'Spearman RM~gold':16s} {'RM=gold on pairs':16s}"


def print_round(k: int, arm: str, rows: list[dict]) -> None:
    """One line: a single run's row, or (several rows: seeds) mean ± standard error across them."""
    def cell(key, err_key=None, digits=3):
        values = [r[key] for r in rows]
        if any(v != v for v in values):
            return "–"
        if len(rows) == 1:
            return it.fmt(values[0], rows[0][err_key] if err_key else None, digits)
        return it.fmt(*it.mean_of(values), digits)

    print(f"{k:5d} {arm:5s}  {cell('judge_reward', 'judge_reward_stderr'):15s} {cell('kl', 'kl_stderr', 2):15s} "
          f"{cell('win_rate_vs_initial', 'win_rate_stderr'):15s} {cell('rm_score', None, 2):15s} "
          f"{cell('rm_gold_spearman'):16s} {cell('pair_agreement'):16s}")


def compare_judges(args) -> int:
    from dpolab.reward import RewardModelJudge

    workdir, seeds = Path(args.workdir), [int(s) for s in args.seeds.split(",")]
    P, K, beta = args.prompts_per_round, args.rounds, args.beta
    name = it.folder_name(f"iterative β={beta:g}, ref previous")
    print(f"demo reviews task, iterative DPO (reference = previous policy), {K} rounds x {P} new prompts, "
          f"{args.samples_per_prompt} samples each, best-worst pairs, β {beta:g}, batch 32, "
          f"lr {args.learning_rate:g}; pairs labelled by the gold reward or by a reward model ({args.rm_prompts} "
          f"prompts); evaluation: gold reward on {args.eval_prompts} held-out prompts; seeds {seeds}")
    results: dict[str, list[list[dict]]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        started = time.perf_counter()
        train, held = run_prompts(workdir, name, seed, args)
        exclude = frozenset(held) | frozenset(train) if args.rm_prompts == "disjoint" else frozenset()
        final, info = train_reward_model(workdir, seed, args.rm_prompts, exclude)
        print(f"  seed {seed}: reward model ready in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        folders = {"gold": workdir / f"seed{seed}" / name,
                   "RM": workdir / f"seed{seed}" / f"{name}-rmjudge-{args.rm_prompts}"}
        for arm, judge in (("gold", None), ("RM", str(final))):
            started = time.perf_counter()
            results[arm].append(it.run(workdir, folders[arm].name, seed, args, judge=judge, rounds=K,
                                       prompts_per_round=P, beta=beta))
            print(f"  seed {seed}: {arm} judge done in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        overlap = {arm: check_prompts(info["train_prompts"], folders[arm], K) for arm in ARMS}
        rm = RewardModelJudge.load(str(final), device="cpu", batch_size=64)
        for arm in ARMS:
            add_rm_figures(results[arm][-1], folders[arm], rm, arm)
        print(f"\nseed {seed}: reward model {final}: {info['pairs']} pairs from π_0's samples of 256 prompts "
              f"(0 of them held out here; {overlap['gold']} of them among rounds 1..{K}'s prompts), {info['steps']} "
              f"steps; on {info['eval_pairs']} pairs of {info['eval_prompt_count']} other prompts: pair accuracy "
              f"{info['eval_accuracy']:.3f}, Spearman {info['spearman']:.3f}")
        print(COLUMNS)
        for k in range(K + 1):
            for arm in ARMS:
                print_round(k, arm, [results[arm][-1][k]])
    summarize(results, seeds, K)
    (workdir / f"rm-judge-{args.rm_prompts}.json").write_text(json.dumps({arm: results[arm] for arm in ARMS},
                                                                         default=str))
    return 0


def summarize(results: dict[str, list[list[dict]]], seeds: list[int], rounds: int) -> None:
    print(f"\nmean over seeds {seeds} (± standard error across seeds):")
    print(COLUMNS)
    for k in range(rounds + 1):
        for arm in ARMS:
            print_round(k, arm, [rows[k] for rows in results[arm]])
    print("\ngold reward, RM judge − gold judge (same seed), per round:")
    for k in range(1, rounds + 1):
        diffs = [rm[k]["judge_reward"] - gold[k]["judge_reward"] for gold, rm in zip(results["gold"], results["RM"])]
        kl = [rm[k]["kl"] - gold[k]["kl"] for gold, rm in zip(results["gold"], results["RM"])]
        print(f"  round {k}: {' '.join(f'{d:+.3f}' for d in diffs)}; mean {it.fmt(*it.mean_of(diffs))} "
              f"(KL difference {it.fmt(*it.mean_of(kl), 2)} nats)")
