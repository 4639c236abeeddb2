"""Routing replay for offload benchmarks: expert choices per (token, layer) from a recorded trace, not the router.

A `RoutingTrace` holds sequences of routing: experts [S, T, L, A] (uint8/int), their router weights [S, T, L, A]
and, optionally, a next-layer prediction `predicted` [S, T, L, A] (what a predictor running during layer l - 1
guessed for layer l; layer 0's row is unused). `Replay` serves one sequence as `OffloadedDecoder.route_override`:
the decoder still moves every byte and does every FLOP of the replayed experts, only the choice is the trace's,
so the tokens it prints are meaningless (benchmark only).

The access sequence a one-token-at-a-time decode of a trace gives a cache (token-major, then layer, the token's
experts sorted) is `decode_keys`; `belady_hit_rate` replays it through `q3lab.analysis.cachesim` (Belady's offline
optimum, or any policy) so a live cache's hit rate can be put next to the bound on the same trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from q3lab.errors import InputError


@dataclass
class RoutingTrace:
    """Routing of S sequences of T tokens: experts [S, T, L, A], weights [S, T, L, A] float32 (or None),
    predicted [S, T, L, A] (or None), names: one label per sequence."""

    experts: np.ndarray
    weights: np.ndarray | None = None
    predicted: np.ndarray | None = None
    names: list[str] = field(default_factory=list)
    num_experts: int = 128

    def __post_init__(self) -> None:
        if self.experts.ndim != 4:
            raise InputError(f"RoutingTrace: experts must be [sequences, tokens, layers, top_k], got shape "
                             f"{list(self.experts.shape)}")
        for name in ("weights", "predicted"):
            a = getattr(self, name)
            if a is not None and a.shape != self.experts.shape:
                raise InputError(f"RoutingTrace: {name} shape {list(a.shape)} differs from experts "
                                 f"{list(self.experts.shape)}")
        if self.experts.size and int(self.experts.max()) >= self.num_experts:
            raise InputError(f"RoutingTrace: expert id {int(self.experts.max())} >= num_experts {self.num_experts}")
        if not self.names:
            self.names = [f"seq{i}" for i in range(self.experts.shape[0])]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.experts.shape)

    def save(self, path: str | Path) -> None:
        """Write a compressed .npz (experts uint8, weights as uint8 in 1/255 steps, predictions when present)."""
        arrays = {"experts": self.experts.astype(np.uint8), "names": np.array(self.names),
                  "num_experts": np.array(self.num_experts)}
        if self.weights is not None:
            # router weights in 1/255 steps: the score policy only accumulates them, and it keeps the file small
            arrays["weights_u8"] = np.clip(np.rint(self.weights * 255), 0, 255).astype(np.uint8)
        if self.predicted is not None:
            arrays["predicted"] = self.predicted.astype(np.uint8)
        np.savez_compressed(path, **arrays)


def load_trace(path: str | Path) -> RoutingTrace:
    """A `RoutingTrace` written by `RoutingTrace.save`."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"routing trace {p} not found (make it with bench/make_offload_trace.py)")
    with np.load(p, allow_pickle=False) as z:
        if "experts" not in z:
            raise InputError(f"routing trace {p} has no 'experts' array (keys: {sorted(z.keys())})")
        return RoutingTrace(z["experts"].astype(np.int64),
                            z["weights_u8"].astype(np.float32) / 255 if "weights_u8" in z else None,
                            z["predicted"].astype(np.int64) if "predicted" in z else None,
                            [str(n) for n in z["names"]] if "names" in z else [],
                            int(z["num_experts"]) if "num_experts" in z else 128)


