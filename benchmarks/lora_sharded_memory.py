"""What one process holds when LoRA trains with its frozen weights sharded (--fsdp, DeepSpeed ZeRO-3).

The same LoRA run (rank 16, a ~21M-parameter random Llama, fp32, CPU, gloo) in one unsharded process,
then in 2 processes under torchrun with --fsdp and with a ZeRO-3 config. Each process reports, at the
end of training, the bytes of the tensors it holds itself (for FSDP its DTensor shards, for ZeRO-3
its partitions ``ds_tensor``): the frozen base weights, the adapter and the optimizer's state, and
its peak RSS (which also holds Python, torch, transformers, DeepSpeed and gloo, about 0.4-0.6 GB).

    python benchmarks/lora_sharded_memory.py                  # 2 steps of 2 pairs, 2 processes
    python benchmarks/lora_sharded_memory.py --processes 4 --steps 3

On CPU the model is far too small for RSS to show the split; the tensor bytes are what scales with
the model: the frozen weights (the bulk under LoRA) shrink to 1/N per process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WORKLOAD = C.Workload("lora21m", vocab=8192, hidden=512, layers=4, heads=8, intermediate=1376, default_steps=2,
                      note="~21M params")
MB = 1e6


def local_bytes(t) -> int:
    """Bytes this process holds for ``t``: its shard (FSDP DTensor) or partition (ZeRO-3), else all of it."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    t = getattr(t, "ds_tensor", t)
    return t.numel() * t.element_size()


def held(model, optimizer) -> dict:
    import torch

    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    return {"frozen_mb": sum(local_bytes(p) for p in params if not p.requires_grad) / MB,
            "adapter_mb": sum(local_bytes(p) for p in params if p.requires_grad) / MB,
            "optimizer_mb": sum(local_bytes(v) for v in state) / MB}


def worker(args) -> None:
    """One process of a run: train, measuring what it holds just before final/ is gathered."""
    from dpolab import trainer
    from dpolab.config import TrainConfig

    measured: dict = {}
    gather = trainer._Run._full_weights

    def measure_then_gather(run):
        measured.update(held(run.model, run.optimizer))
        return gather(run)

    trainer._Run._full_weights = measure_then_gather
    trainer.train(TrainConfig(model=args.model, data=args.data, output_dir=args.out, lora_r=args.lora_r,
                              max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                              max_prompt_length=args.max_length // 2, precision="fp32", device="cpu",
                              learning_rate=1e-4, logging_steps=1, seed=0, progress=False,
                              fsdp=args.mode == "fsdp", deepspeed=args.deepspeed if args.mode == "zero3" else None))
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    rank = int(os.environ.get("RANK", 0))  # one file per process: their stdout lines may interleave
    row = {"rank": rank, **measured, "peak_rss_gb": rss_gb}
    (Path(args.out) / f"measured-{rank}.json").write_text(json.dumps(row))


def run(mode: str, processes: int, args, model: Path, data: Path, workdir: Path) -> tuple[list[dict], float]:
    out = workdir / "lora-sharded" / mode
    shutil.rmtree(out, ignore_errors=True)
    own = [str(Path(__file__).resolve()), "--worker", "--mode", mode, "--model", str(model), "--data", str(data),
           "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size // processes),
           "--max-length", str(args.max_length), "--lora-r", str(args.lora_r), "--deepspeed", str(workdir / "z3.json")]
    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                if processes > 1 else [])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, *own], capture_output=True, text=True, env=C.child_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    rows = [json.loads((out / f"measured-{rank}.json").read_text()) for rank in range(processes)]
    return rows, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=WORKLOAD.default_steps, help="optimizer steps per run")
    ap.add_argument("--processes", type=int, default=2, help="processes of the sharded runs")
    ap.add_argument("--batch-size", type=int, default=2, help="pairs per step in all (split over the processes)")
    ap.add_argument("--max-length", type=int, default=256, help="longest prompt + completion in tokens")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--workdir", default="/tmp/dpolab-bench", help="model, data and run folders (reused)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--mode", "--model", "--data", "--out", "--deepspeed"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    workdir = Path(args.workdir)
    model = C.build_model(workdir, WORKLOAD)
    data = C.write_pairs(workdir, "lora-sharded", args.steps * args.batch_size, WORKLOAD.vocab)
    (workdir / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    print(f"model: {C.model_info(model)['params_total']:,} parameters; LoRA r={args.lora_r}; {args.steps} steps of "
          f"{args.batch_size} pairs, max length {args.max_length}, fp32, CPU")
    print(f"{'run':28} {'frozen MB':>9} {'adapter MB':>10} {'AdamW MB':>9} {'peak RSS GB':>11} {'wall s':>7}"
          "   (per process; max over processes)")
    for mode, n in (("unsharded", 1), ("fsdp", args.processes), ("zero3", args.processes)):
        rows, wall = run(mode, n, args, model, data, workdir)
        top = {k: max(r[k] for r in rows) for k in ("frozen_mb", "adapter_mb", "optimizer_mb", "peak_rss_gb")}
        label = f"{mode}, {n} process{'es' if n > 1 else ''}"
        print(f"{label:28} {top['frozen_mb']:9.1f} {top['adapter_mb']:10.2f} {top['optimizer_mb']:9.2f} "
              f"{top['peak_rss_gb']:11.2f} {wall:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
