"""The Qwen3-Omni thinker text model, from scratch, in one file.

Dimensions: B batch, T new tokens, S cached + new tokens, D hidden, H query heads, K kv heads,
hd head dim, E experts, A active experts per token (top-k), I expert intermediate, V vocabulary.

Module names follow Hugging Face (`model.layers.{i}.self_attn.q_norm`, `model.layers.{i}.mlp.gate`) so
that checkpoint keys, hooks and tools such as nnsight line up. Hook points (`HookPoint`) are identities
that cost one attribute check when nobody listens.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _mm

from .config import ThinkerConfig
from .errors import CheckpointError, InputError
from .experts import ExpertProvider, ResidentExperts


_GLOBAL_HOOKS = (_mm._global_forward_pre_hooks, _mm._global_forward_hooks, _mm._global_backward_pre_hooks,
                 _mm._global_backward_hooks)


def hook_dicts(model: nn.Module) -> list[dict]:
    """Every hook registry of `model`'s modules (forward and backward, pre and post) and the global ones:
    `any(hook_dicts(m))` is True when some hook would run (they are live dicts: later registrations show)."""
    return [d for m in model.modules()
            for d in (m._forward_pre_hooks, m._forward_hooks, m._backward_pre_hooks, m._backward_hooks)
            ] + list(_GLOBAL_HOOKS)


def _call(m: nn.Module, *args):
    """`m(*args)`, skipping nn.Module.__call__'s bookkeeping (about 1 us a call, ~15 calls per layer) when no
    hook would run: the condition `Module._call_impl` uses for its own shortcut, so hooks still run."""
    if (m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
            or any(_GLOBAL_HOOKS)):
        return m(*args)
    return m.forward(*args)


class HookPoint(nn.Module):
    """An identity with a stable name; forward hooks registered on it see (and may replace) the value."""

    def forward(self, x):
        return x

    def __call__(self, x):
        if self._forward_hooks or self._forward_pre_hooks:
            return super().__call__(x)
        return x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.weight, self.eps)


# -- rotary ------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # [hd/2]


def mrope_freqs(position_ids: torch.Tensor, inv_freq: torch.Tensor, section: list[int],
                interleaved: bool = True) -> torch.Tensor:
    """Rotary angles [B, T, hd/2] from 3-axis positions [3, B, T] (temporal, height, width).

    Interleaved (Qwen3-Omni): frequency index j takes H if j % 3 == 1 and j < 3*section[1], W if
    j % 3 == 2 and j < 3*section[2], else T. Chunked (Qwen2-VL): the first section[0] indices take T,
    the next section[1] H, the last section[2] W.
    """
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [3, B, T, hd/2]
    if interleaved:
        out = freqs[0].clone()
        for axis, offset in ((1, 1), (2, 2)):
            idx = slice(offset, 3 * section[axis], 3)
            out[..., idx] = freqs[axis][..., idx]
        return out
    return torch.cat([f[..., sum(section[:i]):sum(section[:i + 1])] for i, f in enumerate(freqs)], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd]; cos/sin [B, T, hd]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def rope_cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin [..., hd] from angles [..., hd/2], for `_rotate`.

    sin comes with its first half negated: `x*cos + cat(x2, x1)*sin` then equals `apply_rotary`'s
    `x*cos + cat(-x2, x1)*sin` bit for bit (a sign flip is exact) with one op fewer per call."""
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    h = sin.shape[-1] // 2
    return cos.to(dtype), torch.cat((-sin[..., :h], sin[..., h:]), dim=-1).to(dtype)


