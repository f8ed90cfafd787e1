"""``dpolab iterate``: its options (one dataclass, one docstring per field = the ``--help`` text) and parser.

Kept apart from ``dpolab.iterate`` (the loop) so that ``dpolab --help`` does not import torch.
"""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from typing import Literal, Optional

from .errors import ConfigError

ITERATE_EXAMPLES = """\
examples:
  dpolab iterate --demo --output-dir runs/iterate          # the demo's reviews task, gold judge, 3 rounds
  dpolab iterate --model ./sft --prompts prompts.txt --eval-fraction 0.1 --judge my_rewards:score \\
      --rounds 3 --samples-per-prompt 4 --beta 0.1 --output-dir runs/iter
  dpolab iterate --model ./sft --prompts p.txt --eval-prompts held.txt --judge runs/rm/final \\
      --reference-policy initial --train-config train.yaml --output-dir runs/iter-rm
"""

TRAIN_OPTIONS = ("beta", "learning_rate", "batch_size", "epochs", "seed", "precision", "device", "progress")
"""Fields shared with ``TrainConfig``: passed to every round's training run."""

SET_PER_ROUND = ("model", "data", "output_dir", "eval_data", "eval_split", "reference_model", "resume",
                 "streaming")
"""TrainConfig keys that ``dpolab iterate`` sets itself for each round (refused in --train-config)."""


