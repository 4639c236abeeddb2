"""q3lab.kernels.cpu: the bf16 decode kernels against float32 math on the same bf16 weights."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

if not (shutil.which("cc") or shutil.which("gcc")):
    pytest.skip("no C compiler: q3lab.kernels.cpu cannot be built here", allow_module_level=True)

from q3lab.kernels.cpu import KernelError, linear_bf16, moe_decode_bf16  # noqa: E402


def test_linear_is_float32_math_rounded_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 300, generator=g).bfloat16()
    w = torch.randn(70, 300, generator=g).bfloat16()
    ref = x.float() @ w.float().T                         # exact products of bf16 values, float32 sums
    y = linear_bf16(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 70)
    # one rounding of a float32 sum (whose order differs from torch's): within one bf16 step of ref
    torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-6)
    assert (y.float() == ref.bfloat16().float()).float().mean() > 0.95


def _moe_ref(h, gate, up, down, ids, wts, act_dtype=torch.bfloat16):
    """float32 math on the weights' values, the activation silu * up rounded to `act_dtype` (what the kernel and
    torch's bf16 experts do before the down projection)."""
    x = h.float()[0]
    return sum(float(wts[a]) * (down[e].float() @ (F.silu(gate[e].float() @ x) * (up[e].float() @ x))
                                .to(act_dtype).float())
               for a, e in enumerate(ids.tolist()))


def test_moe_decode_matches_float32_and_beats_the_bf16_loop():
    g = torch.Generator().manual_seed(1)
    E, I, D = 6, 40, 72
    gate, up = (torch.randn(E, I, D, generator=g) * 0.1).bfloat16(), (torch.randn(E, I, D, generator=g) * 0.1).bfloat16()
    down = (torch.randn(E, D, I, generator=g) * 0.1).bfloat16()
    h = torch.randn(1, D, generator=g).bfloat16()
    ids, wts = torch.tensor([4, 0, 2]), torch.tensor([0.5, 0.3, 0.2]).bfloat16()
    ref = _moe_ref(h, gate, up, down, ids, wts)
    out = moe_decode_bf16(h, gate, up, down, ids, wts)
    assert out.shape == (1, D) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float()[0], ref, rtol=2**-8, atol=1e-5)
    # torch's bf16 loop (what q3lab's half-precision decode computes: rounded after every op) is further off
    loop = sum(F.linear(F.silu(F.linear(h, gate[e])) * F.linear(h, up[e]), down[e]) * wts[a]
               for a, e in enumerate(ids.tolist()))
    assert (out.float()[0] - ref).abs().max() <= (loop.float()[0] - ref).abs().max()


def test_refusals():
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(KernelError, match="expected a contiguous 2-D torch.bfloat16"):
        linear_bf16(torch.zeros(1, 8), w)
    with pytest.raises(KernelError, match=r"expected \[M, K\] and \[N, K\]"):
        linear_bf16(torch.zeros(1, 7, dtype=torch.bfloat16), w)
    gate = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    down = torch.zeros(2, 4, 3, dtype=torch.bfloat16)
    with pytest.raises(KernelError, match=r"expert ids \[0, 2\] outside 0..1"):
        moe_decode_bf16(torch.zeros(1, 4, dtype=torch.bfloat16), gate, gate, down, torch.tensor([0, 2]),
                        torch.ones(2))


# -- float32 kernels and the rest of a one-token layer, against torch on random data ------------------------
from q3lab.kernels import cpu as K  # noqa: E402
from q3lab.runtime import step  # noqa: E402
from q3lab.runtime.step import KV, Rope  # noqa: E402

