"""The frozen reference policy π_ref.

Two interchangeable strategies, both answering ``logps(batch, split) -> (chosen [B], rejected [B])``:

* ``PrecomputedReference`` (default): before the first optimizer step, the initial model scores every
  pair once (no grad, length-sorted batches) and the results are cached on disk, keyed by a
  fingerprint of the model weights, the token ids and the precision, so a rerun skips the pass.
  Because the pass runs before any update, the reference can never be the trained policy.
* ``ModelReference``: a frozen copy of the initial model that scores each batch as it comes (with
  LoRA no copy: the same model with its adapters disabled, see ``dpolab.lora``). With
  TR-DPO (``--ref-sync-steps``) it is not frozen but pulled towards the policy every τ steps
  (``sync_reference``).

Both work for every batch layout (``PairBatch``, KTO's ``ExampleBatch``): a batch is two halves of
rows, and the reference returns the log-probs of each half.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import lora
from .data.batching import PairBatch, collate, item_tokens, row_length
from .data.layout import Layout
from .data.tokenize import TokenizedPair
from .logprobs import batch_logps
from .runtime import Runtime

CACHE_VERSION = "3"


def pair_logps(model: torch.nn.Module, batch: PairBatch) -> tuple[Tensor, Tensor]:
    """(log π(chosen|prompt), log π(rejected|prompt)) for every pair of the batch, in one forward.

    For KTO's ``ExampleBatch``: (log π(completion|prompt), log π(KL completion|prompt)). ``model`` may
    also be a ``dpolab.distributed.DataParallelPolicy``, whose ``score_batch`` runs the forward under DDP.
    """
    score = getattr(model, "score_batch", None)
    logps = score(batch) if score is not None else batch_logps(model, batch)
    return logps[: batch.num_pairs], logps[batch.num_pairs:]


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: list[TokenizedPair], rt: Runtime, *, batch_size: int,
                pad_token_id: int, desc: str = "scoring", progress: bool = True, ld_alpha: float = 1.0,
                layout: Layout = Layout()) -> Tensor:
    """Log-probs of every pair as a [max index + 1, 2] fp32 tensor (column 0 chosen, 1 rejected).

    Also takes KTO's ``TokenizedExample`` records (column 0 the completion, 1 the KL completion).
    With several processes each scores every ``world_size``-th pair and all get the whole table.
    """
    table = torch.full((max((p.index for p in pairs), default=-1) + 1, 2), float("nan"))
    # Longest first: similar lengths share a batch (little padding) and memory peaks at once; dealt out
    # in turn, so every process gets as many tokens to score as the others.
    order = sorted(pairs, key=row_length, reverse=True)[rt.rank::rt.world_size]
    starts = range(0, len(order), batch_size)
    if getattr(model, "lockstep", False):  # FSDP: all run each forward; process 0's share is the longest
        starts = range(0, math.ceil(len(pairs) / rt.world_size), batch_size)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc=desc, unit="pair", disable=not (progress and rt.is_main))
    for start in starts:
        part = order[start:start + batch_size]  # empty: a share ran out, score a pair that is not kept
        batch = collate(part or pairs[:1], pad_token_id, ld_alpha=ld_alpha, layout=layout).to(rt.device)
        with rt.autocast():
            chosen, rejected = pair_logps(model, batch)
        if not part:
            continue
        table[batch.index.cpu(), 0] = chosen.float().cpu()
        table[batch.index.cpu(), 1] = rejected.float().cpu()
        bar.update(batch.num_pairs)
    bar.close()
    model.train(was_training)
    return gather_rows(table, rt)


def gather_rows(table: Tensor, rt: Runtime) -> Tensor:
    """Join the tables of all processes, each with its own rows filled and NaN elsewhere: a sum of the
    filled values (x + 0 = x exactly) where some process filled the row, NaN where none did."""
    if rt.world_size == 1:
        return table
    filled = ~torch.isnan(table)
    total = rt.reduce_sum(torch.where(filled, table, torch.zeros_like(table)))
    count = rt.reduce_sum(filled.to(torch.int32))
    return torch.where(count > 0, total, torch.full_like(total, float("nan")))


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the weights: names, shapes, dtypes and float64 sums of every parameter."""
    if getattr(model, "weights_fingerprint", None):  # a sharded policy: taken before sharding
        return model.weights_fingerprint
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(p.detach().sum(dtype=torch.float64)):.10e};".encode())
    return h.hexdigest()


def data_fingerprint(pairs: Iterable[TokenizedPair]) -> str:
    """A hash of tokenized records (pairs or KTO examples): the index, then every other field in order."""
    if hasattr(pairs, "fingerprint"):  # a --streaming PairStream: its file and tokenization settings
        return pairs.fingerprint
    h = hashlib.sha256()
    for p in pairs:
        fields = [getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "index"]
        h.update(repr((p.index, *fields)).encode())
    return h.hexdigest()


