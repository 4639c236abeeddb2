"""Expert residency: which (layer, expert) keys are resident, and which one to evict. One engine, `Residency`,
serves the host cache (`q3lab.runtime.experts.ExpertCache`), the device cache (`q3lab.fast.device_cache.DeviceExpertCache`)
and the simulator (`q3lab.analysis.cachesim`): the live caches add only where the slab lives and how a miss is copied,
so the simulator's hits equal a live cache's by construction.

Eviction policies rank keys; `Residency` decides what is resident.

A key is a `(layer, expert)` tuple. A cache tells its policy about every access (hit or miss) with the global
access counter `t` (0, 1, 2, ... over the whole run), about keys that became resident (`insert`) or left
(`remove`), and asks `victim(candidates, t)` for the key to evict among the resident, unpinned keys it may
evict now. Policies only rank keys: the cache decides what is resident.

    lru     least recently used (accessed or inserted)
    lfu     fewest accesses so far (counted over the whole run, not only while resident); ties: least recent
    score   lowest accumulated router weight so far (the `weight` given with each access); ties: least recent
    belady  farthest next use in a recorded trace (offline optimal for demand caching): the upper bound

Victim selection is O(1) amortised for LRU and O(log n) amortised for the others (lazy-deletion heaps), plus
the skipped resident keys that are not candidates (pinned, in use), so simulations of long traces with
thousands of resident experts stay fast. Pass `candidates` as a set to avoid an O(capacity) conversion, or
call `victim_where(ok, t)` with a predicate: the same choice among the resident keys that satisfy `ok`,
without building the candidate set at all (what `ExpertCache` does on every miss).
"""
from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Hashable

if TYPE_CHECKING:
    import pandas as pd

from q3lab.errors import InputError

Key = Hashable  # (layer, expert)

POLICIES = ("lru", "lfu", "score", "belady")


def _as_set(candidates: Collection) -> Collection:
    return candidates if isinstance(candidates, (set, frozenset, dict)) else set(candidates)


def _no_victim(name: str, candidates: Collection):
    if not candidates:
        raise InputError(f"{name} policy: victim() called with no candidates: nothing may be evicted")
    raise InputError(f"{name} policy: none of the {len(candidates)} candidates was ever inserted "
                     f"(e.g. {next(iter(candidates))!r}); call insert(key, t) when a key becomes resident")


