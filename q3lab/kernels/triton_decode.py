"""Small fused kernels for one decode token: attention over the cache, and the router's top-k.

At batch 1 these steps move almost no bytes, so their cost is kernel count and latency: torch runs attention
as two batched matmuls and a softmax (three kernels, ~13 us on an H100) and top-k as a gather and a sort
(~9 us). Each becomes one Triton kernel here. Both have a torch twin with the same arithmetic where Triton or
CUDA is missing; the Triton attention normalises once at the end (online softmax), so the two agree to bf16
rounding, not bit for bit.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
if triton is not None:
    try:  # grid dependency control (PDL); without it PDL stays off and the kernels never call these
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # pragma: no cover - depends on the Triton version
        gdc_launch_dependents = gdc_wait = None

# Programmatic dependent launch (Hopper+): the LAYER set's kernels and the expert kernels launch before their
# predecessor ends, load what does not depend on it (weights), then wait (griddepcontrol.wait); each signals its
# dependents only after its own wait, so a kernel may read anything two launches back without waiting. Off by
# default; read at launch time (so at graph capture).
PDL: bool = False


def _pdl() -> dict:
    """Launch keywords: launch_pdl and the kernels' USE_GDC switch."""
    if PDL and gdc_wait is None:
        from q3lab.errors import InputError
        raise InputError("decode_kernels.PDL needs triton.language.extra.cuda.gdc_wait (Triton 3.4+)")
    return dict(launch_pdl=True, USE_GDC=True) if PDL else dict(USE_GDC=False)

# attention in one program per KV head walks the whole cache; past this many slots a split-S kernel
# (flash-decoding) would be needed to fill the GPU, so longer caches use the torch twin
MAX_FUSED_SLOTS = 2048


def decode_attention_torch(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, bias: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """q [H, hd]; kc/vc [K, S, hd]; bias [S] float32 (0 or -inf) -> [H, hd]; query head h reads kv head
    h // (H/K) (SDPA's gqa)."""
    H, hd = q.shape
    K = kc.shape[0]
    qg = q.view(K, H // K, hd)
    s = (qg @ kc.transpose(-1, -2)).float() * scale + bias                        # [K, H/K, S]
    return (torch.softmax(s, dim=-1).to(q.dtype) @ vc).reshape(H, hd)


def topk_renorm_torch(probs: torch.Tensor, k: int, renorm: bool, dtype: torch.dtype):
    """(ids [k] int64, weights [k] dtype): the k largest of probs [E] in descending order, divided by their sum."""
    w, idx = torch.topk(probs, k)
    if renorm:
        w = w / w.sum()
    return idx, w.to(dtype)


if triton is not None:
    @triton.jit
    def _attn_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, scale,
                     s_kh, s_ks, S: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr,
                     BLOCK_S: tl.constexpr):
        kv = tl.program_id(0)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HD)
        gmask = g < G
        q = tl.load(q_ptr + (kv * G + g)[:, None] * HD + d[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HD], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s < S
            k = tl.load(k_ptr + kv * s_kh + s[:, None] * s_ks + d[None, :], mask=smask[:, None], other=0.0)
            v = tl.load(v_ptr + kv * s_kh + s[:, None] * s_ks + d[None, :], mask=smask[:, None], other=0.0)
            b = tl.load(bias_ptr + s, mask=smask, other=float("-inf"))
            sc = tl.dot(q, tl.trans(k)).to(q.dtype).to(tl.float32) * scale + b[None, :]   # [BLOCK_G, BLOCK_S]
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # a block with every slot masked
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + (kv * G + g)[:, None] * HD + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gmask[:, None])

    @triton.jit
    def _store_topk(p, offs, idx_ptr, w_ptr, A: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_A: tl.constexpr,
                    RENORM: tl.constexpr):
        # the A largest of p [BLOCK_E] (-inf where absent), descending: their ids and (renormalised) values
        ar = tl.arange(0, BLOCK_A)
        vals = tl.zeros([BLOCK_A], tl.float32)
        ids = tl.zeros([BLOCK_A], tl.int32)
        for a in tl.static_range(A):
            m = tl.max(p, axis=0)
            i = tl.min(tl.where(p == m, offs, BLOCK_E), axis=0)       # the first index of the maximum
            vals = tl.where(ar == a, m, vals)
            ids = tl.where(ar == a, i, ids)
            p = tl.where(offs == i, float("-inf"), p)
        if RENORM:
            vals = vals / tl.sum(tl.where(ar < A, vals, 0.0), axis=0)
        tl.store(idx_ptr + ar, ids.to(tl.int64), mask=ar < A)
        tl.store(w_ptr + ar, vals.to(w_ptr.dtype.element_ty), mask=ar < A)

    @triton.jit
    def _topk_kernel(p_ptr, idx_ptr, w_ptr, E: tl.constexpr, A: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_A: tl.constexpr,
                     RENORM: tl.constexpr):
        offs = tl.arange(0, BLOCK_E)
        p = tl.load(p_ptr + offs, mask=offs < E, other=float("-inf"))
        _store_topk(p, offs, idx_ptr, w_ptr, A, BLOCK_E, BLOCK_A, RENORM)


    @triton.jit
    def _router_kernel(h_ptr, w_ptr, logit_ptr, D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        acc = tl.zeros([BLOCK_E], tl.float32)
        for k0 in range(0, D, BLOCK_D):
            cols = k0 + tl.arange(0, BLOCK_D)
            x = tl.load(h_ptr + cols).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * D + cols[None, :]).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        # rounded to the weights' dtype, as F.linear's output is before the float32 softmax
        tl.store(logit_ptr + rows, acc.to(w_ptr.dtype.element_ty).to(tl.float32))

    @triton.jit
    def _softmax_topk_kernel(l_ptr, idx_ptr, w_ptr, E: tl.constexpr, A: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_A: tl.constexpr, RENORM: tl.constexpr):
        offs = tl.arange(0, BLOCK_E)
        z = tl.load(l_ptr + offs, mask=offs < E, other=float("-inf"))
        e = tl.exp(z - tl.max(z, axis=0))
        p = e / tl.sum(e, axis=0)
        p = tl.where(offs < E, p, float("-inf"))
        _store_topk(p, offs, idx_ptr, w_ptr, A, BLOCK_E, BLOCK_A, RENORM)


