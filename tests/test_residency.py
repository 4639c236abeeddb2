"""One residency engine (`q3lab.runtime.residency.Residency`) behind the host cache, the device cache and the simulator:
the simulator's hit/miss sequence equals each live cache's, access by access, for every policy, capacity,
per-layer budget and pinned set, on real model runs (a tiny synthetic checkpoint) and on random traces."""
from __future__ import annotations

import pytest
import torch

import q3lab
from q3lab.analysis.cachesim import simulate
from q3lab.runtime.experts import ExpertCache

POLICIES = ("lru", "lfu", "score", "belady")
# synth "tiny" cut to 3 layers: 3 layers x 8 experts, top-2
L, E, K = 3, 8, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return q3lab.synth(tmp_path_factory.mktemp("res") / "tiny3", "tiny", seed=4, layers=3, progress=False)


BATCH = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(0))


def _run(model):
    """A batched prefill and decode: groups (layer calls) of several tokens, then of one."""
    with torch.inference_mode():
        return model.generate(BATCH, 10)


@pytest.fixture(scope="module")
def trace(ckpt):
    logger = ExpertCache(L * E, log_accesses=True)
    _run(q3lab.load(ckpt, experts=logger))
    return logger.trace()


def test_simulator_reproduces_the_live_lru_cache_of_a_3_layer_model(ckpt):
    """The issue's case: at 9f7e29a this cache hit 9 times live and 0 times in the simulator (its access log
    had no groups, so the simulator did not protect a layer call's experts)."""
    cache = ExpertCache(7, policy="lru", log_accesses=True)
    _run(q3lab.load(ckpt, experts=cache))
    live = cache.summary()
    sim = simulate(cache.access_log(), [7], policies=["lru"]).iloc[0]
    assert live["hits"] > 0
    assert (sim["accesses"], sim["hits"], sim["misses"]) == (live["accesses"], live["hits"], live["misses"])


def _belady_trace(policy, trace):
    return trace if policy == "belady" else None


@pytest.mark.parametrize("policy", POLICIES)
def test_the_simulator_replays_the_host_cache_access_by_access(ckpt, trace, policy):
    """Every policy, capacities from top-k to everything, shared and per-layer budgets, with and without pins:
    the simulated hit/miss sequence is the live one, and so are the totals `simulate` reports."""
    from q3lab.analysis.cachesim import replay
    cases = [(c, False, None) for c in (K, 3, 7, 12, L * E)] + [(c, True, None) for c in (K, 3, 5, E)] + \
        [(6, False, [(0, 1), (2, 5)]), (4, True, [(1, 0), (1, 3)])]
    for cap, per_layer, pinned in cases:
        where = f"{policy}, capacity {cap}, per_layer={per_layer}, pinned={pinned}"
        cache = ExpertCache(cap, policy=policy, per_layer=per_layer, pinned=pinned, log_accesses=True,
                            trace=_belady_trace(policy, trace))
        _run(q3lab.load(ckpt, experts=cache))
        log = cache.access_log()
        assert list(log.columns) == ["t", "layer", "expert", "weight", "hit", "group"], where
        assert cache.trace() == trace, where
        sim = replay(log, cap, policy, per_layer=per_layer, pinned=pinned)
        assert sim["hit"].tolist() == log["hit"].tolist(), where
        live = cache.summary()
        got = simulate(log, [cap], policies=[policy], per_layer=per_layer, pinned=pinned)
        assert (int(got["hits"].sum()), int(got["misses"].sum())) == (live["hits"], live["misses"]), where
        if 7 <= cap < L * E and not per_layer and not pinned:
            assert 0 < live["hits"] < live["accesses"], where


def _offloaded(ckpt, dtype=torch.bfloat16):
    model = q3lab.load(ckpt, dtype=dtype)
    p = model.experts_provider
    return model, (p.gate, p.up, p.down)


