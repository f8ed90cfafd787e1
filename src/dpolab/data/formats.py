"""Preference-data formats: detect the layout of raw rows and convert them into ``PreferencePair``.

Four layouts are understood. The first row decides which one a dataset uses; every later row must use
the same one.

==================================  =============================================================
``standard``                        ``{"prompt": str, "chosen": str, "rejected": str}``
``implicit_prompt``                 ``{"chosen": str, "rejected": str}``: whole transcripts (the
                                    Anthropic HH "\\n\\nHuman: ... \\n\\nAssistant: ..." layout); the
                                    prompt is their shared prefix up to the last "Assistant:" in it
``conversational``                  ``{"prompt": [messages], "chosen": [messages] | message, ...}``
``conversational_implicit_prompt``  ``{"chosen": [messages], "rejected": [messages]}``: whole
                                    conversations; the prompt is everything before the final
                                    assistant message
==================================  =============================================================

KTO (``--loss kto``) also reads unpaired examples, ``{"prompt": str | [messages], "completion": str |
[messages] | message, "label": bool}`` (``to_examples``; see ``UNPAIRED``), and splits preference pairs
into one desirable and one undesirable example each.

A message is ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``. An optional number
``margin`` (how much better chosen is; the reward-model loss uses it) is read into ``PreferencePair.margin``,
and an optional ``objective`` column names the objective a pair was ranked by (multi-objective DPO,
``--objective``; see ``dpolab.objectives``). Other keys are ignored (datasets often carry ids and scores).
Text is kept verbatim, whitespace included, because it changes tokenization. Pairs whose chosen and rejected
completions are equal teach nothing and are dropped (counted in ``LoadedData.dropped``).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from dpolab.data.records import PreferencePair, UnpairedExample
from dpolab.errors import DataError

STANDARD = "standard"
IMPLICIT_PROMPT = "implicit_prompt"
CONVERSATIONAL = "conversational"
CONVERSATIONAL_IMPLICIT_PROMPT = "conversational_implicit_prompt"
FORMATS = (STANDARD, IMPLICIT_PROMPT, CONVERSATIONAL, CONVERSATIONAL_IMPLICIT_PROMPT)

ROLES = ("system", "user", "assistant", "tool")
ASSISTANT_MARKER = "Assistant:"
"""Marks the start of an assistant turn in implicit-prompt transcripts."""

_EXPECTED_KEYS = {
    STANDARD: ("prompt", "chosen", "rejected"),
    IMPLICIT_PROMPT: ("chosen", "rejected"),
    CONVERSATIONAL: ("prompt", "chosen", "rejected"),
    CONVERSATIONAL_IMPLICIT_PROMPT: ("chosen", "rejected"),
}


@dataclass
class LoadedData:
    """The pairs read from one source, and what happened on the way."""

    pairs: list[PreferencePair]
    format: str
    """One of ``FORMATS``: the layout detected from the first row."""
    rows_read: int
    """Rows in the source (kept + dropped)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> number of rows dropped, e.g. ``{"identical": 3}``."""
    source: str = ""
    """The file, folder or hub dataset name the rows came from."""
    examples: list[UnpairedExample] = field(default_factory=list)
    """KTO only (``to_examples``): the unpaired examples; empty for preference pairs."""
    first_dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> the first (1-based) row dropped for it, for ``--strict`` messages."""


@dataclass(frozen=True)
class _Row:
    """One raw row and where it came from, so every error can name the file and row."""

    source: str
    number: int
    data: dict

    def error(self, problem: str, field: str | None = None, fix: str = "") -> DataError:
        return DataError(self.source, problem, row=self.number, field=field, fix=fix)


