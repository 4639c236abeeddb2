"""One decoder layer of the thinker, written once, as functions over explicit tensors; and the kernel sets it runs on.

Dimensions as in `q3lab.model`: B batch, T new tokens, S cache slots, D hidden, H query heads, K kv heads, hd head
dim, E experts, A active experts per token, I expert intermediate, N = B*T.

Every execution path calls these functions, none has its own copy of the math:
- the `nn.Module` tree of `q3lab.model` (HF names, hook points): each module's forward calls the function for its
  part (`rms_norm`, `attention`, `select`, the kernel set's `moe`);
- `Thinker.forward` / `Thinker.generate` when no hook listens: `layer` over the same weights, without modules;
- `q3lab.fastdecode.StaticDecoder` / `OffloadedDecoder`: `attend_route` + the kernel set's `moe` on fixed-shape
  device state (a cache slot and rotary row chosen on the device), captured in CUDA graphs.

A kernel set (`Kernels`) is the three places where a backend computes differently: attention over keys/values
(`attend`), the router's logits + float32 softmax + top-k + renormalisation (`route`), and the weighted experts
(`moe`). `TORCH` is the reference and what runs off CUDA; `TRITON` runs the fused kernels of
`q3lab.decode_kernels` / `q3lab.moe_kernels` where their shapes allow (one token, CUDA) and TORCH elsewhere.
Many tokens on CUDA in bf16 (prefill, batched decode) run the experts as grouped GEMMs
(`q3lab.grouped_moe`), in either set.
"""
from __future__ import annotations

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
    """Rotary for the new tokens: cos and sign-folded sin [B or 1, T, 1, hd] (`q3lab.model.rope_cos_sin`), or one
    rotation matrix [hd, hd] for every row (`q3lab.model.rope_matrix`) and sin None."""
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


def qkv(h: torch.Tensor, w: LayerWeights, d: Dims, rope: Rope):
    """q [B, H, T, hd], k and v [B, K, T, hd] of the normed input h [B, T, D]: projections, q/k norms, rotary."""
    B, T, _ = h.shape
    H, K, hd = d.H, d.K, d.hd
    if w.qkv is not None:
        q, k, v = F.linear(h, w.qkv).split([H * hd, K * hd, K * hd], dim=-1)
    else:
        q, k, v = F.linear(h, w.wq), F.linear(h, w.wk), F.linear(h, w.wv)
    # each head's row sees the ops q_norm / k_norm and the rotation would apply to it alone
    qk = rotate(rms_norm(torch.cat((q.view(B, T, H, hd), k.view(B, T, K, hd)), dim=2), w.qk_norm, d.eps), rope)
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
    q, k, v = qkv(h, w, d, rope)
    mask = None
    if kv is not None:
        k, v = kv_write(kv, k, v)
        mask = kv.mask
    y = ks.attend(q, k, v, mask)                                                      # [B, H, T, hd]
    return F.linear(y.transpose(1, 2).reshape(B, T, d.H * d.hd), w.wo)


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
    if y_prev is not None:
        x = x + y_prev.sum(1).to(x.dtype).view(x.shape)
    x = x + attention(rms_norm(x, w.ln1, d.eps), w, d, rope, kv, ks)
    h = rms_norm(x, w.ln2, d.eps).view(-1, x.shape[-1])
    logits, ids, wts = ks.route(h, w.router, d.A, d.renorm)
    return x, h, logits, ids, wts


def layer(x: torch.Tensor, w: LayerWeights, d: Dims, rope: Rope, kv: KV | None, ks: "Kernels",
          experts: Callable, sink: Callable | None = None) -> torch.Tensor:
    """One decoder layer, x [B, T, D] -> [B, T, D]: `attend_route`, then x + experts(h, ids, weights) ([N, D]).
    sink(logits, ids, weights), when given, sees the routing (recording)."""
    x, h, logits, ids, wts = attend_route(x, None, w, d, rope, kv, ks)
    if sink is not None:
        sink(logits, ids, wts)
    return x + experts(h, ids, wts).view(x.shape)


