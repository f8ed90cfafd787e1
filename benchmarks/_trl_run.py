"""One TRL DPOTrainer run at TRL's best CPU settings, for ``throughput.py`` (run it as a child process).

TRL 1.16 precomputes the reference log-probs inside ``DPOTrainer.__init__`` (``_precompute_ref_logps``),
so ``trainer.train()`` is the training loop only; the precompute is timed by a subclass that wraps that
method. Writes a JSON file with the log history, the timings and the setup that was really used.

    python benchmarks/_trl_run.py --model M --data D --output-dir O --steps 30 --batch-size 8 --json O/trl.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="jsonl with prompt/chosen/rejected")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precompute-batch-size", type=int, default=None,
                    help="precompute_ref_batch_size (default: 2 x batch size, like dpolab's reference pass)")
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-final", action=argparse.BooleanOptionalAction, default=True,
                    help="save the trained model to OUTPUT_DIR/final like dpolab does (timed separately)")
    return ap.parse_args(argv)


def make_config(args: argparse.Namespace):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=args.output_dir,
        use_cpu=True,
        bf16=args.precision == "bf16",
        fp16=False,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.precompute_batch_size or 2 * args.batch_size,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        beta=args.beta,
        loss_type=["sigmoid"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        max_length=args.max_length,  # TRL 1.16 has no separate prompt-length limit
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def timed_trainer_class():
    """DPOTrainer whose reference precompute pass records its own wall time."""
    from trl import DPOTrainer

    class TimedDPOTrainer(DPOTrainer):
        precompute_seconds = 0.0
        precompute_calls = 0

        dtype_probe = None

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if self.dtype_probe is None:  # the precompute runs inside __init__: hook the model here
                self.dtype_probe = DtypeProbe(self.ref_model or self.model)
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                type(self).precompute_seconds += time.perf_counter() - start
                type(self).precompute_calls += 1

    return TimedDPOTrainer


class DtypeProbe:
    """Records the output dtype of the model's first Linear layer, per phase, to show autocast is on."""

    def __init__(self, model):
        import torch

        self.phase = "precompute"
        self.seen: dict[str, set] = {}
        layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.seen.setdefault(self.phase, set()).add(str(output.dtype))

    def report(self) -> dict:
        return {phase: sorted(dtypes) for phase, dtypes in self.seen.items()}


def _checkpointing_on(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def describe_setup(trainer, config) -> dict:
    """What TRL really does, read back from the trainer (printed, and kept in the JSON)."""
    import torch

    model = trainer.model
    params = list(model.parameters())
    columns = list(getattr(trainer.train_dataset, "column_names", []) or [])
    return {
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "param_dtype": str(params[0].dtype),
        "device": str(trainer.accelerator.device),
        "precompute_ref_log_probs": bool(trainer.precompute_ref_logps),
        "ref_model_in_memory": trainer.ref_model is not None,
        "ref_columns_in_train_dataset": [c for c in columns if c.startswith("ref_")],
        "gradient_checkpointing": _checkpointing_on(model),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "precompute_ref_batch_size": config.precompute_ref_batch_size,
        "torch_threads": torch.get_num_threads(),
        "train_rows": len(trainer.train_dataset),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from datasets import load_dataset
    from transformers import AutoTokenizer

    import_s = time.perf_counter() - T0
    config = make_config(args)
    dataset = load_dataset("json", data_files=args.data, split="train")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    trainer_cls = timed_trainer_class()
    t_init = time.perf_counter()
    trainer = trainer_cls(model=args.model, ref_model=None, args=config, train_dataset=dataset,
                          processing_class=tokenizer)  # TRL loads the policy itself (fp32 master weights)
    init_s = time.perf_counter() - t_init
    probe = trainer.dtype_probe or DtypeProbe(trainer.model)
    probe.phase = "train"
    setup = describe_setup(trainer, config)
    print("trl setup: " + json.dumps(setup), flush=True)
    print(f"trl reference precompute: {trainer_cls.precompute_seconds:.3f} s "
          f"({trainer_cls.precompute_calls} call(s), inside DPOTrainer.__init__)", flush=True)

    t_train = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t_train
    probe.handle.remove()
    setup["linear_output_dtype"] = probe.report()
    print("trl linear output dtypes: " + json.dumps(setup["linear_output_dtype"]), flush=True)
    save_s = None
    if args.save_final:
        t_save = time.perf_counter()
        trainer.save_model(str(Path(args.output_dir) / "final"))
        save_s = time.perf_counter() - t_save

    out = {
        "trl_version": __import__("trl").__version__,
        "setup": setup,
        "import_s": import_s,
        "init_s": init_s,
        "precompute_s": trainer_cls.precompute_seconds,
        "train_s": train_s,
        "train_runtime": result.metrics.get("train_runtime"),
        "save_s": save_s,
        "in_process_s": time.perf_counter() - T0,
        "log_history": trainer.state.log_history,
        "num_tokens_trl": trainer._total_train_tokens,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"trl train: {train_s:.3f} s for {args.steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
