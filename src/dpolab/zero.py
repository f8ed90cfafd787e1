"""Sharded training on DeepSpeed ZeRO (``--deepspeed ds_config.json``), DeepSpeed's engine as it is.

``deepspeed.initialize`` wraps the whole log-prob computation (``dpolab.distributed._Scorer``: the
backbone, then the chunked LM head) in a ``DeepSpeedEngine``, as DDP and FSDP2 wrap it. ZeRO-1/2
partition AdamW's state (and, at stage 2, the gradients) across the processes; ZeRO-3 the weights
too, gathering each module's weights for its forward and backward; the config's ``offload_*``
sections move them to CPU memory. dpolab's loop keeps its own schedule, metrics and weighting of
pairs, and hands the engine what DeepSpeed must own: ``engine.backward`` (gradient partitioning and
reduction) and ``engine.step`` (clipping, the optimizer step, zeroing).

The config is the user's DeepSpeed JSON file; the values dpolab already knows (micro-batch,
accumulation, clipping, bf16) are filled in where the file says ``"auto"`` or leaves them out, and a
value that contradicts dpolab's own option is refused with the fix. DeepSpeed's optimizer is used
when the file has an ``"optimizer"`` section (e.g. DeepSpeedCPUAdam for ZeRO-Offload); otherwise
dpolab's AdamW, with its weight-decay groups and learning-rate schedule either way.

As with FSDP (``dpolab.sharding``), every process runs every forward together (``lockstep``), and
saving gathers the whole weights to CPU, written by rank 0 as a plain ``save_pretrained`` folder.
Checkpoints also hold DeepSpeed's own state (``engine.save_checkpoint`` under
``checkpoints/deepspeed/step-N``), which ``--resume`` reloads with the same number of processes.

LoRA (peft): the engine gets only the adapter's parameters to optimize; ZeRO-3 partitions the frozen
weights as well. final/ and checkpoints hold the adapter in peft's format, gathered alone
(``adapter_state_dict``: ``GatheredParameters`` over the adapter's tensors under ZeRO-3);
``--merge-lora`` gathers the whole weights once (``dpolab.lora.save_merged_weights``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from . import lora
from .errors import ConfigError
from .reference import model_fingerprint
from .runtime import Runtime

AUTO = "auto"


def read_config(path: str) -> dict:
    """The DeepSpeed JSON file as a dict; a missing or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("deepspeed", f"'{path}' is not a file", "give a DeepSpeed JSON config, e.g. "
                          "examples/deepspeed/zero3.json")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("deepspeed", f"{path}: not valid JSON (line {e.lineno}: {e.msg})",
                          "fix the file; DeepSpeed configs are JSON") from None
    if not isinstance(raw, dict):
        raise ConfigError("deepspeed", f"{path}: expected a JSON object", "see examples/deepspeed/zero3.json")
    return raw


def _fill(raw: dict, key: str, value, flag: str, path: str) -> None:
    """Set ``raw[key]`` to dpolab's value where missing or "auto"; refuse a contradicting value."""
    given = raw.get(key, AUTO)
    if given == AUTO:
        raw[key] = value
    elif not (isinstance(given, (int, float)) and math.isclose(float(given), float(value))):
        raise ConfigError("deepspeed", f"{path}: {key} is {given!r} but {flag} gives {value!r}",
                          f"set \"{key}\": \"auto\" in the file (dpolab fills it in), or pass {flag} {given}")


def resolve_config(path: str, config, rt: Runtime) -> dict:
    """The user's file with dpolab's values filled in: micro-batch = --batch-size, accumulation =
    --grad-accum, total batch = their product × processes, clipping = --max-grad-norm, bf16 = --precision."""
    raw = read_config(path)
    _fill(raw, "train_micro_batch_size_per_gpu", config.batch_size, "--batch-size", path)
    _fill(raw, "gradient_accumulation_steps", config.grad_accum, "--grad-accum", path)
    _fill(raw, "train_batch_size", config.batch_size * config.grad_accum * rt.world_size,
          "--batch-size × --grad-accum × processes", path)
    _fill(raw, "gradient_clipping", config.max_grad_norm, "--max-grad-norm", path)
    bf16 = raw.setdefault("bf16", {})
    if bf16.get("enabled", AUTO) == AUTO:
        bf16["enabled"] = rt.precision == "bf16"
    if bf16["enabled"] and rt.precision != "bf16":
        raise ConfigError("deepspeed", f"{path}: bf16 is enabled but the run's precision is {rt.precision}",
                          "pass --precision bf16, or set \"bf16\": {\"enabled\": \"auto\"} in the file")
    if raw.get("fp16", {}).get("enabled") is True:
        raise ConfigError("deepspeed", f"{path}: fp16 is not supported by dpolab (bf16 or fp32 only)",
                          "use \"bf16\": {\"enabled\": true} instead")
    raw.setdefault("steps_per_print", 10 ** 9)  # dpolab logs; DeepSpeed's own step lines would interleave
    return raw


