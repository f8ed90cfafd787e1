"""The demo's experiment: π_ref → preference pairs → DPO (``dpolab.train``) → evaluation → report.

A miniature of the DPO paper's controlled sentiment generation (reward vs KL): a reference policy
writes several completions per prompt, a gold reward ranks them, pairs of higher/lower reward train
the policy with the same ``dpolab.train`` that ``dpolab train`` runs, and held-out prompts measure
what the policy gained (gold reward, win rate over π_ref) for what it spent (KL(π‖π_ref)).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from . import grammar
from .base import BaseSpec
from .options import DemoConfig


@dataclass(frozen=True)
class Plan:
    """The resolved sizes of one run: DemoConfig's explicit values over the preset."""

    base: BaseSpec
    train_prompts: int
    eval_prompts: int
    samples_per_prompt: int
    max_new_tokens: int
    learning_rate: float
    epochs: float
    eval_pair_prompts: int


def make_plan(cfg: DemoConfig, pretrained: bool) -> Plan:
    """Defaults tuned so the default run meets its targets on 2 CPU cores (see README, "The demo")."""
    if cfg.quick:
        base = BaseSpec(corpus_size=3000, steps=120, batch_size=32, seed=cfg.seed)
        sizes = dict(train_prompts=48, eval_prompts=48, samples_per_prompt=4, eval_pair_prompts=32)
    else:
        base = BaseSpec(seed=cfg.seed)
        sizes = dict(train_prompts=512, eval_prompts=256, samples_per_prompt=4, eval_pair_prompts=128)
    pick = lambda name, default: default if getattr(cfg, name) is None else getattr(cfg, name)  # noqa: E731
    return Plan(base=base, train_prompts=pick("train_prompts", sizes["train_prompts"]),
                eval_prompts=pick("eval_prompts", sizes["eval_prompts"]),
                samples_per_prompt=pick("samples_per_prompt", sizes["samples_per_prompt"]),
                max_new_tokens=pick("max_new_tokens", 40 if not pretrained else 24 if cfg.quick else 48),
                learning_rate=pick("learning_rate", 1e-3 if not pretrained else 2e-4),
                epochs=pick("epochs", 1.0), eval_pair_prompts=sizes["eval_pair_prompts"])


@dataclass(frozen=True)
class Task:
    """Prompts and the gold reward that judges their completions."""

    name: str
    prompts: Callable[..., list[str]]
    judge: Callable[[list[str], list[str]], list[float]]
    judge_spec: str
    """The same judge as a ``--judge`` argument of ``dpolab eval``."""
    fluency: Callable[[str], bool] | None = None
    """Whether a completion is well formed (the reviews grammar can check it; stories have no such test)."""


TASKS = {
    "reviews": Task("reviews", grammar.review_prompts, grammar.review_reward, "dpolab.demo.grammar:review_reward",
                    grammar.is_grammatical),
    "stories": Task("stories", grammar.story_prompts, grammar.story_reward, "dpolab.demo.grammar:story_reward"),
}


def pick_task(cfg: DemoConfig) -> Task:
    """--task, or auto: reviews for the self-trained π_ref, stories for a pretrained --model (reviews with
    --model also works, e.g. on a policy an earlier demo trained)."""
    return TASKS[cfg.task if cfg.task != "auto" else ("stories" if cfg.model else "reviews")]


# ------------------------------------------------------------------------------------------------
# Preference data
# ------------------------------------------------------------------------------------------------