def describe(value: Any) -> str:
    """A short, one-line description of a value's type and content for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"text {shown!r}"
    if isinstance(value, dict):
        return f"an object with keys {_key_list(value)}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    return f"a {type(value).__name__}"


def _key_list(data: dict, limit: int = 12) -> str:
    keys = [repr(str(k)) for k in data]
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + more + "]"


def _text(row: _Row, name: str) -> str:
    value = row.data[name]
    if not isinstance(value, str):
        raise row.error(f"expected text (a string), found {describe(value)}", field=name)
    return value


# ---------------------------------------------------------------------------------------------
# Format detection


def detect_format(row: _Row) -> str:
    """The layout of one row: decided by ``prompt`` when present, else by ``chosen``."""
    missing = [k for k in ("chosen", "rejected") if k not in row.data]
    if missing and is_unpaired(row.data):
        raise row.error("this is an unpaired example (prompt, completion, label), not a preference pair",
                        fix="train on unpaired examples with --loss kto, or give chosen and rejected")
    if missing:
        raise _missing_keys(row, missing, ("prompt (optional)", "chosen", "rejected"))
    explicit = "prompt" in row.data
    name = "prompt" if explicit else "chosen"
    value = row.data[name]
    if isinstance(value, str):
        return STANDARD if explicit else IMPLICIT_PROMPT
    if isinstance(value, (list, dict)):
        return CONVERSATIONAL if explicit else CONVERSATIONAL_IMPLICIT_PROMPT
    raise row.error(f"expected text (a string) or a list of chat messages, found {describe(value)}",
                    field=name)


def _missing_keys(row: _Row, missing: list[str], expected: Iterable[str]) -> DataError:
    return row.error(
        f"missing key{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)}: "
        f"found keys {_key_list(row.data)}, expected {', '.join(expected)}",
        fix="rename the columns or convert the data to one of the supported layouts")


def _check_same_format(row: _Row, kind: str, fmt: str, first: int) -> None:
    """Raise when ``row`` (of layout ``kind``) does not match the dataset's layout ``fmt``."""
    if kind == fmt:
        return
    if "prompt" in _EXPECTED_KEYS[fmt] and "prompt" not in row.data:
        raise _missing_keys(row, ["prompt"], _EXPECTED_KEYS[fmt])
    raise row.error(f"row {row.number} is {kind} but row {first} is {fmt}",
                    fix="every row of a dataset must use the same layout")