def stage(raw: dict) -> int:
    return int(raw.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def launcher_env() -> Iterator[None]:
    """DeepSpeed reads the launcher's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*) as it sets up and
    as it runs (ZeRO-3 reads LOCAL_RANK in forward); in a process no launcher started, those of a group of
    one, set for the block (the whole run) and removed after it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def init_process_group(rt: Runtime) -> None:
    """DeepSpeed needs its communication backend even in one process: it reuses torch.distributed's group
    (gloo on CPU, set up by ``dpolab.distributed.runtime`` under a launcher), or makes a group of one, which
    stays for the life of the process (DeepSpeed caches its groups, so a later run reuses it)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if rt.device.type == "cpu" else "nccl",
                               auto_mpi_discovery=False, verbose=False)


class DeepSpeedPolicy:
    """The policy under a ``DeepSpeedEngine``; ``dpolab.reference.pair_logps`` calls ``score_batch``,
    the loop calls ``backward`` and ``step``."""

    lockstep = True
    """Every process must run each forward together (ZeRO-3 gathers weights in it)."""

    def __init__(self, model: torch.nn.Module, raw: dict, optimizer: torch.optim.Optimizer | None, rt: Runtime):
        import deepspeed

        from .distributed import _Scorer

        self.model = model
        self.weights_fingerprint = model_fingerprint(model)  # before ZeRO-3 partitions the weights
        self.stage = stage(raw)
        self.saved_tag = None
        kwargs = {"model_parameters": [p for p in model.parameters() if p.requires_grad]}
        if optimizer is not None and "optimizer" not in raw:
            kwargs = {"optimizer": optimizer}
        init_process_group(rt)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=_Scorer(model), config=raw, **kwargs)

    def score_batch(self, batch, fn=None) -> Tensor:
        return self.engine(batch, fn=fn)

    def backward(self, loss: Tensor) -> None:
        """dpolab weighs each pair itself (loss / pairs in the step), so DeepSpeed must not divide by
        the accumulation steps again."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        """After every micro-batch: DeepSpeed counts them and updates at the accumulation boundary."""
        self.engine.step()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> "DeepSpeedPolicy":
        self.engine.train(mode)
        return self

    def eval(self) -> "DeepSpeedPolicy":
        return self.train(False)

    def full_optimizer_state(self, optimizer) -> dict:
        """The optimizer state stays in DeepSpeed's own format (``save_engine_state``): the checkpoint's
        trainer_state.pt holds only where to find it."""
        return {"deepspeed_tag": self.saved_tag}

    def save_engine_state(self, checkpoints: Path, step: int) -> None:
        """Every process writes its partitions (weights, fp32 master copy, AdamW state) with
        ``engine.save_checkpoint`` under ``checkpoints/deepspeed/step-N``; a collective."""
        import shutil

        import torch.distributed as dist

        self.saved_tag = f"step-{step}"
        self.engine.save_checkpoint(str(checkpoints / "deepspeed"), tag=self.saved_tag, save_latest=False)
        if dist.get_rank() == 0:  # DeepSpeed states of checkpoints --save-total-limit has pruned since the last save
            for old in (checkpoints / "deepspeed").iterdir():
                if old.name != self.saved_tag and not (checkpoints / old.name / "trainer_state.pt").is_file():
                    shutil.rmtree(old, ignore_errors=True)

    def load_full_state(self, weights: dict, optimizer_state: dict, optimizer, path: Path) -> tuple[list, list]:
        """--resume: DeepSpeed reloads its partitions (needs the same number of processes as the run that
        saved them); the whole weights in the checkpoint folder are for ``transformers``, not read here."""
        tag = optimizer_state.get("deepspeed_tag")
        folder = Path(path).parent / "deepspeed"
        if not tag or not (folder / tag).is_dir():
            raise ConfigError("resume", f"{path} holds no DeepSpeed state ({folder / str(tag)} is missing)",
                              "resume from a checkpoint a --deepspeed run wrote, or rerun without --resume")
        loaded, _ = self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ConfigError("resume", f"DeepSpeed could not load {folder / tag}",
                              "resume with the same --deepspeed config and number of processes")
        return [], []

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole weights on CPU in fp32 for the main process (the others get an empty dict); every
        process must call it. Under ZeRO-3 one weight is gathered at a time, so no device ever holds more
        than its partitions and one whole weight (the model may be larger than one device)."""
        import torch.distributed as dist

        main = dist.get_rank() == 0
        params = dict(self.model.named_parameters(remove_duplicate=False))
        weights = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            with self._gathered([params[key]] if key in params else []):
                if main:
                    weights[key] = value.detach().float().cpu().clone()
        return weights

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """LoRA: the adapter's whole tensors on CPU in fp32 (under ZeRO-3 only they are gathered, the
        frozen base weights stay partitioned); every process must call it."""
        named = lora.adapter_parameters(self.model)
        with self._gathered([p for _, p in named]):
            return {name: p.detach().float().cpu().clone() for name, p in named}

    def _gathered(self, params: list) -> contextlib.AbstractContextManager:
        """ZeRO-3: ``params`` whole on every process inside the block (read only); else nothing to do."""
        if self.stage != 3 or not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def wrap(model: torch.nn.Module, config, optimizer: torch.optim.Optimizer, rt: Runtime) -> DeepSpeedPolicy:
    try:
        import deepspeed  # noqa: F401  (installed?)
    except ImportError:
        raise ConfigError("deepspeed", "DeepSpeed is not installed", "pip install deepspeed") from None
    return DeepSpeedPolicy(model, resolve_config(config.deepspeed, config, rt), optimizer, rt)

