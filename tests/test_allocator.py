"""dpolab.runtime.keep_freed_memory: CPU tensors below 32 MB come from malloc's heap, and freed heap
memory is kept for reuse rather than handed back to the kernel (Linux/glibc).

Each case runs in a fresh interpreter (allocator settings are per process) and watches the program
break (``sbrk(0)``, the end of malloc's heap): ten 20 MB tensors are allocated and written, then freed.
With glibc's defaults the first block of that size is mmap-ed (the heap does not grow); with the
settings all ten grow the heap by their size and freeing them does not shrink it, so the next step
reuses the same memory instead of page-faulting it in again.
"""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes
import torch
from dpolab.runtime import keep_freed_memory
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]
applied = keep_freed_memory()
start = libc.sbrk(0)
blocks = [torch.empty(5 << 20, dtype=torch.float32).fill_(1.0) for _ in range(10)]
grown = libc.sbrk(0) - start
del blocks
kept = libc.sbrk(0) - start
print(applied, grown, kept)
"""
MB = 1 << 20


def _probe(malloc: str | None) -> tuple[bool, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "DPOLAB_MALLOC"}
    if malloc:
        env["DPOLAB_MALLOC"] = malloc
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, grown, kept = out.stdout.split()
    return applied == "True", int(grown), int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_tensors_come_from_the_heap_and_freed_memory_stays():
    applied, grown, kept = _probe(None)
    assert applied
    assert grown >= 180 * MB, grown  # (about) all ten blocks from the heap
    assert kept >= grown, kept       # freed, but not handed back


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_dpolab_malloc_system_leaves_glibc_defaults():
    applied, grown, kept = _probe("system")
    assert not applied
    assert grown < 180 * MB, grown  # glibc mmap-s (at least) the first 20 MB block
    assert kept < 180 * MB, kept
