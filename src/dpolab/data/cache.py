"""Tokenized pairs cached on disk, so that a rerun (or ``--resume``) skips loading and tokenizing.

A cache file is ``OUTPUT_DIR/cache/tokenized-<key>.safetensors``. The key is a hash of everything that
decides the tokenized pairs: the data sources' fingerprints (a file's path, size and modification time;
every file of a ``save_to_disk`` folder; a hub dataset's name and split), the tokenizer's fingerprint
(its full serialized definition when it is a fast tokenizer, else vocabulary and special tokens; plus
its chat template), ``max_length``, ``max_prompt_length``, ``strict``, the held-out split settings and
``CACHE_VERSION``. ``num_proc`` is not part of it: tokenizing in several processes gives the same pairs.

The file holds, per split (``train``, ``eval``) and per field (``prompt``, ``chosen``, ``rejected``),
the token ids of all pairs concatenated (int32) and each pair's length (int32), plus the pairs' indices
(int64), margins (float64, NaN for none) and objective ids (int64); the summary lines printed for the data sit in
the file's metadata. With ``--objective`` the key also holds the objectives' names (their order decides the ids) and
the fingerprints of their own data files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from dpolab.data.tokenize import TokenizedPair

CACHE_VERSION = 3
"""Bump when tokenization rules change: old cache files then no longer match."""

_FIELDS = ("prompt", "chosen", "rejected")
_NO_MARGIN = float("nan")


def source_fingerprint(source: str | None, split: str) -> dict | None:
    """What identifies a data source's content without reading it."""
    if not source:
        return None
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"folder": str(path.resolve()), "split": split,
                "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    if path.is_file():
        stat = path.stat()
        return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"hub": source, "split": split}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's output: its definition, special tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: vocabulary, merges, normalizer, pre/post-processors
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update(json.dumps(sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    probe = "Hello\nworld"  # catches settings such as add_bos_token/add_eos_token
    h.update(json.dumps(list(tokenizer(probe, add_special_tokens=True)["input_ids"])).encode())
    return h.hexdigest()


def cache_key(config, tokenizer) -> str:
    """The hash naming the cache file for ``config``'s data tokenized with ``tokenizer``."""
    parts = {
        "version": CACHE_VERSION,
        "data": source_fingerprint(config.data, config.data_split),
        "eval_data": source_fingerprint(config.eval_data, config.data_split),
        "eval_split": config.eval_split,
        "split_seed": config.seed if config.eval_split else None,  # the seed only decides the held-out split
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "strict": config.strict,
        "objectives": _objectives_fingerprint(config),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _objectives_fingerprint(config) -> list | None:
    """--objective: names in order (they decide each pair's objective id) and each objective file's fingerprint."""
    from dpolab.objectives import parse  # late import: objectives imports the data modules

    specs = getattr(config, "objective", None)
    if not specs:
        return None
    return [[o.name, source_fingerprint(o.path, config.data_split)] for o in parse(specs)]


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"tokenized-{key}.safetensors"


def save(path: Path, splits: dict[str, list[TokenizedPair]], summary: list[str]) -> None:
    """Write ``splits`` (name -> pairs) and the summary lines; atomic, so a crash leaves no half file."""
    from safetensors.torch import save_file

    tensors = {}
    for name, pairs in splits.items():
        if not pairs:
            continue
        tensors[f"{name}.index"] = torch.tensor([p.index for p in pairs], dtype=torch.int64)
        tensors[f"{name}.margin"] = torch.tensor([_NO_MARGIN if p.margin is None else p.margin for p in pairs],
                                                 dtype=torch.float64)
        tensors[f"{name}.objective"] = torch.tensor([p.objective for p in pairs], dtype=torch.int64)
        for field in _FIELDS:
            rows = [getattr(p, f"{field}_ids") for p in pairs]
            tensors[f"{name}.{field}.lengths"] = torch.tensor([len(r) for r in rows], dtype=torch.int32)
            tensors[f"{name}.{field}.ids"] = torch.tensor([t for r in rows for t in r], dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: ranks may write at once
    save_file(tensors, str(tmp), metadata={"summary": json.dumps(summary), "version": str(CACHE_VERSION)})
    tmp.replace(path)


def load(path: Path) -> tuple[dict[str, list[TokenizedPair]], list[str]] | None:
    """The splits and summary lines saved at ``path``, or None when there is no usable file."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a damaged file is a cache miss, not an error: it is rewritten
        return None
    if meta.get("version") != str(CACHE_VERSION):
        return None
    names = sorted({k.split(".")[0] for k in tensors})
    return {name: _unpack(tensors, name) for name in names}, json.loads(meta.get("summary", "[]"))


def _unpack(tensors: dict[str, torch.Tensor], name: str) -> list[TokenizedPair]:
    indices = tensors[f"{name}.index"].tolist()
    objectives = tensors[f"{name}.objective"].tolist()
    columns = []
    for field in _FIELDS:
        ids = tensors[f"{name}.{field}.ids"].tolist()
        rows, start = [], 0
        for length in tensors[f"{name}.{field}.lengths"].tolist():
            rows.append(ids[start:start + length])
            start += length
        columns.append(rows)
    margins = [None if m != m else m for m in tensors[f"{name}.margin"].tolist()]  # NaN: no margin
    return [TokenizedPair(p, c, r, i, margin=m, objective=k)
            for p, c, r, i, m, k in zip(*columns, indices, margins, objectives)]
