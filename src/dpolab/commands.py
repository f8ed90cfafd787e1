"""``dpolab demo``, ``dpolab generate`` and ``dpolab eval``: parsers and what each runs (``dpolab reward``
lives in ``reward_cli.py``, ``dpolab label`` in ``label_cli.py`` and ``dpolab iterate`` in ``iterate_cli.py``;
they are registered here).

``cli.py`` owns the program and ``train``; this module adds the commands built around the trainer.
Heavy imports (torch, transformers) happen inside the runners, so ``--help`` stays fast. Every
mistake raises a ``DpolabError``, which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from .cli import add_config_arguments, config_from_args
from .errors import ConfigError

DEMO_EXAMPLES = """\
examples:
  dpolab demo                                   # the whole experiment, report in runs/demo/report.html
  dpolab demo --quick --output-dir runs/quick   # a smaller configuration (under a minute)
  dpolab demo --sweep-beta 0.05,0.1,0.3,1.0     # one policy per β: the reward-vs-KL frontier
  dpolab demo --model ./stories260K --quick     # a pretrained story model, with the stories gold reward
"""

GENERATE_EXAMPLES = """\
examples:
  dpolab generate --model runs/demo/policies/dpo-beta1/final --prompt "the remake is a comedy about a lost dog ."
  dpolab generate --model ./my-model --prompts prompts.txt --num-samples 4 --top-p 0.9 --output samples.jsonl
"""

EVAL_EXAMPLES = """\
examples:
  dpolab eval --model runs/x/final --data heldout.jsonl                 # reference read from runs/x/config.yaml
  dpolab eval --model runs/x/final --reference ./sft --data heldout.jsonl --prompts prompts.txt \\
      --judge dpolab.demo.grammar:review_reward --output eval.json
"""


def add_commands(sub, formatter) -> None:
    """Add the demo, generate and eval sub-parsers to the program's sub-parser set."""
    from .demo.options import DemoConfig

    demo = sub.add_parser("demo", help="run DPO's reward-vs-KL experiment in miniature, nothing to download",
                          description=textwrap.fill(
                              "Train a small reference policy on generated movie reviews, make preference pairs "
                              "with a gold sentiment reward, train DPO (and Preferred-FT) with dpolab train's code, "
                              "evaluate win rate and KL on held-out prompts, and write OUTPUT_DIR/report.html.", 90),
                          epilog=DEMO_EXAMPLES, formatter_class=formatter,
                          argument_default=argparse.SUPPRESS)
    demo.add_argument("--config", metavar="YAML", help="YAML file whose keys are any of the flags below")
    add_config_arguments(demo, DemoConfig)

    gen = sub.add_parser("generate", help="sample completions from a causal LM (JSONL out)",
                         description=textwrap.fill(
                             "Batched, seeded sampling: one JSON line per completion with prompt, completion, "
                             "sample index and whether the model ended it (EOS).", 90),
                         epilog=GENERATE_EXAMPLES, formatter_class=formatter)
    gen.add_argument("--model", required=True, metavar="DIR", help="folder or hub name of the causal LM")
    which = gen.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompts", metavar="FILE", help="prompts: one per line, or JSONL/JSON rows with 'prompt'")
    which.add_argument("--prompt", metavar="TEXT", action="append", help="a prompt (repeat for more)")
    gen.add_argument("--num-samples", type=int, default=1, metavar="N", help="completions per prompt")
    _add_sampling_arguments(gen)
    gen.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature (0: greedy)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1: off)")
    gen.add_argument("--output", metavar="FILE", help="JSONL file to write (default: standard output)")

    ev = sub.add_parser("eval", help="held-out preference accuracy, KL by sampling and win rate under a judge",
                        description=textwrap.fill(
                            "Evaluate a policy against its reference: on preference pairs (--data) the "
                            "implicit-reward accuracy and margins; on prompts (--prompts) KL(π‖π_ref) by sampling "
                            "from π, and with --judge the mean rewards and the win rate of π over π_ref.", 90),
                        epilog=EVAL_EXAMPLES, formatter_class=formatter)
    ev.add_argument("--model", required=True, metavar="DIR", help="the policy: folder or hub name")
    ev.add_argument("--reference", metavar="DIR",
                    help="the reference π_ref (default: the 'reference_model', else the 'model', of the run's config.yaml "
                    "when --model is a dpolab run's final/ folder; without one, pairs are compared on log π alone)")
    ev.add_argument("--data", metavar="PAIRS", help="held-out preference pairs (any format dpolab train reads)")
    ev.add_argument("--prompts", metavar="FILE", help="held-out prompts: one per line, or JSONL rows with 'prompt'")
    ev.add_argument("--judge", metavar="SPEC", help="a judge, needs --prompts: MODULE:FUNCTION (prompts, "
                    "completions) -> rewards, e.g. dpolab.demo.grammar:review_reward; a reward model folder; or "
                    "ai:MODEL (pairwise: the win rate is its mean P(π's sample better than π_ref's))")
    ev.add_argument("--constitution", metavar="YAML", help="principles of an ai:MODEL judge (see dpolab label)")
    ev.add_argument("--beta", type=float, metavar="X", help="β of the implicit reward β·(log π − log π_ref) "
                    "(default: the run's β when --model is a dpolab run's final/ folder, else 0.1)")
    ev.add_argument("--max-length", type=int, default=1024, metavar="N", help="longest prompt + completion of a pair")
    ev.add_argument("--max-prompt-length", type=int, default=512, metavar="N", help="longest prompt of a pair")
    _add_sampling_arguments(ev)
    ev.add_argument("--output", metavar="FILE", help="also write the metrics as JSON to this file")
    from .iterate_cli import add_parser as add_iterate  # iterative DPO: its own module

    add_iterate(sub, formatter)

    from .reward_cli import add_reward_command  # dpolab reward train|score

    add_reward_command(sub, formatter)

    from .label_cli import add_label_command

    add_label_command(sub, formatter)


