"""q3lab.ExpertCache: outputs equal to the all-resident model, hit/miss counts worked out by hand, policies on
hand-made traces, capacity refusals, reads of one expert's bytes only, failing sources, and the memory bound."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import q3lab
from q3lab.errors import InputError, Q3LabError
from q3lab.runtime.experts import ExpertCache, parse_bytes
from q3lab.runtime.residency import Policy, make_policy
from q3lab.weights.synthetic import synth
from q3lab.weights.source import open_weights

# synth "tiny": 4 layers x 8 experts, top-2, I=32, D=64, stored in bf16.
L, E, K, I, D = 4, 8, 2, 32, 64
SRC_EXPERT_BYTES = 3 * I * D * 2      # bf16 on disk
FP32_EXPERT_BYTES = 3 * I * D * 4     # in a float32 model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here: on 2 shared cores, two spinning OpenMP threads made this file 40x slower
    (609 s against 16 s). References and cached runs are computed alike, so equality is unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("ec") / "tiny", "tiny", seed=4, progress=False)


def _ids(shape, seed):
    return torch.randint(0, 400, shape, generator=torch.Generator().manual_seed(seed))


PROMPT_BATCH = _ids((2, 23), 0)    # a batched prefill: a layer's used set is larger than small caches
PROMPT = _ids((1, 9), 1)


def _run(model):
    """Logits of a batched forward, then a 32-token greedy continuation (the calls every cache run repeats)."""
    with torch.inference_mode():
        logits = model(PROMPT_BATCH)
    return logits, model.generate(PROMPT, 32)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Outputs of the all-resident model, and the access trace of those calls (logged by a cache)."""
    logits, tokens = _run(q3lab.load(ckpt))
    logger = ExpertCache(L * E, log_accesses=True)
    _run(q3lab.load(ckpt, experts=logger))
    return logits, tokens, logger.trace()


def _bound(ckpt, capacity, **kw):
    """A cache bound to the checkpoint without a model, for driving prepare/weights by hand."""
    cache = ExpertCache(capacity, **kw)
    src = open_weights(ckpt)
    cache.bind(src, src.config, "cpu", torch.float32)
    return cache


def _serve(cache, layer, experts):
    cache.prepare(layer, experts)
    return [cache.weights(layer, e) for e in experts]


def _source_expert(ckpt, layer, e):
    return tuple(t.float() for t in open_weights(ckpt).expert(layer, e))


# -- exact equality with the all-resident model ---------------------------------------------------
CONFIGS = [(c, False) for c in (K, 3, 8, 16, L * E)] + [(c, True) for c in (K, 3, 5, E)]


@pytest.mark.parametrize("policy", ["lru", "lfu", "score", "belady"])
def test_outputs_equal_all_resident_for_every_capacity(ckpt, reference, policy):
    want_logits, want_tokens, trace = reference
    cold = len(set(trace))
    for cap, per_layer in CONFIGS:
        cache = ExpertCache(cap, policy=policy, per_layer=per_layer, log_accesses=True,
                            trace=trace if policy == "belady" else None)
        logits, tokens = _run(q3lab.load(ckpt, experts=cache))
        where = f"{policy}, capacity {cap}, per_layer={per_layer}"
        assert torch.equal(logits, want_logits), where
        assert tokens.tolist() == want_tokens.tolist(), where
        # the access sequence depends on the routing only, never on the policy or capacity
        assert cache.trace() == trace, where
        s, frame = cache.summary(), cache.stats()
        assert s["accesses"] == s["hits"] + s["misses"] == len(trace), where
        assert s["bytes_loaded"] == s["misses"] * SRC_EXPERT_BYTES, where
        if per_layer:
            assert frame["peak_resident"].max() <= cap, where
        else:
            assert s["peak_resident"] <= cap, where
        if cap * (L if per_layer else 1) >= L * E:   # room for everything: only first-use misses
            assert (s["misses"], s["evictions"]) == (cold, 0), where
        else:
            assert s["evictions"] > 0, where


