"""Causal interventions on routing and expert outputs: `with q3lab.intervene(model, ...):`.

Dimensions: B batch, T tokens, N = B*T, L layers, E experts, A active experts per token (top-k), D hidden.

Everything goes through the model's named hook points (`mlp.hook_router_logits`, `mlp.hook_topk_ids`,
`mlp.hook_topk_weights`, `hook_mlp_out`, `model.hook_embed`) and a forward pre-hook on each `mlp` (to see
the experts' input), so it works with any expert provider (resident or the on-demand cache) and undoes itself
on exit, as `q3lab.record` does. Interventions (all optional, combined freely):

- mask=[(layer, expert)]: the router may not choose these experts: their logits are set to -inf before the
  float32 softmax, so top-k picks among the rest and renormalises over them.
- zero=[(layer, expert)]: the expert's output is dropped after routing: its weight leaves the sum and the
  other weights are kept as they are (renormalize_zero=True divides them by their new sum instead).
- force={(layer, token): (experts, weights)}: fixed experts and weights at chosen token positions (every batch
  row); fewer experts than the active k are padded with zero weight.
- patch=[(layer, expert or None)] with patch_from=capture(...): the layer's MoE output (expert None) or one
  expert's weighted contribution to it is replaced, at the tokens in patch_tokens (default all), by the same
  quantity from another run. An expert's contribution is w * down(silu(gate h) * up h), zero where the expert
  was not chosen, so patching all experts of a layer patches its MoE output.
- top_k=k (or {layer: k}): route to k experts, 1 <= k <= E, instead of the trained number.
- router_temperature=t (or {layer: t}): router logits divided by t before the softmax.
- embed_noise=(positions, std, seed): Gaussian noise added to the input embeddings at these token positions
  (the corruption of causal tracing).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from q3lab.errors import InputError

Site = tuple[int, int]


@dataclass
class MoECapture:
    """What one run routed and computed, per layer: experts' input h [N, D], ids [N, A] (rank order),
    weights [N, A], contributions [N, A, D] (each chosen expert's weighted output) and the MoE output [N, D]."""
    shape: tuple[int, int]                                   # (B, T) of the captured run
    h: dict[int, torch.Tensor] = field(default_factory=dict)
    ids: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    contributions: dict[int, torch.Tensor] = field(default_factory=dict)
    moe_out: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None                       # [B, T, V] float32

    def contribution(self, layer: int, expert: int) -> torch.Tensor:
        """[N, D]: expert's weighted output at each token of this run (zero where it was not chosen)."""
        c, ids = self.contributions[layer], self.ids[layer]
        return (c * (ids == expert)[..., None].to(c.dtype)).sum(1)


def _contributions(model, layer: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[N, A, D]: w[n, a] * expert_{ids[n, a]}(h[n]) for every token and rank, from the model's provider."""
    provider = model.model.layers[layer].mlp.experts.provider
    used = sorted(set(ids.reshape(-1).tolist()))
    provider.prepare(layer, used)
    out = torch.zeros(*ids.shape, h.shape[-1], dtype=h.dtype, device=h.device)
    for e in used:
        rows, ranks = (ids == e).nonzero(as_tuple=True)
        gate, up, down = provider.weights(layer, e)
        x = h[rows]
        y = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        out[rows, ranks] = y * w[rows, ranks, None]
    return out


def _pairs(items: Iterable, what: str, L: int, E: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for item in items or ():
        try:
            layer, expert = (int(v) for v in item)
        except (TypeError, ValueError):
            raise InputError(f"intervene: {what} entries must be (layer, expert) pairs, got {item!r}") from None
        if not (0 <= layer < L and 0 <= expert < E):
            raise InputError(f"intervene: {what} ({layer}, {expert}) is outside {L} layers x {E} experts")
        out.setdefault(layer, []).append(expert)
    return out


def _per_layer(value, what: str, L: int, check) -> dict[int, float]:
    if value is None:
        return {}
    items = value.items() if isinstance(value, dict) else ((i, value) for i in range(L))
    out = {}
    for layer, v in items:
        if not 0 <= int(layer) < L:
            raise InputError(f"intervene: {what} names layer {layer}, the model has {L}")
        check(v)
        out[int(layer)] = v
    return out


@contextmanager
def intervene(model, *, mask: Iterable[Site] | None = None, zero: Iterable[Site] | None = None,
              renormalize_zero: bool = False, force: dict | None = None,
              patch: Iterable[tuple[int, int | None]] | None = None, patch_from: MoECapture | None = None,
              patch_tokens: Iterable[int] | None = None, top_k: int | dict | None = None,
              router_temperature: float | dict | None = None,
              embed_noise: tuple | None = None) -> Iterator[None]:
    """Change routing or expert outputs of `model` for the duration of the block (see the module docstring)."""
    c = model.config
    L, E = c.num_hidden_layers, c.num_experts
    masked = _pairs(mask, "mask", L, E)
    for layer, experts in masked.items():
        k = top_k.get(layer, c.num_experts_per_tok) if isinstance(top_k, dict) else (top_k or c.num_experts_per_tok)
        if E - len(set(experts)) < k:
            raise InputError(f"intervene: mask leaves {E - len(set(experts))} experts in layer {layer}, "
                             f"fewer than the {k} it routes to")
    zeroed = _pairs(zero, "zero", L, E)

    def _k(v):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= E:
            raise InputError(f"intervene: top_k must be an integer in [1, {E}], got {v!r}")

    def _t(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and v != float("inf")):
            raise InputError(f"intervene: router_temperature must be a finite number > 0, got {v!r}")
    ks = _per_layer(top_k, "top_k", L, _k)
    temps = _per_layer(router_temperature, "router_temperature", L, _t)
    forced: dict[int, dict[int, tuple[list[int], list[float]]]] = {}
    for key, val in (force or {}).items():
        layer, token = (int(v) for v in key)
        experts, weights = list(val[0]), [float(w) for w in val[1]]
        if not 0 <= layer < L or len(experts) != len(weights) or not experts:
            raise InputError(f"intervene: force[{key!r}] needs a layer in [0, {L}) and equal, non-empty lists "
                             f"of experts and weights")
        if any(not 0 <= int(e) < E for e in experts):
            raise InputError(f"intervene: force[{key!r}] names an expert outside [0, {E})")
        forced.setdefault(layer, {})[token] = ([int(e) for e in experts], weights)
    patches: dict[int, list[int | None]] = {}
    for item in patch or ():
        layer, expert = int(item[0]), (None if item[1] is None else int(item[1]))
        if not 0 <= layer < L or (expert is not None and not 0 <= expert < E):
            raise InputError(f"intervene: patch site {item!r} is outside {L} layers x {E} experts")
        patches.setdefault(layer, []).append(expert)
    if patches and patch_from is None:
        raise InputError("intervene: patch= needs patch_from= (a q3lab.capture of the run to patch from)")
    tokens = None if patch_tokens is None else sorted({int(t) for t in patch_tokens})

    handles: list = []
    state: dict[int, dict] = {i: {} for i in range(L)}
    shape: dict = {}

    def on_embed(m, args, out):
        shape["bt"] = tuple(out.shape[:2])
        if embed_noise is None:
            return None
        positions, std, seed = embed_noise
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        pos = [p for p in positions if p < out.shape[1]]
        noise = torch.randn(out.shape[0], len(pos), out.shape[2], generator=g).to(out.device, out.dtype) * std
        out = out.clone()
        out[:, pos] = out[:, pos] + noise
        return out
    handles.append(model.model.hook_embed.register_forward_hook(on_embed))

    for i, layer in enumerate(model.model.layers):
        mlp, st = layer.mlp, state[i]
        if i in ks:
            st["top_k"] = mlp.top_k
            mlp.top_k = ks[i]

        def pre(m, args, st=st):
            st["h"] = args[0].reshape(-1, args[0].shape[-1])
        handles.append(mlp.register_forward_pre_hook(pre))

        if i in masked or i in temps:
            def on_logits(m, args, out, i=i):
                out = out / temps[i] if i in temps else out.clone()
                if i in masked:
                    out[:, masked[i]] = float("-inf")
                return out
            handles.append(mlp.hook_router_logits.register_forward_hook(on_logits))

        def on_ids(m, args, out, i=i, st=st):
            if i in forced:
                out = out.clone()
                B, T = shape["bt"]
                A = out.shape[1]
                for t, (experts, _) in forced[i].items():
                    if not 0 <= t < T:
                        raise InputError(f"intervene: force at token {t}, the input has {T} tokens")
                    if len(experts) > A:
                        raise InputError(f"intervene: force gives {len(experts)} experts at layer {i}, "
                                         f"but {A} are active; raise top_k")
                    row = experts + [experts[0]] * (A - len(experts))
                    out[torch.arange(B) * T + t] = torch.tensor(row, device=out.device)
            st["ids"] = out
            return out
        handles.append(mlp.hook_topk_ids.register_forward_hook(on_ids))

        def on_weights(m, args, out, i=i, st=st):
            changed = False
            if i in forced:
                out, changed = out.clone(), True
                B, T = shape["bt"]
                A = out.shape[1]
                for t, (experts, weights) in forced[i].items():
                    row = weights + [0.0] * (A - len(weights))
                    out[torch.arange(B) * T + t] = torch.tensor(row, device=out.device, dtype=out.dtype)
            if i in zeroed:
                drop = torch.isin(st["ids"], torch.tensor(zeroed[i], device=out.device))
                out = out.masked_fill(drop, 0)
                changed = True
                if renormalize_zero:
                    total = out.float().sum(-1, keepdim=True)
                    out = torch.where(total > 0, out.float() / total.clamp_min(1e-30), out.float()).to(out.dtype)
            st["w"] = out
            return out if changed else None
        handles.append(mlp.hook_topk_weights.register_forward_hook(on_weights))

        if i in patches:
            def on_out(m, args, out, i=i, st=st):
                B, T, D = out.shape
                if patch_from.shape != (B, T):
                    raise InputError(f"intervene: patch_from was captured on [B, T] = {list(patch_from.shape)}, "
                                     f"this run is {[B, T]}")
                rows = slice(None) if tokens is None else (
                    (torch.arange(B)[:, None] * T + torch.tensor(tokens)[None]).reshape(-1))
                flat = out.reshape(B * T, D).clone()
                experts = [e for e in patches[i] if e is not None]
                if None in patches[i]:
                    flat[rows] = patch_from.moe_out[i].to(flat.dtype)[rows]
                elif experts:
                    cur = _contributions(model, i, st["h"], st["ids"], st["w"])
                    for e in experts:
                        mine = (cur * (st["ids"] == e)[..., None].to(cur.dtype)).sum(1)
                        delta = patch_from.contribution(i, e).to(flat.dtype) - mine    # exactly 0 on a self-patch
                        d = delta[rows]
                        flat[rows] = torch.where(d != 0, flat[rows] + d, flat[rows])   # keeps -0.0 bits too
                return flat.view(B, T, D)
            handles.append(layer.hook_mlp_out.register_forward_hook(on_out))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for i, st in state.items():
            if "top_k" in st:
                model.model.layers[i].mlp.top_k = st["top_k"]


@torch.inference_mode()
def capture(model, input_ids: torch.Tensor, *, contributions: bool = True, **interventions) -> MoECapture:
    """Run one forward of `input_ids` [B, T] (optionally under `intervene(**interventions)`) and keep, per layer,
    the experts' input, routing, each chosen expert's weighted output and the MoE output, for `patch_from`."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    cap = MoECapture(shape=tuple(input_ids.shape))
    handles = []
    with intervene(model, **interventions):
        # registered after intervene's hooks, so these see the intervened values (hooks run in order)
        for i, layer in enumerate(model.model.layers):
            mlp = layer.mlp
            handles += [
                mlp.register_forward_pre_hook(lambda m, a, i=i: cap.h.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))),
                mlp.hook_topk_ids.register_forward_hook(lambda m, a, o, i=i: cap.ids.__setitem__(i, o)),
                mlp.hook_topk_weights.register_forward_hook(lambda m, a, o, i=i: cap.weights.__setitem__(i, o)),
                layer.hook_mlp_out.register_forward_hook(
                    lambda m, a, o, i=i: cap.moe_out.__setitem__(i, o.reshape(-1, o.shape[-1]).clone())),
            ]
        try:
            cap.logits = model(input_ids.to(model.device))
        finally:
            for h in handles:
                h.remove()
    if contributions:
        for i in range(model.config.num_hidden_layers):
            cap.contributions[i] = _contributions(model, i, cap.h[i], cap.ids[i], cap.weights[i])
    return cap
