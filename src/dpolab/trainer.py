"""The training loop: one obvious loop shared by every preference method.

Phases of each optimizer step, in order: learning rate, micro-batches (forward, loss, backward),
clip, step, log, evaluate/early-stop, checkpoint. Everything else (data, reference, losses, metrics
sinks) is prepared before the loop and called from it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import yaml
from tqdm.auto import tqdm

from .config import TrainConfig
from .data.batching import PairBatch, collate_pairs, epoch_batches
from .data.tokenize import TokenizedPair
from .losses import get_loss
from .prepare import (check_output_dir, check_tracker, load_model, load_tokenizer, prepare_data,
                      prepare_output_dir)
from .reference import ModelReference, PrecomputedReference
from .runtime import Runtime, seed_everything
from .steps import (MetricSums, build_optimizer, clip_gradients, evaluate, lr_factor, pair_losses,
                    plan_steps)
from .tracking import MetricsLogger


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    metrics: dict = field(default_factory=dict)
    """The last logged training metrics row."""
    eval_metrics: dict = field(default_factory=dict)
    """The last evaluation (``eval_*`` keys), empty without eval data."""
    stopped_early: bool = False
    model: object = field(default=None, repr=False)
    """The trained policy, in memory (the same weights as ``output_dir/final``)."""


def optimizer_steps(pairs: list[TokenizedPair], config: TrainConfig, rt: Runtime,
                    pad_token_id: int) -> Iterator[tuple[float, list[PairBatch]]]:
    """Endless (epoch, micro-batches of one optimizer step) in seeded order; each process gets its share."""
    epoch = 0
    while True:
        batches = epoch_batches(len(pairs), config.batch_size * rt.world_size, seed=config.seed, epoch=epoch)
        per_epoch = math.ceil(len(batches) / config.grad_accum)
        for i in range(per_epoch):
            group = batches[i * config.grad_accum:(i + 1) * config.grad_accum]
            shards = [b[rt.rank::rt.world_size] for b in group]
            micro = [collate_pairs([pairs[j] for j in s], pad_token_id) for s in shards if s]
            yield epoch + (i + 1) / per_epoch, micro
        epoch += 1


def save_model(model, tokenizer, path: Path, rt: Runtime, **state) -> None:
    """model + tokenizer via save_pretrained (safetensors) — loadable by AutoModelForCausalLM."""
    if not rt.is_main:
        return
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if state:
        (path / "trainer_state.yaml").write_text(yaml.safe_dump(state, sort_keys=False))


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with a preference loss; see ``TrainConfig`` for options."""
    rt = Runtime.create(config.device, config.precision)
    say = print if rt.is_main else (lambda *a, **k: None)
    seed_everything(config.seed)
    check_tracker(config.report_to)
    check_output_dir(config)
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer)  # raises on bad input before anything is written
    model = load_model(config, rt)
    out = prepare_output_dir(config, rt)
    for line in data.summary:
        say(line)
    if rt.is_main:
        resolved = {**config.to_dict(), "precision": rt.precision}
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    loss_fn = get_loss(config.loss)
    reference = None
    if not getattr(loss_fn, "reference_free", False):
        if config.reference == "model":
            reference = ModelReference(model, rt)
        else:
            splits = {"train": data.train, **({"eval": data.eval} if data.eval else {})}
            reference = PrecomputedReference.build(
                model, splits, rt, cache_dir=out / "cache", batch_size=config.effective_eval_batch_size,
                pad_token_id=tokenizer.pad_token_id, progress=config.progress, say=say)
    return _loop(config, rt, model, tokenizer, data, reference, loss_fn, out, say)


def _loop(config, rt, model, tokenizer, data, reference, loss_fn, out: Path, say) -> TrainResult:
    per_epoch, total_steps = plan_steps(len(data.train), config)
    warmup = math.floor(config.warmup_ratio * total_steps)
    optimizer = build_optimizer(model, config)
    logger = MetricsLogger(out, report_to=config.report_to, run_name=config.run_name, config=config.to_dict(),
                           enabled=rt.is_main)
    say(f"training: {len(data.train):,} pairs, {per_epoch:,} steps per epoch, {total_steps:,} steps, "
        f"precision {rt.precision}, device {rt.device}, reference {config.reference}, loss {config.loss}")
    result = TrainResult(output_dir=out, steps=0, model=model)
    window, tokens, best_eval, bad_evals = MetricSums(), 0, math.inf, 0
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not (config.progress and rt.is_main))
    model.train()
    for step, (epoch, micro_batches) in enumerate(optimizer_steps(data.train, config, rt, tokenizer.pad_token_id)):
        if step >= total_steps:
            break
        lr = config.learning_rate * lr_factor(step, total_steps, warmup, config.lr_scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Each pair weighs the same whatever the micro-batch split: divide the summed per-pair losses by
        # the number of pairs in the whole optimizer step (on every process), not by micro-batch sizes.
        step_pairs = float(rt.reduce_sum(torch.tensor(float(sum(b.num_pairs for b in micro_batches)))))
        for batch in micro_batches:
            tokens += int(rt.reduce_sum(torch.tensor(batch.num_tokens)))
            batch = batch.to(rt.device)
            losses, metrics = pair_losses(model, batch, reference, loss_fn, config, rt, "train")
            (losses.sum() * rt.world_size / step_pairs).backward()  # DDP averages grads over processes
            window.add(metrics)
        grad_norm = clip_gradients(model, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        elapsed = time.perf_counter() - start
        last = done == total_steps
        if done == 1 or done % config.logging_steps == 0 or last:
            row = {"step": done, "epoch": round(epoch, 4), **window.means(rt), "learning_rate": lr,
                   "grad_norm": grad_norm, "tokens": tokens, "elapsed_s": round(elapsed, 3)}
            logger.log(row)
            result.metrics, window = row, MetricSums()
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                            tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}")
        bar.update(1)
        if data.eval and config.eval_steps and (done % config.eval_steps == 0 or last):
            result.eval_metrics = _evaluate(model, data, reference, loss_fn, config, rt, tokenizer, done, epoch,
                                            logger)
            if result.eval_metrics["eval_loss"] < best_eval:
                best_eval, bad_evals = result.eval_metrics["eval_loss"], 0
            else:
                bad_evals += 1
            if config.early_stopping_patience and bad_evals >= config.early_stopping_patience:
                say(f"early stopping at step {done}: eval loss has not improved for {bad_evals} evaluations "
                    f"(best {best_eval:.4f})")
                result.stopped_early = True
        if config.save_steps and done % config.save_steps == 0 and not last:
            save_model(model, tokenizer, out / "checkpoints" / f"step-{done}", rt, step=done, epoch=epoch)
        result.steps = done
        if result.stopped_early:
            break
    bar.close()
    if data.eval and not config.eval_steps:
        result.eval_metrics = _evaluate(model, data, reference, loss_fn, config, rt, tokenizer, result.steps,
                                        epoch, logger)
    save_model(model, tokenizer, out / "final", rt, step=result.steps, epoch=epoch)
    logger.close()
    say(f"done: {result.steps} steps in {time.perf_counter() - start:.1f}s; model saved to {out / 'final'}")
    return result


def _evaluate(model, data, reference, loss_fn, config, rt, tokenizer, step, epoch, logger) -> dict:
    metrics = evaluate(model, data.eval, reference, loss_fn, config, rt, tokenizer.pad_token_id)
    logger.log({"step": step, "epoch": round(epoch, 4), **metrics})
    return metrics
