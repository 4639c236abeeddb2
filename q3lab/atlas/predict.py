"""Expert prediction per layer: how well can a layer's experts be known before its router runs?

This needs the hidden states, which the dataset does not store, so it is a function of the model and a sample
of the corpus (not a dataset column): `expert_prediction(model, tokenizer, corpus)` runs the documents
itself (one forward per document window, routing through `q3lab.record`, residual streams through hooks
that are removed on exit) and scores, on held-out documents:

    next_router    layer l+1's router (its post-attention norm, then its gate) applied to layer l's residual
                   stream after attention (the state layer l's own router sees): known one layer ahead
    own_router_pre layer l's router applied to layer l's input, before its attention (no fitting)
    fitted_pre     a ridge regression from layer l's input-normed state (input_layernorm, before attention)
                   to layer l's router log-probabilities, fitted on `train_fraction` of the documents
    previous_token the experts the previous token of the document chose in layer l (from the trace alone)
    chance         A/E: a random guess of A experts

accuracy = the mean share of a token's A chosen experts that the predictor's top-A contains.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from q3lab.runtime.thinker import _rms
from q3lab.runtime.recording import record
from q3lab.atlas.tracing import _encode_corpus


def _topk_hits(pred_scores: torch.Tensor, actual: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, how many of `actual` [N, k] are in the top-k of `pred_scores` [N, E]."""
    pred = pred_scores.topk(k, dim=-1).indices
    return (pred[:, :, None] == actual[:, None, :]).any(-1).sum(-1)


def _forward(model, ids: list[int]):
    """One forward of `ids`; per layer its input [T, D], post-attention residual [T, D], routing [T, A] and
    router log-probabilities [T, E]."""
    L = len(model.model.layers)
    pre, mid = {}, {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: pre.__setitem__(i, a[0][0].float())))
        handles.append(layer.hook_attn_out.register_forward_hook(
            lambda m, a, out, i=i: mid.__setitem__(i, pre[i] + out[0].float())))
    try:
        with record(model, probs=True) as rec, torch.inference_mode():
            model(torch.tensor([ids], device=model.device), last_only=True)
    finally:
        for h in handles:
            h.remove()
    f = rec.to_frame()
    A = model.config.num_experts_per_tok
    experts = torch.as_tensor(f["expert"].to_numpy().reshape(len(ids), L, A).astype(np.int64))
    logp = [torch.as_tensor(np.log(np.maximum(rec.router_probs(i)[1], 1e-30))) for i in range(L)]
    return pre, mid, experts, logp


def expert_prediction(model, tokenizer, corpus: str | Path, *, max_tokens: int = 20000, window: int = 256,
                      train_fraction: float = 0.5, ridge: float = 1e-3) -> pd.DataFrame:
    """Accuracy per layer and predictor (see the module docstring) on the first `max_tokens` tokens of the
    corpus, documents cut into disjoint windows of `window` tokens. Document i is for fitting when
    floor((i+1) f) > floor(i f), f = train_fraction, else held out. Columns layer, predictor, accuracy,
    tokens (held-out tokens scored)."""
    cfg = model.config
    L, A, E, D = cfg.num_hidden_layers, cfg.num_experts_per_tok, cfg.num_experts, cfg.hidden_size
    docs = []
    for i, _, ids in _encode_corpus(corpus, tokenizer, max_tokens):
        train = int((i + 1) * train_fraction) > int(i * train_fraction)
        docs += [(train, ids[s:s + window]) for s in range(0, len(ids), window) if len(ids[s:s + window]) > 1]
    xtx = torch.zeros(L, D + 1, D + 1, dtype=torch.float64)
    xty = torch.zeros(L, D + 1, E, dtype=torch.float64)
    layers = model.model.layers

    def features(layer: int, h: torch.Tensor) -> torch.Tensor:
        ln = layers[layer].input_layernorm
        x = _rms(h, ln.weight.float(), ln.eps).double()
        return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)

    for train, ids in docs:
        if not train:
            continue
        pre, _, _, logp = _forward(model, ids)
        for layer in range(L):
            x = features(layer, pre[layer])
            xtx[layer] += x.T @ x
            xty[layer] += x.T @ logp[layer].double()
    eye = torch.eye(D + 1, dtype=torch.float64)
    W = torch.linalg.solve(xtx + ridge * eye * xtx.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None], xty)
    hits = {k: np.zeros(L) for k in ("next_router", "own_router_pre", "fitted_pre", "previous_token")}
    n = np.zeros(L)
    n_prev = np.zeros(L)
    for train, ids in docs:
        if train:
            continue
        pre, mid, ex, _ = _forward(model, ids)
        T = len(ids)
        for layer in range(L):
            act = ex[:, layer]
            mlp, pan = layers[layer].mlp, layers[layer].post_attention_layernorm
            own = _rms(pre[layer], pan.weight.float(), pan.eps) @ mlp.gate.weight.float().T
            hits["own_router_pre"][layer] += _topk_hits(own, act, A).sum().item()
            fitted = (features(layer, pre[layer]) @ W[layer]).float()
            hits["fitted_pre"][layer] += _topk_hits(fitted, act, A).sum().item()
            if layer > 0:
                prev_mid = mid[layer - 1]
                nxt = _rms(prev_mid, pan.weight.float(), pan.eps) @ mlp.gate.weight.float().T
                hits["next_router"][layer] += _topk_hits(nxt, act, A).sum().item()
            same = (ex[1:, layer, :, None] == ex[:-1, layer, None, :]).any(-1).sum().item()
            hits["previous_token"][layer] += same
            n[layer] += T
            n_prev[layer] += T - 1
    rows = []
    for layer in range(L):
        for k, h in hits.items():
            if k == "next_router" and layer == 0:
                continue
            denom = n_prev[layer] if k == "previous_token" else n[layer]
            rows.append(dict(layer=layer, predictor=k, accuracy=h[layer] / max(denom * A, 1), tokens=int(denom)))
        rows.append(dict(layer=layer, predictor="chance", accuracy=A / E, tokens=int(n[layer])))
    return pd.DataFrame(rows)
