"""Command line: ``dpolab train ...`` (also ``python -m dpolab train ...``).

Flags are derived from ``TrainConfig``: one flag per field, its help text the field's docstring.
Mistakes in data or configuration print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from .config import TrainConfig, field_docs, field_kind, read_yaml
from .errors import DpolabError

EXAMPLES = """\
examples:
  dpolab train --model ./my-sft-model --data prefs.jsonl --output-dir runs/exp1
  dpolab train --config exp.yaml --beta 0.05          # flags override keys in the YAML file
  dpolab train --model org/model --data org/prefs --data-split train --eval-split 0.05 --output-dir runs/x
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse prints its whole usage block on a bad flag; keep the one-line error contract instead."""

    def error(self, message: str):
        self.exit(2, f"dpolab: {message} (see '{self.prog} --help')\n")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--kebab-case`` flag per dataclass field; defaults are suppressed so that only the flags the
    user typed override the YAML file."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, choices, _ = field_kind(cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "") + (f" (default: {default})" if default not in (None, "") else "")
        if "const" in f.metadata:  # flag alone means the const (e.g. --resume = latest checkpoint)
            parser.add_argument(flag, dest=f.name, nargs="?", const=f.metadata["const"], default=argparse.SUPPRESS,
                                help=help_text, metavar="PATH")
        elif "repeat" in f.metadata:  # a list field: the flag once per item (e.g. --objective a=1 --objective b=2)
            parser.add_argument(flag, dest=f.name, action="append", default=argparse.SUPPRESS, help=help_text,
                                metavar=f.metadata["repeat"])
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=str, choices=choices,
                                default=argparse.SUPPRESS, help=help_text, metavar=_metavar(base, choices))


def _metavar(base: type, choices) -> str | None:
    if choices:
        return None
    return {int: "N", float: "X"}.get(base, "TEXT")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpolab", description="Align causal language models on preference "
                     "data with Direct Preference Optimization.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a causal LM on preference pairs (DPO and its family)",
                           description="Train a Hugging Face causal LM on preference pairs (prompt, chosen, "
                           "rejected) against a frozen reference, and save it to OUTPUT_DIR/final.",
                           epilog=EXAMPLES, formatter_class=_HelpFormatter, argument_default=argparse.SUPPRESS)
    train.add_argument("--config", metavar="YAML", help="YAML file whose keys are any of the flags below "
                       "(with _ or -); flags given on the command line override it")
    add_config_arguments(train, TrainConfig)
    from .commands import add_commands  # demo, generate, eval (late import: commands imports this module)

    add_commands(sub, _HelpFormatter)
    return parser


def config_from_args(ns: argparse.Namespace, cls: type = TrainConfig) -> Any:
    """defaults < YAML file < command-line flags, then validated by the dataclass."""
    values = dict(vars(ns))
    values.pop("command", None)
    path = values.pop("config", None)
    merged = {**(read_yaml(path, cls) if path else {}), **values}
    return cls(**merged)


def run_train(ns: argparse.Namespace) -> int:
    from .trainer import train  # heavy imports (torch, transformers) only when needed

    train(config_from_args(ns))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        from .commands import RUNNERS

        return {"train": run_train, **RUNNERS}[ns.command](ns)
    except DpolabError as e:
        print(f"dpolab: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dpolab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
