"""q3lab.analysis.cachesim: hit counts worked out by hand, Belady's bound, and agreement with the live ExpertCache."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import q3lab
from q3lab.analysis.cachesim import access_sequence, simulate
from q3lab.errors import InputError
from q3lab.runtime.experts import ExpertCache
from q3lab.runtime.recording import record

# The reference string of Silberschatz et al., "Operating System Concepts": with 3 frames, LRU takes
# 12 page faults and the optimal (Belady) policy 9.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def test_textbook_sequence_lru_and_belady():
    keys = [(0, p) for p in TEXTBOOK]
    r = simulate(keys, 3, policies=("lru", "belady")).set_index("policy")
    assert r.loc["lru", "misses"] == 12 and r.loc["lru", "hits"] == 8
    assert r.loc["belady", "misses"] == 9 and r.loc["belady", "hits"] == 11
    assert r.loc["belady", "hit_rate"] == 11 / 20
    # 6 distinct pages (0, 1, 2, 3, 4, 7): with 6 slots only the cold misses remain
    assert simulate(keys, 6, policies=("lru",))["misses"].item() == 6


def test_lru_lfu_score_differ_as_worked_out():
    # capacity 2, accesses A A B C A. At C the cache holds A (2 uses, last t=1) and B (1 use, t=2).
    # LRU evicts A -> the last A misses: 1 hit. LFU evicts B (fewer uses) -> the last A hits: 2 hits.
    # score with weights A .1, A .1, B .9: A has 0.2 < 0.9 -> evicts A: 1 hit.
    seq = pd.DataFrame({"layer": 0, "expert": [0, 0, 1, 2, 0], "weight": [0.1, 0.1, 0.9, 0.5, 0.1]})
    r = simulate(seq, 2, policies=("lru", "lfu", "score", "belady")).set_index("policy")["hits"].to_dict()
    assert r == {"lru": 1, "lfu": 2, "score": 1, "belady": 2}


def test_experts_of_the_current_group_are_not_evicted():
    # capacity 2, LRU. Groups: [e2], [e0], [e1, e2]. Serving e1 needs room: LRU alone would evict e2 (oldest),
    # but e2 is still to come in this group, so e0 goes and e2 hits. One access per group: e2 evicted, 0 hits.
    grouped = pd.DataFrame({"group": [0, 1, 2, 2], "layer": 0, "expert": [2, 0, 1, 2]})
    assert simulate(grouped, 2, policies=("lru",))["hits"].item() == 1
    assert simulate(grouped.drop(columns="group"), 2, policies=("lru",))["hits"].item() == 0


def test_per_layer_caches_are_separate():
    # layer 0: 0 1 0 1, layer 1: 5 6 7 5, interleaved; two slots per layer:
    # layer 0 hits twice (0, 1 stay), layer 1 with LRU: 5 6 | 7 evicts 5 | 5 misses: 0 hits.
    keys = [(0, 0), (1, 5), (0, 1), (1, 6), (0, 0), (1, 7), (0, 1), (1, 5)]
    r = simulate(keys, 2, policies=("lru",), per_layer=True).set_index("layer")
    assert r.loc[0, "hits"] == 2 and r.loc[1, "hits"] == 0
    assert r["accesses"].tolist() == [4, 4]
    # one shared cache of 2 slots: every access misses
    assert simulate(keys, 2, policies=("lru",))["hits"].item() == 0


def _trace(rows):
    """rows: (prompt, token_index, call, layer, [experts in rank order], [weights])"""
    out = []
    for p, t, c, lay, ex, w in rows:
        out += [dict(prompt=p, token_index=t, call=c, layer=lay, rank=r, expert=e, weight=x)
                for r, (e, x) in enumerate(zip(ex, w))]
    return pd.DataFrame(out)


def test_access_sequence_orders():
    f = _trace([("a", 0, 0, 0, [3, 1], [.6, .4]), ("a", 0, 0, 1, [2, 0], [.7, .3]),
                ("a", 1, 0, 0, [1, 2], [.5, .5]), ("a", 1, 0, 1, [0, 2], [.9, .1]),
                ("a", 2, 1, 0, [3, 0], [.8, .2]), ("a", 2, 1, 1, [2, 1], [.6, .4])])
    dec = access_sequence(f, "decode")
    assert list(zip(dec["layer"], dec["expert"])) == [(0, 1), (0, 3), (1, 0), (1, 2), (0, 1), (0, 2), (1, 0),
                                                      (1, 2), (0, 0), (0, 3), (1, 1), (1, 2)]
    assert dec["group"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert dec["weight"].tolist()[:2] == pytest.approx([.4, .6])
    calls = access_sequence(f, "calls")
    # call 0 = tokens 0 and 1: layer 0 uses {1, 2, 3}, layer 1 uses {0, 2}; then call 1
    assert list(zip(calls["layer"], calls["expert"])) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (0, 0), (0, 3),
                                                          (1, 1), (1, 2)]
    assert calls["weight"].tolist()[:3] == pytest.approx([.4 + .5, .5, .6])
    assert calls["group"].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=60), st.integers(1, 5))
def test_belady_bounds_every_policy(pages, cap):
    r = simulate([(0, p) for p in pages], cap).set_index("policy")["hits"]
    assert r["belady"] >= r[["lru", "lfu", "score"]].max()


def test_errors():
    with pytest.raises(InputError, match="capacities"):
        simulate([(0, 1)], 0)
    with pytest.raises(InputError, match="unknown policies"):
        simulate([(0, 1)], 1, policies=("fifo",))
    with pytest.raises(InputError, match="call"):
        access_sequence(_trace([("a", 0, 0, 0, [1], [1.0])]).drop(columns="call"), "calls")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from q3lab.weights.synthetic import synth
    return synth(tmp_path_factory.mktemp("synth") / "ckpt", preset="tiny", seed=0)


@pytest.mark.parametrize("policy", ["lru", "lfu", "score", "belady"])
def test_simulation_of_recorded_calls_equals_the_live_cache(tiny_ckpt, policy):
    ids = torch.randint(0, 400, (2, 6), generator=torch.Generator().manual_seed(0))
    cap = 11     # of 4 layers x 8 experts
    trace = None
    if policy == "belady":   # Belady needs the access sequence of the very run: log it with LRU first
        logger = ExpertCache(cap, log_accesses=True)
        m = q3lab.load(tiny_ckpt, experts=logger)
        for row in ids:
            m.generate(row[None], 4)
        trace = logger.trace()
    cache = ExpertCache(cap, policy=policy, trace=trace)
    model = q3lab.load(tiny_ckpt, experts=cache)
    with record(model) as rec:
        for row in ids:
            model.generate(row[None], 4)
    live = cache.summary()
    sim = simulate(rec.to_frame(), [cap], policies=(policy,), mode="calls").iloc[0]
    assert sim["accesses"] == live["accesses"]
    assert (sim["hits"], sim["misses"]) == (live["hits"], live["misses"])
    assert 0 < live["hits"] < live["accesses"]
