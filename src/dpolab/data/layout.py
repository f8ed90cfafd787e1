"""How the sequences of a batch are laid out in rows: padded, prefix-shared, packed.

Every batch item (a pair, or a KTO example) is a prompt x with two completions a and b (chosen and
rejected; or completion and KL completion), and the model must score log π(a|x) and log π(b|x).

* **padded** (the plain layout): two right-padded rows x‖a and x‖b, positions 0..n-1, a 2-D padding
  mask. Every model runs it.
* **prefix sharing**: one row x‖a‖b, so the prompt is encoded once per pair. In the attention mask,
  b's tokens see x and earlier b tokens but not a; b's positions continue from the end of x (as if b
  followed x directly), and b's first token is predicted from x's last hidden state.
* **packing**: several such units share one row, each attending only within itself (block-diagonal
  mask), so rows carry almost no padding. Rows hold at most ``pack_length`` tokens (default: the
  batch's longest unit, so no row is longer, and attention no costlier, than without packing).

Whatever the layout, a batch says which hidden state predicts which scored token (``score_*``): the
log-prob sums are the same up to floating-point noise (tested against the padded layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Which layout to build: ``Layout()`` is the plain padded one."""

    prefix_sharing: bool = False
    packing: bool = False
    pack_length: int | None = None
    """Longest packed row in tokens; None: the longest unit of the batch."""

    @property
    def plain(self) -> bool:
        return not (self.prefix_sharing or self.packing)


@dataclass
class _Unit:
    """One self-contained stretch of a row: tokens, positions, branches and what it scores."""

    tokens: list[int]
    positions: list[int]
    branch: list[int]        # 0 prompt (seen by every branch), 1 and 2 the two completions
    place: list[int]         # for each scored token: its offset in the unit
    predictor: list[int]     # ... and the offset of the hidden state that predicts it
    target: list[int]
    weight: list[float]
    sequence: list[int]      # which log-prob sum each scored token adds to


@dataclass
class Rows:
    """The model inputs of a batch and the recipe to read log-probs off its hidden states."""

    input_ids: Tensor         # [R, T] long
    attention_mask: Tensor    # [R, T] long padding mask (plain layout) or [R, 1, T, T] bool (True = may attend)
    position_ids: Tensor | None  # [R, T] long; None in the plain layout (the model counts 0..n-1)
    loss_mask: Tensor         # [R, T] float: weight of the token at each place in its sequence's sum
    score_positions: Tensor   # [N] long: flat index (row · T + column) of the hidden state predicting each token
    score_targets: Tensor     # [N] long: the scored token ids
    score_weights: Tensor     # [N] float: weight of each scored token (1; α on LD-DPO tails)
    score_sequences: Tensor   # [N] long: sequence each token adds to: item i's first completion is i, its second B + i


def _score(start: int, completion: list[int], weights: list[float], seq: int, first_predictor: int):
    """(places, predictors, targets, weights, sequences) of ``completion`` placed at ``start`` in a unit;
    its first token is predicted by the hidden state at ``first_predictor`` (the prompt's last token)."""
    out: tuple[list, ...] = ([], [], [], [], [])
    for k, (token, w) in enumerate(zip(completion, weights)):
        pred = first_predictor if k == 0 else start + k - 1
        if pred < 0 or w == 0:
            continue  # a row's first token has no predictor (empty prompt): never scored, as in the padded layout
        for column, value in zip(out, (start + k, pred, token, w, seq)):
            column.append(value)
    return out


def _units(prompts, firsts, seconds, first_weights, second_weights, shared: bool) -> list[_Unit]:
    count = len(prompts)
    units: list[_Unit] = []
    if not shared:
        for half, (completions, weights) in enumerate(((firsts, first_weights), (seconds, second_weights))):
            for i in range(count):
                x, c = prompts[i], completions[i]
                n = len(x)
                scored = _score(n, c, weights[i], half * count + i, n - 1)
                units.append(_Unit(x + c, list(range(n + len(c))), [0] * n + [half + 1] * len(c), *scored))
        return units
    for i in range(count):
        x, a, b = prompts[i], firsts[i], seconds[i]
        n, na = len(x), len(a)
        pa = _score(n, a, first_weights[i], i, n - 1)
        pb = _score(n + na, b, second_weights[i], count + i, n - 1)
        units.append(_Unit(x + a + b, list(range(n + na)) + list(range(n, n + len(b))),
                           [0] * n + [1] * na + [2] * len(b), *[u + v for u, v in zip(pa, pb)]))
    return units


def _pack(units: list[_Unit], capacity: int | None) -> list[list[_Unit]]:
    """First-fit decreasing: units, longest first, into rows of at most ``capacity`` tokens."""
    capacity = max([capacity or 0] + [len(u.tokens) for u in units])
    rows: list[list[_Unit]] = []
    room: list[int] = []
    for unit in sorted(units, key=lambda u: len(u.tokens), reverse=True):
        size = len(unit.tokens)
        slot = next((r for r, free in enumerate(room) if free >= size), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(unit)
        room[slot] -= size
    return rows


def build_rows(prompts: list[list[int]], firsts: list[list[int]], seconds: list[list[int]],
               first_weights: list[list[float]], second_weights: list[list[float]], pad_token_id: int,
               layout: Layout = Layout()) -> Rows:
    """Lay out items (prompt, first completion, second completion) in rows per ``layout``."""
    units = _units(prompts, firsts, seconds, first_weights, second_weights, layout.prefix_sharing)
    rows = _pack(units, layout.pack_length) if layout.packing else [[u] for u in units]
    width = max(sum(len(u.tokens) for u in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)  # unit number within its row, -1 on padding
    branch = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    score = ([], [], [], [])
    for r, row in enumerate(rows):
        offset = 0
        for s, unit in enumerate(row):
            end = offset + len(unit.tokens)
            input_ids[r, offset:end] = torch.tensor(unit.tokens, dtype=torch.long)
            positions[r, offset:end] = torch.tensor(unit.positions, dtype=torch.long)
            segment[r, offset:end] = s
            branch[r, offset:end] = torch.tensor(unit.branch, dtype=torch.long)
            loss_mask[r, [offset + p for p in unit.place]] = torch.tensor(unit.weight, dtype=torch.float32)
            score[0].extend(r * width + offset + p for p in unit.predictor)
            score[1].extend(unit.target)
            score[2].extend(unit.weight)
            score[3].extend(unit.sequence)
            offset = end
    padded = segment >= 0
    if layout.plain:
        mask, position_ids = padded.long(), None
    else:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (segment[:, :, None] == segment[:, None, :]) & padded[:, :, None]
        sees = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        mask = (causal & same & sees) | torch.eye(width, dtype=torch.bool)  # padding attends to itself (no NaN)
        mask, position_ids = mask[:, None], positions
    return Rows(input_ids, mask, position_ids, loss_mask, torch.tensor(score[0], dtype=torch.long),
                torch.tensor(score[1], dtype=torch.long), torch.tensor(score[2], dtype=torch.float32),
                torch.tensor(score[3], dtype=torch.long))