def rope_matrix(cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """R [hd, hd] with x @ R = x*cos + cat(x2, x1)*sin_folded, for one position (cos, folded sin [hd]).

    A one-token step rotates q and k of every layer with one matmul each instead of six elementwise ops;
    each output sums two products, so it may differ from `_rotate` in the last bit (fused multiply-add)."""
    h = cos.shape[-1] // 2
    r = torch.diag_embed(cos)
    r.diagonal(-h).copy_(sin_folded[:h])     # r[k + h, k]: x2 feeds output k < h
    r.diagonal(h).copy_(sin_folded[h:])      # r[k - h, k]: x1 feeds output k >= h
    return r


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """Rotary on x [B, T, heads, hd] with cos / folded sin [B, T, 1, hd] (see `rope_cos_sin`)."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., h:], x[..., :h]), dim=-1) * sin_folded


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) in float32, cast back, times weight [dim] (or
    one row per head, [heads, dim]: `Thinker._decode_step` norms q and k heads together)."""
    # F.rms_norm runs the reference's explicit formula in the same order (bit-equal, checked in
    # tests/test_decode_fast.py) in fewer dispatched ops.
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if weight.dim() == 1:
            return F.rms_norm(x, weight.shape, weight, eps)
        return F.rms_norm(x, weight.shape[-1:], eps=eps) * weight
    return weight * F.rms_norm(x.float(), weight.shape[-1:], eps=eps).to(x.dtype)


# -- KV cache ----------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Preallocated keys and values for every layer: [L, B, K, max_len, hd] each."""

    def __init__(self, config: ThinkerConfig, batch: int, max_len: int, *, device=None, dtype=torch.float32):
        super().__init__()
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.max_len = max_len
        self.length = 0                     # tokens already stored
        self.mask: torch.Tensor | None = None  # [B, max_len] key validity, when padding is used
        self.next_pos: torch.Tensor | None = None  # [B] next text position per row
        self.rope: tuple | None = None  # (maker's key, cos, folded sin [1, max_len, 1, hd]): Thinker._rope_table

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, K, T, hd] at the current length; return all keys/values so far [B, K, S, hd]."""
        s, t = self.length, k.shape[2]
        kl, vl = self.k[layer], self.v[layer]          # narrow + copy_: a third of the cost of slice assignment
        kl.narrow(2, s, t).copy_(k)
        vl.narrow(2, s, t).copy_(v)
        return kl.narrow(2, 0, s + t), vl.narrow(2, 0, s + t)


# -- attention ---------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, config: ThinkerConfig, layer_idx: int):
        super().__init__()
        D, H, K, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = layer_idx, H, K, hd
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, K * hd, bias=False)
        self.v_proj = nn.Linear(D, K * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        """x [B, T, D]; cos / folded sin [B or 1, T, 1, hd] (`rope_cos_sin`) or a rotation matrix and None
        (`rope_matrix`); mask [B, 1, T, S] or None. `Thinker._decode_step` repeats these ops without modules."""
        B, T, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv, self.head_dim
        q = _call(self.q_norm, _call(self.q_proj, x).view(B, T, H, hd))                # [B, T, H, hd]
        k = _call(self.k_norm, _call(self.k_proj, x).view(B, T, K, hd))                # [B, T, K, hd]
        if sin is None:   # one rotation matrix: q and k heads in one matmul, as Thinker._decode_step does
            qk = torch.cat((q, k), dim=2) @ cos
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = _call(self.v_proj, x).view(B, T, K, hd).transpose(1, 2)                    # q [B, H, T, hd], k/v K
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                                  # [B, K, S, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=hd ** -0.5, enable_gqa=True)            # [B, H, T, hd]
        return _call(self.o_proj, y.transpose(1, 2).reshape(B, T, H * hd))


# -- mixture of experts ------------------------------------------------------------------------
class Experts(nn.Module):
    """One layer's experts, whose weights come from a provider (resident or an on-demand cache)."""

    def __init__(self, config: ThinkerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.num_experts, self.expert_numel = layer_idx, config.num_experts, config.expert_numel
        self.provider: ExpertProvider | None = None

    def forward(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h [N, D]; idx, w [N, A] -> [N, D]: each token's weighted sum of its experts' outputs."""
        N, A = idx.shape
        if N == 1:
            return self._one_token(h, idx, w)
        idx, perm = idx.sort(dim=1)                                    # each token's experts, ascending
        flat = idx.reshape(-1)                                         # [N*A] slots
        order = torch.argsort(flat, stable=True)                       # slots grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        used = [e for e, c in enumerate(counts) if c]
        self.provider.prepare(self.layer_idx, used)
        xs = h.index_select(0, order // A)                             # [N*A, D] token rows, grouped
        ys, start = [], 0
        for e in used:
            x = xs[start:start + counts[e]]                            # [c, D] the tokens routed to e
            start += counts[e]
            gate, up, down = self.provider.weights(self.layer_idx, e)
            ys.append(F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down))  # [c, D]
        y = torch.cat(ys) * w.gather(1, perm).reshape(-1)[order, None]  # weighted, grouped by expert
        # Back to [N, A] slots (ascending expert per token) and summed in that order: in float32 the sums an
        # index_add_ per expert made (bit-equal, tested), with one gather and one reduction instead of a
        # scatter per expert; half precision now accumulates in float32 and rounds once.
        return y.index_select(0, torch.argsort(order)).view(N, A, -1).sum(1)

    # Experts this small (3*I*D*A elements, 192 KiB in fp32) are gathered into one block and computed with
    # three matrix-vector products: copying them costs less than the ~30 dispatched ops of the loop.
    STACK_MAX_ELEMENTS = 48 * 1024

    def _one_token(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Decode step (one token, h [1, D]), experts served in ascending id as `forward` does."""
        p, layer = self.provider, self.layer_idx
        stacked = self.expert_numel * idx.shape[1] <= self.STACK_MAX_ELEMENTS
        if stacked and type(p) is ResidentExperts:      # no prepare to call: stays on the tensors
            sel = idx[0]
            return self._one_token_stacked(h, w[0], p.gate[layer].index_select(0, sel),
                                           p.up[layer].index_select(0, sel), p.down[layer].index_select(0, sel))
        ids = idx[0].tolist()
        experts = sorted(ids)
        p.prepare(layer, experts)
        if stacked:
            served = {e: p.weights(layer, e) for e in experts}            # accessed in ascending id
            g, u, d = zip(*(served[e] for e in ids))                       # blocks in rank order, as above
            return self._one_token_stacked(h, w[0], torch.stack(g), torch.stack(u), torch.stack(d))
        ws = w[0].tolist()
        ws = [ws[r] for r in sorted(range(len(ids)), key=ids.__getitem__)]
        if h.dtype == torch.float32:
            # down @ act, times the weight, added to the sum: one addmv_ instead of three ops; float32 only,
            # where its single rounding stays within float rounding of the reference's order.
            if type(p) is ResidentExperts:   # the same views as p.weights, with a third of the indexing
                g, u, d = p.gate[layer], p.up[layer], p.down[layer]
                served = [(g[e], u[e], d[e]) for e in experts]
            else:
                served = [p.weights(layer, e) for e in experts]
            x, out = h[0], torch.zeros_like(h[0])
            for (gate, up, down), we in zip(served, ws):
                out.addmv_(down, F.silu(torch.mv(gate, x)) * torch.mv(up, x), alpha=we)
            return out.view(1, -1)
        # Half precision: rounded after each product and sum, in ascending expert order, as before.
        out = None
        for e, we in zip(experts, ws):
            gate, up, down = p.weights(layer, e)
            y = F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down) * we
            out = y if out is None else out.add_(y)
        return out

    @staticmethod
    def _one_token_stacked(h: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                           down: torch.Tensor) -> torch.Tensor:
        """sum_a w_a * down_a @ (silu(gate_a @ h) * up_a @ h) for h [1, D], w [A] and the chosen experts
        stacked in rank order, gate/up [A, I, D], down [A, D, I]: three batched products instead of a loop of
        7 ops per expert. Resident experts (index_select) and the cache (torch.stack of its views) build
        equal blocks, so they give bit-equal outputs."""
        x = h[0]                                                              # [D]
        act = F.silu(gate @ x) * (up @ x) * w[:, None]                        # [A, I]
        return torch.bmm(down, act[:, :, None]).sum(0).view(1, -1)            # [A, D, 1] -> [1, D]


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ThinkerConfig, layer_idx: int):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)   # the router
        self.experts = Experts(config, layer_idx)
        self.hook_router_logits = HookPoint()   # [N, E]
        self.hook_topk_ids = HookPoint()        # [N, A], rank order
        self.hook_topk_weights = HookPoint()    # [N, A], renormalised, hidden dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = x.reshape(-1, D)                                                         # [N, D]
        logits = self.hook_router_logits(_call(self.gate, h))                        # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)                   # per token, float32
        w, idx = torch.topk(probs, self.top_k, dim=-1)                               # [N, A]
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        idx = self.hook_topk_ids(idx)
        w = self.hook_topk_weights(w.to(h.dtype))
        return _call(self.experts, h, idx, w).view(B, T, D)


