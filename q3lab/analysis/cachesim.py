"""Expert-cache simulation from a routing trace, without running the model.

An access sequence is a frame of (group, layer, expert, weight) rows in access order. A group is what one
layer step of a live cache sees at once: the sorted unique experts that the tokens of one forward call chose
in one layer, with `weight` their summed router weight. A live cache's `access_log()` is such a frame.

The simulator does not re-implement the caches: it drives `q3lab.runtime.residency.Residency`, the residency engine
`ExpertCache` and `DeviceExpertCache` run, with no slab behind it. So on a live cache's access log,
`simulate(cache.access_log(), [capacity], policies=[policy])` reproduces its hits exactly, and `replay` its
hit/miss sequence. Misses include the cold (first-use) misses.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from q3lab.errors import InputError
from q3lab.runtime.residency import POLICIES, Residency, make_policy

MODES = ("decode", "calls")


def access_sequence(frame: pd.DataFrame, mode: str = "decode") -> pd.DataFrame:
    """The (group, layer, expert, weight) accesses an expert cache would see for this trace.

    mode "decode": token-major (prompts in trace order, tokens in order), then layer, then the token's
        experts sorted: a one-token-at-a-time decode of every token. One group per (token, layer).
    mode "calls": the recorded forward calls (the trace's `call` column) as they ran: per call, per layer,
        the sorted unique experts of all its tokens, weight summed. This is what the live cache saw.
    """
    if mode not in MODES:
        raise InputError(f"cachesim: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    need = ["prompt", "token_index", "layer", "expert"] + (["call"] if mode == "calls" else [])
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise InputError(f"cachesim: mode {mode!r} needs trace columns {missing} (the trace has "
                         f"{list(frame.columns)})")
    f = frame.copy()
    if "weight" not in f:
        f["weight"] = 0.0
    if mode == "decode":
        # keep the trace's prompt order (order of first appearance), not a lexical sort of prompt ids
        f["_p"] = pd.factorize(f["prompt"])[0]
        f = f.sort_values(["_p", "token_index", "layer", "expert"], kind="stable")
        group = f.groupby(["_p", "token_index", "layer"], sort=False).ngroup().to_numpy()
        out = pd.DataFrame({"group": group, "layer": f["layer"].to_numpy(), "expert": f["expert"].to_numpy(),
                            "weight": f["weight"].to_numpy(np.float64)})
        if out.duplicated(["group", "expert"]).any():
            raise InputError("cachesim: a token chose the same expert twice in one layer: not a routing trace")
        return out.reset_index(drop=True)
    g = (f.groupby(["call", "layer", "expert"], sort=True)["weight"].sum().reset_index())
    group = g.groupby(["call", "layer"], sort=False).ngroup().to_numpy()
    return pd.DataFrame({"group": group, "layer": g["layer"].to_numpy(), "expert": g["expert"].to_numpy(),
                         "weight": g["weight"].to_numpy(np.float64)})


def _as_sequence(data) -> pd.DataFrame:
    """A trace (has `rank`), an access sequence frame, or a list of (layer, expert) keys (one group each)."""
    if isinstance(data, pd.DataFrame):
        if "rank" in data.columns:
            return access_sequence(data, "decode")
        missing = [c for c in ("layer", "expert") if c not in data.columns]
        if missing:
            raise InputError(f"cachesim: an access sequence needs columns layer, expert (missing {missing})")
        seq = data.copy()
        if "group" not in seq:
            seq["group"] = np.arange(len(seq))
        if "weight" not in seq:
            seq["weight"] = 0.0
        return seq
    keys = [tuple(int(x) for x in k) for k in data]
    if any(len(k) != 2 for k in keys):
        raise InputError("cachesim: keys must be (layer, expert) pairs")
    return pd.DataFrame({"group": np.arange(len(keys)), "layer": [k[0] for k in keys],
                         "expert": [k[1] for k in keys], "weight": 0.0})


def replay(frame_or_sequence, capacity: int | Sequence[int], policy: str = "lru", *, per_layer: bool = False,
           pinned: Iterable[tuple[int, int]] | None = None, mode: str = "decode") -> pd.DataFrame:
    """Replay one cache over an access sequence: the sequence's layer, expert, group with a `hit` column.

    The cache is `q3lab.runtime.residency.Residency`, the engine the live caches run, driven here without a slab:
    on `ExpertCache(...).access_log()` (which carries its groups) the hits equal the live cache's, access by
    access. `frame_or_sequence` and `mode` are read as by `simulate`. capacity: an int, or with per_layer=True
    one capacity per layer.
    """
    seq = _sequence(frame_or_sequence, mode)
    keys = list(zip(seq["layer"].astype(int).tolist(), seq["expert"].astype(int).tolist()))
    if not keys:
        raise InputError("cachesim: the access sequence is empty")
    groups = seq["group"].to_numpy()
    weights = seq["weight"].to_numpy(np.float64).tolist()
    layers = max(k[0] for k in keys) + 1
    if isinstance(capacity, (list, tuple)):        # one capacity per layer (per_layer=True)
        capacity, layers = [int(c) for c in capacity], max(layers, len(capacity))
    else:
        capacity = int(capacity)
    res = Residency(capacity, layers=layers, experts=max(k[1] for k in keys) + 1,
                    policy=make_policy(policy, trace=keys if policy == "belady" else None),
                    per_layer=per_layer, pinned=pinned)
    hits = np.zeros(len(keys), dtype=bool)
    n, i = len(keys), 0
    while i < n:
        j = i + 1
        while j < n and groups[j] == groups[i]:
            j += 1
        layer = keys[i][0]
        experts = [k[1] for k in keys[i:j]]
        if any(k[0] != layer for k in keys[i:j]) or len(set(experts)) != len(experts):
            raise InputError(f"cachesim: group {groups[i]!r} (accesses {i}..{j - 1}) is not one layer call: "
                             f"it has keys {keys[i:j][:6]}; a group is one layer's unique experts")
        res.begin(layer, experts, weights[i:j])
        for a in range(i, j):
            hits[a] = res.access(layer, experts[a - i])[1]
        i = j
    out = seq[["group", "layer", "expert"]].reset_index(drop=True)
    out["hit"] = hits
    return out


def _sequence(frame_or_sequence, mode: str) -> pd.DataFrame:
    if isinstance(frame_or_sequence, pd.DataFrame) and "rank" in frame_or_sequence.columns:
        return access_sequence(frame_or_sequence, mode)
    return _as_sequence(frame_or_sequence)


def simulate(frame_or_sequence, capacities: int | Iterable[int],
             policies: Sequence[str] = ("lru", "lfu", "score", "belady"), per_layer: bool = False,
             mode: str = "decode", pinned: Iterable[tuple[int, int]] | None = None) -> pd.DataFrame:
    """Hit rate of an expert cache against capacity, for each eviction policy.

    frame_or_sequence: a trace (replayed with `access_sequence(frame, mode)`), an access-sequence frame (such
        as a live cache's `access_log()`), or a list of (layer, expert) keys. capacities: experts resident at
        most (shared by all layers), or per layer when per_layer=True. pinned: keys resident throughout, as
        the live caches' `pinned=`.
    Returns policy, capacity, accesses, hits, misses, hit_rate (and layer, per layer, when per_layer).
    """
    seq = _sequence(frame_or_sequence, mode)
    caps = [capacities] if isinstance(capacities, (int, np.integer)) else list(capacities)
    if not caps or any(isinstance(c, bool) or int(c) != c or c < 1 for c in caps):
        raise InputError(f"cachesim: capacities must be positive integers, got {caps!r}")
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise InputError(f"cachesim: unknown policies {bad}; expected some of {', '.join(POLICIES)}")
    if not len(seq):
        raise InputError("cachesim: the access sequence is empty")
    pinned = list(pinned or [])
    rows = []
    for pi, name in enumerate(policies):
        for ci, cap in enumerate(caps):
            hit = replay(seq, int(cap), name, per_layer=per_layer, pinned=pinned)
            parts = [(None, hit)] if not per_layer else [(int(lay), part) for lay, part in hit.groupby("layer")]
            for layer, part in parts:
                hits = int(part["hit"].sum())
                row = dict(policy=name, capacity=int(cap), accesses=len(part), hits=hits, misses=len(part) - hits,
                           hit_rate=hits / len(part))
                rows.append(((layer or 0, pi, ci), row if layer is None else {"layer": layer, **row}))
    rows.sort(key=lambda r: r[0])   # per layer: layer, then policy and capacity in the order asked
    return pd.DataFrame([r for _, r in rows])