# Tolerances. float32: the C sums run in another order than torch's (a few float32 ulps of the sum's terms).
# bf16: every op rounds its result to bf16 once, as torch's bf16 ops do; a float32 sum in another order may land
# on the other side of a rounding boundary: one bf16 step (2^-8 relative) on single elements.
F32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=2**-7, atol=1e-2)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_float32_linear_and_moe_match_torch():
    g = _g(2)
    x, w = torch.randn(1, 300, generator=g), torch.randn(70, 300, generator=g)
    torch.testing.assert_close(K.linear(x, w), F.linear(x, w), **F32)
    E, I, D = 6, 40, 72
    gate, up = torch.randn(E, I, D, generator=g) * 0.1, torch.randn(E, I, D, generator=g) * 0.1
    down, h = torch.randn(E, D, I, generator=g) * 0.1, torch.randn(1, D, generator=g)
    ids, wts = torch.tensor([[5, 1, 3]]), torch.tensor([[0.6, 0.3, 0.1]])
    want = step.expert_sum(step.moe_torch(h, ids, wts, gate, up, down), torch.float32)
    got = step.expert_sum(step.moe_cpu(h, ids, wts, gate, up, down), torch.float32)
    assert step.moe_cpu(h, ids, wts, gate, up, down).shape == (1, 1, D)       # summed over A in the kernel
    torch.testing.assert_close(got, want, **F32)
    # bf16 through the kernel set against torch's bf16 experts (both round silu * up to bf16)
    hb, gb, ub, db = h.bfloat16(), gate.bfloat16(), up.bfloat16(), down.bfloat16()
    want = step.expert_sum(step.moe_torch(hb, ids, wts.bfloat16(), gb, ub, db), torch.bfloat16)
    got = step.expert_sum(step.moe_cpu(hb, ids, wts.bfloat16(), gb, ub, db), torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), **BF16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rotate_attend_route_match_torch(dtype):
    tol = F32 if dtype == torch.float32 else BF16
    g = _g(3)
    H, Kv, hd, D, E, A = 8, 2, 32, 96, 16, 4
    x = (torch.randn(1, 1, D, generator=g) * 3).to(dtype)
    ln = torch.randn(D, generator=g).to(dtype)
    torch.testing.assert_close(step.norm_cpu(x, ln, 1e-6).float(), step.rms_norm(x, ln, 1e-6).float(), **tol)
    heads = torch.randn(1, 1, H + Kv, hd, generator=g).to(dtype)
    qkn = torch.randn(H + Kv, hd, generator=g).to(dtype)
    torch.testing.assert_close(step.norm_cpu(heads, qkn, 1e-6).float(), step.rms_norm(heads, qkn, 1e-6).float(),
                               **tol)
    from q3lab.runtime.thinker import mrope_freqs, rope_cos_sin, rope_inv_freq, rope_matrix
    freqs = mrope_freqs(torch.tensor([37])[None, None].expand(3, 1, 1), rope_inv_freq(hd, 1e4), [6, 5, 5])
    cos, sin = rope_cos_sin(freqs, dtype)
    rope = Rope(rope_matrix(cos[0, 0], sin[0, 0]), None)
    torch.testing.assert_close(step.rotate_cpu(heads, rope).float(), step.rotate(heads, rope).float(), **tol)
    # one token over the first S slots of a cache [1, K, max_len, hd] (narrow views, as kv_write returns them)
    ck, cv = torch.randn(1, Kv, 50, hd, generator=g).to(dtype), torch.randn(1, Kv, 50, hd, generator=g).to(dtype)
    q = torch.randn(1, 1, H, hd, generator=g).to(dtype).transpose(1, 2)             # [1, H, 1, hd], strided
    k, v = ck.narrow(2, 0, 23), cv.narrow(2, 0, 23)
    torch.testing.assert_close(step.attend_cpu(q, k, v, None).float(), step.attend_torch(q, k, v, None).float(),
                               **tol)
    h = torch.randn(1, D, generator=g).to(dtype)
    wr = torch.randn(E, D, generator=g).to(dtype)
    for renorm in (True, False):
        lc, ic, wc = step.route_cpu(h, wr, A, renorm)
        lt, it, wt = step.route_torch(h, wr, A, renorm)
        torch.testing.assert_close(lc.float(), lt.float(), **tol)
        assert ic.tolist() == it.tolist()
        torch.testing.assert_close(wc.float(), wt.float(), **tol)
        assert lc.dtype == wc.dtype == dtype and ic.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_one_equals_qkv_and_the_cache_write(dtype):
    tol = F32 if dtype == torch.float32 else BF16
    g = _g(8)
    H, Kv, hd, D, L = 8, 2, 32, 96, 20
    w = step.LayerWeights(None, *(torch.randn(n * hd, D, generator=g).to(dtype) * 0.1 for n in (H, Kv, Kv)),
                          torch.randn(H + Kv, hd, generator=g).to(dtype), None, None, None)
    d = step.Dims(H, Kv, hd, 2, 1e-6, True)
    from q3lab.runtime.thinker import mrope_freqs, rope_cos_sin, rope_inv_freq, rope_matrix
    cos, sin = rope_cos_sin(mrope_freqs(torch.tensor([11])[None, None].expand(3, 1, 1), rope_inv_freq(hd, 1e4),
                                        [6, 5, 5]), dtype)
    rope = Rope(rope_matrix(cos[0, 0], sin[0, 0]), None)
    h = torch.randn(1, 1, D, generator=g).to(dtype)
    ck, cv = torch.randn(2, 1, Kv, L, hd, generator=g).to(dtype)
    kv_c, kv_t = KV(ck.clone(), cv.clone(), 11, None), KV(ck.clone(), cv.clone(), 11, None)
    qc, kc, vc = step.project_cpu(h, w, d, rope, kv_c)
    qt, kt, vt = step.qkv(h, w, d, rope)
    kt, vt = step.kv_write(kv_t, kt, vt)
    assert qc.shape == qt.shape and kc.shape == kt.shape == (1, Kv, 12, hd)
    for a, b in ((qc, qt), (kv_c.k, kv_t.k), (kv_c.v, kv_t.v)):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert torch.equal(kv_c.k[:, :, :11], ck[:, :, :11]) and torch.equal(kv_c.k[:, :, 12:], ck[:, :, 12:])