def route_torch(h: torch.Tensor, w_router: torch.Tensor, k: int, renorm: bool):
    """The router of one token: h [D], w_router [E, D] -> (logits [E] float32, ids [k], weights [k] in h's dtype);
    softmax in float32 over the (rounded) logits, top-k, renormalised."""
    logits = torch.nn.functional.linear(h, w_router)
    idx, w = topk_renorm_torch(torch.softmax(logits, dim=-1, dtype=torch.float32), k, renorm, h.dtype)
    return logits.float(), idx, w


def route_triton(h: torch.Tensor, w_router: torch.Tensor, k: int, renorm: bool, *, block_e: int = 4,
                 block_d: int = 512):
    """`route_torch` in two kernels: the router GEMV spread over E/block_e programs, then softmax + top-k."""
    E, D = w_router.shape
    logits = torch.empty(E, dtype=torch.float32, device=h.device)
    _router_kernel[(E // block_e,)](h, w_router, logits, D=D, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=4)
    idx = torch.empty(k, dtype=torch.long, device=h.device)
    w = torch.empty(k, dtype=h.dtype, device=h.device)
    _softmax_topk_kernel[(1,)](logits, idx, w, E=E, A=k, BLOCK_E=triton.next_power_of_2(E),
                               BLOCK_A=triton.next_power_of_2(k), RENORM=renorm, num_warps=4)
    return logits, idx, w


def route(h, w_router, k, renorm):
    """The router's choice for one token, (logits, ids, weights): Triton on CUDA (E a multiple of 4, D of 512),
    torch elsewhere."""
    E, D = w_router.shape
    if fused_available(h) and E % 4 == 0 and D % 512 == 0 and E <= 4096 and w_router.is_contiguous():
        return route_triton(h, w_router, k, renorm)
    return route_torch(h, w_router, k, renorm)


def decode_attention_triton(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, bias: torch.Tensor,
                            scale: float, *, block_s: int = 64) -> torch.Tensor:
    """`decode_attention_torch` in one kernel (one program per KV head; online softmax over the cache)."""
    H, hd = q.shape
    K, S, _ = kc.shape
    G = H // K
    if kc.stride(-1) != 1 or kc.stride() != vc.stride():
        raise ValueError(f"keys and values need the same layout with contiguous rows, got {kc.stride()} "
                         f"and {vc.stride()}")
    out = torch.empty_like(q)
    _attn_kernel[(K,)](q.contiguous(), kc, vc, bias, out, scale, kc.stride(0), kc.stride(1), S=S, G=G,
                       BLOCK_G=max(16, triton.next_power_of_2(G)), HD=hd, BLOCK_S=block_s, num_warps=4)
    return out


def topk_renorm_triton(probs: torch.Tensor, k: int, renorm: bool, dtype: torch.dtype):
    """`topk_renorm_torch` in one kernel (k rounds of max-and-mask over the E probabilities)."""
    E = probs.shape[0]
    idx = torch.empty(k, dtype=torch.long, device=probs.device)
    w = torch.empty(k, dtype=dtype, device=probs.device)
    _topk_kernel[(1,)](probs, idx, w, E=E, A=k, BLOCK_E=triton.next_power_of_2(E),
                       BLOCK_A=triton.next_power_of_2(k), RENORM=renorm, num_warps=4)
    return idx, w


def fused_available(t: torch.Tensor) -> bool:
    return triton is not None and t.device.type == "cuda"


def decode_attention(q, kc, vc, bias, scale):
    """Attention of one token over the (masked) cache: one Triton kernel on CUDA, the torch twin elsewhere."""
    if fused_available(q) and kc.shape[1] <= MAX_FUSED_SLOTS and q.shape[-1] in (64, 128, 256):
        return decode_attention_triton(q, kc, vc, bias, scale)
    return decode_attention_torch(q, kc, vc, bias, scale)


def topk_renorm(probs, k, renorm, dtype):
    """The router's top-k and renormalised weights: one Triton kernel on CUDA, torch.topk elsewhere."""
    if fused_available(probs) and probs.shape[0] <= 4096:
        return topk_renorm_triton(probs, k, renorm, dtype)
    return topk_renorm_torch(probs, k, renorm, dtype)


# -- the layer's remaining small steps, fused (issue 15) ----------------------------------------------------------
# At batch 1 on an H200 the decode step was 15.5 kernels per layer, most of them latency-bound (profile of
# 2026-12-01: router GEMV 4.4 us for 0.5 MB, softmax + top-k 3.4, q/k norm 1.6, two cache writes 2.0, the
# attention 6.5, cuBLAS GEMVs at ~2.3 TB/s). The kernels below cut that to: one GEMV for q/k/v, one kernel
# for q/k norms + rotary + cache write + attention, one GEMV for o_proj with the residual added, one kernel for
# the post-attention norm + router GEMV + softmax + top-k. Each has a torch twin with the same arithmetic.

# GEMV block rows / block columns / warps; `GEMV_CONFIGS` holds per-shape choices (N, K) from a sweep
# (bench/gpu_decode.py), `GEMV_CONFIG` serves every other shape
GEMV_CONFIG: dict[str, int] = dict(block_n=4, block_k=1024, num_warps=4)
# the thinker's q/k/v and o_proj shapes: the fastest of 14 configs on an H200 (2026-12-01, bench/gpu_decode.py)
GEMV_CONFIGS: dict[tuple[int, int], dict[str, int]] = {(5120, 2048): dict(block_n=1, block_k=1024, num_warps=4),
                                                       (2048, 4096): dict(block_n=4, block_k=2048, num_warps=4)}
# the router kernel's rows per program (E / block_e programs; the last one to finish does softmax + top-k), its
# warps, and whether that top-k ranks all experts at once (True) or takes A rounds of max-and-mask
NORM_ROUTE_BLOCK_E = 2
NORM_ROUTE_CONFIG: dict[str, int] = dict(num_warps=4, rank_topk=1)
# the fused attention's cache block, warps and split of the cache over programs (flash-decoding; 1: none)
# (H200 sweep, 129 slots: 16 x 8 splits 6.65 us against 7.30 for one program per head of 64-slot blocks)
QKV_ATTN_CONFIG: dict[str, int] = dict(block_s=16, num_warps=4, split=8)


def gemv_torch(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor | None = None) -> torch.Tensor:
    """x [K] @ w [N, K].T -> [N] in x's dtype (float32 sums, rounded once), plus res [N] (rounded again) when given."""
    y = torch.nn.functional.linear(x, w)
    return y if res is None else res + y


def qkv_attend_torch(qkv: torch.Tensor, qk_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     kc: torch.Tensor, vc: torch.Tensor, slot: torch.Tensor, bias: torch.Tensor, scale: float,
                     eps: float, H: int, K: int) -> torch.Tensor:
    """One token's attention from its q/k/v projection qkv [(H+2K)*hd]: q and k heads normed (qk_norm [H+K, hd])
    and rotated (cos, sign-folded sin [hd]) as `q3lab.runtime.step.qkv` does, k/v written into the layer's cache kc/vc
    [K, S, hd] at slot [1] (int64, on the device), then `decode_attention_torch` over the cache with bias [S].
    Returns [H, hd]."""
    from q3lab.runtime.step import Rope, rms_norm, rotate
    hd = qk_norm.shape[-1]
    qk = rotate(rms_norm(qkv[:(H + K) * hd].view(H + K, hd), qk_norm, eps), Rope(cos, sin))
    kc.index_copy_(1, slot, qk[H:, None])
    vc.index_copy_(1, slot, qkv[(H + K) * hd:].view(K, 1, hd))
    return decode_attention_torch(qk[:H], kc, vc, bias, scale)


def residual_norm_torch(x: torch.Tensor, y: torch.Tensor | None, ln: torch.Tensor, eps: float):
    """The layer's entry for one token: x [D] plus the previous layer's weighted expert outputs y [A, D] (float32,
    summed then rounded to x's dtype; None: nothing to add), and its input norm: (x' [D], rms_norm(x') * ln [D])."""
    from q3lab.runtime.step import rms_norm
    if y is not None:
        x = x + y.sum(0).to(x.dtype)
    return x, rms_norm(x, ln, eps)


def norm_route_torch(x: torch.Tensor, ln: torch.Tensor, eps: float, w_router: torch.Tensor, k: int, renorm: bool):
    """The post-attention norm and the router of one token: x [D] -> (h [D] = rms_norm(x) * ln, logits [E] float32,
    ids [k], weights [k] in x's dtype), as `q3lab.runtime.step.rms_norm` and `route_torch` compute them."""
    from q3lab.runtime.step import rms_norm
    h = rms_norm(x, ln, eps)
    logits, idx, w = route_torch(h, w_router, k, renorm)
    return h, logits, idx, w


if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, res_ptr, o_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, HAS_RES: tl.constexpr, USE_GDC: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        w_rows = w_ptr + rows[:, None].to(tl.int64) * K
        c0 = tl.arange(0, BLOCK_K)
        w0 = tl.load(w_rows + c0[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)   # weights: no wait
        if USE_GDC:
            gdc_wait()
        acc = w0 * tl.load(x_ptr + c0).to(tl.float32)[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            cols = k0 + c0
            xk = tl.load(x_ptr + cols).to(tl.float32)
            w = tl.load(w_rows + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            acc += w * xk[None, :]
        if USE_GDC:
            gdc_launch_dependents()
        dt = o_ptr.dtype.element_ty
        y = tl.sum(acc, axis=1).to(dt)
        if HAS_RES:     # x + linear(...): the product rounded, then the sum rounded, as torch does
            y = (y.to(tl.float32) + tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)).to(dt)
        tl.store(o_ptr + rows, y, mask=rmask)

    @triton.jit
    def _rms_rot(x, xp, w, wp, cos, sin, eps, o_ptr, HD: tl.constexpr):
        # q3lab.runtime.step: w * rms_norm(x) rounded to dt, then x * cos + rotated(x) * sin, each product rounded to dt
        dt = o_ptr.dtype.element_ty
        r = tl.rsqrt(tl.sum(x * x, axis=-1, keep_dims=True) / HD + eps)
        n = (w * (x * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        n_p = (wp * (xp * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        return ((n * cos).to(dt).to(tl.float32) + (n_p * sin).to(dt).to(tl.float32)).to(dt)

    @triton.jit
    def _qkv_attn_kernel(qkv_ptr, qkn_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot_ptr, bias_ptr, o_ptr, scale, eps,
                         s_kh, s_ks, m_ptr, l_ptr, acc_ptr, cnt_ptr, S: tl.constexpr, H: tl.constexpr,
                         K: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, HD: tl.constexpr,
                         BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, SPLIT: tl.constexpr, USE_GDC: tl.constexpr):
        kv = tl.program_id(0)
        sp = tl.program_id(1)                        # which CHUNK of the cache (split-S when SPLIT > 1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HD)
        dp = (d + HD // 2) % HD                      # rotate-half partner of each lane
        gmask = g < G
        dt = o_ptr.dtype.element_ty
        cdt = k_ptr.dtype.element_ty
        # rotary rows (written before the previous kernel) and norm weights: no wait
        cos = tl.load(cos_ptr + d).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + d).to(tl.float32)[None, :]
        qh = (kv * G + g)[:, None] * HD
        wq = tl.load(qkn_ptr + qh + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        wqp = tl.load(qkn_ptr + qh + dp[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        kb = (H + kv) * HD
        wk = tl.load(qkn_ptr + kb + d).to(tl.float32)[None, :]
        wkp = tl.load(qkn_ptr + kb + dp).to(tl.float32)[None, :]
        if USE_GDC:
            gdc_wait()
        q = tl.load(qkv_ptr + qh + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        qp = tl.load(qkv_ptr + qh + dp[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        q = _rms_rot(q, qp, wq, wqp, cos, sin, eps, o_ptr, HD)                    # [BLOCK_G, HD]
        k = tl.load(qkv_ptr + kb + d).to(tl.float32)[None, :]
        kp = tl.load(qkv_ptr + kb + dp).to(tl.float32)[None, :]
        kn = _rms_rot(k, kp, wk, wkp, cos, sin, eps, o_ptr, HD)                   # [1, HD]
        vn = tl.load(qkv_ptr + (H + K + kv) * HD + d)
        slot = tl.load(slot_ptr)
        # every program of this head writes the new key/value (the same values), so whichever chunk holds the
        # slot reads its own write: visible to all its threads after a barrier (same SM)
        tl.store(k_ptr + kv * s_kh + slot * s_ks + d[None, :], kn.to(cdt))
        tl.store(v_ptr + kv * s_kh + slot * s_ks + d, vn.to(cdt))
        tl.debug_barrier()
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HD], tl.float32)
        for s0 in range(0, CHUNK, BLOCK_S):
            s = sp * CHUNK + s0 + tl.arange(0, BLOCK_S)
            smask = s < S
            kk = tl.load(k_ptr + kv * s_kh + s[:, None] * s_ks + d[None, :], mask=smask[:, None], other=0.0)
            vv = tl.load(v_ptr + kv * s_kh + s[:, None] * s_ks + d[None, :], mask=smask[:, None], other=0.0)
            b = tl.load(bias_ptr + s, mask=smask, other=float("-inf")).to(tl.float32)
            sc = tl.dot(q, tl.trans(kk)).to(dt).to(tl.float32) * scale + b[None, :]
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m_i = m_new
        if USE_GDC:
            gdc_launch_dependents()
        orow = o_ptr + (kv * G + g)[:, None] * HD + d[None, :]
        if SPLIT == 1:
            tl.store(orow, (acc / l_i[:, None]).to(dt), mask=gmask[:, None])
        else:
            # partial softmax state of this chunk; the head's last program to arrive merges them (flash-decoding)
            part = kv * SPLIT + sp
            tl.store(m_ptr + part * BLOCK_G + g, m_i)
            tl.store(l_ptr + part * BLOCK_G + g, l_i)
            tl.store(acc_ptr + (part * BLOCK_G + g)[:, None] * HD + d[None, :], acc)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + kv, 1, sem="acq_rel")
            if done == SPLIT - 1:
                mt = tl.full([BLOCK_G], float("-inf"), tl.float32)
                for j in tl.static_range(SPLIT):
                    mt = tl.maximum(mt, tl.load(m_ptr + (kv * SPLIT + j) * BLOCK_G + g, cache_modifier=".cg"))
                mt = tl.where(mt == float("-inf"), 0.0, mt)
                lt = tl.zeros([BLOCK_G], tl.float32)
                at = tl.zeros([BLOCK_G, HD], tl.float32)
                for j in tl.static_range(SPLIT):
                    pj = kv * SPLIT + j
                    f = tl.exp(tl.load(m_ptr + pj * BLOCK_G + g, cache_modifier=".cg") - mt)
                    lt += tl.load(l_ptr + pj * BLOCK_G + g, cache_modifier=".cg") * f
                    at += tl.load(acc_ptr + (pj * BLOCK_G + g)[:, None] * HD + d[None, :],
                                  cache_modifier=".cg") * f[:, None]
                tl.store(orow, (at / lt[:, None]).to(dt), mask=gmask[:, None])
                tl.atomic_xchg(cnt_ptr + kv, 0)

    @triton.jit
    def _store_topk_rank(p, offs, idx_ptr, w_ptr, A: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_A: tl.constexpr,
                         RENORM: tl.constexpr):
        # the same choice as _store_topk (descending, ties to the lower index) from every element's rank: one
        # [E, E] comparison and two [A, E] selections instead of 2 x A dependent reductions
        pi = p[:, None]
        pj = p[None, :]
        ahead = (pj > pi) | ((pj == pi) & (offs[None, :] < offs[:, None]))
        rank = tl.sum(ahead.to(tl.int32), axis=1)                                 # [BLOCK_E]
        ar = tl.arange(0, BLOCK_A)
        hit = rank[None, :] == ar[:, None]                                         # [BLOCK_A, BLOCK_E]
        vals = tl.sum(tl.where(hit, p[None, :], 0.0), axis=1)
        ids = tl.sum(tl.where(hit, offs[None, :], 0), axis=1)
        if RENORM:
            vals = vals / tl.sum(tl.where(ar < A, vals, 0.0), axis=0)
        tl.store(idx_ptr + ar, ids.to(tl.int64), mask=ar < A)
        tl.store(w_ptr + ar, vals.to(w_ptr.dtype.element_ty), mask=ar < A)

    @triton.jit
    def _residual_norm_kernel(x_ptr, y_ptr, ln_ptr, xo_ptr, h_ptr, eps, D: tl.constexpr, A: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, HAS_Y: tl.constexpr,
                              USE_GDC: tl.constexpr):
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        dt = x_ptr.dtype.element_ty
        lnw = tl.load(ln_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if USE_GDC:
            gdc_wait()
            gdc_launch_dependents()
        x = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_Y:
            a = tl.arange(0, BLOCK_A)
            y = tl.load(y_ptr + a[:, None] * D + cols[None, :], mask=(a < A)[:, None] & cmask[None, :], other=0.0)
            x = (x + tl.sum(y, axis=0).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        tl.store(xo_ptr + cols, x.to(dt), mask=cmask)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        h = (lnw * (x * r).to(dt).to(tl.float32)).to(dt)
        tl.store(h_ptr + cols, h, mask=cmask)

    @triton.jit
    def _norm_route_kernel(x_ptr, ln_ptr, w_ptr, h_ptr, logit_ptr, idx_ptr, wt_ptr, cnt_ptr, eps,
                           D: tl.constexpr, E: tl.constexpr, A: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_EA: tl.constexpr, BLOCK_A: tl.constexpr,
                           RENORM: tl.constexpr, RANK_TOPK: tl.constexpr, USE_GDC: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        dt = h_ptr.dtype.element_ty
        rows = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        w = tl.load(w_ptr + rows[:, None] * D + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
        lnw = tl.load(ln_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if USE_GDC:
            gdc_wait()
            gdc_launch_dependents()
        # every program norms the whole row (4 KB): cheaper than another kernel boundary
        x = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        h = (lnw * (x * r).to(dt).to(tl.float32)).to(dt)
        tl.store(h_ptr + cols, h, mask=cmask & (pid == 0))
        logit = tl.sum(w * h.to(tl.float32)[None, :], axis=1)
        tl.store(logit_ptr + rows, logit.to(w_ptr.dtype.element_ty).to(tl.float32))
        # the last program to finish picks the top-k: release our logits, count, acquire everyone's
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if done == tl.num_programs(0) - 1:
            offs = tl.arange(0, BLOCK_EA)
            z = tl.load(logit_ptr + offs, mask=offs < E, other=float("-inf"), cache_modifier=".cg")
            e = tl.exp(z - tl.max(z, axis=0))
            p = e / tl.sum(e, axis=0)
            p = tl.where(offs < E, p, float("-inf"))
            if RANK_TOPK:
                _store_topk_rank(p, offs, idx_ptr, wt_ptr, A, BLOCK_EA, BLOCK_A, RENORM)
            else:
                _store_topk(p, offs, idx_ptr, wt_ptr, A, BLOCK_EA, BLOCK_A, RENORM)
            tl.atomic_xchg(cnt_ptr, 0)              # ready for the next call (the next layer)


_COUNTERS: dict = {}
_MAX_COUNTERS = 64


def _counter(device: torch.device, use: str = "route", n: int = 1) -> torch.Tensor:
    """int32 arrival counters (n of them) per device and use, for the kernels whose last program finishes the
    work (calls on one stream run one at a time; that program resets its counter). Made on first use, i.e. in a
    decoder's warm-up, before any graph capture."""
    key = (str(device), use)
    if key not in _COUNTERS:    # never replaced: captured graphs keep its address
        _COUNTERS[key] = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)
    if n > _MAX_COUNTERS:
        raise ValueError(f"{n} arrival counters asked for, at most {_MAX_COUNTERS}")
    return _COUNTERS[key]


def gemv_triton(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor | None = None, *, block_n: int | None = None,
                block_k: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """`gemv_torch` in one kernel: N / block_n programs, each block_n full rows of w (K a multiple of block_k)."""
    N, K = w.shape
    cfg = dict(GEMV_CONFIGS.get((N, K), GEMV_CONFIG))
    cfg.update({k: v for k, v in dict(block_n=block_n, block_k=block_k, num_warps=num_warps).items() if v})
    if K % cfg["block_k"] or w.stride(-1) != 1 or w.stride(0) != K:
        raise ValueError(f"gemv needs a contiguous weight [N, K] with K a multiple of block_k={cfg['block_k']}, "
                         f"got {tuple(w.shape)} strides {w.stride()}")
    out = torch.empty(N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, cfg["block_n"]),)](x.contiguous(), w, res if res is not None else out, out, N,
                                                    K=K, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                                                    HAS_RES=res is not None, num_warps=cfg["num_warps"], **_pdl())
    return out


def qkv_attend_triton(qkv, qk_norm, cos, sin, kc, vc, slot, bias, scale, eps, H, K, *, block_s: int | None = None,
                      num_warps: int | None = None, split: int | None = None) -> torch.Tensor:
    """`qkv_attend_torch` in one kernel: programs per KV head norm and rotate its query heads and its key, write
    the key and value into the cache slot, then attend over the cache (online softmax); with split > 1 each head's
    cache is cut into `split` chunks, one program each, the last to finish merging their softmax states."""
    hd = qk_norm.shape[-1]
    _, S, _ = kc.shape
    G = H // K
    if kc.stride(-1) != 1 or kc.stride() != vc.stride():
        raise ValueError(f"keys and values need the same layout with contiguous rows, got {kc.stride()} "
                         f"and {vc.stride()}")
    bs = block_s or QKV_ATTN_CONFIG["block_s"]
    if qkv.dtype == torch.float32 and hd >= 128:
        bs = min(bs, 64)     # float32 tiles of 128 slots x 128 need more shared memory than an SM has
    # long caches are split so that no program walks more than ~512 slots (one program per head would leave
    # most of the GPU idle); short ones as configured
    sp = split or max(QKV_ATTN_CONFIG.get("split", 1), triton.cdiv(S, 512))
    sp = max(1, min(sp, triton.cdiv(S, bs), _MAX_COUNTERS // K if K <= _MAX_COUNTERS else 1))
    chunk = triton.cdiv(triton.cdiv(S, sp), bs) * bs
    sp = triton.cdiv(S, chunk)
    BG = max(16, triton.next_power_of_2(G))
    out = torch.empty(H, hd, dtype=qkv.dtype, device=qkv.device)
    if sp > 1:
        m = torch.empty(K * sp * BG, dtype=torch.float32, device=qkv.device)
        l_ = torch.empty_like(m)
        acc = torch.empty(K * sp * BG * hd, dtype=torch.float32, device=qkv.device)
        cnt = _counter(qkv.device, "attn", K)
    else:
        m = l_ = acc = cnt = out
    _qkv_attn_kernel[(K, sp)](qkv.contiguous(), qk_norm.contiguous(), cos.contiguous(), sin.contiguous(), kc, vc,
                              slot, bias.contiguous(), out, scale, eps, kc.stride(0), kc.stride(1), m, l_, acc, cnt,
                              S=S, H=H, K=K, G=G, BLOCK_G=BG, HD=hd, BLOCK_S=bs, CHUNK=chunk, SPLIT=sp,
                              num_warps=num_warps or QKV_ATTN_CONFIG["num_warps"], **_pdl())
    return out


def residual_norm_triton(x: torch.Tensor, y: torch.Tensor | None, ln: torch.Tensor, eps: float):
    """`residual_norm_torch` in one kernel (one program: the norm needs the whole row)."""
    D = x.shape[-1]
    xo = torch.empty(D, dtype=x.dtype, device=x.device)
    h = torch.empty(D, dtype=x.dtype, device=x.device)
    A = y.shape[0] if y is not None else 1
    _residual_norm_kernel[(1,)](x.contiguous(), y.contiguous() if y is not None else xo, ln, xo, h, eps, D=D, A=A,
                                BLOCK_D=triton.next_power_of_2(D), BLOCK_A=triton.next_power_of_2(A),
                                HAS_Y=y is not None, num_warps=8, **_pdl())
    return xo, h


def norm_route_triton(x: torch.Tensor, ln: torch.Tensor, eps: float, w_router: torch.Tensor, k: int, renorm: bool,
                      *, block_e: int | None = None, num_warps: int | None = None, rank_topk: bool | None = None):
    """`norm_route_torch` in one kernel: E / block_e programs each norm x and compute block_e logits; the last
    to finish (an atomic counter) does softmax + top-k."""
    E, D = w_router.shape
    be = block_e or NORM_ROUTE_BLOCK_E
    if E % be or not w_router.is_contiguous():
        raise ValueError(f"router weight {tuple(w_router.shape)} needs to be contiguous with E a multiple of {be}")
    h = torch.empty(D, dtype=x.dtype, device=x.device)
    logits = torch.empty(E, dtype=torch.float32, device=x.device)
    idx = torch.empty(k, dtype=torch.long, device=x.device)
    w = torch.empty(k, dtype=x.dtype, device=x.device)
    _norm_route_kernel[(E // be,)](x.contiguous(), ln, w_router, h, logits, idx, w, _counter(x.device), eps, D=D, E=E,
                                   A=k, BLOCK_D=triton.next_power_of_2(D), BLOCK_E=be,
                                   BLOCK_EA=triton.next_power_of_2(E), BLOCK_A=triton.next_power_of_2(k),
                                   RENORM=renorm,
                                   RANK_TOPK=bool(NORM_ROUTE_CONFIG["rank_topk"] if rank_topk is None else rank_topk),
                                   num_warps=num_warps or NORM_ROUTE_CONFIG["num_warps"], **_pdl())
    return h, logits, idx, w


def gemv(x, w, res=None):
    """One row times a weight (plus a residual): the Triton GEMV on CUDA, F.linear elsewhere."""
    N, K = w.shape
    cfg = GEMV_CONFIGS.get((N, K), GEMV_CONFIG)
    if fused_available(x) and K % cfg["block_k"] == 0 and w.is_contiguous():
        return gemv_triton(x, w, res)
    return gemv_torch(x, w, res)


def qkv_attend(qkv, qk_norm, cos, sin, kc, vc, slot, bias, scale, eps, H, K):
    """Norms, rotary, the cache write and attention of one token: one Triton kernel on CUDA, the twin elsewhere."""
    hd = qk_norm.shape[-1]
    if (fused_available(qkv) and hd in (64, 128, 256) and H % K == 0 and K <= _MAX_COUNTERS
            and kc.stride(-1) == 1 and kc.stride() == vc.stride()):
        return qkv_attend_triton(qkv, qk_norm, cos, sin, kc, vc, slot, bias, scale, eps, H, K)
    return qkv_attend_torch(qkv, qk_norm, cos, sin, kc, vc, slot, bias, scale, eps, H, K)


def residual_norm(x, y, ln, eps):
    """A layer's entry (previous experts' sum + residual, input norm) for one token: one Triton kernel on CUDA."""
    if fused_available(x) and x.shape[-1] <= 16384 and (y is None or y.dtype == torch.float32):
        return residual_norm_triton(x, y, ln, eps)
    return residual_norm_torch(x, y, ln, eps)


def norm_route(x, ln, eps, w_router, k, renorm):
    """The post-attention norm + router of one token: one Triton kernel on CUDA, torch elsewhere."""
    E, D = w_router.shape
    if fused_available(x) and E % NORM_ROUTE_BLOCK_E == 0 and E <= 512 and D <= 8192 and w_router.is_contiguous():
        return norm_route_triton(x, ln, eps, w_router, k, renorm)
    return norm_route_torch(x, ln, eps, w_router, k, renorm)
