"""Host-clock timing shared by the GPU benches: a synchronise that is a no-op without CUDA, and one call timed
between two synchronisations."""
from __future__ import annotations

import time

import torch


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    """Seconds of one call of fn, the GPU's queued work included (synchronised before and after)."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t
