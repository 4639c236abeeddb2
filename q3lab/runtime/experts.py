"""Expert providers: where the model's expert weights come from.

The model asks a provider for one layer's experts at a time. `ResidentExperts` keeps every expert in
memory (the reference behaviour); `ExpertCache` (below) loads experts on demand under a memory bound.

Provider protocol (duck-typed):
    bind(source, config, device, dtype)      once, from `q3lab.load`
    prepare(layer, experts: list[int])       before a layer computes; `experts` is sorted and unique
    weights(layer, e) -> (gate [I,D], up [I,D], down [D,I])   on the model's device and dtype
    attach(model)                            optional: `Thinker.set_experts` passes the model
"""
from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from q3lab.base.config import ThinkerConfig
from q3lab.errors import CheckpointError, InputError, Q3LabError
from q3lab.runtime.residency import Policy, Residency, make_policy

if TYPE_CHECKING:
    import pandas as pd


class ExpertProvider:
    """Base class: subclasses load expert weights from a bound weight source."""

    config: ThinkerConfig
    device: torch.device
    dtype: torch.dtype

    def bind(self, source, config: ThinkerConfig, device, dtype: torch.dtype) -> None:
        self.source, self.config, self.device, self.dtype = source, config, torch.device(device), dtype

    def attach(self, model) -> None:
        """Called by `Thinker.set_experts` with the model (providers that listen to routing use it)."""

    def prepare(self, layer: int, experts: list[int]) -> None:
        pass

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class ResidentExperts(ExpertProvider):
    """Every expert in memory, stacked per layer as [E, I, D] / [E, D, I]."""

    def bind(self, source, config, device, dtype, progress: bool = False) -> None:
        super().bind(source, config, device, dtype)
        L, E, I, D = config.num_hidden_layers, config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.gate = torch.empty(L, E, I, D, device=device, dtype=dtype)
        self.up = torch.empty(L, E, I, D, device=device, dtype=dtype)
        self.down = torch.empty(L, E, D, I, device=device, dtype=dtype)
        bar = tqdm(total=L * E, desc="experts", unit="expert", disable=not progress)
        for layer in range(L):
            for e in range(E):
                g, u, d = source.expert(layer, e)
                self.gate[layer, e].copy_(g)
                self.up[layer, e].copy_(u)
                self.down[layer, e].copy_(d)
                bar.update()
        bar.close()

    def weights(self, layer: int, e: int):
        return self.gate[layer, e], self.up[layer, e], self.down[layer, e]


# -- the on-demand cache -------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
PREFETCHERS = ("same-ids-next-layer",)