@dataclass
class IterateConfig:
    """Everything `dpolab iterate` needs."""

    model: str = ""
    """The initial policy π_0: a folder or hub name (required unless --demo). With --demo: run the demo's stories task on this model instead of the reviews task on the demo's own π_ref."""
    prompts: Optional[str] = None
    """Training prompts: one per line, or JSONL/JSON rows with 'prompt' (the demo makes its own)."""
    eval_prompts: Optional[str] = None
    """Held-out prompts for the evaluation after each round (same formats as --prompts)."""
    eval_fraction: float = 0.0
    """Without --eval-prompts: the fraction of --prompts held out (seeded) for the evaluation, e.g. 0.1."""
    judge: Optional[str] = None
    """Who ranks each prompt's samples: module:function (a reward function), a reward-model folder (dpolab reward train), or ai:MODEL (an AI judge, with --constitution). Default with --demo: the task's gold reward."""
    constitution: Optional[str] = None
    """The principles file of an ai:MODEL judge."""
    eval_judge: Optional[str] = None
    """Judge of the per-round evaluation (judge_reward, win_rate_vs_initial), same forms as --judge; default: --judge, and with --demo always the gold reward (so a reward-model --judge is measured by the truth)."""
    rounds: int = 3
    """Rounds of sample -> judge -> pair -> DPO -> evaluate."""
    samples_per_prompt: int = 4
    """Completions sampled from the current policy per prompt; the best and the worst make a pair."""
    prompts_per_round: Optional[int] = None
    """Prompts sampled per round, taken in order so that rounds see distinct prompts while there are enough (round k gets the k-th slice, wrapping around); default: every prompt in every round (with --demo: 256 new prompts a round)."""
    pairs: Literal["best-worst", "all"] = "best-worst"
    """Pairs per prompt: best-worst (the best sample chosen, the worst rejected) or all (every two samples with different scores)."""
    reference_policy: Literal["previous", "initial"] = "previous"
    """The π_ref of round k's DPO: previous (the policy that wrote the round's samples, which round k also starts from: each round is an ordinary DPO step on on-policy data, and KL to π_0 may grow with the rounds) or initial (π_0 in every round, via --reference-model: the whole run stays anchored to π_0)."""
    output_dir: str = "runs/iterate"
    """Folder for rounds.jsonl, iterate.json and round-K/ (pairs.jsonl, eval_samples.jsonl and a dpolab train output folder whose final/ is the next policy). A rerun with the same options skips the finished rounds."""
    demo: bool = False
    """Run on the demo's reviews task with its self-trained π_ref and the gold judge (stories with --model), held-out prompts disjoint from the training ones: a few minutes on 2 CPU cores."""
    cache_dir: Optional[str] = None
    """--demo: where the self-trained π_ref is cached (default: OUTPUT_DIR/cache; the demo's own cache folder works too)."""
    train_config: Optional[str] = None
    """YAML file of dpolab train options (any key of dpolab train --help except model, data, output_dir, eval_data, eval_split, reference_model, resume, streaming) for every round; the flags below override it."""
    beta: Optional[float] = None
    """DPO's beta in every round (default: dpolab train's 0.1; with --demo 1.0, the demo's)."""
    learning_rate: Optional[float] = None
    """Peak learning rate of every round (default: dpolab train's; with --demo the demo's 1e-3, 2e-4 with --model)."""
    batch_size: Optional[int] = None
    """Preference pairs per optimizer step (default: dpolab train's 8; with --demo 32)."""
    epochs: Optional[float] = None
    """Passes over each round's pairs (default: 1)."""
    max_new_tokens: Optional[int] = None
    """Longest sampled completion in tokens, for labelling and evaluation (default: 64; with --demo the demo's 40, 48 with --model)."""
    eval_prompt_count: Optional[int] = None
    """--demo: held-out prompts for the evaluation (default: 256)."""
    seed: int = 0
    """Seed of the prompts split, every sampling pass (a new seed per round) and the training runs."""
    precision: Optional[Literal["auto", "bf16", "fp32"]] = None
    """auto, bf16 or fp32 for training (default: dpolab train's auto; with --demo fp32)."""
    device: str = "auto"
    """Where to sample, train and evaluate: auto, cpu, cuda, cuda:N."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        from .config import _coerce_types

        _coerce_types(self)
        validate(self)


def _check(ok: bool, field: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(field, problem, fix)


def validate(c: IterateConfig) -> None:
    """Refuse options that cannot work, before anything loads."""
    if not c.demo:
        _check(bool(c.model), "model", "is required", "pass --model (the initial policy), or use --demo")
        _check(bool(c.prompts), "prompts", "is required", "pass --prompts FILE, or use --demo")
        _check(bool(c.judge), "judge", "is required", "pass --judge module:function, a reward-model folder or "
               "ai:MODEL, or use --demo")
        _check(bool(c.eval_prompts) or c.eval_fraction > 0, "eval_prompts", "each round is evaluated on "
               "held-out prompts, and none are given", "pass --eval-prompts FILE or --eval-fraction 0.1")
    else:
        for name in ("prompts", "eval_prompts"):
            _check(getattr(c, name) is None, name, "--demo makes its own prompts", f"drop --{name.replace('_', '-')}")
    _check(not (c.eval_prompts and c.eval_fraction), "eval_fraction", "cannot be combined with --eval-prompts",
           "give either --eval-prompts or --eval-fraction")
    _check(0 <= c.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {c.eval_fraction}", "try 0.1")
    _check(c.rounds >= 1, "rounds", f"must be >= 1, got {c.rounds}", "e.g. --rounds 3")
    _check(c.samples_per_prompt >= 2, "samples_per_prompt", f"must be >= 2, got {c.samples_per_prompt}",
           "a pair needs two samples of a prompt; try 4")
    for name in ("prompts_per_round", "batch_size", "max_new_tokens", "eval_prompt_count"):
        value = getattr(c, name)
        _check(value is None or value >= 1, name, f"must be >= 1, got {value}", "use a positive integer")
    _check(c.eval_prompt_count is None or c.demo, "eval_prompt_count", "only sizes the demo's held-out prompts",
           "use --eval-prompts FILE or --eval-fraction without --demo")
    _check(c.cache_dir is None or c.demo, "cache_dir", "only caches the demo's π_ref", "drop it, or add --demo")
    _check(c.constitution is None or any((s or "").startswith("ai:") for s in (c.judge, c.eval_judge)),
           "constitution", "is only read by an AI judge", "use --judge ai:MODEL, or drop --constitution")
    _check(bool(c.output_dir), "output_dir", "is empty", "pass --output-dir DIR")


def add_parser(sub, formatter) -> None:
    """The ``iterate`` sub-parser (called from ``dpolab.commands.add_commands``)."""
    from .cli import add_config_arguments

    parser = sub.add_parser("iterate", help="iterative DPO: sample, judge, pair, train, evaluate, for K rounds",
                            description=textwrap.fill(
                                "Iterative DPO: in each round sample the current policy on prompts, rank each "
                                "prompt's samples with a judge, train DPO on (best, worst) pairs (dpolab train's "
                                "code), evaluate the new policy against the initial one on held-out prompts "
                                "(judge reward, win rate, KL), and append a row to OUTPUT_DIR/rounds.jsonl.", 90),
                            epilog=ITERATE_EXAMPLES, formatter_class=formatter, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="YAML", help="YAML file whose keys are any of the flags below")
    add_config_arguments(parser, IterateConfig)


def run(ns: argparse.Namespace) -> int:
    from .cli import config_from_args

    config = config_from_args(ns, IterateConfig)
    from .iterate import iterate

    iterate(config)
    return 0
