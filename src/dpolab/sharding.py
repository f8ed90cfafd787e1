"""Sharded training (``--fsdp``) on PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``, as it is.

Under DDP every process holds the whole model, its gradients and its Adam state (16 bytes per
parameter in fp32). ``fully_shard`` splits each of them across the N processes instead: every
decoder layer is one FSDP unit (its weights are all-gathered just before its forward and backward and
freed after), and the rest (embeddings, final norm, LM head) is the root unit. Gradients are
reduce-scattered, averaged over processes as DDP's all-reduce does, so N processes × batch b still
train like one process × batch N·b.

As with DDP (``dpolab.distributed``), the root unit is ``_Scorer``: the whole log-prob computation
(backbone, then the chunked LM head) is one forward, so the root's weights are gathered for it.
Every process must run every forward together (each one all-gathers), so loops over a process's
share of the data (evaluation, the reference pass) run the same number of batches on every process,
with a batch that does not count where a share runs out (``lockstep``).

The optimizer is built after sharding (its parameters are the local shards, DTensors). Saving
gathers the full weights on every process's CPU (``get_model_state_dict``), and the main process
writes them as a plain ``save_pretrained`` folder (final/ and checkpoints alike). Checkpoints also
hold the whole AdamW state (``get_optimizer_state_dict``, keyed by parameter names), so ``--resume``
reads both on every process and each keeps its shards (``load_full_state``); the checkpoint does not
depend on the number of processes that wrote it.

LoRA (peft): a decoder layer's unit holds its frozen weights and its adapter's A and B together
(FSDP2 shards each parameter by itself, so requires_grad may differ inside a unit); the optimizer
holds the adapter's shards only. Saving gathers only the adapter (``adapter_state_dict``, peft's
format for final/ and checkpoints), and ``--resume`` loads the adapter and its optimizer state into
the shards, the frozen weights being those loaded from ``--model``. ``--merge-lora`` gathers the
whole weights once at the end (``dpolab.lora.save_merged_weights``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from . import lora
from .distributed import _Scorer
from .reference import model_fingerprint
from .runtime import Runtime

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: modules of the classes transformers names in
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), else the entries of the largest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: compute in bf16, reduce gradients in fp32 (master weights stay fp32); else fp32 throughout."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class ShardedPolicy:
    """The policy sharded with FSDP2; ``dpolab.reference.pair_logps`` calls ``score_batch``."""

    lockstep = True
    """Every process must run each forward together (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, rt: Runtime):
        self.model = model
        # the reference cache key, taken while every process still holds the same whole weights
        self.weights_fingerprint = model_fingerprint(model)
        policy = mixed_precision(rt.precision)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        # The root too frees its gathered weights after each forward. Left gathered after a no-grad
        # forward (the reference pass), its modules hold the gathered tensors instead of the shards, so
        # the optimizer built next got those: the root's weights (embeddings, LM head) never trained.
        self.scorer = fully_shard(_Scorer(model), mp_policy=policy, reshard_after_forward=True)

    def score_batch(self, batch, fn=None) -> Tensor:
        return self.scorer(batch, fn=fn)

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> "ShardedPolicy":
        self.model.train(mode)
        return self

    def eval(self) -> "ShardedPolicy":
        return self.train(False)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole weights on CPU, gathered from all shards; every process must call it."""
        return get_model_state_dict(self.model, options=FULL_ON_CPU)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """LoRA: the adapter's whole tensors on CPU, each gathered from its shards (the frozen base
        weights stay sharded, nothing else is gathered); every process must call it."""
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
                for name, p in lora.adapter_parameters(self.model)}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The whole AdamW state on CPU (keyed by parameter names), gathered from all shards; every
        process must call it (the main process gets it, the others an empty dict)."""
        return get_optimizer_state_dict(self.model, optimizer, options=FULL_ON_CPU)

    def load_full_state(self, weights: dict[str, Tensor], optimizer_state: dict, optimizer: torch.optim.Optimizer,
                        path=None) -> tuple[list[str], list[str]]:
        """--resume: every process reads the whole checkpoint and keeps its shards; returns (missing,
        unexpected) weight names (the tied LM head is stored once). LoRA: ``weights`` is the adapter
        only (the base weights are those loaded at the start, never trained)."""
        if lora.is_lora(self.model):
            weights = lora.to_model_keys(self.model, weights, path)  # refuses another adapter
            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            set_optimizer_state_dict(self.model, optimizer, optimizer_state,
                                     options=StateDictOptions(full_state_dict=True))
            return [], []
        keys = set(self.model.state_dict())
        missing = sorted(keys - set(weights))
        unexpected = sorted(set(weights) - keys)
        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(self.model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
        return missing, unexpected


def shard(model: torch.nn.Module, rt: Runtime) -> ShardedPolicy:
    return ShardedPolicy(model, rt)
