"""The training loop: one obvious loop shared by every preference method.

Phases of each optimizer step, in order: learning rate, micro-batches (forward, loss, backward),
clip, step, log, evaluate/early-stop, checkpoint. Everything else (data, reference, losses, metrics
sinks) is prepared before the loop and called from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import yaml
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed, lora, online
from .checkpoint import TrainState
from .config import TrainConfig
from .control import BetaControl, KLMonitor, kl_prompt_ids
from .data.batching import PairBatch, collate, epoch_batches
from .data.tokenize import TokenizedPair
from .errors import TrainingStopped
from .logprobs import supports_custom_layout
from .losses import get_loss
from .objectives import ObjectiveScales
from .prepare import (PreparedData, check_output_dir, check_tracker, load_model, load_reference_model,
                      load_tokenizer, prepare_data, prepare_output_dir, save_token_cache)
from .reference import ModelReference, PrecomputedReference, data_fingerprint, sync_reference
from .runtime import GracefulStop, Runtime, seed_everything
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


def optimizer_steps(pairs: list[TokenizedPair], config: TrainConfig, rt: Runtime, pad_token_id: int,
                    start: int = 0) -> Iterator[tuple[float, list[tuple[PairBatch, bool]]]]:
    """Endless (epoch, (micro-batch, counts) of one optimizer step) from step ``start`` on.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches the
    uninterrupted run would have; each process takes its share of every batch. A process whose share
    is empty (a last batch with fewer pairs than processes) gets the batch's first pair with
    ``counts`` False: it must still run the forward and backward, since DDP all-reduces gradients
    across all processes, but that pair adds nothing to its loss, gradient or metrics.
    """
    if getattr(pairs, "streamed", False):  # --streaming: batches read from the file (dpolab.streaming)
        yield from pairs.optimizer_steps(config, rt, pad_token_id, start)
        return
    per_epoch = math.ceil(math.ceil(len(pairs) / (config.batch_size * rt.world_size)) / config.grad_accum)
    cached: tuple[int, list[list[int]]] = (-1, [])
    step = start
    while True:
        epoch, i = divmod(step, per_epoch)
        if cached[0] != epoch:
            cached = (epoch, epoch_batches(len(pairs), config.batch_size * rt.world_size, seed=config.seed,
                                           epoch=epoch))
        group = cached[1][i * config.grad_accum:(i + 1) * config.grad_accum]
        shards = [(b[rt.rank::rt.world_size] or b[:1], len(b) > rt.rank) for b in group]
        micro = [(collate([pairs[j] for j in s], pad_token_id, ld_alpha=config.ld_alpha, layout=config.layout),
                  counts) for s, counts in shards]
        yield epoch + (i + 1) / per_epoch, micro
        step += 1


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with a preference loss; see ``TrainConfig`` for options.

    Under ``torchrun``/``accelerate launch`` every process runs this: see ``dpolab.distributed``."""
    with distributed.runtime(config.device, config.precision) as rt, _engine_env(config):
        result = _train(config, rt)
        if (config.fsdp and rt.world_size > 1) or config.deepspeed:
            # The shards hold the process group: free them while it exists, not at interpreter exit
            # (where gloo's threads can abort the process). The trained weights are in final/.
            result.model = None
            gc.collect()
    return result


def _engine_env(config: TrainConfig):
    """--deepspeed in a process no launcher started: the launcher variables DeepSpeed reads (``dpolab.zero``)."""
    if not config.deepspeed:
        return contextlib.nullcontext()
    from .zero import launcher_env

    return launcher_env()