def make_pairs(samples, rewards: list[float], per_prompt: int) -> list[dict]:
    """(chosen, rejected) rows from each prompt's samples: every two with different gold rewards, the
    higher one chosen (the paper's recipe); equal rewards and identical texts make no pair."""
    rows = []
    for start in range(0, len(samples), per_prompt):
        group = list(zip(samples[start:start + per_prompt], rewards[start:start + per_prompt]))
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                (a, ra), (b, rb) = group[i], group[j]
                if ra == rb or a.completion == b.completion:
                    continue
                (win, rw), (lose, rl) = ((a, ra), (b, rb)) if ra > rb else ((b, rb), (a, ra))
                rows.append({"prompt": win.prompt, "chosen": win.completion, "rejected": lose.completion,
                             "chosen_reward": rw, "rejected_reward": rl})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def preference_data(reference, tokenizer, task: Task, plan: Plan, cfg: DemoConfig, out: Path, say) -> dict:
    """Sample π_ref on held-in prompts, judge, pair; the same for a few held-out prompts (for held-out
    preference accuracy). Returns the prompts and the written files."""
    from ..generate import generate

    train_prompts = task.prompts(plan.train_prompts, cfg.seed)
    eval_prompts = task.prompts(plan.eval_prompts, cfg.seed + 1, exclude=set(train_prompts))
    samples = generate(reference, tokenizer, train_prompts, num_samples=plan.samples_per_prompt,
                       max_new_tokens=plan.max_new_tokens, seed=cfg.seed, batch_size=128,
                       progress=cfg.progress, desc="sampling π_ref (held-in prompts)")
    rewards = task.judge([s.prompt for s in samples], [s.completion for s in samples])
    train_rows = make_pairs(samples, rewards, plan.samples_per_prompt)
    pair_prompts = eval_prompts[:plan.eval_pair_prompts]
    held = generate(reference, tokenizer, pair_prompts, num_samples=plan.samples_per_prompt,
                    max_new_tokens=plan.max_new_tokens, seed=cfg.seed + 2, batch_size=128,
                    progress=False)
    eval_rows = make_pairs(held, task.judge([s.prompt for s in held], [s.completion for s in held]),
                           plan.samples_per_prompt)
    if not train_rows or not eval_rows:
        raise ConfigError("model", "π_ref's samples all got the same gold reward, so no pair could be made",
                          "use more prompts or samples per prompt, or a model whose samples vary")
    say(f"preference data: {len(train_rows):,} pairs from {len(train_prompts)} held-in prompts "
        f"× {plan.samples_per_prompt} samples; {len(eval_rows):,} held-out pairs; "
        f"{len(eval_prompts)} held-out prompts for evaluation")
    return {"train": write_rows(out / "data" / "train.jsonl", train_rows),
            "eval": write_rows(out / "data" / "eval.jsonl", eval_rows),
            "train_prompts": train_prompts, "eval_prompts": eval_prompts, "num_pairs": len(train_rows),
            "num_eval_pairs": len(eval_rows)}


# ------------------------------------------------------------------------------------------------
# Training and evaluating policies
# ------------------------------------------------------------------------------------------------

MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 64


