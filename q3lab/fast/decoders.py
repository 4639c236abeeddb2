"""Decoding with fixed shapes and routing kept on the device: steps a CUDA graph can replay. Drivers of `q3lab.runtime.step`.

`Thinker.generate` is the readable reference: it runs each step from Python with host-side cache lengths, so on a
GPU it is bound by launches, not by bytes. The decoders here run the same layer (`step.attend_route` and the
kernel set's `moe`, the functions the model's modules call) on fixed-shape device state, so that nothing in a step
needs the host:

- rotary positions, the cache slot and the attention bias come from device tensors (a table and counters);
- keys/values go into a preallocated cache at the device-side slot; attention runs over the whole cache with the
  unused and padding slots masked (fixed shape);
- the router's top-k ids feed the experts kernel, which reads the chosen experts in place;
- routing is written on the device into preallocated buffers (`q3lab.record` reads them after the generation).

So a step can be captured once (`torch.cuda.CUDAGraph`) and replayed per token. Tokens are picked outside the step
as `Thinker.generate` picks them (greedy, sampling, eos). Logits agree with the eager model to rounding (the
rotary is elementwise here, a matrix there; attention runs over the masked fixed cache), not bit for bit: tests
compare both with the eager model and transformers.

`OffloadedDecoder` is the same step with the experts in (pinned) host memory and a `DeviceExpertCache` on
the GPU: each layer's chosen ids go to the host once (the only sync), misses are copied in, and the same
kernels read cache slots instead of expert ids, so its outputs are bit-equal to `StaticDecoder`'s.
"""
from __future__ import annotations

import ctypes
import time
import types
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from q3lab.runtime.recording import active_recorders
from q3lab.runtime import step
from q3lab.fast.device_cache import DeviceExpertCache
from q3lab.errors import InputError, Q3LabError
from q3lab.runtime.experts import ExpertProvider
from q3lab.runtime.thinker import (KVCache, Thinker, decode_loop, hook_dicts, mrope_freqs, rms_norm, rope_cos_sin,
                                   stacked_experts)
from q3lab.runtime.step import KV, Rope


