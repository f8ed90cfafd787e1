"""The one record type for preference data.

Every source (files, ``datasets``, generated samples, judges) is converted once, at the edge, into
``PreferencePair``. Nothing downstream looks at raw rows. KTO, which learns from single answers
labelled desirable or undesirable, reads ``UnpairedExample`` instead (and pairs split in two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

Message = dict  # {"role": str, "content": str}
Text = Union[str, list]  # plain text, or a list of chat messages


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) completion.

    Standard pairs hold plain strings: the model sees ``prompt + chosen`` and ``prompt + rejected``
    verbatim. Conversational pairs hold chat messages: ``prompt`` is the conversation so far and
    ``chosen``/``rejected`` are the assistant message(s) that continue it; the tokenizer's chat
    template renders them.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    source: str = ""
    """Where the pair came from (file or dataset name), for error messages."""
    row: int = 0
    """1-based row number within ``source`` (0 when unknown)."""
    margin: Optional[float] = None
    """How much better chosen is than rejected (a row's optional ``margin`` column); only the Bradley–Terry
    reward loss uses it (−log σ(r_w − r_l − margin)), every other loss ignores it."""
    objective: Optional[str] = None
    """Multi-objective DPO (``--objective``): the objective this pair was ranked by (the data's ``objective`` column, or the objective whose own file it came from); None when untagged."""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class UnpairedExample:
    """One prompt with one completion labelled desirable (``label=True``) or undesirable: KTO's data.

    Used only by unpaired objectives (``--loss kto``); everything else trains on ``PreferencePair``.
    Text follows the same conventions: plain strings, or chat messages (the completion then holds the
    assistant message(s) that continue the prompt).
    """

    prompt: Text
    completion: Text
    label: bool
    source: str = ""
    """Where the example came from (file or dataset name), for error messages."""
    row: int = 0
    """1-based row number within ``source`` (0 when unknown)."""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)