class Policy:
    """The interface every policy implements; subclasses override what they need."""

    name: str = "base"
    needs_weights: bool = False   # True when `access` must be given the router weight

    def access(self, key: Key, t: int, weight: float = 0.0) -> None:
        """Every access of `key` at global access index `t`, hit or miss (before `insert` on a miss)."""

    def insert(self, key: Key, t: int) -> None:
        """`key` became resident at time `t` (a miss being served, a prefetch or a pin)."""

    def remove(self, key: Key) -> None:
        """`key` left the cache."""

    def victim(self, candidates: Collection, t: int) -> Key:
        """The key to evict among `candidates` (resident, unpinned keys)."""
        raise NotImplementedError

    def victim_where(self, ok: Callable[[Key], bool], t: int) -> Key | None:
        """What `victim(candidates, t)` returns when the candidates are the inserted (resident) keys for which
        `ok(key)` is true; None when there is none. Returns NotImplemented where a policy cannot (a custom
        policy with only `victim`): the caller then builds the candidate set."""
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LRUPolicy(Policy):
    """Least recently used: resident keys in recency order, oldest first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict = OrderedDict()

    def access(self, key, t, weight=0.0):
        if key in self._order:
            self._order.move_to_end(key)

    def insert(self, key, t):
        self._order[key] = t
        self._order.move_to_end(key)

    def remove(self, key):
        self._order.pop(key, None)

    def victim(self, candidates, t):
        cands = _as_set(candidates)
        for key in self._order:
            if key in cands:
                return key
        _no_victim(self.name, cands)

    def victim_where(self, ok, t):
        if type(self).victim is not LRUPolicy.victim:
            return NotImplemented  # a subclass ranks differently: only its victim() knows how
        for key in self._order:   # oldest first: O(1) unless the oldest keys are pinned or in use
            if ok(key):
                return key
        return None


class _HeapPolicy(Policy):
    """Evicts the resident key with the smallest priority tuple, kept in a heap with lazy deletion."""

    def __init__(self) -> None:
        self._prio: dict = {}      # resident key -> current priority tuple
        self._heap: list = []      # (priority..., key) entries; stale ones are skipped

    def _priority(self, key, t: int) -> tuple:
        raise NotImplementedError

    def _update(self, key, t: int) -> None:
        if key in self._prio:
            p = self._priority(key, t)
            self._prio[key] = p
            heapq.heappush(self._heap, (p, key))
            if len(self._heap) > 4 * len(self._prio) + 64:
                self._heap = [(p, k) for k, p in self._prio.items()]
                heapq.heapify(self._heap)

    def insert(self, key, t):
        self._prio[key] = None
        self._update(key, t)

    def remove(self, key):
        self._prio.pop(key, None)

    def victim(self, candidates, t):
        cands = _as_set(candidates)
        skipped = []
        found = None
        while self._heap:
            p, key = heapq.heappop(self._heap)
            if self._prio.get(key) != p:
                continue               # stale: the key was updated or removed since
            skipped.append((p, key))   # valid entries go back: the cache removes the victim itself
            if key in cands:
                found = key
                break
        for item in skipped:
            heapq.heappush(self._heap, item)
        if found is None:
            _no_victim(self.name, cands)
        return found

    def victim_where(self, ok, t):
        if type(self).victim is not _HeapPolicy.victim:
            return NotImplemented
        skipped, found = [], None
        while self._heap:
            p, key = heapq.heappop(self._heap)
            if self._prio.get(key) != p:
                continue
            skipped.append((p, key))
            if ok(key):
                found = key
                break
        for item in skipped:
            heapq.heappush(self._heap, item)
        return found


class LFUPolicy(_HeapPolicy):
    """Fewest accesses so far; counts survive eviction (a key's whole history counts). Ties: least recent."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.count: dict = {}
        self.last: dict = {}

    def _priority(self, key, t):
        return (self.count.get(key, 0), self.last.get(key, -1))

    def access(self, key, t, weight=0.0):
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = t
        self._update(key, t)

    def insert(self, key, t):
        self.last[key] = max(self.last.get(key, -1), t)
        super().insert(key, t)


class ScorePolicy(_HeapPolicy):
    """Lowest accumulated router weight so far (over the whole run). Ties: least recent."""

    name = "score"
    needs_weights = True

    def __init__(self) -> None:
        super().__init__()
        self.score: dict = {}
        self.last: dict = {}

    def _priority(self, key, t):
        return (self.score.get(key, 0.0), self.last.get(key, -1))

    def access(self, key, t, weight=0.0):
        self.score[key] = self.score.get(key, 0.0) + float(weight)
        self.last[key] = t
        self._update(key, t)

    def insert(self, key, t):
        self.last[key] = max(self.last.get(key, -1), t)
        super().insert(key, t)


class BeladyPolicy(_HeapPolicy):
    """Offline optimal: evict the key whose next use in `trace` is farthest away (never = infinitely far).

    `t` must index `trace`: access `t` has to be `trace[t]`, otherwise this raises `InputError` (the trace
    belongs to another run). Ties (several keys never used again) go to the smallest key.
    """

    name = "belady"

    def __init__(self, trace: Sequence[Key]):
        super().__init__()
        self.trace = [tuple(k) for k in trace]
        self.never = len(self.trace)
        self.positions: dict = {}
        for i, key in enumerate(self.trace):
            self.positions.setdefault(key, []).append(i)
        self._next: dict = {}       # key -> its next use after the latest access or insert
        self._accessed_at: dict = {}

    def _next_from(self, key, t: int) -> int:
        pos = self.positions.get(key)
        if not pos:
            return self.never
        i = bisect_left(pos, t)
        return pos[i] if i < len(pos) else self.never

    def _priority(self, key, t):
        return (-self._next.get(key, self.never), key)

    def access(self, key, t, weight=0.0):
        if t >= len(self.trace) or self.trace[t] != key:
            found = self.trace[t] if t < len(self.trace) else f"the end of the trace ({len(self.trace)} accesses)"
            raise InputError(f"belady policy: access {t} is {key!r}, but the trace has {found} there: "
                             f"the trace must be the exact access sequence of this run")
        self._next[key] = self._next_from(key, t + 1)
        self._accessed_at[key] = t
        self._update(key, t)

    def insert(self, key, t):
        if self._accessed_at.get(key) != t:  # a prefetch or pin: its next use is the first at or after t
            self._next[key] = self._next_from(key, t)
        super().insert(key, t)


def make_policy(name: str, trace: Sequence[Key] | None = None) -> Policy:
    """A fresh policy by name: "lru" | "lfu" | "score" | "belady" (which needs the access `trace`).

    The other policies ignore `trace`, so that a simulation can build every policy the same way.
    """
    if not isinstance(name, str) or name.lower() not in POLICIES:
        raise InputError(f"unknown eviction policy {name!r}; expected one of {', '.join(POLICIES)}")
    name = name.lower()
    if name == "belady":
        if trace is None:
            raise InputError("the belady policy needs the access trace of the run (trace=[(layer, expert), ...]); "
                             "record one with ExpertCache(..., log_accesses=True) and cache.trace()")
        return BeladyPolicy(trace)
    return {"lru": LRUPolicy, "lfu": LFUPolicy, "score": ScorePolicy}[name]()


class PerLayerPolicy(Policy):
    """One policy per layer for a cache with per-layer budgets: the same ranking as one policy over all keys
    (each layer's keys keep their relative order), but a victim is found among that layer's keys only, not by
    walking past every other layer's (what made per-layer LRU O(capacity) per miss)."""

    def __init__(self, policies: Sequence[Policy]):
        self.sub = list(policies)
        self.name = self.sub[0].name
        self.needs_weights = self.sub[0].needs_weights

    def access(self, key, t, weight=0.0):
        self.sub[key[0]].access(key, t, weight)

    def insert(self, key, t):
        self.sub[key[0]].insert(key, t)

    def remove(self, key):
        self.sub[key[0]].remove(key)

    def victim(self, candidates, t):
        cands = _as_set(candidates)
        if not cands:
            _no_victim(self.name, cands)
        return self.sub[next(iter(cands))[0]].victim(cands, t)

    def victim_in(self, layer: int, ok: Callable[[Key], bool], t: int):
        """`victim_where` among `layer`'s keys."""
        return self.sub[layer].victim_where(ok, t)

    def __repr__(self) -> str:
        return f"PerLayerPolicy({self.name!r} x {len(self.sub)})"


# -- the residency core ------------------------------------------------------------------------------
STATS_COLUMNS = ("layer", "accesses", "hits", "misses", "hit_rate", "evictions", "prefetch_loads", "prefetch_hits",
                 "resident", "peak_resident")
LOG_COLUMNS = ("t", "layer", "expert", "weight", "hit", "group")


class Residency:
    """Which experts are resident in a cache of `capacity` slots, which slot each one has, and which to evict.

    capacity: experts resident at most, in all layers together, or in each layer when per_layer=True; with
        per_layer=True also a list of one capacity per layer (e.g. `q3lab.analysis.replay.capacities_from_trace`).
    layers, experts: the model's numbers (keys are (layer, expert) with 0 <= layer < layers, 0 <= expert <
        experts); they size the slot table: min(capacity, experts) * layers slots per layer, else
        min(capacity, layers * experts).
    policy: a name of `POLICIES` (belady needs `trace`) or a `Policy`.
    pinned: keys made resident now (at t = 0) and never evicted; they count toward the capacity.
    log_accesses: keep every access as (t, layer, expert, weight, hit, group) for `access_log()`.
    slot_busy(slot) -> bool: whether an evicted slot is still in use (the host cache: views of it are still
        held); a busy slot waits in quarantine and is reconsidered when no free slot is left, and when none
        frees up the new key gets slot None (an overflow buffer the caller allocates). None: never busy.
    on_evict(key, slot): told of each eviction (the host cache drops an overflow buffer there).

    The rules, which the simulator replays by driving this same class with no slab:
    - A group is one layer call: `begin(layer, experts, weights)` with its sorted unique experts, then one
      `access(layer, e)` per expert in that order. The group's experts, served or still to come, are not
      evicted while the group lasts, unless the group is larger than the cache (a long prefill): then an
      expert of the group may go, and misses again when it comes.
    - Every access (hit or miss) goes to the policy with the global access counter `t` and the router weight
      (NaN, meaning not seen, counts as 0); a miss then evicts by the policy until one more key fits, and
      inserts the key.
    - An access of a key outside the current group ends the group and is a group of its own.
    """

    def __init__(self, capacity: int | Sequence[int], *, layers: int, experts: int, policy: str | Policy = "lru",
                 trace: Sequence[Key] | None = None, per_layer: bool = False,
                 pinned: Iterable[tuple[int, int]] | None = None, log_accesses: bool = False,
                 slot_busy: Callable[[int], bool] | None = None,
                 on_evict: Callable[[tuple[int, int], int | None], None] | None = None):
        self.layers, self.experts = int(layers), int(experts)
        self.per_layer = bool(per_layer)
        if isinstance(capacity, (list, tuple)):
            if not self.per_layer or len(capacity) != self.layers:
                raise InputError(f"expert residency: a list of capacities needs per_layer=True and one per layer "
                                 f"({self.layers}), got {len(capacity)} with per_layer={per_layer}")
            caps = [int(c) for c in capacity]
            if any(isinstance(c, bool) or c < 1 for c in capacity) or any(c != x for c, x in zip(caps, capacity)):
                raise InputError(f"expert residency: per-layer capacities must be positive integers, got "
                                 f"{list(capacity)}")
        elif isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InputError(f"expert residency: capacity must be a positive number of experts, got {capacity!r}")
        else:
            caps = [capacity] * self.layers
        self.capacity = capacity if isinstance(capacity, int) else sum(caps)
        self.caps = caps                                      # per layer (the same everywhere unless a list)
        self.policy = self._make_policy(policy, trace)
        self.pinned = frozenset((int(k[0]), int(k[1])) for k in (pinned or []))
        for key in sorted(self.pinned):
            if not (0 <= key[0] < self.layers and 0 <= key[1] < self.experts):
                raise InputError(f"pinned expert {key} out of range: the model has {self.layers} layers of "
                                 f"{self.experts} experts")
        self.log_accesses = bool(log_accesses)
        self._slot_busy, self._on_evict = slot_busy, on_evict
        L = self.layers
        self.num_slots = (sum(min(c, self.experts) for c in caps) if self.per_layer
                          else min(capacity, L * self.experts))
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._quarantine: list[int] = []
        self.slot_of: dict[tuple[int, int], int | None] = {}   # resident key -> its slot (None: overflow)
        self.in_layer = [0] * L                               # resident keys per layer
        self._group: frozenset = frozenset()                  # the current layer call's keys
        self._pending: dict[tuple[int, int], float] = {}      # ... not yet accessed -> router weight
        self._group_id = -1
        self._prefetched: set[tuple[int, int]] = set()        # loaded by prefetch, not yet accessed
        self.t = 0                                            # the global access counter (Belady's index)
        self.reset_stats()
        for key in sorted(self.pinned):
            self._insert(key, self.t)
        self.reset_stats()

    def _make_policy(self, policy: str | Policy, trace: Sequence[Key] | None) -> Policy:
        if isinstance(policy, Policy):
            return policy
        if self.per_layer and isinstance(policy, str) and policy.lower() in ("lru", "lfu", "score"):
            return PerLayerPolicy([make_policy(policy) for _ in range(self.layers)])
        return make_policy(policy, trace)

    # -- what fits ---------------------------------------------------------------------------------
    def pinned_in_scope(self, layer: int | None = None) -> int:
        """Pinned keys sharing a budget: those of `layer` per layer (the most of any layer when None), else all."""
        if not self.per_layer:
            return len(self.pinned)
        if layer is None:
            return max((sum(1 for p in self.pinned if p[0] == lay) for lay in range(self.layers)), default=0)
        return sum(1 for p in self.pinned if p[0] == layer)

    def room(self, layer: int | None = None) -> int:
        """How many unpinned experts one group of `layer` can have resident at once (the least of any layer
        when None)."""
        if not self.per_layer:
            return self.capacity - len(self.pinned)
        if layer is None:
            return min(self.caps[lay] - self.pinned_in_scope(lay) for lay in range(self.layers))
        return self.caps[layer] - self.pinned_in_scope(layer)

    # -- a group, and its accesses -------------------------------------------------------------------
    def begin(self, layer: int, experts: Sequence[int], weights: Sequence[float] | None = None) -> None:
        """Start a group: the sorted unique `experts` one call of `layer` uses, with their router weights
        (summed over the call's tokens; None: not seen)."""
        if not 0 <= layer < self.layers:
            raise InputError(f"expert cache: layer {layer} out of range (the model has {self.layers} layers)")
        if experts and not (0 <= min(experts) and max(experts) < self.experts):
            raise InputError(f"expert cache: layer {layer} experts {list(experts)} out of range "
                             f"(the model has {self.experts} experts per layer)")
        if weights is None:
            if self.policy.needs_weights:
                raise InputError(f"{self.policy.name} policy needs router weights, but layer {layer}'s routing "
                                 f"was not given: an ExpertCache gets them once attached to a model (q3lab.load does), a "
                                 f"DeviceExpertCache from slots(..., weights=) or prepare(..., weights=)")
            weights = [math.nan] * len(experts)
        self._pending = {(layer, int(e)): float(w) for e, w in zip(experts, weights)}
        self._group = frozenset(self._pending)
        if self._prefetched:   # guesses for this layer that it does not use were wrong: no longer protected
            self._prefetched = {k for k in self._prefetched if k[0] != layer or k in self._group}
        self._group_id += 1

    @property
    def pending(self) -> bool:
        """Whether experts of the current group are still to be accessed."""
        return bool(self._pending)

    def access(self, layer: int, e: int, weight: float | None = None, admit: bool = True) -> tuple[int | None, bool]:
        """Access expert e of `layer`: (its slot, hit). On a miss the key was just inserted (evicting by the
        policy): the caller fills the slot, or calls `drop(key)` if it cannot. admit=False: a miss served
        elsewhere (computed on the host): counted and told to the policy, but not inserted (slot None)."""
        # The hit path runs ~200 times per decode token of a 48-layer model: only what the counters, the
        # policy and the log need.
        key = (layer, e)
        pending = self._pending
        if key in pending:
            w = pending.pop(key)
        else:   # not prepared (a direct call): a group of its own
            if not (0 <= layer < self.layers and 0 <= e < self.experts):
                raise InputError(f"expert ({layer}, {e}) out of range: {self.layers} layers of "
                                 f"{self.experts} experts")
            if weight is None and self.policy.needs_weights:
                raise InputError(f"{self.policy.name} policy needs router weights, but expert {key} was asked "
                                 f"for without prepare(); attach the cache to a model (q3lab.load does)")
            w = math.nan if weight is None else float(weight)
            self._pending, self._group = {}, frozenset((key,))
            self._group_id += 1
        t = self.t
        self.t = t + 1
        self.policy.access(key, t, 0.0 if w != w else w)   # NaN (no router weight) -> 0
        hit = key in self.slot_of
        if hit:
            self.hits[layer] += 1
            if self._prefetched and key in self._prefetched:
                self._prefetched.discard(key)
                self.prefetch_hits[layer] += 1
        else:
            self.misses[layer] += 1
            if not admit:
                if self.log_accesses:
                    self._log.append((t, layer, e, w, hit, self._group_id))
                return None, False
            self._make_room(layer, t, self._group, demand=True)
            self._insert(key, t)
        if self.log_accesses:
            self._log.append((t, layer, e, w, hit, self._group_id))
        return self.slot_of[key], hit

    def restart(self, policy: str | Policy, trace: Sequence[Key] | None = None) -> None:
        """Continue with a fresh `policy` from access counter t = 0 (the resident keys inserted into it at t = 0)
        and zeroed counters: e.g. belady with `trace` = the accesses that follow (a replayed run)."""
        self.policy = self._make_policy(policy, trace)
        self.t = 0
        for key in sorted(self.slot_of):
            if key not in self.pinned:
                self.policy.insert(key, 0)
        self.reset_stats()

    def prefetch(self, key: tuple[int, int], protect: Collection) -> tuple[bool, int | None]:
        """Make `key` resident ahead of use if there is room without evicting `protect` or the current group:
        (loaded, slot). A hint, not a demand: (False, None) when it is resident already or has no room."""
        if key in self.slot_of:
            return False, None
        if not self._make_room(key[0], self.t, set(protect) | self._group, demand=False):
            return False, None
        self._insert(key, self.t)
        self._prefetched.add(key)
        self.prefetch_loads[key[0]] += 1
        return True, self.slot_of[key]

    def drop(self, key: tuple[int, int]) -> None:
        """Undo the insertion of `key` whose slot could not be filled (a failed read): not an eviction."""
        slot = self.slot_of.pop(key)
        if slot is not None:
            self._free.append(slot)
        self.in_layer[key[0]] -= 1
        self._prefetched.discard(key)
        self.policy.remove(key)

    # -- internals -------------------------------------------------------------------------------
    def _insert(self, key: tuple[int, int], t: int) -> None:
        self.slot_of[key] = self._take_slot()
        self.in_layer[key[0]] += 1
        if key not in self.pinned:   # never a victim: ranking it would only make every eviction skip it
            self.policy.insert(key, t)
        self.peak = max(self.peak, len(self.slot_of))
        self.peak_layer[key[0]] = max(self.peak_layer[key[0]], self.in_layer[key[0]])

    def _take_slot(self) -> int | None:
        if not self._free and self._quarantine:
            busy = self._slot_busy
            quarantine, self._quarantine = self._quarantine, []
            for slot in quarantine:
                (self._quarantine if busy(slot) else self._free).append(slot)
        if self._free:
            return self._free.pop()
        self.overflow += 1   # every free slot is still in use by a caller: the key gets its own buffer
        return None

    def _make_room(self, layer: int, t: int, protect: Collection, demand: bool) -> bool:
        """Evict until one more key fits in `layer`'s budget. Protected keys go only for a demand load that
        cannot be served otherwise; a prefetch gets False instead."""
        pinned, per_layer, slot_of = self.pinned, self.per_layer, self.slot_of
        limit = self.caps[layer] if per_layer else self.capacity
        while (self.in_layer[layer] if per_layer else len(slot_of)) >= limit:
            # The policy walks its own order with a predicate (LRU: the oldest key, skipping pinned and
            # protected ones); building the candidate set cost a scan of every resident expert per miss.
            # keys prefetched for a layer still to come are kept until that layer has run (else a frequency
            # policy evicts a fresh guess, whose count is low, before it is used)
            ahead = self._prefetched
            ok = lambda k: (not per_layer or k[0] == layer) and k not in protect and k not in pinned \
                and k not in ahead  # noqa: E731
            victim_in = getattr(self.policy, "victim_in", None) if per_layer else None
            victim = victim_in(layer, ok, t) if victim_in is not None else self.policy.victim_where(ok, t)
            if victim is NotImplemented:
                cands = {k for k in slot_of
                         if (not per_layer or k[0] == layer) and k not in pinned and k not in protect
                         and k not in ahead}
                victim = self.policy.victim(cands, t) if cands else None
            if victim is None:
                if not demand:
                    return False
                # The group is larger than the cache: evict an expert of it (it will miss again).
                pool = {k for k in slot_of if (not per_layer or k[0] == layer) and k not in pinned}
                victim = self.policy.victim(pool, t)
                ok = victim in pool
            else:
                ok = victim in slot_of and (not per_layer or victim[0] == layer) \
                    and victim not in pinned and victim not in protect
            if not ok:
                raise InputError(f"{self.policy.name} policy chose {victim!r}, which is not among the "
                                 f"candidates (resident, unpinned{', of layer %d' % layer if per_layer else ''})")
            slot = slot_of.pop(victim)
            if self._on_evict is not None:
                self._on_evict(victim, slot)
            if slot is not None:
                busy = self._slot_busy
                (self._quarantine if busy is not None and busy(slot) else self._free).append(slot)
            self.in_layer[victim[0]] -= 1
            self._prefetched.discard(victim)
            self.policy.remove(victim)
            self.evictions[victim[0]] += 1
        return True

    # -- statistics --------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counters and the access log (the access counter `t` and the contents stay)."""
        L = self.layers
        self.hits, self.misses, self.evictions = [0] * L, [0] * L, [0] * L
        self.prefetch_loads, self.prefetch_hits = [0] * L, [0] * L
        self._log: list[tuple[int, int, int, float, bool, int]] = []
        self.peak = len(self.slot_of)
        self.peak_layer = list(self.in_layer)
        self.overflow = 0

    def stats(self) -> pd.DataFrame:
        """One row per layer: `STATS_COLUMNS` (resident and peak_resident count that layer's experts)."""
        import pandas as pd
        df = pd.DataFrame({
            "layer": range(self.layers), "accesses": [h + m for h, m in zip(self.hits, self.misses)],
            "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
            "prefetch_loads": self.prefetch_loads, "prefetch_hits": self.prefetch_hits,
            "resident": self.in_layer, "peak_resident": self.peak_layer})
        df.insert(4, "hit_rate", df["hits"] / df["accesses"].where(df["accesses"] > 0))
        return df

    def totals(self) -> dict:
        """accesses, hits, misses, hit_rate, evictions, prefetch_loads, prefetch_hits, resident, peak_resident."""
        hits, misses = sum(self.hits), sum(self.misses)
        acc = hits + misses
        return {"accesses": acc, "hits": hits, "misses": misses, "hit_rate": hits / acc if acc else math.nan,
                "evictions": sum(self.evictions), "prefetch_loads": sum(self.prefetch_loads),
                "prefetch_hits": sum(self.prefetch_hits), "resident": len(self.slot_of),
                "peak_resident": self.peak}

    def access_log(self) -> pd.DataFrame:
        """Every access since the last reset: t, layer, expert, weight (summed router weight, NaN when not
        seen), hit, group (one id per layer call): what `q3lab.analysis.cachesim.simulate` replays."""
        if not self.log_accesses:
            raise InputError("this cache does not log accesses: make it with log_accesses=True")
        import pandas as pd
        return pd.DataFrame(self._log, columns=list(LOG_COLUMNS))

    def trace(self) -> list[tuple[int, int]]:
        """The (layer, expert) access sequence since the last reset: what `policy="belady"` needs as `trace`."""
        if not self.log_accesses:
            raise InputError("this cache does not log accesses: make it with log_accesses=True")
        return [(layer, e) for _, layer, e, _, _, _ in self._log]

    def resident(self) -> list[tuple[int, int]]:
        """The resident (layer, expert) keys, sorted."""
        return sorted(self.slot_of)

    def __repr__(self) -> str:
        return (f"Residency(capacity={self.capacity}, policy={self.policy.name!r}, per_layer={self.per_layer}, "
                f"pinned={len(self.pinned)}, resident={len(self.slot_of)})")