def uniform_trace(sequences: int, tokens: int, layers: int, experts: int, top_k: int, seed: int = 0) -> RoutingTrace:
    """Uniform random routing (top_k distinct experts per token and layer, equal weights): the cache's worst case."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((sequences, tokens, layers, experts)), axis=-1)[..., :top_k]
    return RoutingTrace(ids.astype(np.int64), np.full(ids.shape, 1.0 / top_k, np.float32), None,
                        [f"uniform{i}" for i in range(sequences)], experts)


def from_atlas(dataset: str | Path, tokens: int, layers: int, top_k: int, num_experts: int,
               docs: list[str] | None = None) -> RoutingTrace:
    """The first `tokens` tokens of each document of a routing-atlas dataset (`q3lab trace --corpus`) that has
    that many, as sequences (docs: which doc_ids, in that order; default all long enough, sorted)."""
    import pandas as pd
    import pyarrow.parquet as pq
    parts = sorted(Path(dataset).glob("part-*.parquet"))
    if not parts:
        raise InputError(f"{dataset}: no routing parts (part-*.parquet); trace it with q3lab trace --corpus")
    frame = pd.concat([pq.read_table(p, columns=["doc_id", "token_index", "experts", "weights"]).to_pandas()
                       for p in parts])
    lengths = frame.groupby("doc_id")["token_index"].max() + 1
    ok = sorted(lengths[lengths >= tokens].index)
    docs = ok if docs is None else docs
    missing = [d for d in docs if d not in ok]
    if missing or not docs:
        raise InputError(f"{dataset}: documents {missing or '(none)'} lack {tokens} traced tokens "
                         f"(long enough: {ok})")
    ex, wt = [], []
    for d in docs:
        f = frame[(frame.doc_id == d) & (frame.token_index < tokens)].sort_values("token_index")
        ex.append(np.stack(f["experts"].to_numpy()).reshape(tokens, layers, top_k))
        wt.append(np.stack(f["weights"].to_numpy()).astype(np.float32).reshape(tokens, layers, top_k))
    return RoutingTrace(np.stack(ex).astype(np.int64), np.stack(wt), None, list(docs), num_experts)


class Replay:
    """`OffloadedDecoder.route_override` serving sequence `seq` of `trace` from token `start` on: the call for
    layer l returns the trace's experts of the current token at l; the call for the last layer advances the
    token. `weights(layer)` is the current token's router weights there (the score policy), `predicted(layer)`
    the trace's prediction for `layer` made during the previous layer."""

    def __init__(self, trace: RoutingTrace, seq: int = 0, start: int = 0):
        S, T, L, A = trace.shape
        if not 0 <= seq < S:
            raise InputError(f"Replay: sequence {seq} out of range (the trace has {S})")
        self.trace, self.seq, self.token, self.layers = trace, seq, int(start), L
        self.served = 0
        self.last_weights: list[float] | None = None

    def _check(self) -> None:
        if self.token >= self.trace.shape[1]:
            raise InputError(f"Replay: token {self.token} past the trace's {self.trace.shape[1]} tokens "
                             f"(sequence {self.trace.names[self.seq]})")

    def __call__(self, layer: int, ids: list[int]) -> list[int]:
        self._check()
        got = self.trace.experts[self.seq, self.token, layer]
        if len(got) != len(ids):
            raise InputError(f"Replay: the trace has top-{len(got)} routing, the decoder asked for {len(ids)}")
        out = got.tolist() if isinstance(got, np.ndarray) else [int(e) for e in got]   # numpy: Python ints
        w = self.trace.weights
        self.last_weights = None if w is None else np.asarray(w[self.seq, self.token, layer], dtype=float).tolist()
        if layer == self.layers - 1:
            self.token += 1
        self.served += 1
        return out

    def weights(self, layer: int) -> list[float] | None:
        """Router weights of the experts the last call served (None when the trace has none)."""
        return self.last_weights

    def predicted(self, layer: int) -> list[int] | None:
        """The trace's prediction for `layer` of the current token (None without predictions or past the end)."""
        if self.trace.predicted is None or layer >= self.layers or self.token >= self.trace.shape[1]:
            return None
        return [int(e) for e in self.trace.predicted[self.seq, self.token, layer]]


def decode_keys(experts: np.ndarray) -> list[tuple[int, int]]:
    """The (layer, expert) access sequence of decoding `experts` [T, L, A] one token at a time (token-major,
    layer, sorted unique experts): what a cache's `slots` calls see."""
    keys = []
    for t in range(experts.shape[0]):
        for layer in range(experts.shape[1]):
            keys.extend((layer, int(e)) for e in sorted(set(experts[t, layer].tolist())))
    return keys