def _fresh(fn):
    """A copy of `fn` with its own code object: torch.compile keeps its compiled graphs and recompile count per
    code object, so each decoder compiling its own copy never meets another decoder's recompile limit."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _lap(prof: dict, phase: str, t0: float, clock) -> float:
    """Add the time since t0 to `phase`; returns now (the next phase's start)."""
    t = clock()
    prof[phase] += t - t0
    return t


class _HostEvent:
    """The host clock standing in for a CUDA event where there is no GPU (the segments run eagerly on the
    CPU, so their host time is their compute time): the same `elapsed_time` in ms."""
    __slots__ = ("t",)

    def __init__(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other: "_HostEvent") -> float:
        return (other.t - self.t) * 1e3


def _event(stream, cuda: bool):
    """A timing event recorded now on `stream` (None: the current stream); without CUDA a `_HostEvent`."""
    if not cuda:
        return _HostEvent()
    e = torch.cuda.Event(enable_timing=True)
    e.record(stream)
    return e


def _foreign_hooks(model: Thinker) -> list[str]:
    """Where hooks other than an active `q3lab.record`'s are registered ('' when none)."""
    ours = {h.id for rec in active_recorders(model) for h in rec._handles}
    where = []
    for name, m in model.named_modules():
        for d in (m._forward_pre_hooks, m._forward_hooks, m._backward_pre_hooks, m._backward_hooks):
            if any(k not in ours for k in d):
                where.append(name or "<the model>")
                break
    if any(hook_dicts(torch.nn.Module())):      # only the global registries
        where.append("global module hooks")
    return where


def _refuse_hooks(model: Thinker) -> None:
    where = _foreign_hooks(model)
    if where:
        raise InputError(f"the fast decoders do not call Python hooks, and hooks are registered on "
                         f"{', '.join(where[:3])}{'...' if len(where) > 3 else ''}: arbitrary hook code needs the "
                         f"eager path (Thinker.generate). Routing can be recorded here: q3lab.record(model) is "
                         f"written on the device by the decoders")


class PrefillCaptureError(Q3LabError):
    """The bucket prefill could not be captured as a CUDA graph (something in the forward needs the host)."""


class _Bucket(NamedTuple):
    """A prefill bucket's fixed buffers: the padded ids [B, bucket], the last real token's index [1], the logits
    [B, V] float32, and {"graph": its CUDA graph, "rope": the table it reads} once captured."""
    ids: torch.Tensor
    last: torch.Tensor
    logits: torch.Tensor
    graph: dict


class StaticDecoder:
    """Decoding with fixed shapes; experts from `ResidentExperts`-style stacked tensors.

    max_len: the longest prompt + new tokens this decoder serves (its KV cache is preallocated to it).
    batch: the batch its state is first allocated for (a generate call with another batch reallocates it).
    cuda_graph: capture the step in a CUDA graph (default: when the model is on CUDA).
    compile: `torch.compile` the per-layer attention + router function (one compilation serves all layers); a
        string names the backend (True: "inductor"; "eager" checks tracing alone).
    fused: the Triton kernel set (`step.kernels`): q/k/v as one projection (their weights concatenated: one extra
        copy of them, about 1 GB at the real size), attention over the cache, the router and the experts as Triton
        kernels where they apply (one sequence on CUDA; the torch set elsewhere).
    fused_router: with fused, also the router's GEMV and softmax in Triton (default: = fused; else only its top-k).
        fused="layer": the `step.LAYER` set instead, with the layer's small steps fused further (q/k/v and o_proj
        as Triton GEMVs, the o_proj one adding the residual; q/k norms + rotary + cache write + attention in one
        kernel; the post-attention norm + router + softmax + top-k in one kernel).
    layer_experts: callable(layer) -> (gate [E, I, D], up [E, I, D], down [E, D, I]); default: the model's
        resident provider's stacked tensors.
    prefill_buckets: the prompt lengths a graphed prefill is captured for (default: powers of two from 16 up to
        max_len); a prompt is right-padded to the smallest bucket that holds it (see `prefill`).
    prefill_graphs: True: the bucket prefill replays a CUDA graph captured once per (batch, bucket) on first use
        (CUDA only); "padded": the same right-padded forward run eagerly, without a graph (what the graph
        captures; CPU tests run it); False (default): every prefill is the eager one. Opt-in because a padded
        prefill agrees with the unpadded one to rounding, not bit for bit (longer GEMMs may sum in another
        order), and `OffloadedDecoder`'s bit-equality with this decoder rests on both running the eager prefill.
        Memory: a graph keeps the activations it was captured with;
        the bucket graphs share one private pool, so it holds about the largest captured bucket's working set (one
        layer's at a time: at the real dimensions in bf16 and T=4096 the grouped experts' rows [N*A, D] and
        [N*A, 2I], some hundreds of MB, estimated; bench/gpu_rows_prefill.py reports the measured growth) plus
        each bucket's ids and logits [B, V], while the decoder lives (a new batch size frees them);
        prefill_graphs=False holds none.
    """

    def __init__(self, model: Thinker, max_len: int, *, batch: int = 1, cuda_graph: bool | None = None,
                 layer_experts=None, compile: bool | str = False, fused: bool = False,
                 fused_router: bool | None = None, prefill_buckets: Sequence[int] | None = None,
                 prefill_graphs: bool | str = False):
        _refuse_hooks(model)
        c = model.config
        self.model, self.config, self.max_len = model, c, int(max_len)
        if self.max_len > c.max_position_embeddings:
            raise InputError(f"max_len {max_len} exceeds max_position_embeddings {c.max_position_embeddings}")
        dev, dt = model.device, model.dtype
        self.device, self.dtype = dev, dt
        if layer_experts is None:
            p = model.experts_provider
            if stacked_experts(p, 0) is None:
                raise InputError(f"StaticDecoder needs stacked resident experts (ResidentExperts), got "
                                 f"{type(p).__name__}; pass layer_experts= or use OffloadedDecoder")
            layer_experts = lambda layer: stacked_experts(p, layer)  # noqa: E731
        self.layer_experts = layer_experts
        self.dims = step.Dims.of(c)
        self.fused = fused
        self.fused_router = fused if fused_router is None else (fused and fused_router)
        self.kernels = step.kernels(fused, self.fused_router)
        self._weights = [lay.weights() for lay in model.model.layers]
        if fused:
            self._weights = [w._replace(qkv=torch.cat([w.wq, w.wk, w.wv], dim=0)) for w in self._weights]
        # compiling fuses the norms, rotary, softmax and top-k into a few kernels: on a GPU the step is bound by
        # kernel count, not bytes, without it. The Triton kernels stay outside the compiled graphs (fullgraph off).
        self._pre_fn = step.attend_route
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self._pre_fn = torch.compile(_fresh(step.attend_route), fullgraph=not fused, dynamic=False,
                                         backend=backend)
        pos = torch.arange(self.max_len, device=dev)[None, None].expand(3, 1, self.max_len)
        cos, sin = rope_cos_sin(mrope_freqs(pos, model.inv_freq, c.mrope_section, c.mrope_interleaved), dt)
        self.cos_table, self.sin_table = cos[0], sin[0]                                # [max_len, hd], folded sin
        self.slots = torch.arange(self.max_len, device=dev)
        self._use_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
        self.prefill_buckets = self._check_buckets(prefill_buckets)
        if prefill_graphs not in (True, False, "padded"):
            raise InputError(f"prefill_graphs must be True, False or 'padded', got {prefill_graphs!r}")
        prefill_graphs = prefill_graphs if prefill_graphs == "padded" else bool(prefill_graphs)
        if prefill_graphs is True and dev.type != "cuda":
            raise InputError(f"prefill_graphs=True captures CUDA graphs and the model is on {dev}; "
                             f"prefill_graphs='padded' runs the same bucket prefill without a graph")
        self.prefill_graphs = prefill_graphs
        self._recording = (False, False)       # (ids and weights, router logits) written by the step
        self._alloc(batch)
        self._ready()

    # -- device state -----------------------------------------------------------------------------
    def _alloc(self, batch: int) -> None:
        """The step's fixed-shape state for `batch` rows (drops any captured graph)."""
        c, dev, dt = self.config, self.device, self.dtype
        B, L, A, S = int(batch), c.num_hidden_layers, c.num_experts_per_tok, self.max_len
        self.batch = B
        self.cache = KVCache(c, B, S, device=dev, dtype=dt)
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)                       # the step's input tokens
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)                       # their rotary positions
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)                      # their cache slot
        self.n = torch.zeros(1, dtype=torch.long, device=dev)                         # steps run since prefill
        self.valid = torch.ones(B, S, dtype=torch.bool, device=dev)                   # False: padding keys
        self.logits = torch.zeros(B, c.vocab_size, dtype=torch.float32, device=dev)   # the step's output
        self.out = torch.zeros(S + 1, B, dtype=torch.long, device=dev)                # greedy tokens: prefill's, steps'
        self.no_experts = torch.zeros(B, A, c.hidden_size, dtype=torch.float32, device=dev)  # layer 0's "previous"
        self.rec_ids = torch.zeros(S, L, B, A, dtype=torch.long, device=dev)          # routing per step, layer
        self.rec_w = torch.zeros(S, L, B, A, dtype=torch.float32, device=dev)
        self.rec_logits: torch.Tensor | None = None
        self.graph = None
        self._captured = None
        self._prefill_state: dict = {}         # (batch, bucket) -> _Bucket: its buffers and graph (on this cache)
        self._prefill_pool = None
        self._set_recording(*self._recording)

    def _set_recording(self, ids: bool, logits: bool) -> None:
        if logits and (self.rec_logits is None):
            c = self.config
            self.rec_logits = torch.zeros(self.max_len, c.num_hidden_layers, self.batch, c.num_experts,
                                          dtype=torch.float32, device=self.device)
        self._recording = (ids or logits, logits)

    def _write_routing(self, layer: int, logits, ids, w) -> None:
        """Routing of this step into the device buffers at step index n (no host value: graph-safe). Inside
        `_step` the layers' routing is collected and written once at the end of the step (`_flush_routing`)."""
        rec_ids, rec_logits = self._recording
        pending = getattr(self, "_pending", None)
        if pending is not None:
            if rec_ids:
                pending.append((logits, ids, w))
            return
        if rec_ids:
            self.rec_ids.select(1, layer).index_copy_(0, self.n, ids.view(1, self.batch, -1))
            self.rec_w.select(1, layer).index_copy_(0, self.n, w.float().view(1, self.batch, -1))
        if rec_logits:
            self.rec_logits.select(1, layer).index_copy_(0, self.n, logits.float().view(1, self.batch, -1))

    # -- one step --------------------------------------------------------------------------------
    def _embed(self):
        """x [B, 1, D], the rotary rows and the attention bias [B, 1, 1, S] of the step's tokens."""
        B, hd = self.batch, self.config.head_dim
        x = F.embedding(self.tok.view(B, 1), self.model.model.embed_tokens.weight)      # [B, 1, D]
        rope = Rope(self.cos_table.index_select(0, self.pos).view(B, 1, 1, hd),
                    self.sin_table.index_select(0, self.pos).view(B, 1, 1, hd))
        # in the activations' dtype: SDPA wants an additive mask of the query's dtype (a float32 one with bf16
        # queries gave wrong attention on CUDA, tests/gpu)
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        bias = torch.where(self.valid & (self.slots <= self.slot), zero, float("-inf"))  # [B, S]
        return x, rope, bias.view(B, 1, 1, -1)

    def _pre(self, layer: int, x, y_prev, rope, bias):
        """Layer `layer` up to its experts (`step.attend_route`): (x [B, 1, D], h [B, D], ids [B, A], w [B, A])."""
        kv = KV(self.cache.k[layer], self.cache.v[layer], self.slot, bias)
        x, h, logits, ids, w = self._pre_fn(x, y_prev, self._weights[layer], self.dims, rope, kv, self.kernels)
        self._write_routing(layer, logits, ids, w)
        return x, h, ids, w

    def _moe(self, h, ids, w, gate, up, down):
        """The weighted expert outputs [B, A, D] float32, ids read on the device."""
        return self.kernels.moe(h, ids, w, gate, up, down, gather=True)

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.kernels.residual_norm is not None:       # the last experts' sum + residual + final norm, fused
            _, x = self.kernels.residual_norm(x, y, self.model.model.norm.weight, self.config.rms_norm_eps)
        else:
            x = x + y.sum(1).to(x.dtype).view(x.shape)
            x = rms_norm(x, self.model.model.norm.weight, self.config.rms_norm_eps)
        self.logits.copy_(F.linear(x, self.model.lm_head.weight).view(self.batch, -1))   # copy_ casts to float32
        # the greedy choice stays on the device too, so `step()` alone decodes greedily (bench/gpu_decode.py);
        # generate feeds its own pick (sampling, eos) into `tok` before each step
        self.tok.copy_(self.logits.argmax(-1))
        self.out.index_copy_(0, self.n + 1, self.tok.view(1, -1))
        self.pos.add_(1)
        self.slot.add_(1)
        self.n.add_(1)

    def _flush_routing(self, pending: list) -> None:
        """The step's routing of every layer into the recording buffers at step n: a stack and one index_copy
        per buffer (3-4 kernels a step instead of 2-3 a layer, issue 15)."""
        if not pending:
            return
        B, L = self.batch, len(pending)
        ids = torch.stack([p[1].view(B, -1) for p in pending])                        # [L, B, A]
        w = torch.stack([p[2].view(B, -1) for p in pending]).float()
        self.rec_ids.index_copy_(0, self.n, ids.view(1, L, B, -1))
        self.rec_w.index_copy_(0, self.n, w.view(1, L, B, -1))
        if self._recording[1]:
            logits = torch.stack([p[0].reshape(B, -1) for p in pending]).float()
            self.rec_logits.index_copy_(0, self.n, logits.view(1, L, B, -1))

    def _step(self) -> None:
        x, rope, bias = self._embed()
        y = self.no_experts
        self._pending = []
        try:
            for layer in range(self.config.num_hidden_layers):
                x, h, idx, w = self._pre(layer, x, y, rope, bias)
                y = self._moe(h, idx, w, *self.layer_experts(layer))
            self._flush_routing(self._pending)
        finally:
            self._pending = None
        self._finish(x, y)

    def _warm_and_capture(self, fns: dict) -> dict:
        """Warm up (compilation, Triton, cuBLAS handles) on a side stream, then capture each of `fns` in a graph.
        The warm-up writes slot 0 and step 0, which prefill rewrites."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.pos.zero_(), self.slot.zero_(), self.n.zero_()
                for fn in fns.values():
                    fn()
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for key, fn in fns.items():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                fn()
            graphs[key] = g
        self.pos.zero_(), self.slot.zero_(), self.n.zero_()
        return graphs

    def _capture(self) -> None:
        self.graph = self._warm_and_capture({"step": self._step})["step"]

    def _ready(self) -> None:
        """Capture (again) when the recording mode changed since the last capture (this resets the step's state:
        call it before `prefill`)."""
        if self._use_graph and self._captured != self._recording:
            self._capture()
            self._captured = self._recording

    def step(self) -> None:
        """Decode one token from the state on the device (replays the graph when there is one)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    # -- prefill --------------------------------------------------------------------------------------
    def _check_buckets(self, buckets: Sequence[int] | None) -> tuple[int, ...]:
        """The prefill buckets, ascending (default: powers of two from 16 up to max_len)."""
        if buckets is None:
            out, b = [], 16
            while b <= self.max_len:
                out.append(b)
                b *= 2
            return tuple(out)
        out = sorted({int(b) for b in buckets})
        bad = [b for b in out if not 1 <= b <= self.max_len]
        if bad:
            raise InputError(f"prefill_buckets {bad} lie outside 1..max_len={self.max_len} (a bucket's padded "
                             f"prompt is written into the cache)")
        return tuple(out)

    def prefill_bucket(self, T: int, attention_mask: torch.Tensor | None = None) -> int | None:
        """The bucket a prompt of T tokens is padded to by `prefill`, or None when it runs the eager prefill
        (prefill_graphs=False, a left-padded batch, hooks or `q3lab.record` active, experts served by a cache,
        or no bucket holds T)."""
        if self.prefill_graphs is False or attention_mask is not None or any(hook_dicts(self.model)):
            return None
        if stacked_experts(self.model.experts_provider, 0) is None:   # a cache's host-side serving syncs
            return None
        return next((b for b in self.prefill_buckets if b >= T), None)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt [B, T] (left padding: attention_mask [B, T]) through the eager model into this decoder's
        cache and set the step's state after it; returns the last prompt token's logits [B, V].

        Bucket prefill (`prefill_bucket`): the prompt is right-padded (token 0) to its bucket and the model's own
        forward (`Thinker._forward`, the functions and kernel set of the eager prefill) runs the bucket into the
        cache; the last real token's logits are picked by a device-side index. The pads change nothing before
        them (causal attention, per-token routing); their keys/values lie in the slots from T on, which each
        decode step overwrites (its slot) before attending, and the step's bias masks every slot after its own
        (`_embed`). With prefill_graphs=True that forward is a CUDA graph captured per (batch, bucket) on first
        use (warm-up on a side stream), replayed afterwards. Left-padded batches (attention_mask), hooks or an
        active `q3lab.record` (whose hooks must see the prompt), experts from a cache, and prompts longer than
        the largest bucket take the eager prefill, as before."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        B, T = input_ids.shape
        if B != self.batch:
            self._alloc(B)
        input_ids = input_ids.to(self.device)
        if T >= self.max_len:
            raise InputError(f"prompt of {T} tokens leaves no room in max_len={self.max_len}")
        self.cache.length = 0
        self.valid.fill_(True)
        bucket = self.prefill_bucket(T, attention_mask)
        if bucket is not None:
            self.model._check_ids(input_ids)          # forward's check (it reads the ids on the host: not captured)
            logits = self._prefill_padded(input_ids, bucket)
            self.pos.fill_(T)
        elif attention_mask is not None:
            mask = attention_mask.to(self.device).bool()
            self.valid[:, :T].copy_(mask)
            full = self.valid[:, :T].clone()
            logits = self.model(input_ids, cache=self.cache, attention_mask=full, last_only=True)[:, -1]
            self.pos.copy_(mask.long().sum(-1))
        else:
            logits = self.model(input_ids, cache=self.cache, last_only=True)[:, -1]
            self.pos.fill_(T)
        self.slot.fill_(T)
        self.n.zero_()
        self.tok.copy_(logits.argmax(-1))
        self.out[0] = self.tok
        return logits

    def _prefill_padded(self, input_ids: torch.Tensor, bucket: int) -> torch.Tensor:
        """The bucket prefill of `prefill`: logits [B, V] of the last real token (a copy: the buffers are reused)."""
        B, T = input_ids.shape
        st = self._prefill_state.get((B, bucket))
        if st is None:
            dev = self.device
            st = _Bucket(torch.zeros(B, bucket, dtype=torch.long, device=dev),
                         torch.zeros(1, dtype=torch.long, device=dev),
                         torch.zeros(B, self.config.vocab_size, dtype=torch.float32, device=dev), {})
            self._prefill_state[(B, bucket)] = st
        st.ids.zero_()
        st.ids[:, :T].copy_(input_ids)
        st.last.fill_(T - 1)
        if self.prefill_graphs is True:
            # the graph reads the rope table it was captured with: a rebuilt one (inv_freq changed) recaptures
            cos, _ = self.model._rope_table(self.cache, self.dtype)
            if st.graph.get("graph") is None or st.graph.get("rope") is not cos:
                self._capture_prefill(st)
            st.graph["graph"].replay()
        else:
            self._prefill_forward(st)
        self.cache.length = T
        return st.logits.clone()

    def _prefill_forward(self, st: "_Bucket") -> None:
        """The bucket's forward into the cache from slot 0, written into st.logits (what the graph captures)."""
        self.cache.length = 0
        self.cache.rope_deltas = None
        logits = self.model._forward(st.ids, None, self.cache, None, st.last)      # [B, 1, V] float32
        st.logits.copy_(logits[:, 0])

    def _capture_prefill(self, st: "_Bucket") -> None:
        """Warm up (cuBLAS, grouped GEMM workspaces) on a side stream, then capture the bucket's forward. The rope
        table is built and checked before the capture (`Thinker._rope_table` reuses it under capture)."""
        cos, sin = self.model._rope_table(self.cache, self.dtype)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._prefill_forward(st)
        torch.cuda.current_stream().wait_stream(side)
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=self._prefill_pool):
                self._prefill_forward(st)
        except RuntimeError as e:       # e.g. a host read added to the forward: name the way out, do not hide it
            raise PrefillCaptureError(
                f"StaticDecoder: capturing the prefill of bucket {tuple(st.ids.shape)} (batch, tokens) as a CUDA "
                f"graph failed: {e}. prefill_graphs=False runs the eager prefill") from e
        st.graph.update(graph=g, rope=cos, sin=sin)      # the table stays referenced while the graph reads it

    # -- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 seed: int | None = None, attention_mask: torch.Tensor | None = None,
                 streamer=None) -> torch.Tensor:
        """`Thinker.generate` (same arguments and result [B, T + n]) with the decode steps on this decoder.

        Around `with q3lab.record(model)`, the routing of every step is recorded as `Thinker.generate` would
        record it (the prompt through the eager model's hooks, the steps from the device buffers)."""
        m = self.model
        input_ids = m._check_generate(input_ids, max_new_tokens, do_sample, temperature, top_p, attention_mask)
        B, T = input_ids.shape
        if T + max_new_tokens > self.max_len:
            raise InputError(f"{T} + {max_new_tokens} tokens exceed this decoder's max_len={self.max_len}")
        _refuse_hooks(m)
        recorders = active_recorders(m)
        if B != self.batch:
            self._alloc(B)
        self._set_recording(bool(recorders), any(r.probs for r in recorders))
        self._ready()                   # (re)capture before prefill: the warm-up writes the step's state
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        logits = self.prefill(input_ids, attention_mask)
        steps = 0

        def advance(nxt: torch.Tensor) -> torch.Tensor:
            nonlocal steps
            self.tok.copy_(nxt)
            self.step()
            steps += 1
            return self.logits

        new = decode_loop(logits, lambda lg: m._pick(lg, do_sample, temperature, top_p, gen), advance,
                          max_new_tokens, eos, streamer)
        result = torch.cat([input_ids] + new, dim=1)
        if recorders and steps:
            self._hand_over(recorders, result, T, steps, attention_mask is not None)
        return result

    def _hand_over(self, recorders, result: torch.Tensor, T: int, steps: int, masked: bool) -> None:
        """Give the recorders the routing of the `steps` decode steps (one device-to-host copy, here at the end)."""
        fed = result[:, T:T + steps].t()                                              # [steps, B] step inputs
        first = self.pos - self.n                                                     # [B] first step's position
        positions = first[None] + torch.arange(steps, device=self.device)[:, None]   # [steps, B]
        logits = self.rec_logits[:steps].clone() if self._recording[1] else None
        ids, w = self.rec_ids[:steps].clone(), self.rec_w[:steps].clone()     # the next generation reuses them
        for rec in recorders:
            rec.add_steps(self.cache, fed, positions, ids, w,
                          logits if rec.probs else None, masked=masked)