def test_small_per_layer_cache_serves_a_used_set_larger_than_itself(reference):
    _, _, trace = reference
    first_layer0 = list(itertools.takewhile(lambda k: k[0] == 0, trace))   # layer 0 of the batched prefill
    assert len(first_layer0) > K, "the prefill must use more experts in a layer than a top-k cache holds"


def test_bf16_model_equal_all_resident(ckpt):
    want = q3lab.load(ckpt, dtype=torch.bfloat16)
    cache = ExpertCache(K, per_layer=True)
    got = q3lab.load(ckpt, dtype=torch.bfloat16, experts=cache)
    (lw, tw), (lg, tg) = _run(want), _run(got)
    assert torch.equal(lg, lw)
    assert tg.tolist() == tw.tolist()
    assert cache.summary()["expert_bytes"] == 3 * I * D * 2


def test_belady_bounds_every_policy_on_the_same_trace(ckpt, reference):
    _, _, trace = reference
    for cap, per_layer in [(3, False), (8, False), (3, True)]:
        hits = {}
        for policy in ("lru", "lfu", "score", "belady"):
            cache = ExpertCache(cap, policy=policy, per_layer=per_layer, trace=trace if policy == "belady" else None)
            _run(q3lab.load(ckpt, experts=cache))
            hits[policy] = cache.summary()["hits"]
        assert all(hits["belady"] >= h for h in hits.values()), (cap, per_layer, hits)
        assert hits["belady"] > min(hits.values()), (cap, per_layer, hits)


def test_router_weights_reach_the_cache(ckpt):
    """With norm_topk_prob every token's top-k weights sum to 1: per layer, one call's weights sum to its tokens."""
    cache = ExpertCache(L * E, policy="score", log_accesses=True)
    model = q3lab.load(ckpt, experts=cache)
    with torch.inference_mode():
        model(PROMPT_BATCH)
    log = cache.access_log()
    assert len(log) == cache.summary()["accesses"]
    per_layer = log.groupby("layer")["weight"].sum()
    assert list(per_layer.index) == list(range(L))
    assert (per_layer - PROMPT_BATCH.numel()).abs().max() < 1e-4
    assert (log["weight"] > 0).all()


# -- counts worked out by hand -------------------------------------------------------------------
def test_lru_counts_by_hand_and_in_use_experts_are_protected(ckpt):
    cache = _bound(ckpt, 3, log_accesses=True)
    for layer, experts in [(0, [0, 1]), (1, [0, 2]), (0, [0, 1]), (1, [2, 3])]:
        _serve(cache, layer, experts)
    # t0 (0,0) miss, t1 (0,1) miss, t2 (1,0) miss, t3 (1,2) miss: evict (0,0);
    # t4 (0,0) miss: (0,1) is LRU but still to be served in this call, so evict (1,0); t5 (0,1) hit;
    # t6 (1,2) hit; t7 (1,3) miss: evict (0,0).
    assert cache.access_log()["hit"].tolist() == [False] * 5 + [True, True, False]
    assert cache.resident() == [(0, 1), (1, 2), (1, 3)]
    s = cache.stats().set_index("layer")
    assert s.loc[0, ["accesses", "hits", "misses", "evictions"]].tolist() == [4, 1, 3, 2]
    assert s.loc[1, ["accesses", "hits", "misses", "evictions"]].tolist() == [4, 1, 3, 1]
    total = cache.summary()
    assert (total["hits"], total["misses"], total["evictions"]) == (2, 6, 3)
    assert total["hit_rate"] == 2 / 8
    assert total["bytes_loaded"] == 6 * SRC_EXPERT_BYTES
    assert total["expert_bytes"] == FP32_EXPERT_BYTES
    cache.reset_stats()
    assert cache.summary()["accesses"] == 0 and cache.resident() == [(0, 1), (1, 2), (1, 3)]


