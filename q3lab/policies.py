"""Eviction policies for expert caches, real (`q3lab.experts.ExpertCache`) or simulated (`q3lab.cachesim`).

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
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Hashable

from .errors import InputError

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
