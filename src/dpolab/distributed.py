"""Data-parallel training over several processes, on torch.distributed as it is.

``torchrun --nproc-per-node N -m dpolab train …`` and ``accelerate launch -m dpolab train …`` start N
copies of the same command with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set.
``runtime`` turns those into a process group (gloo on CPU; on CUDA, NCCL for GPU tensors and gloo for
the few CPU scalars the loop reduces) and a ``Runtime`` on this process's device; ``wrap`` puts the
policy under ``DistributedDataParallel``.

Why a wrapper module: ``dpolab.logprobs`` calls the model's backbone and its LM head separately (so
the full logits are never built), but DDP prepares its gradient all-reduce only when its own
``forward`` runs. ``_Scorer`` makes the whole log-prob computation (backbone, chunked head) one
module's forward; DDP wraps that, and its hooks then average every gradient across processes
exactly as they would for a plain ``model(...)`` call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .logprobs import batch_logps
from .runtime import Runtime


def process_device(device: torch.device) -> torch.device:
    """This process's device: ``cuda`` (no index) becomes ``cuda:LOCAL_RANK``, one GPU per process."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def backend_for(device: torch.device) -> str | None:
    """gloo on CPU; NCCL for CUDA tensors with gloo beside it for CPU ones; torch's default elsewhere."""
    if device.type == "cpu":
        return "gloo"
    if device.type == "cuda":
        return "cpu:gloo,cuda:nccl"
    return None


@contextlib.contextmanager
def runtime(device: str = "auto", precision: str = "auto") -> Iterator[Runtime]:
    """The ``Runtime`` of this process; under a launcher (WORLD_SIZE > 1) with its process group
    initialised for the duration of the block and destroyed after it (unless the caller made it)."""
    rt = Runtime.create(device, precision)
    if rt.world_size == 1:
        yield rt
        return
    rt = dataclasses.replace(rt, device=process_device(rt.device))
    owned = not dist.is_initialized()
    if owned:
        if rt.device.type == "cuda":
            torch.cuda.set_device(rt.device)
        dist.init_process_group(backend=backend_for(rt.device), rank=rt.rank, world_size=rt.world_size)
    try:
        yield rt
        if owned:  # wait for all (the main process writes final/ last): a group torn down early aborts
            dist.barrier()
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


class _Scorer(torch.nn.Module):
    """``batch_logps(model, batch)`` as one module's forward: what DDP wraps. ``fn`` replaces
    ``batch_logps`` for a loss with its own forward (the reward model's ``dpolab.reward.batch_rewards``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, fn=None) -> Tensor:
        return (fn or batch_logps)(self.model, batch)


class DataParallelPolicy:
    """The policy for the training forward under DDP. ``dpolab.reference.pair_logps`` calls
    ``score_batch``; the parameters are the model's own (the optimizer, clipping, saving and
    evaluation keep using the plain model)."""

    def __init__(self, model: torch.nn.Module, rt: Runtime):
        self.model = model
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        # Every trainable parameter gets a gradient in each backward (the whole causal LM runs), so DDP
        # need not search the graph for unused ones (its default).
        self.ddp = DistributedDataParallel(_Scorer(model), device_ids=ids)

    def score_batch(self, batch, fn=None) -> Tensor:
        return self.ddp(batch, fn=fn)

    def no_sync(self):
        return self.ddp.no_sync()


def wrap(model: torch.nn.Module, rt: Runtime):
    """What the training forward calls: the model itself in one process, a ``DataParallelPolicy`` in several."""
    if rt.world_size > 1 and dist.is_initialized():
        return DataParallelPolicy(model, rt)
    return model


def gradient_sync(policy, last: bool):
    """Around one micro-batch's forward and backward: gradients are all-reduced only after the last
    micro-batch of an optimizer step (earlier ones accumulate locally, as DDP's ``no_sync`` allows)."""
    if last or not isinstance(policy, DataParallelPolicy):
        return contextlib.nullcontext()
    return policy.no_sync()