@pytest.fixture(scope="module")
def resident_tokens(ckpt):
    from q3lab.fast.decoders import StaticDecoder
    model, _ = _offloaded(ckpt)
    return StaticDecoder(model, 32).generate(BATCH[:1], 12)


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_the_device_cache_runs_every_policy_bit_equal_and_the_simulator_replays_it(ckpt, resident_tokens, policy):
    """OffloadedDecoder (on the CPU here) with a DeviceExpertCache of each policy, with and without pins: tokens
    equal to the resident decoder's, slots holding the host's experts, and the simulator's hits the live ones."""
    from q3lab.analysis.cachesim import replay
    from q3lab.fast.device_cache import DeviceExpertCache
    from q3lab.fast.decoders import OffloadedDecoder
    model, host = _offloaded(ckpt)
    dev_trace = None
    if policy == "belady":   # the access sequence of this very run, logged by an LRU cache first
        logger = DeviceExpertCache(*host, capacity=L * E, device="cpu", log_accesses=True)
        OffloadedDecoder(model, 32, logger).generate(BATCH[:1], 12)
        dev_trace = logger.trace()
    for cap, per_layer, pinned in [(K, False, None), (5, False, None), (3, True, None), (5, False, [(0, 2), (2, 7)])]:
        where = f"{policy}, capacity {cap}, per_layer={per_layer}, pinned={pinned}"
        cache = DeviceExpertCache(*host, capacity=cap, device="cpu", policy=policy, trace=dev_trace,
                                  per_layer=per_layer, pinned=pinned, log_accesses=True)
        got = OffloadedDecoder(model, 32, cache).generate(BATCH[:1], 12)
        assert torch.equal(got, resident_tokens), where
        log = cache.access_log()
        assert replay(log, cap, policy, per_layer=per_layer, pinned=pinned)["hit"].tolist() == log["hit"].tolist()
        st = cache.stats()
        assert (st["hits"], st["misses"]) == (int(log["hit"].sum()), int((~log["hit"]).sum())), where
        assert st["bytes_copied"] == st["misses"] * cache.expert_bytes and st["evictions"] > 0, where
        if pinned:
            assert set(pinned) <= set(cache.resident())
        for layer, e in cache.resident():
            s = cache.residency.slot_of[(layer, e)]
            assert all(torch.equal(a[s], h[layer, e]) for a, h in zip((cache.gate, cache.up, cache.down), host))


