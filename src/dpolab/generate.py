"""Batched sampling from a causal LM: the one place where dpolab writes text.

Prompts are encoded exactly as the trainer encodes them (rule 1 of ``dpolab.data.tokenize``: BOS when
the tokenizer adds one, never doubled), left-padded into one batch (so every row's next token sits in
the last column), and extended one token at a time with the model's KV cache. Sampling is seeded
with a private ``torch.Generator``: the same seed, prompts and batch size give the same samples.

Each ``Sample`` keeps the exact token ids that were drawn besides the decoded text, because the
KL estimate of ``dpolab.evaluate`` must score the sequence that was sampled: re-tokenizing the text
can give different ids (BPE is not a bijection on id sequences), and then log π(y|x) would be the
log-probability of another sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data.tokenize import _encode, _specials
from .errors import ConfigError


@dataclass(frozen=True)
class Sample:
    """One sampled completion of one prompt."""

    prompt: str
    completion: str
    """The completion as text (no EOS, no special tokens), exactly what follows the prompt's text."""
    prompt_ids: list[int]
    completion_ids: list[int]
    """The sampled ids, ending with EOS when ``finished``."""
    finished: bool
    """True when the model emitted EOS; False when ``max_new_tokens`` cut it."""
    sample: int = 0
    """Which of the ``num_samples`` samples of this prompt it is (0-based)."""

    def to_row(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "sample": self.sample,
                "finished": self.finished}


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids as the trainer makes them (shared helpers of ``data.tokenize``), so that the policy
    is sampled on the very ids it is trained and scored on. An empty prompt becomes [BOS] (or [EOS])."""
    specials = _specials(tokenizer)
    has_bos = [specials.bos_text is not None and p.startswith(specials.bos_text) for p in prompts]
    ids = _encode(tokenizer, list(prompts), [not b for b in has_bos], specials)
    start = specials.bos_id if specials.bos_id is not None else specials.eos_id
    return [row if row else [start] for row in ids]


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row from softmax(logits / T), restricted to the top-p nucleus.

    T = 0 is greedy decoding. The nucleus keeps the most likely tokens whose cumulative probability
    first reaches ``top_p`` (always at least one), so a tiny ``top_p`` is greedy too.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_batch(model, prompt_ids: list[list[int]], *, max_new_tokens: int, eos_ids: set[int], pad_id: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[tuple[list[int], bool]]:
    """(completion ids, finished) for each prompt of one batch.

    Left padding puts every prompt's last token in the last column; position ids count real tokens
    only, so a padded row sees the positions it would see alone. Rows that have emitted EOS keep
    being fed padding (masked out) until every row is done or the budget is spent.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(eos_ids), device=device)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    drawn: list[Tensor] = []
    cache_arg = _cache_argument(model)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    for _ in range(max_new_tokens):
        token = next_token(out.logits[:, -1], temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        drawn.append(torch.where(done, torch.full_like(token, -1), token))
        done = done | torch.isin(token, eos)
        if bool(done.all()):
            break
        # finished rows only see padding from here on; what they compute is discarded
        attention = torch.cat([attention, attention.new_ones(len(prompt_ids), 1)], dim=1)
        positions = positions[:, -1:] + 1
        cache = getattr(out, cache_arg)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=positions, use_cache=True,
                    **{cache_arg: cache})
    table = torch.stack(drawn, dim=1).tolist() if drawn else [[] for _ in prompt_ids]
    results = []
    for row in table:
        ids = [t for t in row if t >= 0]
        results.append((ids, bool(ids) and ids[-1] in eos_ids))
    return results


def _cache_argument(model) -> str:
    """Name of the KV-cache argument (and output field): ``cache`` in recent transformers,
    ``past_key_values`` before. A peft (LoRA) model passes keywords through to the model it wraps."""
    import inspect

    from .lora import unwrap

    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def completion_text(tokenizer, prompt_ids: list[int], completion_ids: list[int], eos_ids: set[int]) -> str:
    """The text the completion adds to the prompt's text: decode both together and cut the prompt off
    (decoding the completion alone loses the leading space of sentencepiece tokenizers)."""
    body = [t for t in completion_ids if t not in eos_ids]
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + body, skip_special_tokens=True)
    if full.startswith(prompt_text):
        return full[len(prompt_text):]
    return tokenizer.decode(body, skip_special_tokens=True)


def generate(model, tokenizer, prompts: list[str], *, num_samples: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
             progress: bool = False, desc: str = "sampling") -> list[Sample]:
    """``num_samples`` completions of every prompt, in prompt order (samples of one prompt adjacent)."""
    check_sampling(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, batch_size=batch_size)
    eos_ids = {tokenizer.eos_token_id}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_prompts(tokenizer, prompts)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(num_samples)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    was_training = model.training
    model.eval()
    samples: list[Sample] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="sample", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        drawn = sample_batch(model, [encoded[i] for i, _ in chunk], max_new_tokens=max_new_tokens,
                             eos_ids=eos_ids, pad_id=pad_id, temperature=temperature, top_p=top_p,
                             generator=generator)
        for (i, k), (ids, finished) in zip(chunk, drawn):
            text = completion_text(tokenizer, encoded[i], ids, eos_ids)
            samples.append(Sample(prompts[i], text, encoded[i], ids, finished, k))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return samples


def check_sampling(*, num_samples: int, max_new_tokens: int, temperature: float, top_p: float,
                   batch_size: int) -> None:
    """Refuse settings that cannot sample, naming the option and the fix."""
    if num_samples < 1:
        raise ConfigError("num_samples", f"must be >= 1, got {num_samples}", "use a positive integer")
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be >= 1, got {max_new_tokens}", "use a positive integer")
    if temperature < 0:
        raise ConfigError("temperature", f"must be >= 0, got {temperature}", "0 is greedy, 1 samples the model")
    if not 0 < top_p <= 1:
        raise ConfigError("top_p", f"must be in (0, 1], got {top_p}", "1 disables nucleus sampling")
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}", "use a positive integer")


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: JSONL/JSON rows with a "prompt" field, or plain text with one per line."""
    import json
    from pathlib import Path

    from .errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(str(p), "file not found", fix="check the path given to --prompts")
    text = p.read_text(encoding="utf-8")
    if p.suffix not in (".jsonl", ".json"):
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text) if p.suffix == ".json" else []
        if p.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise DataError(str(p), "not valid JSON", row=number) from None
        prompts = []
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(str(p), "expected an object with a text field 'prompt'", row=number,
                                field="prompt")
            prompts.append(row["prompt"])
    if not prompts:
        raise DataError(str(p), "holds no prompt", fix="write one prompt per line, or JSONL rows with 'prompt'")
    return prompts


def load_for_inference(path: str, device) -> tuple[object, torch.nn.Module]:
    """(tokenizer, fp32 model in eval mode) with the trainer's loading rules: the same errors for a
    missing folder, pad = EOS when the tokenizer has no pad token, dropout off."""
    from .config import TrainConfig
    from .prepare import load_model, load_tokenizer
    from .runtime import Runtime

    probe = TrainConfig(model=str(path), data="-", output_dir="-", progress=False)
    tokenizer = load_tokenizer(probe)
    return tokenizer, load_model(probe, Runtime(device=device, precision="fp32")).eval()