def train_config(reference_dir: str, data: dict, cfg: DemoConfig, plan: Plan, out: Path, *, name: str,
                 loss: str = "sigmoid", beta: float = 0.1):
    """The ``TrainConfig`` of one policy: what ``dpolab train`` would be given on the command line."""
    from ..config import TrainConfig

    pairs_per_step = cfg.batch_size
    steps = max(1, round(plan.epochs * data["num_pairs"] / pairs_per_step))
    return TrainConfig(model=str(reference_dir), data=str(data["train"]), eval_data=str(data["eval"]),
                       output_dir=str(out / "policies" / name), loss=loss, beta=beta,
                       learning_rate=plan.learning_rate, batch_size=cfg.batch_size, epochs=plan.epochs,
                       warmup_ratio=0.1, logging_steps=max(1, steps // 40), eval_steps=max(1, steps // 8),
                       seed=cfg.seed, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                       precision="fp32", progress=cfg.progress)


def train_policy(config, say):
    """``dpolab.train`` on a fresh folder (a rerun of the demo replaces its policies, never appends)."""
    import shutil

    from ..trainer import train

    shutil.rmtree(config.output_dir, ignore_errors=True)
    say(f"\n== {Path(config.output_dir).name}: dpolab train --model {config.model} --data {config.data} "
        f"--eval-data {config.eval_data} --loss {config.loss} --beta {config.beta} "
        f"--learning-rate {config.learning_rate} --batch-size {config.batch_size} --epochs {config.epochs}")
    return train(config)


def evaluate_policy(policy, reference, tokenizer, eval_pairs, config, rt, task: Task, prompts: list[str],
                    plan: Plan, cfg: DemoConfig, reference_samples):
    """The numbers ``dpolab eval`` reports, for one trained policy (the same functions)."""
    from ..evaluate import evaluate_by_sampling, evaluate_pairs

    sampled = evaluate_by_sampling(policy, reference, tokenizer, prompts, judge=task.judge,
                                   max_new_tokens=plan.max_new_tokens, seed=cfg.seed + 3, batch_size=128,
                                   reference_samples=reference_samples)
    pairs = evaluate_pairs(policy, reference, eval_pairs, config, rt, tokenizer.pad_token_id)
    sampled.metrics["eval_reward_accuracy"] = pairs["eval_rewards/accuracies"]
    sampled.metrics["eval_reward_margin"] = pairs["eval_rewards/margins"]
    if task.fluency is not None:  # did DPO keep the language intact while it moved the sentiment?
        for who, drawn in (("policy", sampled.policy_samples), ("reference", sampled.reference_samples)):
            sampled.metrics[f"fluent_{who}"] = sum(map(task.fluency, (s.completion for s in drawn))) / len(drawn)
    return sampled


# ------------------------------------------------------------------------------------------------
# The whole demo
# ------------------------------------------------------------------------------------------------

def idle_cores(cores: int) -> int:
    """Threads that will not fight other work for a core: the cores minus the 1-minute load average.

    Small models gain little from a second thread, but lose several times over when one of their
    threads waits for a core another process holds (OpenMP threads spin at every barrier).
    """
    import os

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return cores
    return max(1, min(cores, cores - round(load)))


def run_demo(cfg: DemoConfig, say=print) -> dict:
    """Run the experiment end to end and write the report; returns the summary (also summary.json)."""
    import torch

    from ..generate import load_for_inference
    from ..runtime import Runtime, resolve_device, seed_everything
    from . import report

    start = time.perf_counter()
    torch.set_num_threads(cfg.threads or idle_cores(torch.get_num_threads()))
    say(f"threads: {torch.get_num_threads()}")
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("output_dir", f"'{out}' exists and is not a folder", "choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    task, plan, phases = pick_task(cfg), make_plan(cfg, pretrained=bool(cfg.model)), {}
    tick = time.perf_counter()
    if cfg.model:
        reference_dir = cfg.model
    else:
        from .base import build_reference

        reference_dir = str(build_reference(plan.base, Path(cfg.cache_dir or out / "cache"),
                                            progress=cfg.progress, say=say))
    rt = Runtime(device=resolve_device("auto"), precision="fp32")
    tokenizer, reference = load_for_inference(reference_dir, rt.device)
    phases["reference model"] = time.perf_counter() - tick
    tick = time.perf_counter()
    data = preference_data(reference, tokenizer, task, plan, cfg, out, say)
    phases["preference data"] = time.perf_counter() - tick
    results, samples = _train_and_evaluate(cfg, plan, task, reference_dir, reference, tokenizer, data, rt,
                                           out, phases, say)
    summary = _summary(cfg, plan, task, reference_dir, data, results, phases, start)
    report.write_report(out, summary, results, samples, say=say)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report.print_table(summary, say)
    return summary


def _train_and_evaluate(cfg, plan, task, reference_dir, reference, tokenizer, data, rt, out, phases, say):
    """Train every policy (DPO per β, Preferred-FT) and evaluate each on the held-out prompts against
    the same π_ref samples."""
    from ..generate import generate
    from ..prepare import prepare_data

    tick = time.perf_counter()
    prompts = data["eval_prompts"]
    reference_samples = generate(reference, tokenizer, prompts, max_new_tokens=plan.max_new_tokens,
                                 seed=cfg.seed + 4, batch_size=128, progress=False)
    runs = [(f"dpo-beta{b:g}", "sigmoid", b) for b in cfg.betas()]
    if cfg.preferred_ft:
        runs.append(("preferred-ft", "sft", cfg.beta))
    results, samples = [], None
    for name, loss, beta in runs:
        config = train_config(reference_dir, data, cfg, plan, out, name=name, loss=loss, beta=beta)
        trained = train_policy(config, say)
        eval_pairs = prepare_data(dataclasses.replace(config, data=config.eval_data, eval_data=None, eval_steps=None),
                                  tokenizer).train
        ev = evaluate_policy(trained.model.eval(), reference, tokenizer, eval_pairs, config, rt, task, prompts,
                             plan, cfg, reference_samples)
        results.append({"name": name, "loss": loss, "beta": beta, "run_dir": str(config.output_dir),
                        "steps": trained.steps, **ev.metrics})
        if samples is None:
            samples = ev
        say(f"{name}: win rate {ev.metrics['win_rate']:.3f}, KL {ev.metrics['kl']:.2f} ± "
            f"{ev.metrics['kl_stderr']:.2f} nats, gold reward {ev.metrics['gold_reward_policy']:.3f} "
            f"(π_ref {ev.metrics['gold_reward_reference']:.3f})")
    phases["training and evaluation"] = time.perf_counter() - tick
    return results, samples


SUMMARY_KEYS = ("win_rate", "win_rate_stderr", "kl", "kl_stderr", "gold_reward_policy", "gold_reward_policy_stderr",
                "gold_reward_reference", "gold_reward_reference_stderr", "eval_reward_accuracy", "eval_reward_margin",
                "length_policy", "length_reference", "fluent_policy", "fluent_reference")


def _summary(cfg, plan, task, reference_dir, data, results, phases, start) -> dict:
    """summary.json: the main policy's numbers at the top level, every policy under "policies"."""
    main = results[0]
    return {
        "task": task.name, "judge": task.judge_spec, "reference_model": str(reference_dir), "beta": main["beta"],
        **{k: main[k] for k in SUMMARY_KEYS if k in main},
        "train_pairs": data["num_pairs"], "eval_pairs": data["num_eval_pairs"],
        "train_prompts": len(data["train_prompts"]), "eval_prompts": len(data["eval_prompts"]),
        "policies": results,
        "phases_seconds": {k: round(v, 1) for k, v in phases.items()},
        "seconds": round(time.perf_counter() - start, 1),
        "config": dataclasses.asdict(cfg), "plan": {**dataclasses.asdict(plan), "base": dataclasses.asdict(plan.base)},
    }
