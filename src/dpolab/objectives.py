"""Multi-objective DPO: several objectives, each with its own preference pairs, trained with one weighted loss.

An objective is a name and a weight (``--objective helpful=0.7 --objective harmless=0.3``). Its pairs
are the ones ranked by it: rows of ``--data`` (and ``--eval-data``) whose ``objective`` column names
it, the rows of its own file (``--objective harmless=0.3:harmless.jsonl``), and, when exactly one
objective is given without a file, every row of ``--data`` without an ``objective`` column.

The loss is L = Σ_k w_k · mean_{i ∈ k} ℓ_i / Σ_k w_k: each objective's mean per-pair loss, weighted.
Why per-objective means rather than one mean over all pairs: an objective with ten times more pairs
would otherwise weigh ten times more whatever its weight says. The loop estimates L from random
batches by giving each pair of objective k the weight c_k = w_k · N / (N_k · Σw), N_k counting the
objective's pairs in the whole split (N all pairs): the mean of c_k·ℓ_i over a random batch is then
an unbiased estimate of L, and its scale does not jump when a small batch happens to hold no pair of
some objective (as weights from the counts in each batch would). The loss functions stay pure: the
weights multiply their per-pair output in ``steps.pair_losses`` (``ObjectiveScales.apply``), which
also logs ``objective/NAME/loss``, ``objective/NAME/rewards/accuracies`` and
``objective/NAME/rewards/margins`` (unweighted, over that objective's pairs).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .errors import ConfigError, DataError

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
"""Objective names: they become metric keys (objective/NAME/loss), so no slashes or spaces."""
EXAMPLE = "--objective helpful=0.7 --objective harmless=0.3"


@dataclass(frozen=True)
class Objective:
    name: str
    weight: float
    path: Optional[str] = None
    """The objective's own preference pairs (any --data format), or None: pairs tagged in --data."""


# ---------------------------------------------------------------------------------------------
# Configuration


def normalise(value: Any) -> Any:
    """The YAML/Python forms as a list of 'NAME=WEIGHT[:PATH]' texts: a list (of texts, or of one-key
    mappings), a mapping ``{helpful: 0.7, harmless: "0.3:harmless.jsonl"}``, or a single text."""
    if value is None or isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()] or None
    if isinstance(value, (list, tuple)):
        items = [f"{k}={v}" for item in value for k, v in item.items()] if all(
            isinstance(item, dict) for item in value) else list(value)
        return items or None
    return value  # anything else: the type check names it


def parse(specs: Optional[list[str]]) -> list[Objective]:
    """'NAME=WEIGHT[:PATH]' texts as objectives (ConfigError naming the bad one)."""
    out = []
    for spec in specs or []:
        name, eq, rest = str(spec).partition("=")
        weight_text, colon, path = rest.partition(":")
        name = name.strip()
        if not eq or not NAME.match(name):
            raise ConfigError("objective", f"expected NAME=WEIGHT or NAME=WEIGHT:PATH, got '{spec}'",
                              f"write e.g. {EXAMPLE} (names: letters, digits, _ . -)")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError("objective", f"'{spec}': the weight '{weight_text}' is not a number",
                              f"write e.g. {EXAMPLE}") from None
        if colon and not path.strip():
            raise ConfigError("objective", f"'{spec}': no file after ':'", "write NAME=WEIGHT:PATH, or drop the ':'")
        out.append(Objective(name, weight, path.strip() if colon else None))
    return out


def validate(c) -> None:
    """--objective: well-formed, unique names, finite weights >= 0 and not all 0; what it cannot combine with."""
    if not c.objective:
        return
    from .losses import get_loss  # late import: losses do not depend on the config

    objectives = parse(c.objective)
    repeated = [n for n, count in Counter(o.name for o in objectives).items() if count > 1]
    if repeated:
        raise ConfigError("objective", f"'{repeated[0]}' is given more than once", "give each objective once")
    for o in objectives:
        if not (math.isfinite(o.weight) and o.weight >= 0):
            raise ConfigError("objective", f"the weight of '{o.name}' must be finite and >= 0, got {o.weight}",
                              f"write e.g. {EXAMPLE}")
    if not any(o.weight > 0 for o in objectives):
        raise ConfigError("objective", "every weight is 0, so nothing would be trained",
                          "give at least one objective a weight > 0")
    if c.streaming:
        raise ConfigError("streaming", "cannot be combined with --objective (the pairs per objective must be "
                          "counted before training)", "drop --streaming, or train without --objective")
    if getattr(get_loss(c.loss), "unpaired", False):
        raise ConfigError("objective", f"weighs preference pairs, not '{c.loss}'s unpaired examples",
                          "drop --objective, or pick a pairwise loss")


# ---------------------------------------------------------------------------------------------
# Data: which objective each pair belongs to


