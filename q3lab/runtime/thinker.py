"""The Qwen3-Omni thinker text model, from scratch, in one file.

Dimensions: B batch, T new tokens, S cached + new tokens, D hidden, H query heads, K kv heads,
hd head dim, E experts, A active experts per token (top-k), I expert intermediate, V vocabulary.

Module names follow Hugging Face (`model.layers.{i}.self_attn.q_norm`, `model.layers.{i}.mlp.gate`) so
that checkpoint keys, hooks and tools such as nnsight line up. Hook points (`HookPoint`) are identities
that cost one attribute check when nobody listens.

The layer's math lives in `q3lab.runtime.step`, written once: each module's forward calls the step function for its part,
and a forward that no hook listens to runs `step.layer` over the same weights without the modules.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _mm

from q3lab.base.config import ThinkerConfig
from q3lab.errors import CheckpointError, InputError
from q3lab.runtime.experts import ExpertProvider, ResidentExperts
from q3lab.runtime import step
from q3lab.runtime.step import KV, Rope, rms_norm

_rms = rms_norm   # the old private name


_GLOBAL_HOOKS = (_mm._global_forward_pre_hooks, _mm._global_forward_hooks, _mm._global_backward_pre_hooks,
                 _mm._global_backward_hooks)


def hook_dicts(model: nn.Module) -> list[dict]:
    """Every hook registry of `model`'s modules (forward and backward, pre and post) and the global ones:
    `any(hook_dicts(m))` is True when some hook would run (they are live dicts: later registrations show)."""
    return [d for m in model.modules()
            for d in (m._forward_pre_hooks, m._forward_hooks, m._backward_pre_hooks, m._backward_hooks)
            ] + list(_GLOBAL_HOOKS)


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
        return rms_norm(x, self.weight, self.eps)


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
    """cos and sign-folded sin [..., hd] from angles [..., hd/2], for `step.rotate`.

    sin comes with its first half negated: `x*cos + cat(x2, x1)*sin` then equals `apply_rotary`'s
    `x*cos + cat(-x2, x1)*sin` bit for bit (a sign flip is exact) with one op fewer per call."""
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    h = sin.shape[-1] // 2
    return cos.to(dtype), torch.cat((-sin[..., :h], sin[..., h:]), dim=-1).to(dtype)


def rope_matrix(cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """R [hd, hd] with x @ R = x*cos + cat(x2, x1)*sin_folded, for one position (cos, folded sin [hd]).

    A one-token step rotates q and k of every layer with one matmul each instead of six elementwise ops;
    each output sums two products, so it may differ from the folded form in the last bit (fused multiply-add)."""
    h = cos.shape[-1] // 2
    r = torch.diag_embed(cos)
    r.diagonal(-h).copy_(sin_folded[:h])     # r[k + h, k]: x2 feeds output k < h
    r.diagonal(h).copy_(sin_folded[h:])      # r[k - h, k]: x1 feeds output k >= h
    return r


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
        self.rope_deltas: torch.Tensor | None = None  # [B, 1] multimodal prompt: later text positions + deltas


# -- attention ---------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, config: ThinkerConfig, layer_idx: int):
        super().__init__()
        D, H, K, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = layer_idx, H, K, hd
        self.dims = step.Dims.of(config)
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, K * hd, bias=False)
        self.v_proj = nn.Linear(D, K * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def qk_norm(self) -> torch.Tensor:
        """The q and k norm weights as one row per head [H+K, hd] (`step.qkv` norms the heads together)."""
        return torch.cat((self.q_norm.weight.expand(self.n_heads, -1), self.k_norm.weight.expand(self.n_kv, -1)))

    def forward(self, h: torch.Tensor, rope: Rope, kv: KV) -> torch.Tensor:
        """h [B, T, D] (normed) -> [B, T, D]: `step.attention`."""
        w = step.LayerWeights(None, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.qk_norm(),
                              self.o_proj.weight, None, None)
        return step.attention(h, w, self.dims, rope, kv, step.TORCH)


# -- mixture of experts ------------------------------------------------------------------------
def stacked_experts(provider, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(gate [E, I, D], up [E, I, D], down [E, D, I]) of a layer when the provider stacks its experts per layer
    (`ResidentExperts`, `reference`'s views over transformers' tensors), else None (a cache serves them)."""
    g = getattr(provider, "gate", None)
    if g is None or getattr(provider, "up", None) is None or getattr(provider, "down", None) is None:
        return None
    if isinstance(g, torch.Tensor) and g.dim() != 4:       # a cache's slab [slots, I, D] is not per layer
        return None
    return g[layer], provider.up[layer], provider.down[layer]


