"""Shared pieces of the benchmarks: workloads, synthetic model/tokenizer/data, child-process measurement.

Everything here is deterministic (seeded), so a work dir built once is reused by later runs.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SEED = 0
BATCH_PAIRS = 8
PROMPT_WORDS = (90, 150)       # uniform, inclusive: ~120 tokens
COMPLETION_WORDS = (120, 210)  # uniform, inclusive: ~165 tokens each
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3


@dataclass(frozen=True)
class Workload:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    default_steps: int
    note: str = ""


WORKLOADS = {
    "small": Workload("small", 8192, 256, 4, 4, 688, 30, "~7M params"),
    "50m": Workload("50m", 32000, 512, 8, 8, 1376, 10, "~57.7M params"),
    "150k": Workload("150k", 151936, 256, 4, 4, 688, 5, "~81M params, 150k vocab"),
}


# --------------------------------------------------------------------------- model and tokenizer

def build_tokenizer(vocab_size: int):
    """A WordLevel tokenizer whose vocabulary is the 4 specials plus w0..w{V-5}: one word, one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for i in range(vocab_size - len(SPECIALS)):
        vocab[f"w{i}"] = i + len(SPECIALS)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(SPECIALS)  # so "w7</s>" splits into w7 + </s>
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def build_model(workdir: Path, wl: Workload) -> Path:
    """Random-init Llama + tokenizer saved under ``workdir/model-<name>`` (reused when present)."""
    folder = Path(workdir) / f"model-{wl.name}"
    marker = folder / "bench-ready.json"
    if marker.is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=wl.vocab, hidden_size=wl.hidden, num_hidden_layers=wl.layers,
        num_attention_heads=wl.heads, num_key_value_heads=wl.heads, intermediate_size=wl.intermediate,
        max_position_embeddings=1024, tie_word_embeddings=False, attn_implementation="sdpa",
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).float()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_tokenizer(wl.vocab).save_pretrained(folder)
    counts = param_counts(model)
    marker.write_text(json.dumps({"workload": wl.name, **counts}))
    return folder


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return {"params_total": total, "params_non_embedding": total - embed}


def model_info(folder: Path) -> dict:
    return json.loads((Path(folder) / "bench-ready.json").read_text())


# --------------------------------------------------------------------------- data

def _words(rng: random.Random, n: int, vocab_words: int) -> str:
    return " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(n))


def make_pairs(n: int, vocab: int, seed: int = SEED) -> list[dict]:
    """``n`` preference pairs of random words; completions start with a space."""
    rng = random.Random(seed)
    words = vocab - len(SPECIALS)
    pairs = []
    for _ in range(n):
        prompt = _words(rng, rng.randint(*PROMPT_WORDS), words)
        chosen = " " + _words(rng, rng.randint(*COMPLETION_WORDS), words)
        rejected = " " + _words(rng, rng.randint(*COMPLETION_WORDS), words)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def write_pairs(workdir: Path, tag: str, n: int, vocab: int, seed: int = SEED) -> Path:
    path = Path(workdir) / f"pairs-{tag}-v{vocab}-n{n}-s{seed}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in make_pairs(n, vocab, seed):
                fh.write(json.dumps(row) + "\n")
        tmp.replace(path)
    return path


def logical_tokens(path: Path) -> int:
    """Per pair: 2*(|prompt|+BOS) + (|chosen|+EOS) + (|rejected|+EOS): the tokens a trainer without
    prefix sharing would push through the model; the same count for both trainers."""
    total = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            p, c, r = (len(row[k].split()) for k in ("prompt", "chosen", "rejected"))
            total += 2 * (p + 1) + (c + 1) + (r + 1)
    return total


# --------------------------------------------------------------------------- child processes

def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    peak_rss_gb: float          # max of the polled tree RSS and the kernel's high-water mark
    polled_rss_gb: float
    maxrss_gb: float            # wait4's ru_maxrss of this child
    cpu_s: float                # user + system CPU seconds of this child
    other_cpu_share: float      # share of all cores busy with other processes during the run
    log: Path
    output: str = field(repr=False, default="")


def _tree_rss(proc) -> int:
    import psutil
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(cmd: list[str], log: Path, env: dict, cwd: str | None = None) -> ChildResult:
    """Run ``cmd`` to completion with stdout+stderr in ``log``; measure wall time and peak RSS
    (without psutil: only the kernel's high-water mark, and no measure of other processes)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = [0]
    busy0 = _busy_cpu_s()
    with open(log, "w", encoding="utf-8") as fh:
        start = time.perf_counter()
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        done = threading.Event()

        def poll():
            if psutil is None:
                return
            try:
                ps = psutil.Process(popen.pid)
            except psutil.Error:
                return
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss(ps))
                done.wait(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(popen.pid, 0)  # ru_maxrss of exactly this child (KiB on Linux)
        wall = time.perf_counter() - start
        done.set()
        poller.join()
        popen.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    busy = _busy_cpu_s() - busy0
    other = max(0.0, busy - cpu) / (wall * (os.cpu_count() or 1)) if busy == busy else float("nan")
    gb = 1024 ** 3
    maxrss = usage.ru_maxrss * 1024 / gb
    polled = peak[0] / gb
    output = log.read_text(encoding="utf-8", errors="replace")
    return ChildResult(popen.returncode, wall, max(maxrss, polled), polled, maxrss, cpu, other, log, output)


def _busy_cpu_s() -> float:
    """Non-idle CPU seconds of the whole machine so far (all cores)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


# --------------------------------------------------------------------------- parsing and stats

_REF_RE = re.compile(r"reference log-probs:.*?([\d,]+)\s*tokens\s+in\s+([\d.]+)\s*s"
                     r"(?:.*?\(([\d,.]+)\s*tokens/s\))?")


def parse_reference_line(text: str) -> dict:
    """dpolab's ``reference log-probs: ... N tokens in X s (Y tokens/s)`` line, if present."""
    for line in text.splitlines():
        m = _REF_RE.search(line)
        if m:
            out = {"line": line.strip(), "tokens": int(m.group(1).replace(",", "")), "seconds": float(m.group(2))}
            if m.group(3):
                out["tokens_per_s"] = float(m.group(3).replace(",", ""))
            return out
    for line in text.splitlines():
        if line.startswith("reference log-probs:"):
            return {"line": line.strip()}
    return {}


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def tail_mean(values: list[float]) -> tuple[float, float, int]:
    """Mean and standard error of the last third of ``values`` (at least one value)."""
    k = max(1, len(values) // 3)
    tail = values[-k:]
    mean = sum(tail) / len(tail)
    if len(tail) < 2:
        return mean, float("nan"), len(tail)
    var = sum((v - mean) ** 2 for v in tail) / (len(tail) - 1)
    return mean, math.sqrt(var / len(tail)), len(tail)


def wait_for_idle(max_wait_s: float, threshold: float = 0.1, sample_s: float = 1.0) -> tuple[float, float]:
    """Wait (at most ``max_wait_s``) until the machine's busy share over ``sample_s`` is below
    ``threshold``; returns (seconds waited, last busy share). Without psutil: (0, nan) at once."""
    try:
        import psutil
    except ImportError:
        return 0.0, float("nan")
    start = time.perf_counter()
    while True:
        busy = psutil.cpu_percent(interval=sample_s) / 100
        waited = time.perf_counter() - start
        if busy < threshold or waited >= max_wait_s:
            return waited, busy


def measure_peak_gflops(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` GFLOP/s of an n x n torch.mm in this process (all threads)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9
