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
