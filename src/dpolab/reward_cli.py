"""``dpolab reward train`` and ``dpolab reward score``: parsers and runners.

``reward train`` is ``dpolab train`` with the loss fixed to the Bradley–Terry reward loss
(``dpolab.losses.reward``): the same flags (derived from ``TrainConfig``), data loading, loop and
outputs. ``reward score`` scores a file of pairs or of single completions with a saved reward model
(``dpolab.reward``). Heavy imports happen inside the runners, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import textwrap

from .errors import ConfigError, DataError

REWARD_LOSSES = ("bradley_terry", "reward")

REWARD_EXAMPLES = """\
examples:
  dpolab reward train --model ./my-sft-model --data prefs.jsonl --eval-split 0.05 --output-dir runs/rm
  dpolab reward score --model runs/rm/final --data heldout.jsonl --output scores.jsonl
  dpolab eval --model runs/x/final --prompts prompts.txt --judge runs/rm/final   # the reward model as a judge
"""


def add_reward_command(sub, formatter) -> None:
    """Add ``reward`` (with its ``train`` and ``score`` sub-commands) to the program's sub-parsers."""
    from .cli import add_config_arguments
    from .config import TrainConfig

    reward = sub.add_parser("reward", help="train a Bradley–Terry reward model on pairs, or score with one",
                            description=textwrap.fill(
                                "A reward model is the causal LM with a one-output score head "
                                "(AutoModelForSequenceClassification, num_labels=1); its reward r(x, y) is read at "
                                "the last token of prompt + completion. 'train' fits it to preference pairs with "
                                "the loss -log σ(r(x, y_w) - r(x, y_l) - margin) (margin: an optional per-row "
                                "'margin' column, else 0) through dpolab train's loop; 'score' writes r for every "
                                "row of a file. A saved reward model is also a judge: pass its folder as --judge.",
                                90), epilog=REWARD_EXAMPLES, formatter_class=formatter)
    actions = reward.add_subparsers(dest="reward_command", metavar="ACTION")
    train = actions.add_parser("train", help="train a reward model (the flags of dpolab train)",
                               description=textwrap.fill(
                                   "Train a reward model on preference pairs with dpolab train's data loading, "
                                   "batching and loop. Writes OUTPUT_DIR/metrics.jsonl (loss, accuracy = fraction "
                                   "of pairs with r_w > r_l, ties ½; eval_accuracy on held-out pairs) and "
                                   "OUTPUT_DIR/final (loadable with AutoModelForSequenceClassification). --loss is "
                                   "fixed to bradley_terry; --beta has no effect; batches are plain padded rows "
                                   "(no prefix sharing or packing).", 90),
                               formatter_class=formatter, argument_default=argparse.SUPPRESS)
    train.add_argument("--config", metavar="YAML", help="YAML file whose keys are any of the flags below "
                       "(with _ or -); flags given on the command line override it")
    add_config_arguments(train, TrainConfig)
    score = actions.add_parser("score", help="score a file of pairs or completions with a reward model",
                               description=textwrap.fill(
                                   "Score every row of --data with a reward model. Rows with chosen and rejected "
                                   "(any pair format dpolab train reads) get chosen_score and rejected_score, and "
                                   "the accuracy (r_w > r_l, ties ½) is printed; rows with prompt and completion "
                                   "get score. Each output row is the input row with its scores added.", 90),
                               formatter_class=formatter)
    score.add_argument("--model", required=True, metavar="DIR", help="reward model folder (OUTPUT_DIR/final)")
    score.add_argument("--data", required=True, metavar="FILE", help="pairs (prompt, chosen, rejected) or "
                       "completions (prompt, completion): .jsonl/.json/.parquet/.csv, optionally .gz")
    score.add_argument("--output", required=True, metavar="FILE", help="JSONL file to write")
    score.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per forward pass")
    score.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda, cuda:N")
    score.add_argument("--max-length", type=int, metavar="N",
                       help="longest prompt + completion (default: the reward model's run's, else 1024)")
    score.add_argument("--max-prompt-length", type=int, metavar="N",
                       help="longest prompt (default: the reward model's run's, else 512)")
    score.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    reward.set_defaults(reward_parser=reward)


def run_reward(ns: argparse.Namespace) -> int:
    action = getattr(ns, "reward_command", None)
    if action is None:
        ns.reward_parser.print_help()
        return 2
    return run_reward_train(ns) if action == "train" else run_reward_score(ns)


