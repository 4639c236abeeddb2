"""On CUDA (skipped elsewhere): the LAYER kernel set's Triton kernels (issue 15) against their torch twins, also
replayed in a CUDA graph (the router kernel's last-program top-k relies on an atomic counter), and decoders on the
LAYER set against the eager model, the offloaded one bit-equal to the resident one.

Run on a GPU machine: python -m pytest -q tests/gpu
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import q3lab
from q3lab.kernels import triton_decode as dk
from q3lab.runtime import step
from q3lab.fast.decoders import DeviceExpertCache, OffloadedDecoder, StaticDecoder
from q3lab.runtime.recording import record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
triton = pytest.importorskip("triton")


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,K", [(5120, 2048), (2048, 4096), (40, 1024)])
def test_gemv_matches_twin(dtype, N, K):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(K, generator=g, device="cuda").to(dtype)
    w = (torch.randn(N, K, generator=g, device="cuda") * 0.02).to(dtype)
    r = torch.randn(N, generator=g, device="cuda").to(dtype)
    torch.testing.assert_close(dk.gemv_triton(x, w), dk.gemv_torch(x, w), **_tol(dtype))
    torch.testing.assert_close(dk.gemv_triton(x, w, r), dk.gemv_torch(x, w, r), **_tol(dtype))
    for cfg in (dict(block_n=1, block_k=512, num_warps=2), dict(block_n=8, block_k=256, num_warps=8)):
        torch.testing.assert_close(dk.gemv_triton(x, w, r, **cfg), dk.gemv_torch(x, w, r), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [2048, 1024, 96])
def test_residual_norm_matches_twin(dtype, D):
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(D, generator=g, device="cuda").to(dtype)
    y = torch.randn(8, D, generator=g, device="cuda") * 0.3
    ln = (1 + 0.1 * torch.randn(D, generator=g, device="cuda")).to(dtype)
    for yy in (y, None):
        for a, b in zip(dk.residual_norm_triton(x, yy, ln, 1e-6), dk.residual_norm_torch(x, yy, ln, 1e-6)):
            # bf16: the float32 sum of 8 in another order can round the other way (one unit in the last place)
            torch.testing.assert_close(a.float(), b.float(), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_route_matches_twin_in_a_graph(dtype):
    """48 calls (one per layer) captured in one graph and replayed 3 times with new inputs: every call's top-k equals
    the torch top-k of that call's own logits (the arrival counter orders the last program after all others), and
    the norm and logits agree with the twin's to rounding."""
    E, D, A, L = 128, 2048, 8, 48
    g = torch.Generator(device="cuda").manual_seed(1)
    xs = torch.randn(L, D, generator=g, device="cuda").to(dtype)
    ln = (1 + 0.1 * torch.randn(D, generator=g, device="cuda")).to(dtype)
    wr = (torch.randn(L, E, D, generator=g, device="cuda") * 0.02).to(dtype)
    outs = [dk.norm_route_triton(xs[i], ln, 1e-6, wr[i], A, True) for i in range(L)]       # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [dk.norm_route_triton(xs[i], ln, 1e-6, wr[i], A, True) for i in range(L)]
    for rep in range(3):
        xs.copy_(torch.randn(L, D, generator=g, device="cuda").to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        for i, (h, logits, ids, w) in enumerate(outs):
            h2, l2, i2, w2 = dk.norm_route_torch(xs[i], ln, 1e-6, wr[i], A, True)
            torch.testing.assert_close(h.float(), h2.float(), **_tol(dtype))
            torch.testing.assert_close(logits, l2, **_tol(dtype))
            pr = torch.softmax(logits, -1)
            i3, w3 = dk.topk_renorm_torch(pr, A, True, dtype)
            # bf16-rounded logits tie often; torch.topk orders ties arbitrarily, the kernel by lower index
            assert ids.tolist() == i3.tolist() or torch.equal(pr[ids], pr[i3]), (rep, i)
            torch.testing.assert_close(w.float(), w3.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                       atol=1e-6)
    assert (dk._counter(xs.device) == 0).all()
    # the two top-k variants (ranks at once / rounds of max-and-mask) choose the same, also on exact ties
    wr[:, 5] = wr[:, 3]
    wr[:, 9] = wr[:, 3]
    for i in range(L):
        a = dk.norm_route_triton(xs[i], ln, 1e-6, wr[i], A, True, rank_topk=True)
        for cfg in (dict(rank_topk=False), dict(rank_topk=True, num_warps=1, block_e=1),
                    dict(rank_topk=True, num_warps=8, block_e=8)):
            b = dk.norm_route_triton(xs[i], ln, 1e-6, wr[i], A, True, **cfg)
            assert torch.equal(a[2], b[2]), (i, cfg)
            # another warp count sums the softmax in another order: the last bit of a float32 weight may move
            torch.testing.assert_close(a[3].float(), b[3].float(), rtol=1e-6 if dtype == torch.float32 else 8e-3,
                                       atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,K,hd,S", [(32, 4, 128, 129), (16, 4, 64, 200), (32, 4, 128, 3000)])
def test_qkv_attend_matches_twin(dtype, H, K, hd, S):
    g = torch.Generator(device="cuda").manual_seed(2)
    qkv = torch.randn((H + 2 * K) * hd, generator=g, device="cuda").to(dtype)
    qkn = (1 + 0.1 * torch.randn(H + K, hd, generator=g, device="cuda")).to(dtype)
    ang = torch.rand(hd // 2, generator=g, device="cuda") * 3
    cos = torch.cat([ang.cos(), ang.cos()]).to(dtype)
    sin = torch.cat([-ang.sin(), ang.sin()]).to(dtype)
    kc, vc = (torch.randn(K, S, hd, generator=g, device="cuda").to(dtype) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    slot = torch.tensor([S // 2 + 3], device="cuda")
    bias = torch.where(torch.arange(S, device="cuda") <= slot, 0.0, float("-inf")).to(dtype)
    a = dk.qkv_attend_triton(qkv, qkn, cos, sin, kc, vc, slot, bias, hd ** -0.5, 1e-6, H, K)
    b = dk.qkv_attend_torch(qkv, qkn, cos, sin, kc2, vc2, slot, bias, hd ** -0.5, 1e-6, H, K)
    torch.testing.assert_close(kc, kc2, **_tol(dtype))
    assert torch.equal(vc, vc2)
    torch.testing.assert_close(a, b, **_tol(dtype))
    for cfg in (dict(block_s=32, num_warps=4), dict(block_s=128, num_warps=8), dict(block_s=32, split=4),
                dict(block_s=64, split=2)):
        c = dk.qkv_attend_triton(qkv, qkn, cos, sin, kc.clone(), vc.clone(), slot, bias, hd ** -0.5, 1e-6, H, K, **cfg)
        torch.testing.assert_close(c, b, **_tol(dtype))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from q3lab.weights.synthetic import synth
    return synth(tmp_path_factory.mktemp("gpu_layer") / "ckpt", "medium", seed=2, layers=2, dtype="fp32",
                 progress=False)


@pytest.mark.parametrize("compile", [False, True])
def test_layer_set_decoder_matches_eager(ckpt, compile):
    model = q3lab.load(ckpt, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1)).cuda()
    plain = StaticDecoder(model, 40, fused="layer", cuda_graph=False)
    graph = StaticDecoder(model, 40, fused="layer", cuda_graph=True, compile=compile)
    assert graph.kernels is step.LAYER
    a, b = plain.generate(ids, 16), graph.generate(ids, 16)
    if not compile:
        assert a.tolist() == b.tolist()
    graph._ready()
    first = graph.prefill(ids).argmax(-1)
    cache = model.new_cache(1, 40)
    model(ids, cache=cache)
    want = model(first[:, None], cache=cache, last_only=True)[0, -1]
    graph.tok.copy_(first)
    graph.step()
    got = graph.logits[0]
    assert (got - want).abs().max().item() < 3e-2 * want.abs().max().item()
    # the fused set's step against the Triton set's on the same state: close logits
    other = StaticDecoder(model, 40, fused=True, cuda_graph=True)
    other.prefill(ids)
    other.tok.copy_(first)
    other.step()
    assert (other.logits[0] - got).abs().max().item() < 3e-2 * got.abs().max().item()


def test_layer_set_offloaded_bit_equal_and_recording(ckpt):
    model = q3lab.load(ckpt, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2)).cuda()
    dec = StaticDecoder(model, 48, fused="layer")
    want = dec.generate(ids, 24)
    with record(model) as rec:
        got = dec.generate(ids, 24)
    assert got.tolist() == want.tolist()                       # recording changes no token
    ref = StaticDecoder(model, 48, fused="layer", cuda_graph=False)
    with record(model) as rec2:
        ref.generate(ids, 24)
    a, b = rec.to_frame(), rec2.to_frame()
    assert len(a) == len(b) > 0
    assert a["expert"].tolist() == b["expert"].tolist()
    assert np.abs(a["weight"].to_numpy() - b["weight"].to_numpy()).max() == 0
    p = model.experts_provider
    host = [t.cpu().pin_memory() for t in (p.gate, p.up, p.down)]
    cache = DeviceExpertCache(*host, capacity=40, device="cuda")
    off = OffloadedDecoder(model, 48, cache, fused="layer")
    assert off.generate(ids, 24).tolist() == want.tolist()
    assert cache.stats()["misses"] > 0


def test_pdl_graph_decodes_the_same_tokens(ckpt):
    """Programmatic dependent launch changes when kernels start, not what they compute: the LAYER decoder captured
    with PDL gives the tokens, logits and KV cache of the one without, bit for bit (a missing wait would race)."""
    model = q3lab.load(ckpt, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5)).cuda()
    want_dec = StaticDecoder(model, 64, fused="layer")
    want = want_dec.generate(ids, 40)
    try:
        dk.PDL = True
        dec = StaticDecoder(model, 64, fused="layer")
        for _ in range(3):
            assert dec.generate(ids, 40).tolist() == want.tolist()
        assert torch.equal(dec.logits, want_dec.logits)
        assert torch.equal(dec.cache.k, want_dec.cache.k)
        # the kernels alone, PDL-launched back to back in a graph, against their twins
        g = torch.Generator(device="cuda").manual_seed(6)
        x = torch.randn(2048, generator=g, device="cuda").bfloat16()
        w = (torch.randn(5120, 2048, generator=g, device="cuda") * 0.02).bfloat16()
        w2 = (torch.randn(2048, 5120, generator=g, device="cuda") * 0.02).bfloat16()
        run = lambda: dk.gemv_triton(dk.gemv_triton(x, w), w2, x)  # noqa: E731
        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        graph.replay()
        torch.testing.assert_close(out, dk.gemv_torch(dk.gemv_torch(x, w), w2, x), rtol=3e-2, atol=3e-2)
    finally:
        dk.PDL = False
