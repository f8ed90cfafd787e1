"""Peak memory of `dpolab train --streaming` against the in-memory path, on the same large jsonl file.

    python benchmarks/streaming_memory.py [--pairs 200000] [--format jsonl|parquet|saved] [--streaming-only] [--work-dir /tmp/dpolab-streaming-bench]

Writes the toy model (``dpolab.toy.save_toy_model``) and N synthetic copy-task pairs (8 words of prompt,
8 words per completion), then runs ``dpolab train --max-steps 5`` twice in child processes, with and
without ``--streaming``, and prints each one's peak resident set size (the child's ``ru_maxrss``, measured
by a wrapper process so the two runs do not mix) and wall time. With ``--reference precompute`` (the
default) both runs score every pair first (the streamed run into a memory-mapped file); ``--reference
model`` skips that pass. ``--format parquet`` writes the pairs as Parquet instead (read by our own pyarrow
reader), ``--format saved`` as a ``datasets`` ``save_to_disk`` folder, which ``--streaming`` reads through a
Hugging Face ``datasets.IterableDataset``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from dpolab.toy import WORDS, save_toy_model

WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(8)]
            other = [rng.choice(WORDS) for _ in range(8)]
            handle.write(json.dumps({"prompt": "copy: " + " ".join(words), "chosen": " " + " ".join(words),
                                     "rejected": " " + " ".join(other)}) + "\n")


def write_parquet(jsonl: Path, path: Path) -> None:
    """The pairs of ``jsonl`` as a Parquet file, written in row groups of 10,000 (never all in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(jsonl, encoding="utf-8") as handle, pq.ParquetWriter(path, pa.schema(
            [(k, pa.string()) for k in ("prompt", "chosen", "rejected")])) as writer:
        while rows := [json.loads(line) for _, line in zip(range(10_000), handle)]:
            writer.write_table(pa.Table.from_pylist(rows, schema=writer.schema))


def run(model: Path, data: Path, out: Path, streaming: bool, reference: str) -> tuple[float, float, list[str]]:
    """(peak RSS in MiB, seconds, output lines) of one training run in a child process."""
    argv = [sys.executable, "-m", "dpolab", "train", "--model", str(model), "--data", str(data), "--output-dir",
            str(out), "--max-steps", "5", "--batch-size", "8", "--max-length", "32", "--max-prompt-length", "16",
            "--eval-batch-size", "256", "--no-progress", "--device", "cpu", "--reference", reference] + (["--streaming"] if streaming else [])
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"training failed ({'streaming' if streaming else 'in memory'}):\n{done.stderr[-2000:]}")
    lines = done.stdout.splitlines()
    peak_kb = int(next(line.split()[1] for line in lines if line.startswith("PEAK_RSS_KB")))
    return peak_kb / 1024, seconds, [line for line in lines if not line.startswith("PEAK_RSS_KB")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--format", choices=["jsonl", "parquet", "saved"], default="jsonl",
                        help="saved: a save_to_disk folder, which --streaming reads through datasets' IterableDataset")
    parser.add_argument("--streaming-only", action="store_true",
                        help="skip the in-memory run (for data sizes where it would not fit, or to save time)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dpolab-streaming-bench"))
    parser.add_argument("--reference", choices=["precompute", "model"], default="precompute",
                        help="model: no reference pass (faster), the data's share of memory alone")
    args = parser.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():
        save_toy_model(model)
    data = work / f"pairs-{args.pairs}.jsonl"
    if not data.is_file():
        write_pairs(data, args.pairs)
    if args.format in ("parquet", "saved"):
        jsonl, data = data, data.with_suffix(".parquet")
        if not data.is_file():
            write_parquet(jsonl, data)
    if args.format == "saved":
        parquet, data = data, work / f"pairs-{args.pairs}-saved"
        if not (data / "state.json").is_file():
            import datasets

            datasets.Dataset.from_parquet(str(parquet), cache_dir=str(work / "hf-cache")).save_to_disk(str(data))
    size = sum(p.stat().st_size for p in data.rglob("*")) if data.is_dir() else data.stat().st_size
    print(f"data: {data} ({args.pairs:,} pairs, {size / 2**20:,.1f} MiB)")
    for streaming in (True,) if args.streaming_only else (True, False):
        out = work / ("run-streaming" if streaming else "run-memory")
        subprocess.run(["rm", "-rf", str(out)], check=True)  # no cache from an earlier run
        peak, seconds, lines = run(model, data, out, streaming, args.reference)
        name = "--streaming" if streaming else "in memory  "
        print(f"{name}: peak RSS {peak:,.0f} MiB, {seconds:,.0f} s (5 steps, --reference {args.reference})")
        for line in lines:
            if line.startswith(("train:", "reference log-probs")):
                print("    " + line)


if __name__ == "__main__":
    main()
