"""``dpolab label``: prompts → preference pairs, judged by any judge (RLAIF, constitutional labelling).

The policy writes ``--samples`` completions of every prompt once; each ``--judge`` ranks those same
samples (``dpolab.label.label_samples``) and its pairs are written as rows ``dpolab train --data``
reads: prompt, chosen, rejected, chosen_score, rejected_score. Named judges (``--judge NAME=SPEC``)
add an ``objective: NAME`` column, so one file can hold one set of pairs per objective (what
multi-objective training reads with ``--objective NAME=WEIGHT``).

Also here: the win rate of a policy over its reference under a pairwise judge (``dpolab eval
--judge ai:MODEL``), which has no per-sample reward to average.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from math import comb
from pathlib import Path

from .errors import ConfigError

LABEL_EXAMPLES = """\
examples:
  dpolab label --model ./sft --prompts prompts.txt --samples 4 \\
      --judge dpolab.demo.grammar:review_reward --output pairs.jsonl
  dpolab label --model ./sft --prompts prompts.txt --samples 4 --judge ai:./judge-lm \\
      --constitution examples/constitution.yaml --output pairs.jsonl
  dpolab label --model ./sft --prompts prompts.txt --samples 4 --pairs all \\
      --judge gold=dpolab.demo.grammar:review_reward --judge ai=ai:./judge-lm --output pairs.jsonl
  dpolab train --model ./sft --data pairs.jsonl --output-dir runs/rlaif
"""

JUDGE_HELP = ("a judge: MODULE:FUNCTION (a reward function (prompts, completions) -> rewards), a folder saved "
              "by 'dpolab reward train', or ai:MODEL (a causal LM judging by --constitution); repeat as "
              "NAME=SPEC to label the same samples once per judge, with an 'objective: NAME' column")
_NAMED = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(.+)$")


def add_label_command(sub, formatter) -> None:
    """The ``label`` sub-parser."""
    p = sub.add_parser("label", help="sample a policy, judge its samples, write preference pairs (RLAIF)",
                       description=textwrap.fill(
                           "Sample N completions of every prompt from a policy, rank them with one or more "
                           "judges (a reward function, a reward model, or an AI judge with a constitution), "
                           "and write preference pairs that dpolab train --data reads.", 90),
                       epilog=LABEL_EXAMPLES, formatter_class=formatter)
    p.add_argument("--model", required=True, metavar="DIR", help="the policy that writes the samples")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompts: one per line, or JSONL/JSON rows with 'prompt'")
    p.add_argument("--samples", type=int, default=4, metavar="N", help="completions per prompt (at least 2)")
    p.add_argument("--judge", action="append", required=True, metavar="SPEC", help=JUDGE_HELP)
    p.add_argument("--constitution", metavar="YAML", help="principles and question of the ai: judges "
                   "(format: examples/constitution.yaml; default: a built-in helpful/honest/harmless/clear set)")
    p.add_argument("--output", required=True, metavar="FILE", help="JSONL file of pairs to write")
    p.add_argument("--pairs", choices=("best-worst", "all"), default="best-worst",
                   help="per prompt: the best sample against the worst, or every two samples of different scores")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="longest completion")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the sampling")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="sequences per forward pass (sampling and model judges)")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def parse_judge_specs(specs: list[str]) -> list[tuple[str | None, str]]:
    """(name or None, spec) per ``--judge``; several judges must each be named, names unique."""
    parsed = []
    for raw in specs:
        m = _NAMED.match(raw)
        # "name=spec" only when the spec part is no path that exists as given (a folder named "a=b")
        named = m is not None and not Path(raw).exists()
        parsed.append((m.group(1), m.group(2)) if named else (None, raw))
    if len(parsed) > 1:
        if any(name is None for name, _ in parsed):
            raise ConfigError("judge", "several judges need a name each",
                              "write --judge NAME=SPEC for every judge, e.g. --judge gold=mymodule:reward")
        names = [name for name, _ in parsed]
        if len(set(names)) != len(names):
            raise ConfigError("judge", f"judge names repeat: {', '.join(names)}", "give each judge its own name")
    return parsed


def run_label(ns: argparse.Namespace) -> int:
    from .generate import check_sampling, generate, load_for_inference, read_prompts
    from .judges import load_judge
    from .label import label_samples
    from .runtime import resolve_device

    if ns.samples < 2:
        raise ConfigError("samples", f"must be >= 2 to make a pair, got {ns.samples}", "use --samples 2 or more")
    check_sampling(num_samples=ns.samples, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                   top_p=ns.top_p, batch_size=ns.batch_size)
    specs = parse_judge_specs(ns.judge)
    prompts = read_prompts(ns.prompts)
    judges = []
    for name, spec in specs:  # judges first: a bad spec fails before any sampling
        judge = load_judge(spec, device=ns.device, constitution=ns.constitution, batch_size=ns.batch_size)
        if hasattr(judge, "progress"):
            judge.progress = ns.progress
        judges.append((name, judge))
    tokenizer, policy = load_for_inference(ns.model, resolve_device(ns.device))
    drawn = generate(policy, tokenizer, prompts, num_samples=ns.samples, max_new_tokens=ns.max_new_tokens,
                     temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed, batch_size=ns.batch_size,
                     progress=ns.progress, desc="sampling for labels")
    rows, lines = [], [f"prompts          {len(prompts)}", f"samples          {len(drawn)} ({ns.samples} per prompt)"]
    candidates = len(prompts) * (1 if ns.pairs == "best-worst" else comb(ns.samples, 2))
    for name, judge in judges:
        labelled = label_samples(prompts, drawn, judge, samples=ns.samples, rule=ns.pairs)
        if name is not None:
            labelled.rows[:] = [{**row, "objective": name} for row in labelled.rows]
        rows.extend(labelled.rows)
        lines.append(summary_line(name or judge.name, labelled.rows, candidates))
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print("\n".join(lines + [f"written          {len(rows)} pairs to {out}"]))
    if not rows:
        print("dpolab: no pair was made (every prompt's samples tied); try more --samples or a higher "
              "--temperature", file=sys.stderr)
    return 0


def summary_line(name: str, rows: list[dict], candidates: int) -> str:
    """One judge's pairs: how many, how many candidate pairs tied (dropped), mean chosen/rejected scores."""
    n = len(rows)
    chosen = sum(r["chosen_score"] for r in rows) / n if n else float("nan")
    rejected = sum(r["rejected_score"] for r in rows) / n if n else float("nan")
    return (f"judge {name}: {n} pairs, {candidates - n} ties dropped, mean score chosen {chosen:.4f} "
            f"rejected {rejected:.4f}")


def pairwise_win_rate(judge, reference, tokenizer, prompts: list[str], policy_samples, *, max_new_tokens: int,
                      seed: int, batch_size: int, progress: bool) -> dict[str, float]:
    """Win rate of π over π_ref under a pairwise judge: mean P(π's sample better) over prompts, with its
    standard error; π_ref's samples are drawn as ``evaluate_by_sampling`` draws them (seed + 1)."""
    from .evaluate import mean_stderr
    from .generate import generate

    ref = generate(reference, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed + 1,
                   batch_size=batch_size, progress=progress, desc="sampling π_ref")
    probs = judge.compare(prompts, [s.completion for s in policy_samples], [s.completion for s in ref])
    rate, stderr = mean_stderr(probs)
    return {"win_rate": rate, "win_rate_stderr": stderr,
            "length_reference": sum(len(s.completion_ids) for s in ref) / max(1, len(prompts))}
