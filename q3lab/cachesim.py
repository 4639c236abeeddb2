"""Expert-cache simulation from a routing trace, without running the model.

An access sequence is a frame of (group, layer, expert, weight) rows in access order. A group is what one
layer step of the live cache (`q3lab.experts.ExpertCache`) sees at once: the sorted unique experts that
the tokens of one forward call chose in one layer, with `weight` their summed router weight. The simulator
replays the live cache's rules exactly: experts of the current group not yet served are protected from
eviction, unless the group is larger than the cache; every access (hit or miss) goes to the policy, a miss
then inserts. Policies come from `q3lab.policies`; misses include the cold (first-use) misses.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import InputError
from .policies import POLICIES, make_policy

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


def _run(keys: list[tuple[int, int]], groups: np.ndarray, weights: np.ndarray, capacity: int, policy) -> int:
    """Replay one cache over `keys`; return the number of hits."""
    resident: set = set()
    hits = 0
    n = len(keys)
    i = 0
    t = 0
    while i < n:
        j = i
        while j < n and groups[j] == groups[i]:
            j += 1
        pending = set(keys[i:j])
        for a in range(i, j):
            key = keys[a]
            pending.discard(key)
            policy.access(key, t, weights[a])
            if key in resident:
                hits += 1
            else:
                while len(resident) >= capacity:
                    cands = resident - pending
                    if not cands:   # the group outgrew the cache: evict an expert still to come
                        cands = resident
                    victim = policy.victim(cands, t)
                    if victim not in cands:
                        raise InputError(f"cachesim: policy {policy.name} chose {victim!r}, not a candidate")
                    resident.discard(victim)
                    policy.remove(victim)
                resident.add(key)
                policy.insert(key, t)
            t += 1
        i = j
    return hits


def simulate(frame_or_sequence, capacities: int | Iterable[int],
             policies: Sequence[str] = ("lru", "lfu", "score", "belady"), per_layer: bool = False,
             mode: str = "decode") -> pd.DataFrame:
    """Hit rate of an expert cache against capacity, for each eviction policy.

    frame_or_sequence: a trace (replayed with `access_sequence(frame, mode)`), an access-sequence frame, or
        a list of (layer, expert) keys. capacities: experts resident at most (shared by all layers), or per
        layer when per_layer=True (one cache per layer; Belady then sees that layer's own sequence).
    Returns policy, capacity, accesses, hits, misses, hit_rate (and layer, per layer, when per_layer).
    """
    if isinstance(frame_or_sequence, pd.DataFrame) and "rank" in frame_or_sequence.columns:
        seq = access_sequence(frame_or_sequence, mode)
    else:
        seq = _as_sequence(frame_or_sequence)
    caps = [capacities] if isinstance(capacities, (int, np.integer)) else list(capacities)
    if not caps or any(isinstance(c, bool) or int(c) != c or c < 1 for c in caps):
        raise InputError(f"cachesim: capacities must be positive integers, got {caps!r}")
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise InputError(f"cachesim: unknown policies {bad}; expected some of {', '.join(POLICIES)}")
    if not len(seq):
        raise InputError("cachesim: the access sequence is empty")
    scopes = [(None, seq)] if not per_layer else [(int(lay), seq[seq["layer"] == lay])
                                                 for lay in sorted(seq["layer"].unique())]
    rows = []
    for layer, part in scopes:
        keys = list(zip(part["layer"].astype(int).tolist(), part["expert"].astype(int).tolist()))
        groups, weights = part["group"].to_numpy(), part["weight"].to_numpy(np.float64).tolist()
        for name in policies:
            for cap in caps:
                policy = make_policy(name, trace=keys if name == "belady" else None)
                hits = _run(keys, groups, weights, int(cap), policy)
                row = dict(policy=name, capacity=int(cap), accesses=len(keys), hits=hits, misses=len(keys) - hits,
                           hit_rate=hits / len(keys))
                if per_layer:
                    row = {"layer": layer, **row}
                rows.append(row)
    return pd.DataFrame(rows)
