"""Preference pairs -> token ids with an exact prompt/completion boundary.

``tokenize_pairs`` turns ``PreferencePair`` records into ``TokenizedPair`` ids. The model later
sees ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``; the prompt ids are shared by
both completions, and only completion tokens are scored. The rules below are the contract:

1. **Prompt ids** are the prompt as the tokenizer encodes it, ``tokenizer(prompt_text,
   add_special_tokens=True)``, so BOS is present exactly when the tokenizer adds one. BOS is never
   doubled: a text that already starts with the BOS token string (chat templates often render it)
   is encoded with ``add_special_tokens=False``, and a leading ``BOS BOS`` that still appears is
   reduced to one. Tokenizers without BOS (GPT-2 style) get none, and no ``None`` is ever inserted.
   Special tokens a tokenizer appends *after* the text (e.g. Llama's ``add_eos_token=True``) are
   removed, since they would sit between the prompt and its completion. An empty prompt becomes
   ``[BOS]`` (``[EOS]`` for tokenizers without BOS, the GPT-2 convention), so that the first
   completion token is scored too.
2. **Exact boundary, "joint, then split"**: ``prompt_text + completion_text`` is encoded jointly
   with the prompt's special-token setting. If the joint ids start with the prompt ids, the
   completion ids are the rest of the joint ids; this keeps sentencepiece/Metaspace tokenizers
   right (encoding ``" Sure"`` alone would add a spurious ``"▁"`` token). If they do not (a BPE
   merge crosses the boundary), the completion is encoded alone with ``add_special_tokens=False``
   and counted in ``TokenizeStats.boundary_fallbacks`` (once per completion). Either way the prompt
   ids are the same for chosen and rejected.
3. **EOS**: each completion ends with the tokenizer's EOS id, added once. It is not added when the
   completion text (right-stripped) already ends with the EOS token string, nor when the completion
   ids already end with the EOS id (a chat template that closes the turn with it). A tokenizer
   without an EOS token raises ``ConfigError``.
4. **Conversational pairs** are rendered to text by ``render_conversational``: the prompt is
   ``apply_chat_template(prompt, add_generation_prompt=True)``; each completion is what the
   template adds for ``prompt + completion`` (``add_generation_prompt=False``) beyond the rendered
   prompt. When the full render does not start with the rendered prompt (templates that rewrite
   history, e.g. strip thinking blocks), the completion falls back to its messages' contents joined
   by newlines, with no template markup and no count in the stats. A tokenizer without a chat
   template raises ``ConfigError``. The texts then go through rules 1-3 (a rendered BOS is handled
   by rule 1).
5. **Truncation**: the prompt keeps its LAST ``max_prompt_length`` tokens (a prompt that starts
   with BOS keeps BOS plus its last ``max_prompt_length - 1`` tokens). Each completion is cut from
   the end so that ``len(prompt) + len(completion) <= max_length`` (a cut completion loses its
   EOS). A pair whose prompt leaves no room for one completion token (``len(prompt) >=
   max_length``) is dropped as ``"prompt_too_long"``; a pair whose chosen and rejected ids are
   identical after truncation (including pairs identical from the start) is dropped as
   ``"identical_after_truncation"``. ``max_length > 1`` and ``max_prompt_length > 0`` are required
   (``ConfigError``).
6. **Speed**: texts are encoded with batched tokenizer calls, a chunk of pairs at a time;
   ``show_progress`` shows a tqdm bar over the pairs.

``TokenizeStats`` describes the output: ``kept`` pairs, ``dropped`` counts per reason, and, over
the kept pairs only, how many prompts were truncated, how many completions (chosen and rejected
counted separately) were truncated, and how many completions used the boundary fallback of rule 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from tqdm.auto import tqdm

from dpolab.data.records import PreferencePair
from dpolab.errors import ConfigError, DataError

_CHUNK = 1024
"""Pairs per batched tokenizer call: bounds memory, large enough to amortize per-call overhead."""
PARALLEL_MIN_PAIRS = 4096
"""Fewer pairs are tokenized in-process whatever ``num_proc`` says: starting workers would cost more."""


@dataclass(frozen=True)
class TokenizedPair:
    """One pair as token ids.

    The model sees ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    """Completion tokens only, ending with EOS unless truncated."""
    rejected_ids: list[int]
    """Completion tokens only, ending with EOS unless truncated."""
    index: int
    """Position of the pair in the input list: a stable id, used as a cache key."""
    margin: Optional[float] = None
    """``PreferencePair.margin``: the reward-model loss's required margin for this pair (None: 0)."""
    objective: int = -1
    """Multi-objective DPO: the pair's objective as a position in ``--objective`` (-1: untagged)."""