class DecoderLayer(nn.Module):
    def __init__(self, config: ThinkerConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SparseMoeBlock(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.hook_attn_out(_call(self.self_attn, _call(self.input_layernorm, x), cos, sin, mask, cache))
        x = x + self.hook_mlp_out(_call(self.mlp, _call(self.post_attention_layernorm, x)))
        return self.hook_resid_post(x)


class TextModel(nn.Module):
    def __init__(self, config: ThinkerConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hook_embed = HookPoint()
        self.hook_final_norm = HookPoint()


class Thinker(nn.Module):
    """The thinker text model: embeddings, decoder layers of attention + sparse MoE, final norm, lm_head."""

    def __init__(self, config: ThinkerConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta), persistent=False)
        self.experts_provider: ExpertProvider | None = None

    def set_experts(self, provider: ExpertProvider) -> None:
        self.experts_provider = provider
        for layer in self.model.layers:
            layer.mlp.experts.provider = provider
        attach = getattr(provider, "attach", None)   # e.g. ExpertCache listens to router weights
        if attach is not None:
            attach(self)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, device=self.device, dtype=self.dtype)

    # -- forward -------------------------------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise InputError("empty prompt: input_ids has no tokens")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, *, attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (float32) for input_ids [B, T].

        position_ids: [B, T] text positions or [3, B, T] temporal/height/width positions; by default
        positions continue from the cache (or from the left-padding-aware count of `attention_mask`).
        attention_mask: [B, S] 1 for real tokens, 0 for (left) padding, covering cached + new tokens.
        """
        self._check_ids(input_ids)
        return self._forward(input_ids, position_ids, cache, attention_mask, last_only)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache: KVCache | None,
                 attention_mask: torch.Tensor | None, last_only: bool) -> torch.Tensor:
        """`forward` after the token-id check (generate's decode steps feed ids it picked itself)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise InputError(f"cache holds {cache.max_len} tokens; {past} cached + {T} new do not fit")
        if past + T > self.config.max_position_embeddings:
            raise InputError(f"{past + T} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        dev = input_ids.device
        mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(dev).bool()
            if attention_mask.shape != (B, past + T):
                raise InputError(f"attention_mask must be [B, cached + new] = [{B}, {past + T}], "
                                 f"got {list(attention_mask.shape)}")
            q_pos = torch.arange(past, past + T, device=dev)
            k_pos = torch.arange(past + T, device=dev)
            causal = k_pos[None, :] <= q_pos[:, None]                                   # [T, S]
            mask = causal[None] & (attention_mask[:, None, :] | (k_pos[None, None, :] == q_pos[None, :, None]))
            mask = mask[:, None]                                                         # [B, 1, T, S]
        elif T > 1 and past > 0:
            q_pos = torch.arange(past, past + T, device=dev)
            mask = (torch.arange(past + T, device=dev)[None, :] <= q_pos[:, None])[None, None]
        model = self.model
        x = model.hook_embed(_call(model.embed_tokens, input_ids))                   # [B, T, D]
        if position_ids is None and attention_mask is None and cache is not None:
            cos, sin = self._rope_table(cache, x.dtype)                               # text positions 0..max_len
            if T == 1:   # every row at the same position: one rotation matrix for all layers
                cos, sin = rope_matrix(cos[0, past, 0], sin[0, past, 0]), None
            else:
                cos, sin = cos.narrow(1, past, T), sin.narrow(1, past, T)
        else:
            if position_ids is None:
                if attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
                else:
                    position_ids = torch.arange(past, past + T, device=dev)[None].expand(B, T)
            if position_ids.dim() == 2:
                position_ids = position_ids[None].expand(3, B, T)
            if position_ids.shape != (3, B, T):
                raise InputError(f"position_ids must be [B, T] or [3, B, T] = [3, {B}, {T}], "
                                 f"got {list(position_ids.shape)}")
            freqs = mrope_freqs(position_ids.to(dev), self.inv_freq, self.config.mrope_section,
                                self.config.mrope_interleaved)                      # [B, T, hd/2]
            cos, sin = (t[:, :, None] for t in rope_cos_sin(freqs, x.dtype))        # [B, T, 1, hd]
        for layer in model.layers:
            x = _call(layer, x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        x = model.hook_final_norm(_call(model.norm, x if not last_only else x[:, -1:]))
        return _call(self.lm_head, x).float()

    def _rope_table(self, cache: KVCache, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / folded sin [1, max_len, 1, hd] of text positions 0..max_len-1, made once per cache: a decode
        step then slices its row instead of recomputing angles (equal axes: the same as 1-D RoPE)."""
        c, f = self.config, self.inv_freq
        # rebuilt when the angles change (rope_check writes inv_freq in place; inference tensors keep no version)
        stamp = tuple(f.tolist()) if f.is_inference() else (f.data_ptr(), f._version)
        key = (stamp, tuple(c.mrope_section), c.mrope_interleaved, dtype)
        if cache.rope is None or cache.rope[0] != key:
            pos = torch.arange(cache.max_len, device=self.device)[None, None].expand(3, 1, cache.max_len)
            freqs = mrope_freqs(pos, self.inv_freq, c.mrope_section, c.mrope_interleaved)
            cache.rope = (key, *(t[:, :, None] for t in rope_cos_sin(freqs, dtype)))
        return cache.rope[1], cache.rope[2]

    def _decode_plan(self) -> tuple[list, list]:
        """What `_decode_step` reads per layer (weights and the experts module), gathered once per generate
        call, and every hook dict of the model (any hook anywhere sends a step through the modules)."""
        plan = []
        for lay in self.model.layers:
            at, mlp = lay.self_attn, lay.mlp
            H, K = at.n_heads, at.n_kv
            qk_norm = torch.cat((at.q_norm.weight.expand(H, -1), at.k_norm.weight.expand(K, -1)))   # [H+K, hd]
            plan.append((lay.input_layernorm.weight, at.q_proj.weight, at.k_proj.weight, at.v_proj.weight,
                         qk_norm, at.o_proj.weight, lay.post_attention_layernorm.weight, mlp.gate.weight,
                         mlp.experts))
        return plan, hook_dicts(self)

    def _decode_step(self, plan: list, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, V] of one new token per row (ids [B, 1], text positions, no padding): the ops of
        `_forward` in the same order on the same tensors, without modules, hook points or shape plumbing
        (bit-equal to it, tests/test_decode_fast.py), for generate's loop when no hook is registered."""
        c = self.config
        B, eps, H, K, hd, D = ids.shape[0], c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, \
            c.head_dim, c.hidden_size
        s, top_k, renorm = cache.length, c.num_experts_per_tok, c.norm_topk_prob
        x = F.embedding(ids, self.model.embed_tokens.weight)                          # [B, 1, D]
        cos, sin = self._rope_table(cache, x.dtype)
        rot = rope_matrix(cos[0, s, 0], sin[0, s, 0])
        for (ln1, qw, kw, vw, qk_norm, ow, ln2, gw, experts), kc, vc in zip(plan, cache.k.unbind(0),
                                                                             cache.v.unbind(0)):
            h = _rms(x, ln1, eps)
            # q and k heads normed and rotated together: each head's row sees the ops q_norm / k_norm and the
            # rotation would apply to it alone (bit-equal, tested)
            qk = torch.cat((F.linear(h, qw).view(B, 1, H, hd), F.linear(h, kw).view(B, 1, K, hd)), dim=2)
            qk = _rms(qk, qk_norm, eps) @ rot                                             # [B, 1, H+K, hd]
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)            # [B, H|K, 1, hd]
            kc.narrow(2, s, 1).copy_(k)                                                 # KVCache.update's ops
            vc.narrow(2, s, 1).copy_(F.linear(h, vw).view(B, 1, K, hd).transpose(1, 2))
            k, v = kc.narrow(2, 0, s + 1), vc.narrow(2, 0, s + 1)                          # [B, K, S, hd]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False, scale=hd ** -0.5,
                                               enable_gqa=True)
            x = x + F.linear(y.transpose(1, 2).reshape(B, 1, H * hd), ow)
            h = _rms(x, ln2, eps).reshape(-1, D)                                       # [B, D]
            w, idx = torch.topk(torch.softmax(F.linear(h, gw), dim=-1, dtype=torch.float32), top_k, dim=-1)
            if renorm:
                w = w / w.sum(dim=-1, keepdim=True)
            x = x + experts.forward(h, idx, w.to(h.dtype)).view(B, 1, D)
        cache.length += 1
        return F.linear(_rms(x, self.model.norm.weight, eps), self.lm_head.weight).float()[:, -1]

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 seed: int | None = None, attention_mask: torch.Tensor | None = None,
                 streamer=None) -> torch.Tensor:
        """The prompt followed by up to max_new_tokens new tokens [B, T + n], with a KV cache.

        Rows that reach an eos token keep emitting it (padding), as transformers does with pad = eos.
        `streamer(token_ids [B])` is called with each new token as it comes.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        input_ids = input_ids.to(self.device)
        self._check_ids(input_ids)
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise InputError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        B, T = input_ids.shape
        total = T + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise InputError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        cache = self.new_cache(B, total)
        mask = attention_mask.to(self.device).bool() if attention_mask is not None else None
        next_pos = None
        if mask is not None:
            if mask.shape != (B, T):
                raise InputError(f"attention_mask must be [batch, tokens] = [{B}, {T}], got {list(mask.shape)}")
            if not bool(mask[:, -1].all()):  # the next token would be predicted from a pad: garbage, silently
                rows = (~mask[:, -1]).nonzero().flatten().tolist()
                raise InputError(f"attention_mask: row(s) {rows} end in padding; generate needs left padding "
                                 f"(pad before the prompt, real tokens last)")
            next_pos = mask.long().sum(-1)                                           # [B]
            full = torch.ones(B, total, dtype=torch.bool, device=self.device)
            full[:, :T] = mask
            logits = self(input_ids, cache=cache, attention_mask=full[:, :T], last_only=True)[:, -1]
        else:
            logits = self(input_ids, cache=cache, last_only=True)[:, -1]
        from .finite import check_logits   # nan/inf: stop, naming the first layer where they appear
        check_logits(self, logits, input_ids, attention_mask=None if mask is None else full[:, :T])
        finite = torch.ones((), dtype=torch.bool, device=self.device)   # every later step, without a sync
        plan, hook_dicts = self._decode_plan() if mask is None else (None, None)
        out = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        eos_t = torch.tensor(sorted(eos), device=self.device) if eos else None
        for step in range(max_new_tokens):
            finite &= torch.isfinite(logits).all()
            nxt = self._pick(logits, do_sample, temperature, top_p, gen) if not do_sample or bool(finite) \
                else logits.argmax(-1)   # [B] (multinomial would raise on nan; the check below names the cause)
            if eos_t is not None:
                nxt = torch.where(done, eos_t[0], nxt)
                done |= torch.isin(nxt, eos_t)
            out.append(nxt[:, None])
            if streamer is not None:
                streamer(nxt)
            if step == max_new_tokens - 1 or (eos_t is not None and bool(done.all())):
                break
            # ids from argmax/multinomial over the vocabulary need no range check; hooks on the Thinker
            # (q3lab.record) still see every call.
            if mask is None and not any(hook_dicts):
                logits = self._decode_step(plan, nxt[:, None], cache)
                continue
            hooked = self._forward_pre_hooks or self._forward_hooks or any(_GLOBAL_HOOKS)
            if mask is not None:
                pos = next_pos[:, None]
                next_pos = next_pos + 1
                m = full[:, :cache.length + 1]
                logits = (self(nxt[:, None], pos, cache=cache, attention_mask=m, last_only=True) if hooked
                          else self._forward(nxt[:, None], pos, cache, m, True))[:, -1]
            else:
                logits = (self(nxt[:, None], cache=cache, last_only=True) if hooked
                          else self._forward(nxt[:, None], None, cache, None, True))[:, -1]
        if not bool(finite):   # some step's logits held nan/inf: find the first layer over every token fed
            from .finite import diagnose
            ids = torch.cat(out, dim=1)[:, :-1]
            diagnose(self, ids, attention_mask=None if mask is None else full[:, :ids.shape[1]])
        return torch.cat(out, dim=1)

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
              gen: torch.Generator) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sp, si = probs.sort(dim=-1, descending=True)
            keep = sp.cumsum(-1) - sp < top_p          # always keeps the most likely token
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter_(-1, si, sp)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]


# -- loading -----------------------------------------------------------------------------------
_NORM_SUFFIXES = ("layernorm.weight", "norm.weight")


def load(path: str | Path | WeightSource, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         experts: ExpertProvider | None = None, allow_missing: list[str] | None = None,
         progress: bool = False) -> Thinker:
    """Build a Thinker from a checkpoint folder or an extracted store (a path, or a source `open_source` gave).

    Every tensor the config implies must be present with the right shape: a missing one raises
    `CheckpointError` naming it. `allow_missing` (exact canonical names) is for ablations only: norms are
    then set to ones, other tensors to zeros, and each substitute is named in a warning.
    """
    from .weights import open_source
    src = open_source(path, allow_missing=allow_missing or ())   # opened (if a path) and audited: the one way in
    config = src.config
    with torch.device("meta"):
        model = Thinker(config)
    model = model.to_empty(device=device).to(dtype)
    model.inv_freq.copy_(rope_inv_freq(config.head_dim, config.rope_theta))
    allowed = set(allow_missing or [])
    expected = {n: s for n, s in config.expected_tensors().items() if ".mlp.experts." not in n}
    params = dict(model.named_parameters())
    for name, shape in expected.items():
        param = params[name]
        try:
            t = src.get(name)
        except CheckpointError:
            if name not in allowed:
                raise
            fill = 1.0 if name.endswith(_NORM_SUFFIXES) else 0.0
            warnings.warn(f"q3lab.load: {name} is missing; substituted {'ones' if fill else 'zeros'} "
                          f"(allow_missing)", stacklevel=2)
            with torch.no_grad():
                param.fill_(fill)
            continue
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        with torch.no_grad():
            param.copy_(t)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    provider = experts if experts is not None else ResidentExperts()
    kwargs = {"progress": progress} if isinstance(provider, ResidentExperts) else {}
    provider.bind(src, config, torch.device(device), dtype, **kwargs)
    model.set_experts(provider)
    model.source = src
    model.requires_grad_(False)
    return model.eval()
