"""Where the computation happens: device, precision, process rank.

Device placement, precision casts, cross-process reductions and the "am I the process that writes
files" question each live here and only here, so the training loop reads the same on one CPU core
and on many GPUs (data-parallel launch builds on ``world_size``/``reduce_sum``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch


def bf16_is_fast(device: torch.device) -> bool:
    """True where bf16 matmuls run on dedicated units (CUDA with bf16, CPUs with AVX512-BF16/AMX).

    On CPUs without them bf16 is emulated and far slower than fp32, so ``auto`` picks fp32 there.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Make the C allocator keep freed memory for reuse instead of handing it back to the OS.

    CPU tensors come from malloc. By default glibc gives blocks back to the kernel (blocks it mmap-ed, on
    free; the top of its heap once more than a few tens of MB there are free), so the next step's
    activations and gradients, the same sizes as the last one's, page-fault their memory in again: in
    5 training steps of the 150k-vocabulary benchmark, 24M page faults and 46 s of system time; on the
    50m workload reference passes ran 20–30 % slower in some runs than in others. Here blocks below
    32 MB (glibc's maximum for this setting) always come from the heap and up to 1 GB of free heap is
    kept for the next step. ``DPOLAB_MALLOC=system`` leaves glibc's defaults.
    Returns whether the settings were applied (False off Linux/glibc).
    """
    if os.environ.get("DPOLAB_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Runtime:
    device: torch.device
    precision: str  # "bf16" or "fp32" (resolved, never "auto")
    rank: int = 0
    world_size: int = 1

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> "Runtime":
        dev = resolve_device(device)
        if dev.type == "cpu" and not torch.cuda.is_available():
            # transformers/accelerate import DeepSpeed when it is installed (e.g. in save_pretrained); on a
            # machine without GPUs it would warn that it "was unable to detect" one. Tell it the answer.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if precision == "auto":
            precision = "bf16" if bf16_is_fast(dev) else "fp32"
        keep_freed_memory()
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        return cls(device=dev, precision=precision, rank=rank, world_size=world)

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs metrics and shows progress bars."""
        return self.rank == 0

    def autocast(self):
        """Mixed precision for the forward pass: bf16 compute, fp32 master weights and losses."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (identity in a single process)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
        return tensor

    def any_process(self, flag: bool) -> bool:
        """True when ``flag`` is true on at least one process (every process gets the same answer)."""
        return float(self.reduce_sum(torch.tensor(float(bool(flag))))) > 0

    def gather_objects(self, obj) -> list:
        """``obj`` of every process, in rank order (``[obj]`` in a single process)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            out = [None] * self.world_size
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class GracefulStop:
    """SIGINT/SIGTERM set ``requested`` so the loop can finish its step and checkpoint; a second
    signal restores the default behaviour and exits at once."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # second signal: stop now
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.requested = signum
        print(f"\ndpolab: received {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
