"""Figures about checkpoints and model correctness (notebooks 01-04). Routing figures live in plots.py.

Every function returns a matplotlib Figure; notebooks save it with `q3lab.plots.save_figure`.
"""
from __future__ import annotations

import matplotlib  # noqa: F401

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

AXIS_COLORS = {"T": "#4C72B0", "H": "#DD8452", "W": "#55A868"}


def component_bytes(components: pd.DataFrame):
    """Horizontal bars: GiB per checkpoint component (thinker text, audio tower, visual, talker, code2wav)."""
    fig, ax = plt.subplots(figsize=(6.5, 2.6))
    c = components.sort_values("bytes")
    ax.barh(c["component"], c["bytes"] / 2**30, color="#4C72B0")
    for y, (b, n) in enumerate(zip(c["bytes"], c["tensors"])):
        ax.text(b / 2**30, y, f"  {b / 2**30:.3g} GiB, {n} tensors", va="center", fontsize=8)
    ax.set_xlabel("GiB")
    ax.set_xlim(0, c["bytes"].max() / 2**30 * 1.6)
    ax.set_title("Checkpoint bytes by component")
    fig.tight_layout()
    return fig


def layer_shards(layers: pd.DataFrame):
    """Per thinker layer: MB of weights, coloured by how many shards the layer is spread over."""
    fig, ax = plt.subplots(figsize=(7, 2.6))
    colors = np.where(layers["n_shards"] > 1, "#C44E52", "#4C72B0")
    ax.bar(layers["layer"], layers["bytes"] / 1e6, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("MB")
    n = int((layers["n_shards"] > 1).sum())
    ax.set_title(f"Thinker layers: {n} of {len(layers)} straddle shard boundaries (red)")
    fig.tight_layout()
    return fig


def norm_stats(norms: pd.DataFrame):
    """Mean of each norm weight per layer and kind: trained norms are far from the all-ones default."""
    fig, ax = plt.subplots(figsize=(7, 2.8))
    for kind, g in norms[norms["kind"] != "final_norm"].groupby("kind"):
        ax.plot(g["layer"], g["mean"], marker="o", ms=3, label=kind)
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="default init (ones)")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean weight")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("RMSNorm weights found through the index")
    fig.tight_layout()
    return fig


def damage(table: pd.DataFrame, label: str = "condition", title: str = ""):
    """Two panels per condition: KL divergence from the intact model, and the expected token's rank."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.8 + 0.15 * table[label].nunique()))
    order = list(dict.fromkeys(table[label]))
    kl = table.groupby(label, sort=False)["kl"].median().reindex(order)
    a.barh(order, kl.values, color="#8172B3")
    a.set_xlabel("median KL(intact || condition), nats")
    a.invert_yaxis()
    for i, cond in enumerate(order):
        r = table[table[label] == cond]["rank"]
        b.scatter(r, np.full(len(r), i) + np.linspace(-0.2, 0.2, len(r)), s=12, color="#C44E52")
    b.set_yticks(range(len(order)))
    b.set_yticklabels(order)
    b.invert_yaxis()
    b.set_xscale("log")
    b.set_xlabel("rank of the expected token (1 = top)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def axis_map(maps: dict[str, list[str]]):
    """One strip per layout: which position axis (T/H/W) drives each rotary frequency index."""
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.5 * len(maps)))
    for row, (name, axes) in enumerate(maps.items()):
        for j, a in enumerate(axes):
            ax.add_patch(plt.Rectangle((j, row), 1, 0.85, color=AXIS_COLORS[a]))
    ax.set_xlim(0, max(len(v) for v in maps.values()))
    ax.set_ylim(len(maps), -0.15)
    ax.set_yticks(np.arange(len(maps)) + 0.42)
    ax.set_yticklabels(list(maps))
    ax.set_xlabel("rotary frequency index (0 = highest frequency)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in AXIS_COLORS.values()]
    ax.legend(handles, ["temporal", "height", "width"], ncol=3, fontsize=7, loc="upper right",
              bbox_to_anchor=(1, 1.45 + 0.1 * len(maps)))
    fig.tight_layout()
    return fig
