"""``--streaming``: training data larger than memory.

The training data (any source ``--data`` takes: files, folders, Hub names) is never held whole. Each pass
reads it row by row (``dpolab.data.stream``: our own readers for JSON Lines, CSV and JSON, a Hugging Face
``datasets.IterableDataset`` for the rest), normalises the rows to ``PreferencePair`` and tokenizes them
``CHUNK`` at a time with the same rules as the in-memory path, so a pair gets the same index as there:
its position among the pairs kept after reading (rows whose chosen equals rejected are dropped before
counting). A pass is:

1. before anything is written: one counting pass that validates every row and counts the kept pairs;
2. the reference pass (``--reference precompute``): the initial model scores each chunk and appends its
   rows to a float32 [N, 2] file ``OUTPUT_DIR/cache/reference-stream-<key>.f32``, memory-mapped for
   training (looked up by pair index, so only the rows of the current batch are paged in);
3. training: each epoch reads the data again, shuffled through a seeded buffer of ``SHUFFLE_BUFFER``
   pairs (the order depends only on seed and epoch).

Under several processes every process reads the whole stream and takes its share of each batch, and
the reference pass is scored in shares and written by process 0. ``--resume`` replays the stream up to
the checkpoint's step without running the model (``PairStream.optimizer_steps``).

Eval data (``--eval-data``) is loaded in memory as without ``--streaming``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
import random
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import cache as token_cache
from .data.batching import collate
from .data.formats import LoadedData, iter_pairs
from .data.layout import Layout
from .data.load import load_pairs
from .data.stream import stream_rows
from .data.tokenize import TokenizedPair, tokenize_pairs
from .errors import ConfigError, DataError

CHUNK = 4096
"""Pairs read, tokenized and scored at a time."""
SHUFFLE_BUFFER = 10_000
"""Pairs held in the shuffle buffer: the memory bound of the training pass."""


class PairStream:
    """The training pairs of a ``--streaming`` run, read from ``config.data`` again on every pass."""

    streamed = True

    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.fingerprint = "stream:" + token_cache.cache_key(config, tokenizer)
        """Stands for the data in run info and cache keys (file path, size, mtime, tokenizer, lengths)."""
        self.num_pairs: int | None = None
        self.counts: LoadedData | None = None

    def __len__(self) -> int:
        if self.num_pairs is None:
            self.count()
        return self.num_pairs

    def chunks(self) -> Iterator[tuple[int, int, list[TokenizedPair]]]:
        """(offset, pairs read, tokenized pairs) per chunk in file order; indices are global, as in memory."""
        config = self.config
        counts = LoadedData(pairs=[], format="", rows_read=0, source=config.data)
        pairs = iter_pairs(stream_rows(config.data, split=config.data_split), counts)
        offset = 0
        while chunk := list(itertools.islice(pairs, CHUNK)):
            if config.strict and counts.first_dropped:
                _refuse(config, counts.first_dropped)
            tokenized, stats = tokenize_pairs(chunk, self.tokenizer, max_length=config.max_length,
                                              max_prompt_length=config.max_prompt_length)
            problems = {r: chunk[i].row for r, i in stats.first_dropped.items()}
            if stats.first_prompt_truncated is not None:
                problems["prompt_truncated"] = chunk[stats.first_prompt_truncated].row
            if config.strict and problems:
                _refuse(config, problems)
            yield offset, len(chunk), [dataclasses.replace(p, index=p.index + offset) for p in tokenized]
            offset += len(chunk)
        if config.strict and counts.first_dropped:
            _refuse(config, counts.first_dropped)
        self.counts = counts

    def count(self) -> list[str]:
        """One whole pass: validates every row, sets ``num_pairs``; returns the summary lines."""
        kept = read = 0
        for _, n, tokenized in self.chunks():
            kept, read = kept + len(tokenized), read + n
        c = self.counts
        if c.rows_read == 0:
            raise DataError(self.config.data, "no rows found", fix="the source must hold at least one preference pair")
        if kept == 0:
            raise DataError(self.config.data, f"no train pair is usable within max_length={self.config.max_length} "
                            f"({c.rows_read:,} rows read)", fix="raise --max-length or lower --max-prompt-length")
        self.num_pairs = kept
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(c.dropped.items())) or "none"
        return [f"train: {c.rows_read:,} rows streamed from {c.source} (format: {c.format}); {read:,} pairs read, "
                f"dropped {dropped}; {kept:,} pairs tokenized (--streaming: tokenized on the fly each epoch, shuffle "
                f"buffer {SHUFFLE_BUFFER:,})"]

    def epoch_pairs(self, epoch: int) -> Iterator[TokenizedPair]:
        """The tokenized pairs of one epoch, shuffled through a buffer seeded by (seed, epoch)."""
        rng = random.Random(self.config.seed * 100_003 + epoch)
        pairs = (p for _, _, tokenized in self.chunks() for p in tokenized)
        return buffer_shuffle(pairs, SHUFFLE_BUFFER, rng)

    def optimizer_steps(self, config, rt, pad_token_id: int, start: int = 0):
        """Like ``trainer.optimizer_steps``: endless (epoch, [(micro-batch, counts), ...]) from step ``start``.

        A step's micro-batches are the next ``batch_size × world_size`` pairs of the epoch's stream each, and
        every process takes its share (``b[rank::world_size]``; an empty share gets a pair that does not
        count), so N processes × batch B train as one process × batch N·B. The order depends only on (seed,
        epoch): a resumed run skips the epochs before ``start`` unread and replays the rest of its epoch
        from the file (reading and tokenizing, no model forward)."""
        size = config.batch_size * rt.world_size
        per_epoch = math.ceil(math.ceil(len(self) / size) / config.grad_accum)
        epoch = start // per_epoch
        step = epoch * per_epoch
        while True:
            pairs = self.epoch_pairs(epoch)
            batches = iter(lambda: list(itertools.islice(pairs, size)), [])
            for i, group in enumerate(iter(lambda: list(itertools.islice(batches, config.grad_accum)), [])):
                if step >= start:
                    shares = [(b[rt.rank::rt.world_size] or b[:1], len(b) > rt.rank) for b in group]
                    yield epoch + (i + 1) / per_epoch, [
                        (collate(share, pad_token_id, ld_alpha=config.ld_alpha, layout=config.layout), counts)
                        for share, counts in shares]
                step += 1
            epoch += 1


def _refuse(config, problems: dict[str, int]) -> None:
    from .prepare import STRICT_REASONS

    reason, row = min(problems.items(), key=lambda item: item[1])
    raise DataError(config.data, f"unusable pair ({STRICT_REASONS.get(reason, reason)}) and --strict is on",
                    row=row or None, fix="fix or remove the row, or drop --strict to skip such rows")


def buffer_shuffle(items, size: int, rng: random.Random):
    """Yield ``items`` in a random order holding at most ``size`` of them: each new item takes the place of
    a random one from the buffer, which is yielded; the rest is shuffled at the end."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def prepare_streaming(config, tokenizer):
    """``prepare_data`` under ``--streaming``: a counted ``PairStream`` for training, eval pairs in memory."""
    from .prepare import PreparedData, _check_strict, _load_line, _tokenize

    stream = PairStream(config, tokenizer)
    data = PreparedData(train=stream, summary=stream.count())
    if config.eval_data:
        loaded = load_pairs(config.eval_data, split=config.data_split)
        _check_strict(config, loaded)
        data.summary.append(_load_line("eval", loaded))
        data.eval, lines = _tokenize("eval", config.eval_data, loaded.pairs, tokenizer, config)
        data.summary += lines
    return data