def _add_sampling_arguments(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="longest completion")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the sampling")
    parser.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def run_demo(ns: argparse.Namespace) -> int:
    from .demo.options import DemoConfig

    config = config_from_args(ns, DemoConfig)
    from .demo.pipeline import run_demo as run

    run(config)
    return 0


def _load(path: str, device: str):
    from .generate import load_for_inference
    from .runtime import resolve_device

    return load_for_inference(path, resolve_device(device))


def run_generate(ns: argparse.Namespace) -> int:
    from .generate import check_sampling, generate, read_prompts

    check_sampling(num_samples=ns.num_samples, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                   top_p=ns.top_p, batch_size=ns.batch_size)
    prompts = read_prompts(ns.prompts) if ns.prompts else ns.prompt
    tokenizer, model = _load(ns.model, ns.device)
    samples = generate(model, tokenizer, prompts, num_samples=ns.num_samples, max_new_tokens=ns.max_new_tokens,
                       temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed, batch_size=ns.batch_size,
                       progress=ns.progress)
    lines = "".join(json.dumps(s.to_row(), ensure_ascii=False) + "\n" for s in samples)
    if ns.output:
        with open(ns.output, "w", encoding="utf-8") as f:
            f.write(lines)
        print(f"{len(samples)} completions written to {ns.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def run_eval(ns: argparse.Namespace) -> int:
    from .evaluate import evaluate_by_sampling, run_config
    from .generate import check_sampling, read_prompts
    from .judges import load_judge

    if not ns.data and not ns.prompts:
        raise ConfigError("data", "nothing to evaluate", "give --data PAIRS and/or --prompts FILE")
    if ns.judge and not ns.prompts:
        raise ConfigError("judge", "a judge scores sampled completions and needs prompts", "add --prompts FILE")
    check_sampling(num_samples=1, max_new_tokens=ns.max_new_tokens, temperature=1.0, top_p=1.0,
                   batch_size=ns.batch_size)
    judge = load_judge(ns.judge, device=ns.device, constitution=ns.constitution, batch_size=ns.batch_size) \
        if ns.judge else None
    prompts = read_prompts(ns.prompts) if ns.prompts else None
    run = run_config(ns.model)  # a dpolab run's final/: its starting model and β are the defaults
    reference_path = ns.reference or run.get("reference_model") or run.get("model")  # the run's own π_ref
    ns.beta = ns.beta if ns.beta is not None else float(run.get("beta", 0.1))
    if prompts and not reference_path:
        raise ConfigError("reference", "KL and win rate compare the policy with a reference", "pass --reference DIR")
    tokenizer, policy = _load(ns.model, ns.device)
    reference = _load_reference(reference_path, tokenizer, ns.device) if reference_path else None
    metrics = {"model": ns.model, "reference": reference_path, "beta": ns.beta}
    if ns.data:
        metrics.update(_eval_pairs(ns, policy, reference, tokenizer))
    if prompts:
        pointwise = judge.score if judge is not None and judge.pointwise else None
        sampled = evaluate_by_sampling(policy, reference, tokenizer, prompts, judge=pointwise,
                                       max_new_tokens=ns.max_new_tokens, seed=ns.seed, batch_size=ns.batch_size,
                                       progress=ns.progress)
        metrics.update(sampled.metrics)
        if judge is not None and pointwise is None:  # a pairwise judge compares π's and π_ref's samples
            from .label_cli import pairwise_win_rate

            metrics.update(pairwise_win_rate(judge, reference, tokenizer, prompts, sampled.policy_samples,
                                             max_new_tokens=ns.max_new_tokens, seed=ns.seed,
                                             batch_size=ns.batch_size, progress=ns.progress))
    for key, value in metrics.items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    if ns.output:
        with open(ns.output, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=1)
    return 0


def _load_reference(path: str, tokenizer, device: str):
    """π_ref must share the policy's tokenizer: KL and implicit rewards compare log-probs of the same ids."""
    ref_tokenizer, reference = _load(path, device)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError("reference", f"'{path}' has another tokenizer than the policy",
                          "evaluate against the model the policy was trained from")
    return reference


def _eval_pairs(ns, policy, reference, tokenizer) -> dict:
    """Preference metrics on --data through the trainer's data loading and ``steps.evaluate``."""
    from .config import TrainConfig
    from .evaluate import evaluate_pairs
    from .prepare import prepare_data
    from .runtime import Runtime

    config = TrainConfig(model=ns.model, data=ns.data, output_dir="-", beta=ns.beta, eval_batch_size=ns.batch_size,
                         max_length=ns.max_length, max_prompt_length=ns.max_prompt_length, precision="fp32",
                         device=ns.device, progress=False,
                         # plain rows: the policy and the reference see each pair bit-identically laid out,
                         # so a policy equal to its reference gets margins of exactly 0 (not float noise)
                         packing=False, prefix_sharing=False)
    pairs = prepare_data(config, tokenizer).train
    rt = Runtime.create(ns.device, "fp32")
    return evaluate_pairs(policy, reference, pairs, config, rt, tokenizer.pad_token_id)


def run_reward(ns: argparse.Namespace) -> int:
    from .reward_cli import run_reward as run

    return run(ns)


def run_label(ns: argparse.Namespace) -> int:
    from .label_cli import run_label as run

    return run(ns)


def run_iterate(ns: argparse.Namespace) -> int:
    from .iterate_cli import run

    return run(ns)


RUNNERS = {"demo": run_demo, "generate": run_generate, "eval": run_eval, "reward": run_reward,
           "iterate": run_iterate, "label": run_label}
