"""Experts in host memory, a cache of some of them on the device: `DeviceExpertCache`.

What is resident and what is evicted is `q3lab.runtime.residency.Residency`'s decision, the engine `ExpertCache` and
`q3lab.analysis.cachesim` run too; this module adds only where the slab lives (three device tensors of slots) and how a
miss is copied (host -> device, on a side stream on CUDA).
"""
from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from q3lab.errors import InputError, Q3LabError
from q3lab.runtime.experts import ExpertProvider
from q3lab.runtime.residency import Policy, Residency

if TYPE_CHECKING:
    import pandas as pd


class KernelCopyError(Q3LabError):
    """A host -> device copy of an expert failed in the CUDA driver."""


class DeviceExpertCache(ExpertProvider):
    """Up to `capacity` experts on the device in one slab, copied on demand from host tensors, evicted by a policy.

    host_gate/host_up [L, E, I, D] and host_down [L, E, D, I]: the experts, ideally in pinned memory on CUDA
        (then the copies are asynchronous DMA at the link's speed). Any device works; on the CPU the copies are
        plain `copy_`.
    capacity: experts resident at most, in all layers together (or in each layer with per_layer=True, then also
        a list of one capacity per layer: `q3lab.analysis.replay.capacities_from_trace`).
    policy: "lru" (default) | "lfu" | "score" (needs router weights: pass `weights` to `slots`/`prepare`) |
        "belady" (needs `trace`, the access sequence of the same run) or a `q3lab.runtime.residency.Policy`.
    pinned: (layer, expert) keys copied in now and never evicted; they count toward the capacity.
    log_accesses: keep every access for `access_log()` / `trace()`, which `q3lab.analysis.cachesim` replays exactly.

    Copies run on a separate stream; the compute stream waits for them only where a miss is used. A slot
    evicted while kernels queued on the compute stream may still read it is overwritten only after them.
    """

    def __init__(self, host_gate: torch.Tensor, host_up: torch.Tensor, host_down: torch.Tensor, capacity: int,
                 device: torch.device | str = "cuda", *, policy: str | Policy = "lru",
                 trace: Sequence[tuple[int, int]] | None = None, per_layer: bool = False,
                 pinned: Iterable[tuple[int, int]] | None = None, log_accesses: bool = False):
        if host_gate.dim() != 4:
            raise InputError(f"host_gate must be [layers, experts, I, D], got shape {list(host_gate.shape)}")
        L, E, I, D = host_gate.shape
        if tuple(host_up.shape) != (L, E, I, D) or tuple(host_down.shape) != (L, E, D, I):
            raise InputError(f"expert tensors disagree: gate {list(host_gate.shape)}, up {list(host_up.shape)} "
                             f"(want the same), down {list(host_down.shape)} (want {[L, E, D, I]})")
        if not isinstance(capacity, (list, tuple)) and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                                        or capacity < 1):
            raise InputError(f"DeviceExpertCache capacity must be >= 1 expert (or one per layer with "
                             f"per_layer=True), got {capacity!r}")
        self.residency = Residency(capacity, layers=L, experts=E, policy=policy, trace=trace,
                                   per_layer=per_layer, pinned=pinned, log_accesses=log_accesses)
        if self.residency.room() < 1:
            raise InputError(f"DeviceExpertCache capacity of {capacity} experts minus "
                             f"{self.residency.pinned_in_scope()} pinned leaves no room for the routed experts")
        self.per_layer, self.pinned = self.residency.per_layer, self.residency.pinned
        self.host = (host_gate, host_up, host_down)
        self.capacity, self.device = self.residency.capacity, torch.device(device)
        self.dtype = host_gate.dtype
        S, dt = self.residency.num_slots, host_gate.dtype
        # zeros, not empty: a kernel may read a never-filled slot with weight 0 (a host-computed expert), and
        # 0 * NaN garbage would be NaN
        self.gate = torch.zeros(S, I, D, dtype=dt, device=self.device)                # [slots, I, D]
        self.up = torch.zeros(S, I, D, dtype=dt, device=self.device)
        self.down = torch.zeros(S, D, I, dtype=dt, device=self.device)                # [slots, D, I]
        self.expert_bytes = 3 * I * D * host_gate.element_size()
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.copy_stream is not None:
            self._ev_compute, self._ev_copy = torch.cuda.Event(), torch.cuda.Event()
        self._raw = self._raw_copies() if self.copy_stream is not None else None
        self._copied = 0                                  # experts copied since the last reset (misses)
        self._prefetched = 0                              # ... of them by prefetch
        self._content: list = [None] * S                  # the key each slot's tensors hold
        self._prefetch_pending = False                    # prefetch copies the compute stream has not waited for
        for key in sorted(self.pinned):
            self._copy_in(key, self.residency.slot_of[key])
        self._sync_copies()
        self._copied = 0                                  # bytes_copied counts misses, not the pins
        self._served: dict[int, int] = {}
        self._served_layer = -1

    @property
    def policy(self) -> Policy:
        """The residency's eviction policy (`Residency.restart` may replace it)."""
        return self.residency.policy

    # -- the device side's one method ------------------------------------------------------------
    def slots(self, layer: int, experts: Sequence[int], weights: Sequence[float] | None = None) -> list[int]:
        """Slots holding `experts` of `layer` (in the same order, repeats allowed), copying in the missing ones.

        weights: each entry's router weight (the `score` policy needs them; repeats are summed)."""
        return self.slots_split(layer, experts, weights)[0]

    def slots_split(self, layer: int, experts: Sequence[int], weights: Sequence[float] | None = None,
                    host: int = 0) -> tuple[list[int | None], list[int]]:
        """`slots`, except that up to `host` of the misses are not copied in: they are to be computed on the
        host (`q3lab.fast.host_experts`). Returns (slots, None at the host-computed entries; the host-computed
        experts). Those misses are counted and told to the policy, but not admitted (see `Residency.access`)."""
        uniq = sorted(set(experts))
        room = self.residency.room(layer)
        if len(uniq) > room:
            pinned = self.residency.pinned_in_scope(layer)
            raise InputError(f"a layer needs {len(uniq)} experts at once but the cache holds {self.capacity}"
                             + (f" minus {pinned} pinned" if pinned else "")
                             + (" per layer" if self.per_layer else ""))
        summed = None
        if weights is not None:
            if len(weights) != len(experts):
                raise InputError(f"slots: {len(weights)} weights for {len(experts)} experts")
            acc = dict.fromkeys(uniq, 0.0)
            for e, w in zip(experts, weights):
                acc[e] += float(w)
            summed = [acc[e] for e in uniq]
        res = self.residency
        res.begin(layer, uniq, summed)
        # the group's experts stay resident until it is served (Residency protects them): every slot below
        # is still theirs when the kernel reads it
        on_host: set[int] = set()
        if host > 0:
            missing = [e for e in uniq if (layer, e) not in res.slot_of]
            on_host = set(missing[len(missing) - min(host, len(missing)):])
        slot_of, fetch = {}, []
        raw = self._raw
        for e in uniq:
            slot, hit = res.access(layer, e, admit=e not in on_host)
            if not hit and e not in on_host:
                if raw is not None:      # issued at once (a few us): the link starts while the rest is decided
                    if not fetch:
                        self._copies_after_compute()
                    self._copied += 1
                    self._content[slot] = (layer, e)
                    self._raw_issue(raw, [((layer, e), slot)])
                fetch.append(((layer, e), slot))
            slot_of[e] = slot
        if raw is None:
            self._copy_many(fetch)   # protected until served: no access above reassigned these slots
        if fetch or self._prefetch_pending:
            self._sync_copies()
            self._prefetch_pending = False
        return [slot_of[e] for e in experts], sorted(on_host)

    def prefetch(self, layer: int, experts: Sequence[int]) -> int:
        """Copy in `experts` of `layer` ahead of use, where that evicts nothing of the current group: the
        copies are queued on the copy stream and not waited for here (the next `slots` call makes the compute
        stream wait for them). Returns the number of experts loaded."""
        res = self.residency
        guess = sorted(set(int(x) for x in experts))
        batch = {(layer, e) for e in guess}          # one guess's experts do not evict each other
        fetch = []
        for e in guess:
            loaded, slot = res.prefetch((layer, e), protect=batch)
            if loaded:
                fetch.append(((layer, e), slot))
        self._copy_many(fetch)
        self._prefetched += len(fetch)
        if fetch:
            self._prefetch_pending = True
        return len(fetch)

    def warm(self, groups: Iterable[tuple[int, Sequence[int], Sequence[float] | None]]) -> int:
        """Run `groups` (layer, experts, weights or None) through the residency as a decode would, without
        copying, then copy in once every resident expert its slot does not hold yet: the state a decode of those
        groups leaves, at the cost of one copy per resident expert (e.g. a replayed prompt). Zeroes the
        counters. Returns the number of experts copied."""
        res = self.residency
        for layer, experts, weights in groups:
            uniq = sorted(set(int(e) for e in experts))
            summed = None
            if weights is not None:
                acc = dict.fromkeys(uniq, 0.0)
                for e, w in zip(experts, weights):
                    acc[int(e)] += float(w)
                summed = [acc[e] for e in uniq]
            res.begin(layer, uniq, summed)
            for e in uniq:
                res.access(layer, e)
        n = 0
        for key, slot in res.slot_of.items():
            if self._content[slot] != key:
                self._copy_in(key, slot)
                n += 1
        self._sync_copies()
        self.reset_stats()
        return n

    def _raw_copies(self):
        """The copy plan for the driver's cuMemcpyHtoDAsync called directly (ctypes): one call per tensor of an
        expert, ~1-2 us of host time against ~10 us for torch's copy_ (dispatch, pinned-pointer lookup, a host
        allocator event per copy), which a layer of misses pays several times before its copies run.

        Opt-in (Q3LAB_RAW_COPIES=1), not verified on a GPU: in its one H200 run (2026-12-01, commit 2bf4e5f) the
        test copy read back different bytes, because it was not ordered after the slab's zero-fill on the
        compute stream (fixed below, not rerun). Used when asked for, the host tensors are pinned and contiguous
        and the test copy reads back equal; else None (torch's copy_, with a warning naming why)."""
        if os.environ.get("Q3LAB_RAW_COPIES", "0") != "1":
            return None
        hosts, slabs = self.host, (self.gate, self.up, self.down)
        why = None
        if not all(h.is_contiguous() and h.is_pinned() for h in hosts):
            why = "the host expert tensors are not all pinned and contiguous"
        else:
            try:
                fn = ctypes.CDLL("libcuda.so.1").cuMemcpyHtoDAsync_v2
                fn.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError) as e:
                why = f"libcuda.so.1's cuMemcpyHtoDAsync_v2 not found ({e})"
        if why is None:
            E = hosts[0].shape[1]
            plan = [(h.data_ptr(), d.data_ptr(), h[0, 0].numel() * h.element_size()) for h, d in zip(hosts, slabs)]
            raw = (fn, plan, E)
            # a test copy of the last expert into slot 0 (still empty: pins are copied in after this)
            L = hosts[0].shape[0]
            try:
                # after the slabs' zero-fill, queued on the compute stream
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
                self._raw_issue(raw, [((L - 1, E - 1), 0)])
                torch.cuda.synchronize(self.device)
                ok = all(torch.equal(d[0].cpu(), h[L - 1, E - 1]) for h, d in zip(hosts, slabs))
            except Q3LabError as e:
                ok, why = False, str(e)
            for d in slabs:
                d[0].zero_()
            torch.cuda.synchronize(self.device)
            if ok:
                return raw
            why = why or "a test copy read back different bytes"
        warnings.warn(f"DeviceExpertCache: direct driver copies off ({why}); torch's copy_ issues the copies",
                      RuntimeWarning, stacklevel=3)
        return None

    def _raw_issue(self, raw, items) -> None:
        fn, plan, E = raw
        stream = ctypes.c_void_p(self.copy_stream.cuda_stream)
        for (layer, e), slot in items:
            src = layer * E + e
            for hbase, dbase, nb in plan:
                rc = fn(dbase + slot * nb, ctypes.c_void_p(hbase + src * nb), nb, stream)
                if rc:
                    raise KernelCopyError(f"cuMemcpyHtoDAsync of expert ({layer}, {e}) into slot {slot} failed "
                                          f"with CUresult {rc}")

    def _copy_in(self, key: tuple[int, int], slot: int) -> None:
        self._copy_many([(key, slot)])

    def _copy_many(self, items: list) -> None:
        """Copy ((layer, expert), slot) pairs in: on CUDA one stream wait and one stream switch for all of them
        (a decode layer's misses), then three asynchronous copies each."""
        if not items:
            return
        hg, hu, hd = self.host
        self._copied += len(items)
        for key, slot in items:
            self._content[slot] = key
        if self.copy_stream is None:
            for (layer, e), slot in items:
                self.gate[slot].copy_(hg[layer, e]), self.up[slot].copy_(hu[layer, e])
                self.down[slot].copy_(hd[layer, e])
            return
        # the slots may still be read by kernels queued on the compute stream: copy after them
        self._copies_after_compute()
        if self._raw is not None:
            self._raw_issue(self._raw, items)
            return
        with torch.cuda.stream(self.copy_stream):
            for (layer, e), slot in items:
                self.gate[slot].copy_(hg[layer, e], non_blocking=True)
                self.up[slot].copy_(hu[layer, e], non_blocking=True)
                self.down[slot].copy_(hd[layer, e], non_blocking=True)

    def _sync_copies(self) -> None:
        if self.copy_stream is not None:
            # as wait_stream, with one reused event (wait_stream makes a new one each call)
            self._ev_copy.record(self.copy_stream)
            torch.cuda.current_stream(self.device).wait_event(self._ev_copy)

    def _copies_after_compute(self) -> None:
        """The copy stream waits for the compute stream's queued work (kernels may still read the slots)."""
        self._ev_compute.record(torch.cuda.current_stream(self.device))
        self.copy_stream.wait_event(self._ev_compute)

    # -- the provider protocol, so that the eager model (prefill) reads the same slots --------------
    def prepare(self, layer: int, experts: list[int], weights: Sequence[float] | None = None) -> None:
        """Serve a layer call's sorted unique experts (with their summed router weights, if known).

        The eager prefill gives no router weights (hooks would stop the fast decoders): a policy that needs them
        (score) then counts each expert of the call with weight 1.0, as documented here, not the router's."""
        if weights is None and self.residency.policy.needs_weights:
            weights = [1.0] * len(experts)
        # a long prefill can need more experts than fit: those are then served one at a time in weights()
        fits = len(experts) <= self.residency.room(layer)
        self._served = dict(zip(experts, self.slots(layer, experts, weights))) if fits else {}
        self._served_layer = layer

    def weights(self, layer: int, e: int):
        if layer == self._served_layer and e in self._served:
            s = self._served[e]
        else:
            s = self.slots(layer, [e])[0]
        return self.gate[s], self.up[s], self.down[s]

    def reconfigure(self, capacity: int | Sequence[int], *, policy: str | Policy = "lru",
                    trace: Sequence[tuple[int, int]] | None = None, per_layer: bool = False,
                    pinned: Iterable[tuple[int, int]] | None = None, log_accesses: bool = False) -> None:
        """Start over with an empty residency of another capacity/policy on the SAME slab (at most its slots):
        a decoder's captured graphs keep reading these tensors, so a benchmark can compare budgets and policies
        without recapturing. The pins are copied in now."""
        L, E = self.host[0].shape[:2]
        res = Residency(capacity, layers=L, experts=E, policy=policy, trace=trace, per_layer=per_layer,
                        pinned=pinned, log_accesses=log_accesses)
        if res.num_slots > self.gate.shape[0]:
            raise InputError(f"DeviceExpertCache.reconfigure: {res.num_slots} slots do not fit the slab's "
                             f"{self.gate.shape[0]} (made for capacity {self.capacity})")
        if res.room() < 1:
            raise InputError(f"DeviceExpertCache.reconfigure: capacity {capacity} minus "
                             f"{res.pinned_in_scope()} pinned leaves no room for the routed experts")
        self._sync_copies()
        self.residency = res
        self.capacity, self.per_layer, self.pinned = res.capacity, res.per_layer, res.pinned
        for key in sorted(self.pinned):
            if self._content[res.slot_of[key]] != key:
                self._copy_in(key, res.slot_of[key])
        self._sync_copies()
        self._copied = self._prefetched = 0
        self._prefetch_pending = False
        self._served, self._served_layer = {}, -1

    # -- statistics --------------------------------------------------------------------------------
    @property
    def hits(self) -> int:
        return sum(self.residency.hits)

    @hits.setter
    def hits(self, value: int) -> None:
        self._set_total("hits", value)

    @property
    def misses(self) -> int:
        return sum(self.residency.misses)

    @misses.setter
    def misses(self, value: int) -> None:
        self._set_total("misses", value)

    def _set_total(self, name: str, value: int) -> None:
        # OffloadedDecoder restores hits/misses after capturing its graphs (which access nothing): allow
        # writing back the current value, nothing else, so that counts cannot silently disagree with the log
        if value != getattr(self, name):
            raise InputError(f"DeviceExpertCache.{name} is counted by its residency; use reset_stats() to zero it")

    def stats(self) -> dict:
        """Totals: hits, misses, hit_rate, bytes_copied (host -> device, pinned experts not), capacity, policy,
        evictions."""
        tot = self.residency.totals()
        return {"hits": tot["hits"], "misses": tot["misses"], "hit_rate": tot["hit_rate"],
                "bytes_copied": self._copied * self.expert_bytes, "capacity": self.capacity,
                "policy": self.residency.policy.name, "evictions": tot["evictions"],
                "prefetch_loads": tot["prefetch_loads"], "prefetch_hits": tot["prefetch_hits"],
                "bytes_prefetched": self._prefetched * self.expert_bytes}

    def layer_stats(self) -> pd.DataFrame:
        """One row per layer, the columns of `q3lab.runtime.residency.STATS_COLUMNS`."""
        return self.residency.stats()

    def reset_stats(self) -> None:
        """Zero the counters and the access log (the contents stay)."""
        self.residency.reset_stats()
        self._copied = 0
        self._prefetched = 0

    def access_log(self) -> pd.DataFrame:
        """Every access since the last reset: t, layer, expert, weight, hit, group; what
        `q3lab.analysis.cachesim.simulate(cache.access_log(), [capacity], policies=[policy])` reproduces exactly."""
        return self.residency.access_log()

    def trace(self) -> list[tuple[int, int]]:
        """The (layer, expert) access sequence since the last reset (for `policy="belady"`)."""
        return self.residency.trace()

    def resident(self) -> list[tuple[int, int]]:
        """The resident (layer, expert) keys, sorted."""
        return self.residency.resident()

    def __repr__(self) -> str:
        return (f"DeviceExpertCache(capacity={self.capacity}, policy={self.policy.name!r}, "
                f"per_layer={self.per_layer}, pinned={len(self.pinned)}, device={str(self.device)!r})")