class PrecomputedReference:
    """Reference log-probs looked up by pair index from tables computed once before training."""

    def __init__(self, tables: dict[str, Tensor]):
        self.tables = tables

    def logps(self, batch: PairBatch, split: str) -> tuple[Tensor, Tensor]:
        index, table = batch.index.cpu(), self.tables[split]
        if index.numel() and int(index.max()) >= table.shape[0]:  # e.g. online pairs: never a silent lookup
            raise KeyError(f"the precomputed reference has no log-probs for pair {int(index.max())} of '{split}' "
                           f"({table.shape[0]} rows): pairs made during training need --reference model")
        rows = table[index].to(batch.input_ids.device)
        return rows[:, 0], rows[:, 1]

    @classmethod
    def build(cls, model: torch.nn.Module, splits: dict[str, list[TokenizedPair]], rt: Runtime, *,
              cache_dir: Path | None, batch_size: int, pad_token_id: int, progress: bool = True,
              say=print, ld_alpha: float = 1.0, layout: Layout = Layout()) -> "PrecomputedReference":
        """Score every split with ``model`` (or reuse the cache). ``ld_alpha``: LD-DPO's weight of the
        tokens past the shorter completion, applied to the reference exactly as to the policy."""
        if getattr(splits.get("train"), "streamed", False):  # --streaming: a memory-mapped table on disk
            from .streaming import build_reference

            return build_reference(model, splits, rt, cache_dir=cache_dir, batch_size=batch_size,
                                   pad_token_id=pad_token_id, progress=progress, say=say, ld_alpha=ld_alpha,
                                   layout=layout)
        key = hashlib.sha256(
            f"{CACHE_VERSION}|{model_fingerprint(model)}|{rt.precision}|ld_alpha={ld_alpha}|{layout}|".encode()
            + "|".join(f"{s}:{data_fingerprint(p)}" for s, p in sorted(splits.items())).encode()
        ).hexdigest()[:16]
        path = cache_dir / f"reference-{key}.pt" if cache_dir is not None else None
        # Processes decide together (nodes may not share a disk): reuse only if every one sees the cache.
        if path is not None and not rt.any_process(not path.is_file()):
            say(f"reference log-probs: reusing cache {path}")
            return cls(torch.load(path, map_location="cpu", weights_only=True))
        started = time.perf_counter()
        tables = {
            split: score_pairs(model, pairs, rt, batch_size=batch_size, pad_token_id=pad_token_id,
                               desc=f"reference log-probs ({split})", progress=progress, ld_alpha=ld_alpha,
                               layout=layout)
            for split, pairs in splits.items()
        }
        seconds = time.perf_counter() - started
        tokens = sum(item_tokens(p) for ps in splits.values() for p in ps)
        say(f"reference log-probs: {sum(map(len, splits.values())):,} pairs, {tokens:,} tokens in {seconds:.1f} s "
            f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)")
        if path is not None and rt.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(tables, tmp)
            tmp.replace(path)  # atomic: a crash never leaves a half-written cache behind
        return cls(tables)


class ModelReference:
    """A frozen copy of the initial policy, scoring each batch under ``no_grad``. For a LoRA policy no
    copy: the policy itself with its (initially no-op) adapters disabled (``dpolab.lora.shared_reference``)."""

    def __init__(self, model: torch.nn.Module, rt: Runtime, copy: bool = True):
        """``copy=False``: ``model`` is already a separate model (``--reference-model``), held as it is."""
        if lora.is_lora(model):
            self.model, self.scope = model, lora.shared_reference(model)
        else:
            self.model = _copy.deepcopy(model).eval() if copy else model.eval()
            self.scope = contextlib.nullcontext
            self.model.requires_grad_(False)
        self.rt = rt

    @torch.no_grad()
    def logps(self, batch: PairBatch, split: str) -> tuple[Tensor, Tensor]:
        with self.scope(), self.rt.autocast():
            chosen, rejected = pair_logps(self.model, batch)
        return chosen.float(), rejected.float()


@torch.no_grad()
def sync_reference(reference, model: torch.nn.Module, step: int, config) -> bool:
    """TR-DPO: after optimizer step ``step`` (1-based), every ``config.ref_sync_steps`` steps, soft-update
    the reference towards the policy, π_ref ← α·π + (1 − α)·π_ref with α = ``config.ref_sync_alpha``
    (α = 1 copies the policy). Returns whether it updated.

    Paper: Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment" (2404.09656).
    Needs a ``ModelReference`` (``--reference model``): precomputed log-probs cannot move.
    """
    every = getattr(config, "ref_sync_steps", None)
    if not every or step % every or reference is None:
        return False
    if not isinstance(reference, ModelReference):
        raise TypeError("TR-DPO reference updates need --reference model, not precomputed log-probs")
    for ref_param, param in zip(reference.model.parameters(), model.parameters()):
        ref_param.lerp_(param.detach().to(ref_param.dtype), config.ref_sync_alpha)
    return True
