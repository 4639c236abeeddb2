"""Offloading on CPU tensors: routing replay, every policy on the device cache against cachesim, per-layer
capacities, prefetch, warm-up, and experts computed on the host against the resident decoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import q3lab
from q3lab.analysis.cachesim import replay as sim_replay, simulate
from q3lab.errors import InputError
from q3lab.fast.decoders import DeviceExpertCache, OffloadedDecoder, StaticDecoder
from q3lab.fast.host_experts import HostExperts, HostSplit
from q3lab.runtime.residency import Residency
from q3lab.analysis.replay import (Replay, RoutingTrace, access_frame, belady_hit_rate, capacities_from_trace, decode_keys,
                          load_trace, lru_stack_hits, uniform_trace)
from q3lab.runtime.step import moe_torch

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "bench" / "data" / "mini128_heldout_routing.npz"


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    from q3lab.weights.synthetic import synth
    return synth(tmp_path_factory.mktemp("offl") / "ckpt", "small", seed=3, progress=False)


def _prompt(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _load(ckpt, dtype):
    """The model, with its resident experts kept aside (an OffloadedDecoder replaces the model's provider)."""
    model = q3lab.load(ckpt, dtype=dtype)
    p = model.experts_provider
    model.host_experts_ = (p.gate, p.up, p.down)
    return model


def _cache(model, capacity, **kw) -> DeviceExpertCache:
    return DeviceExpertCache(*model.host_experts_, capacity=capacity, device="cpu", **kw)


def _decode_log(model, cache, trace, steps, prompt, **kw):
    """Prefill, then `steps` decode steps replaying sequence 0 of `trace`; returns the decoder."""
    off = OffloadedDecoder(model, 64, cache, **kw)
    off.prefill(prompt)
    cache.reset_stats()
    off.route_override = Replay(trace, 0)
    for _ in range(steps):
        off.step()
    return off


def test_committed_trace_is_the_real_topology():
    tr = load_trace(TRACE)
    S, T, L, A = tr.shape
    assert (L, A, tr.num_experts) == (48, 8, 128) and S >= 3 and T >= 640
    assert tr.predicted is not None and tr.weights is not None
    # every token's top-8 are 8 distinct experts; weights are renormalised (sum 1 within the 1/255 steps)
    assert (np.sort(tr.experts, -1)[..., 1:] != np.sort(tr.experts, -1)[..., :-1]).all()
    assert np.allclose(tr.weights.sum(-1), 1.0, atol=8 / 255)
    # Belady's optimum bounds LRU on the same trace and capacity
    lru = belady_hit_rate(tr.experts[0, :80], 983, 60, "lru")
    opt = belady_hit_rate(tr.experts[0, :80], 983, 60)
    assert 0 < lru < opt <= 1


def test_replay_serves_the_trace_and_every_policy_matches_cachesim(small_ckpt):
    """The decoder under a Replay asks the cache for the trace's experts, in decode order; for every policy the
    whole run's access log (prefill included) replayed by cachesim gives the live cache's hits exactly."""
    model = _load(small_ckpt, torch.float32)
    c = model.config
    L, E, A = c.num_hidden_layers, c.num_experts, c.num_experts_per_tok
    tr = uniform_trace(1, 12, L, E, A, seed=4)
    steps = 10
    want = decode_keys(tr.experts[0, :steps])
    prompt = _prompt(c.vocab_size, 5)

    def run(policy, **kw):
        cache = _cache(model, 40, policy=policy, log_accesses=True, **kw)
        off = OffloadedDecoder(model, 64, cache)
        off.prefill(prompt)
        n_prefill = len(cache.access_log())
        off.route_override = Replay(tr, 0)
        for _ in range(steps):
            off.step()
        return cache, off, n_prefill

    first, _, _ = run("lru")
    full_trace = first.trace()                             # the run's accesses: what belady needs
    pins = [(layer, e) for layer in range(L) for e in range(3)]
    for policy, kw in (("lru", {}), ("lfu", {}), ("score", {}), ("belady", {"trace": full_trace}),
                       ("lru", {"pinned": pins})):
        cache, off, n_prefill = run(policy, **kw)
        log = cache.access_log()
        dec = log.iloc[n_prefill:]
        assert list(zip(dec.layer, dec.expert)) == want                  # the trace's experts, in decode order
        assert off.route_override.token == steps
        sim = simulate(log, [40], policies=[policy], pinned=kw.get("pinned"))
        assert int(sim.hits.iloc[0]) == cache.stats()["hits"], (policy, kw.keys())
        assert sim_replay(log, 40, policy, pinned=kw.get("pinned")).hit.tolist() == log.hit.tolist()


def test_policies_on_cold_device_cache_equal_simulate(small_ckpt):
    """From an empty cache: cachesim.simulate(cache.access_log()) gives the live hits for each policy."""
    model = _load(small_ckpt, torch.float32)
    c = model.config
    L, E, A = c.num_hidden_layers, c.num_experts, c.num_experts_per_tok
    tr = uniform_trace(1, 6, L, E, A, seed=9)
    keys = decode_keys(tr.experts[0])
    seq = access_frame(tr.experts[0], tr.weights[0])
    for policy in ("lru", "lfu", "score", "belady"):
        cache = _cache(model, 24, policy=policy, trace=keys if policy == "belady" else None, log_accesses=True)
        for g, part in seq.groupby("group", sort=False):
            cache.slots(int(part.layer.iloc[0]), part.expert.tolist(), part.weight.tolist())
        got = simulate(cache.access_log(), [24], policies=[policy])
        assert int(got.hits.iloc[0]) == cache.stats()["hits"], policy
        # and the slots hold the right experts
        for (layer, e) in cache.resident():
            s = cache.residency.slot_of[(layer, e)]
            assert torch.equal(cache.gate[s], model.host_experts_[0][layer, e])


def test_per_layer_capacities_from_a_trace(small_ckpt):
    tr = load_trace(TRACE)
    ex = tr.experts[0, :96]
    # LRU stack distances: a per-layer LRU's hits at every capacity at once, without the live cache's
    # protection of a group's pending experts (which only helps): exact when everything fits, a lower bound below
    hits = lru_stack_hits(ex, 128)
    for cap in (8, 24, 128):
        sim = sim_replay(access_frame(ex), cap, "lru", per_layer=True)
        per = sim.groupby("layer")["hit"].sum().to_numpy()
        assert (hits[:, cap - 1] <= per).all() and (cap < 128 or (hits[:, cap - 1] == per).all())
    assert (np.diff(hits, axis=1) >= 0).all()
    caps = capacities_from_trace(ex, 983, step=4)
    assert sum(caps) == 983 and min(caps) >= 16 and max(caps) > min(caps)
    # the allocation beats the uniform split on the trace it came from (per-layer LRU)
    uniform = sim_replay(access_frame(ex), 983 // 48, "lru", per_layer=True)["hit"].mean()
    adaptive = sim_replay(access_frame(ex), caps, "lru", per_layer=True)["hit"].mean()
    assert adaptive > uniform
    # a live device cache with per-layer capacities equals the simulator
    model = _load(small_ckpt, torch.float32)
    L = model.config.num_hidden_layers
    small_caps = [4 + (layer % 3) for layer in range(L)]
    cache = _cache(model, small_caps, per_layer=True, log_accesses=True)
    assert cache.residency.num_slots == sum(small_caps)
    u = uniform_trace(1, 8, L, model.config.num_experts, model.config.num_experts_per_tok, seed=2)
    for g, part in access_frame(u.experts[0]).groupby("group", sort=False):
        cache.slots(int(part.layer.iloc[0]), part.expert.tolist())
    sim = sim_replay(cache.access_log(), small_caps, "lru", per_layer=True)
    assert sim.hit.tolist() == cache.access_log().hit.tolist()
    assert all(cache.residency.in_layer[layer] <= small_caps[layer] for layer in range(L))
    with pytest.raises(InputError, match="per_layer"):
        _cache(model, small_caps)


def test_warm_leaves_the_decoded_state(small_ckpt):
    model = _load(small_ckpt, torch.float32)
    c = model.config
    L, E, A = c.num_hidden_layers, c.num_experts, c.num_experts_per_tok
    tr = uniform_trace(1, 5, L, E, A, seed=1)
    groups = [(layer, tr.experts[0, t, layer].tolist(), None) for t in range(5) for layer in range(L)]
    a, b = _cache(model, 30), _cache(model, 30)
    n = a.warm(groups)
    for layer, experts, _ in groups:
        b.slots(layer, experts)
    assert a.resident() == b.resident() and n == 30
    for key in a.resident():
        s = a.residency.slot_of[key]
        assert torch.equal(a.down[s], model.host_experts_[2][key[0], key[1]])
    assert a.stats()["misses"] == 0


def test_prefetch_is_bit_equal_and_a_perfect_guess_leaves_only_layer0_misses(small_ckpt):
    model = _load(small_ckpt, torch.bfloat16)
    c = model.config
    L, E, A = c.num_hidden_layers, c.num_experts, c.num_experts_per_tok
    ids = _prompt(c.vocab_size, 9, seed=3)
    want = StaticDecoder(model, 48).generate(ids, 20)
    cache = _cache(model, 24)
    off = OffloadedDecoder(model, 48, cache, prefetch=True)
    got = off.generate(ids, 20)
    assert torch.equal(got, want)                          # the guesses only move bytes
    st = off.offload_stats()
    assert st.loc[0, "guessed"] == 0 and (st.loc[1:, "guessed"] == 19 * A).all()
    assert 0 <= st.prediction_accuracy.iloc[1:].min() and st.prediction_accuracy.iloc[1:].max() <= 1
    # replayed routing with the true experts as the guesses: every layer but 0 is prefetched in full
    tr = uniform_trace(1, 10, L, E, A, seed=5)
    tr.predicted = tr.experts.copy()
    cache = _cache(model, 6 * A)
    off = _decode_log(model, cache, tr, 8, ids, prefetch=True)
    ls = cache.layer_stats()
    assert (ls.loc[1:, "misses"] == 0).all() and (ls.loc[0, "misses"] > 0)
    assert (off.offload_stats().prediction_accuracy.iloc[1:] == 1.0).all()
    # what was not resident at a layer >= 1 came in by prefetch: every prefetch load was used
    st = cache.stats()
    assert st["prefetch_loads"] == st["prefetch_hits"] > 0
    # the same with LFU: a fresh guess (count 0) is kept until its layer runs, not evicted first
    cache = _cache(model, 6 * A, policy="lfu")
    _decode_log(model, cache, tr, 8, ids, prefetch=True)
    st = cache.stats()
    assert st["prefetch_loads"] == st["prefetch_hits"] > 0
    assert (cache.layer_stats().loc[1:, "misses"] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_host_experts_match_resident_arithmetic(dtype, tol, small_ckpt):
    model = _load(small_ckpt, dtype)
    gate, up, down = model.host_experts_
    host = HostExperts(gate, up, down, threads=1)
    g = torch.Generator().manual_seed(0)
    for layer in (0, 5):
        h = torch.randn(1, model.config.hidden_size, generator=g).to(dtype)
        ids = torch.tensor([[3, 11, 0, 7]])
        w = torch.softmax(torch.randn(1, 4, generator=g), -1).to(dtype)
        want = moe_torch(h, ids, w, gate[layer], up[layer], down[layer], gather=True)[0]
        got = host.compute(layer, h[0], ids[0].tolist(), w[0].float().tolist())
        err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
        assert err <= tol, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_experts_c_kernel_against_torch_twin_and_float64(dtype, small_ckpt):
    """The C host path against its torch twin and a float64 hand computation of the same experts; compute_sum
    (one C call for all of them) equals the sum of compute's rows to float32 rounding."""
    model = _load(small_ckpt, dtype)
    gate, up, down = model.host_experts_
    c = HostExperts(gate, up, down, threads=2, kernel="c")
    t = HostExperts(gate, up, down, threads=1, kernel="torch")
    assert c.kernel == "c" and t.kernel == "torch" and c.isa() != t.isa()
    g = torch.Generator().manual_seed(1)
    layer, ids = 3, [5, 2, 9]
    h = torch.randn(model.config.hidden_size, generator=g).to(dtype)
    w = torch.softmax(torch.randn(3, generator=g), -1).to(dtype).float().tolist()
    hd = h.double()
    ref = torch.stack([(down[layer, e].double() @ (F.silu(gate[layer, e].double() @ hd) * (up[layer, e].double() @ hd)))
                       * wk for e, wk in zip(ids, w)])
    got_c, got_t = c.compute(layer, h, ids, w), t.compute(layer, h, ids, w)
    rel = lambda a, b: ((a.double() - b).norm(dim=-1) / b.norm(dim=-1)).max().item()  # noqa: E731
    # float32: sums in another order only; bf16: both round the projections, silu, silu * up and each
    # output to bf16 (as the device's kernels do): they differ only where a sum lands across a rounding
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert rel(got_c, ref) <= tol and rel(got_t, ref) <= tol
    assert rel(got_c, got_t.double()) <= (1e-5 if dtype == torch.float32 else 4e-3)
    s = c.compute_sum(layer, h, ids, w)
    assert s.shape == (model.config.hidden_size,)
    assert torch.allclose(s, got_c.sum(0), rtol=1e-5, atol=1e-6 * got_c.abs().max().item())
    assert torch.allclose(t.compute_sum(layer, h, ids, w), got_t.sum(0))
    with pytest.raises(InputError, match="outside"):
        c.compute_sum(layer, h, [0, gate.shape[1]], [0.5, 0.5])


def test_host_experts_fall_back_to_torch_with_a_warning(small_ckpt):
    """float16 experts: the C kernels do not take them; the default warns once and runs the torch twin, an
    explicit kernel='c' raises."""
    from q3lab.kernels.cpu import KernelError
    model = _load(small_ckpt, torch.float32)
    g16 = [x[:2].half() for x in model.host_experts_]
    with pytest.warns(RuntimeWarning, match="float16"):
        host = HostExperts(*g16)
    assert host.kernel == "torch"
    with pytest.raises(KernelError, match="float16"):
        HostExperts(*g16, kernel="c")


def test_phase_profile_sums_to_the_step_and_is_off_by_default(small_ckpt):
    model = _load(small_ckpt, torch.float32)
    c = model.config
    cache = _cache(model, 12)
    off = OffloadedDecoder(model, 48, cache)
    off.prefill(_prompt(c.vocab_size, 5))
    off.step()
    assert off.phase_times is None
    with pytest.raises(InputError, match="profile_phases"):
        off.phase_frame()
    off.profile_phases()
    import time
    t = time.perf_counter()
    for _ in range(3):
        off.step()
    wall = (time.perf_counter() - t) / 3 * 1e3
    df = off.phase_frame()
    assert list(df.phase) == list(OffloadedDecoder.PHASES) and off.phase_steps == 3
    assert 0 < df.ms_per_token.sum() <= wall        # the phases are laps inside the steps
    assert df.set_index("phase").loc["launch_moe", "ms_per_token"] > 0 and abs(df.share.sum() - 1) < 1e-9
    off.profile_phases(False)
    assert off.phase_times is None
    # with the GPU phases: on the CPU the host clock stands in for the events (the frame code is the same)
    off.profile_phases(gpu=True)
    for _ in range(2):
        off.step()
    df = off.phase_frame().set_index("phase")
    assert set(OffloadedDecoder.GPU_PHASES) <= set(df.index)
    assert df.loc["gpu_pre", "ms_per_token"] > 0 and df.loc["gpu_moe", "ms_per_token"] > 0


def test_host_split_from_rates():
    s = HostSplit(4, expert_bytes=9_437_184, link_bytes_per_s=50e9, host_s_per_expert=0.4e-3)
    # link 0.189 ms per expert, host 0.4 ms: of 6 misses, 2 on the host (0.8 ms) beat 1 (0.94) and 3 (1.2)
    assert s.split(0, 6) == 2 and s.split(0, 1) == 0
    s.record(1, 2, 2e-3, 4)       # measured 1 ms per expert on layer 1: fewer go there
    assert s.split(1, 6) == 1 and s.split(0, 6) == 2
    # bias moves the split: host_s x 0.5 = 0.2 ms -> 3 of 6 (0.6 ms) on the host; x 2 = 0.8 ms -> 1
    assert HostSplit(4, 9_437_184, 50e9, 0.4e-3, bias=0.5).split(0, 6) == 3
    assert HostSplit(4, 9_437_184, 50e9, 0.4e-3, bias=2.0).split(0, 6) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_computed_misses_keep_greedy_tokens(dtype, small_ckpt):
    model = _load(small_ckpt, dtype)
    c = model.config
    ids = _prompt(c.vocab_size, 9, seed=7)
    res = StaticDecoder(model, 48)
    want = res.generate(ids, 24)
    cache = _cache(model, 12)
    split = HostSplit(c.num_hidden_layers, cache.expert_bytes, 1e9, 1e-9, max_host=3)
    split.split = lambda layer, misses: min(misses, 3)    # not from timings: the test stays deterministic
    off = OffloadedDecoder(model, 48, cache, host_experts=HostExperts(*model.host_experts_), host_split=split)
    got = off.generate(ids, 24)
    st = off.offload_stats()
    assert st.host_experts.sum() > 50                      # the host path ran
    assert torch.equal(got, want)
    k_err = ((off.cache.k.float() - res.cache.k.float()).norm() / res.cache.k.float().norm()).item()
    assert k_err < (1e-5 if dtype == torch.float32 else 3e-2)
    # host-computed misses are counted as misses but not admitted (nothing copied for them)
    tot = cache.stats()
    assert tot["misses"] >= st.host_experts.sum()
    assert tot["bytes_copied"] == (tot["misses"] - st.host_experts.sum()) * cache.expert_bytes


@pytest.mark.parametrize("policy", ["lru", "lfu", "score"])
def test_per_layer_policies_rank_as_one_policy(policy):
    """Per-layer budgets run one policy per layer (fast victims); hits equal one policy over all keys."""
    from q3lab.runtime.residency import PerLayerPolicy, make_policy
    tr = load_trace(TRACE)
    seq = access_frame(tr.experts[1, :40], tr.weights[1, :40])
    caps = [10 + (layer % 5) * 3 for layer in range(48)]
    runs = []
    for pol in (policy, make_policy(policy)):          # by name: PerLayerPolicy; an instance: one global policy
        res = Residency(caps, layers=48, experts=128, policy=pol, per_layer=True)
        assert isinstance(res.policy, PerLayerPolicy) == isinstance(pol, str)
        hits = []
        for g, part in seq.groupby("group", sort=False):
            layer, experts = int(part.layer.iloc[0]), part.expert.astype(int).tolist()
            res.begin(layer, experts, part.weight.tolist())
            hits.extend(res.access(layer, e)[1] for e in experts)
        runs.append(hits)
    assert runs[0] == runs[1] and 0 < sum(runs[0]) < len(runs[0])


def test_segment_variants_stay_bit_equal(small_ckpt):
    """A decoder built with the predictor and the host path, run with prefetch off and no host split, takes
    the lean segment variants (no predictor, experts without the host's outputs): still bit-equal to the
    resident decoder, as it is with prefetch on."""
    model = _load(small_ckpt, torch.float32)
    c = model.config
    ids = _prompt(c.vocab_size, 7, seed=4)
    want = StaticDecoder(model, 40).generate(ids, 12)
    cache = _cache(model, 10)
    host = HostExperts(*model.host_experts_)
    off = OffloadedDecoder(model, 40, cache, prefetch=True, host_experts=host,
                           host_split=HostSplit(c.num_hidden_layers, cache.expert_bytes, 1e9, 1.0))
    assert ("pre", 0, True) in off._segments() and ("moe", True) in off._segments()
    off.host_split, off.prefetch = None, False
    assert torch.equal(off.generate(ids, 12), want)
    off.prefetch = True
    assert torch.equal(off.generate(ids, 12), want)
    assert cache.stats()["prefetch_loads"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_split_switched_off_leaves_no_host_outputs(dtype, small_ckpt):
    """A generate with host-computed experts, then the same decoder with the host split off: bit-equal to the
    resident decoder (the experts segment without the host's outputs runs; what yh/mask still hold from the
    last host layer is not read). The lead's H200 probe found this broken at 3cd0626 (first diff at step 13)."""
    model = _load(small_ckpt, dtype)
    c = model.config
    ids = _prompt(c.vocab_size, 9, seed=7)
    want = StaticDecoder(model, 48).generate(ids, 24)
    cache = _cache(model, 12)
    split = HostSplit(c.num_hidden_layers, cache.expert_bytes, 1e9, 1e-9, max_host=3)
    split.split = lambda layer, misses: min(misses, 3)
    off = OffloadedDecoder(model, 48, cache, host_experts=HostExperts(*model.host_experts_), host_split=split)
    off.generate(ids, 24)
    assert off.offload_stats().host_experts.sum() > 50 and off._yh_row is not None   # yh holds host work
    off.host_split = None
    assert torch.equal(off.generate(ids, 24), want)


def test_direct_copy_plan_addresses_on_cpu(small_ckpt, monkeypatch):
    """The direct-driver copy path (CUDA: cuMemcpyHtoDAsync per tensor of an expert) with memmove standing in
    for the driver on CPU tensors: the byte offsets of experts and slots are right (decode bit-equal to the
    resident decoder) and the issue order is the one the CUDA path uses."""
    import ctypes
    model = _load(small_ckpt, torch.float32)
    c = model.config
    ids = _prompt(c.vocab_size, 9, seed=7)
    want = StaticDecoder(model, 40).generate(ids, 16)
    cache = _cache(model, 12)
    calls = []

    def fake(dst, src, nb, stream):
        ctypes.memmove(dst, src, nb)
        calls.append(nb)
        return 0

    class Stream:
        cuda_stream = 0

        def wait_stream(self, other):
            pass

        def wait_event(self, event):
            pass

    class Event:
        def record(self, stream=None):
            pass
    hosts, slabs = cache.host, (cache.gate, cache.up, cache.down)
    plan = [(h.data_ptr(), d.data_ptr(), h[0, 0].numel() * h.element_size()) for h, d in zip(hosts, slabs)]
    cache._raw, cache.copy_stream = (fake, plan, hosts[0].shape[1]), Stream()
    cache._ev_compute, cache._ev_copy = Event(), Event()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    off = OffloadedDecoder(model, 40, cache)
    n0 = len(calls)
    assert torch.equal(off.generate(ids, 16), want)
    # the decoder's slot ids go through the same path (one small copy a layer), the experts 3 copies each
    experts = sum(1 for nb in calls[n0:] if nb == plan[0][2])
    assert experts == 3 * cache.stats()["bytes_copied"] // cache.expert_bytes > 0
    assert len(calls) - n0 - experts == 15 * c.num_hidden_layers          # 15 decode steps x layers
    # with host-computed experts: mask and outputs too; tokens still those of the resident decoder
    split = HostSplit(c.num_hidden_layers, cache.expert_bytes, 1e9, 1e-9, max_host=3)
    split.split = lambda layer, misses: min(misses, 3)
    offh = OffloadedDecoder(model, 40, cache, host_experts=HostExperts(*model.host_experts_), host_split=split)
    assert torch.equal(offh.generate(ids, 16), want) and offh.offload_stats().host_experts.sum() > 20