def _train(config: TrainConfig, rt: Runtime) -> TrainResult:
    if not rt.is_main:  # one progress bar (tokenization, loading, reference pass, steps): the main process's
        config = dataclasses.replace(config, progress=False)
    say = print if rt.is_main else (lambda *a, **k: None)
    seed_everything(config.seed)
    check_tracker(config.report_to)
    check_output_dir(config)
    if config.deepspeed:  # a missing or malformed DeepSpeed file fails before the (long) data preparation
        from .zero import read_config

        read_config(config.deepspeed)
    config = online.resolve_reference(config, say)  # --online: fresh samples need π_ref's weights
    tokenizer = load_tokenizer(config)
    judge = online.open_judge(config, rt)  # --online: a bad --judge fails before the data and the model
    data = prepare_data(config, tokenizer, cache_dir=Path(config.output_dir) / "cache")  # raises on bad input
    model = load_model(config, rt, pad_token_id=tokenizer.pad_token_id)
    if config.activation_offloading and rt.device.type != "cuda":
        say(f"note: --activation-offloading moves activations from GPU to CPU memory; on {rt.device} they are "
            "already in CPU memory, so it does nothing")
    if getattr(get_loss(config.loss), "plain_rows", False) and (config.prefix_sharing or config.packing):
        # a reward model reads each sequence's last token: one sequence per padded row (dpolab.losses.reward)
        config = dataclasses.replace(config, prefix_sharing=False, packing=False)
    elif (config.prefix_sharing or config.packing) and not supports_custom_layout(model):
        say(f"note: {type(model).__name__} with attention '{model.config._attn_implementation}' does not take "
            "the masks of prefix sharing and packing; training with plain padded rows")
        config = dataclasses.replace(config, prefix_sharing=False, packing=False)
    out = prepare_output_dir(config, rt)
    if rt.is_main:  # nothing is written before the data and the model load
        save_token_cache(data)
    for line in data.summary:
        say(line)
    if lora.is_lora(model):
        say(lora.describe(model))
    resolved = {**config.to_dict(), "precision": rt.precision}
    if rt.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    info = ckpt.run_info(resolved, data_fingerprint(data.train) + data_fingerprint(data.eval))
    resume_from = ckpt.resolve_resume(config.resume, out) if config.resume else None
    if resume_from is not None:  # refuse a mismatch before the (long) reference pass
        for diff in ckpt.check_resumable(ckpt.read_run_info(resume_from), info, config.resume_force):
            say(f"resume: differs from the checkpoint (--resume-force): {diff}")
    loss_fn = get_loss(config.loss)
    # LoRA: whether the reference is the base model is read from the whole adapter, before it is sharded
    reference_scope = lora.initial_reference(model)
    sharded = _shard(model, config, rt, say)  # --fsdp/--deepspeed: before the reference pass, which scores with them
    reference, ref_model = None, None
    if not getattr(loss_fn, "reference_free", False):  # built from the initial weights, before any resume
        reference, ref_model = _reference(config, rt, model, sharded, tokenizer, data, out, say, reference_scope)
    optimizer = sharded.optimizer if config.deepspeed else build_optimizer(model, config)  # FSDP: on the shards
    run = _Run(config, rt, model, tokenizer, data, reference, loss_fn, out, say, optimizer, info)
    run.objectives = ObjectiveScales.build(config, {"train": data.train, "eval": data.eval})  # --objective
    if config.kl_eval_steps:  # from the initial weights, before the resume (dpolab.control)
        run.kl_monitor = KLMonitor(model, reference, kl_prompt_ids(data, config.kl_prompts), tokenizer, config, rt,
                                   ref_model=ref_model)
    del ref_model  # --reference-model with precompute: scored, then freed (unless the KL monitor holds it)
    if config.online:  # samples the policy being trained (dpolab.online)
        run.online_pairs = online.build(config, model, tokenizer, judge, data, rt)
    if resume_from is not None:
        run.state = ckpt.load_checkpoint(resume_from, model, run.optimizer, sharded=sharded)
        if rt.is_main:
            ckpt.truncate_metrics(out / "metrics.jsonl", run.state.step)
        say(f"resumed from {resume_from} at step {run.state.step}")
    run.policy = sharded or distributed.wrap(model, rt)  # after the resume: DDP starts from the same weights
    return run.loop()


def _reference(config: TrainConfig, rt: Runtime, model, sharded, tokenizer, data: PreparedData, out: Path, say,
               scope):
    """(π_ref, its model when --reference-model loaded one, else None).

    π_ref is --model's initial weights, or with --reference-model that model (``load_reference_model``):
    kept in memory for --reference model, else it scores the data once like the initial weights would.
    """
    ref_model = load_reference_model(config, rt, tokenizer, model) if config.reference_model else None
    if ref_model is not None:
        say(f"reference: {config.reference_model} (--reference-model), not --model's initial weights")
    if config.reference == "model":
        return ModelReference(ref_model if ref_model is not None else model, rt, copy=ref_model is None), ref_model
    splits = {"train": data.train, **({"eval": data.eval} if data.eval else {})}
    scorer = ref_model if ref_model is not None else sharded or model
    with scope:  # LoRA: a fresh adapter scores with adapters off (lora.initial_reference, read before sharding)
        reference = PrecomputedReference.build(
            scorer, splits, rt, cache_dir=out / "cache", batch_size=config.effective_eval_batch_size,
            pad_token_id=tokenizer.pad_token_id, progress=config.progress, say=say, ld_alpha=config.ld_alpha,
            layout=config.layout)
    return reference, ref_model