def reward_config(ns: argparse.Namespace):
    """``TrainConfig`` of ``reward train``: reward defaults < YAML file < command-line flags."""
    from .config import TrainConfig, read_yaml

    values = {k: v for k, v in vars(ns).items() if k not in ("command", "reward_command", "reward_parser")}
    path = values.pop("config", None)
    merged = {"loss": "bradley_terry", "prefix_sharing": False, "packing": False,
              **(read_yaml(path) if path else {}), **values}
    loss = str(merged["loss"]).strip()
    if loss not in REWARD_LOSSES:
        raise ConfigError("loss", f"dpolab reward train trains a Bradley–Terry reward model, not '{loss}'",
                          f"drop --loss, or train a policy with: dpolab train --loss {loss}")
    return TrainConfig(**merged)


def run_reward_train(ns: argparse.Namespace) -> int:
    from .trainer import train

    config = reward_config(ns)
    result = train(config)
    if result.eval_metrics.get("eval_accuracy") is not None:
        print(f"held-out pair accuracy {result.eval_metrics['eval_accuracy']:.3f} "
              f"(eval loss {result.eval_metrics['eval_loss']:.4f}); reward model: {result.output_dir / 'final'}")
    return 0


def _read_rows(path: str) -> list[tuple[int, dict]]:
    from .data.load import iter_rows

    rows = list(iter_rows(path))
    if not rows:
        raise DataError(path, "no rows found", fix="the file must hold pairs or (prompt, completion) rows")
    return rows


def _completion_rows(path: str, rows: list[tuple[int, dict]]) -> tuple[list, list]:
    """(prompts, completions) of ``{"prompt", "completion"}`` rows, each checked."""
    prompts, completions = [], []
    for number, row in rows:
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(path, f"missing key '{key}' (found {', '.join(map(repr, row))})", row=number,
                                fix="give prompt and completion, or prompt, chosen and rejected")
            if not isinstance(row[key], (str, list, dict)):
                raise DataError(path, f"expected text or chat messages, found {type(row[key]).__name__}",
                                row=number, field=key)
        prompts.append(row["prompt"])
        completions.append(row["completion"])
    return prompts, completions


def run_reward_score(ns: argparse.Namespace) -> int:
    from .evaluate import run_config
    from .reward import DEFAULT_MAX_LENGTH, DEFAULT_MAX_PROMPT_LENGTH, load_reward_model, score_completions

    if ns.batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {ns.batch_size}", "use e.g. 16")
    rows = _read_rows(ns.data)
    run = run_config(ns.model)
    max_length = ns.max_length or int(run.get("max_length", DEFAULT_MAX_LENGTH))
    max_prompt = ns.max_prompt_length or int(run.get("max_prompt_length", DEFAULT_MAX_PROMPT_LENGTH))
    if not 1 <= max_prompt < max_length:
        raise ConfigError("max_prompt_length", f"must be in [1, max_length={max_length}), got {max_prompt}",
                          "leave room for the completion, e.g. half of --max-length")
    tokenizer, model = load_reward_model(ns.model, ns.device)
    score = lambda prompts, completions: score_completions(  # noqa: E731
        model, tokenizer, prompts, completions, batch_size=ns.batch_size, max_length=max_length,
        max_prompt_length=max_prompt, progress=ns.progress)
    if "chosen" in rows[0][1] or "rejected" in rows[0][1]:
        out, summary = _score_pairs(ns.data, rows, score)
    else:
        prompts, completions = _completion_rows(ns.data, rows)
        scores = score(prompts, completions)
        out = [{**row, "score": s} for (_, row), s in zip(rows, scores)]
        summary = f"{len(out)} completions scored: mean reward {sum(scores) / len(scores):.4f}"
    with open(ns.output, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"{summary}; written to {ns.output}")
    return 0


def _score_pairs(path: str, rows: list[tuple[int, dict]], score) -> tuple[list[dict], str]:
    """Pairs in any format ``dpolab train`` reads: both completions scored; rows whose chosen equals
    rejected are skipped (and counted), as training skips them."""
    from .data.formats import to_pairs

    loaded = to_pairs(rows, path)
    pairs, raw = loaded.pairs, dict(rows)
    prompts = [p.prompt for p in pairs]
    chosen = score(prompts, [p.chosen for p in pairs])
    rejected = score(prompts, [p.rejected for p in pairs])
    out = [{**raw[p.row], "chosen_score": c, "rejected_score": r} for p, c, r in zip(pairs, chosen, rejected)]
    accuracy = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(pairs)
    skipped = loaded.rows_read - len(pairs)
    note = f" ({skipped} rows skipped: chosen equals rejected)" if skipped else ""
    return out, f"{len(pairs)} pairs scored{note}: accuracy {accuracy:.4f} (r_chosen > r_rejected, ties ½)"
