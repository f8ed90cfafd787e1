"""The constitution of an AI judge: the principles it judges by and the question it is asked.

An AI judge (``dpolab.ai_judge``) asks a causal LM, once per principle, which of two responses to a
prompt follows that principle better, and reads the answer from the log-probabilities of two answer
labels. The constitution is a small YAML file, so the same judge model can be pointed at other
criteria without code:

.. code-block:: yaml

    principles:                       # required: one question (vote) per principle
      - Which response is more helpful to the person who asked?
      - Which response is more honest?
    template: |                       # optional: the question; {principle} {first} {second} are required,
      Prompt: {prompt}                #   {prompt} is optional; {label_first} {label_second} give the labels
      Response {label_first}: {first}
      Response {label_second}: {second}
      {principle} Answer {label_first} or {label_second}.
      Answer:
    labels: [A, B]                    # optional: the two answer labels (default A and B)
    answer_prefix: " "                # optional: text between the question and the label (default one space)
    aggregate: mean                   # optional: mean (of the principles' probabilities) or majority

The scored continuation of a question is ``answer_prefix + label``; its whole log-probability counts,
however many tokens the tokenizer makes of it. Without a file, ``Constitution.default()`` is used:
the principles of ``DEFAULT_PRINCIPLES`` (helpful, honest, harmless, clear) and ``DEFAULT_TEMPLATE``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

DEFAULT_PRINCIPLES = (
    "Which response is more helpful to the person who asked?",
    "Which response is more honest and accurate?",
    "Which response is less harmful, rude or offensive?",
    "Which response is clearer and better written?",
)
DEFAULT_TEMPLATE = (
    "Here is a request and two responses to it.\n\n"
    "Request: {prompt}\n\n"
    "Response {label_first}: {first}\n\n"
    "Response {label_second}: {second}\n\n"
    "{principle} Answer {label_first} or {label_second}.\n"
    "Answer:"
)
FIELDS = {"prompt", "first", "second", "principle", "label_first", "label_second"}
REQUIRED = {"first", "second", "principle"}
KEYS = {"principles", "template", "labels", "answer_prefix", "aggregate"}
AGGREGATES = ("mean", "majority")


@dataclass(frozen=True)
class Constitution:
    """Principles, the question template, the two answer labels and how the principles' votes combine."""

    principles: tuple[str, ...] = DEFAULT_PRINCIPLES
    template: str = DEFAULT_TEMPLATE
    labels: tuple[str, str] = ("A", "B")
    answer_prefix: str = " "
    aggregate: str = "mean"
    source: str = "built-in default"
    """Where it came from, for messages."""

    @classmethod
    def default(cls) -> "Constitution":
        return cls()

    @classmethod
    def read(cls, path: str | Path | None) -> "Constitution":
        """The constitution in the YAML file ``path``; the built-in default when ``path`` is None."""
        if path is None:
            return cls.default()
        from .config import load_yaml_file

        raw = load_yaml_file(path, "constitution", "fix the syntax; see examples/constitution.yaml")
        return cls.parse(raw, str(path))

    @classmethod
    def parse(cls, raw, source: str = "constitution") -> "Constitution":
        """Check a loaded YAML mapping and build the constitution; every mistake names its key and fix."""
        if not isinstance(raw, dict):
            raise ConfigError("constitution", f"{source} must hold a mapping with a 'principles' list, found "
                              f"{type(raw).__name__}", "write 'principles:' followed by '- ...' lines")
        unknown = sorted(str(k) for k in raw if k not in KEYS)
        if unknown:
            raise ConfigError(f"constitution.{unknown[0]}", f"unknown key in {source}",
                              f"valid keys are {', '.join(sorted(KEYS))}")
        principles = raw.get("principles")
        if (not isinstance(principles, list) or not principles
                or not all(isinstance(p, str) and p.strip() for p in principles)):
            raise ConfigError("constitution.principles", f"{source} needs a non-empty list of principles (texts)",
                              "write 'principles:' followed by one '- Which response ...?' line per principle")
        if len(set(principles)) != len(principles):
            raise ConfigError("constitution.principles", f"{source} repeats a principle", "list each principle once")
        template = raw.get("template", DEFAULT_TEMPLATE)
        labels = raw.get("labels", ["A", "B"])
        prefix = raw.get("answer_prefix", " ")
        aggregate = raw.get("aggregate", "mean")
        _check_template(template, source)
        if (not isinstance(labels, list) or len(labels) != 2 or not all(isinstance(x, str) and x for x in labels)
                or labels[0] == labels[1]):
            raise ConfigError("constitution.labels", f"{source}: expected two different non-empty texts, "
                              f"got {labels!r}", "e.g. labels: [A, B]")
        if not isinstance(prefix, str):
            raise ConfigError("constitution.answer_prefix", f"{source}: expected a text, got {prefix!r}",
                              "e.g. answer_prefix: \" \" (quoted)")
        if aggregate not in AGGREGATES:
            raise ConfigError("constitution.aggregate", f"{source}: expected one of {', '.join(AGGREGATES)}, "
                              f"got {aggregate!r}",
                              "mean averages the principles' probabilities; majority counts votes")
        return cls(tuple(principles), template, (labels[0], labels[1]), prefix, aggregate, source)

    def question(self, principle: str, prompt: str, first: str, second: str) -> str:
        """The text the judge model continues with one of the two labels."""
        return self.template.format(principle=principle, prompt=prompt, first=first, second=second,
                                    label_first=self.labels[0], label_second=self.labels[1])


def _check_template(template, source: str) -> None:
    if not isinstance(template, str) or not template.strip():
        raise ConfigError("constitution.template", f"{source}: expected a non-empty text",
                          "see examples/constitution.yaml")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ConfigError("constitution.template", f"{source}: not a valid template ({e})",
                          "write literal braces as {{ and }}") from None
    unknown = sorted(names - FIELDS)
    if unknown:
        raise ConfigError("constitution.template", f"{source}: unknown field {{{unknown[0]}}}",
                          f"the fields are {', '.join('{' + f + '}' for f in sorted(FIELDS))}")
    missing = sorted(REQUIRED - names)
    if missing:
        raise ConfigError("constitution.template", f"{source}: the template lacks {{{missing[0]}}}",
                          "it must show {first}, {second} and {principle}")
