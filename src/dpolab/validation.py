"""Validation of ``TrainConfig``: each rule raises a ``ConfigError`` naming the field, the problem and the fix.

``TrainConfig.__post_init__`` calls ``validate``; options of larger features validate in their own
modules (``dpolab.control.validate``: β schedules and KL control; ``dpolab.reward.validate``: the
reward-model loss; ``dpolab.objectives.validate``: multi-objective DPO; ``dpolab.online.validate``: --online).
"""

from __future__ import annotations

import math

from .errors import ConfigError
from .config import REQUIRED, _suggest


def validate(c) -> None:
    """Every rule, in the order a user would fix them (required fields first)."""
    from .control import validate as _validate_control  # late import, as for the losses
    from .reward import validate as _validate_reward
    from .objectives import validate as _validate_objectives
    from .online import validate as _validate_online

    _validate(c)
    _validate_reward(c)  # the reward-model loss: before the loss mix is built (dpolab.reward.validate)
    _validate_objective(c)
    _validate_lora(c)
    _validate_fsdp(c)
    _validate_deepspeed(c)
    _validate_control(c)  # β schedule and KL control: dpolab.control.validate
    _validate_streaming(c)
    _validate_objectives(c)  # multi-objective DPO: dpolab.objectives.validate
    _validate_online(c)  # online DPO: dpolab.online.validate
    _check(not (c.online and c.objective), "objective", "--online samples pairs for one judge; they belong to no "
           "objective of --objective", "train the objectives offline (label each with dpolab label --judge NAME=SPEC), "
           "or drop --objective")
    _validate_reference_model(c)


