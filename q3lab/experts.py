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

import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ThinkerConfig
from .errors import CheckpointError, InputError, Q3LabError
from .policies import Policy, make_policy


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

    def _load(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read one expert from the source and convert it to the model's device and dtype."""
        return tuple(t.to(device=self.device, dtype=self.dtype) for t in self.source.expert(layer, e))  # type: ignore


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
    policy: "lru" (default) | "lfu" | "score" | "belady" (needs `trace`) or a `q3lab.policies.Policy`.
    pinned: (layer, expert) keys loaded at bind time and never evicted; they count toward the capacity.
    prefetch: None, "same-ids-next-layer", or a callable(layer, used_experts) -> [(layer, expert), ...] run
        after a layer's last expert was served; its loads are synchronous and counted as prefetch loads.
    log_accesses: keep every access (t, layer, expert, router weight, hit) for `access_log()` / `trace()`.

    The model sees exactly the weights `ResidentExperts` would give it (the source tensors `copy_`-converted
    to the model's device and dtype), so outputs are identical to the all-resident model for every capacity
    and policy. Resident experts live in one preallocated slab of `capacity` slots, so memory stays within
    capacity x expert bytes plus a small fixed overhead (one expert's source bytes as a read buffer, and three
    tensor views per slot). An access is one (layer, expert) request per forward
    call: for each layer in order, its used experts in ascending order.
    When a layer's used set is larger than the cache (a long prefill with per-layer capacity), experts are
    served one at a time and may evict experts of the same set that are still to come (they then miss again).
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
        # Every resident expert lives in a slot of one preallocated slab [slots, 3*I*D]: allocating and freeing
        # expert-sized blocks instead left the heap fragmented, RssAnon about 25% above the capacity. The slab's
        # pages are only touched (and counted) as slots fill.
        slots = min(cap, E) * L if self.per_layer else min(cap, L * E)
        self._slab = torch.empty(slots, config.expert_numel, device=self.device, dtype=dtype)
        self._free = list(range(slots - 1, -1, -1))
        # key -> the (gate, up, down) views of its buffer, made once per load and handed out on every access:
        # whether a caller still holds them is their reference count (see _held), not per-access weakrefs.
        self._resident: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._slot: dict[tuple[int, int], int | None] = {}          # key -> its slab slot (None: overflow)
        self._slot_views: list[tuple | None] = [None] * slots       # a slot's views, made on its first use
        self._quarantine: list[int] = []                            # evicted slots whose views are still held
        self._staging: torch.Tensor | None = None   # the source's bytes of the expert being read
        self._staging_views: dict[tuple, tuple] = {}  # a source layout -> (gate, up, down) views of _staging
        self._in_layer = [0] * L                 # resident experts per layer
        self._pending: dict[tuple[int, int], float] = {}   # prepared, not yet served, in this layer call
        self._used: tuple[int, list[int]] | None = None
        self._prefetched: set[tuple[int, int]] = set()      # loaded by prefetch, not yet accessed
        self._routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.t = 0                               # the global access counter (Belady's index into its trace)
        self.reset_stats()
        self._peak_layer = [0] * L
        for key in sorted(self.pinned):
            self._resident[key] = self._read(key, prefetch=False)
            self._added(key, self.t)
        self.pinned_load_seconds = float(self._load_s.sum())
        self.reset_stats()

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
    def prepare(self, layer: int, experts: list[int]) -> None:
        """Note the experts this layer call will ask for: resident ones are not evicted until served."""
        if not 0 <= layer < self.layers:
            raise InputError(f"expert cache: layer {layer} out of range (the model has {self.layers} layers)")
        scores = self._scores(layer, experts)
        self._pending = {(layer, e): s for e, s in zip(experts, scores)}
        self._used = (layer, list(experts))

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e of a layer, loaded now if it is not resident (evicting by the policy)."""
        # The hit path runs ~200 times per decode token of a 48-layer model: it does only what the counters,
        # the policy and the log need (accesses = hits + misses; the views are made once per load).
        key = (layer, e)
        pending = self._pending
        if key in pending:
            weight = pending.pop(key)
        else:  # a request nobody prepared (a direct call): still an access, without a router weight
            if not (0 <= layer < self.layers and 0 <= e < self.config.num_experts):
                raise InputError(f"expert ({layer}, {e}) out of range: {self.layers} layers of "
                                 f"{self.config.num_experts} experts")
            if self.policy.needs_weights:
                raise InputError(f"{self.policy.name} policy needs router weights, but expert {key} was asked "
                                 f"for without prepare(); attach the cache to a model (q3lab.load does)")
            weight = math.nan
        t = self.t
        self.t = t + 1
        self.policy.access(key, t, 0.0 if weight != weight else weight)   # NaN (no router weight) -> 0
        views = self._resident.get(key)
        hit = views is not None
        if hit:
            self._hits[layer] += 1
            if self._prefetched and key in self._prefetched:
                self._prefetched.discard(key)
                self._pf_hits[layer] += 1
        else:
            self._misses[layer] += 1
            self._make_room(layer, t, protect=pending, demand=True)
            views = self._resident[key] = self._read(key, prefetch=False)
            self._added(key, t)
        if self.log_accesses:
            self._log.append((t, layer, e, weight, hit))
        if not pending and self._prefetch is not None and self._used is not None:
            used, self._used = self._used, None
            self._run_prefetch(*used, serving=key)
        return views

    # -- internals -------------------------------------------------------------------------------
    def _scores(self, layer: int, experts: list[int]) -> list[float]:
        """Each expert's summed router weight over this call's tokens (NaN when routing was not seen)."""
        routed = self._routing.pop(layer, None)
        if routed is None:
            if self.policy.needs_weights:
                raise InputError(f"{self.policy.name} policy needs router weights, but layer {layer}'s routing "
                                 f"was not seen; attach the cache to a model (q3lab.load does)")
            return [math.nan] * len(experts)
        idx, w = routed
        sums = torch.zeros(self.config.num_experts, dtype=torch.float64, device=idx.device)
        sums.index_add_(0, idx.reshape(-1), w.reshape(-1).to(torch.float64))
        sums = sums.tolist()
        return [sums[e] for e in experts]

    def _added(self, key: tuple[int, int], t: int) -> None:
        self._in_layer[key[0]] += 1
        self.policy.insert(key, t)
        self._peak = max(self._peak, len(self._resident))
        self._peak_layer[key[0]] = max(self._peak_layer[key[0]], self._in_layer[key[0]])

    def _make_room(self, layer: int, t: int, protect, demand: bool) -> bool:
        """Evict until one more expert fits in `layer`'s budget. Protected keys go only for a demand load
        that cannot be served otherwise; a prefetch gets False instead."""
        pinned, per_layer = self.pinned, self.per_layer
        while (self._in_layer[layer] if per_layer else len(self._resident)) >= self.capacity:
            # The policy walks its own order with a predicate (LRU: the oldest key, skipping pinned and
            # protected ones); building the candidate set cost a scan of every resident expert per miss.
            victim = self.policy.victim_where(
                lambda k: (not per_layer or k[0] == layer) and k not in protect and k not in pinned, t)
            if victim is NotImplemented:
                cands = {k for k in self._resident
                         if (not per_layer or k[0] == layer) and k not in pinned and k not in protect}
                victim = self.policy.victim(cands, t) if cands else None
            if victim is None:
                if not demand:
                    return False
                # The used set is larger than the cache: evict an expert still to come (it will miss again).
                pool = {k for k in self._resident if (not per_layer or k[0] == layer) and k not in pinned}
                victim = self.policy.victim(pool, t)
                ok = victim in pool
            else:
                ok = victim in self._resident and (not per_layer or victim[0] == layer) \
                    and victim not in pinned and (victim not in protect)
            if not ok:
                raise InputError(f"{self.policy.name} policy chose {victim!r}, which is not among the "
                                 f"candidates (resident, unpinned{', of layer %d' % layer if per_layer else ''})")
            views = self._resident.pop(victim)
            slot = self._slot.pop(victim)
            # A slot is reused only once nobody holds views of it (the model drops them right after use).
            if slot is not None:   # its views are referred to by _slot_views and, here, `views`
                (self._quarantine if self._held(views, owners=2) else self._free).append(slot)
            del views
            self._in_layer[victim[0]] -= 1
            self._prefetched.discard(victim)
            self.policy.remove(victim)
            self._evictions[victim[0]] += 1
        return True

    @staticmethod
    def _held(views: tuple, owners: int = 1) -> bool:
        """Whether anyone but the cache still holds `views` (the tuple or one of its tensors), where the cache
        itself refers to the tuple `owners` times: reference counts above those of a tuple that only one
        local name refers to (`_UNHELD`, measured at import the same way)."""
        tup, view = _UNHELD
        return (sys.getrefcount(views) > tup + owners - 1 or sys.getrefcount(views[0]) > view
                or sys.getrefcount(views[1]) > view or sys.getrefcount(views[2]) > view)

    def _run_prefetch(self, layer: int, used: list[int], serving: tuple[int, int]) -> None:
        keys = [(int(k[0]), int(k[1])) for k in self._prefetch(layer, used)]
        for key in keys:
            if not (0 <= key[0] < self.layers and 0 <= key[1] < self.config.num_experts):
                raise InputError(f"prefetch after layer {layer} asked for expert {key}, out of range: "
                                 f"{self.layers} layers of {self.config.num_experts} experts")
        protect = set(keys) | {serving}
        for key in keys:
            if key in self._resident:
                continue
            if not self._make_room(key[0], self.t, protect=protect, demand=False):
                continue  # a hint, not a demand: no room without evicting other prefetched experts
            self._resident[key] = self._read(key, prefetch=True)
            self._prefetched.add(key)
            self._added(key, self.t)

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
        """Read one expert from the source (only its bytes) into a buffer, converted like `ResidentExperts`
        does it (copy_ into the model's dtype and device); the buffer's (gate, up, down) views."""
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
        I, D = self.config.moe_intermediate_size, self.config.hidden_size
        if not self._free and self._quarantine:
            quarantine, self._quarantine = self._quarantine, []
            for slot in quarantine:
                views = self._slot_views[slot]
                (self._quarantine if self._held(views, owners=2) else self._free).append(slot)
            del views
        if self._free:
            slot = self._free.pop()
            views = self._slot_views[slot]
            if views is None:
                views = self._slot_views[slot] = self._views(self._slab[slot])
        else:  # every free slot's old views are still held by a caller: this expert gets its own buffer
            slot, views = None, self._views(torch.empty(3 * I * D, device=self.device, dtype=self.dtype))
            self._overflow += 1
        self._slot[key] = slot
        for dst, src in zip(views, raw):
            dst.copy_(src)
        nbytes = sum(t.nbytes for t in raw)
        self._load_s[layer] += time.perf_counter() - t0
        self._bytes[layer] += nbytes
        if prefetch:
            self._pf_loads[layer] += 1
        return views

    # -- statistics --------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counters and the access log (the access counter `t` and the cache contents stay)."""
        L = self.layers
        self._hits, self._misses, self._evictions = ([0] * L for _ in range(3))
        self._pf_loads, self._pf_hits = [0] * L, [0] * L
        self._bytes = [0] * L
        self._load_s = np.zeros(L)
        self._log: list[tuple[int, int, int, float, bool]] = []
        self._peak = len(self._resident)
        self._peak_layer = list(self._in_layer)
        self._overflow = 0

    def stats(self) -> pd.DataFrame:
        """One row per layer: accesses, hits, misses, hit_rate, evictions, bytes_loaded (bytes read from the
        source, prefetches included, pinned experts not), load_seconds, prefetch_loads, prefetch_hits (hits on
        prefetched experts), resident and peak_resident (experts of that layer)."""
        import pandas as pd
        self._check_bound()
        df = pd.DataFrame({
            "layer": range(self.layers), "accesses": [h + m for h, m in zip(self._hits, self._misses)],
            "hits": self._hits, "misses": self._misses,
            "evictions": self._evictions, "bytes_loaded": self._bytes, "load_seconds": self._load_s,
            "prefetch_loads": self._pf_loads, "prefetch_hits": self._pf_hits, "resident": self._in_layer,
            "peak_resident": self._peak_layer,
        })
        df.insert(4, "hit_rate", df["hits"] / df["accesses"].where(df["accesses"] > 0))
        return df

    def summary(self) -> dict:
        """Totals over all layers, with the capacity and policy."""
        self._check_bound()
        hits = sum(self._hits)
        acc = hits + sum(self._misses)
        return {
            "policy": self.policy.name, "per_layer": self.per_layer, "capacity_experts": self.capacity,
            "capacity_bytes": self.capacity * self.expert_bytes, "expert_bytes": self.expert_bytes,
            "pinned": len(self.pinned), "accesses": acc, "hits": hits, "misses": sum(self._misses),
            "hit_rate": hits / acc if acc else math.nan, "evictions": sum(self._evictions),
            "bytes_loaded": sum(self._bytes), "load_seconds": float(self._load_s.sum()),
            "prefetch_loads": sum(self._pf_loads), "prefetch_hits": sum(self._pf_hits),
            "resident": len(self._resident), "peak_resident": self._peak,
            "overflow_buffers": self._overflow,
        }

    def access_log(self) -> pd.DataFrame:
        """Every access since the last reset: t, layer, expert, weight (summed router weight), hit."""
        if not self.log_accesses:
            raise InputError("this ExpertCache does not log accesses: make it with log_accesses=True")
        import pandas as pd
        return pd.DataFrame(self._log, columns=["t", "layer", "expert", "weight", "hit"])

    def trace(self) -> list[tuple[int, int]]:
        """The (layer, expert) access sequence since the last reset: what `policy="belady"` needs as `trace`."""
        if not self.log_accesses:
            raise InputError("this ExpertCache does not log accesses: make it with log_accesses=True")
        return [(layer, e) for _, layer, e, _, _ in self._log]

    def resident(self) -> list[tuple[int, int]]:
        """The resident (layer, expert) keys, sorted."""
        self._check_bound()
        return sorted(self._resident)

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