def test_belady_counts_by_hand(ckpt):
    trace = [(0, 0), (0, 1), (1, 0), (1, 2), (0, 0), (0, 1), (1, 2), (1, 3)]
    cache = _bound(ckpt, 3, policy="belady", trace=trace, log_accesses=True)
    for layer, experts in [(0, [0, 1]), (1, [0, 2]), (0, [0, 1]), (1, [2, 3])]:
        _serve(cache, layer, experts)
    # t3: (1,0) is never used again but is in this call (in use): of (0,0) (next t4) and (0,1) (next t5), (0,1)
    # goes; t4 hit; t5 miss evicts (1,0) (never again; (0,0) is in this call); t6 hit; t7: (1,2) is in this
    # call, (0,0) and (0,1) are never used again: the smaller key (0,0) goes.
    assert cache.access_log()["hit"].tolist() == [False] * 4 + [True, False, True, False]
    assert cache.resident() == [(0, 1), (1, 2), (1, 3)]


def test_weights_are_the_source_experts_after_buffer_reuse(ckpt):
    cache = _bound(ckpt, 2)
    held = _serve(cache, 0, [0, 1])[0]       # keep views of (0, 0) alive while it is evicted
    for layer, experts in [(1, [3, 4]), (2, [5, 6]), (3, [1, 7])]:
        for e, got in zip(experts, _serve(cache, layer, experts)):
            for g, w in zip(got, _source_expert(ckpt, layer, e)):
                assert torch.equal(g, w), (layer, e)
    assert cache.summary()["evictions"] == 6
    assert cache.summary()["overflow_buffers"] > 0   # (0, 0)'s slot stayed out of use while its views lived
    for g, w in zip(held, _source_expert(ckpt, 0, 0)):
        assert torch.equal(g, w), "a buffer still in use was handed to another expert"


def test_prefetch_counts_by_hand(ckpt):
    cache = _bound(ckpt, 4, prefetch="same-ids-next-layer", log_accesses=True)
    _serve(cache, 0, [0, 1])      # misses; then prefetch (1,0), (1,1)
    _serve(cache, 1, [1, 2])      # (1,1) hit on a prefetched expert; (1,2) miss evicts LRU (0,0);
    # then prefetch (2,1), (2,2), evicting (0,1) and (1,0)
    s = cache.summary()
    assert (s["hits"], s["misses"], s["prefetch_hits"], s["prefetch_loads"], s["evictions"]) == (1, 3, 1, 4, 3)
    assert s["bytes_loaded"] == 7 * SRC_EXPERT_BYTES
    assert cache.resident() == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert cache.stats()["prefetch_loads"].tolist() == [0, 2, 2, 0]


def test_prefetch_and_pinning_keep_outputs_equal(ckpt, reference):
    want_logits, want_tokens, trace = reference
    calls = []

    def custom(layer, used):
        calls.append(layer)
        return [(layer + 1, (e + 1) % E) for e in used] if layer + 1 < L else []

    pinned = [(0, 0), (1, 1), (3, 7)]
    for kw in [dict(prefetch="same-ids-next-layer"), dict(prefetch=custom), dict(pinned=pinned)]:
        cache = ExpertCache(5 + len(kw.get("pinned", [])), log_accesses=True, **kw)
        logits, tokens = _run(q3lab.load(ckpt, experts=cache))
        assert torch.equal(logits, want_logits), kw
        assert tokens.tolist() == want_tokens.tolist(), kw
        s = cache.summary()
        assert s["peak_resident"] <= cache.capacity
        if "pinned" in kw:
            assert set(pinned) <= set(cache.resident())
            log = cache.access_log()
            on_pinned = log[[k in set(pinned) for k in zip(log["layer"], log["expert"])]]
            assert len(on_pinned) > 0 and on_pinned["hit"].all()
            assert s["hits"] + s["misses"] == len(trace)
        else:
            assert s["prefetch_loads"] > 0 and 0 < s["prefetch_hits"] <= s["prefetch_loads"]
    assert calls and set(calls) == set(range(L))