@dataclass
class TokenizeStats:
    """What ``tokenize_pairs`` did; every count except ``dropped`` is over the kept pairs."""

    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason (``"prompt_too_long"``, ``"identical_after_truncation"``) -> number of pairs."""
    prompt_truncated: int = 0
    """Pairs whose prompt lost tokens from the front."""
    completion_truncated: int = 0
    """Completions (chosen and rejected counted separately) cut from the end."""
    boundary_fallbacks: int = 0
    """Completions encoded alone because a token merge crossed the prompt boundary (rule 2)."""
    first_dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> position (in the input list) of the first pair dropped for it."""
    first_prompt_truncated: int | None = None
    """Position (in the input list) of the first kept pair whose prompt was truncated."""


@dataclass(frozen=True)
class _Specials:
    """The tokenizer's BOS/EOS facts, looked up once."""

    bos_id: int | None
    bos_text: str | None
    eos_id: int
    eos_text: str
    suffix: tuple[int, ...]
    """Ids the tokenizer appends after the text when ``add_special_tokens=True`` (usually none)."""


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, *, max_length: int,
                   max_prompt_length: int,
                   show_progress: bool = False,
                   keep_identical: bool = False,
                   num_proc: int = 1) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize ``pairs`` following the module rules; returns the kept pairs and the stats.

    ``max_length`` bounds prompt + one completion; ``max_prompt_length`` bounds the prompt alone.
    ``keep_identical`` keeps pairs whose two completions are equal (KTO tokenizes an example and its
    KL completion as a pair, and those may coincide). ``num_proc > 1`` tokenizes contiguous slices in
    that many worker processes; the result is the same as with one.
    """
    _check_lengths(max_length, max_prompt_length)
    if num_proc > 1 and len(pairs) >= PARALLEL_MIN_PAIRS:
        return _tokenize_parallel(pairs, tokenizer, num_proc, max_length=max_length,
                                  max_prompt_length=max_prompt_length, keep_identical=keep_identical)
    specials = _specials(tokenizer)
    stats = TokenizeStats()
    kept: list[TokenizedPair] = []
    with tqdm(total=len(pairs), desc="tokenize", unit="pair", disable=not show_progress) as bar:
        for start in range(0, len(pairs), _CHUNK):
            chunk = pairs[start:start + _CHUNK]
            texts = [_pair_texts(pair, tokenizer) for pair in chunk]
            for offset, encoded in enumerate(_encode_chunk(texts, tokenizer, specials)):
                item = _fit(start + offset, encoded, max_length, max_prompt_length, specials, stats,
                            keep_identical)
                if item is not None:
                    kept.append(_with_margin(item, chunk[offset]))
            bar.update(len(chunk))
    stats.kept = len(kept)
    return kept, stats


def _tokenize_slice(args) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Worker: one slice of the pairs, indices relative to the slice."""
    pairs, tokenizer, kwargs = args
    return tokenize_pairs(pairs, tokenizer, **kwargs)


