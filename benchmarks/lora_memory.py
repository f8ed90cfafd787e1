"""Peak RSS of LoRA vs full fine-tuning with a reference copy, on the same ~21M-parameter random Llama.

Each run is `python -m dpolab train` in its own child process (peak RSS from the kernel's high-water
mark of exactly that child, plus psutil polling when installed); the model, tokenizer and pairs are
synthetic and seeded, built under --workdir on the first run and reused.

    python benchmarks/lora_memory.py                 # 3 steps of 2 pairs per run, LoRA rank 16
    python benchmarks/lora_memory.py --batch-size 8 --max-length 512 --lora-r 8

Runs: full fine-tuning with `--reference model` (a frozen deep copy of the weights in memory), full
fine-tuning with the precomputed reference (no copy, but gradients and AdamW state for every weight),
and LoRA with `--reference model` (the same weights with the adapters off: no copy, and gradients and
AdamW state for the adapter only).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WORKLOAD = C.Workload("lora21m", vocab=8192, hidden=512, layers=4, heads=8, intermediate=1376, default_steps=3,
                      note="~21M params")
FLAGS = ["--learning-rate", "1e-4", "--precision", "fp32", "--logging-steps", "1", "--no-progress", "--seed", "0"]
RUNS = {
    "full, --reference model (copy)": ["--reference", "model"],
    "full, --reference precompute": ["--reference", "precompute"],
    "LoRA, --reference model (shared)": ["--reference", "model", "--lora-r", "{r}"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=WORKLOAD.default_steps, help="optimizer steps per run")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--batch-size", type=int, default=2, help="pairs per step (small: weights, not activations, "
                    "should dominate memory, as for the large models LoRA is for)")
    ap.add_argument("--max-length", type=int, default=256, help="longest prompt + completion in tokens")
    ap.add_argument("--workdir", default="/tmp/dpolab-bench", help="model, data and run folders (reused)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    model = C.build_model(workdir, WORKLOAD)
    data = C.write_pairs(workdir, "lora", args.steps * args.batch_size, WORKLOAD.vocab)
    print(f"model: {C.model_info(model)['params_total']:,} parameters; {args.steps} steps of {args.batch_size} "
          f"pairs, max length {args.max_length}, fp32")
    print(f"{'run':36} {'peak RSS GB':>11} {'wall s':>7} {'step-1 loss':>11}")
    for name, extra in RUNS.items():
        run_dir = workdir / "lora-memory" / name.split(",")[0].lower().replace(" ", "-") / extra[1]
        shutil.rmtree(run_dir, ignore_errors=True)  # no reference cache or checkpoints from an earlier run
        cmd = [sys.executable, "-m", "dpolab", "train", "--model", str(model), "--data", str(data),
               "--output-dir", str(run_dir), "--max-steps", str(args.steps), *FLAGS,
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--max-prompt-length", str(args.max_length // 2),
               *[x.format(r=args.lora_r) for x in extra]]
        child = C.run_child(cmd, run_dir.with_suffix(".log"), C.child_env())
        if child.returncode != 0:
            print(f"{name}: failed (exit {child.returncode}), see {child.log}")
            return 1
        rows = C.read_jsonl(run_dir / "metrics.jsonl")
        loss = rows[0].get("loss", math.nan) if rows else math.nan
        print(f"{name:36} {child.peak_rss_gb:11.3f} {child.wall_s:7.1f} {loss:11.6f}")
        trainable = [line for line in child.output.splitlines() if line.startswith("LoRA:")]
        if trainable:
            print(f"  {trainable[0]}")
    print("step-1 loss must be ln 2 = 0.693147 in every run (policy = reference at the start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