def moe_sum(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """Each token's weighted expert sum [N, D] in h's dtype over stacked experts: `expert_sum(moe_torch(...))`,
    except many tokens on CUDA in bf16 (a prefill), where the grouped GEMMs are summed by one batched product
    without float32 partials (`q3lab.grouped_moe.moe_grouped_sum`)."""
    if h.is_cuda and h.shape[0] > 8 and _grouped_ok(gate):
        from q3lab.grouped_moe import moe_grouped_sum
        return moe_grouped_sum(h, ids, w, gate, up, down)
    return expert_sum(moe_torch(h, ids, w, gate, up, down), h.dtype)


def expert_sum(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each token's weighted expert outputs [N, A, D] (float32) summed, rounded once to `dtype`: [N, D]."""
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
            # experts (same layout and rounding; q3lab.grouped_moe)
            from q3lab.grouped_moe import moe_grouped
            return moe_grouped(h, ids, w, gate, up, down)
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


def _served(stacked: list, numel: int) -> Callable:
    """A provider's fetch over experts already served and stacked (gate, up, down [U, ...]): each asked once."""
    def fetch(s: int):
        return stacked[0][s], stacked[1][s], stacked[2][s]
    fetch.numel = numel
    return fetch


def _grouped_ok(gate: torch.Tensor) -> bool:
    from q3lab.grouped_moe import grouped_ok
    return grouped_ok(gate)


def _triton_ok(t: torch.Tensor) -> bool:
    from .decode_kernels import fused_available
    return fused_available(t)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def attend_triton(q, k, v, mask):
    """One token of one sequence over a fixed-shape cache with a float bias: `decode_kernels.decode_attention`
    (one Triton kernel on CUDA); anything else: `attend_torch`."""
    from .decode_kernels import decode_attention
    B, H, T, hd = q.shape
    if B == 1 and T == 1 and mask is not None and mask.is_floating_point() and _triton_ok(q):
        return decode_attention(q.view(H, hd), k[0], v[0], mask.reshape(-1), hd ** -0.5).view(1, H, 1, hd)
    return attend_torch(q, k, v, mask)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def route_triton(h, w_router, A, renorm):
    """One token's router (`decode_kernels.route`: GEMV, then softmax + top-k, two Triton kernels on CUDA)."""
    from .decode_kernels import route
    if h.shape[0] == 1 and _triton_ok(h):
        logits, ids, w = route(h[0], w_router, A, renorm)
        return logits[None], ids[None], w[None]
    return route_torch(h, w_router, A, renorm)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def route_triton_topk(h, w_router, A, renorm):
    """The router's GEMV and softmax in torch, its top-k in one Triton kernel (`decode_kernels.topk_renorm`)."""
    from .decode_kernels import topk_renorm
    if h.shape[0] == 1 and _triton_ok(h):
        logits = F.linear(h, w_router)
        ids, w = topk_renorm(torch.softmax(logits[0], dim=-1, dtype=torch.float32), A, renorm, h.dtype)
        return logits, ids[None], w[None]
    return route_torch(h, w_router, A, renorm)


@torch.compiler.disable   # Triton launches stay outside a compiled graph
def moe_triton(h, ids, w, gate, up, down, *, gather: bool | None = None):
    """`moe_torch` with stacked slabs on CUDA: for several tokens in bf16 the grouped GEMMs of
    `q3lab.grouped_moe.moe_grouped`, else the two fused kernels of `moe_kernels.moe_one_token` per token, reading
    the chosen experts in place (ids stay on the device either way)."""
    from .moe_kernels import TRITON_CONFIG, moe_one_token_triton, triton_available
    if isinstance(gate, torch.Tensor) and h.shape[0] > 1 and h.is_cuda and _grouped_ok(gate):
        # several tokens (batched decode, prefill): grouped GEMMs read each touched expert once, where the
        # per-token kernels below would read it once per token (q3lab.grouped_moe)
        from q3lab.grouped_moe import moe_grouped
        return moe_grouped(h, ids, w, gate, up, down)
    if isinstance(gate, torch.Tensor) and triton_available(h.device) and h.shape[-1] % TRITON_CONFIG["block_d"] == 0:
        return torch.stack([moe_one_token_triton(h[n], ids[n], w[n], gate, up, down, partials=True,
                                                 **TRITON_CONFIG) for n in range(h.shape[0])])
    return moe_torch(h, ids, w, gate, up, down, gather=gather)


@dataclass(frozen=True)
class Kernels:
    """A kernel set: attend(q, k, v, mask), route(h, w_router, A, renorm) -> (logits, ids, weights) and
    moe(h, ids, w, gate, up, down) -> weighted outputs [N, A, D] float32 (signatures as the torch functions)."""
    name: str
    attend: Callable
    route: Callable
    moe: Callable


TORCH = Kernels("torch", attend_torch, route_torch, moe_torch)
TRITON = Kernels("triton", attend_triton, route_triton, moe_triton)
# the decoders' unfused set: torch attention and router, but the experts read in place by the Triton kernel on
# CUDA (a gathered copy of 8 experts per layer costs more than the rest of the step: 58% of its kernel time on
# an H200); off CUDA moe_triton is moe_torch, so this set is TORCH there
DECODE = Kernels("torch+triton-moe", attend_torch, route_torch, moe_triton)


def kernels(fused: bool = False, fused_router: bool = True) -> Kernels:
    """The decoders' kernel set: DECODE, or the Triton set (fused attention, experts and, with fused_router, the
    router's GEMV + softmax + top-k; without it only the top-k). The Triton set falls back to TORCH's functions
    where Triton cannot run."""
    if not fused:
        return DECODE
    return TRITON if fused_router else Kernels("triton-topk", attend_triton, route_triton_topk, moe_triton)