def _check(ok: bool, field: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(field, problem, fix)


def _validate(c) -> None:
    for name in REQUIRED:
        _check(bool(getattr(c, name)), name, "is required",
               f"pass --{name.replace('_', '-')} or set '{name}' in the YAML file")
    _check(c.beta > 0, "beta", f"must be > 0, got {c.beta}", "typical values are 0.01 to 0.5")
    _check(0 <= c.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {c.label_smoothing}",
           "0 is plain DPO; 0.1 assumes 10% of labels are flipped")
    _check(c.learning_rate > 0, "learning_rate", f"must be > 0, got {c.learning_rate}", "try 5e-6")
    for name in ("batch_size", "grad_accum", "logging_steps", "num_proc"):
        _check(getattr(c, name) >= 1, name, f"must be >= 1, got {getattr(c, name)}", "use a positive integer")
    _check(c.max_skipped_steps >= 1, "max_skipped_steps", f"must be >= 1, got {c.max_skipped_steps}",
           "use a positive integer (10 by default)")
    for name in ("max_steps", "eval_steps", "save_steps", "early_stopping_patience", "eval_batch_size",
                 "save_total_limit", "pack_length"):
        v = getattr(c, name)
        _check(v is None or v >= 1, name, f"must be >= 1, got {v}", "use a positive integer or leave it unset")
    _check(c.epochs > 0, "epochs", f"must be > 0, got {c.epochs}", "use e.g. 1 or 0.5, or set --max-steps")
    _check(0 <= c.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {c.warmup_ratio}", "try 0.1")
    _check(c.weight_decay >= 0, "weight_decay", f"must be >= 0, got {c.weight_decay}", "try 0.0")
    _check(c.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {c.max_grad_norm}", "0 disables clipping")
    _check(0 <= c.eval_split < 1, "eval_split", f"must be in [0, 1), got {c.eval_split}", "try 0.05")
    _check(not (c.eval_data and c.eval_split), "eval_split", "cannot be combined with eval_data",
           "give either --eval-data or --eval-split")
    _check(c.max_length >= 2, "max_length", f"must be >= 2, got {c.max_length}", "try 1024")
    _check(1 <= c.max_prompt_length < c.max_length, "max_prompt_length",
           f"must be in [1, max_length={c.max_length}), got {c.max_prompt_length}",
           "leave room for the completion, e.g. half of max_length")
    has_eval = bool(c.eval_data or c.eval_split)
    _check(c.eval_steps is None or has_eval, "eval_steps", "needs eval data", "add --eval-data or --eval-split")
    _check(c.early_stopping_patience is None or c.eval_steps is not None, "early_stopping_patience",
           "needs periodic evaluation", "add --eval-steps N (and eval data)")
    _check(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda") or c.device == "mps",
           "device", f"unknown device '{c.device}'", "use auto, cpu, cuda or cuda:N")


def _in(c, name: str, ok, bounds: str, hint: str) -> None:
    value = getattr(c, name)
    _check(ok(value), name, f"must be {bounds}, got {value}", hint)


def _validate_objective(c) -> None:
    """The loss (or mix of losses) and the options of the preference-optimization family."""
    from .losses import LOSSES, get_loss, loss_names  # late import: losses do not depend on the config

    names = loss_names(c.loss)
    for name in names:
        _check(name in LOSSES, "loss", f"unknown loss '{name}'", _suggest(name, LOSSES, "choose one of"))
    _validate_weights(c, names)
    try:
        loss = get_loss(c.loss)
    except ValueError as e:
        raise ConfigError("loss", str(e), "train kto on its own") from None
    _in(c, "exo_epsilon", lambda v: 0 < v < 0.5, "in (0, 0.5)", "try 0.001")
    _in(c, "discopop_tau", lambda v: 0 < v <= 1, "in (0, 1]", "the paper uses 0.05")
    _in(c, "dpop_lambda", lambda v: v >= 0, ">= 0", "the paper uses 50")
    _in(c, "f_alpha", lambda v: 0 <= v < 1, "in [0, 1)", "try 0.5")
    _in(c, "ld_alpha", lambda v: 0 <= v <= 1, "in [0, 1]", "1 turns LD-DPO off; the paper uses 0.3 to 0.8")
    _in(c, "desirable_weight", lambda v: v > 0, "> 0", "try 1.0")
    _in(c, "undesirable_weight", lambda v: v > 0, "> 0", "try 1.0")
    _in(c, "ref_sync_steps", lambda v: v is None or v >= 1, ">= 1", "e.g. 512, or leave it unset")
    _in(c, "ref_sync_alpha", lambda v: 0 < v <= 1, "in (0, 1]", "try 0.6")
    free, unpaired = getattr(loss, "reference_free", False), getattr(loss, "unpaired", False)
    for name, used, default in (("f_divergence", c.f_divergence != "reverse_kl", "reverse_kl"),
                                ("ref_sync_steps", c.ref_sync_steps is not None, "unset")):
        _check(not (used and free), name, f"has no effect with the reference-free loss '{c.loss}'",
               f"leave it {default}, or pick a loss with a reference")
    for name, used in (("f_divergence", c.f_divergence != "reverse_kl"), ("wpo", c.wpo), ("ld_alpha", c.ld_alpha != 1)):
        _check(not (used and unpaired), name, f"applies to preference pairs, not to '{c.loss}'s unpaired examples",
               "remove it, or pick a pairwise loss")
    _check(c.ref_sync_steps is None or c.reference == "model", "ref_sync_steps",
           "TR-DPO updates the reference model, but --reference precompute scores it once before training",
           "add --reference model")
    _check(c.ref_sync_steps is None or c.resume is None, "resume",
           "cannot restore a TR-DPO reference: checkpoints hold the policy, and the reference moved with it",
           "rerun without --resume, or train without --ref-sync-steps")


def _validate_lora(c) -> None:
    """LoRA options: a rank >= 0, then options that only make sense with an adapter being trained.

    ``merge_lora`` is checked when the model loads: an adapter folder given as --model also turns LoRA on.
    """
    _in(c, "lora_r", lambda v: v is None or v >= 0, ">= 0", "e.g. 16, or 0/unset for full fine-tuning")
    _in(c, "lora_alpha", lambda v: v is None or (v > 0 and math.isfinite(v)), "> 0", "e.g. 2 x lora_r")
    _in(c, "lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)", "0 (the default) or e.g. 0.05")
    if c.lora_target_modules is not None:
        names = [n.strip() for n in c.lora_target_modules.split(",")]
        _check(all(names), "lora_target_modules", f"expected a comma list of module names, got "
               f"'{c.lora_target_modules}'", "write e.g. q_proj,v_proj, or leave it unset for all linear layers")
    for name, used in (("lora_alpha", c.lora_alpha is not None), ("lora_dropout", c.lora_dropout != 0),
                       ("lora_target_modules", c.lora_target_modules is not None)):
        _check(not used or bool(c.lora_r), name, "has no effect without --lora-r",
               "add --lora-r N (e.g. 16), or drop it (an adapter given as --model keeps its own settings)")
    _check(not (c.lora_r and c.ref_sync_steps is not None), "ref_sync_steps",
           "TR-DPO moves a reference copy of the weights, but with LoRA the reference is the same model with the "
           "adapter off", "drop --ref-sync-steps, or train without --lora-r")


def _validate_fsdp(c) -> None:
    """--fsdp: what sharded training does not do (yet)."""
    if not c.fsdp:
        return
    why = ("with LoRA it would score the base model outside the sharded forward (not supported)" if c.lora_r
           else "it would keep a whole unsharded copy on every process")
    _check(c.reference != "model", "reference", f"--fsdp shards the policy, but --reference model: {why}",
           "use --reference precompute (the default) with --fsdp")


def _validate_deepspeed(c) -> None:
    """--deepspeed: the engine holds (and under ZeRO-3 partitions) the weights, so nothing else may."""
    if not c.deepspeed:
        return
    _check(not c.fsdp, "fsdp", "--fsdp and --deepspeed are two ways to shard the same model", "pick one of them")
    why = ("with LoRA it would score the base model outside the engine (not supported)" if c.lora_r
           else "it would keep a whole unsharded copy beside the DeepSpeed engine")
    _check(c.reference != "model", "reference", f"--reference model: {why}",
           "use --reference precompute (the default) with --deepspeed")
    _check(c.kl_eval_steps is None, "kl_eval_steps", "sampling from a DeepSpeed-partitioned policy is not "
           "supported", "drop --kl-eval-steps, or estimate KL afterwards with dpolab eval")
    _check(not c.online, "online", "sampling from a DeepSpeed-partitioned policy is not supported",
           "drop --deepspeed for online DPO")
    _check(not c.reference_model, "reference_model", "--reference-model would load a whole second model on every "
           "process beside the partitioned policy", "drop --reference-model, or train without --deepspeed")


def _validate_streaming(c) -> None:
    """--streaming: the training data is read as it goes, so its length is unknown and it is never held whole."""
    if not c.streaming:
        return
    from .losses import get_loss  # late import: losses do not depend on the config

    _check(c.max_steps is not None, "max_steps", "is required with --streaming (the number of pairs is not known "
           "in advance)", "add --max-steps N")
    _check(not c.eval_split, "eval_split", "cannot hold out a fraction of streamed data",
           "pass held-out pairs as --eval-data instead")
    _check(not getattr(get_loss(c.loss), "unpaired", False), "loss", f"--streaming reads preference pairs, not "
           f"'{c.loss}'s unpaired examples", "drop --streaming, or pick a pairwise loss")


def _validate_weights(c, names: list[str]) -> None:
    """--loss-weights: one non-negative number per --loss name, for a mix of two or more losses."""
    if c.loss_weights is None:
        return
    _check(len(names) > 1, "loss_weights", "weights a mix of two or more losses, but --loss names one",
           "give --loss a comma list (e.g. sigmoid,sft), or drop --loss-weights")
    try:
        weights = c.loss_weight_values
    except ValueError:
        raise ConfigError("loss_weights", f"expected comma-separated numbers, got '{c.loss_weights}'",
                          "write e.g. --loss-weights 0.8,0.2") from None
    _check(len(weights) == len(names), "loss_weights", f"{len(weights)} weights for {len(names)} losses ({c.loss})",
           "give one weight per --loss name")
    _check(all(w >= 0 and math.isfinite(w) for w in weights) and any(w > 0 for w in weights), "loss_weights",
           f"must be finite, >= 0 and not all 0, got '{c.loss_weights}'", "write e.g. --loss-weights 0.8,0.2")


def _validate_reference_model(c) -> None:
    """--reference-model: π_ref from another model. Its tokenizer and weights are checked when it loads
    (``dpolab.prepare.load_reference_model``); here the options it cannot be combined with."""
    if c.reference_model is None:
        return
    from .losses import get_loss  # late import: losses do not depend on the config

    _check(bool(c.reference_model.strip()), "reference_model", "is empty",
           "give a model folder or hub name, or leave it unset to use --model as the reference")
    _check(not getattr(get_loss(c.loss), "reference_free", False), "reference_model",
           f"has no effect with the reference-free loss '{c.loss}'", "drop --reference-model, or pick a loss "
           "with a reference")
    _check(not c.lora_r, "reference_model", "with LoRA the reference is the policy itself with its adapter off, "
           "not another model", "drop --reference-model, or train all weights (no --lora-r)")
    _check(not c.fsdp, "reference_model", "--fsdp shards the policy, but another reference model would be "
           "loaded whole on every process", "drop --fsdp, or drop --reference-model")
