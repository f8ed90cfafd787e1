"""An AI judge: a causal LM that says which of two responses better follows each principle.

Constitutional AI / RLAIF labelling without a reward model: for every principle of a constitution
(``dpolab.constitution``) the judge model reads a question showing the prompt and the two responses,
and its answer is read off the log-probabilities of the two answer labels (no text is generated):

    p_AB = exp ℓ(A) / (exp ℓ(A) + exp ℓ(B)),   ℓ(L) = log π_judge(prefix + L | question)

where ℓ sums the log-probs of every token of the label's continuation (a tokenizer may make " A" one
token and " B" two; both are scored in full). LMs prefer one answer position, so each question is
also asked with the responses swapped, and the principle's vote for the first response is

    P(first better) = ½ · (p_AB(first) + p_BA(first)),

which cancels a constant position bias exactly: a judge that always answers "A" votes ½. Swapping the
arguments gives 1 − P by construction. A pair's probability is the mean of its principles' votes
(or, with ``aggregate: majority``, the share of principles that vote for it, ties counting ½).

The questions of all pairs × principles × orders are scored in batches (longest first, no grad), one
forward per question when one label's tokens but the last are a prefix of the other's. When a question
does not fit the judge model's context, the two responses are cut (never the prompt, principle or
template), and the judge says so once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .constitution import Constitution
from .errors import ConfigError
from .judges import Judge


@dataclass(frozen=True)
class Votes:
    """Per pair and principle, the judge's probability that the first response is better."""

    first_order: list[list[float]]
    """p_AB: asked with the first response shown first (label A), P(answer A)."""
    second_order: list[list[float]]
    """p_BA(first): asked with the responses swapped, P(the label of the first response, B)."""

    @property
    def per_principle(self) -> list[list[float]]:
        """½ (p_AB + p_BA): the position-debiased vote of each principle."""
        return [[0.5 * (a + b) for a, b in zip(ra, rb)] for ra, rb in zip(self.first_order, self.second_order)]

    def aggregate(self, how: str = "mean") -> list[float]:
        """One probability per pair: the mean of the principles' votes, or the share of principles whose
        vote is above ½ (``majority``; a vote of exactly ½ counts half)."""
        if how == "mean":
            return [sum(row) / len(row) for row in self.per_principle]
        if how == "majority":
            return [sum(1.0 if v > 0.5 else 0.5 if v == 0.5 else 0.0 for v in row) / len(row)
                    for row in self.per_principle]
        raise ValueError(f"unknown aggregate {how!r}")