def access_frame(experts: np.ndarray, weights: np.ndarray | None = None):
    """`decode_keys` as a cachesim access-sequence frame (group per (token, layer), weight summed)."""
    import pandas as pd
    rows = []
    g = 0
    T, L, _ = experts.shape
    for t in range(T):
        for layer in range(L):
            acc: dict[int, float] = {}
            for k, e in enumerate(experts[t, layer].tolist()):
                acc[int(e)] = acc.get(int(e), 0.0) + (float(weights[t, layer, k]) if weights is not None else 0.0)
            for e in sorted(acc):
                rows.append((g, layer, e, acc[e]))
            g += 1
    return pd.DataFrame(rows, columns=["group", "layer", "expert", "weight"])


def belady_hit_rate(experts: np.ndarray, capacity, warm_tokens: int, policy: str = "belady",
                    weights: np.ndarray | None = None, per_layer: bool = False) -> float:
    """Hit rate of `policy` (default Belady's optimum) over the tokens after `warm_tokens` of decoding
    `experts` [T, L, A] with a cache of `capacity` (an int, or per-layer capacities with per_layer=True); the
    first `warm_tokens` tokens (the prompt) only fill the cache. The cache is `q3lab.analysis.cachesim`'s, i.e. the
    live caches' `Residency`."""
    from q3lab.analysis.cachesim import replay
    seq = access_frame(experts, weights)
    L = experts.shape[1]
    hit = replay(seq, capacity, policy, per_layer=per_layer)
    decoded = hit[hit["group"] >= warm_tokens * L]
    return float(decoded["hit"].mean())


def lru_stack_hits(experts: np.ndarray, max_capacity: int) -> np.ndarray:
    """Per layer, hits of a per-layer LRU cache at each capacity 1..max_capacity over `experts` [T, L, A]:
    [L, max_capacity] (from LRU stack distances, one pass per layer). The live caches also keep a group's
    pending experts from eviction, which only adds hits: this is exact when a layer's experts all fit and a
    lower bound below (a heuristic's input, `capacities_from_trace`, not a result)."""
    T, L, _ = experts.shape
    out = np.zeros((L, max_capacity + 1), np.int64)
    for layer in range(L):
        stack: list[int] = []
        dist = np.zeros(max_capacity + 2, np.int64)
        for t in range(T):
            group = sorted(set(experts[t, layer].tolist()))
            for e in group:
                try:
                    d = stack.index(e)
                    stack.pop(d)
                    dist[min(d, max_capacity + 1)] += 1
                except ValueError:
                    dist[max_capacity + 1] += 1          # cold: a miss at every capacity
                stack.insert(0, e)
        # hit at capacity c iff stack distance < c
        out[layer, 1:] = np.cumsum(dist[:max_capacity])
    return out[:, 1:]


def capacities_from_trace(experts: np.ndarray, total: int, *, step: int = 4, minimum: int | None = None,
                          num_experts: int | None = None) -> list[int]:
    """Per-layer capacities summing to `total` (within `step`), handed out `step` slots at a time to the layer
    whose LRU hits grow most (from `lru_stack_hits` over `experts` [T, L, A]): layers whose routing
    concentrates on few experts get fewer slots. minimum: each layer's floor (default top_k * 2)."""
    T, L, A = experts.shape
    E = num_experts or int(experts.max()) + 1
    minimum = 2 * A if minimum is None else minimum
    if total < minimum * L:
        raise InputError(f"capacities_from_trace: {total} slots cannot give {L} layers {minimum} each")
    hits = lru_stack_hits(experts, E)                      # [L, E]: hits at capacity 1..E
    caps = np.full(L, minimum, np.int64)
    left = total - minimum * L
    while left > 0:
        s = min(step, left)
        gain = np.array([hits[l, min(caps[l] + s, E) - 1] - hits[l, caps[l] - 1] if caps[l] < E else -1
                         for l in range(L)])
        best = int(np.argmax(gain))
        if gain[best] < 0:
            break
        add = min(s, E - caps[best])
        caps[best] += add
        left -= add
    return [int(c) for c in caps]
