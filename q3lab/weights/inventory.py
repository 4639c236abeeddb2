"""Tables about a checkpoint for notebooks: tensors and bytes by component and layer, and every norm."""
from __future__ import annotations

import pandas as pd
import torch

from q3lab.weights.checkpoint import Checkpoint, component_of

_NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")


def tensor_table(ckpt: Checkpoint) -> pd.DataFrame:
    """One row per tensor in the index: key, component, layer (-1 if none), shard, dtype, shape, bytes."""
    rows = []
    for key, shard in sorted(ckpt.weight_map.items()):
        info = ckpt.file(shard).tensors.get(key)
        parts = key.split(".")
        layer = next((int(parts[i + 1]) for i, p in enumerate(parts[:-1])
                      if p in ("layers", "blocks") and parts[i + 1].isdigit()), -1)
        rows.append(dict(key=key, component=component_of(key), layer=layer, shard=shard,
                         dtype=info.dtype if info else "", shape=list(info.shape) if info else [],
                         bytes=info.nbytes if info else 0))
    return pd.DataFrame(rows)


def bytes_by_component(table: pd.DataFrame) -> pd.DataFrame:
    g = table.groupby("component").agg(tensors=("key", "size"), bytes=("bytes", "sum")).reset_index()
    g["GiB"] = g["bytes"] / 2**30
    g["share"] = g["bytes"] / g["bytes"].sum()
    return g.sort_values("bytes", ascending=False, ignore_index=True)


def thinker_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Per thinker text layer: tensors, experts found, bytes, and the shards the layer lives in."""
    t = table[(table["component"] == "thinker_text") & (table["layer"] >= 0)].copy()
    t["expert"] = t["key"].str.extract(r"\.experts\.(\d+)\.", expand=False).astype(float)
    g = t.groupby("layer").agg(tensors=("key", "size"), experts=("expert", "nunique"), bytes=("bytes", "sum"),
                               shards=("shard", lambda s: ", ".join(sorted(set(s)))))
    g["n_shards"] = g["shards"].str.count(",") + 1
    return g.reset_index()


def norm_table(ckpt: Checkpoint) -> pd.DataFrame:
    """Every RMSNorm weight of the thinker text model, found through the index, with its statistics."""
    cfg = ckpt.config
    names = [f"model.layers.{i}.{n}.weight" for i in range(cfg.num_hidden_layers) for n in _NORMS]
    names.append("model.norm.weight")
    rows = []
    for name in names:
        shard = ckpt.shard_of(name)
        w = ckpt.get(name).float()
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else cfg.num_hidden_layers
        kind = name.split(".")[-2] if name.startswith("model.layers.") else "final_norm"
        rows.append(dict(name=name, source_key=ckpt.source_key(name), shard=shard, layer=layer, kind=kind,
                         size=w.numel(), mean=float(w.mean()), std=float(w.std()) if w.numel() > 1 else 0.0,
                         min=float(w.min()), max=float(w.max()), all_ones=bool(torch.all(w == 1))))
    return pd.DataFrame(rows)