# ---------------------------------------------------------------------------------------------
# Standard (plain text) rows


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two whole transcripts into ``(prompt, chosen, rejected)``.

    The prompt is their shared prefix up to and including the last ``"Assistant:"`` marker inside that
    prefix; the completions are what follows (leading space kept, e.g. ``" Sure, ..."``). Returns
    ``None`` when the shared prefix holds no marker.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARKER)
    if cut < 0:
        return None
    cut += len(ASSISTANT_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _convert_standard(row: _Row) -> tuple[str, str, str]:
    return _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")


def _convert_implicit(row: _Row) -> tuple[str, str, str]:
    parts = split_implicit_prompt(_text(row, "chosen"), _text(row, "rejected"))
    if parts is None:
        raise row.error(
            f"chosen and rejected share no prefix ending in {ASSISTANT_MARKER!r}, so the prompt "
            "cannot be inferred",
            fix="add an explicit 'prompt' column holding the text before the completions")
    return parts


# ---------------------------------------------------------------------------------------------
# Conversational (chat message) rows


def _message(value: Any, row: _Row, name: str) -> dict:
    """Validate one chat message; returns a copy without null-valued keys.

    Null keys come from columnar storage (parquet, ``datasets``), which gives every message every key
    any message has; they were never in the user's data.
    """
    if not isinstance(value, dict):
        raise row.error(f"expected a chat message (an object with 'role' and 'content'), found "
                        f"{describe(value)}", field=name)
    for key in ("role", "content"):
        if key not in value:
            raise row.error(f"message has no {key!r}: found keys {_key_list(value)}", field=name)
        if not isinstance(value[key], str):
            raise row.error(f"expected text (a string), found {describe(value[key])}",
                            field=f"{name}.{key}")
    if value["role"] not in ROLES:
        raise row.error(f"unknown role {value['role']!r}, expected one of {', '.join(ROLES)}",
                        field=f"{name}.role")
    return {k: v for k, v in value.items() if v is not None}


def _messages(row: _Row, name: str, *, allow_single: bool) -> list[dict]:
    """Validate a list of chat messages (or, where allowed, one message dict, made into a list)."""
    value = row.data[name]
    if allow_single and isinstance(value, dict):
        return [_message(value, row, name)]
    if not isinstance(value, (list, tuple)):
        raise row.error(f"expected a list of chat messages, found {describe(value)}", field=name)
    if not value:
        raise row.error("expected a list of chat messages, found an empty list", field=name)
    return [_message(m, row, f"{name}[{i}]") for i, m in enumerate(value)]


def _check_assistant(messages: list[dict], row: _Row, name: str, offset: int = 0) -> None:
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise row.error(f"completions must be assistant messages, found role "
                            f"{message['role']!r}", field=f"{name}[{i + offset}].role")


def _convert_conversational(row: _Row) -> tuple[list, list, list]:
    prompt = _messages(row, "prompt", allow_single=False)
    chosen = _messages(row, "chosen", allow_single=True)
    rejected = _messages(row, "rejected", allow_single=True)
    _check_assistant(chosen, row, "chosen")
    _check_assistant(rejected, row, "rejected")
    return prompt, chosen, rejected


def _convert_conversational_implicit(row: _Row) -> tuple[list, list, list]:
    """Prompt = the messages before the final assistant turn, which chosen and rejected must share."""
    chosen = _messages(row, "chosen", allow_single=False)
    rejected = _messages(row, "rejected", allow_single=False)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        _check_assistant(messages[-1:], row, name, offset=len(messages) - 1)
        if len(messages) < 2:
            raise row.error("no prompt messages before the final assistant message", field=name,
                            fix="include the conversation so far, or add an explicit 'prompt' column")
    prompt = chosen[:-1]
    if rejected[:-1] != prompt:
        at = next((i for i, (a, b) in enumerate(zip(prompt, rejected)) if a != b),
                  min(len(prompt), len(rejected) - 1))
        raise row.error(f"chosen and rejected differ at message {at}, before their final assistant "
                        "message, so the prompt cannot be inferred", field=f"rejected[{at}]",
                        fix="add an explicit 'prompt' column with the shared conversation")
    return prompt, chosen[-1:], rejected[-1:]


_CONVERTERS = {
    STANDARD: _convert_standard,
    IMPLICIT_PROMPT: _convert_implicit,
    CONVERSATIONAL: _convert_conversational,
    CONVERSATIONAL_IMPLICIT_PROMPT: _convert_conversational_implicit,
}


# ---------------------------------------------------------------------------------------------
# Whole datasets


def to_pairs(rows: Iterable[tuple[int, dict]], source: str) -> LoadedData:
    """Convert ``(row number, row dict)`` items from one source into ``LoadedData``.

    The first row fixes the layout; a later row in another layout, a missing key, a wrong type or an
    invalid message raises ``DataError`` naming the source, row and field. Rows whose chosen equals
    rejected are dropped; if no row is left (or there were none), that is an error too.
    """
    counts = LoadedData(pairs=[], format="", rows_read=0, source=source)
    pairs = list(iter_pairs(rows, counts))
    if counts.rows_read == 0:
        raise DataError(source, "no rows found", fix="the source must hold at least one preference pair")
    if not pairs:
        raise DataError(source, f"all {counts.rows_read} rows were dropped ({_reasons(counts.dropped)})",
                        fix="chosen and rejected must differ for a pair to be usable")
    counts.pairs = pairs
    return counts


def iter_pairs(rows: Iterable[tuple[int, dict]], counts: LoadedData) -> Iterator[PreferencePair]:
    """``to_pairs`` one row at a time (``--streaming``): yields the kept pairs of ``counts.source`` and
    keeps ``counts``' format, rows_read, dropped and first_dropped up to date; ``counts.pairs`` is left alone."""
    source, first = counts.source, 0
    for number, data in rows:
        counts.rows_read += 1
        row = _Row(source, number, data)
        kind = detect_format(row)
        if not counts.format:
            counts.format, first = kind, number
        _check_same_format(row, kind, counts.format, first)
        prompt, chosen, rejected = _CONVERTERS[counts.format](row)
        if chosen == rejected:
            counts.dropped["identical"] = counts.dropped.get("identical", 0) + 1
            counts.first_dropped.setdefault("identical", number)
            continue
        yield PreferencePair(prompt, chosen, rejected, source=source, row=number,
                             margin=_margin(row), objective=_objective(row))


def _margin(row: _Row) -> float | None:
    """The row's optional ``margin``: a finite number (text such as "0.5" from CSV too); absent, null or
    blank is None."""
    value = row.data.get("margin")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number != number or number in (float("inf"), float("-inf")):
        raise row.error(f"expected a finite number, found {describe(value)}", field="margin",
                        fix="give how much better chosen is than rejected as a number (e.g. 1.5), or leave it out")
    return number


def _objective(row: _Row) -> str | None:
    """The optional ``objective`` column (multi-objective DPO, ``dpolab.objectives``): an objective's name."""
    value = row.data.get("objective")
    if value is None:  # no column, or a null in columnar storage
        return None
    if not isinstance(value, str) or not value.strip():
        raise row.error(f"expected the name of an objective (text), found {describe(value)}", field="objective",
                        fix="write the objective's name as given to --objective (e.g. helpful), or remove the column")
    return value.strip()


def _reasons(dropped: dict[str, int]) -> str:
    labels = {"identical": "chosen equals rejected"}
    return ", ".join(f"{n} {labels.get(k, k)}" for k, n in dropped.items())


# ---------------------------------------------------------------------------------------------
# Unpaired examples (KTO)

UNPAIRED = "unpaired"
"""``{"prompt": str, "completion": str, "label": bool}``: one answer, labelled desirable or not."""
CONVERSATIONAL_UNPAIRED = "conversational_unpaired"
"""``{"prompt": [messages], "completion": [messages] | message, "label": bool}``."""
_LABEL_TEXT = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def is_unpaired(data: dict) -> bool:
    """Whether a raw row is an unpaired example (has ``completion`` and ``label``, no ``chosen``)."""
    return "completion" in data and "label" in data and "chosen" not in data


def _label(row: _Row) -> bool:
    """A row's label as a bool; text and 0/1 (CSV, parquet) are accepted too."""
    value = row.data["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABEL_TEXT:
        return _LABEL_TEXT[value.strip().lower()]
    raise row.error(f"expected true (desirable) or false (undesirable), found {describe(value)}", field="label")


def _convert_unpaired(row: _Row) -> tuple[str, Any, Any]:
    """(layout, prompt, completion) of an unpaired row, validated like the paired layouts."""
    missing = [k for k in ("prompt", "completion", "label") if k not in row.data]
    if missing:
        raise _missing_keys(row, missing, ("prompt", "completion", "label"))
    if isinstance(row.data["prompt"], str):
        return UNPAIRED, row.data["prompt"], _text(row, "completion")
    completion = _messages(row, "completion", allow_single=True)
    _check_assistant(completion, row, "completion")
    return CONVERSATIONAL_UNPAIRED, _messages(row, "prompt", allow_single=False), completion


def pair_examples(pair: PreferencePair) -> tuple[UnpairedExample, UnpairedExample]:
    """A preference pair as two unpaired examples: the chosen one desirable, the rejected one not."""
    return (UnpairedExample(pair.prompt, pair.chosen, True, source=pair.source, row=pair.row),
            UnpairedExample(pair.prompt, pair.rejected, False, source=pair.source, row=pair.row))


def to_examples(rows: Iterable[tuple[int, dict]], source: str) -> LoadedData:
    """Convert rows into unpaired examples (``LoadedData.examples``) for KTO.

    Unpaired rows are taken as they are (every row must be unpaired, in one layout); a dataset of
    preference pairs is read by ``to_pairs`` and each pair split by ``pair_examples``.
    """
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        raise DataError(source, "no rows found", fix="the source must hold at least one example")
    rows = itertools.chain([first], rows)
    if not is_unpaired(first[1]):
        loaded = to_pairs(rows, source)
        loaded.examples = [e for pair in loaded.pairs for e in pair_examples(pair)]
        return loaded
    examples: list[UnpairedExample] = []
    fmt = ""
    for number, data in rows:
        row = _Row(source, number, data)
        if not is_unpaired(data):
            raise row.error(f"row {number} is not an unpaired example but row {first[0]} is",
                            fix="every row needs prompt, completion and label")
        kind, prompt, completion = _convert_unpaired(row)
        fmt = fmt or kind
        if kind != fmt:
            raise row.error(f"row {number} is {kind} but row {first[0]} is {fmt}",
                            fix="every row of a dataset must use the same layout")
        examples.append(UnpairedExample(prompt, completion, _label(row), source=source, row=number))
    return LoadedData(pairs=[], format=fmt, rows_read=len(examples), source=source, examples=examples)