def _tokenize_parallel(pairs: list[PreferencePair], tokenizer, num_proc: int,
                       **kwargs) -> tuple[list[TokenizedPair], TokenizeStats]:
    """``tokenize_pairs`` over ``num_proc`` contiguous slices in spawned processes, merged in order."""
    import multiprocessing

    size = -(-len(pairs) // num_proc)
    starts = list(range(0, len(pairs), size))
    jobs = [(pairs[s:s + size], tokenizer, kwargs) for s in starts]
    with multiprocessing.get_context("spawn").Pool(min(num_proc, len(jobs))) as pool:
        results = pool.map(_tokenize_slice, jobs)
    kept: list[TokenizedPair] = []
    stats = TokenizeStats()
    for start, (part, part_stats) in zip(starts, results):
        kept += [dataclasses.replace(p, index=p.index + start) for p in part]
        for reason, n in part_stats.dropped.items():
            stats.dropped[reason] = stats.dropped.get(reason, 0) + n
        for reason, index in part_stats.first_dropped.items():
            stats.first_dropped.setdefault(reason, index + start)  # slices come in order: the first wins
        if stats.first_prompt_truncated is None and part_stats.first_prompt_truncated is not None:
            stats.first_prompt_truncated = part_stats.first_prompt_truncated + start
        stats.prompt_truncated += part_stats.prompt_truncated
        stats.completion_truncated += part_stats.completion_truncated
        stats.boundary_fallbacks += part_stats.boundary_fallbacks
    stats.kept = len(kept)
    return kept, stats


def render_conversational(pair: PreferencePair, tokenizer) -> tuple[str, str, str]:
    """Render a conversational pair to ``(prompt_text, chosen_text, rejected_text)`` (rule 4)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("tokenizer.chat_template",
                          "the tokenizer has no chat template, so conversational pairs cannot be "
                          "rendered",
                          "use a tokenizer that has one, or set tokenizer.chat_template to a Jinja "
                          "template")
    prompt_messages = list(pair.prompt)
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False,
                                                add_generation_prompt=True)
    completions = []
    for name in ("chosen", "rejected"):
        messages = _as_messages(getattr(pair, name))
        full = tokenizer.apply_chat_template(prompt_messages + messages, tokenize=False,
                                             add_generation_prompt=False)
        if full.startswith(prompt_text):
            completions.append(full[len(prompt_text):])
        else:  # the template rewrote earlier turns: no exact continuation exists
            completions.append("\n".join(str(m.get("content", "")) for m in messages))
    return prompt_text, completions[0], completions[1]


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    """Rule 5's preconditions."""
    if not isinstance(max_length, int) or max_length <= 1:
        raise ConfigError("max_length", f"must be an integer > 1, got {max_length!r}",
                          "room is needed for a prompt token and a completion token")
    if not isinstance(max_prompt_length, int) or max_prompt_length <= 0:
        raise ConfigError("max_prompt_length", f"must be an integer > 0, got {max_prompt_length!r}",
                          "set it to a positive number of tokens, below max_length")


def _specials(tokenizer) -> _Specials:
    """Look up BOS/EOS and the ids the tokenizer appends after a text; EOS is required (rule 3)."""
    eos_text = getattr(tokenizer, "eos_token", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_text is None or eos_id is None:
        raise ConfigError("tokenizer", "the tokenizer has no eos_token, so completions cannot be "
                                       "terminated", "set tokenizer.eos_token")
    bos_text = getattr(tokenizer, "bos_token", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_text is None or bos_id is None:
        bos_text, bos_id = None, None
    return _Specials(bos_id, bos_text, eos_id, eos_text, _appended_suffix(tokenizer))


def _appended_suffix(tokenizer) -> tuple[int, ...]:
    """Ids that ``add_special_tokens=True`` puts after a probe text (e.g. EOS), else ``()``."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return tuple(with_special[start + len(plain):])
    return ()


def _pair_texts(pair: PreferencePair, tokenizer) -> tuple[str, str, str]:
    """The pair as three texts: rendered if conversational, verbatim (type-checked) otherwise."""
    if pair.conversational:
        return render_conversational(pair, tokenizer)
    for name in ("prompt", "chosen", "rejected"):
        value = getattr(pair, name)
        if not isinstance(value, str):
            raise DataError(pair.source or "<pairs>",
                            f"a standard pair needs text, found {type(value).__name__}",
                            row=pair.row or None, field=name,
                            fix="give all three fields as strings, or the prompt as chat messages")
    return pair.prompt, pair.chosen, pair.rejected


def _as_messages(value) -> list[dict]:
    """A completion as a list of messages; a bare string is one assistant message."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return list(value)


def _encode_chunk(texts: list[tuple[str, str, str]], tokenizer, specials: _Specials):
    """Encode (prompt, chosen, rejected) texts; yields (prompt, chosen, rejected, fallbacks) ids.

    The completion ids already end with EOS (rule 3); ``fallbacks`` is how many of the two
    completions needed the rule-2 fallback.
    """
    n = len(texts)
    prompts = [prompt for prompt, _, _ in texts]
    has_bos = [specials.bos_text is not None and p.startswith(specials.bos_text) for p in prompts]
    joint_texts = prompts + [p + c for p, c, _ in texts] + [p + r for p, _, r in texts]
    ids = _encode(tokenizer, joint_texts, [not b for b in has_bos] * 3, specials)
    prompt_ids = ids[:n]
    chosen, chosen_fb = _split(prompt_ids, ids[n:2 * n], [c for _, c, _ in texts], tokenizer)
    rejected, rejected_fb = _split(prompt_ids, ids[2 * n:], [r for _, _, r in texts], tokenizer)
    for i, (_, chosen_text, rejected_text) in enumerate(texts):
        yield (prompt_ids[i], _with_eos(chosen[i], chosen_text, specials),
               _with_eos(rejected[i], rejected_text, specials), chosen_fb[i] + rejected_fb[i])


def _encode(tokenizer, texts: list[str], add_special: list[bool],
            specials: _Specials) -> list[list[int]]:
    """Batched encoding with a per-text special-token setting (rule 1's BOS and suffix handling)."""
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        where = [i for i, f in enumerate(add_special) if f == flag]
        if not where:
            continue
        batch = tokenizer([texts[i] for i in where], add_special_tokens=flag)["input_ids"]
        for i, ids in zip(where, batch):
            ids = list(ids)
            if flag and specials.suffix and tuple(ids[-len(specials.suffix):]) == specials.suffix:
                ids = ids[:-len(specials.suffix)]
            if specials.bos_id is not None and ids[:2] == [specials.bos_id, specials.bos_id]:
                ids = ids[1:]
            out[i] = ids
    return out


def _split(prompt_ids: list[list[int]], joint_ids: list[list[int]], completions: list[str],
           tokenizer) -> tuple[list[list[int]], list[int]]:
    """Rule 2: completion ids = joint ids after the prompt ids, or the completion encoded alone."""
    result: list[list[int]] = []
    fallback: list[int] = []
    for prompt, joint in zip(prompt_ids, joint_ids):
        exact = joint[:len(prompt)] == prompt
        result.append(joint[len(prompt):] if exact else [])
        fallback.append(0 if exact else 1)
    where = [i for i, fb in enumerate(fallback) if fb]
    if where:
        alone = tokenizer([completions[i] for i in where], add_special_tokens=False)["input_ids"]
        for i, ids in zip(where, alone):
            result[i] = list(ids)
    return result, fallback


def _with_eos(ids: list[int], text: str, specials: _Specials) -> list[int]:
    """Rule 3: append EOS unless the text or the ids already end with it."""
    if text.rstrip().endswith(specials.eos_text) or (ids and ids[-1] == specials.eos_id):
        return ids
    return ids + [specials.eos_id]


def _fit(index: int, encoded, max_length: int, max_prompt_length: int, specials: _Specials,
         stats: TokenizeStats, keep_identical: bool = False) -> TokenizedPair | None:
    """Rule 5: truncate one encoded pair, or drop it (counted in ``stats``) and return ``None``."""
    prompt, chosen, rejected, fallbacks = encoded
    prompt, prompt_cut = _keep_last(prompt, max_prompt_length, specials.bos_id)
    if not prompt:  # nothing to condition the first completion token on: start from BOS (or EOS)
        prompt = [specials.bos_id if specials.bos_id is not None else specials.eos_id]
    room = max_length - len(prompt)
    if room < 1:
        return _drop(stats, "prompt_too_long", index)
    chosen_cut, rejected_cut = len(chosen) > room, len(rejected) > room
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected and not keep_identical:
        return _drop(stats, "identical_after_truncation", index)
    stats.prompt_truncated += int(prompt_cut)
    if prompt_cut and stats.first_prompt_truncated is None:
        stats.first_prompt_truncated = index
    stats.completion_truncated += int(chosen_cut) + int(rejected_cut)
    stats.boundary_fallbacks += fallbacks
    return TokenizedPair(prompt, chosen, rejected, index)


def _with_margin(item: TokenizedPair, pair: PreferencePair) -> TokenizedPair:
    """The pair's optional margin carried over to its ids."""
    margin = getattr(pair, "margin", None)
    return item if margin is None else dataclasses.replace(item, margin=float(margin))


def _keep_last(ids: list[int], keep: int, bos_id: int | None) -> tuple[list[int], bool]:
    """The last ``keep`` ids, keeping a leading BOS in front; and whether anything was cut."""
    if len(ids) <= keep:
        return ids, False
    if bos_id is not None and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - (keep - 1):], True
    return ids[len(ids) - keep:], True


def _drop(stats: TokenizeStats, reason: str, index: int) -> None:
    """Count a dropped pair under ``reason``."""
    stats.dropped[reason] = stats.dropped.get(reason, 0) + 1
    stats.first_dropped.setdefault(reason, index)
    return None
