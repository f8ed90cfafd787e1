"""Iterative DPO (``dpolab iterate``): K rounds of sample → judge → pair → DPO → evaluate.

One offline DPO pass learns from samples of π_ref only; after it the policy writes completions that
no pair ever ranked. Iterative DPO (e.g. Xu et al. 2023, "Some things are more CRINGE than others";
Yuan et al. 2024, "Self-Rewarding Language Models"; Xiong et al. 2024, "Iterative Preference Learning
from Human Feedback") repeats the pass on fresh samples of the current policy, so each round's pairs
are on-policy. Round k, from π_{k−1}:

1. ``dpolab.label.label_pairs``: N samples per prompt from π_{k−1} (a new seed per round), ranked by the
   judge, (best, worst) pairs → ``round-k/pairs.jsonl``;
2. ``dpolab.trainer.train`` from π_{k−1} into ``round-k/`` (its ``final/`` is π_k), with π_ref = π_{k−1}
   (``--reference-policy previous``) or π_0 (``initial``, through ``--reference-model``);
3. ``dpolab.evaluate.evaluate_by_sampling`` of π_k against π_0 on held-out prompts: KL(π_k‖π_0), the
   judge's mean reward of π_k's samples, the win rate over π_0's samples (the same π_0 samples every
   round, so the rounds compare) → one row of ``rounds.jsonl`` (round 0 is π_0 itself, KL exactly 0).

Nothing here re-implements a piece of the training path: the loop only wires the library's parts.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ConfigError
from .iterate_cli import SET_PER_ROUND, TRAIN_OPTIONS, IterateConfig
from .judges import CallableJudge, Judge, load_judge

DEMO_PROMPTS_PER_ROUND, DEMO_EVAL_PROMPTS = 256, 256


@dataclass
class Setup:
    """The resolved inputs of a run: what the options (or --demo) amount to."""

    model_dir: str
    train_prompts: list[str]
    eval_prompts: list[str]
    judge: Judge
    eval_judge: Judge
    train_values: dict
    """TrainConfig keyword arguments shared by every round (model, data, output_dir set per round)."""
    max_new_tokens: int
    prompts_per_round: int | None
    fluency: Callable[[str], bool] | None = None
    """--demo reviews: whether a completion parses under the grammar (logged as ``grammatical``)."""
    identity: dict = dataclasses.field(default_factory=dict)
    """What makes two runs the same run (iterate.json): a rerun with the same identity skips finished rounds."""


def as_judge(judge) -> Judge:
    return judge if isinstance(judge, Judge) else CallableJudge(judge, name=getattr(judge, "__name__", "callable"))


def _train_values(config: IterateConfig, defaults: dict) -> dict:
    """defaults (the demo's) < --train-config YAML < the flags; checked by building a TrainConfig now."""
    from .config import TrainConfig, read_yaml

    values = dict(defaults)
    if config.train_config:
        from_yaml = read_yaml(config.train_config, TrainConfig)
        for key in from_yaml:
            if key in SET_PER_ROUND:
                raise ConfigError("train_config", f"key '{key}' in {config.train_config} is set by dpolab iterate "
                                  "for each round", "remove it from the YAML file")
        values.update(from_yaml)
    values.update({k: getattr(config, k) for k in TRAIN_OPTIONS if getattr(config, k) is not None})
    if values.get("lora_r"):
        raise ConfigError("train_config", "LoRA's reference is always the base model with the adapter off, so "
                          "rounds could not use the previous policy as reference", "train all weights (no lora_r)")
    TrainConfig(**values, model="-", data="-", output_dir="-")  # refuse bad training options before any work
    return values


def resolve(config: IterateConfig, judge=None, eval_judge=None, say=print) -> Setup:
    """Read prompts, load judges and settle the training options (the demo's task with --demo)."""
    if config.demo:
        return _resolve_demo(config, judge, eval_judge, say)
    from .generate import read_prompts
    from .prepare import split_pairs

    prompts = read_prompts(config.prompts)
    if config.eval_prompts:
        held = read_prompts(config.eval_prompts)
    else:
        prompts, held = split_pairs(prompts, config.eval_fraction, config.seed, config.prompts)
    if config.prompts_per_round and config.prompts_per_round > len(prompts):
        raise ConfigError("prompts_per_round", f"{config.prompts_per_round} asked, but there are {len(prompts)} "
                          "training prompts", "lower --prompts-per-round or add prompts")
    overlap = len(set(prompts) & set(held))
    if overlap:
        say(f"note: {overlap} of the {len(set(held))} held-out prompts are also training prompts")
    chosen = as_judge(judge) if judge is not None else _load(config.judge, config)
    graded = as_judge(eval_judge) if eval_judge is not None else (
        _load(config.eval_judge, config) if config.eval_judge else chosen)
    values = _train_values(config, {})
    return Setup(config.model, prompts, held, chosen, graded, values, config.max_new_tokens or 64,
                 config.prompts_per_round,
                 identity=_identity(config, values, prompts, held, chosen, graded, config.model))


def _load(spec: str, config: IterateConfig) -> Judge:
    return load_judge(spec, device=config.device, constitution=config.constitution, batch_size=64)


def _resolve_demo(config: IterateConfig, judge, eval_judge, say) -> Setup:
    """--demo: the demo's reviews task and self-trained π_ref (stories on --model), the gold judge."""
    from .demo.base import build_reference
    from .demo.options import DemoConfig
    from .demo.pipeline import MAX_LENGTH, MAX_PROMPT_LENGTH, TASKS, make_plan

    task = TASKS["stories" if config.model else "reviews"]
    plan = make_plan(DemoConfig(seed=config.seed, model=config.model, progress=config.progress),
                     pretrained=bool(config.model))
    model_dir = config.model or str(build_reference(plan.base, Path(config.cache_dir or
                                                                    Path(config.output_dir) / "cache"),
                                                    progress=config.progress, say=say))
    per_round = config.prompts_per_round or DEMO_PROMPTS_PER_ROUND
    prompts = task.prompts(per_round * config.rounds, config.seed)
    held = task.prompts(config.eval_prompt_count or DEMO_EVAL_PROMPTS, config.seed + 1, exclude=set(prompts))
    chosen = as_judge(judge) if judge is not None else _load(config.judge or task.judge_spec, config)
    graded = as_judge(eval_judge) if eval_judge is not None else _load(config.eval_judge or task.judge_spec, config)
    defaults = dict(beta=1.0, learning_rate=plan.learning_rate, batch_size=32, epochs=plan.epochs, warmup_ratio=0.1,
                    max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, precision="fp32", logging_steps=5)
    values = _train_values(config, defaults)
    return Setup(model_dir, prompts, held, chosen, graded, values, config.max_new_tokens or plan.max_new_tokens,
                 per_round, fluency=task.fluency,
                 identity=_identity(config, values, prompts, held, chosen, graded, model_dir))


def _identity(config, values, prompts, held, judge, eval_judge, model_dir) -> dict:
    digest = hashlib.sha256(json.dumps([prompts, held]).encode()).hexdigest()[:16]
    return {"model": str(model_dir), "prompts": digest, "judge": judge.name, "eval_judge": eval_judge.name,
            "samples_per_prompt": config.samples_per_prompt, "prompts_per_round": config.prompts_per_round,
            "pairs": config.pairs, "reference_policy": config.reference_policy,
            "max_new_tokens": config.max_new_tokens, "train": {k: values[k] for k in sorted(values)}}


def round_prompts(prompts: list[str], per_round: int | None, k: int) -> list[str]:
    """Round k's (1-based) prompts: all of them, or the k-th slice of ``per_round``, wrapping around."""
    if not per_round:
        return list(prompts)
    start = (k - 1) * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def iterate(config: IterateConfig, *, judge=None, eval_judge=None, say=print) -> list[dict]:
    """Run every round not finished yet; returns the rows of ``rounds.jsonl`` (round 0 to ``config.rounds``).

    ``judge`` / ``eval_judge`` (Python only): a ``Judge`` or a function (prompts, completions) -> rewards
    used instead of ``--judge`` / ``--eval-judge``.
    """
    import torch

    from .generate import generate, load_for_inference
    from .runtime import resolve_device, seed_everything

    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("output_dir", f"'{out}' exists and is not a folder", "choose another --output-dir")
    if config.demo:
        from .demo.pipeline import idle_cores

        torch.set_num_threads(idle_cores(torch.get_num_threads()))
    seed_everything(config.seed)
    setup = resolve(config, judge, eval_judge, say)
    rows = _finished_rounds(out, setup.identity, config.rounds)
    device = resolve_device(config.device)
    tokenizer, initial = load_for_inference(setup.model_dir, device)
    initial_samples = generate(initial, tokenizer, setup.eval_prompts, max_new_tokens=setup.max_new_tokens,
                               seed=config.seed + 1, batch_size=64, progress=False)
    if not rows:
        started = time.perf_counter()
        rows.append(_evaluate(0, initial, initial, tokenizer, setup, config, initial_samples, out, started,
                              {"pairs": 0, "steps": 0, "policy": setup.model_dir, "reference": None}))
        _append(out, rows[-1], say)
    policy, policy_dir = initial, setup.model_dir
    for k in range(1, config.rounds + 1):
        if k < len(rows):  # finished in an earlier run with the same options
            policy, policy_dir = None, str(out / f"round-{k}" / "final")
            say(f"round {k}: finished earlier ({policy_dir}), skipped")
            continue
        started = time.perf_counter()
        if policy is None:
            policy = load_for_inference(policy_dir, device)[1]
        labelled, data = _label(k, policy, tokenizer, setup, config, out, say)
        policy = None  # training loads π_{k−1} from its folder: free the sampling copy (π_0 stays)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        row, policy = _train(k, labelled, data, policy_dir, initial, tokenizer, setup, config, initial_samples,
                             out, started, say)
        policy_dir = row["policy"]
        rows.append(row)
        _append(out, row, say)
    return rows