def _shard(model: torch.nn.Module, config: TrainConfig, rt: Runtime, say):
    """--deepspeed: the policy under a DeepSpeed ZeRO engine (``dpolab.zero``); --fsdp under a launcher:
    sharded with FSDP2 (``dpolab.sharding``; its optimizer is built on the shards afterwards); else None."""
    if config.deepspeed:
        from .zero import wrap

        policy = wrap(model, config, build_optimizer(model, config), rt)
        say(f"DeepSpeed ZeRO stage {policy.stage} on {rt.world_size} process(es), config {config.deepspeed}")
        return policy
    if not config.fsdp:
        return None
    if rt.world_size == 1:
        say("note: --fsdp in a single process: nothing to shard, training the whole model")
        return None
    from .sharding import shard

    return shard(model, rt)


@dataclass
class _Run:
    """Everything one training run holds; ``loop`` is the training loop itself."""

    config: TrainConfig
    rt: Runtime
    model: torch.nn.Module
    tokenizer: object
    data: PreparedData
    reference: object
    loss_fn: Callable
    out: Path
    say: Callable
    optimizer: torch.optim.Optimizer
    info: dict
    state: TrainState = field(default_factory=TrainState)
    policy: object = None
    """What the training forward calls: the model, or under several processes its DDP wrapper."""
    kl_monitor: KLMonitor | None = None
    """--kl-eval-steps: samples KL(π‖π_ref); built from the initial weights, before any resume."""
    beta: float | None = None
    """The β of the current step (``dpolab.control``); None before the first: ``config.beta``."""
    objectives: ObjectiveScales | None = None
    """--objective: per-pair weights of each objective and per-objective metrics (``dpolab.objectives``)."""
    online_pairs: online.OnlinePairs | None = None
    """--online: adds pairs sampled from the current policy to a step's micro-batches."""

    def loop(self) -> TrainResult:
        config, rt, state = self.config, self.rt, self.state
        per_epoch, total_steps = plan_steps(len(self.data.train), config, rt.world_size)
        warmup = math.floor(config.warmup_ratio * total_steps)
        self.logger = MetricsLogger(self.out, report_to=config.report_to, run_name=config.run_name,
                                    config=config.to_dict(), enabled=rt.is_main)
        reference = config.reference if self.reference is not None else "none"
        self.say(f"training: {len(self.data.train):,} pairs, {per_epoch:,} steps per epoch, {total_steps:,} steps, "
                 f"precision {rt.precision}, device {rt.device}, reference {reference}, loss {config.loss}")
        result = TrainResult(output_dir=self.out, steps=state.step, model=self.model)
        window = MetricSums.restore(state.window_sums, state.window_pairs)
        self.started, self.elapsed_before = time.perf_counter(), state.elapsed_s
        bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
                   disable=not (config.progress and rt.is_main))
        self.control = BetaControl(config, total_steps, scale=state.beta_scale)
        self.model.train()
        epoch = state.step / per_epoch
        steps = optimizer_steps(self.data.train, config, rt, self.tokenizer.pad_token_id, start=state.step)
        with GracefulStop() as stop:
            for epoch, micro_batches in steps:
                if state.step >= total_steps or result.stopped_early:
                    break
                lr = config.learning_rate * lr_factor(state.step, total_steps, warmup, config.lr_scheduler)
                self.beta = self.control.beta(state.step)
                online_metrics = None
                if self.online_pairs is not None:  # on-policy pairs, sampled before this step's update
                    micro_batches, online_metrics = self.online_pairs.extend(state.step, micro_batches)
                grad_norm = self._optimizer_step(micro_batches, lr, window)
                state.step += 1
                last = state.step == total_steps
                if online_metrics is not None:
                    self.logger.log({"step": state.step, "epoch": round(epoch, 4), **online_metrics})
                if state.step == 1 or state.step % config.logging_steps == 0 or last:
                    result.metrics = self._log(epoch, lr, grad_norm, window, bar)
                    window = MetricSums()
                bar.update(1)
                if self.data.eval and config.eval_steps and (state.step % config.eval_steps == 0 or last):
                    result.eval_metrics = self._evaluate(epoch)
                    result.stopped_early = self._early_stop(result.eval_metrics["eval_loss"])
                if self.control.due(state.step):
                    result.stopped_early = self._kl_control(epoch) or result.stopped_early
                # every process stops at the same step, whichever of them got the signal
                interrupted = rt.any_process(stop.requested is not None) and not last  # at the last step: finish
                if (config.save_steps and state.step % config.save_steps == 0 and not last) or interrupted:
                    self._checkpoint(window)
                if interrupted:
                    signum = stop.requested or signal.SIGTERM
                    raise TrainingStopped(self._interrupted_message(signum), 128 + signum)
        bar.close()
        result.steps = state.step
        if self.data.eval and not config.eval_steps:
            result.eval_metrics = self._evaluate(epoch)
        weights = self._full_weights()  # every process joins the gathering under --fsdp/--deepspeed
        if rt.is_main:
            ckpt.save_pretrained(self.out / "final", self.model, self.tokenizer, state_dict=weights)
        if config.merge_lora:
            self._save_merged(result)
        self.logger.close()
        self.say(f"done: {state.step} steps in {self._elapsed():.1f}s; model saved to {self.out / 'final'}")
        return result

    def _save_merged(self, result: TrainResult) -> None:
        """--merge-lora: final-merged/, the adapter merged into the base weights. Unsharded: in place (no
        second copy; result.model becomes the merged model). Sharded: from the whole weights, gathered
        by every process, merged in a CPU copy on the main process (``lora.save_merged_weights``)."""
        path = self.out / "final-merged"
        if getattr(self.policy, "lockstep", False):
            weights = self.policy.full_state_dict()
            if self.rt.is_main:
                lora.save_merged_weights(path, self.model, weights, self.tokenizer)
        elif self.rt.is_main:
            result.model = lora.save_merged(path, self.model, self.tokenizer)
        self.say(f"merged LoRA model saved to {path}")

    def _optimizer_step(self, micro_batches: list[tuple[PairBatch, bool]], lr: float, window: MetricSums) -> float:
        """Forward/backward over the micro-batches, clip, update; a non-finite step is skipped."""
        config, rt, state = self.config, self.rt, self.state
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Each pair weighs the same whatever the micro-batch split: divide the summed per-pair losses by
        # the number of pairs in the whole optimizer step (on every process), not by micro-batch sizes.
        mine = sum(b.num_pairs for b, counts in micro_batches if counts)
        step_pairs = float(rt.reduce_sum(torch.tensor(float(mine))))
        step_metrics = MetricSums()
        engine = getattr(self.policy, "engine", None)  # --deepspeed: DeepSpeed owns backward and the update
        for k, (batch, counts) in enumerate(micro_batches):
            state.tokens += int(rt.reduce_sum(torch.tensor(batch.num_tokens if counts else 0)))
            with distributed.gradient_sync(self.policy, last=k == len(micro_batches) - 1), self._offloading():
                losses, metrics = pair_losses(self.policy, batch.to(rt.device), self.reference, self.loss_fn,
                                              config, rt, "train", beta=self.beta, objectives=self.objectives)
                weight = rt.world_size / step_pairs if counts else 0.0
                if engine is None:
                    (losses.sum() * weight).backward()  # DDP averages grads over processes
            step_metrics.add(metrics if counts else {key: v[:0] for key, v in metrics.items()})
            if engine is not None:
                self._engine_backward(losses.sum() * weight, step_metrics)
        if engine is not None:
            window.merge(step_metrics)
            return self.policy.grad_norm()
        grad_norm = clip_gradients(self.model, config.max_grad_norm)
        finite = math.isfinite(grad_norm) and step_metrics.all_finite(rt)
        if finite:
            self.optimizer.step()
            sync_reference(self.reference, self.model, state.step + 1, config)  # TR-DPO: no-op unless --ref-sync-steps
            window.merge(step_metrics)
            state.skipped_in_a_row = 0
        else:  # no update from a NaN/inf: skip the step, count it, give up after too many in a row
            state.skipped_steps += 1
            state.skipped_in_a_row += 1
            self.say(f"step {state.step + 1}: non-finite loss or gradient, update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        if state.skipped_in_a_row >= config.max_skipped_steps:
            raise TrainingStopped(f"training diverged: {state.skipped_in_a_row} steps in a row had a non-finite "
                                  f"loss or gradient (at step {state.step + 1}); lower --learning-rate, check the "
                                  "data, or raise --max-skipped-steps")
        return grad_norm

    def _engine_backward(self, loss: torch.Tensor, step_metrics: MetricSums) -> None:
        """--deepspeed: backward and step through the engine after each micro-batch (it updates at the
        accumulation boundary, clipping as its config says). DeepSpeed cannot skip an update, so a
        non-finite loss stops the run before its gradients reach the weights."""
        if not step_metrics.all_finite(self.rt):
            raise TrainingStopped(f"non-finite loss at step {self.state.step + 1}: under --deepspeed the update cannot "
                                  "be skipped; lower --learning-rate or check the data, then rerun")
        self.policy.backward(loss)
        self.policy.step()

    def _offloading(self):
        """--activation-offloading on GPU: tensors saved for backward go to pinned CPU memory."""
        if self.config.activation_offloading and self.rt.device.type == "cuda":
            return torch.autograd.graph.save_on_cpu(pin_memory=True)
        return contextlib.nullcontext()

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _log(self, epoch: float, lr: float, grad_norm: float, window: MetricSums, bar) -> dict:
        tokens, elapsed = self.state.tokens, self._elapsed()
        row = {"step": self.state.step, "epoch": round(epoch, 4), **window.means(self.rt), "learning_rate": lr,
               "grad_norm": grad_norm, "beta": self.beta, "tokens": tokens, "skipped_steps": self.state.skipped_steps,
               "elapsed_s": round(elapsed, 3)}
        self.logger.log(row)
        if "loss" in row:
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                            tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}")
        return row

    def _evaluate(self, epoch: float) -> dict:
        metrics = evaluate(self._scorer(), self.data.eval, self.reference, self.loss_fn, self.config, self.rt,
                           self.tokenizer.pad_token_id, beta=self.beta, objectives=self.objectives)
        self.logger.log({"step": self.state.step, "epoch": round(epoch, 4), **metrics})
        return metrics

    def _kl_control(self, epoch: float) -> bool:
        """Estimate KL(π‖π_ref), log it with the β of the next step (``beta_next``), adapt β (--target-kl);
        True when the estimate exceeds --max-kl."""
        metrics = self.kl_monitor.estimate()
        self.control.update(metrics["kl"])
        self.state.beta_scale = self.control.scale
        self.logger.log({"step": self.state.step, "epoch": round(epoch, 4), **metrics,
                         "beta_next": self.control.beta(self.state.step)})
        if self.control.over_limit(metrics["kl"]):
            self.say(f"stopping at step {self.state.step}: KL estimate {metrics['kl']:.3f} ± "
                     f"{metrics['kl_stderr']:.3f} nats exceeds --max-kl {self.config.max_kl}")
            return True
        return False

    def _early_stop(self, eval_loss: float) -> bool:
        state, patience = self.state, self.config.early_stopping_patience
        if eval_loss < state.best_eval:
            state.best_eval, state.bad_evals = eval_loss, 0
        else:
            state.bad_evals += 1
        if patience and state.bad_evals >= patience:
            self.say(f"early stopping at step {state.step}: eval loss has not improved for {state.bad_evals} "
                     f"evaluations (best {state.best_eval:.4f})")
            return True
        return False

    def _checkpoint(self, window: MetricSums) -> None:
        self.state.elapsed_s = self._elapsed()
        self.state.window_sums, self.state.window_pairs = dict(window.sums), window.pairs
        weights = self._full_weights()
        if hasattr(self.policy, "save_engine_state"):  # --deepspeed: its partitions, in its own format
            self.policy.save_engine_state(self.out / "checkpoints", self.state.step)
        # sharded: the whole optimizer state gathered the same way (a collective), or {} where not supported
        optimizer_state = self.policy.full_optimizer_state(self.optimizer) if weights is not None else None
        if self.rt.is_main:
            ckpt.save_checkpoint(self.out, self.model, self.tokenizer, self.optimizer, self.state, self.info,
                                 keep=self.config.save_total_limit, state_dict=weights,
                                 optimizer_state=optimizer_state)

    def _scorer(self):
        """What evaluation scores with: the sharded policy under --fsdp, else the model itself."""
        return self.policy if getattr(self.policy, "lockstep", False) else self.model

    def _full_weights(self) -> dict | None:
        """Under --fsdp/--deepspeed what final/ and checkpoints hold, gathered from the shards (a collective):
        the whole weights, or with LoRA the adapter only; else None (the model's own)."""
        if not getattr(self.policy, "lockstep", False):
            return None
        return self.policy.adapter_state_dict() if lora.is_lora(self.model) else self.policy.full_state_dict()

    def _interrupted_message(self, signum: int) -> str:
        return (f"interrupted at step {self.state.step}; checkpoint saved to {self.out / 'checkpoints'}. "
                f"Resume with: dpolab train --config {self.out / 'config.yaml'} --resume")
