"""On CUDA (skipped elsewhere): the offloaded decoder's prefetch (copies on the copy stream, not waited for at
issue), host-computed misses and reconfigured residencies inside captured segment graphs, against the resident
StaticDecoder.

Run on a GPU machine: python -m pytest -q tests/gpu/test_offload_gpu.py
"""
from __future__ import annotations

import pytest
import torch

import q3lab
from q3lab.fast.decoders import DeviceExpertCache, OffloadedDecoder, StaticDecoder
from q3lab.fast.host_experts import HostExperts, HostSplit
from q3lab.analysis.replay import Replay, uniform_trace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from q3lab.weights.synthetic import synth
    return synth(tmp_path_factory.mktemp("gpuoff") / "ckpt", "medium", seed=2, layers=3, dtype="fp32",
                 progress=False)


def _setup(ckpt, dtype):
    model = q3lab.load(ckpt, dtype=dtype, device="cuda")
    p = model.experts_provider
    host = [t.cpu().pin_memory() for t in (p.gate, p.up, p.down)]
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1)).cuda()
    return model, host, ids


@pytest.mark.parametrize("fused", [False, True])
def test_prefetch_graphs_bit_equal_to_resident(fused, ckpt):
    model, host, ids = _setup(ckpt, torch.bfloat16)
    want = StaticDecoder(model, 64, fused=fused).generate(ids, 40)
    cache = DeviceExpertCache(*host, capacity=30, device="cuda")
    off = OffloadedDecoder(model, 64, cache, fused=fused, prefetch=True,
                           host_experts=HostExperts(*host), host_split=HostSplit(3, cache.expert_bytes, 1e10, 1.0))
    off.host_split = None                        # host path captured, not used: still bit-equal
    got = off.generate(ids, 40)
    assert torch.equal(got, want)
    st = cache.stats()
    assert st["prefetch_loads"] > 0 and st["misses"] > 0
    # another residency on the same slab, same graphs
    cache.reconfigure(12, policy="lfu")
    assert torch.equal(off.generate(ids, 40), want)


def test_host_computed_misses_on_cuda_keep_greedy_tokens(ckpt):
    model, host, ids = _setup(ckpt, torch.float32)
    res = StaticDecoder(model, 64)
    want = res.generate(ids, 30)
    cache = DeviceExpertCache(*host, capacity=20, device="cuda")
    split = HostSplit(3, cache.expert_bytes, 1e6, 1e-9, max_host=4)       # host "free": up to 4 per layer
    off = OffloadedDecoder(model, 64, cache, host_experts=HostExperts(*host), host_split=split)
    got = off.generate(ids, 30)
    assert off.offload_stats().host_experts.sum() > 30
    assert torch.equal(got, want)
    err = ((off.cache.k - res.cache.k).norm() / res.cache.k.norm()).item()
    assert err < 1e-4
    # the host split off on the same decoder (its graphs): no stale host outputs read
    off.host_split = None
    assert torch.equal(off.generate(ids, 30), want)


def test_replay_with_prefetch_on_cuda_counts_like_cpu(ckpt):
    """The replayed run's hits on CUDA equal the same run on CPU tensors (the residency does not depend on
    where the slab lives or on the copies being asynchronous)."""
    model, host, ids = _setup(ckpt, torch.bfloat16)
    c = model.config
    tr = uniform_trace(1, 20, c.num_hidden_layers, c.num_experts, c.num_experts_per_tok, seed=3)
    tr.predicted = tr.experts.copy()
    out = []
    for dev in ("cuda", "cpu"):
        m = q3lab.load(ckpt, dtype=torch.bfloat16, device=dev)
        hs = host if dev == "cuda" else [t.clone() for t in host]
        cache = DeviceExpertCache(*hs, capacity=24, device=dev)
        off = OffloadedDecoder(m, 64, cache, prefetch=True)
        off.prefill(ids.to(dev))
        cache.reset_stats()
        off.route_override = Replay(tr, 0)
        for _ in range(15):
            off.step()
        out.append(cache.layer_stats()[["hits", "misses", "prefetch_loads", "prefetch_hits"]].to_numpy().tolist())
    assert out[0] == out[1]


def test_c_host_kernel_and_gpu_phase_profile_on_cuda(ckpt):
    """The C host kernel builds on this host and serves the CUDA decoder (greedy tokens equal to resident,
    float32); the per-phase profile with CUDA events has every phase, the GPU ones positive."""
    model, host, ids = _setup(ckpt, torch.float32)
    want = StaticDecoder(model, 64).generate(ids, 20)
    hx = HostExperts(*host, kernel="c")
    cache = DeviceExpertCache(*host, capacity=20, device="cuda")
    split = HostSplit(3, cache.expert_bytes, 1e6, 1e-9, max_host=4)
    off = OffloadedDecoder(model, 64, cache, host_experts=hx, host_split=split)
    off.profile_phases(gpu=True)
    got = off.generate(ids, 20)
    assert torch.equal(got, want) and off.offload_stats().host_experts.sum() > 10
    df = off.phase_frame().set_index("phase")
    assert set(OffloadedDecoder.PHASES) | set(OffloadedDecoder.GPU_PHASES) == set(df.index)
    assert (df.loc[["gpu_pre", "gpu_moe", "host", "sync"], "ms_per_token"] > 0).all()
    assert off.phase_steps == 19        # generate's steps after the prefill's token