def _label(k: int, policy, tokenizer, setup: Setup, config: IterateConfig, out: Path, say):
    """Round k's pairs from π_{k−1}'s samples, written to round-k/pairs.jsonl: (Labelled, that path)."""
    from .label import label_pairs

    folder = out / f"round-{k}"
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished attempt: start the round afresh
    prompts = round_prompts(setup.train_prompts, setup.prompts_per_round, k)
    say(f"\n== round {k}/{config.rounds}: {config.samples_per_prompt} samples of π_{k - 1} on each of "
        f"{len(prompts)} prompts, judged by {setup.judge.name}")
    labelled = label_pairs(policy, tokenizer, prompts, setup.judge, samples=config.samples_per_prompt,
                           max_new_tokens=setup.max_new_tokens, seed=config.seed + 1000 * k, batch_size=64,
                           rule=config.pairs, progress=config.progress)
    if not labelled.rows:
        raise ConfigError("judge", f"round {k}: every sample of every prompt got the same score, so no pair could "
                          "be made", "use more prompts or samples per prompt, or a judge that tells them apart")
    data = folder / "pairs.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in labelled.rows), encoding="utf-8")
    return labelled, data


def _train(k: int, labelled, data: Path, policy_dir: str, initial, tokenizer, setup: Setup, config: IterateConfig,
           initial_samples, out: Path, started: float, say):
    """Train π_k from π_{k−1}'s folder on round k's pairs, evaluate it: (row, π_k in memory)."""
    from .config import TrainConfig
    from .trainer import train

    folder = out / f"round-{k}"
    reference = setup.model_dir if config.reference_policy == "initial" and k > 1 else None
    train_config = TrainConfig(**setup.train_values, model=policy_dir, data=str(data), output_dir=str(folder),
                               reference_model=reference)
    say(f"round {k}: {len(labelled.rows)} pairs; dpolab train --model {policy_dir} --data {data} --output-dir "
        f"{folder}" + (f" --reference-model {reference}" if reference else ""))
    result = train(train_config)
    trained, result.model = result.model.eval(), None
    extra = {"pairs": len(labelled.rows), "steps": result.steps, "policy": str(folder / "final"),
             "reference": reference or policy_dir,
             "pair_score_gap": sum(r["chosen_score"] - r["rejected_score"] for r in labelled.rows) / len(labelled.rows)}
    return _evaluate(k, trained, initial, tokenizer, setup, config, initial_samples, out, started, extra), trained


