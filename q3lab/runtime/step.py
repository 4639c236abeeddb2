"""One decoder layer of the thinker, written once, as functions over explicit tensors; and the kernel sets it runs on.

Dimensions as in `q3lab.runtime.thinker`: B batch, T new tokens, S cache slots, D hidden, H query heads, K kv heads, hd head
dim, E experts, A active experts per token, I expert intermediate, N = B*T.

Every execution path calls these functions, none has its own copy of the math:
- the `nn.Module` tree of `q3lab.runtime.thinker` (HF names, hook points): each module's forward calls the function for its
  part (`rms_norm`, `attention`, `select`, the kernel set's `moe`);
- `Thinker.forward` / `Thinker.generate` when no hook listens: `layer` over the same weights, without modules;
- `q3lab.fast.decoders.StaticDecoder` / `OffloadedDecoder`: `attend_route` + the kernel set's `moe` on fixed-shape
  device state (a cache slot and rotary row chosen on the device), captured in CUDA graphs.

A kernel set (`Kernels`) is the three places where a backend computes differently: attention over keys/values
(`attend`), the router's logits + float32 softmax + top-k + renormalisation (`route`), and the weighted experts
(`moe`), plus the attention projections (`linear`). `TORCH` is the reference; `CPU` (what `Thinker.forward` /
`generate` run on the CPU for bf16 and wide float32 models, `kernels_for`) sends a decode step's one-token
products, norms, rotary, attention, router and stacked experts to the C kernels of `q3lab.kernels.cpu`, anything
else (prefill, padding masks, a cache's experts) to TORCH's functions; `TRITON` runs the fused kernels of
`q3lab.kernels.triton_decode` / `q3lab.kernels.triton_moe` where their shapes allow (one token, CUDA) and TORCH elsewhere.
Many tokens on CUDA in bf16 (prefill, batched decode) run the experts as grouped GEMMs
(`q3lab.kernels.grouped_moe`), in either set.
"""
from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Dims:
    """The numbers a layer step needs besides tensors (plain ints: torch.compile specialises on them)."""
    H: int
    K: int
    hd: int
    A: int
    eps: float
    renorm: bool

    @classmethod
    def of(cls, config) -> "Dims":
        return cls(config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                   config.num_experts_per_tok, config.rms_norm_eps, config.norm_topk_prob)


class LayerWeights(NamedTuple):
    """One layer's dense tensors. qk_norm: the q and k norm weights row per head [H+K, hd] (q and k heads are
    normed and rotated together); qkv: wq, wk, wv concatenated [(H+2K)*hd, D] for one projection, or None."""
    ln1: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    qk_norm: torch.Tensor
    wo: torch.Tensor
    ln2: torch.Tensor
    router: torch.Tensor
    qkv: torch.Tensor | None = None


class Rope(NamedTuple):
    """Rotary for the new tokens: cos and sign-folded sin [B or 1, T, 1, hd] (`q3lab.runtime.thinker.rope_cos_sin`), or one
    rotation matrix [hd, hd] for every row (`q3lab.runtime.thinker.rope_matrix`) and sin None."""
    cos: torch.Tensor
    sin: torch.Tensor | None


class KV(NamedTuple):
    """One layer's cache k/v [B, K, S, hd] (None: no cache, only the mask) and where the new tokens go: `at` an int (the cache length: keys
    0..at+T are attended, `mask` [B, 1, T, at+T] bool or None for causal) or a device tensor [1] (the slot of the
    one new token; every slot is attended, `mask` is an additive float bias [B, 1, 1, S], 0 or -inf)."""
    k: torch.Tensor
    v: torch.Tensor
    at: int | torch.Tensor
    mask: torch.Tensor | None


# -- the step's functions -----------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) in float32, cast back, times weight [dim] (or one
    row per head, [heads, dim])."""
    # F.rms_norm runs the reference's explicit formula in the same order (bit-equal, tests/test_decode_fast.py)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if weight.dim() == 1:
            return F.rms_norm(x, weight.shape, weight, eps)
        return F.rms_norm(x, weight.shape[-1:], eps=eps) * weight
    return weight * F.rms_norm(x.float(), weight.shape[-1:], eps=eps).to(x.dtype)


def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotary on x [B, T, heads, hd]."""
    if rope.sin is None:
        return x @ rope.cos            # one matrix: a matmul instead of the elementwise ops below
    h = x.shape[-1] // 2
    return x * rope.cos + torch.cat((x[..., h:], x[..., :h]), dim=-1) * rope.sin


def qkv(h: torch.Tensor, w: LayerWeights, d: Dims, rope: Rope, ks: "Kernels | None" = None):
    """q [B, H, T, hd], k and v [B, K, T, hd] of the normed input h [B, T, D]: projections, q/k norms, rotary (the
    kernel set `ks`'s linear, norm and rotate; None: TORCH's)."""
    B, T, _ = h.shape
    H, K, hd = d.H, d.K, d.hd
    linear, norm, rot = (F.linear, rms_norm, rotate) if ks is None else (ks.linear, ks.norm, ks.rotate)
    if w.qkv is not None:
        q, k, v = linear(h, w.qkv).split([H * hd, K * hd, K * hd], dim=-1)
    else:
        q, k, v = linear(h, w.wq), linear(h, w.wk), linear(h, w.wv)
    # each head's row sees the ops q_norm / k_norm and the rotation would apply to it alone
    qk = rot(norm(torch.cat((q.view(B, T, H, hd), k.view(B, T, K, hd)), dim=2), w.qk_norm, d.eps), rope)
    return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.view(B, T, K, hd).transpose(1, 2)