def parse_bytes(size: str | int) -> int:
    """Bytes of a size such as 2GB, 512 MiB, 1.5e9 as an int (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    m = _SIZE.match(str(size)) if isinstance(size, str) else None
    if m is None or m.group(2).lower() not in _UNITS:
        raise InputError(f"cannot read {size!r} as a size in bytes; expected e.g. 2GB, 512MB, 1.5GiB, 300000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def same_ids_next_layer(num_layers: int):
    """A prefetcher: after layer l, load the experts with the same ids in layer l + 1."""
    def prefetch(layer: int, used: list[int]) -> list[tuple[int, int]]:
        return [(layer + 1, e) for e in used] if layer + 1 < num_layers else []
    return prefetch


class ExpertCache(ExpertProvider):
    """Experts loaded on demand when the router picks them, at most `capacity` resident, evicted by a policy.

    capacity: a count of experts (int) or a size ("2GB"); `capacity_bytes=` is the same as a size. Sizes are
        converted with one expert's bytes at the model's dtype (3 * I * D * itemsize), rounding down.
    per_layer: the capacity applies to each layer separately instead of to all layers together.
    policy: "lru" (default) | "lfu" | "score" | "belady" (needs `trace`) or a `q3lab.runtime.residency.Policy`.
    pinned: (layer, expert) keys loaded at bind time and never evicted; they count toward the capacity.
    prefetch: None, "same-ids-next-layer", or a callable(layer, used_experts) -> [(layer, expert), ...] run
        after a layer's last expert was served; its loads are synchronous and counted as prefetch loads.
    log_accesses: keep every access (t, layer, expert, router weight, hit, group) for `access_log()` / `trace()`.

    The model sees exactly the weights `ResidentExperts` would give it (the source tensors `copy_`-converted
    to the model's device and dtype), so outputs are identical to the all-resident model for every capacity
    and policy. Resident experts live in one preallocated slab of `capacity` slots, so memory stays within
    capacity x expert bytes plus a small fixed overhead (one expert's source bytes as a read buffer, and three
    tensor views per slot). An access is one (layer, expert) request per forward
    call: for each layer in order, its used experts in ascending order.
    Residency and eviction are `q3lab.runtime.residency.Residency`'s (shared with `DeviceExpertCache` and
    `q3lab.analysis.cachesim`): a layer call's experts, served or still to come, are not evicted during the call.
    When a layer's used set is larger than the cache (a long prefill with per-layer capacity), experts are
    served one at a time and may evict experts of the same set (they then miss again).
    """

    def __init__(self, capacity: int | str | None = None, *, policy: str | Policy = "lru",
                 trace: Sequence[tuple[int, int]] | None = None, per_layer: bool = False,
                 capacity_bytes: int | str | None = None, pinned: Iterable[tuple[int, int]] | None = None,
                 prefetch: str | Callable[[int, list[int]], list[tuple[int, int]]] | None = None,
                 log_accesses: bool = False):
        if (capacity is None) == (capacity_bytes is None):
            raise InputError("ExpertCache needs exactly one of capacity (experts, or a size like '2GB') and "
                             f"capacity_bytes; got capacity={capacity!r}, capacity_bytes={capacity_bytes!r}")
        if isinstance(capacity, bool) or (capacity is not None and not isinstance(capacity, (int, str))):
            raise InputError(f"ExpertCache capacity must be an int (experts) or a size string, got {capacity!r}")
        self._count_cap = capacity if isinstance(capacity, int) else None
        self._byte_cap = parse_bytes(capacity_bytes if capacity_bytes is not None else capacity) \
            if self._count_cap is None else None
        if (self._count_cap if self._count_cap is not None else self._byte_cap) <= 0:
            raise InputError("ExpertCache capacity must be positive, got "
                             f"{capacity if capacity is not None else capacity_bytes!r}")
        self.policy = policy if isinstance(policy, Policy) else make_policy(policy, trace)
        self.per_layer = bool(per_layer)
        self.pinned = {(int(k[0]), int(k[1])) for k in (pinned or [])}
        if prefetch is not None and not callable(prefetch) and prefetch not in PREFETCHERS:
            raise InputError(f"unknown prefetch {prefetch!r}: expected None, a callable, or one of "
                             f"{', '.join(PREFETCHERS)}")
        self._prefetch_spec = prefetch
        self.log_accesses = bool(log_accesses)
        self.source = None
        self._hooks: list = []

    # -- binding ---------------------------------------------------------------------------------
    def bind(self, source, config: ThinkerConfig, device, dtype: torch.dtype) -> None:
        """Check the capacity against the model and load the pinned experts; called once by `q3lab.load`."""
        if self.source is not None:
            raise InputError("this ExpertCache is already bound to a model; make a new ExpertCache per model")
        L, E, k = config.num_hidden_layers, config.num_experts, config.num_experts_per_tok
        self.expert_bytes = config.expert_numel * torch.empty((), dtype=dtype).element_size()
        scope = "per layer" if self.per_layer else "in all"
        if self._count_cap is not None:
            cap, how = self._count_cap, f"{self._count_cap} experts {scope}"
        else:
            cap = self._byte_cap // self.expert_bytes
            how = (f"{self._byte_cap:,} bytes {scope} = {cap} experts of {self.expert_bytes:,} bytes "
                   f"({str(dtype).removeprefix('torch.')})")
        for key in self.pinned:
            if not (0 <= key[0] < L and 0 <= key[1] < E):
                raise InputError(f"pinned expert {key} out of range: the model has {L} layers of {E} experts")
        pinned_max = max((sum(1 for p in self.pinned if p[0] == layer) for layer in range(L)), default=0) \
            if self.per_layer else len(self.pinned)
        if cap - pinned_max < k:
            extra = f" minus {pinned_max} pinned" if pinned_max else ""
            raise InputError(f"expert cache capacity of {how}{extra} cannot hold one layer's top-k: the router "
                             f"picks {k} experts per token, so at least {k + pinned_max} are needed")
        super().bind(source, config, device, dtype)
        self.capacity = cap
        self.layers, self.top_k = L, k
        self._prefetch = (same_ids_next_layer(L) if self._prefetch_spec == "same-ids-next-layer"
                          else self._prefetch_spec)
        # Residency (which expert, which slot, what to evict, the counters and the log) is the engine the
        # device cache and the simulator run too; this class adds the slab and the reads from the source.
        self.residency = Residency(cap, layers=L, experts=E, policy=self.policy, per_layer=self.per_layer,
                                   pinned=self.pinned, log_accesses=self.log_accesses,
                                   slot_busy=self._slot_busy, on_evict=self._evicted)
        # Every resident expert lives in a slot of one preallocated slab [slots, 3*I*D]: allocating and freeing
        # expert-sized blocks instead left the heap fragmented, RssAnon about 25% above the capacity. The slab's
        # pages are only touched (and counted) as slots fill.
        slots = self.residency.num_slots
        self._slab = torch.empty(slots, config.expert_numel, device=self.device, dtype=dtype)
        # A slot's (gate, up, down) views, made on its first use and handed out on every access: whether a
        # caller still holds them is their reference count (see _held), not per-access weakrefs.
        self._slot_views: list[tuple | None] = [None] * slots
        self._overflow_views: dict[tuple[int, int], tuple] = {}   # keys whose slot was still held: own buffers
        self._staging: torch.Tensor | None = None   # the source's bytes of the expert being read
        self._staging_views: dict[tuple, tuple] = {}  # a source layout -> (gate, up, down) views of _staging
        self._used: tuple[int, list[int]] | None = None
        self._routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reset_io()
        for key in sorted(self.pinned):   # resident since Residency was made: fill their slots
            self._read(key, False)
        self.pinned_load_seconds = float(self._load_s.sum())
        self._reset_io()

    def attach(self, model) -> None:
        """Listen to each layer's routing (for router weights); `Thinker.set_experts` calls this."""
        self.detach()
        if not (self.policy.needs_weights or self.log_accesses):
            return
        for i, layer in enumerate(model.model.layers):
            self._hooks.append(layer.mlp.experts.register_forward_pre_hook(
                lambda mod, args, i=i: self._routing.__setitem__(i, (args[1], args[2]))))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- the provider protocol ---------------------------------------------------------------------
    def prepare(self, layer: int, experts: list[int], weights: list[float] | None = None) -> None:
        """Note the experts this layer call will ask for: they are not evicted until the call is served.
        weights: their router weights summed over the call's tokens (default: what the routing hooks saw)."""
        if not 0 <= layer < self.layers:
            raise InputError(f"expert cache: layer {layer} out of range (the model has {self.layers} layers)")
        scores = self._scores(layer, experts)
        self.residency.begin(layer, experts, scores if weights is None else weights)
        self._used = (layer, list(experts))

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e of a layer, loaded now if it is not resident (evicting by the policy)."""
        res = self.residency
        slot, hit = res.access(layer, e)
        if hit:
            views = self._slot_views[slot] if slot is not None else self._overflow_views[(layer, e)]
        else:
            try:
                views = self._read((layer, e), False)
            except BaseException:
                res.drop((layer, e))   # nothing was loaded: the key is not resident
                raise
        if self._prefetch is not None and self._used is not None and not res.pending:
            used, self._used = self._used, None
            self._run_prefetch(*used)
        return views

    # -- internals -------------------------------------------------------------------------------
    def _scores(self, layer: int, experts: list[int]) -> list[float] | None:
        """Each expert's summed router weight over this call's tokens (None when routing was not seen)."""
        routed = self._routing.pop(layer, None)
        if routed is None:
            return None
        idx, w = routed
        sums = torch.zeros(self.config.num_experts, dtype=torch.float64, device=idx.device)
        sums.index_add_(0, idx.reshape(-1), w.reshape(-1).to(torch.float64))
        sums = sums.tolist()
        return [sums[e] for e in experts]

    def _slot_busy(self, slot: int) -> bool:
        """A slot is reused only once nobody holds its views (the model drops them right after use)."""
        views = self._slot_views[slot]
        return views is not None and self._held(views, owners=2)   # _slot_views and `views` refer to it

    def _evicted(self, key: tuple[int, int], slot: int | None) -> None:
        if slot is None:
            del self._overflow_views[key]

    @staticmethod
    def _held(views: tuple, owners: int = 1) -> bool:
        """Whether anyone but the cache still holds `views` (the tuple or one of its tensors), where the cache
        itself refers to the tuple `owners` times: reference counts above those of a tuple that only one
        local name refers to (`_UNHELD`, measured at import the same way)."""
        tup, view = _UNHELD
        return (sys.getrefcount(views) > tup + owners - 1 or sys.getrefcount(views[0]) > view
                or sys.getrefcount(views[1]) > view or sys.getrefcount(views[2]) > view)

    def _run_prefetch(self, layer: int, used: list[int]) -> None:
        keys = [(int(k[0]), int(k[1])) for k in self._prefetch(layer, used)]
        for key in keys:
            if not (0 <= key[0] < self.layers and 0 <= key[1] < self.config.num_experts):
                raise InputError(f"prefetch after layer {layer} asked for expert {key}, out of range: "
                                 f"{self.layers} layers of {self.config.num_experts} experts")
        for key in keys:
            loaded, _ = self.residency.prefetch(key, protect=keys)
            if loaded:
                try:
                    self._read(key, True)
                except BaseException:
                    self.residency.drop(key)
                    raise

    def _views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        I, D = self.config.moe_intermediate_size, self.config.hidden_size
        return buf[:I * D].view(I, D), buf[I * D:2 * I * D].view(I, D), buf[2 * I * D:].view(D, I)

    def _check_shapes(self, key: tuple[int, int], raw: tuple) -> tuple:
        I, D = self.config.moe_intermediate_size, self.config.hidden_size
        for name, t, shape in zip(("gate", "up", "down"), raw, ((I, D), (I, D), (D, I))):
            if tuple(t.shape) != shape:
                raise CheckpointError(f"expert cache: layer {key[0]} expert {key[1]} {name}_proj from "
                                      f"{self.source.path} has shape {list(t.shape)}, expected {list(shape)}")
        return raw

    def _read(self, key: tuple[int, int], prefetch: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read one expert from the source (only its bytes) into the slot `residency` gave it, converted like
        `ResidentExperts` does it (copy_ into the model's dtype and device); the slot's (gate, up, down) views."""
        layer, e = key
        t0 = time.perf_counter()
        try:
            # Sources that can (Checkpoint, Store) read into one reusable buffer whose typed views are made once
            # per layout; others return fresh tensors.
            into = getattr(self.source, "expert_into", None)
            got = into(layer, e, self._staging) if into is not None else None
            if got is not None:
                staging, layout = got
                if staging is not self._staging:
                    self._staging, self._staging_views = staging, {}
                raw = self._staging_views.get(layout)
                if raw is None:
                    parts = [None, None, None]
                    for i, a, b, dtype, shape in layout:
                        parts[i] = staging[a:b].view(dtype).view(shape)
                    raw = self._check_shapes(key, tuple(parts))
                    self._staging_views[layout] = raw
            else:
                raw = self._check_shapes(key, self.source.expert(layer, e))
        except Q3LabError as err:
            raise type(err)(f"expert cache: cannot load layer {layer} expert {e} from {self.source.path}: "
                            f"{err}") from err
        except OSError as err:
            raise CheckpointError(f"expert cache: cannot load layer {layer} expert {e} from {self.source.path}: "
                                  f"{err}") from err
        slot = self.residency.slot_of[key]
        if slot is not None:
            views = self._slot_views[slot]
            if views is None:
                views = self._slot_views[slot] = self._views(self._slab[slot])
        else:  # every free slot's old views are still held by a caller: this expert gets its own buffer
            I, D = self.config.moe_intermediate_size, self.config.hidden_size
            views = self._overflow_views[key] = self._views(torch.empty(3 * I * D, device=self.device,
                                                                        dtype=self.dtype))
        for dst, src in zip(views, raw):
            dst.copy_(src)
        self._load_s[layer] += time.perf_counter() - t0
        self._bytes[layer] += sum(t.nbytes for t in raw)
        return views

    # -- statistics --------------------------------------------------------------------------------
    def _reset_io(self) -> None:
        self._bytes = [0] * self.layers
        self._load_s = np.zeros(self.layers)

    def reset_stats(self) -> None:
        """Zero the counters and the access log (the access counter `t` and the cache contents stay)."""
        self._check_bound()
        self.residency.reset_stats()
        self._reset_io()

    def stats(self) -> pd.DataFrame:
        """One row per layer: accesses, hits, misses, hit_rate, evictions, bytes_loaded (bytes read from the
        source, prefetches included, pinned experts not), load_seconds, prefetch_loads, prefetch_hits (hits on
        prefetched experts), resident and peak_resident (experts of that layer)."""
        self._check_bound()
        df = self.residency.stats()
        df.insert(6, "bytes_loaded", self._bytes)
        df.insert(7, "load_seconds", self._load_s)
        return df

    def summary(self) -> dict:
        """Totals over all layers, with the capacity and policy."""
        self._check_bound()
        tot = self.residency.totals()
        return {
            "policy": self.policy.name, "per_layer": self.per_layer, "capacity_experts": self.capacity,
            "capacity_bytes": self.capacity * self.expert_bytes, "expert_bytes": self.expert_bytes,
            "pinned": len(self.pinned), "accesses": tot["accesses"], "hits": tot["hits"], "misses": tot["misses"],
            "hit_rate": tot["hit_rate"], "evictions": tot["evictions"],
            "bytes_loaded": sum(self._bytes), "load_seconds": float(self._load_s.sum()),
            "prefetch_loads": tot["prefetch_loads"], "prefetch_hits": tot["prefetch_hits"],
            "resident": tot["resident"], "peak_resident": tot["peak_resident"],
            "overflow_buffers": self.residency.overflow,
        }

    def access_log(self) -> pd.DataFrame:
        """Every access since the last reset: t, layer, expert, weight (summed router weight), hit, group (one
        id per layer call). `q3lab.analysis.cachesim.simulate(cache.access_log(), [capacity], policies=[policy])`
        reproduces this cache's hits exactly (`pinned=` and `per_layer=` passed alike; prefetches are not
        simulated)."""
        if not self.log_accesses:
            raise InputError("this ExpertCache does not log accesses: make it with log_accesses=True")
        self._check_bound()
        return self.residency.access_log()

    def trace(self) -> list[tuple[int, int]]:
        """The (layer, expert) access sequence since the last reset: what `policy="belady"` needs as `trace`."""
        if not self.log_accesses:
            raise InputError("this ExpertCache does not log accesses: make it with log_accesses=True")
        self._check_bound()
        return self.residency.trace()

    def resident(self) -> list[tuple[int, int]]:
        """The resident (layer, expert) keys, sorted."""
        self._check_bound()
        return self.residency.resident()

    @property
    def t(self) -> int:
        """The global access counter (Belady's index into its trace)."""
        self._check_bound()
        return self.residency.t

    def _check_bound(self) -> None:
        if self.source is None:
            raise InputError("this ExpertCache is not bound to a model yet: pass it to q3lab.load(..., experts=)")

    def __repr__(self) -> str:
        cap = self._count_cap if self._count_cap is not None else f"{self._byte_cap:,} bytes"
        return (f"ExpertCache(capacity={cap}, policy={self.policy.name!r}, per_layer={self.per_layer}, "
                f"pinned={len(self.pinned)}, prefetch={self._prefetch_spec!r})")


def _probe(views: tuple) -> tuple[int, int]:
    # called like ExpertCache._held: one frame between the caller's local name and getrefcount
    return sys.getrefcount(views), sys.getrefcount(views[0])


def _unheld_counts() -> tuple[int, int]:
    """Reference counts, as `ExpertCache._held` sees them, of a views tuple referred to by one local name and
    of a tensor referred to by that tuple only (interpreters differ in what getrefcount counts: measured)."""
    buf = torch.empty(3)
    views = (buf[:1], buf[1:2], buf[2:])
    return _probe(views)


_UNHELD = _unheld_counts()