def reference_path(model, stream: PairStream, rt, cache_dir: Path, ld_alpha: float, layout) -> Path:
    from .reference import CACHE_VERSION, model_fingerprint

    key = hashlib.sha256(f"{CACHE_VERSION}|{model_fingerprint(model)}|{rt.precision}|ld_alpha={ld_alpha}|{layout}|"
                         f"{stream.fingerprint}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"reference-stream-{key}.f32"


def _score_into(path: Path, model, stream: PairStream, rt, progress: bool, say, kwargs) -> None:
    """Score the stream a chunk at a time into ``path``. Under several processes each scores its share of
    every chunk (``score_pairs`` deals the pairs out and gathers the rows) and process 0 writes the file."""
    from .reference import score_pairs

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    bar = tqdm(total=len(stream), desc="reference log-probs (train, streamed)", unit="pair",
               disable=not (progress and rt.is_main))
    with open(tmp, "wb") if rt.is_main else contextlib.nullcontext() as handle:
        for offset, n, tokenized in stream.chunks():
            rows = torch.full((n, 2), float("nan"))
            local = [dataclasses.replace(p, index=p.index - offset) for p in tokenized]
            if local:  # the same in every process: a chunk's kept pairs do not depend on the process
                scored = score_pairs(model, local, rt, progress=False, **kwargs)
                rows[: len(scored)] = scored
            if handle is not None:
                handle.write(rows.numpy().astype(np.float32).tobytes())
            bar.update(len(tokenized))
    bar.close()
    if rt.is_main:
        tmp.replace(path)  # atomic: a crash never leaves a half-written table behind
    say(f"reference log-probs: {len(stream):,} streamed pairs scored into {path}")


def open_table(path: Path) -> torch.Tensor:
    """The [N, 2] float32 table in ``path``, memory-mapped read-only (pages are read when indexed)."""
    array = np.memmap(path, dtype=np.float32, mode="r").reshape(-1, 2)
    with warnings.catch_warnings():  # read-only: torch warns that writes would fail; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def build_reference(model, splits: dict, rt, *, cache_dir: Path, batch_size: int, pad_token_id: int,
                    progress: bool = True, say=print, ld_alpha: float = 1.0, layout=None):
    """``PrecomputedReference.build`` when ``splits["train"]`` is a ``PairStream``: the train table is scored a
    chunk at a time into a memory-mapped file; other splits (eval, in memory) go through the usual path."""
    from .reference import PrecomputedReference

    kwargs = dict(batch_size=batch_size, pad_token_id=pad_token_id, ld_alpha=ld_alpha, layout=layout or Layout())
    stream, rest = splits["train"], {k: v for k, v in splits.items() if k != "train"}
    tables = {}
    if rest:
        tables = PrecomputedReference.build(model, rest, rt, cache_dir=cache_dir, progress=progress, say=say,
                                            **kwargs).tables
    path = reference_path(model, stream, rt, cache_dir, ld_alpha, layout)
    if not rt.any_process(not path.is_file()):  # every process must see it (as PrecomputedReference.build)
        say(f"reference log-probs: reusing memory-mapped cache {path}")
    else:
        _score_into(path, model, stream, rt, progress, say, kwargs)
        rt.any_process(False)  # a barrier: every process looks for the file once process 0 has written it
    if rt.any_process(not path.is_file()):  # the others read process 0's file
        raise ConfigError("output_dir", f"some process cannot see {path}, written by process 0",
                          "with --streaming on several machines, put --output-dir on a disk they share")
    tables["train"] = open_table(path)
    return PrecomputedReference(tables)