class Experts(nn.Module):
    """One layer's experts, whose weights come from a provider (resident or an on-demand cache)."""

    def __init__(self, config: ThinkerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.num_experts, self.expert_numel = layer_idx, config.num_experts, config.expert_numel
        self.provider: ExpertProvider | None = None

    def forward(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h [N, D]; idx, w [N, A] -> [N, D]: each token's weighted sum of its experts' outputs (`step.moe_torch`)."""
        p, layer = self.provider, self.layer_idx
        stacked = stacked_experts(p, layer)
        if stacked is not None:                # stacked [E, ...] per layer: the ids index them on the device
            return step.moe_sum(h, idx, w, *stacked)
        return self._served(h, idx, w, step.TORCH)

    def _served(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, ks: step.Kernels) -> torch.Tensor:
        """`forward` for a provider that serves experts one by one (a cache), on the kernel set `ks`."""
        p, layer = self.provider, self.layer_idx
        # any other provider: prepare() with the call's experts, then each asked for once, in ascending id
        flat = idx.reshape(-1).tolist()
        used = sorted(set(flat))
        p.prepare(layer, used)
        where = {e: s for s, e in enumerate(used)}
        slots = torch.tensor([where[e] for e in flat], device=idx.device).view(idx.shape)

        def fetch(s: int):
            return p.weights(layer, used[s])
        fetch.numel = self.expert_numel // 3
        D = h.shape[-1]
        if h.is_cuda and h.shape[0] > 8 and step._grouped_ok(h.new_empty(0, fetch.numel // D, D)):
            # many tokens on CUDA (a prefill) in a dtype the grouped GEMMs take: the served experts stacked, so
            # that moe_sum runs the grouped GEMMs of resident experts (equal to a resident prefill to rounding:
            # the groups differ, tests/gpu/test_gpu_prefill.py)
            return step.moe_sum(h, slots, w, *step.stack_served(fetch, len(used)))
        fetch.slots = len(used)
        return step.expert_sum(ks.moe(h, slots, w, fetch), h.dtype)

    def step_fn(self, ks: step.Kernels = step.TORCH):
        """What `step.layer` calls for this layer's experts: `forward`, with a stacked provider's slabs looked up
        once (a plan serves every step of a generation; with TORCH the same arithmetic, so bit-equal to
        `forward`) and computed by the kernel set `ks`'s moe."""
        stacked = stacked_experts(self.provider, self.layer_idx)
        if type(self).forward is not Experts.forward:                     # a subclass's own forward
            return self.forward
        if stacked is None:                                               # a cache: its experts on `ks`
            return lambda h, idx, w: self._served(h, idx, w, ks)
        gate, up, down = stacked

        def experts(h, idx, w):
            if ks.moe is step.moe_torch:       # the torch set: grouped GEMMs for a CUDA prefill (moe_sum)
                return step.moe_sum(h, idx, w, gate, up, down)
            return step.expert_sum(ks.moe(h, idx, w, gate, up, down), h.dtype)
        experts.stacked = stacked              # for a set's fused layer kernel (step.layer_cpu)
        return experts


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
        logits = self.hook_router_logits(self.gate(h))                               # [N, E]
        idx, w = step.select(logits, self.top_k, self.norm_topk_prob, h.dtype)       # [N, A], float32 softmax
        idx = self.hook_topk_ids(idx)
        w = self.hook_topk_weights(w)
        return self.experts(h, idx, w).view(B, T, D)


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

    def forward(self, x: torch.Tensor, rope: Rope, kv: KV) -> torch.Tensor:
        """`step.layer` through the modules, so that every hook point and module hook runs."""
        x = x + self.hook_attn_out(self.self_attn(self.input_layernorm(x), rope, kv))
        x = x + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x)))
        return self.hook_resid_post(x)

    def weights(self) -> step.LayerWeights:
        """The layer's dense tensors, for `step.layer` (the same tensors the modules hold)."""
        at = self.self_attn
        return step.LayerWeights(self.input_layernorm.weight, at.q_proj.weight, at.k_proj.weight, at.v_proj.weight,
                                 at.qk_norm(), at.o_proj.weight, self.post_attention_layernorm.weight,
                                 self.mlp.gate.weight)


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
        self.towers = None   # q3lab.omni.towers.Towers after load(towers=True)

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

    def plan(self, ks: step.Kernels | None = None) -> list[tuple[step.LayerWeights, object]]:
        """Per layer, what `step.layer` reads: the layer's weights and its experts' forward on the kernel set `ks`
        (default `step.kernels_for(...)`, what `_forward` runs). Gathered once per call (generate: once
        per generation)."""
        ks = step.kernels_for(self.device, self.dtype, self.config.hidden_size) if ks is None else ks
        return [(lay.weights(), lay.mlp.experts.step_fn(ks)) for lay in self.model.layers]

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
                last_only: bool = False, input_features: torch.Tensor | None = None,
                feature_attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, use_audio_in_video: bool = False,
                video_second_per_grid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (float32) for input_ids [B, T].

        position_ids: [B, T] text positions or [3, B, T] temporal/height/width positions; by default
        positions continue from the cache (or from the left-padding-aware count of `attention_mask`).
        attention_mask: [B, S] 1 for real tokens, 0 for (left) padding, covering cached + new tokens.
        input_features ... video_second_per_grid: multimodal inputs with transformers' names (`q3lab.omni`;
        the model must be loaded with towers=True): the towers' outputs replace their pad tokens, positions
        are transformers' 3-axis ones, deepstack features join the first layers' hidden states.
        """
        self._check_ids(input_ids)
        mm = dict(input_features=input_features, feature_attention_mask=feature_attention_mask,
                  pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                  video_grid_thw=video_grid_thw, video_second_per_grid=video_second_per_grid)
        if any(v is not None for v in mm.values()):
            from q3lab.omni.forward import prefill_inputs   # the omni extra, imported only for media
            x, pos, deepstack = prefill_inputs(self, input_ids, position_ids, cache, attention_mask, mm,
                                               use_audio_in_video)
            return self._forward(input_ids, pos, cache, attention_mask, last_only, embeds=x, deepstack=deepstack)
        return self._forward(input_ids, position_ids, cache, attention_mask, last_only)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache: KVCache | None,
                 attention_mask: torch.Tensor | None, last_only: bool | torch.Tensor, plan: list | None = None, *,
                 embeds: torch.Tensor | None = None, deepstack=None) -> torch.Tensor:
        """`forward` after the token-id check (generate's decode steps feed ids it picked itself). With `plan`
        (`Thinker.plan()`, given when no hook listens) the layers run as `step.layer` without their modules;
        without it, through the modules unless no hook is registered anywhere. last_only may be a device tensor
        [1]: the logits of that position alone [B, 1, V]."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past == 0 and embeds is None:
            cache.rope_deltas = None         # a text prompt on a reused cache: no earlier media's offset
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
        if plan is None and not any(hook_dicts(self)):
            plan = self.plan()
        if embeds is not None:               # a multimodal prompt: token embeddings with the towers' outputs
            x = embeds
        else:
            x = model.embed_tokens(input_ids) if plan is None else F.embedding(input_ids, model.embed_tokens.weight)
        x = model.hook_embed(x)                                                           # [B, T, D]
        rope = self._rope(x, T, past, position_ids, attention_mask, cache)
        kvs = [KV(None, None, 0, mask)] * len(model.layers) if cache is None else \
            [KV(k, v, past, mask) for k, v in zip(cache.k.unbind(0), cache.v.unbind(0))]
        if plan is None:
            for i, (layer, kv) in enumerate(zip(model.layers, kvs)):
                x = layer(x, rope, kv)
                if deepstack is not None:    # vision features after the first layers (q3lab.omni.towers.DeepStack)
                    x = deepstack.add(x, i)
        else:
            decode = T == 1 and B == 1 and cache is not None and mask is None   # what step.layer_cpu fuses
            d, ks = model.layers[0].self_attn.dims, step.kernels_for(dev, self.dtype, self.config.hidden_size, decode)
            for i, ((w, experts), kv) in enumerate(zip(plan, kvs)):
                x = step.layer(x, w, d, rope, kv, ks, experts)
                if deepstack is not None:
                    x = deepstack.add(x, i)
        if cache is not None:
            cache.length += T
        if isinstance(last_only, torch.Tensor):   # a device index [1]: a padded prompt's last real token, no host
            x = x.index_select(1, last_only)      # value (StaticDecoder's graphed prefill replays it)
        elif last_only:
            x = x[:, -1:]
        if plan is None:
            return self.lm_head(model.hook_final_norm(model.norm(x))).float()
        return ks.linear(rms_norm(x, model.norm.weight, self.config.rms_norm_eps), self.lm_head.weight).float()

    def _rope(self, x, T, past, position_ids, attention_mask, cache) -> Rope:
        """The new tokens' rotary: rows of the cache's table (text positions), else from the positions."""
        B, dev = x.shape[0], x.device
        deltas = cache.rope_deltas if cache is not None else None   # a multimodal prompt's offset (q3lab.omni)
        if position_ids is None and attention_mask is None and cache is not None and deltas is None:
            cos, sin = self._rope_table(cache, x.dtype)                               # text positions 0..max_len
            if T == 1:   # every row at the same position: one rotation matrix for all layers
                return Rope(rope_matrix(cos[0, past, 0], sin[0, past, 0]), None)
            return Rope(cos.narrow(1, past, T), sin.narrow(1, past, T))
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=dev)[None].expand(B, T)
        if position_ids.dim() == 2:
            if deltas is not None:           # text after media: positions continue from the deltas
                position_ids = position_ids + deltas.to(position_ids.device)
            position_ids = position_ids[None].expand(3, B, T)
        if position_ids.shape != (3, B, T):
            raise InputError(f"position_ids must be [B, T] or [3, B, T] = [3, {B}, {T}], "
                             f"got {list(position_ids.shape)}")
        freqs = mrope_freqs(position_ids.to(dev), self.inv_freq, self.config.mrope_section,
                            self.config.mrope_interleaved)                          # [B, T, hd/2]
        cos, sin = (t[:, :, None] for t in rope_cos_sin(freqs, x.dtype))            # [B, T, 1, hd]
        return Rope(cos, sin)

    def _rope_table(self, cache: KVCache, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / folded sin [1, max_len, 1, hd] of text positions 0..max_len-1, made once per cache: a decode
        step then slices its row instead of recomputing angles (equal axes: the same as 1-D RoPE)."""
        c, f = self.config, self.inv_freq
        if cache.rope is not None and f.is_cuda and torch.cuda.is_current_stream_capturing():
            # a CUDA graph (StaticDecoder's bucket prefill) captures reads of the table its caller built and
            # checked just before the capture: the stamp below may read inv_freq on the host, an error there
            return cache.rope[1], cache.rope[2]
        # rebuilt when the angles change (rope_check writes inv_freq in place; inference tensors keep no version)
        stamp = tuple(f.tolist()) if f.is_inference() else (f.data_ptr(), f._version)
        key = (stamp, tuple(c.mrope_section), c.mrope_interleaved, dtype)
        if cache.rope is None or cache.rope[0] != key:
            pos = torch.arange(cache.max_len, device=self.device)[None, None].expand(3, 1, cache.max_len)
            freqs = mrope_freqs(pos, self.inv_freq, c.mrope_section, c.mrope_interleaved)
            cache.rope = (key, *(t[:, :, None] for t in rope_cos_sin(freqs, dtype)))
        return cache.rope[1], cache.rope[2]

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 seed: int | None = None, attention_mask: torch.Tensor | None = None,
                 streamer=None, **multimodal) -> torch.Tensor:
        """The prompt followed by up to max_new_tokens new tokens [B, T + n], with a KV cache.

        Rows that reach an eos token keep emitting it (padding), as transformers does with pad = eos.
        `streamer(token_ids [B])` is called with each new token as it comes. `multimodal`: the media arguments
        of `forward` (input_features=, pixel_values=, ..., use_audio_in_video=), fed with the prompt; decoding
        continues from the prompt's rope deltas.
        """
        unknown = sorted(set(multimodal) - set(_MULTIMODAL_ARGS))
        if unknown:
            raise InputError(f"generate: unknown argument(s) {unknown}; multimodal inputs are {list(_MULTIMODAL_ARGS)}")
        input_ids = self._check_generate(input_ids, max_new_tokens, do_sample, temperature, top_p, attention_mask)
        B, T = input_ids.shape
        total = T + max_new_tokens
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        cache = self.new_cache(B, total)
        mask = attention_mask.to(self.device).bool() if attention_mask is not None else None
        next_pos = None
        if mask is not None:
            next_pos = mask.long().sum(-1)                                           # [B]
            full = torch.ones(B, total, dtype=torch.bool, device=self.device)
            full[:, :T] = mask
            logits = self(input_ids, cache=cache, attention_mask=full[:, :T], last_only=True, **multimodal)[:, -1]
        else:
            logits = self(input_ids, cache=cache, last_only=True, **multimodal)[:, -1]
        from q3lab.runtime.finite import check_logits   # nan/inf: stop, naming the first layer where they appear
        check_logits(self, logits, input_ids, attention_mask=None if mask is None else full[:, :T])
        finite = torch.ones((), dtype=torch.bool, device=self.device)   # every later step, without a sync
        registry = hook_dicts(self)            # live dicts: a hook added during generation shows at the next step
        plan = self.plan()
        out = [input_ids]

        def pick(logits: torch.Tensor) -> torch.Tensor:
            nonlocal finite
            finite &= torch.isfinite(logits).all()
            return self._pick(logits, do_sample, temperature, top_p, gen) if not do_sample or bool(finite) \
                else logits.argmax(-1)   # [B] (multinomial would raise on nan; the check below names the cause)

        def advance(nxt: torch.Tensor) -> torch.Tensor:
            # ids from argmax/multinomial over the vocabulary need no range check. No hook anywhere: step.layer
            # over the plan; else through the modules (hooks on the Thinker itself, e.g. q3lab.record, see the call)
            nonlocal next_pos
            hooked = any(registry)
            pos, m = None, None
            if mask is not None:
                pos, m = next_pos[:, None], full[:, :cache.length + 1]
                next_pos = next_pos + 1
            if hooked and (self._forward_pre_hooks or self._forward_hooks or any(_GLOBAL_HOOKS)):
                return self(nxt[:, None], pos, cache=cache, attention_mask=m, last_only=True)[:, -1]
            return self._forward(nxt[:, None], pos, cache, m, True, None if hooked else plan)[:, -1]

        out += decode_loop(logits, pick, advance, max_new_tokens, eos, streamer)
        if not bool(finite):   # some step's logits held nan/inf: find the first layer over every token fed
            from q3lab.runtime.finite import diagnose
            ids = torch.cat(out, dim=1)[:, :-1]
            diagnose(self, ids, attention_mask=None if mask is None else full[:, :ids.shape[1]])
        return torch.cat(out, dim=1)

    def _check_generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool, temperature: float,
                        top_p: float, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """generate's argument checks (shared with the fast decoders' generate): the prompt as [B, T] ids on the
        model's device."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        input_ids = input_ids.to(self.device)
        self._check_ids(input_ids)
        B, T = input_ids.shape
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and (not temperature > 0 or not 0 < top_p <= 1):   # `not >` refuses nan too
            raise InputError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        total = T + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise InputError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise InputError(f"attention_mask must be [batch, tokens] = [{B}, {T}], "
                                 f"got {list(attention_mask.shape)}")
            last = attention_mask[:, -1].bool()
            if not bool(last.all()):  # the next token would be predicted from a pad: garbage, silently
                rows = (~last).nonzero().flatten().tolist()
                raise InputError(f"attention_mask: row(s) {rows} end in padding; generate needs left padding "
                                 f"(pad before the prompt, real tokens last)")
        return input_ids

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
_MULTIMODAL_ARGS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
                    "pixel_values_videos", "video_grid_thw", "use_audio_in_video", "video_second_per_grid")