def test_more_refusals():
    with pytest.raises(KernelError, match="attend_one"):
        K.attend_one(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), 1.0)
    with pytest.raises(KernelError, match="route_one"):
        K.route_one(torch.zeros(1, 8), torch.zeros(4, 8), 5, True)
    with pytest.raises(KernelError, match="float16"):
        K.linear(torch.zeros(1, 8, dtype=torch.float16), torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(KernelError, match=r"expert ids \[0, 7\] outside 0..1"):
        K.moe_decode(torch.zeros(1, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 4, 3),
                     torch.tensor([0, 7]), torch.ones(2))


# -- the kernel set inside Thinker.generate --------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    import hf_reference as R
    path = tmp_path_factory.mktemp("cpuk")
    ref = R.save_full(path, seed=4, layers=3, experts=16, top_k=4, heads=8, kv_heads=2, head_dim=16,
                      mrope_section=(2, 3, 3))
    return ref.thinker, path, ref.config.thinker_config.text_config.vocab_size - 12


def _counting(monkeypatch):
    calls = {}
    for name in ("linear", "moe_decode", "rms_norm_rows", "project_one", "attend_one", "route_one", "layer_one"):
        fn = getattr(K, name)

        def wrapped(*a, _fn=fn, _n=name, **kw):
            calls[_n] = calls.get(_n, 0) + 1
            return _fn(*a, **kw)
        monkeypatch.setattr(K, name, wrapped)
    run = K.LayerCall.run

    def counted_run(self, *a):
        calls["layer_run"] = calls.get("layer_run", 0) + 1
        return run(self, *a)
    monkeypatch.setattr(K.LayerCall, "run", counted_run)   # layer_one's per-step call, checked once per plan
    return calls


def test_generate_on_the_cpu_set_equals_torch_and_transformers_in_float32(hf_ckpt, monkeypatch):
    import q3lab
    from q3lab.weights.checkpoint import Checkpoint
    ref, path, vocab = hf_ckpt
    model = q3lab.load(Checkpoint(path))
    ids = torch.randint(0, vocab, (1, 9), generator=_g(5))
    assert step.kernels_for(model.device, model.dtype, model.config.hidden_size) is step.TORCH   # 64 wide
    plain = model.generate(ids, 30)
    monkeypatch.setattr(step, "CPU_F32_MIN_HIDDEN", 0)           # this tiny model on the C kernels too
    assert step.kernels_for(model.device, model.dtype, model.config.hidden_size) is step.CPU
    calls = _counting(monkeypatch)
    fast = model.generate(ids, 30)
    # every decode step ran each layer in one call: 29 steps x 3 layers; linear: the lm_head per step; the 9-token
    # prompt: q, k, v, o per layer + its last row's lm_head
    assert calls["layer_run"] == 29 * 3 and "moe_decode" not in calls and "project_one" not in calls
    assert calls["layer_one"] == 3                                # its checks, once per layer and plan
    assert calls["linear"] == 29 + 3 * 4 + 1
    want = ref.generate(input_ids=ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert fast.tolist() == plain.tolist() == want.tolist()
    # one decode step's logits: the C kernels against the torch set, float32 rounding apart
    on_c, on_torch, a, b = _one_step_both(model, ids, monkeypatch)
    torch.testing.assert_close(on_c, on_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.k, b.k, **F32)


def _one_step_both(model, ids, monkeypatch):
    """One decode step after the prompt `ids`, on the CPU set and on the torch set, each on its own cache:
    (logits on C, logits on torch, cache of C, cache of torch)."""
    with torch.inference_mode():
        a, b = model.new_cache(1, 12), model.new_cache(1, 12)
        model(ids, cache=a)
        model(ids, cache=b)
        tok = torch.tensor([[7]])
        on_c = model._forward(tok, None, a, None, True, model.plan(step.CPU))
        monkeypatch.setenv("Q3LAB_CPU_KERNELS", "0")
        on_torch = model._forward(tok, None, b, None, True, model.plan(step.TORCH))
    return on_c, on_torch, a, b


def test_bf16_decode_step_on_the_cpu_set_is_close_to_torch(hf_ckpt, monkeypatch):
    import q3lab
    from q3lab.weights.checkpoint import Checkpoint
    _, path, vocab = hf_ckpt
    model = q3lab.load(Checkpoint(path), dtype=torch.bfloat16)
    assert step.kernels_for(model.device, model.dtype, model.config.hidden_size) is step.CPU
    ids = torch.randint(0, vocab, (1, 9), generator=_g(6))
    on_c, on_torch, a, b = _one_step_both(model, ids, monkeypatch)
    # both round every op to bf16, in different orders; logits of size ~1: within a few bf16 steps
    assert (on_c - on_torch).abs().max() < 0.05 * on_torch.abs().max()
    assert on_c.argmax().item() == on_torch.argmax().item()


def test_kernels_for_says_once_when_the_c_kernels_cannot_be_built(monkeypatch):
    monkeypatch.setattr(step, "_CPU_STATE", [])
    monkeypatch.setattr(K, "_LIB", None)

    def fail():
        raise KernelError("q3lab.kernels.cpu needs a C compiler (cc or gcc on PATH, or $CC): none found")
    monkeypatch.setattr(K, "_build", fail)
    with pytest.warns(RuntimeWarning, match="torch kernels run.*needs a C compiler"):
        assert step.kernels_for(torch.device("cpu"), torch.bfloat16, 64) is step.TORCH
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # said once, not at every call
        assert step.kernels_for(torch.device("cpu"), torch.bfloat16, 64) is step.TORCH
    monkeypatch.setenv("Q3LAB_CPU_KERNELS", "0")
    assert step.kernels_for(torch.device("cpu"), torch.bfloat16, 64) is step.TORCH
    assert step.kernels_for(torch.device("meta"), torch.bfloat16, 4096) is step.TORCH


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_short_prompt_through_the_c_kernels_matches_torch(dtype):
    """moe_tokens (experts grouped, each row read once for its tokens) and linear over M rows."""
    tol = F32 if dtype == torch.float32 else BF16
    g = _g(7)
    E, I, D, N, A = 8, 24, 40, 11, 3
    gate, up = (torch.randn(E, I, D, generator=g) * 0.2).to(dtype), (torch.randn(E, I, D, generator=g) * 0.2).to(dtype)
    down, h = (torch.randn(E, D, I, generator=g) * 0.2).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    w, ids = torch.topk(torch.softmax(torch.randn(N, E, generator=g), -1), A)
    w = (w / w.sum(-1, keepdim=True)).to(dtype)
    ids[3] = ids[2]                                               # two tokens with the same experts
    want = step.expert_sum(step.moe_torch(h, ids, w, gate, up, down), dtype)
    got = step.expert_sum(K.moe_tokens(h, gate, up, down, ids, w).unsqueeze(1), dtype)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if dtype == torch.bfloat16:                                   # what the CPU set runs for a bf16 prompt
        assert torch.equal(step.moe_cpu(h, ids, w, gate, up, down)[:, 0], K.moe_tokens(h, gate, up, down, ids, w))
    x, wl = torch.randn(N, 3, 40, generator=g).to(dtype), torch.randn(17, 40, generator=g).to(dtype)
    torch.testing.assert_close(K.linear(x.reshape(-1, 40), wl).float(), F.linear(x.reshape(-1, 40), wl).float(), **tol)
    with pytest.raises(KernelError, match=r"expert ids outside 0..7: \[.*9\]"):
        K.moe_tokens(h, gate, up, down, ids.clamp(max=9) * 0 + 9, w)


# -- a prefill on the CPU set: float32 GEMMs on oneDNN, experts grouped by expert without the big gathers ---------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_prompt_on_the_cpu_set_matches_torch(dtype, monkeypatch):
    """More than CPU_MAX_ROWS tokens: `moe_grouped_cpu` against `moe_torch`'s grouped path. bf16: the same GEMMs
    (F.linear) and the same sum order, so bit-equal; float32: oneDNN's GEMMs sum in another order (F32)."""
    monkeypatch.setattr(step, "CPU_GROUPED_MIN_EXPERT", 0)          # these small bf16 experts too
    g = _g(9)
    E, I, D, N, A = 12, 40, 72, step.CPU_MAX_ROWS + 37, 4
    gate, up = (torch.randn(E, I, D, generator=g) * 0.2).to(dtype), (torch.randn(E, I, D, generator=g) * 0.2).to(dtype)
    down, h = (torch.randn(E, D, I, generator=g) * 0.2).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    logits = torch.randn(N, E, generator=g)
    logits[:, 11] = -30.0                                           # an expert no token picks
    ids, w = step.select(logits, A, True, dtype)
    assert 11 not in ids
    want = step.expert_sum(step.moe_torch(h, ids, w, gate, up, down), dtype)
    got = step.moe_cpu(h, ids, w, gate, up, down)
    assert got.shape == (N, 1, D) and got.dtype == torch.float32
    got = step.expert_sum(got, dtype)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, **F32)
    x, wl = torch.randn(N, 40, generator=g).to(dtype), torch.randn(17, 40, generator=g).to(dtype)
    torch.testing.assert_close(step.linear_cpu(x, wl).float(), F.linear(x, wl).float(), **(F32 if dtype == torch.float32 else BF16))
    if dtype == torch.bfloat16:                                     # gemm is oneDNN for float32 only
        assert torch.equal(K.gemm(x, wl), F.linear(x, wl))


def test_gemm_without_onednn_says_so_once_and_runs_f_linear(monkeypatch):
    monkeypatch.setattr(K, "_ONEDNN", [])
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    x, w = torch.randn(70, 30, generator=_g(10)), torch.randn(9, 30, generator=_g(11))
    with pytest.warns(RuntimeWarning, match="F.linear.*without oneDNN"):
        assert torch.equal(K.gemm(x, w), F.linear(x, w))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(K.gemm(x, w), F.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_call_layer_is_bit_equal_to_the_composed_cpu_set(hf_ckpt, monkeypatch, dtype):
    """step.layer_cpu (cpu_kernels.layer_one: the whole one-token layer in C) against the same set without it
    (step.layer composing norm_cpu, project_cpu, attend_cpu, linear_cpu, route_cpu, moe_cpu): equal logits, caches
    and greedy tokens, and the routing a recorder's sink sees."""
    import dataclasses
    import q3lab
    from q3lab.weights.checkpoint import Checkpoint
    _, path, vocab = hf_ckpt
    monkeypatch.setattr(step, "CPU_F32_MIN_HIDDEN", 0)
    model = q3lab.load(Checkpoint(path), dtype=dtype)
    composed = dataclasses.replace(step.CPU, layer=None)
    ids = torch.randint(0, vocab, (1, 9), generator=_g(12))
    with torch.inference_mode():
        caches, logits = [], []
        for ks in (step.CPU, composed):
            c = model.new_cache(1, 14)
            model(ids, cache=c)
            for tok in (7, 3, 11):
                out = model._forward(torch.tensor([[tok]]), None, c, None, True, model.plan(ks))
            caches.append(c)
            logits.append(out)
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    # the routing handed to a sink equals the composed step's
    plan, seen = model.plan(step.CPU), {}
    w, experts = plan[1]
    d = model.model.layers[0].self_attn.dims
    x = torch.randn(1, 1, model.config.hidden_size, generator=_g(13)).to(dtype)
    from q3lab.runtime.thinker import rope_matrix
    cos, sin = model._rope_table(caches[0], dtype)
    rope = Rope(rope_matrix(cos[0, 12, 0], sin[0, 12, 0]), None)
    outs = []
    for ks, key in ((step.CPU, "fused"), (composed, "composed")):
        kv = KV(caches[0].k[1].clone(), caches[0].v[1].clone(), 12, None)
        outs.append(step.layer(x, w, d, rope, kv, ks, experts, sink=lambda *r, _k=key: seen.__setitem__(_k, r)))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(seen["fused"], seen["composed"]):
        assert torch.equal(a, b)


def test_layer_one_refusals():
    g = _g(14)
    D, H, Kv, hd, E, I = 16, 2, 1, 8, 4, 6
    ws = [torch.randn(*s, generator=g) for s in ((D,), (H * hd, D), (Kv * hd, D), (Kv * hd, D), (H + Kv, hd),
                                                 (D, H * hd), (D,), (E, D), (E, I, D), (E, I, D), (E, D, I))]
    call = K.LayerCall(*ws, Kv, hd, 2, True, 1e-6)
    cache = torch.zeros(1, Kv, 5, hd)
    x, rot = torch.randn(1, 1, D, generator=g), torch.eye(hd)
    out, logits, ids, wts = call.run(x, rot, cache, cache.clone(), 0)
    assert out.shape == (1, 1, D) and ids.shape == (1, 2) and ids.max() < E
    with pytest.raises(KernelError, match=r"slot 5"):
        call.run(x, rot, cache, cache.clone(), 5)
    with pytest.raises(KernelError, match="torch.bfloat16"):
        call.run(x.bfloat16(), rot, cache, cache.clone(), 0)
    bad = list(ws)
    bad[5] = torch.randn(D, H * hd + 1, generator=g)                    # o_proj of the wrong width
    with pytest.raises(KernelError, match=r"layer_one: .*wo \[16, 17\]"):
        K.LayerCall(*bad, Kv, hd, 2, True, 1e-6)


def test_data_mini_float32_decodes_on_the_c_layer_with_the_torch_sets_tokens(monkeypatch):
    """The contract for float32 models of hidden CPU_F32_DECODE_MIN_HIDDEN..CPU_F32_MIN_HIDDEN (data/mini, 96):
    a prefill stays on TORCH (bit-equal to the module path), decode steps run the C layer: greedy tokens equal to
    the torch set's, each step's logits within float32 rounding (1e-5 relative to their scale)."""
    from pathlib import Path
    import q3lab
    model = q3lab.load(Path(__file__).parent.parent / "data" / "mini")
    D = model.config.hidden_size
    assert step.CPU_F32_DECODE_MIN_HIDDEN <= D < step.CPU_F32_MIN_HIDDEN
    assert step.kernels_for(model.device, torch.float32, D) is step.TORCH
    assert step.kernels_for(model.device, torch.float32, D, decode=True) is step.CPU
    assert step.kernels_for(model.device, torch.float32, 64, decode=True) is step.TORCH       # the test models
    ids = torch.randint(0, 4000, (1, 7), generator=_g(15))
    fast = model.generate(ids, 24)
    monkeypatch.setenv("Q3LAB_CPU_KERNELS", "0")
    plain = model.generate(ids, 24)
    assert fast.tolist() == plain.tolist()
    monkeypatch.delenv("Q3LAB_CPU_KERNELS")
    with torch.inference_mode():
        a, b = model.new_cache(1, 12), model.new_cache(1, 12)
        pa, pb = model(ids, cache=a), model(ids, cache=b)
        assert torch.equal(pa, pb)                                  # the prompt: the torch set both times
        tok = torch.tensor([[11]])
        on_c = model._forward(tok, None, a, None, True, model.plan())
        monkeypatch.setenv("Q3LAB_CPU_KERNELS", "0")               # _forward picks the set: torch's here
        on_t = model._forward(tok, None, b, None, True, model.plan())
    assert not torch.equal(on_c, on_t)                              # two sets ran
    torch.testing.assert_close(on_c, on_t, rtol=1e-5, atol=1e-5 * on_t.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_experts_of_a_long_prompt_run_as_one_padded_batch(dtype, monkeypatch):
    """`moe_padded_cpu` (three bmm over all experts, padded to the busiest one) against moe_torch: the same
    roundings, sums in ascending expert; the batched products may sum in another order than one GEMM per expert
    (F32 / BF16 tolerances; equal on this machine). Skewed routing (padding > CPU_PADDED_MAX_WASTE x the work):
    None, and moe_cpu runs moe_torch."""
    g = _g(16)
    E, I, D, N, A = 16, 12, 40, step.CPU_MAX_ROWS + 50, 3
    gate, up = (torch.randn(E, I, D, generator=g) * 0.2).to(dtype), (torch.randn(E, I, D, generator=g) * 0.2).to(dtype)
    down, h = (torch.randn(E, D, I, generator=g) * 0.2).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    logits = torch.randn(N, E, generator=g)
    logits[:, 7] = -30.0                                             # an expert nobody picks: all padding
    ids, w = step.select(logits, A, True, dtype)
    want = step.expert_sum(step.moe_torch(h, ids, w, gate, up, down), dtype)
    got = step.moe_cpu(h, ids, w, gate, up, down)                    # I*D < CPU_GROUPED_MIN_EXPERT: padded
    assert got.shape == (N, 1, D)
    torch.testing.assert_close(step.expert_sum(got, dtype).float(), want.float(),
                               **(F32 if dtype == torch.float32 else BF16))
    torch.testing.assert_close(got, step.moe_padded_cpu(h, ids, w, gate, up, down), rtol=0, atol=0)
    skew = ids.clone()
    skew[:, 0] = 0                                                   # every token in expert 0
    skew[:, 1:] = torch.randint(1, 4, (N, A - 1), generator=g)
    skew[:, 2] = torch.where(skew[:, 2] == skew[:, 1], skew[:, 1] % 3 + 1, skew[:, 2])
    assert step.moe_padded_cpu(h, skew, w, gate, up, down) is None   # 16 x N rows for 3N routed
    monkeypatch.setattr(step, "CPU_PADDED_MAX_WASTE", 100)
    torch.testing.assert_close(step.expert_sum(step.moe_padded_cpu(h, skew, w, gate, up, down), dtype).float(),
                               step.expert_sum(step.moe_torch(h, skew, w, gate, up, down), dtype).float(),
                               **(F32 if dtype == torch.float32 else BF16))


def test_experts_as_halves_of_a_fused_gate_up_decode_on_the_cpu_set(hf_ckpt):
    """Experts whose gate/up are views into one [L, E, 2I, D] tensor (transformers' gate_up_proj layout, as
    `q3lab.oracle.thinker_sharing_weights` binds them) are not what the one-call layer reads: the step composes
    the CPU set's functions for them, with moe_torch for the experts (it raised KernelError before), and decodes
    the contiguous model's tokens."""
    import q3lab
    from q3lab.weights.checkpoint import Checkpoint
    _, path, vocab = hf_ckpt
    ids = torch.randint(0, vocab, (1, 9), generator=_g(21))
    out = []
    for fused in (False, True):
        model = q3lab.load(Checkpoint(path), dtype=torch.bfloat16)
        p = model.experts_provider
        if fused:
            I = p.gate.shape[2]
            both = torch.cat([p.gate, p.up], dim=2)                       # [L, E, 2I, D]
            p.gate, p.up = both[:, :, :I], both[:, :, I:]
            assert not p.gate.is_contiguous()
        with torch.inference_mode():
            c = model.new_cache(1, 12)
            model(ids, cache=c)
            step_logits = model._forward(torch.tensor([[5]]), None, c, None, True, model.plan(step.CPU))
            out.append((model.generate(ids, 6), step_logits))
    assert torch.equal(out[0][0], out[1][0])
    # their experts run moe_torch, the contiguous model's the C kernel: bf16 roundings in other orders, as in
    # test_bf16_decode_step_on_the_cpu_set_is_close_to_torch
    a, b = out[1][1], out[0][1]
    assert (a - b).abs().max() < 0.05 * b.abs().max() and a.argmax().item() == b.argmax().item()