def load_files(config, load: Callable, check: Callable) -> tuple[list, list[str]]:
    """The pairs of every objective given with its own file, tagged with it, and one summary line per file.

    ``load`` is ``dpolab.data.load.load_pairs``; ``check(config, loaded)`` refuses unusable rows under --strict.
    """
    pairs, lines = [], []
    for o in parse(config.objective):
        if o.path is None:
            continue
        loaded = load(o.path, split=config.data_split)
        check(config, loaded)
        pairs += [replace(p, objective=o.name) for p in loaded.pairs]
        lines.append(f"objective {o.name}: {loaded.rows_read:,} rows read from {loaded.source} "
                     f"(format: {loaded.format}); {len(loaded.pairs):,} pairs kept")
    return pairs, lines


def tag(config, pairs: list) -> list[int]:
    """Each pair's objective id (its position in --objective); DataError naming the file and row of a pair
    whose objective is not listed, or of an untagged pair when no single objective can take it."""
    objectives = parse(config.objective)
    ids = {o.name: k for k, o in enumerate(objectives)}
    no_file = [o.name for o in objectives if o.path is None]
    out = []
    for p in pairs:
        name = p.objective
        if name is None:
            if len(no_file) != 1:
                given = "none" if not no_file else ", ".join(no_file)
                raise DataError(p.source, f"the pair has no 'objective' column, and --objective lists {len(no_file)} "
                                f"objectives without their own file ({given}) to take it", row=p.row or None,
                                field="objective", fix="add an 'objective' column naming one of "
                                f"{', '.join(ids)}, or give exactly one --objective without a :PATH")
            name = no_file[0]
        if name not in ids:
            raise DataError(p.source, f"unknown objective '{name}': --objective lists {', '.join(ids)}",
                            row=p.row or None, field="objective",
                            fix=f"add --objective {name}=WEIGHT, or fix the row's objective column")
        out.append(ids[name])
    return out


def attach(tokenized: list, ids: list[int]) -> list:
    """Tokenized pairs with their objective ids (``TokenizedPair.index`` is the position in the tagged list)."""
    return [replace(t, objective=ids[t.index]) for t in tokenized]


def check_counts(config, source: str, train: list) -> None:
    """Every objective with a weight > 0 needs training pairs (else its mean loss is undefined)."""
    counts = Counter(t.objective for t in train)
    for k, o in enumerate(parse(config.objective)):
        if o.weight > 0 and not counts[k]:
            raise DataError(o.path or source, f"objective '{o.name}' (weight {o.weight:g}) has no training pair "
                            "left", fix=f"add pairs tagged '{o.name}', or give it weight 0")


def summary_line(config, splits: dict[str, list]) -> str:
    counts = {name: Counter(t.objective for t in pairs) for name, pairs in splits.items() if pairs}
    parts = [f"{o.name} (weight {o.weight:g}): " + ", ".join(f"{c[k]:,} {name}" for name, c in counts.items())
             for k, o in enumerate(parse(config.objective))]
    return "objectives: " + "; ".join(parts) + " pairs"


# ---------------------------------------------------------------------------------------------
# The weighted loss and per-objective metrics


def pair_scales(weights: list[float], counts: list[int]) -> Tensor:
    """c_k = w_k · N / (N_k · Σ_{j: N_j > 0} w_j), 0 for an objective without pairs ([K], float32)."""
    total = sum(counts)
    present = sum(w for w, n in zip(weights, counts) if n > 0)
    return torch.tensor([w * total / (n * present) if n > 0 and present > 0 else 0.0
                         for w, n in zip(weights, counts)], dtype=torch.float32)


class ObjectiveScales:
    """The per-pair weights of each split (from its own counts) and the objectives' names, for one run."""

    def __init__(self, names: list[str], scales: dict[str, Tensor]):
        self.names, self.scales = names, scales

    @classmethod
    def build(cls, config, splits: dict[str, list]) -> Optional["ObjectiveScales"]:
        """None without --objective; else the scales of each non-empty split ("train", "eval")."""
        if not config.objective:
            return None
        objectives = parse(config.objective)
        weights = [o.weight for o in objectives]
        scales = {}
        for split, pairs in splits.items():
            counts = Counter(getattr(p, "objective", -1) for p in pairs)
            scales[split] = pair_scales(weights, [counts[k] for k in range(len(objectives))])
        return cls([o.name for o in objectives], scales)

    def apply(self, losses: Tensor, metrics: dict[str, Tensor], batch, split: str) -> tuple[Tensor, dict]:
        """(per-pair losses × c_k, metrics with ``loss`` weighted alike and per-objective metrics added)."""
        ids = batch.objective.to(losses.device)
        out = dict(metrics)
        plain = losses.detach()
        for k, name in enumerate(self.names):
            mask = ids == k
            out[f"objective/{name}/loss"] = plain[mask]
            for key in ("rewards/accuracies", "rewards/margins"):
                if key in metrics:
                    out[f"objective/{name}/{key}"] = metrics[key][mask]
        weighted = losses * self.scales[split].to(losses.device)[ids]
        out["loss"] = weighted.detach()
        return weighted, out
