"""Logit lens: the final norm and lm_head applied to the residual stream after every layer.

The last layer's lens is, by construction, the model's own logits (same modules, same order, same dtype).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from q3lab.errors import InputError


@torch.inference_mode()
def residual_stream(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream [B, T, D] after each layer (hook_resid_post), from one forward of `ids`."""
    seen: dict[int, torch.Tensor] = {}
    handles = [layer.hook_resid_post.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
               for i, layer in enumerate(model.model.layers)]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(model.model.layers))]


@torch.inference_mode()
def lens_logits(model, resid: torch.Tensor) -> torch.Tensor:
    """Float logits [B, T, V] of a residual stream [B, T, D]: final norm, then lm_head (as the model does)."""
    return model.lm_head(model.model.norm(resid)).float()


def _as_ids(model, ids) -> torch.Tensor:
    ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(np.asarray(ids))  # a copy: numpy views may be read-only
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise InputError(f"logit_lens: ids must be [T] or [B, T], got shape {list(ids.shape)}")
    return ids.to(model.device)


@torch.inference_mode()
def logit_lens(model, ids, target_token: int | str | None = None, top: int = 5) -> pd.DataFrame:
    """Top tokens and the rank of a target token after every layer, at every position.

    ids: [T] or [B, T] token ids. target_token: a token id (the same target at every position), "next"
    (each position's next input token; no target at the last position), or None (no target columns).
    Returns one row per (row, layer, position): row, layer, position, token (the input token there),
    top1..top{top} (token ids, best first) and top1_prob.. (softmax probabilities), and with a target
    rank_of_target (1 = the top token; 1 + the number of tokens with a strictly larger logit),
    target_prob and target_logit.
    """
    ids = _as_ids(model, ids)
    V = model.config.vocab_size
    if top < 1 or top > V:
        raise InputError(f"logit_lens: top must be in [1, {V}], got {top}")
    B, T = ids.shape
    if isinstance(target_token, str) and target_token != "next":
        raise InputError(f"logit_lens: target_token must be a token id, 'next' or None, got {target_token!r}")
    target = None
    if target_token == "next":
        target = torch.full((B, T), -1, dtype=torch.long, device=ids.device)
        target[:, :-1] = ids[:, 1:]
    elif target_token is not None:
        t = int(target_token)
        if not 0 <= t < V:
            raise InputError(f"logit_lens: target token {t} is outside the vocabulary [0, {V})")
        target = torch.full((B, T), t, dtype=torch.long, device=ids.device)
    frames = []
    for layer, resid in enumerate(residual_stream(model, ids)):
        logits = lens_logits(model, resid)                                      # [B, T, V]
        probs = torch.softmax(logits, dim=-1)
        tp, ti = probs.topk(top, dim=-1)                                        # [B, T, top]
        cols = {"row": np.repeat(np.arange(B, dtype=np.int32), T),
                "layer": np.full(B * T, layer, dtype=np.int16),
                "position": np.tile(np.arange(T, dtype=np.int32), B),
                "token": ids.reshape(-1).cpu().numpy().astype(np.int32)}
        for j in range(top):
            cols[f"top{j + 1}"] = ti[..., j].reshape(-1).cpu().numpy().astype(np.int32)
        for j in range(top):
            cols[f"top{j + 1}_prob"] = tp[..., j].reshape(-1).cpu().numpy().astype(np.float32)
        if target is not None:
            has = target >= 0
            tgt = target.clamp(min=0)
            tl = logits.gather(-1, tgt[..., None])[..., 0]                     # [B, T]
            rank = (logits > tl[..., None]).sum(-1) + 1
            cols["rank_of_target"] = pd.array(np.where(has.cpu().numpy(), rank.cpu().numpy(), 0).reshape(-1),
                                              dtype="Int32")
            cols["target"] = pd.array(target.reshape(-1).cpu().numpy(), dtype="Int32")
            cols["target_prob"] = probs.gather(-1, tgt[..., None])[..., 0].reshape(-1).cpu().numpy()
            cols["target_logit"] = tl.reshape(-1).cpu().numpy()
            missing = ~has.reshape(-1).cpu().numpy()
            f = pd.DataFrame(cols)
            f.loc[missing, ["rank_of_target", "target"]] = pd.NA
            f.loc[missing, ["target_prob", "target_logit"]] = np.nan
        else:
            f = pd.DataFrame(cols)
        frames.append(f)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["row", "layer", "position"], kind="stable", ignore_index=True)
