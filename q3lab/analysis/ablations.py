"""Known reconstruction bugs, reproduced on purpose, as reversible ablations of a loaded Thinker.

Each is a context manager that changes the model through its hook points (or its norm weights) and
restores it on exit, so a notebook can measure what each bug does to the rank of the expected token.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from q3lab.runtime.thinker import Thinker

ABLATIONS = ("per_sequence_routing", "scalar_expert_output", "router_masked", "missing_norms",
             "second_softmax")


def default_norm_layers(num_layers: int) -> list[int]:
    """Layers 1, 5, 9, ..., 45 of 48, scaled to the model's depth (every fourth layer from 1)."""
    return list(range(1, num_layers, 4))


@contextmanager
def missing_norms(model: Thinker, layers: list[int] | None = None,
                  which: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")) -> Iterator[list[str]]:
    """Replace the named norms of `layers` with ones, as a default initialisation would; yields the names."""
    layers = default_norm_layers(model.config.num_hidden_layers) if layers is None else layers
    saved = {}
    for i in layers:
        layer = model.model.layers[i]
        for attr in which:
            mod = getattr(layer, attr, None) or getattr(layer.self_attn, attr)
            name = f"model.layers.{i}.{attr if hasattr(layer, attr) else 'self_attn.' + attr}.weight"
            saved[name] = (mod, mod.weight.detach().clone())
            with torch.no_grad():
                mod.weight.fill_(1.0)
    try:
        yield sorted(saved)
    finally:
        with torch.no_grad():
            for mod, w in saved.values():
                mod.weight.copy_(w)


@contextmanager
def missing_final_norm(model: Thinker) -> Iterator[str]:
    """Replace the final norm (before lm_head) with ones; yields its name."""
    w = model.model.norm.weight.detach().clone()
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    try:
        yield "model.norm.weight"
    finally:
        with torch.no_grad():
            model.model.norm.weight.copy_(w)


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablate(model: Thinker, kind: str, **kw) -> Iterator[None]:
    """Apply one known bug for the duration of the block.

    kinds: per_sequence_routing (one expert choice for the whole sequence, from its mean router logits),
    scalar_expert_output (each expert returns one number broadcast over the hidden vector),
    router_masked (router restricted to experts 0..n-1, n = kw "n", default top-k),
    missing_norms (norms of layers 1, 5, 9, ... set to ones; kw "layers"),
    second_softmax (top-k weights = softmax of the top-k probabilities instead of dividing by their sum).
    """
    layers = model.model.layers
    handles = []
    if kind == "missing_norms":
        with missing_norms(model, kw.get("layers")):
            yield
        return
    if kind == "per_sequence_routing":
        for layer in layers:
            shape = {}
            handles.append(layer.mlp.register_forward_pre_hook(
                lambda m, args, shape=shape: shape.__setitem__("bt", args[0].shape[:2])))
            handles.append(layer.mlp.hook_router_logits.register_forward_hook(
                lambda m, a, out, shape=shape: out.view(*shape["bt"], -1).mean(1, keepdim=True)
                .expand(*shape["bt"], out.shape[-1]).reshape(out.shape)))
    elif kind == "scalar_expert_output":
        # mean over hidden of the weighted sum == weighted sum of each expert's scalar mean
        for layer in layers:
            handles.append(layer.hook_mlp_out.register_forward_hook(
                lambda m, a, out: out.mean(-1, keepdim=True).expand_as(out)))
    elif kind == "router_masked":
        n = kw.get("n", model.config.num_experts_per_tok)

        def mask(m, a, out):
            out = out.clone()
            out[:, n:] = float("-inf")
            return out
        for layer in layers:
            handles.append(layer.mlp.hook_router_logits.register_forward_hook(mask))
    elif kind == "second_softmax":
        for layer in layers:
            st = {}
            handles.append(layer.mlp.hook_router_logits.register_forward_hook(
                lambda m, a, out, st=st: st.__setitem__("logits", out)))
            handles.append(layer.mlp.hook_topk_ids.register_forward_hook(
                lambda m, a, out, st=st: st.__setitem__("idx", out)))
            handles.append(layer.mlp.hook_topk_weights.register_forward_hook(
                lambda m, a, out, st=st: torch.softmax(
                    torch.softmax(st["logits"], -1, dtype=torch.float32).gather(-1, st["idx"]), -1).to(out.dtype)))
    else:
        raise ValueError(f"unknown ablation {kind!r}; choose from {ABLATIONS}")
    with _hooks(handles):
        yield
