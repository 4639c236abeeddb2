"""Figures about checkpoints and model correctness (notebooks 01-04). Routing figures live in plots.py.

Every function returns a matplotlib Figure; notebooks save it with `q3lab.viz.plots.save_figure`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

AXIS_COLORS = {"T": "#4C72B0", "H": "#DD8452", "W": "#55A868"}


def component_bytes(components: pd.DataFrame):
    """Horizontal bars: GiB per checkpoint component (thinker text, audio tower, visual, talker, code2wav)."""
    fig = Figure(figsize=(6.5, 2.6))
    ax = fig.add_subplot()
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
    fig = Figure(figsize=(7, 2.6))
    ax = fig.add_subplot()
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
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
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
    fig = Figure(figsize=(8, 2.8 + 0.15 * table[label].nunique()))
    a, b = fig.subplots(1, 2)
    order = list(dict.fromkeys(table[label]))
    kl = table.groupby(label, sort=False)["kl"].median().reindex(order)
    a.barh(order, kl.values, color="#8172B3")
    a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    a.xaxis.set_major_locator(MaxNLocator(3))
    for i, v in enumerate(kl.values):
        a.text(v, i, f" {v:.2g}", va="center", fontsize=7)
    a.set_xlim(0, max(float(np.nanmax(kl.values)), 1e-12) * 1.35)
    a.set_xlabel("median KL(intact || condition), nats")
    a.invert_yaxis()
    for i, cond in enumerate(order):
        r = table[table[label] == cond]["rank"]
        b.scatter(r, np.full(len(r), i) + np.linspace(-0.2, 0.2, len(r)), s=12, color="#C44E52")
    b.set_yticks(range(len(order)))
    b.set_yticklabels(order)
    b.invert_yaxis()
    b.set_xscale("log")
    b.set_xlim(0.7, max(2.0, float(table["rank"].max()) * 1.5))
    b.axvline(1, color="grey", lw=0.8, ls=":")
    b.set_xlabel("rank of the expected token (1 = top)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def axis_map(maps: dict[str, list[str]]):
    """One strip per layout: which position axis (T/H/W) drives each rotary frequency index."""
    fig = Figure(figsize=(8, 1.3 + 0.55 * len(maps)))
    ax = fig.add_subplot()
    for row, (name, axes) in enumerate(maps.items()):
        for j, a in enumerate(axes):
            ax.add_patch(Rectangle((j, row), 1, 0.85, color=AXIS_COLORS[a]))
    ax.set_xlim(0, max(len(v) for v in maps.values()))
    ax.set_ylim(len(maps), -0.15)
    ax.set_yticks(np.arange(len(maps)) + 0.42)
    ax.set_yticklabels(list(maps))
    ax.set_xlabel("rotary frequency index (0 = highest frequency)")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in AXIS_COLORS.values()]
    fig.legend(handles, ["temporal", "height", "width"], ncol=3, fontsize=8, loc="upper center", frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.82))
    return fig


def layer_lines(frame: pd.DataFrame, series: dict[str, str], *, title: str, ylabel: str,
                dashed: tuple[str, ...] = ()) -> Figure:
    """One line per column of a per-layer table (`series`: column -> legend label); `dashed` are baselines."""
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
    for col, label in series.items():
        ax.plot(frame["layer"], frame[col], marker="" if col in dashed else "o", ms=3,
                ls="--" if col in dashed else "-", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