def _random_groups(seed, n, top):
    """n layer calls of a 3-layer model: layers in order, each call 1..top sorted unique experts with weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(1, top + 1, (), generator=g))
        experts = sorted(torch.randperm(E, generator=g)[:k].tolist())
        out.append((i % L, experts, torch.rand(k, generator=g).tolist()))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_host_cache_device_cache_and_simulator_agree_on_random_traces(ckpt, seed):
    """Random layer calls served by an ExpertCache (bound to the checkpoint) and by a DeviceExpertCache (random
    host tensors): for every policy and capacity, both give the same hit sequence as the simulator, and the
    device slots hold the experts asked for."""
    from q3lab.analysis.cachesim import replay
    from q3lab.fast.device_cache import DeviceExpertCache
    from q3lab.weights.source import open_source
    groups = _random_groups(seed, 60, 3)
    keys = [(layer, e) for layer, experts, _ in groups for e in experts]
    g = torch.Generator().manual_seed(100 + seed)
    I, D = 4, 6
    host = (torch.randn(L, E, I, D, generator=g), torch.randn(L, E, I, D, generator=g),
            torch.randn(L, E, D, I, generator=g))
    src = open_source(ckpt)
    for policy in POLICIES:
        for cap, per_layer in [(3, False), (5, False), (9, False), (3, True), (6, True)]:
            where = f"seed {seed}, {policy}, capacity {cap}, per_layer={per_layer}"
            tr = keys if policy == "belady" else None
            host_cache = ExpertCache(cap, policy=policy, per_layer=per_layer, trace=tr, log_accesses=True)
            host_cache.bind(src, src.config, "cpu", torch.float32)
            dev = DeviceExpertCache(*host, capacity=cap, device="cpu", policy=policy, per_layer=per_layer,
                                    trace=tr, log_accesses=True)
            for layer, experts, weights in groups:
                host_cache.prepare(layer, experts, weights)
                for e in experts:
                    host_cache.weights(layer, e)
                ranked = experts[::-1]                       # the device is asked in rank order, not sorted
                slots = dev.slots(layer, ranked, weights[::-1])
                for e, s in zip(ranked, slots):
                    assert torch.equal(dev.gate[s], host[0][layer, e]) and torch.equal(dev.down[s], host[2][layer, e])
            a, b = host_cache.access_log(), dev.access_log()
            assert a["hit"].tolist() == b["hit"].tolist(), where
            assert a[["layer", "expert", "group"]].equals(b[["layer", "expert", "group"]]), where
            assert replay(a, cap, policy, per_layer=per_layer)["hit"].tolist() == a["hit"].tolist(), where
            assert 0 < int(a["hit"].sum()) < len(a), where


def test_residency_counts_by_hand():
    """Capacity 3, LFU. Calls: L0 {0, 1}, L1 {0}, L0 {0, 2}, L0 {1}. At (0,2): resident (0,0) 2 uses,
    (0,1) 1 use, (1,0) 1 use, (0,0) in this call: of the two 1-use keys the least recent, (0,1), goes; then
    (0,1) misses and evicts (1,0) (1 use, older than (0,2))."""
    from q3lab.runtime.residency import Residency
    res = Residency(3, layers=2, experts=4, policy="lfu", log_accesses=True)
    hits = []
    for layer, experts in [(0, [0, 1]), (1, [0]), (0, [0, 2]), (0, [1])]:
        res.begin(layer, experts)
        hits += [res.access(layer, e)[1] for e in experts]
    assert hits == [False, False, False, True, False, False]
    assert res.resident() == [(0, 0), (0, 1), (0, 2)]
    assert res.access_log()["group"].tolist() == [0, 0, 1, 2, 2, 3]
    assert res.totals()["evictions"] == 2 and sorted(res.slot_of.values()) == [0, 1, 2]


def test_device_cache_refusals(ckpt):
    from q3lab.fast.device_cache import DeviceExpertCache
    from q3lab.errors import InputError
    from q3lab.fast.decoders import OffloadedDecoder
    model, host = _offloaded(ckpt)
    cache = DeviceExpertCache(*host, capacity=3, device="cpu", pinned=[(0, 0), (0, 1)])
    with pytest.raises(InputError, match="needs 2 experts at once but the cache holds 3 minus 2 pinned"):
        cache.slots(1, [4, 5])
    with pytest.raises(InputError, match="unknown eviction policy"):
        DeviceExpertCache(*host, capacity=3, device="cpu", policy="fifo")
    with pytest.raises(InputError, match="out of range"):
        DeviceExpertCache(*host, capacity=3, device="cpu", pinned=[(L, 0)])
    score = DeviceExpertCache(*host, capacity=4, device="cpu", policy="score")
    with pytest.raises(InputError, match="router weights"):
        score.slots(0, [1, 2])
    assert score.slots(0, [2, 1], [0.7, 0.3]) == [score.residency.slot_of[(0, 2)], score.residency.slot_of[(0, 1)]]
    with pytest.raises(InputError, match="router weights"):   # the eager prefill does not pass weights yet
        OffloadedDecoder(model, 32, DeviceExpertCache(*host, capacity=4, device="cpu", policy="score")) \
            .generate(BATCH[:1], 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the copy stream and segment graphs)")
@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_the_device_cache_on_cuda_is_bit_equal_with_every_policy(ckpt, policy):
    """On a GPU: copies on the side stream, segment graphs, slots reused under every policy and with pins: the
    offloaded decoder's tokens and KV cache equal the resident decoder's bit for bit, and the simulator
    replays the cache's log."""
    from q3lab.analysis.cachesim import replay
    from q3lab.fast.device_cache import DeviceExpertCache
    from q3lab.fast.decoders import OffloadedDecoder, StaticDecoder
    model = q3lab.load(ckpt, dtype=torch.bfloat16, device="cuda")
    ids = BATCH[:1].cuda()
    res = StaticDecoder(model, 40)
    want = res.generate(ids, 24)
    p = model.experts_provider
    host = tuple(t.cpu().pin_memory() for t in (p.gate, p.up, p.down))
    tr = None
    if policy == "belady":
        logger = DeviceExpertCache(*host, capacity=L * E, log_accesses=True)
        OffloadedDecoder(model, 40, logger).generate(ids, 24)
        model.set_experts(p)
        tr = logger.trace()
    for cap, pinned in [(K, None), (5, None), (5, [(0, 2), (2, 7)])]:
        cache = DeviceExpertCache(*host, capacity=cap, policy=policy, trace=tr, pinned=pinned, log_accesses=True)
        off = OffloadedDecoder(model, 40, cache)
        got = off.generate(ids, 24)
        model.set_experts(p)
        assert torch.equal(got, want), (policy, cap, pinned)
        assert torch.equal(off.cache.k, res.cache.k) and torch.equal(off.cache.v, res.cache.v)
        log = cache.access_log()
        assert replay(log, cap, policy, pinned=pinned)["hit"].tolist() == log["hit"].tolist()
        assert cache.stats()["evictions"] > 0
