"""Where the offloaded decoder's per-layer `residency` phase goes on this host: DeviceExpertCache.slots_split with
uniform random routing (8 of 128 experts, 48 layers, capacity 32%), timed on the host clock per layer call:
(a) experts on the CPU (the residency's Python alone, tiny copies), (b) a CUDA slab with tiny experts (+ the
CUDA copy issue), (c) a CUDA slab at the real expert size (9.4 MB: + whatever the real copies cost the host),
and (d) the host cost of issuing one non_blocking pinned H2D `copy_` of a real-size expert tensor.

Run on a GPU machine: python bench/probe_residency.py  (about 20 s; prints one line per case)."""
from __future__ import annotations

import random
import time

import torch

from q3lab.fast.device_cache import DeviceExpertCache


def per_call_us(cache: DeviceExpertCache, L: int, E: int, steps: int, cuda: bool) -> tuple[float, float]:
    """(host us per slots_split call, us per call including waiting for the copies)."""
    rnd = random.Random(0)
    seq = [[rnd.sample(range(E), 8) for _ in range(L)] for _ in range(steps)]
    ws = [0.125] * 8
    host = 0.0
    t_all = time.perf_counter()
    for st in seq:
        for layer, ids in enumerate(st):
            t = time.perf_counter()
            cache.slots_split(layer, ids, ws)
            host += time.perf_counter() - t
            if cuda:
                torch.cuda.current_stream().synchronize()
    total = time.perf_counter() - t_all
    n = steps * L
    return host / n * 1e6, total / n * 1e6


def main() -> None:
    L, E = 48, 128
    cap = int(0.32 * L * E)
    cuda = torch.cuda.is_available()
    cases = [("cpu slab, tiny experts", 8, 16, "cpu")]
    if cuda:
        cases += [("cuda slab, tiny experts", 8, 16, "cuda"), ("cuda slab, real experts (768 x 2048)", 768, 2048, "cuda")]
    for label, I, D, dev in cases:
        steps = 30 if I > 100 else 60
        pin = dev == "cuda"
        g = torch.zeros(L, E, I, D, dtype=torch.bfloat16, pin_memory=pin)
        u = torch.zeros(L, E, I, D, dtype=torch.bfloat16, pin_memory=pin)
        d = torch.zeros(L, E, D, I, dtype=torch.bfloat16, pin_memory=pin)
        c = DeviceExpertCache(g, u, d, capacity=cap if I < 100 else min(cap, 1966), device=dev, policy="lru")
        per_call_us(c, L, E, 5, dev == "cuda")                                   # warm the residency
        c.reset_stats()
        host_us, total_us = per_call_us(c, L, E, steps, dev == "cuda")
        st = c.stats()
        misses = st["misses"] / (steps * L)
        print(f"{label}: slots_split {host_us:.1f} us per layer on the host ({misses:.2f} misses a layer, "
              f"hit rate {st['hit_rate']:.3f}); with the copies waited for {total_us:.1f} us", flush=True)
        del c, g, u, d
    if cuda:
        src = torch.zeros(64, 768, 2048, dtype=torch.bfloat16, pin_memory=True)
        dst = torch.empty(64, 768, 2048, dtype=torch.bfloat16, device="cuda")
        s = torch.cuda.Stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            t = time.perf_counter()
            for k in range(64):
                dst[k].copy_(src[k], non_blocking=True)
            issue = (time.perf_counter() - t) / 64
        torch.cuda.synchronize()
        print(f"one non_blocking pinned H2D copy_ of a 3 MB expert tensor: {issue * 1e6:.1f} us of host time to issue",
              flush=True)


if __name__ == "__main__":
    main()