class AIJudge(Judge):
    """A pairwise judge from a causal LM and a constitution (see the module docstring)."""

    pointwise = False

    def __init__(self, model, tokenizer, constitution: Constitution | None = None, *, batch_size: int = 16,
                 context: int | None = None, progress: bool = False, name: str = "ai"):
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {batch_size}", "use a positive integer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.constitution = constitution or Constitution.default()
        self.batch_size, self.progress, self.name = batch_size, progress, name
        self.context = context or model_context(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._warned = False
        self._room_tokens: int | None = None

    @classmethod
    def load(cls, model_path: str, *, constitution: str | None = None, device: str = "auto",
             batch_size: int = 16, progress: bool = False) -> "AIJudge":
        """The judge model from a folder or hub name (fp32, eval mode) and the constitution from a YAML
        file (``None``: the built-in default of ``dpolab.constitution``)."""
        from .generate import load_for_inference
        from .runtime import resolve_device

        rules = Constitution.read(constitution)  # read first: a bad file fails before a model loads
        tokenizer, model = load_for_inference(model_path, resolve_device(device))
        return cls(model, tokenizer, rules, batch_size=batch_size, progress=progress, name=f"ai:{model_path}")

    # --------------------------------------------------------------------------------------------

    def compare(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        """P(first better) per pair: the constitution's aggregate of the position-debiased votes."""
        return self.votes(prompts, first, second).aggregate(self.constitution.aggregate)

    def votes(self, prompts: list[str], first: list[str], second: list[str]) -> Votes:
        """Both orders of every principle for every pair, scored in one batched pass."""
        if not len(prompts) == len(first) == len(second):
            raise ValueError("compare needs one prompt, first and second response per pair")
        rules = self.constitution
        questions = []
        for prompt, a, b in zip(prompts, first, second):
            for principle in rules.principles:
                questions.append(self._fit(principle, prompt, a, b))
                questions.append(self._fit(principle, prompt, b, a))
        p_first_label = self.first_label_probabilities(questions)
        n = len(rules.principles)
        ab = [[p_first_label[2 * (i * n + k)] for k in range(n)] for i in range(len(prompts))]
        ba = [[1.0 - p_first_label[2 * (i * n + k) + 1] for k in range(n)] for i in range(len(prompts))]
        return Votes(ab, ba)

    # --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def first_label_probabilities(self, questions: list[str]) -> list[float]:
        """P(first label) = softmax over the two labels' continuation log-probs, for each question."""
        unique = sorted(set(questions), key=lambda q: (-len(q), q))  # same batches whatever the order asked
        ids, label_ids = self._encode(unique)
        logps = torch.zeros(len(unique), 2, dtype=torch.float64)
        order = sorted(range(len(unique)), key=lambda i: -(len(ids[i]) + max(map(len, label_ids[i]))))
        bar = tqdm(total=len(unique), desc="AI judge", unit="question", disable=not self.progress)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            logps[chunk] = self._score_chunk([ids[i] for i in chunk], [label_ids[i] for i in chunk])
            bar.update(len(chunk))
        bar.close()
        p = torch.sigmoid(logps[:, 0] - logps[:, 1]).tolist()
        index = {q: i for i, q in enumerate(unique)}
        return [p[index[q]] for q in questions]

    def _encode(self, questions: list[str]) -> tuple[list[list[int]], list[tuple[list[int], list[int]]]]:
        """Question ids (as the trainer encodes prompts) and each label's continuation ids, "joint, then
        split": ids of question + continuation beyond the question's ids, or the continuation encoded
        alone when a merge crosses the boundary."""
        from .generate import encode_prompts

        q_ids = encode_prompts(self.tokenizer, questions)
        labels = []
        for label in self.constitution.labels:
            text = self.constitution.answer_prefix + label
            alone = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            joint = encode_prompts(self.tokenizer, [q + text for q in questions])
            labels.append([j[len(q):] if j[:len(q)] == q and len(j) > len(q) else alone for q, j in zip(q_ids, joint)])
        if any(not a or not b for a, b in zip(*labels)):
            raise ConfigError("constitution.labels", "a label encodes to no token",
                              "use labels the judge model's tokenizer can write, e.g. A and B")
        return q_ids, list(zip(*labels))

    def _score_chunk(self, questions: list[list[int]], labels: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """[n, 2] log-probs of the two label continuations after each question (float64)."""
        from .logprobs import scored_logps

        rows, positions, targets, sequences = [], [], [], []
        for i, (q, (a, b)) in enumerate(zip(questions, labels)):
            rows.append(q + a)
            for seq, label in ((2 * i, a), (2 * i + 1, b)):
                # label b reuses a's row when a's tokens before each of b's are b's own (b[:-1] prefix of a)
                if seq % 2 == 1 and not (len(b) - 1 <= len(a) and a[:len(b) - 1] == b[:-1]):
                    rows.append(q + b)
                row = len(rows) - 1
                for k, token in enumerate(label):
                    positions.append((row, len(q) - 1 + k))
                    targets.append(token)
                    sequences.append(seq)
        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[r, :len(ids)] = 1
        flat = torch.tensor([r * width + c for r, c in positions], device=device)
        out = scored_logps(self.model, input_ids.to(device), attention.to(device), None, flat,
                           torch.tensor(targets, device=device), torch.ones(len(targets), device=device),
                           torch.tensor(sequences, device=device), 2 * len(questions))
        return out.double().cpu().view(len(questions), 2)

    # --------------------------------------------------------------------------------------------

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def _room(self) -> int:
        """Tokens a question may take: the context less the longer label and a little slack for merges."""
        if self._room_tokens is None:
            longest = max(len(self.tokenizer(self.constitution.answer_prefix + x, add_special_tokens=False)
                              ["input_ids"]) for x in self.constitution.labels)
            self._room_tokens = self.context - longest - 2
        return self._room_tokens

    def _fit(self, principle: str, prompt: str, first: str, second: str) -> str:
        """The question, with the responses cut from their ends when it exceeds the judge's context."""
        rules = self.constitution
        question = rules.question(principle, prompt, first, second)
        room = self._room()
        # every token but BOS and a sentencepiece prefix covers at least one byte: short texts fit untokenized
        if len(question.encode("utf-8")) + 4 <= room or self._length(question) <= room:
            return question
        budget = room - self._length(rules.question(principle, prompt, "", ""))
        if budget < 2:
            raise ConfigError("judge", f"the AI judge's model has a context of {self.context} tokens, and the question "
                              f"without the responses already takes {room - budget} of them",
                              "use a judge model with a longer context, or shorter prompts, principles or template")
        if not self._warned:
            print(f"dpolab: AI judge: a question is longer than the judge model's context ({self.context} tokens); "
                  "responses are cut to fit (said once)", file=sys.stderr)
            self._warned = True
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (first, second)]
        for _ in range(4):
            keep = _share(budget, len(ids[0]), len(ids[1]))
            cut = [self.tokenizer.decode(x[:k], skip_special_tokens=True) for x, k in zip(ids, keep)]
            question = rules.question(principle, prompt, cut[0], cut[1])
            over = self._length(question) - room
            if over <= 0:
                return question
            budget -= max(over, 1)
        raise ConfigError("judge", f"could not cut the responses to fit the judge's context of {self.context} tokens",
                          "use a judge model with a longer context")


def _share(budget: int, a: int, b: int) -> tuple[int, int]:
    """Split ``budget`` tokens between two responses of ``a`` and ``b`` tokens: each keeps half, and a
    response shorter than its half leaves the rest to the other."""
    half = budget // 2
    if a <= half:
        return a, min(b, budget - a)
    if b <= half:
        return min(a, budget - b), b
    return half, budget - half


def model_context(model, tokenizer) -> int:
    """The longest sequence the judge model takes: its ``max_position_embeddings`` (or the tokenizer's
    ``model_max_length`` when that is smaller and set)."""
    limits = [getattr(getattr(model, "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10 ** 7]
    return min(limits) if limits else 2048


__all__ = ["AIJudge", "Votes", "Constitution", "model_context"]