def _evaluate(k: int, policy, initial, tokenizer, setup: Setup, config: IterateConfig, initial_samples,
              out: Path, started: float, extra: dict) -> dict:
    """π_k against π_0 on the held-out prompts: the row of round k."""
    from .evaluate import evaluate_by_sampling, mean_stderr

    judge = setup.eval_judge
    ev = evaluate_by_sampling(policy, initial, tokenizer, setup.eval_prompts,
                              judge=judge.score if judge.pointwise else None, max_new_tokens=setup.max_new_tokens,
                              seed=config.seed + 2, batch_size=64, reference_samples=initial_samples)
    m, completions = ev.metrics, [s.completion for s in ev.policy_samples]
    if judge.pointwise:
        reward, reward_err, win, win_err = (m["gold_reward_policy"], m["gold_reward_policy_stderr"], m["win_rate"],
                                            m["win_rate_stderr"])
        scores = ev.policy_rewards
    else:  # a pairwise judge: P(π_k's sample beats π_0's), no reward of its own
        scores = judge.compare(setup.eval_prompts, completions, [s.completion for s in initial_samples])
        (win, win_err), reward, reward_err = mean_stderr(scores), math.nan, math.nan
    row = {"round": k, "judge_reward": reward, "judge_reward_stderr": reward_err, "win_rate_vs_initial": win,
           "win_rate_stderr": win_err, "kl": m["kl"], "kl_stderr": m["kl_stderr"], **extra,
           "length": m["length_policy"], "eval_prompts": len(setup.eval_prompts)}
    if setup.fluency is not None:
        row["grammatical"] = sum(map(setup.fluency, completions)) / len(completions)
    row["seconds"] = round(time.perf_counter() - started, 1)
    folder = out / f"round-{k}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval_samples.jsonl").write_text("".join(
        json.dumps({"prompt": p, "completion": c, "score": s}) + "\n"
        for p, c, s in zip(setup.eval_prompts, completions, scores)), encoding="utf-8")
    return row