# -- experts in host memory, a cache of them on the device ---------------------------------------


class OffloadedDecoder(StaticDecoder):
    """`StaticDecoder` with experts served by a `DeviceExpertCache`. Each layer is two segments: attention +
    router (whose top-k ids are copied to pinned host memory), then the experts; between them the host waits
    for the ids (the one sync per layer), copies in the missing experts and writes the slot ids. On CUDA each
    segment is a captured graph, so a layer costs two graph launches and one sync, not dozens of launches.
    The cache becomes the model's expert provider, so the (eager) prefill reads the same slots.

    prefetch: also apply the next layer's router to this layer's post-attention residual stream (normed with
        the next layer's norm) inside the same segment; its top-k reach the host with this layer's ids (no
        extra sync), and their copies are issued on the copy stream before this layer's experts run.
    host_experts, host_split: a `q3lab.fast.host_experts.HostExperts` and `HostSplit`: per layer, `HostSplit`'s
        share of the misses is computed on the host CPU (batch 1) while the other misses are copied; the
        experts kernel then gets weight 0 there and adds the host's outputs (their weighted sum, one C call a
        layer, in the first host-computed expert's row). Outputs then agree with the resident decoder to a
        tolerance (see `q3lab.fast.host_experts`), not bit for bit.
    route_override (benchmarks only): callable(layer, router_ids) -> ids actually served (outputs are then
        meaningless), e.g. a `q3lab.analysis.replay.Replay`; its `weights(layer)` and `predicted(layer)`, when it has
        them, replace the router's weights (score policy) and the device predictor's guesses.

    Profile: `profile_phases()` then steps, `phase_frame()`: ms per token of each phase of `step` on the host
    clock (`PHASES`; off by default, then `step` takes no timestamps).
    """

    def __init__(self, model: Thinker, max_len: int, cache: DeviceExpertCache, *, batch: int = 1,
                 compile: bool | str = False, fused: bool = False, fused_router: bool | None = None,
                 cuda_graph: bool | None = None, prefetch: bool = False, host_experts=None, host_split=None):
        self.expert_cache = cache
        model.set_experts(cache)
        self.route_override = None
        # the predictor is part of the captured attention segment; `prefetch` (host side, may be switched off
        # later) decides whether its guesses are copied in
        self._predictor = self.prefetch = bool(prefetch)
        if (host_experts is None) != (host_split is None):
            raise InputError("OffloadedDecoder: host_experts and host_split go together (both or neither)")
        self.host_experts, self.host_split = host_experts, host_split
        self.phase_times: dict | None = None        # profile_phases() turns the per-phase clock on
        self.phase_steps = 0
        self._gpu_events = None
        if host_experts is not None and batch != 1:
            raise InputError(f"OffloadedDecoder: host-computed experts serve batch 1, got batch={batch}")
        super().__init__(model, max_len, batch=batch, cuda_graph=cuda_graph, layer_experts=lambda layer: None,
                         compile=compile, fused=fused, fused_router=fused_router)
        self.reset_offload_stats()

    def _alloc(self, batch: int) -> None:
        super()._alloc(batch)     # (the base __init__ calls this before capturing)
        if self.host_experts is not None and batch != 1:
            raise InputError(f"OffloadedDecoder: host-computed experts serve batch 1, got batch={batch}")
        c, dev, dt = self.config, self.device, self.dtype
        B, A, D = self.batch, c.num_experts_per_tok, c.hidden_size
        pin = dev.type == "cuda"
        self.x_buf = torch.zeros(B, 1, D, device=dev, dtype=dt)
        self.y_buf = torch.zeros(B, A, D, device=dev, dtype=torch.float32)
        self.h_buf = torch.zeros(B, D, device=dev, dtype=dt)
        self.w_buf = torch.zeros(B, A, device=dev, dtype=dt)
        self.idx_buf = torch.zeros(B, A, device=dev, dtype=torch.long)
        self.slot_buf = torch.zeros(B, A, device=dev, dtype=torch.long)
        self.idx_host = torch.zeros(B, A, dtype=torch.long, pin_memory=pin)
        self.slot_host = torch.zeros(B, A, dtype=torch.long, pin_memory=pin)
        self.w_host = torch.zeros(B, A, dtype=torch.float32, pin_memory=pin)
        self.pred_buf = torch.zeros(B, A, device=dev, dtype=torch.long)
        self.pred_host = torch.zeros(B, A, dtype=torch.long, pin_memory=pin)
        self.h_host = torch.zeros(B, D, dtype=dt, pin_memory=pin)
        self.mask_buf = torch.ones(B, A, device=dev, dtype=dt)          # 0: that expert is computed on the host
        self.mask_host = torch.ones(B, A, dtype=dt, pin_memory=pin)
        self.yh_buf = torch.zeros(B, A, D, device=dev, dtype=torch.float32)   # the host's weighted outputs
        self.yh_host = torch.zeros(B, A, D, dtype=torch.float32, pin_memory=pin)
        hd = c.head_dim
        self.rope_buf = torch.zeros(2, B, 1, 1, hd, device=dev, dtype=dt)
        self.bias_buf = torch.zeros(B, 1, 1, self.max_len, device=dev, dtype=dt)
        # flat numpy views of the pinned buffers the host reads/writes each layer (cheaper than torch's
        # tolist / tensor() + copy_ on 8 values)
        self._idx_np, self._w_np = self.idx_host.view(-1).numpy(), self.w_host.view(-1).numpy()
        self._pred_np, self._slot_np = self.pred_host.view(-1).numpy(), self.slot_host.view(-1).numpy()
        self._yh_np = self.yh_host.view(-1, D).numpy()
        self._yh_row = None                    # the row of yh_host holding the last host sum (others are zero)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[self.mask_host.element_size()]
        self._mask_np = self.mask_host.view(-1).view(bits).numpy()           # dt's bit patterns (numpy has no bf16)
        self._mask_one = int(torch.ones(1, dtype=dt).view(bits).item())
        self._graphs: dict = {}

    def _segments(self) -> dict:
        """Every segment; the attention+router one with and without the next layer's predictor (~6 kernels a
        layer, only worth running when prefetch uses its guesses), the experts one (the same for every layer:
        one graph) with and without the host's outputs."""
        segs = {"embed": self._seg_embed, "finish": self._seg_finish}
        preds = (True, False) if self._predictor else (False,)
        for layer in range(self.config.num_hidden_layers):
            for p in preds:
                segs[("pre", layer, p)] = lambda layer=layer, p=p: self._seg_pre(layer, p)
        segs[("moe", False)] = lambda: self._seg_moe(False)
        if self.host_experts is not None:
            segs[("moe", True)] = lambda: self._seg_moe(True)
        return segs

    # segments: each reads and writes only the static buffers, so each can be a graph
    def _seg_embed(self) -> None:
        x, rope, bias = self._embed()
        self.x_buf.copy_(x), self.rope_buf[0].copy_(rope.cos), self.rope_buf[1].copy_(rope.sin)
        self.bias_buf.copy_(bias)
        self.y_buf.zero_()

    def _seg_pre(self, layer: int, predict: bool) -> None:
        x, h, idx, w = self._pre(layer, self.x_buf, self.y_buf, Rope(self.rope_buf[0], self.rope_buf[1]),
                                 self.bias_buf)
        self.x_buf.copy_(x), self.h_buf.copy_(h), self.idx_buf.copy_(idx), self.w_buf.copy_(w)
        if predict and layer + 1 < self.config.num_hidden_layers:
            # the next layer's router on this layer's post-attention residual: a guess of its experts that
            # reaches the host with this layer's ids, so prefetching costs no extra sync
            nxt = self._weights[layer + 1]
            hn = rms_norm(x, nxt.ln2, self.config.rms_norm_eps).view(self.batch, -1)
            self.pred_buf.copy_(torch.topk(F.linear(hn, nxt.router), self.config.num_experts_per_tok, -1).indices)
            self.pred_host.copy_(self.pred_buf, non_blocking=True)
        self.idx_host.copy_(self.idx_buf, non_blocking=True)
        self.w_host.copy_(self.w_buf, non_blocking=True)
        if self.host_experts is not None:
            self.h_host.copy_(self.h_buf, non_blocking=True)

    def _seg_moe(self, host: bool) -> None:
        c = self.expert_cache
        if not host:
            self.y_buf.copy_(self._moe(self.h_buf, self.slot_buf, self.w_buf, c.gate, c.up, c.down))
        else:   # weight 0 where the host computed the expert, whose output yh_buf holds (0 elsewhere)
            y = self._moe(self.h_buf, self.slot_buf, self.w_buf * self.mask_buf, c.gate, c.up, c.down)
            self.y_buf.copy_(y + self.yh_buf)

    def _seg_finish(self) -> None:
        self._finish(self.x_buf, self.y_buf)

    def _run(self, key) -> None:
        g = self._graphs.get(key)
        if g is not None:
            g.replay()
            return
        segs = self.__dict__.get("_segs")
        if segs is None:                  # no graphs (CPU): the segments run eagerly, built once
            segs = self._segs = self._segments()
        segs[key]()

    def _capture(self) -> None:
        saved = (self.expert_cache.hits, self.expert_cache.misses)
        self._graphs = self._warm_and_capture(self._segments())
        self.expert_cache.hits, self.expert_cache.misses = saved

    # -- statistics of prefetch and host compute ------------------------------------------------------
    def reset_offload_stats(self) -> None:
        """Zero the per-layer prediction and host-compute counters (the cache's own: `cache.reset_stats()`)."""
        L = self.config.num_hidden_layers
        self._guess: list = [None] * L
        self.pred_found, self.pred_total = [0] * L, [0] * L
        self.host_count, self.host_seconds = [0] * L, [0.0] * L

    def offload_stats(self):
        """Per layer: predicted (experts of the layer the previous layer's guess contained), accesses,
        prediction_accuracy, host_experts (computed on the host), host_ms (their host time), with the cache's
        layer_stats columns (hits, misses, prefetch_loads, prefetch_hits...)."""
        df = self.expert_cache.layer_stats()
        df["predicted"] = self.pred_found
        df["guessed"] = self.pred_total
        df["prediction_accuracy"] = df["predicted"] / df["guessed"].where(df["guessed"] > 0)
        df["host_experts"] = self.host_count
        df["host_ms"] = [s * 1e3 for s in self.host_seconds]
        return df

    # -- the per-phase profile of `step` (host clock) ---------------------------------------------------
    PHASES = ("embed", "launch_pre", "sync", "route", "residency", "prefetch", "host", "slots_h2d", "launch_moe",
              "finish")
    PHASE_DOC = {"embed": "embed segment launch", "launch_pre": "attention+router segment launch (CPU: its compute)",
                 "sync": "wait for the layer's ids (the GPU's queued work: copies, experts, attention)",
                 "route": "ids/weights to Python, replay override, prediction bookkeeping",
                 "residency": "host split + residency + issuing the copies (slots_split)",
                 "prefetch": "next layer's guesses: residency + issuing their copies",
                 "host": "host-computed experts + their outputs/mask to the device",
                 "slots_h2d": "slot ids to the device", "launch_moe": "experts segment launch (CPU: its compute)",
                 "finish": "final norm + lm_head segment launch"}

    GPU_PHASES = {"gpu_pre": "GPU: attention+router segment (events)",
                  "gpu_copy": "GPU copy stream: the layer's demand copies (events; after any queued prefetch)",
                  "gpu_wait": "GPU compute stream idle between the two segments: host work + waiting for copies",
                  "gpu_moe": "GPU: experts segment (events)"}

    def profile_phases(self, on: bool = True, gpu: bool = False) -> None:
        """Time the phases of each `step` on the host clock (perf_counter between them) from now on, or stop
        (`on=False`); `phase_frame()` reads them. Off (the default), `step` takes no timestamps at all.
        gpu: also CUDA events around each layer's segments and copies (`GPU_PHASES`); recording them costs the
        host a few us a layer, so a benchmark times steps without them. Without CUDA the host clock stands in
        (the segments and copies then run on the host: their compute time)."""
        self.phase_times = dict.fromkeys(self.PHASES, 0.0) if on else None
        self.phase_steps = 0
        self._gpu_events = [] if (on and gpu) else None

    def phase_frame(self):
        """The profile since `profile_phases()`: one row per phase, ms_per_token (host wall time between the
        phase's start and end, per step), share of the step, what it covers. A phase's time is the host's:
        GPU work shows up where the host waits for it (sync)."""
        import pandas as pd
        pt = getattr(self, "phase_times", None)
        if pt is None:
            raise InputError("OffloadedDecoder.phase_frame: no profile; call profile_phases() before stepping")
        n = max(self.phase_steps, 1)
        tot = sum(pt.values())
        rows = [dict(phase=k, ms_per_token=v / n * 1e3, share=v / tot if tot else 0.0, what=self.PHASE_DOC[k])
                for k, v in pt.items()]
        gev = getattr(self, "_gpu_events", None)
        if gev:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            acc = dict.fromkeys(self.GPU_PHASES, 0.0)
            for p0, p1, c0, c1, m0, m1 in gev:
                acc["gpu_pre"] += p0.elapsed_time(p1)
                acc["gpu_copy"] += c0.elapsed_time(c1)
                acc["gpu_wait"] += p1.elapsed_time(m0)
                acc["gpu_moe"] += m0.elapsed_time(m1)
            rows += [dict(phase=k, ms_per_token=v / n, share=float("nan"), what=self.GPU_PHASES[k])
                     for k, v in acc.items()]
        return pd.DataFrame(rows)

    def step(self) -> None:
        cache, L = self.expert_cache, self.config.num_hidden_layers
        override = self.route_override
        prof = getattr(self, "phase_times", None)
        clock = time.perf_counter
        if prof is not None:
            t0 = clock()
        split = self.host_split
        guesses = self._guess
        ids_np, w_np, slot_np = self._idx_np, self._w_np, self._slot_np
        cuda = self.device.type == "cuda"
        # the segment variants this step needs: the predictor only when its guesses are used; the experts
        # segment with the host's outputs only where a layer computed some on the host (elsewhere yh/mask are
        # not read, whatever they hold)
        predict = self._predictor and self.prefetch
        gev = getattr(self, "_gpu_events", None) if prof is not None else None
        self._run("embed")
        if prof is not None:
            t0 = _lap(prof, "embed", t0, clock)
        for layer in range(L):
            if gev is not None:
                evs = [_event(None, cuda)]
            self._run(("pre", layer, predict))
            if gev is not None:
                evs.append(_event(None, cuda))
            if prof is not None:
                t0 = _lap(prof, "launch_pre", t0, clock)
            if cuda:
                torch.cuda.current_stream().synchronize()                         # the one sync per layer
                if prof is not None:
                    t0 = _lap(prof, "sync", t0, clock)
            ids = ids_np.tolist()
            router_w = w_np.tolist()
            weights = router_w
            if override is not None:
                ids = override(layer, ids)
                ow = getattr(override, "weights", None)
                if ow is not None:
                    weights = ow(layer) or weights
            guess = guesses[layer]
            if guess is not None:
                self.pred_found[layer] += len(guess.intersection(ids))
                self.pred_total[layer] += len(set(ids))
                guesses[layer] = None
            if prof is not None:
                t0 = _lap(prof, "route", t0, clock)
            host_k = 0
            if split is not None:
                slot_of = cache.residency.slot_of
                missing = sum(1 for e in set(ids) if (layer, e) not in slot_of)
                host_k = split.split(layer, missing) if missing else 0
            if gev is not None:
                evs.append(_event(cache.copy_stream, cuda))
            slots, on_host = cache.slots_split(layer, ids, weights, host=host_k)
            if gev is not None:
                evs.append(_event(cache.copy_stream, cuda))
            if prof is not None:
                t0 = _lap(prof, "residency", t0, clock)
            if self.prefetch and layer + 1 < L:
                op = getattr(override, "predicted", None) if override is not None else None
                guess = op(layer + 1) if op is not None else None
                if guess is None:
                    if not self._predictor:
                        raise InputError("OffloadedDecoder: prefetch switched on, but the decoder was built "
                                         "without its predictor (prefetch=False)")
                    guess = self._pred_np.tolist()
                guesses[layer + 1] = set(guess)
                cache.prefetch(layer + 1, guess)
                if prof is not None:
                    t0 = _lap(prof, "prefetch", t0, clock)
            if on_host:
                self._host_compute(layer, ids, router_w, slots, on_host)
                live = next((s for s in slots if s is not None), 0)
                slots = [live if s is None else s for s in slots]
                if prof is not None:
                    t0 = _lap(prof, "host", t0, clock)
            slot_np[:] = slots
            self._h2d(self.slot_buf, self.slot_host)
            if prof is not None:
                t0 = _lap(prof, "slots_h2d", t0, clock)
            if gev is not None:
                evs.append(_event(None, cuda))
            self._run(("moe", bool(on_host)))
            if gev is not None:
                evs.append(_event(None, cuda))
                gev.append(evs)
            if prof is not None:
                t0 = _lap(prof, "launch_moe", t0, clock)
        self._run("finish")
        if prof is not None:
            _lap(prof, "finish", t0, clock)
            self.phase_steps += 1

    def _host_compute(self, layer: int, ids: list[int], router_w: list[float], slots: list,
                      on_host: list[int]) -> None:
        """Compute the `on_host` experts of this token on the host into yh (weight 0 for them on the device):
        mask and yh rewritten whole (what an earlier layer left is cleared), for the host variant of the
        experts segment, the only one that reads them."""
        self._mask_np.fill(self._mask_one)
        if self._yh_row is not None:
            self._yh_np[self._yh_row] = 0.0
            self._yh_row = None
        if on_host:
            hs = set(on_host)
            pos = [k for k, e in enumerate(ids) if e in hs]
            t = time.perf_counter()
            # one call for all of them (their weighted sum, in row pos[0]; the other rows stay zero)
            y = self.host_experts.compute_sum(layer, self.h_host[0], [ids[k] for k in pos],
                                              [router_w[k] for k in pos], out=self.yh_host.view(-1, self.yh_host.shape[-1])[pos[0]])
            dt = time.perf_counter() - t
            if y.data_ptr() != self._yh_np[pos[0]].ctypes.data:      # the torch twin returns its own tensor
                self._yh_np[pos[0]] = y.numpy()
            self._yh_row = pos[0]
            self._mask_np[pos] = 0                                  # 0 is all-zero bits in every float dtype
            self.host_count[layer] += len(on_host)
            self.host_seconds[layer] += dt
            self.host_split.record(layer, len(on_host), dt, sum(1 for s in slots if s is not None))
        self._h2d(self.mask_buf, self.mask_host)
        self._h2d(self.yh_buf, self.yh_host)

    def _h2d(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A small pinned -> device copy on the current stream: through the driver directly where the cache
        issues its copies so (a few us of host time a copy less than torch's copy_, 3 copies a layer on the
        host path), else copy_."""
        raw = self.expert_cache._raw
        if raw is None:
            dst.copy_(src, non_blocking=True)
            return
        rc = raw[0](dst.data_ptr(), ctypes.c_void_p(src.data_ptr()), src.numel() * src.element_size(),
                    ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if rc:
            raise InputError(f"OffloadedDecoder: cuMemcpyHtoDAsync of {list(src.shape)} failed (CUresult {rc})")

    _step = step