def kv_write(kv: KV, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the new k/v [B, K, T, hd]; return the keys/values to attend [B, K, S, hd] (no cache: k/v)."""
    if kv.k is None:
        return k, v
    if isinstance(kv.at, int):
        s, t = kv.at, k.shape[2]
        kv.k.narrow(2, s, t).copy_(k)      # narrow + copy_: a third of the cost of slice assignment
        kv.v.narrow(2, s, t).copy_(v)
        return kv.k.narrow(2, 0, s + t), kv.v.narrow(2, 0, s + t)
    kv.k.index_copy_(2, kv.at, k)          # a device-side slot: no host value, so a graph can replay it
    kv.v.index_copy_(2, kv.at, v)
    return kv.k, kv.v


def attention(h: torch.Tensor, w: LayerWeights, d: Dims, rope: Rope, kv: KV | None, ks: "Kernels") -> torch.Tensor:
    """Self-attention of the normed input h [B, T, D] -> [B, T, D] (before the residual); kv None: no cache."""
    B, T, _ = h.shape
    got = ks.project(h, w, d, rope, kv) if ks.project is not None else None
    if got is not None:               # the set's kernel computed q, k, v and wrote k, v into the cache
        q, k, v = got
    else:
        q, k, v = qkv(h, w, d, rope, ks)
        if kv is not None:
            k, v = kv_write(kv, k, v)
    mask = None if kv is None else kv.mask
    y = ks.attend(q, k, v, mask)                                                      # [B, H, T, hd]
    return ks.linear(y.transpose(1, 2).reshape(B, T, d.H * d.hd), w.wo)


def select(logits: torch.Tensor, A: int, renorm: bool, dtype: torch.dtype):
    """The router's choice from logits [N, E]: float32 softmax, top-A (descending), renormalised when `renorm`:
    (ids [N, A] int64, weights [N, A] in `dtype`)."""
    w, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), A, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w.to(dtype)


def attend_route(x: torch.Tensor, y_prev: torch.Tensor | None, w: LayerWeights, d: Dims, rope: Rope, kv: KV | None,
                 ks: "Kernels"):
    """A layer up to its experts. x [B, T, D] the residual; y_prev the previous layer's weighted expert outputs
    [N, A, D] (added here, so that a compiled step fuses the sum into this layer's first kernels) or None.
    Returns (x + attention [B, T, D], the experts' input h [N, D], router logits [N, E], ids [N, A], weights)."""
    if ks.residual_norm is not None:       # the kernel set adds the experts and norms in one go (fused)
        x, h1 = ks.residual_norm(x, y_prev, w.ln1, d.eps)
    else:
        if y_prev is not None:
            x = x + y_prev.sum(1).to(x.dtype).view(x.shape)
        h1 = ks.norm(x, w.ln1, d.eps)
    if ks.attend_residual is not None:     # the kernel set computes x + attention(...) itself (fused)
        x = ks.attend_residual(x, h1, w, d, rope, kv)
    else:
        x = x + attention(h1, w, d, rope, kv, ks)
    if ks.norm_route is not None:          # the kernel set norms and routes in one go (fused)
        h, logits, ids, wts = ks.norm_route(x, w, d)
        return x, h, logits, ids, wts
    h = ks.norm(x, w.ln2, d.eps).view(-1, x.shape[-1])
    logits, ids, wts = ks.route(h, w.router, d.A, d.renorm)
    return x, h, logits, ids, wts


def layer(x: torch.Tensor, w: LayerWeights, d: Dims, rope: Rope, kv: KV | None, ks: "Kernels",
          experts: Callable, sink: Callable | None = None) -> torch.Tensor:
    """One decoder layer, x [B, T, D] -> [B, T, D]: `attend_route`, then x + experts(h, ids, weights) ([N, D]).
    sink(logits, ids, weights), when given, sees the routing (recording). A kernel set with `layer` may compute
    the whole composition in one kernel (the same functions fused, see `Kernels`)."""
    if ks.layer is not None:
        got = ks.layer(x, w, d, rope, kv, experts)
        if got is not None:
            if sink is not None:               # the kernel's routing is scratch for its next call: copies
                sink(*(t.clone() for t in got[1]))
            return got[0]
    x, h, logits, ids, wts = attend_route(x, None, w, d, rope, kv, ks)
    if sink is not None:
        sink(logits, ids, wts)
    return x + experts(h, ids, wts).view(x.shape)


def moe_sum(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """Each token's weighted expert sum [N, D] in h's dtype over stacked experts: `expert_sum(moe_torch(...))`,
    except many tokens on CUDA in bf16 (a prefill), where the grouped GEMMs are summed by one batched product
    without float32 partials (`q3lab.kernels.grouped_moe.moe_grouped_sum`)."""
    if h.is_cuda and h.shape[0] > 8 and _grouped_ok(gate):
        from q3lab.kernels.grouped_moe import moe_grouped_sum
        return moe_grouped_sum(h, ids, w, gate, up, down)
    return expert_sum(moe_torch(h, ids, w, gate, up, down), h.dtype)


def expert_sum(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each token's weighted expert outputs [N, A, D] (float32) summed, rounded once to `dtype`: [N, D]. A kernel
    that sums itself gives [N, 1, D]."""
    if partials.shape[1] == 1:
        return partials.view(partials.shape[0], -1).to(dtype)
    return partials.sum(1).to(dtype)


# -- kernel sets ----------------------------------------------------------------------------------
# Experts this small (3*I*D*A*N elements; 192 KiB in fp32) are gathered into one block and computed with batched
# products: copying them costs less than the ~30 dispatched ops of grouping by expert.
GATHER_MAX_ELEMENTS = 48 * 1024


def moe_torch(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate, up=None, down=None, *,
              gather: bool | None = None) -> torch.Tensor:
    """The weighted SwiGLU experts of each token: h [N, D]; ids [N, A] index the slabs gate/up [S, I, D] and down
    [S, D, I], or, with `gate` a callable (up, down None), `gate(s) -> (gate [I, D], up [I, D], down [D, I])`
    serves slot s (a provider's experts: asked for once per call, in ascending slot); w [N, A]. Returns the
    weighted outputs [N, A, D] in float32, in ascending-slot order per token when grouped (see `expert_sum`).

    Rounding follows the weights' dtype (as the Triton kernels do): projections and silu * up rounded to it, each
    expert's output rounded, times its weight rounded to it, in float32. gather (default: when the experts are
    small, or ids on CUDA) gathers the chosen experts and uses batched products with the ids on the device; else
    the tokens are grouped by expert (ids read on the host)."""
    N, A = ids.shape
    fetch = gate if up is None else None
    if gather is None:
        numel = (gate.shape[1] * gate.shape[2]) if fetch is None else fetch.numel
        gather = (N * A * 3 * numel <= GATHER_MAX_ELEMENTS) or (ids.is_cuda and N <= 8)
        if not gather and fetch is None and ids.is_cuda and _grouped_ok(gate):
            # many tokens on CUDA (prefill): three grouped GEMMs, ids on the device, instead of a host loop over
            # experts (same layout and rounding; q3lab.kernels.grouped_moe)
            from q3lab.kernels.grouped_moe import moe_grouped
            return moe_grouped(h, ids, w, gate, up, down)
        if not gather and fetch is None and ids.is_cuda and torch.cuda.is_current_stream_capturing():
            # the grouping below reads the counts on the host, an error under CUDA-graph capture (StaticDecoder's
            # bucket prefill, e.g. in float32): gathered on the device instead, the same products per expert
            gather = True
    if gather:
        flat = ids.reshape(-1)
        if fetch is None:                                          # on the device: no host sync
            g, u, dn = gate.index_select(0, flat), up.index_select(0, flat), down.index_select(0, flat)
        else:
            host = flat.tolist()
            served = {s: fetch(s) for s in sorted(set(host))}
            g, u, dn = (torch.stack(t) for t in zip(*(served[s] for s in host)))
        dt = g.dtype
        if N == 1:   # a decode step: matrix-vector products, without the broadcasting matmul's reshapes
            x = h.to(dt)[0]                                                       # [D]
            act = F.silu(g @ x) * (u @ x)                                         # [A, I]
            y = torch.bmm(dn, act[:, :, None]).view(1, A, -1)                     # [1, A, D]
        else:
            x = h.to(dt).view(N, 1, -1, 1)                                        # [N, 1, D, 1]
            act = F.silu(g.view(N, A, *g.shape[1:]) @ x) * (u.view(N, A, *u.shape[1:]) @ x)   # [N, A, I, 1]
            y = (dn.view(N, A, *dn.shape[1:]) @ act)[..., 0]                      # [N, A, D]
        if dt == torch.float32:                                   # the same numbers, two dispatches fewer
            return y * w.view(N, A, 1)
        return y.float() * w.to(dt).float()[..., None]
    fetch = fetch or (lambda s: (gate[s], up[s], down[s]))
    sid, perm = ids.sort(dim=1)                                    # each token's experts, ascending
    flat = sid.reshape(-1)                                         # [N*A]
    order = torch.argsort(flat, stable=True)                       # slots grouped by expert
    counts = torch.bincount(flat).tolist()
    xs, ys, start, dt = h.index_select(0, order // A), [], 0, None
    for e, c in enumerate(counts):
        if c:
            ge, ue, de = fetch(e)
            dt = ge.dtype
            xe = xs[start:start + c].to(dt)                        # [c, D] the tokens routed to e
            start += c
            ys.append(F.linear(F.silu(F.linear(xe, ge)) * F.linear(xe, ue), de))
    y = torch.cat(ys).float() * w.gather(1, perm).to(dt).float().reshape(-1)[order, None]
    return y.index_select(0, torch.argsort(order)).view(N, A, -1)  # back to [N, A] (ascending slot per token)


def route_torch(h: torch.Tensor, w_router: torch.Tensor, A: int, renorm: bool):
    """(logits [N, E] in h's dtype, ids [N, A], weights [N, A] in h's dtype) of h [N, D] (see `select`)."""
    logits = F.linear(h, w_router)
    ids, w = select(logits, A, renorm, h.dtype)
    return logits, ids, w


def attend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, K, S, hd] (query head h reads kv head h // (H/K)); mask None (causal when T > 1),
    bool or additive float, broadcastable to [B, H, T, S]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          scale=q.shape[-1] ** -0.5, enable_gqa=True)


def stack_served(fetch: Callable, n: int, first: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """A provider's n served experts (`fetch(s)` -> gate, up, down) as stacks (gate, up, down [n, ...]), each
    copied as it is served: a cache smaller than the call's experts reuses its buffers for the next one.
    `first`: fetch(0), when the caller has asked for it already."""
    first = fetch(0) if first is None else first
    out = tuple(torch.empty((n, *t.shape), dtype=t.dtype, device=t.device) for t in first)
    for s in range(n):
        for dst, src in zip(out, first if s == 0 else fetch(s)):
            dst[s].copy_(src)
    return out


def _grouped_ok(gate: torch.Tensor) -> bool:
    from q3lab.kernels.grouped_moe import grouped_ok
    return grouped_ok(gate)


def _triton_ok(t: torch.Tensor) -> bool:
    from q3lab.kernels.triton_decode import fused_available
    return fused_available(t)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def attend_triton(q, k, v, mask):
    """One token of one sequence over a fixed-shape cache with a float bias: `decode_kernels.decode_attention`
    (one Triton kernel on CUDA); anything else: `attend_torch`."""
    from q3lab.kernels.triton_decode import decode_attention
    B, H, T, hd = q.shape
    if B == 1 and T == 1 and mask is not None and mask.is_floating_point() and _triton_ok(q):
        return decode_attention(q.view(H, hd), k[0], v[0], mask.reshape(-1), hd ** -0.5).view(1, H, 1, hd)
    return attend_torch(q, k, v, mask)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def route_triton(h, w_router, A, renorm):
    """One token's router (`decode_kernels.route`: GEMV, then softmax + top-k, two Triton kernels on CUDA)."""
    from q3lab.kernels.triton_decode import route
    if h.shape[0] == 1 and _triton_ok(h):
        logits, ids, w = route(h[0], w_router, A, renorm)
        return logits[None], ids[None], w[None]
    return route_torch(h, w_router, A, renorm)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def route_triton_topk(h, w_router, A, renorm):
    """The router's GEMV and softmax in torch, its top-k in one Triton kernel (`decode_kernels.topk_renorm`)."""
    from q3lab.kernels.triton_decode import topk_renorm
    if h.shape[0] == 1 and _triton_ok(h):
        logits = F.linear(h, w_router)
        ids, w = topk_renorm(torch.softmax(logits[0], dim=-1, dtype=torch.float32), A, renorm, h.dtype)
        return logits, ids[None], w[None]
    return route_torch(h, w_router, A, renorm)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def moe_triton(h, ids, w, gate, up, down, *, gather: bool | None = None):
    """`moe_torch` with stacked slabs on CUDA: for several tokens in bf16 the grouped GEMMs of
    `q3lab.kernels.grouped_moe.moe_grouped`, else the two fused kernels of `moe_kernels.moe_one_token` per token, reading
    the chosen experts in place (ids stay on the device either way)."""
    from q3lab.kernels.triton_moe import TRITON_CONFIG, moe_one_token_triton, triton_available
    if isinstance(gate, torch.Tensor) and h.shape[0] > 1 and h.is_cuda and _grouped_ok(gate):
        # several tokens (batched decode, prefill): grouped GEMMs read each touched expert once, where the
        # per-token kernels below would read it once per token (q3lab.kernels.grouped_moe)
        from q3lab.kernels.grouped_moe import moe_grouped
        return moe_grouped(h, ids, w, gate, up, down)
    if isinstance(gate, torch.Tensor) and triton_available(h.device) and h.shape[-1] % TRITON_CONFIG["block_d"] == 0:
        ys = [moe_one_token_triton(h[n], ids[n], w[n], gate, up, down, partials=True, **TRITON_CONFIG)
              for n in range(h.shape[0])]
        return ys[0][None] if len(ys) == 1 else torch.stack(ys)    # one token: a view, not a copy kernel
    return moe_torch(h, ids, w, gate, up, down, gather=gather)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def attend_residual_triton(x, h, w, d, rope, kv):
    """x + attention(h) of one token over a fixed-shape cache with a device-side slot, in three kernels of
    `q3lab.kernels.triton_decode`: the q/k/v GEMV, `qkv_attend` (q/k norms, rotary, the cache write and attention in one
    kernel), the o_proj GEMV with the residual added. Anything else: `x + attention(..., TRITON)`."""
    from q3lab.kernels.triton_decode import gemv, qkv_attend
    B, T, _ = h.shape
    if (B == 1 and T == 1 and w.qkv is not None and kv is not None and kv.k is not None
            and not isinstance(kv.at, int) and rope.sin is not None and kv.mask is not None
            and kv.mask.is_floating_point() and _triton_ok(h)):
        y = qkv_attend(gemv(h.view(-1), w.qkv), w.qk_norm, rope.cos.reshape(-1), rope.sin.reshape(-1), kv.k[0],
                       kv.v[0], kv.at, kv.mask.reshape(-1), d.hd ** -0.5, d.eps, d.H, d.K)
        return gemv(y.view(-1), w.wo, x.reshape(-1)).view(x.shape)
    return x + attention(h, w, d, rope, kv, TRITON)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def residual_norm_triton(x, y_prev, ln, eps):
    """x + the previous layer's expert sum, and its input norm, for one token in one kernel
    (`decode_kernels.residual_norm`): (x [1, 1, D], h [1, 1, D]); anything else: the composed torch ops."""
    from q3lab.kernels.triton_decode import residual_norm
    if x.numel() == x.shape[-1] and _triton_ok(x) and (y_prev is None or y_prev.shape[0] == 1):
        xo, h = residual_norm(x.reshape(-1), None if y_prev is None else y_prev[0], ln, eps)
        return xo.view(x.shape), h.view(x.shape)
    if y_prev is not None:
        x = x + y_prev.sum(1).to(x.dtype).view(x.shape)
    return x, rms_norm(x, ln, eps)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def norm_route_triton(x, w, d):
    """The post-attention norm and the router of one token in one kernel (`decode_kernels.norm_route`):
    (h [1, D], logits [1, E], ids [1, A], weights [1, A]); anything else: `rms_norm` + `route_triton`."""
    from q3lab.kernels.triton_decode import norm_route
    if x.numel() == x.shape[-1] and _triton_ok(x):
        h, logits, ids, wts = norm_route(x.reshape(-1), w.ln2, d.eps, w.router, d.A, d.renorm)
        return h[None], logits[None], ids[None], wts[None]
    h = rms_norm(x, w.ln2, d.eps).view(-1, x.shape[-1])
    logits, ids, wts = route_triton(h, w.router, d.A, d.renorm)
    return h, logits, ids, wts


@dataclass(frozen=True)
class Kernels:
    """A kernel set: attend(q, k, v, mask), route(h, w_router, A, renorm) -> (logits, ids, weights),
    moe(h, ids, w, gate, up, down) -> weighted outputs [N, A, D] float32 (or [N, 1, D], already summed over A;
    `expert_sum` takes either), and linear(x, w) for the attention projections, norm(x, weight, eps) and
    rotate(x, rope) (signatures as the torch functions, which are the defaults); project(h, w, d, rope, kv), when
    set, is `qkv` + `kv_write` in one kernel: (q, k, v) as they would return, or None where it does not apply.
    Optional, for sets that fuse across those boundaries (None: the step composes the functions above):
    attend_residual(x, h, w, d, rope, kv) -> x + attention(h), norm_route(x, w, d) -> (h, logits, ids, weights)
    and residual_norm(x, y_prev, ln1, eps) -> (x + the previous experts' sum, rms_norm of it); layer(x, w, d, rope,
    kv, experts) -> (x after the whole layer, (logits, ids, weights)), or None where it does not apply: `layer`'s
    composition in one kernel (the CPU set's one-token `layer_one`)."""
    name: str
    attend: Callable
    route: Callable
    moe: Callable
    linear: Callable = F.linear
    norm: Callable = rms_norm
    rotate: Callable = rotate
    project: Callable | None = None
    attend_residual: Callable | None = None
    norm_route: Callable | None = None
    residual_norm: Callable | None = None
    layer: Callable | None = None


TORCH = Kernels("torch", attend_torch, route_torch, moe_torch)
TRITON = Kernels("triton", attend_triton, route_triton, moe_triton)
# the decoders' unfused set: torch attention and router, but the experts read in place by the Triton kernel on
# CUDA (a gathered copy of 8 experts per layer costs more than the rest of the step: 58% of its kernel time on
# an H200); off CUDA moe_triton is moe_torch, so this set is TORCH there
DECODE = Kernels("torch+triton-moe", attend_torch, route_torch, moe_triton)
# the Triton set with the layer's small steps fused across the set's boundaries (issue 15): per layer the previous
# experts' sum + residual + input norm, a q/k/v GEMV, one kernel for norms + rotary + cache write + attention,
# o_proj GEMV + residual, norm + router + top-k, the two expert kernels: 7 kernels
LAYER = Kernels("triton-layer", attend_triton, route_triton, moe_triton, attend_residual=attend_residual_triton,
                norm_route=norm_route_triton, residual_norm=residual_norm_triton)


# -- the CPU set: one-row products and one-token experts in q3lab.kernels.cpu (C, AVX-512 BF16 where present) ----
# float32 models narrower than this stay on TORCH for a forward of several tokens: a tiny model's prefill stays
# bit-equal to the module path (the C kernels and oneDNN sum in another order), as the embedded data/mini and
# data/mini128 (hidden 96) and the test models (64) are; from 256 on the C kernels pay (synth-small, hidden 256:
# ~400 -> ~1150 tok/s decode). bf16 always takes the C kernels (torch's bf16 GEMV reads at 1-10 GB/s here)
CPU_F32_MIN_HIDDEN = 256
# ... except their decode steps (one token of one sequence with a cache, no mask: what `layer_cpu` computes in one
# C call) from this width on: data/mini (96 wide, 48 layers) decodes ~7x faster on the C layer (per-op overhead
# is its whole cost), its greedy tokens equal transformers' and llama.cpp's (tests/test_cpu_kernels.py,
# bench/cpu_peer.py), its logits within float32 rounding (1e-5) of the torch set's; prefills and hooked forwards
# (notebooks, analysis) stay on TORCH, bit-equal to the module path. The 64-wide test models stay on TORCH.
CPU_F32_DECODE_MIN_HIDDEN = 96


def _cpu_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a one-token product of x and weights w can go to the C kernels: one CPU dtype they take, and no
    autograd that would need the product."""
    return x.dtype == w.dtype and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) \
        and not (x.requires_grad or w.requires_grad)


# products and experts of up to this many tokens run in C (a short prompt: torch's bf16 GEMM with a few rows runs
# at GEMV speed here, and its float32 experts of a 16-token prompt took 112 ms against 52 ms in C on
# synth-medium); longer prompts stay in torch, whose GEMMs pay from there on
CPU_MAX_ROWS = 64


def linear_cpu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x [..., K], w [N, K]); up to CPU_MAX_ROWS rows in bf16 or float32 run
    `cpu_kernels.linear` (float32 sums, one rounding), anything else F.linear."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if 0 < rows and w.dim() == 2 and _cpu_ok(x, w):
        from q3lab.kernels import cpu as cpu_kernels
        if rows <= CPU_MAX_ROWS:
            return cpu_kernels.linear(x.reshape(rows, K).contiguous(), w).view(*x.shape[:-1], w.shape[0])
        if x.dtype == torch.float32:          # a prefill: oneDNN's AVX-512 GEMM (MKL's sgemm runs AVX2 here)
            return cpu_kernels.gemm(x, w)
    return F.linear(x, w)


def _one_row(x: torch.Tensor) -> bool:
    """A decode step's tensor of one token on the CPU, in a dtype the C kernels take, no autograd."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and not x.requires_grad


def route_cpu(h: torch.Tensor, w_router: torch.Tensor, A: int, renorm: bool):
    """`route_torch`; one token: `cpu_kernels.route_one` (logits, softmax, top-k and renormalisation in one call)."""
    if h.shape[0] == 1 and _one_row(h) and w_router.dtype == h.dtype and not w_router.requires_grad:
        from q3lab.kernels import cpu as cpu_kernels
        return cpu_kernels.route_one(h.contiguous(), w_router, A, renorm)
    return route_torch(h, w_router, A, renorm)


def norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm`; one token's rows (x [1, 1, D] or [1, 1, heads, hd]): `cpu_kernels.rms_norm_rows`."""
    C = x.shape[-1]
    rows = x.numel() // C
    if _one_row(x) and weight.dtype == x.dtype and not weight.requires_grad and x.shape[0] * x.shape[1] == 1 \
            and (weight.dim() == 1 or (weight.dim() == 2 and weight.shape[0] == rows)) and x.is_contiguous():
        from q3lab.kernels import cpu as cpu_kernels
        return cpu_kernels.rms_norm_rows(x, weight, eps)
    return rms_norm(x, weight, eps)


def rotate_cpu(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """`rotate`; one token with the rotation matrix: `cpu_kernels.rows_matmul` (torch's bf16 matmul of a
    [heads, hd] block costs ~40 us here)."""
    if rope.sin is None and _one_row(x) and rope.cos.dtype == x.dtype and x.is_contiguous() \
            and x.shape[0] * x.shape[1] == 1:
        from q3lab.kernels import cpu as cpu_kernels
        return cpu_kernels.rows_matmul(x, rope.cos)
    return rotate(x, rope)


def project_cpu(h: torch.Tensor, w: LayerWeights, d: Dims, rope: Rope, kv: KV | None):
    """`qkv` + `kv_write` for one token of one sequence with a cache (int slot) and the rotation matrix:
    `cpu_kernels.project_one` (projections, q/k norms, rotary, cache write in one call): (q, k, v); else None."""
    if kv is None or kv.k is None or not isinstance(kv.at, int) or rope.sin is not None or w.qkv is not None \
            or h.shape[0] * h.shape[1] != 1 or not _one_row(h) or w.wq.dtype != h.dtype or w.wq.requires_grad:
        return None
    from q3lab.kernels import cpu as cpu_kernels
    q = cpu_kernels.project_one(h, w.wq, w.wk, w.wv, w.qk_norm, rope.cos, kv.k, kv.v, kv.at, d.eps)
    n = kv.at + 1
    return q, kv.k.narrow(2, 0, n), kv.v.narrow(2, 0, n)


def attend_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`attend_torch`; one query token of one sequence without a mask (every slot attended):
    `cpu_kernels.attend_one`."""
    if mask is None and q.shape[0] == 1 and q.shape[2] == 1 and _one_row(q) and k.dtype == q.dtype \
            and q.stride(3) == 1 and k.stride(3) == 1 and k.stride(2) == k.shape[3] and k.stride() == v.stride():
        from q3lab.kernels import cpu as cpu_kernels
        return cpu_kernels.attend_one(q, k, v, q.shape[-1] ** -0.5)
    return attend_torch(q, k, v, mask)


def moe_cpu(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate, up=None, down=None, *,
            gather: bool | None = None) -> torch.Tensor:
    """One token over a layer's stacked experts (gate/up [E, I, D], down [E, D, I] tensors, bf16 or float32):
    `cpu_kernels.moe_decode`, the experts read in place, summed over A in float32: [1, 1, D]; up to
    CPU_MAX_ROWS tokens: `cpu_kernels.moe_tokens` ([N, 1, D]). A provider's callable with `slots`
    (`Experts._served`) is stacked first for those cases. Anything else (more tokens, several float32 tokens):
    `moe_torch`, as are experts that are not contiguous (gate/up as halves of transformers' gate_up_proj)."""
    if up is None and getattr(gate, "slots", None) and _one_row(h) \
            and h.shape[0] <= CPU_MAX_ROWS:
        # a provider's experts (a cache): stacked in slot order, so that they run the kernel resident experts run
        # (a copy of the served experts, but a cache gives the same numbers as the resident model)
        fetch, g0 = gate, gate(0)
        if g0[0].dtype == h.dtype:
            gate, up, down = stack_served(fetch, fetch.slots, g0)
    if up is not None and isinstance(gate, torch.Tensor) and gate.dim() == 3 and _cpu_ok(h, gate) \
            and gate.is_contiguous() and up.is_contiguous() and down.is_contiguous():   # the C kernels read in place
        from q3lab.kernels import cpu as cpu_kernels
        if h.shape[0] == 1:
            return cpu_kernels.moe_decode(h.contiguous(), gate, up, down, ids, w).view(1, 1, -1)
        if h.shape[0] <= CPU_MAX_ROWS:
            return cpu_kernels.moe_tokens(h.contiguous(), gate, up, down, ids, w).unsqueeze(1)
        if gate.shape[1] * gate.shape[2] >= CPU_GROUPED_MIN_EXPERT:
            return moe_grouped_cpu(h, ids, w, gate, up, down)
        got = moe_padded_cpu(h, ids, w, gate, up, down)
        if got is not None:
            return got
    return moe_torch(h, ids, w, gate, up, down, gather=gather)


# experts of a prefill smaller than this (I*D elements) run as one padded batch (`moe_padded_cpu`: 3 batched
# products a layer instead of 3 per expert, whose ~15 us of dispatch each is a tiny expert's whole cost): one
# layer of data/mini (32 experts of 16 x 96, 512 tokens, bf16) 0.26 ms against 1.84 ms on moe_torch and 2.1 on
# moe_grouped_cpu; from synth-small's 128 x 256 on moe_grouped_cpu pays (bf16 1.78 ms, padded 2.12, moe_torch 3.28)
CPU_GROUPED_MIN_EXPERT = 1 << 14
# the padded batch is refused (moe_torch runs) when padding would more than quadruple the work (skewed routing)
CPU_PADDED_MAX_WASTE = 4


def moe_padded_cpu(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor | None:
    """Many tokens over a layer's small stacked experts as one batch: each expert's tokens gathered into a block of
    C rows (C = the busiest expert's count; empty rows read a zero row), three `torch.bmm` over all experts, the
    weighted outputs added into each token's float32 sum in ascending expert: [N, 1, D], with `moe_torch`'s
    roundings (bf16: each product rounded, silu * up rounded, each expert's output rounded, times its rounded
    weight). None when the padding would exceed CPU_PADDED_MAX_WASTE x the routed rows."""
    N, A = ids.shape
    E, I, D = gate.shape
    dt = gate.dtype
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    C = int(counts.max())
    if E * C > CPU_PADDED_MAX_WASTE * N * A:
        return None
    order = torch.argsort(flat, stable=True)                     # pairs grouped by expert, ascending token
    e_sorted = flat[order]
    slot = e_sorted * C + (torch.arange(N * A) - (torch.cumsum(counts, 0) - counts)[e_sorted])
    src = torch.full((E * C,), N, dtype=torch.int64)             # padding rows read (and add into) row N
    src[slot] = order // A
    x = torch.cat((h.to(dt), h.new_zeros(1, D, dtype=dt))).index_select(0, src).view(E, C, D)
    act = F.silu(torch.bmm(x, gate.transpose(1, 2))).mul_(torch.bmm(x, up.transpose(1, 2)))
    y = torch.bmm(act, down.transpose(1, 2)).view(E * C, D)
    wts = torch.zeros(E * C, dtype=torch.float32)
    wts[slot] = w.reshape(-1).to(dt).float()[order]
    out = torch.zeros(N + 1, D, dtype=torch.float32)
    out.index_add_(0, src, y.float().mul_(wts[:, None]))
    return out[:N].unsqueeze(1)


def moe_grouped_cpu(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """Many tokens (a prefill) over a layer's stacked experts, grouped by expert: each token's weighted expert sum
    [N, 1, D] in float32. Per expert (ascending) its tokens are gathered (a block that stays in cache for its
    three GEMMs), and its weighted outputs added into the sum in place: no [N*A, D] gather, concatenation and
    unpermute of `moe_torch`'s grouped path. Each token's sum runs over its experts in ascending id, as
    `expert_sum(moe_torch(...))` does, with the same roundings (bf16: each expert's output rounded, times its
    rounded weight); float32 GEMMs on oneDNN (`cpu_kernels.gemm`), bf16 on F.linear (oneDNN already)."""
    from q3lab.kernels import cpu as cpu_kernels
    N, A = ids.shape
    dt = gate.dtype
    lin = cpu_kernels.gemm if dt == torch.float32 else F.linear
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)                    # (token, rank) pairs grouped by expert
    counts = torch.bincount(flat, minlength=gate.shape[0]).tolist()
    tok = order // A
    wts = w.reshape(-1).to(dt).float()[order]
    x = h.to(dt)
    out = torch.zeros(N, h.shape[-1], dtype=torch.float32)
    start = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        te, we = tok[start:start + c], wts[start:start + c]
        start += c
        xe = x.index_select(0, te)                                  # [c, D]
        act = F.silu(lin(xe, gate[e])).mul_(lin(xe, up[e]))
        out.index_add_(0, te, lin(act, down[e]).float().mul_(we[:, None]))
    return out.unsqueeze(1)


def layer_cpu(x: torch.Tensor, w: LayerWeights, d: Dims, rope: Rope, kv: KV | None, experts: Callable):
    """`layer` for one decode token of one sequence with a cache (int slot, no mask), the rotation matrix and a
    layer's stacked experts (`experts.stacked`, set by `Experts.step_fn`): the whole composition of the CPU set's
    functions in one C call (`cpu_kernels.layer_one`, bit-equal to it): (x [1, 1, D], (logits, ids, weights));
    None where it does not apply (the step then composes the functions)."""
    st = getattr(experts, "stacked", None)
    if st is None or kv is None or kv.k is None or kv.mask is not None or rope.sin is not None \
            or w.qkv is not None or type(kv.at) is not int or x.numel() != x.shape[-1] or x.dim() != 3 \
            or not _one_row(x) or w.wq.requires_grad or st[0].dtype != x.dtype \
            or not all(t.is_contiguous() for t in st):    # e.g. gate/up as halves of transformers' gate_up_proj
        return None
    got = _LAYER_CALLS.get(experts)
    if got is None or got[0] is not w:     # checked once per plan (a plan serves a whole generation)
        from q3lab.kernels import cpu as cpu_kernels
        got = (w, cpu_kernels.LayerCall(w.ln1, w.wq, w.wk, w.wv, w.qk_norm, w.wo, w.ln2, w.router, *st, d.K, d.hd,
                                        d.A, d.renorm, d.eps))
        _LAYER_CALLS[experts] = got
    x, logits, ids, wts = got[1].run(x, rope.cos, kv.k, kv.v, kv.at)
    return x, (logits, ids, wts)


# per plan entry (its experts callable): the layer's checked C call (the LayerWeights it was made for, LayerCall)
_LAYER_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


CPU = Kernels("cpu", attend_cpu, route_cpu, moe_cpu, linear_cpu, norm_cpu, rotate_cpu, project_cpu,
              layer=layer_cpu)
_CPU_STATE: list = []   # [True] once built, [False] once refused (the reason warned once)


def kernels_for(device: torch.device, dtype: torch.dtype, hidden: int, decode: bool = False) -> Kernels:
    """The kernel set `Thinker.forward` / `generate` run for a model of `dtype` and `hidden` size on `device`
    when no hook listens: CPU on the CPU for bf16, and for float32 from CPU_F32_MIN_HIDDEN, or from
    CPU_F32_DECODE_MIN_HIDDEN for a `decode` step (one token of one sequence with a cache, no mask) (the C kernels
    built on first use; Q3LAB_CPU_KERNELS=0 chooses TORCH), TORCH elsewhere. If the C kernels cannot be built,
    one warning gives the reason and says that the torch kernels run."""
    if torch.device(device).type != "cpu" or os.environ.get("Q3LAB_CPU_KERNELS", "1") == "0":
        return TORCH
    f32_from = CPU_F32_DECODE_MIN_HIDDEN if decode else CPU_F32_MIN_HIDDEN
    if not (dtype == torch.bfloat16 or (dtype == torch.float32 and hidden >= min(f32_from, CPU_F32_MIN_HIDDEN))):
        return TORCH
    if not _CPU_STATE:
        from q3lab.kernels import cpu as cpu_kernels
        try:
            cpu_kernels.lib()
            _CPU_STATE.append(True)
        except cpu_kernels.KernelError as e:
            _CPU_STATE.append(False)
            warnings.warn(f"q3lab: the CPU decode kernels (q3lab.kernels.cpu) are not available, so the torch "
                          f"kernels run (bf16 decode several times slower): {e}", RuntimeWarning, stacklevel=2)
    return CPU if _CPU_STATE[0] else TORCH


def kernels(fused: bool | str = False, fused_router: bool = True) -> Kernels:
    """The decoders' kernel set: DECODE, or the Triton set (fused attention, experts and, with fused_router, the
    router's GEMV + softmax + top-k; without it only the top-k), or with fused="layer" the LAYER set. The Triton
    sets fall back to TORCH's functions where Triton cannot run."""
    if not fused:
        return DECODE
    if fused == "layer":
        return LAYER
    if fused is not True:
        from q3lab.errors import InputError
        raise InputError(f"fused must be False, True or 'layer', got {fused!r}")
    return TRITON if fused_router else Kernels("triton-topk", attend_triton, route_triton_topk, moe_triton)