# -- capacity and options ------------------------------------------------------------------------
def test_capacity_in_bytes_converts_at_the_model_dtype(ckpt):
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5 GiB") == 3 * 2**29 and parse_bytes(7) == 7
    cases = [(dict(capacity_bytes=2 * FP32_EXPERT_BYTES), torch.float32, 2),
             (dict(capacity="0.1MB"), torch.float32, 100_000 // FP32_EXPERT_BYTES),
             (dict(capacity="0.1MB"), torch.bfloat16, 100_000 // (FP32_EXPERT_BYTES // 2)),
             (dict(capacity=f"{3 * FP32_EXPERT_BYTES}B", per_layer=True), torch.float32, 3)]
    for kw, dtype, want in cases:
        cache = ExpertCache(**kw)
        q3lab.load(ckpt, dtype=dtype, experts=cache)
        assert cache.capacity == want, kw
        assert cache.summary()["capacity_bytes"] == want * cache.expert_bytes
    with pytest.raises(InputError, match=r"top-k.*2"):
        q3lab.load(ckpt, experts=ExpertCache(capacity_bytes=2 * FP32_EXPERT_BYTES - 1))


@pytest.mark.parametrize("kw, match", [
    (dict(capacity=1), "top-k"),
    (dict(capacity=1, per_layer=True), "top-k"),
    (dict(capacity=3, per_layer=True, pinned=[(0, 0), (0, 1)]), "pinned"),
    (dict(capacity=4, pinned=[(0, 0), (1, 0), (2, 0)]), "pinned"),
    (dict(capacity=4, pinned=[(4, 0)]), "out of range"),
])
def test_capacity_that_cannot_hold_top_k_is_refused_at_load(ckpt, kw, match):
    with pytest.raises(InputError, match=match):
        q3lab.load(ckpt, experts=ExpertCache(**kw))


@pytest.mark.parametrize("kw, match", [
    (dict(), "exactly one"),
    (dict(capacity=4, capacity_bytes=10**6), "exactly one"),
    (dict(capacity=0), "positive"),
    (dict(capacity="lots"), "size"),
    (dict(capacity=4, policy="fifo"), "unknown eviction policy"),
    (dict(capacity=4, policy="belady"), "trace"),
    (dict(capacity=4, prefetch="next"), "prefetch"),
])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(InputError, match=match):
        ExpertCache(**kw)


def test_a_cache_serves_one_model(ckpt):
    cache = ExpertCache(4)
    q3lab.load(ckpt, experts=cache)
    with pytest.raises(InputError, match="already bound"):
        q3lab.load(ckpt, experts=cache)


def test_belady_with_another_runs_trace_is_refused(ckpt, reference):
    _, _, trace = reference
    cache = ExpertCache(4, policy="belady", trace=trace[::-1])
    model = q3lab.load(ckpt, experts=cache)
    with pytest.raises(InputError, match="trace"), torch.inference_mode():
        model(PROMPT_BATCH)


# -- policies on a hand-made trace -----------------------------------------------------------------
def _simulate(name, trace, capacity, weights):
    policy = make_policy(name, trace)
    resident, hits = set(), 0
    for t, key in enumerate(trace):
        policy.access(key, t, weights.get(key, 0.0))
        if key in resident:
            hits += 1
            continue
        if len(resident) >= capacity:
            victim = policy.victim(resident, t)
            resident.remove(victim)
            policy.remove(victim)
        resident.add(key)
        policy.insert(key, t)
    return hits


def test_policies_on_a_hand_made_trace():
    trace = [(0, x) for x in (1, 2, 3, 1, 4, 1, 2, 5, 1, 2, 3, 4, 5)]
    weights = {(0, 1): 1.0, (0, 2): 0.5}
    # Worked out by hand with 3 slots: LRU hits at t3 t5 t8 t9; LFU (whole-history counts) at the same four;
    # score keeps 1 and 2 (the only weighted keys) and hits at t3 t5 t6 t8 t9; Belady evicts 3 at t4, 4 at t7,
    # 1 at t10 (1 and 2 are never used again: the smaller key goes), 2 at t11, and hits at t3 t5 t6 t8 t9 t12.
    got = {name: _simulate(name, trace, 3, weights) for name in ("lru", "lfu", "score", "belady")}
    assert got == {"lru": 4, "lfu": 4, "score": 5, "belady": 6}


def test_policy_refusals():
    with pytest.raises(InputError, match="trace"):
        make_policy("belady")
    belady = make_policy("belady", [(0, 1), (0, 2)])
    with pytest.raises(InputError, match="trace"):
        belady.access((0, 2), 0)
    lru = make_policy("lru")
    lru.insert((0, 1), 0)
    with pytest.raises(InputError, match="was ever inserted"):
        lru.victim({(0, 9)}, 1)


# -- what a load reads ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(ckpt, tmp_path_factory):
    return q3lab.extract(ckpt, tmp_path_factory.mktemp("ec_store") / "store", progress=False)


@pytest.mark.parametrize("kind", ["checkpoint", "store"])
def test_a_miss_reads_only_that_experts_bytes(ckpt, store, kind, monkeypatch, reference):
    path = ckpt if kind == "checkpoint" else store
    cache = _bound(path, 2)
    read = []
    real = os.preadv

    def counting(fd, buffers, offset, *a):
        n = real(fd, buffers, offset, *a)
        read.append(n)
        return n
    monkeypatch.setattr(os, "preadv", counting)
    _serve(cache, 2, [3, 5])
    assert sum(read) == 2 * SRC_EXPERT_BYTES
    read.clear()
    _serve(cache, 2, [3, 5])          # hits read nothing
    assert read == []
    monkeypatch.undo()
    want_logits, want_tokens, _ = reference
    logits, tokens = _run(q3lab.load(path, experts=ExpertCache(3)))
    assert torch.equal(logits, want_logits) and tokens.tolist() == want_tokens.tolist()


def test_source_vanishing_mid_run_raises_a_clear_error(ckpt, tmp_path):
    folder = shutil.copytree(ckpt, tmp_path / "ckpt")
    model = q3lab.load(folder, experts=ExpertCache(K))
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(Q3LabError) as err, torch.inference_mode():
        model(PROMPT)
    msg = str(err.value)
    assert "layer 0 expert" in msg and ".safetensors" in msg and str(folder) in msg


# -- memory ----------------------------------------------------------------------------------------
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, q3lab, q3lab.runtime.thinker, q3lab.weights.source, q3lab.runtime.experts

    def rss_anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    path, capacity = sys.argv[1], int(sys.argv[2])
    base_import = rss_anon()
    cache = q3lab.runtime.experts.ExpertCache(capacity) if capacity else None
    model = q3lab.load(path, dtype=torch.bfloat16, experts=cache)
    base_loaded = rss_anon()   # dense weights only, with a cache
    peak = [base_loaded]

    def sample(*_):
        peak[0] = max(peak[0], rss_anon())
    if cache is not None:       # right after every load, when the cache is fullest
        read = cache._read
        cache._read = lambda key, prefetch: (read(key, prefetch), sample())[0]
    for layer in model.model.layers:
        layer.mlp.experts.register_forward_hook(sample)
    ids = torch.randint(0, 4000, (1, 32), generator=torch.Generator().manual_seed(0))
    model.generate(ids, 16)
    print(json.dumps(dict(base_import=base_import, base_loaded=base_loaded, peak=peak[0],
                          expert_bytes=model.config.expert_numel * 2,
                          summary=cache.summary() if cache else None)))
""")


def _memory_run(path, capacity):
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), str(capacity)], capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_resident_memory_stays_within_capacity(tmp_path):
    # medium preset, 2 layers: 128 experts of 3 MiB in bf16 (384 MiB), dense weights about 44 MB
    path = synth(tmp_path / "medium", "medium", layers=2, seed=0, progress=False)
    capacity, overhead = 16, 64 * 2**20
    cached = _memory_run(path, capacity)
    resident = _memory_run(path, 0)
    eb = cached["expert_bytes"]
    assert eb == 3 * 512 * 1024 * 2
    s = cached["summary"]
    assert s["peak_resident"] == capacity and s["evictions"] > 0
    grew = cached["peak"] - cached["base_loaded"]
    assert grew <= capacity * eb + overhead, (
        f"RssAnon grew {grew / 2**20:.1f} MiB during generation, more than {capacity} experts "
        f"({capacity * eb / 2**20:.0f} MiB) + {overhead / 2**20:.0f} MiB")
    # The same bound, from the import baseline, for the all-resident model: it must not fit.
    dense_load = cached["base_loaded"] - cached["base_import"]
    bound = dense_load + capacity * eb + overhead
    assert cached["peak"] - cached["base_import"] <= bound
    assert resident["peak"] - resident["base_import"] > bound + 200 * 2**20


# -- command line --------------------------------------------------------------------------------
def test_cli_generate_with_cache_prints_the_resident_models_text(ckpt, capsys):
    from q3lab.cli import main
    from q3lab.base.tokenizer import load_tokenizer
    tok = load_tokenizer(ckpt)
    prompt = "The router scores all of them"
    ids = torch.tensor([tok.encode(prompt)])
    want = q3lab.load(ckpt).generate(ids, 12, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    common = [str(ckpt), "--prompt", prompt, "--max-new-tokens", "12", "--greedy"]
    assert main(["generate", *common, "--expert-cache", "3", "--policy", "lfu"]) == 0
    out, err = capsys.readouterr()
    assert out == tok.decode(want) + "\n"
    assert "expert cache: lfu, capacity 3 experts" in err and "hit rate" in err
    assert main(["generate", *common]) == 0
    out2, err2 = capsys.readouterr()
    assert out2 == out and "expert cache" not in err2
    assert main(["generate", *common, "--expert-cache", "1"]) == 2
    assert "top-k" in capsys.readouterr().err


# -- the cheap paths give what the general ones give ---------------------------------------------
@pytest.mark.parametrize("name", ["lru", "lfu", "score", "belady"])
def test_victim_where_picks_what_victim_picks_among_the_same_candidates(name):
    """On a random trace with random evictions, `victim_where(ok)` equals `victim({resident keys ok accepts})`."""
    g = torch.Generator().manual_seed(7)
    trace = [(int(a), int(b)) for a, b in torch.randint(0, 4, (600, 2), generator=g)]
    policy, resident, checked = make_policy(name, trace), set(), 0
    for t, key in enumerate(trace):
        policy.access(key, t, float(t % 5) / 4)
        if key not in resident:
            if len(resident) >= 6:
                banned = {k for k in resident if int(torch.randint(0, 3, (), generator=g)) == 0}
                ok = (lambda k, banned=banned: k not in banned and k[0] != t % 4)
                cands = {k for k in resident if ok(k)}
                fast = policy.victim_where(ok, t)
                assert fast == (policy.victim(cands, t) if cands else None), (t, name)
                checked += bool(cands)
                victim = policy.victim(resident, t)
                resident.remove(victim)
                policy.remove(victim)
            resident.add(key)
            policy.insert(key, t)
    assert checked > 100


class _ListedLRU(Policy):
    """A policy with only `victim` (no `victim_where`): least recently accessed by a plain dict of times."""
    name = "listed-lru"

    def __init__(self):
        self.last = {}

    def access(self, key, t, weight=0.0):
        self.last[key] = t

    def insert(self, key, t):
        self.last[key] = max(self.last.get(key, -1), t)

    def victim(self, candidates, t):
        return min(candidates, key=lambda k: self.last[k])


def test_a_policy_without_victim_where_gets_the_candidate_set(ckpt, reference):
    want_logits, want_tokens, trace = reference
    for per_layer, cap in [(False, 5), (True, 3)]:
        lru = ExpertCache(cap, per_layer=per_layer)
        listed = ExpertCache(cap, per_layer=per_layer, policy=_ListedLRU())
        for cache in (lru, listed):
            logits, tokens = _run(q3lab.load(ckpt, experts=cache))
            assert torch.equal(logits, want_logits) and tokens.tolist() == want_tokens.tolist()
        a, b = lru.summary(), listed.summary()
        assert (a["hits"], a["misses"], a["evictions"]) == (b["hits"], b["misses"], b["evictions"]), per_layer
        assert lru.resident() == listed.resident()


def test_slots_are_reused_when_nobody_holds_their_views(ckpt, reference):
    """The model drops the views it is given: a small cache never needs an overflow buffer, and its slots
    keep the source's experts exactly (outputs equal to the all-resident model)."""
    want_logits, want_tokens, _ = reference
    cache = ExpertCache(3)
    logits, tokens = _run(q3lab.load(ckpt, experts=cache))
    assert torch.equal(logits, want_logits) and tokens.tolist() == want_tokens.tolist()
    s = cache.summary()
    assert s["evictions"] > 100 and s["overflow_buffers"] == 0
    for layer, e in cache.resident():
        cache.prepare(layer, [e])
        for got, want in zip(cache.weights(layer, e), _source_expert(ckpt, layer, e)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["checkpoint", "store"])
def test_one_open_file_per_shard_and_one_read_per_miss(ckpt, store, kind, monkeypatch):
    path = ckpt if kind == "checkpoint" else store
    cache = _bound(path, 2)
    opened, reads = [], []
    real_open, real_preadv = os.open, os.preadv
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    monkeypatch.setattr(os, "preadv", lambda fd, b, off, *a: (reads.append(off), real_preadv(fd, b, off, *a))[1])
    for layer in range(L):
        for e in range(E):
            _serve(cache, layer, [e])
    monkeypatch.undo()
    s = cache.summary()
    assert s["misses"] == L * E and len(reads) == L * E            # one positioned read per expert
    assert len(opened) == len(set(opened)) and 1 <= len(opened) <= len(list(path.rglob("*.safetensors")))
    fds = [r._fd for r in cache.source._readers.values()]
    assert len(fds) == len(opened) and all(fd >= 0 for fd in fds)
    cache.source.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_replaced_shard_is_refused_until_the_source_is_reopened(ckpt, tmp_path):
    """A shard rewritten under a running cache (a new file at the same path) is not read at the old header's
    offsets: the next read raises naming the shard; after `close()` the new file's header is parsed and read
    as it is now (here a copy with layer 1's expert 2 gate zeroed in place)."""
    folder = shutil.copytree(ckpt, tmp_path / "ckpt")
    cache = _bound(folder, 2)
    _serve(cache, 1, [2, 3])
    src = cache.source
    shard, info = src.info("model.layers.1.mlp.experts.2.gate_proj.weight")
    data = bytearray((folder / shard).read_bytes())
    data[info.start:info.end] = bytes(info.nbytes)
    (folder / shard).unlink()
    (folder / shard).write_bytes(bytes(data))
    _serve(cache, 0, [0, 1])          # evicts (1, 2) and (1, 3)
    with pytest.raises(Q3LabError, match=f"{shard}: changed since its header was read"):
        _serve(cache, 1, [2])
    src.close()
    gate, up, down = _serve(cache, 1, [2])[0]
    want = _source_expert(ckpt, 1, 2)
    assert torch.count_nonzero(gate) == 0 and torch.equal(up, want[1]) and torch.equal(down, want[2])
