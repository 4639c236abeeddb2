"""Greedy batch-1 decoding with fixed shapes and routing kept on the device: a step a CUDA graph can replay.

`Thinker.generate` is the readable reference: it asks the host which experts each layer chose (a sync per
layer) and launches every small kernel from Python, so on a GPU it is bound by launches, not by bytes. Here
one decode step is written so that nothing in it needs the host:

- positions, the rotary angles and the attention mask come from device tensors (a table and a counter);
- keys/values go into a preallocated cache at the device-side position; attention runs over the whole cache
  with masked slots (fixed shape);
- the router's top-k ids feed `q3lab.moe_kernels.moe_one_token`, which reads the chosen experts in place;
- the next token is the argmax on the device, written back into the step's input.

So a step can be captured once (`torch.cuda.CUDAGraph`) and replayed per token. The arithmetic is the eager
model's except for the expert sum (float32 over the top-k, rounded once) and attention (explicit
matmul-softmax-matmul over the masked cache): logits agree to bf16 rounding, not bit for bit; tests compare
both with the eager model and transformers.

`OffloadedDecoder` is the same step with the experts in (pinned) host memory and a `DeviceExpertCache` on
the GPU: each layer's chosen ids go to the host once (the only sync), misses are copied in, and the same
kernels read cache slots instead of expert ids, so its outputs are bit-equal to `StaticDecoder`'s.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .errors import InputError
from .experts import ExpertProvider
from .decode_kernels import decode_attention, decode_attention_torch, route, topk_renorm, topk_renorm_torch
from .model import KVCache, Thinker, _rms, apply_rotary, hook_dicts, mrope_freqs
from .moe_kernels import moe_one_token


def qkv_rope(x, y_prev, cos, sin, pos, kc, vc, w_in, wqkv, wqn, wkn, *, H: int, K: int, hd: int, eps: float):
    """A layer's start for one token: the previous layer's weighted expert outputs y_prev [A', D] (float32)
    summed onto the residual x [1, 1, D] (here, so the sum fuses into this layer's first kernel), input norm,
    q/k/v projections (wqkv: the three weights concatenated, one projection; or a (q, k, v) tuple), q/k norms,
    rotary (cos/sin [1, 1, hd]) and the cache write at pos [1] into kc/vc [1, K, S, hd].
    Returns (x [1, 1, D], q [H, hd])."""
    x = x + y_prev.sum(0).to(x.dtype).view(1, 1, -1)
    h = _rms(x, w_in, eps)                                                            # [1, 1, D]
    if isinstance(wqkv, torch.Tensor):
        q, k, v = F.linear(h, wqkv).split([H * hd, K * hd, K * hd], dim=-1)
    else:
        q, k, v = (F.linear(h, w) for w in wqkv)
    q = _rms(q.view(1, 1, H, hd), wqn, eps)
    k = _rms(k.view(1, 1, K, hd), wkn, eps)
    q = apply_rotary(q.transpose(1, 2), cos, sin)                                     # [1, H, 1, hd]
    k = apply_rotary(k.transpose(1, 2), cos, sin)                                     # [1, K, 1, hd]
    kc.index_copy_(2, pos, k)
    vc.index_copy_(2, pos, v.view(1, 1, K, hd).transpose(1, 2))
    return x, q.reshape(H, hd)


def out_norm(x, att, wo, w_post, *, eps: float):
    """Output projection of the attention att [H, hd] + residual, post-attention norm:
    (x [1, 1, D], the experts' input [D])."""
    x = x + F.linear(att.reshape(1, 1, -1), wo)
    return x, _rms(x, w_post, eps).view(-1)


def out_route(x, att, wo, w_post, w_router, *, eps: float):
    """`out_norm` and the router's float32 softmax: (x [1, 1, D], the experts' input [D], probabilities [E])."""
    x, hm = out_norm(x, att, wo, w_post, eps=eps)
    return x, hm, torch.softmax(F.linear(hm, w_router), dim=-1, dtype=torch.float32)


def attention_and_route(x, y_prev, cos, sin, bias, pos, kc, vc, w_in, wq, wk, wv, wo, wqn, wkn, w_post, w_router,
                        *, H: int, K: int, hd: int, A: int, eps: float, norm_topk: bool):
    """One decoder layer of one token up to its experts, in plain torch ops, as a pure function of tensors
    (one compiled graph serves every layer): `qkv_rope`, attention over the cache masked by bias [S] (0 or
    -inf), `out_route`, top-k. Returns x + attention [1, 1, D], the experts' input [D], ids [A], weights [A]."""
    x, q = qkv_rope(x, y_prev, cos, sin, pos, kc, vc, w_in, (wq, wk, wv), wqn, wkn, H=H, K=K, hd=hd, eps=eps)
    att = decode_attention_torch(q, kc[0], vc[0], bias, hd ** -0.5)                 # [H, hd]
    x, hm, probs = out_route(x, att, wo, w_post, w_router, eps=eps)
    idx, w = topk_renorm_torch(probs, A, norm_topk, x.dtype)
    return x, hm, idx, w


def _refuse_hooks(model: Thinker) -> None:
    if any(hook_dicts(model)):
        hooked = [n or "<the model>" for n, m in model.named_modules()
                  if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks]
        raise InputError(f"the static decoder does not call hook points, and hooks are registered "
                         f"({', '.join(hooked[:3]) or 'global module hooks'}...): record with Thinker.generate "
                         f"instead")


class StaticDecoder:
    """Greedy decoding of one sequence; experts from `ResidentExperts`-style stacked tensors.

    max_len: the longest prompt + new tokens this decoder serves (its KV cache is preallocated to it).
    cuda_graph: capture the step in a CUDA graph (default: when the model is on CUDA).
    compile: `torch.compile` the per-layer attention + router function (one compilation serves all layers).
    fused: fewer, larger kernels per layer: q/k/v as one projection (their weights concatenated: one extra
        copy of them, about 1 GB at the real size), attention over the cache and the router's top-k as one
        Triton kernel each (`q3lab.decode_kernels`; torch twins off CUDA).
    fused_router: with fused, also the router's GEMV, softmax and top-k as two Triton kernels (default: = fused).
    layer_experts: callable(layer) -> (gate [E, I, D], up [E, I, D], down [E, D, I]); default: the model's
        resident provider's stacked tensors.
    """

    def __init__(self, model: Thinker, max_len: int, *, cuda_graph: bool | None = None, layer_experts=None,
                 compile: bool = False, fused: bool = False, fused_router: bool | None = None):
        _refuse_hooks(model)
        c = model.config
        self.model, self.config, self.max_len = model, c, int(max_len)
        if self.max_len > c.max_position_embeddings:
            raise InputError(f"max_len {max_len} exceeds max_position_embeddings {c.max_position_embeddings}")
        dev, dt = model.device, model.dtype
        self.device, self.dtype = dev, dt
        if layer_experts is None:
            p = model.experts_provider
            if not all(hasattr(p, a) for a in ("gate", "up", "down")):
                raise InputError(f"StaticDecoder needs stacked resident experts (ResidentExperts), got "
                                 f"{type(p).__name__}; pass layer_experts= or use OffloadedDecoder")
            layer_experts = lambda layer: (p.gate[layer], p.up[layer], p.down[layer])  # noqa: E731
        self.layer_experts = layer_experts
        self._layer_weights = []
        for lay in model.model.layers:
            at = lay.self_attn
            self._layer_weights.append((lay.input_layernorm.weight, at.q_proj.weight, at.k_proj.weight,
                                        at.v_proj.weight, at.o_proj.weight, at.q_norm.weight, at.k_norm.weight,
                                        lay.post_attention_layernorm.weight, lay.mlp.gate.weight))
        H, K, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        fn = functools.partial(attention_and_route, H=H, K=K, hd=hd, A=c.num_experts_per_tok, eps=c.rms_norm_eps,
                               norm_topk=c.norm_topk_prob)
        # compiling fuses the norms, rotary, softmax and top-k into a few kernels: on a GPU the step is bound
        # by kernel count, not bytes, without it
        wrap = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if compile else (lambda f: f)
        self._pre_fn = wrap(fn)
        self.fused = fused
        self.fused_router = fused if fused_router is None else (fused and fused_router)
        if fused:
            self._qkv_fn = wrap(functools.partial(qkv_rope, H=H, K=K, hd=hd, eps=c.rms_norm_eps))
            self._out_fn = wrap(functools.partial(out_norm if self.fused_router else out_route, eps=c.rms_norm_eps))
            self._wqkv = [torch.cat([w[1], w[2], w[3]], dim=0) for w in self._layer_weights]
        self.cache = KVCache(c, 1, self.max_len, device=dev, dtype=dt)
        pos = torch.arange(self.max_len, device=dev)[None, None].expand(3, 1, self.max_len)
        emb = torch.cat([mrope_freqs(pos, model.inv_freq, c.mrope_section, c.mrope_interleaved)] * 2, -1)[0]
        self.cos_table, self.sin_table = emb.cos().to(dt), emb.sin().to(dt)          # [max_len, hd]
        self.slots = torch.arange(self.max_len, device=dev)
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)                       # the step's input token
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)                       # its position
        self.n = torch.zeros(1, dtype=torch.long, device=dev)                         # tokens emitted so far
        self.out = torch.zeros(self.max_len, dtype=torch.long, device=dev)
        self.no_experts = torch.zeros(1, c.hidden_size, dtype=torch.float32, device=dev)   # layer 0's "previous"
        self.graph: torch.cuda.CUDAGraph | None = None
        use_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
        if use_graph:
            self._capture()

    # -- one step --------------------------------------------------------------------------------
    def _pre(self, layer: int, x: torch.Tensor, y_prev: torch.Tensor, cos, sin, bias):
        """Layer `layer` up to its experts, from the residual x and the previous layer's expert outputs y_prev:
        (x after attention [1, 1, D], the experts' input h [D], ids [A], weights [A])."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]                             # [1, K, S, hd]
        if not self.fused:
            return self._pre_fn(x, y_prev, cos, sin, bias, self.pos, kc, vc, *self._layer_weights[layer])
        c = self.config
        w_in, _, _, _, wo, wqn, wkn, w_post, w_router = self._layer_weights[layer]
        x, q = self._qkv_fn(x, y_prev, cos, sin, self.pos, kc, vc, w_in, self._wqkv[layer], wqn, wkn)
        att = decode_attention(q, kc[0], vc[0], bias, c.head_dim ** -0.5)            # [H, hd]
        if self.fused_router:
            x, h = self._out_fn(x, att, wo, w_post)
            idx, w = route(h, w_router, c.num_experts_per_tok, c.norm_topk_prob)
        else:
            x, h, probs = self._out_fn(x, att, wo, w_post, w_router)
            idx, w = topk_renorm(probs, c.num_experts_per_tok, c.norm_topk_prob, x.dtype)
        return x, h, idx, w

    def _embed(self):
        x = F.embedding(self.tok.view(1, 1), self.model.model.embed_tokens.weight)    # [1, 1, D]
        cos = self.cos_table.index_select(0, self.pos)[None]                           # [1, 1, hd]
        sin = self.sin_table.index_select(0, self.pos)[None]
        bias = torch.where(self.slots <= self.pos, 0.0, float("-inf"))                  # [S]
        return x, cos, sin, bias

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> None:
        c = self.config
        x = x + y.sum(0).to(x.dtype).view(1, 1, -1)
        x = _rms(x, self.model.model.norm.weight, c.rms_norm_eps)
        nxt = F.linear(x, self.model.lm_head.weight).float().view(-1).argmax().view(1)
        self.out.index_copy_(0, self.n, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.n.add_(1)

    def _step(self) -> None:
        x, cos, sin, bias = self._embed()
        y = self.no_experts
        for layer in range(self.config.num_hidden_layers):
            x, h, idx, w = self._pre(layer, x, y, cos, sin, bias)
            y = moe_one_token(h, idx, w, *self.layer_experts(layer), partials=True)     # [A, D] float32
        self._finish(x, y)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up (Triton compiles, cuBLAS handles) before capture; writes slot 0 only
                self.pos.zero_(), self.n.zero_()
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.pos.zero_(), self.n.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def step(self) -> None:
        """Decode one token from the state on the device (replays the graph when there is one)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    # -- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> None:
        """Run the prompt [1, T] through the eager model into this decoder's cache; the first new token
        (its argmax) becomes the next step's input."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.shape[0] != 1:
            raise InputError(f"the static decoder serves one sequence, got batch {input_ids.shape[0]}")
        input_ids = input_ids.to(self.device)
        T = input_ids.shape[1]
        if T >= self.max_len:
            raise InputError(f"prompt of {T} tokens leaves no room in max_len={self.max_len}")
        self.cache.length = 0
        logits = self.model(input_ids, cache=self.cache, last_only=True)[0, -1]
        nxt = logits.argmax().view(1)
        self.out[0] = nxt[0]
        self.tok.copy_(nxt)
        self.pos.fill_(T)
        self.n.fill_(1)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation [1, T + max_new_tokens], equal to `Thinker.generate` up to rounding."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        T = input_ids.shape[-1]
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if T + max_new_tokens > self.max_len:
            raise InputError(f"{T} + {max_new_tokens} tokens exceed this decoder's max_len={self.max_len}")
        self.prefill(input_ids)
        for _ in range(max_new_tokens - 1):
            self.step()
        return torch.cat([input_ids.to(self.device), self.out[:max_new_tokens][None]], dim=1)


# -- experts in host memory, a cache of them on the device ---------------------------------------
from .device_cache import DeviceExpertCache  # noqa: E402  (the cache lives in its own module)


class OffloadedDecoder(StaticDecoder):
    """`StaticDecoder` with experts served by a `DeviceExpertCache`. Each layer is two segments: attention +
    router (whose top-k ids are copied to pinned host memory), then the experts; between them the host waits
    for the ids (the one sync per layer), copies in the missing experts and writes the slot ids. On CUDA each
    segment is a captured graph, so a layer costs two graph launches and one sync, not dozens of launches.
    The cache becomes the model's expert provider, so the (eager) prefill reads the same slots."""

    def __init__(self, model: Thinker, max_len: int, cache: DeviceExpertCache, *, compile: bool = False,
                 fused: bool = False, fused_router: bool | None = None, cuda_graph: bool | None = None):
        self.expert_cache = cache
        model.set_experts(cache)
        super().__init__(model, max_len, cuda_graph=False, layer_experts=lambda layer: None, compile=compile,
                         fused=fused, fused_router=fused_router)
        c, dev, dt = self.config, self.device, self.dtype
        A, D = c.num_experts_per_tok, c.hidden_size
        pin = dev.type == "cuda"
        self.x_buf = torch.zeros(1, 1, D, device=dev, dtype=dt)
        self.y_buf = torch.zeros(A, D, device=dev, dtype=torch.float32)
        self.h_buf = torch.zeros(D, device=dev, dtype=dt)
        self.w_buf = torch.zeros(A, device=dev, dtype=dt)
        self.idx_buf = torch.zeros(A, device=dev, dtype=torch.long)
        self.slot_buf = torch.zeros(A, device=dev, dtype=torch.long)
        self.idx_host = torch.zeros(A, dtype=torch.long, pin_memory=pin)
        self.slot_host = torch.zeros(A, dtype=torch.long, pin_memory=pin)
        hd = c.head_dim
        self.rope_buf = torch.zeros(2, 1, 1, hd, device=dev, dtype=dt)
        self.bias_buf = torch.zeros(self.max_len, device=dev, dtype=torch.float32)
        L = c.num_hidden_layers
        self._segments = {"embed": self._seg_embed, "finish": self._seg_finish}
        for layer in range(L):
            self._segments[("pre", layer)] = functools.partial(self._seg_pre, layer)
            self._segments[("moe", layer)] = functools.partial(self._seg_moe, layer)
        self._graphs: dict = {}
        # benchmarks only: callable(layer, router_ids) -> ids actually served (outputs are then meaningless)
        self.route_override = None
        if (dev.type == "cuda") if cuda_graph is None else cuda_graph:
            self._capture_segments()

    # segments: each reads and writes only the static buffers, so each can be a graph
    def _seg_embed(self) -> None:
        x, cos, sin, bias = self._embed()
        self.x_buf.copy_(x), self.rope_buf[0].copy_(cos), self.rope_buf[1].copy_(sin), self.bias_buf.copy_(bias)
        self.y_buf.zero_()

    def _seg_pre(self, layer: int) -> None:
        x, h, idx, w = self._pre(layer, self.x_buf, self.y_buf, self.rope_buf[0], self.rope_buf[1], self.bias_buf)
        self.x_buf.copy_(x), self.h_buf.copy_(h), self.idx_buf.copy_(idx), self.w_buf.copy_(w)
        self.idx_host.copy_(self.idx_buf, non_blocking=True)

    def _seg_moe(self, layer: int) -> None:
        c = self.expert_cache
        self.y_buf.copy_(moe_one_token(self.h_buf, self.slot_buf, self.w_buf, c.gate, c.up, c.down, partials=True))

    def _seg_finish(self) -> None:
        self._finish(self.x_buf, self.y_buf)

    def _run(self, key) -> None:
        g = self._graphs.get(key)
        g.replay() if g is not None else self._segments[key]()

    def _capture_segments(self) -> None:
        saved = (self.expert_cache.hits, self.expert_cache.misses)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):           # warm-up (compilation, Triton) at slot 0, which prefill rewrites
            self.pos.zero_(), self.n.zero_()
            for fn in self._segments.values():
                fn()
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for key, fn in self._segments.items():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                fn()
            self._graphs[key] = g
        self.pos.zero_(), self.n.zero_()
        self.expert_cache.hits, self.expert_cache.misses = saved

    def _step(self) -> None:
        self._run("embed")
        for layer in range(self.config.num_hidden_layers):
            self._run(("pre", layer))
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()                         # the one sync per layer
            ids = self.idx_host.tolist()
            if self.route_override is not None:
                ids = self.route_override(layer, ids)
            slots = self.expert_cache.slots(layer, ids)
            self.slot_host.copy_(torch.tensor(slots, dtype=torch.long))
            self.slot_buf.copy_(self.slot_host, non_blocking=True)
            self._run(("moe", layer))
        self._run("finish")
