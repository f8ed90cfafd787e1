"""Online DPO: preference pairs sampled from the policy being trained, judged as they are drawn.

Offline DPO learns from pairs some other policy wrote (π_ref, or whoever made the data); the further
the policy moves, the less those pairs say about what it now writes. With ``--online`` the training
loop calls ``OnlinePairs`` before every ``--online-every``-th optimizer step: the current policy (eval
mode, ``torch.no_grad``, batched) samples ``--online-samples`` completions for each of
``--online-prompts`` training prompts, the judge (``dpolab.judges``) ranks each prompt's samples, and
the best and the worst become one pair (``dpolab.label.pair_rows``, rule best-worst; a tie or two
identical texts make none). The pairs are collated with the run's layout and added to that step's
micro-batches, where they weigh like any other pair (the loss divides by all pairs of the step).
``--online-only`` trains on them alone; ``--data`` then only supplies the prompts.

Choices, and why:

* **The exact sampled ids are trained**, not their text re-tokenized: the pair's prompt ids are the
  training prompt's ids (already truncated by ``dpolab.data.tokenize``) and each completion is the
  ids that were drawn, ending with EOS when the policy stopped and cut (without EOS, as rule 5 of
  ``tokenize`` cuts completions) to fit ``--max-length``. Re-tokenizing decoded text can give other
  ids, and would append an EOS to samples the length budget cut, teaching the policy to stop where it
  never chose to. The judge sees text: the decoded prompt and ``generate.completion_text``.
* **Prompts**: the distinct prompts of the training pairs in a seeded order, taken in turn, so online
  step j (j = step // every) uses positions j·P … j·P + P − 1 (mod their number).
* **Seeds** come from (``--seed``, step): a rerun samples the same completions, and ``--resume`` needs
  nothing saved (the checkpoint restores the policy, the step gives the prompts and the seed).
* **Reference**: the precomputed reference holds log-probs of the dataset pairs only, so online pairs
  need π_ref's weights: ``resolve_reference`` turns ``--reference precompute`` into ``model`` (a
  frozen copy; with a fresh LoRA adapter the same model with the adapter off). Online pairs get
  indices above every dataset index, and ``PrecomputedReference`` refuses indices it has no row for.
* **One process only**: under torchrun every process would have to run the same number of forwards
  whatever its judge said; refused (``ConfigError``) rather than half done. Also refused: ``--fsdp``,
  ``--streaming`` and unpaired losses (kto).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass

import torch

from .data.batching import PairBatch, collate
from .data.tokenize import TokenizedPair
from .errors import ConfigError
from .generate import completion_text, sample_batch
from .judges import Judge, load_judge, rank_groups
from .label import pair_rows

INDEX_STRIDE = 1_000_000
"""Online pair indices: ``base + step * INDEX_STRIDE + k``; unique as long as a step makes fewer pairs."""


@dataclass
class OnlineDraw:
    """What one online step produced."""

    pairs: list[TokenizedPair]
    rows: list[dict]
    """One per pair, as ``dpolab.label`` writes them: prompt, chosen, rejected, chosen_score, rejected_score."""
    metrics: dict[str, float]
    """online/pairs, online/ties (prompts that made no pair), online/judge_reward (mean score of the samples)."""


class OnlinePairs:
    """Samples, judges and pairs on-policy completions; the loop calls ``extend`` before each step."""

    def __init__(self, config, model: torch.nn.Module, tokenizer, judge: Judge, prompts: list[list[int]],
                 index_base: int, rt):
        check_one_process(rt)
        if not prompts:
            raise ConfigError("data", "holds no prompt to sample online pairs from", "give --data some pairs")
        self.config, self.model, self.tokenizer, self.judge = config, model, tokenizer, judge
        self.prompts, self.index_base = prompts, index_base
        self.per_step = config.online_prompts or config.batch_size
        self.eos_ids = {tokenizer.eos_token_id}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) gets online pairs."""
        return step % self.config.online_every == 0

    def extend(self, step: int, micro_batches: list[tuple[PairBatch, bool]]):
        """(the step's micro-batches, plus the online batch when due; the online metrics or None)."""
        if not self.due(step):
            return micro_batches, None
        drawn = self.sample(step)
        kept = [] if self.config.online_only else list(micro_batches)
        if drawn.pairs:
            c = self.config
            kept.append((collate(drawn.pairs, self.pad_id, ld_alpha=c.ld_alpha, layout=c.layout), True))
        return kept, drawn.metrics

    def step_prompts(self, step: int) -> list[list[int]]:
        """The prompts of the online step at optimizer step ``step``: the next ``per_step`` in turn."""
        start = (step // self.config.online_every) * self.per_step
        return [self.prompts[(start + i) % len(self.prompts)] for i in range(self.per_step)]

    @torch.no_grad()
    def sample(self, step: int) -> OnlineDraw:
        """Sample the step's prompts with the current policy (eval mode, then back), judge, pair."""
        c, model = self.config, self.model
        prompts, n = self.step_prompts(step), c.online_samples
        jobs = [p for p in prompts for _ in range(n)]  # a prompt's samples adjacent
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(step_seed(c.seed, step))
        was_training = model.training
        model.eval()
        drawn = []
        size = 2 * c.effective_eval_batch_size  # sequences per generation batch (a pair is two)
        try:
            for start in range(0, len(jobs), size):
                drawn += sample_batch(model, jobs[start:start + size], max_new_tokens=c.online_max_new_tokens,
                                      eos_ids=self.eos_ids, pad_id=self.pad_id, temperature=c.online_temperature,
                                      generator=generator)
        finally:
            model.train(was_training)
        ids = [fit(p, completion, c.max_length) for p, (completion, _) in zip(jobs, drawn)]
        texts = [completion_text(self.tokenizer, p, i, self.eos_ids) for p, i in zip(jobs, ids)]
        prompt_texts = [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        groups = [texts[k * n:(k + 1) * n] for k in range(len(prompts))]
        scores = rank_groups(self.judge, prompt_texts, groups)
        pairs, rows = [], []
        for k, (prompt, group, marks) in enumerate(zip(prompts, groups, scores)):
            for row in pair_rows([prompt_texts[k]], [group], [marks], "best-worst"):
                chosen, rejected = ids[k * n + group.index(row["chosen"])], ids[k * n + group.index(row["rejected"])]
                if chosen == rejected:
                    continue
                index = self.index_base + step * INDEX_STRIDE + len(pairs)
                pairs.append(TokenizedPair(list(prompt), chosen, rejected, index))
                rows.append(row)
        flat = [x for marks in scores for x in marks]
        metrics = {"online/pairs": len(pairs), "online/ties": len(prompts) - len(pairs),
                   "online/judge_reward": sum(flat) / len(flat)}
        return OnlineDraw(pairs, rows, metrics)


def fit(prompt: list[int], completion: list[int], max_length: int) -> list[int]:
    """The completion cut so that prompt + completion fits ``max_length`` (a cut one loses its EOS)."""
    return completion[:max(0, max_length - len(prompt))]


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of optimizer step ``step``: a hash of (seed, step), the same on every rerun."""
    return int(hashlib.sha256(f"dpolab-online|{seed}|{step}".encode()).hexdigest()[:15], 16)


def distinct_prompts(pairs: list[TokenizedPair], seed: int) -> list[list[int]]:
    """The distinct prompt ids of ``pairs`` (first-seen order), shuffled with ``seed``."""
    seen = list(dict.fromkeys(tuple(p.prompt_ids) for p in pairs))
    random.Random(seed).shuffle(seen)
    return [list(p) for p in seen]


def build(config, model, tokenizer, judge: Judge, data, rt) -> OnlinePairs:
    """The run's ``OnlinePairs``: prompts from the training pairs, indices above every dataset index."""
    base = 1 + max((p.index for split in (data.train, data.eval) for p in split), default=-1)
    return OnlinePairs(config, model, tokenizer, judge, distinct_prompts(data.train, config.seed), base, rt)


def check_one_process(rt) -> None:
    if rt.world_size > 1:
        raise ConfigError("online", f"online DPO runs in one process, not {rt.world_size}",
                          "run dpolab train without torchrun/accelerate, or drop --online")


def open_judge(config, rt) -> Judge | None:
    """--judge loaded (None without --online), before the data, so that a bad spec or a launch under
    torchrun fails fast, before anything is written."""
    if not config.online:
        return None
    check_one_process(rt)
    return load_judge(config.judge, device=str(rt.device), constitution=config.constitution,
                      batch_size=2 * config.effective_eval_batch_size)


def resolve_reference(config, say):
    """--online with a loss that needs π_ref: ``--reference precompute`` becomes ``model`` (see module doc)."""
    from .losses import get_loss

    if not config.online or config.reference == "model" or getattr(get_loss(config.loss), "reference_free", False):
        return config
    say("note: --online scores freshly sampled pairs, which the precomputed reference cannot: using "
        "--reference model (a frozen copy of the initial weights; with a fresh LoRA adapter, the adapter off)")
    return dataclasses.replace(config, reference="model")


def validate(c) -> None:
    """The --online options of a ``TrainConfig``."""
    from .losses import get_loss

    def check(ok: bool, name: str, problem: str, fix: str) -> None:
        if not ok:
            raise ConfigError(name, problem, fix)

    for name in ("online_every", "online_prompts", "online_max_new_tokens"):
        v = getattr(c, name)
        check(v is None or v >= 1, name, f"must be >= 1, got {v}", "use a positive integer")
    check(c.online_samples >= 2, "online_samples", f"must be >= 2, got {c.online_samples}",
          "a pair needs two samples of a prompt: use 2 (or more, paired best against worst)")
    check(c.online_temperature > 0 and math.isfinite(c.online_temperature), "online_temperature",
          f"must be > 0, got {c.online_temperature}", "1.0 samples the policy itself")
    if not c.online:
        defaults = {f.name: f.default for f in dataclasses.fields(c)}
        for name in ("online_every", "online_only", "judge", "constitution", "online_prompts", "online_samples",
                     "online_max_new_tokens", "online_temperature"):
            check(getattr(c, name) == defaults[name], name, "has no effect without --online",
                  "add --online, or drop it")
        return
    check(bool(c.judge), "judge", "is required with --online (someone must rank the samples)",
          "pass --judge module:function (e.g. dpolab.demo.grammar:review_reward), a reward model folder, or ai:MODEL")
    check(c.constitution is None or c.judge.startswith("ai:"), "constitution", "is read by AI judges only",
          "use --judge ai:MODEL, or drop --constitution")
    check(not c.online_only or c.online_every == 1, "online_every", "with --online-only, steps without online "
          f"pairs would have no data (got --online-every {c.online_every})", "use --online-every 1")
    check(not c.streaming, "streaming", "--online takes its prompts from the training pairs held in memory",
          "drop --streaming")
    check(not c.fsdp, "fsdp", "sampling from a --fsdp sharded policy is not supported", "drop --fsdp")
    check(not getattr(get_loss(c.loss), "unpaired", False), "loss",
          f"--online makes preference pairs, not '{c.loss}'s unpaired examples", "pick a pairwise loss")
