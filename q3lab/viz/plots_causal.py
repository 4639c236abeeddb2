"""Figures of the causal studies (`q3lab.analysis.causal`): each takes its study's frame and returns a Figure (no pyplot)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from q3lab.viz.plots import _need


def trace_figure(frame: pd.DataFrame, num_layers: int, num_experts: int, *, title: str = "") -> Figure:
    """Left: share of the clean answer's log-probability restored by patching each layer's MoE output at the
    last subject token. Right: the same per (layer, expert) contribution (mean over facts)."""
    from q3lab.analysis.causal import trace_map
    _need(frame, ("layer", "expert", "restored"), "trace_figure")
    fig = Figure(figsize=(11, 4.2))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    layer = frame[frame.expert < 0].groupby("layer").restored.agg(["mean", "min", "max"])
    ax.plot(layer.index, layer["mean"], marker="o", ms=3, color="#4C72B0", label="mean over facts")
    ax.fill_between(layer.index, layer["min"], layer["max"], alpha=0.2, color="#4C72B0", label="range")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("restored share of clean log-prob")
    ax.set_title("patch the layer's MoE output")
    ax.legend(loc="upper left", fontsize=8)
    m = trace_map(frame, num_layers, num_experts)
    lim = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
    im = ax2.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax2.set_xlabel("expert")
    ax2.set_ylabel("layer")
    ax2.set_title("patch one expert's contribution (blank: not chosen)")
    fig.colorbar(im, ax=ax2, shrink=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def importance_figure(frame: pd.DataFrame, corr: dict, *, title: str = "") -> Figure:
    """Selection frequency against the causal effect of zero-ablating each (layer, expert)."""
    _need(frame, ("frequency", "effect", "layer"), "importance_figure")
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    sc = ax.scatter(frame.frequency, frame.effect, c=frame.layer, cmap="viridis", s=14)
    fig.colorbar(sc, ax=ax, label="layer")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("selection frequency (share of tokens)")
    ax.set_ylabel("drop in answer log-prob when zeroed (nats)")
    ax.set_title(f"{title}\nSpearman rho = {corr['rho']:.2f} "
                 f"[{corr['low']:.2f}, {corr['high']:.2f}], n = {corr['n']}".strip())
    fig.tight_layout()
    return fig


def topk_figure(frame: pd.DataFrame, *, title: str = "") -> Figure:
    """Facts top-1 and validation loss against the number of active experts k (trained k marked)."""
    _need(frame, ("k", "facts_top1", "val_loss", "trained"), "topk_figure")
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(frame.k, frame.facts_top1, marker="o", color="#4C72B0", label="facts top-1")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("active experts k")
    ax.set_ylabel("facts top-1", color="#4C72B0")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(frame.k, frame.val_loss, marker="s", color="#C44E52", label="validation loss")
    ax2.set_ylabel("validation loss (nats/token)", color="#C44E52")
    for k in frame.k[frame.trained]:
        ax.axvline(k, color="grey", ls="--", lw=0.8)
    ax.set_title(title or "quality against top-k (dashed: trained k)")
    fig.tight_layout()
    return fig


def knockout_figure(frame: pd.DataFrame, *, title: str = "") -> Figure:
    """Facts top-1 and validation loss as experts are removed, per removal order."""
    _need(frame, ("order", "fraction", "facts_top1", "val_loss"), "knockout_figure")
    fig = Figure(figsize=(10, 4))
    colors = {"frequent": "#4C72B0", "causal": "#C44E52", "random": "#8C8C8C"}
    for n, (col, label) in enumerate((("facts_top1", "facts top-1"), ("val_loss", "validation loss"))):
        ax = fig.add_subplot(1, 2, n + 1)
        for order, g in frame.groupby("order", sort=False):
            ax.plot(g.fraction * 100, g[col], marker="o", ms=3, label=order, color=colors.get(order))
        ax.set_xlabel("experts removed per layer (%)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