def decode_loop(logits: torch.Tensor, pick, advance, max_new_tokens: int, eos: set[int], streamer=None
                ) -> list[torch.Tensor]:
    """The token loop of every generate (`Thinker.generate`, the fast decoders'): from the prompt's last logits
    [B, V], `pick(logits) -> [B]` chooses each token; a row that produced one of `eos` keeps producing eos[0];
    `advance(tokens [B]) -> logits [B, V]` feeds the chosen tokens. Stops after `max_new_tokens` or when every row
    has ended; returns the new tokens as [B, 1] columns."""
    out: list[torch.Tensor] = []
    eos_t = torch.tensor(sorted(eos), device=logits.device) if eos else None
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step_n in range(max_new_tokens):
        nxt = pick(logits)                                                            # [B]
        if eos_t is not None:
            nxt = torch.where(done, eos_t[0], nxt)
            done |= torch.isin(nxt, eos_t)
        out.append(nxt[:, None])
        if streamer is not None:
            streamer(nxt)
        if step_n == max_new_tokens - 1 or (eos_t is not None and bool(done.all())):
            break
        logits = advance(nxt)
    return out


def load(path: str | Path | WeightSource, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         experts: ExpertProvider | None = None, allow_missing: list[str] | None = None,
         progress: bool = False, towers: bool = False) -> Thinker:
    """Build a Thinker from a checkpoint folder or an extracted store (a path, or a source `open_source` gave).

    Every tensor the config implies must be present with the right shape: a missing one raises
    `CheckpointError` naming it. `allow_missing` (exact canonical names) is for ablations only: norms are
    then set to ones, other tensors to zeros, and each substitute is named in a warning.
    towers=True also loads the audio and vision towers (`thinker.audio_tower.*`, `thinker.visual.*`; the omni
    extra) as `model.towers`, for multimodal input; missing tower tensors raise `CheckpointError` naming them.
    """
    from q3lab.weights.source import open_source
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
    if towers:
        from q3lab.omni.towers import load_towers   # transformers' modules: only with towers=True
        model.towers = load_towers(src, device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()