def _clean(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _append(out: Path, row: dict, say) -> None:
    with open(out / "rounds.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
    value = row["judge_reward"]
    reward = "–" if value is None or math.isnan(value) else f"{value:.3f} ± {row['judge_reward_stderr']:.3f}"
    say(f"round {row['round']}: judge reward {reward}, win rate vs π_0 {row['win_rate_vs_initial']:.3f} ± "
        f"{row['win_rate_stderr']:.3f}, KL(π_{row['round']}‖π_0) {row['kl']:.2f} ± {row['kl_stderr']:.2f} nats "
        f"({row['seconds']}s)")


def _finished_rounds(out: Path, identity: dict, rounds: int) -> list[dict]:
    """Rows of the rounds an earlier run with the same options finished (round 0, 1, ... without a gap, each
    with its final/); rounds.jsonl is rewritten to them. Another run's folder is refused."""
    out.mkdir(parents=True, exist_ok=True)
    marker, table = out / "iterate.json", out / "rounds.jsonl"
    if marker.is_file():
        before = json.loads(marker.read_text(encoding="utf-8"))
        if before != identity:
            changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
            raise ConfigError("output_dir", f"'{out}' holds an iterate run with other options ({', '.join(changed)})",
                              "choose another --output-dir, or delete the folder to start over")
    elif table.exists() or any(out.glob("round-*")):
        raise ConfigError("output_dir", f"'{out}' holds rounds without iterate.json",
                          "choose another --output-dir, or delete the folder")
    marker.write_text(json.dumps(identity, indent=1), encoding="utf-8")
    rows = []
    if table.is_file():
        for line in table.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            k = len(rows)
            if row.get("round") != k or k > rounds or (k > 0 and not (out / f"round-{k}" / "final").is_dir()):
                break
            rows.append(row)
        table.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows
