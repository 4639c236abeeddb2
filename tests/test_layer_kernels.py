"""The fused layer kernel set (issue 15, `step.LAYER`, `decode_kernels` gemv / qkv_attend / norm_route): the torch
twins compute what the step's composed functions compute (on the CPU, where CI runs), and a decoder on the LAYER
set decodes the eager model's greedy tokens in fp32. The Triton kernels themselves are checked against these twins
on CUDA in tests/gpu."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import q3lab
from q3lab.kernels import triton_decode as dk
from q3lab.runtime import step
from q3lab.errors import InputError
from q3lab.fast.decoders import StaticDecoder
from q3lab.runtime.thinker import mrope_freqs, rope_cos_sin

ROOT = Path(__file__).resolve().parent.parent


def _rope_row(hd: int, pos: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = pos * inv
    cos = torch.cat([ang.cos(), ang.cos()]).to(dtype)
    sin = torch.cat([-ang.sin(), ang.sin()]).to(dtype)              # sign-folded, as rope_cos_sin
    return cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_attend_twin_equals_the_step_functions(dtype):
    """The twin = step.qkv's norms + rotary, step.kv_write at a device slot, then attention over the masked cache
    (SDPA with the same float bias) — in bf16 the same ops in the same order, bit for bit."""
    g = torch.Generator().manual_seed(0)
    H, K, hd, S, D, slot = 8, 2, 16, 12, 32, 5
    w = step.LayerWeights(ln1=None, wq=(torch.randn(H * hd, D, generator=g) * 0.2).to(dtype),
                          wk=(torch.randn(K * hd, D, generator=g) * 0.2).to(dtype),
                          wv=(torch.randn(K * hd, D, generator=g) * 0.2).to(dtype),
                          qk_norm=(1 + 0.1 * torch.randn(H + K, hd, generator=g)).to(dtype), wo=None, ln2=None,
                          router=None)
    w = w._replace(qkv=torch.cat([w.wq, w.wk, w.wv]))
    d = step.Dims(H, K, hd, 2, 1e-6, True)
    h = torch.randn(1, 1, D, generator=g).to(dtype)
    cos, sin = _rope_row(hd, 7, dtype)
    kc, vc = (torch.randn(1, K, S, hd, generator=g).to(dtype) for _ in range(2))
    bias = torch.where(torch.arange(S) <= slot, 0.0, float("-inf")).to(dtype)
    at = torch.tensor([slot])
    # the composed step (torch set)
    q, k, v = step.qkv(h, w, d, step.Rope(cos.view(1, 1, 1, hd), sin.view(1, 1, 1, hd)))
    kc1, vc1 = kc.clone(), vc.clone()
    kk, vv = step.kv_write(step.KV(kc1, vc1, at, bias.view(1, 1, 1, S)), k, v)
    want = step.attend_torch(q, kk, vv, bias.view(1, 1, 1, S)).view(H, hd)
    # the twin, from the one projection
    kc2, vc2 = kc[0].clone(), vc[0].clone()
    got = dk.qkv_attend_torch(dk.gemv_torch(h.view(-1), w.qkv), w.qk_norm, cos, sin, kc2, vc2, at, bias,
                              hd ** -0.5, d.eps, H, K)
    assert torch.equal(kc2, kc1[0]) and torch.equal(vc2, vc1[0])     # the same cache write, bit for bit
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)                      # SDPA vs the explicit softmax: rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_route_and_gemv_twins_equal_the_step(dtype):
    g = torch.Generator().manual_seed(1)
    D, E, A = 48, 16, 4
    x = torch.randn(D, generator=g).to(dtype)
    ln = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    wr = (torch.randn(E, D, generator=g) * 0.3).to(dtype)
    h, logits, ids, w = dk.norm_route_torch(x, ln, 1e-6, wr, A, True)
    h2 = step.rms_norm(x[None], ln, 1e-6)
    l2, i2, w2 = step.route_torch(h2, wr, A, True)
    assert torch.equal(h, h2[0]) and torch.equal(ids, i2[0]) and torch.equal(w, w2[0])
    assert torch.equal(logits, l2[0].float())
    # weights sum to one after renormalisation, descending
    assert abs(w.float().sum().item() - 1) < 1e-2 and (w[:-1] >= w[1:]).all()
    y = torch.randn(4, D, generator=g) * 0.3                                  # previous experts, float32
    x1, h1 = dk.residual_norm_torch(x, y, ln, 1e-6)
    x2 = x[None] + y[None].sum(1).to(dtype)                                    # step.attend_route's entry
    assert torch.equal(x1, x2[0]) and torch.equal(h1, step.rms_norm(x2, ln, 1e-6)[0])
    assert torch.equal(dk.residual_norm(x, None, ln, 1e-6)[1], step.rms_norm(x, ln, 1e-6))
    wo = (torch.randn(24, D, generator=g) * 0.3).to(dtype)
    res = torch.randn(24, generator=g).to(dtype)
    assert torch.equal(dk.gemv_torch(x, wo, res), res + F.linear(x, wo))
    assert torch.equal(dk.gemv(x, wo, res), res + F.linear(x, wo))          # off CUDA: the twin


def test_layer_set_decoder_equals_eager_in_fp32():
    model = q3lab.load(ROOT / "data" / "mini", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size - 12, (1, 7), generator=torch.Generator().manual_seed(3))
    want = model.generate(ids, 12)
    dec = StaticDecoder(model, 24, fused="layer")
    assert dec.kernels is step.LAYER
    assert dec.generate(ids, 12).tolist() == want.tolist()
    with pytest.raises(InputError, match="fused must be"):
        StaticDecoder(model, 24, fused="everything")


def test_layer_set_step_falls_back_to_the_composed_step():
    """On the CPU the LAYER set's fused entries fall back to the composed functions: attend_route gives the
    TORCH set's numbers on the decoders' fixed-shape state."""
    model = q3lab.load(ROOT / "data" / "mini", dtype=torch.float32)
    c = model.config
    d = step.Dims.of(c)
    lay = model.model.layers[0].weights()
    lay = lay._replace(qkv=torch.cat([lay.wq, lay.wk, lay.wv]))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, c.hidden_size, generator=g)
    y_prev = torch.randn(1, c.num_experts_per_tok, c.hidden_size, generator=g) * 0.1
    S = 10
    pos = torch.arange(S)[None, None].expand(3, 1, S)
    cos, sin = rope_cos_sin(mrope_freqs(pos, model.inv_freq, c.mrope_section, c.mrope_interleaved), torch.float32)
    rope = step.Rope(cos[0, 0, 4].view(1, 1, 1, -1), sin[0, 0, 4].view(1, 1, 1, -1))
    bias = torch.where(torch.arange(S) <= 4, 0.0, float("-inf")).view(1, 1, 1, S)
    outs = []
    for ks in (step.TORCH, step.LAYER):
        k = torch.randn(1, c.num_key_value_heads, S, c.head_dim, generator=torch.Generator().manual_seed(5))
        v = k.flip(-1).clone()
        outs.append(step.attend_route(x, y_prev, lay, d, rope, step.KV(k, v, torch.tensor([4]), bias), ks) + (k, v))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
