"""Figures of the routing atlas (notebook 06): one function per analysis frame, each a matplotlib Figure with
the uniform-routing baseline drawn in grey dashes. Save with `q3lab.viz.plots.save_figure` (byte-reproducible)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

_BASE = dict(color="0.45", ls="--", lw=1.2)


def _fig(w: float = 7.5, h: float = 3.4, ncols: int = 1):
    fig = Figure(figsize=(w, h))
    axes = fig.subplots(1, ncols)
    return fig, axes


def layer_load(layers: pd.DataFrame) -> Figure:
    """Normalised entropy and experts carrying 90% of routing, per layer (from `layer_summary`)."""
    fig, (a, b) = _fig(ncols=2)
    a.plot(layers["layer"], layers["normalised_entropy"], marker=".")
    a.axhline(1.0, **_BASE, label="uniform")
    a.set(xlabel="layer", ylabel="entropy / log2 E", title="routing entropy")
    a.legend(frameon=False)
    b.plot(layers["layer"], layers["experts_for_mass"], marker=".")
    b.axhline(layers["uniform_experts_for_mass"].iloc[0], **_BASE, label="uniform")
    b.set(xlabel="layer", ylabel="experts", title=f"experts for {layers.attrs.get('mass', 0.9):.0%} of routing")
    b.legend(frameon=False)
    fig.tight_layout()
    return fig


def load_heatmap(load: pd.DataFrame) -> Figure:
    """Load of every expert of every layer relative to uniform (share / (A/E)), log2 colour scale."""
    L, E = load["layer"].max() + 1, load["expert"].max() + 1
    m = (load["share"] / load["uniform_share"]).to_numpy().reshape(L, E)
    fig, ax = _fig(7.5, 4.2)
    im = ax.imshow(np.log2(np.maximum(m, 1 / 64)), aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3,
                   interpolation="nearest")
    ax.set(xlabel="expert", ylabel="layer", title="expert load / uniform (log2)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def coactivation(co: pd.DataFrame, layer: int) -> Figure:
    """P(b | a) of one layer as a heatmap, relative to uniform (lift, log2)."""
    c = co[co["layer"] == layer]
    E = int(max(c["a"].max(), c["b"].max()) + 1)
    m = np.full((E, E), np.nan)
    m[c["a"].to_numpy(), c["b"].to_numpy()] = c["lift"].to_numpy()
    fig, ax = _fig(5.2, 4.4)
    im = ax.imshow(np.log2(np.maximum(m, 1 / 64)), cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
    ax.set(xlabel="b", ylabel="a", title=f"layer {layer}: P(b | a) / uniform (log2)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def domain_specialisation(dom: pd.DataFrame) -> Figure:
    """Per domain and layer, the largest lift of any expert (share in the domain / share overall)."""
    top = dom.groupby(["domain", "layer"])["lift"].max().unstack("layer")
    fig, ax = _fig(7.5, 2.8)
    im = ax.imshow(top.to_numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(top.index)), top.index)
    ax.set(xlabel="layer", title="most domain-specific expert: lift over its overall share (1 = none)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def vocab_specialisation(vocab: pd.DataFrame) -> Figure:
    """Histogram of each expert's top-token specialisation (input and predicted tokens), with A/E."""
    fig, ax = _fig()
    bins = np.linspace(0, 1, 41)
    for by, g in vocab[vocab["rank"] == 1].groupby("by"):
        ax.hist(g["specialisation"], bins=bins, alpha=0.6, label=f"{by} token")
    ax.axvline(vocab["uniform"].iloc[0], **_BASE, label="uniform (A/E)")
    ax.set(xlabel="share of the token's occurrences routed to the expert", ylabel="experts (all layers)",
           title="each expert's most frequent token: how exclusively it goes there")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def token_specialisation(tokens: pd.DataFrame) -> Figure:
    """Per layer, the share of a token id's occurrences that goes to its favourite expert."""
    fig, ax = _fig()
    for by, g in tokens.groupby("by"):
        ax.plot(g["layer"], g["top_share"], marker=".", label=f"{by} token")
    g = tokens[tokens["by"] == "input"]
    ax.plot(g["layer"], g["uniform_top_share"], **_BASE, label="uniform (same counts)")
    ax.set(xlabel="layer", ylabel="top-expert share", ylim=(0, 1), title="token-id specialisation")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def consecutive_overlap(summary: pd.DataFrame) -> Figure:
    """P(consecutive tokens share an expert) and the mean shared count per layer, with uniform baselines."""
    fig, (a, b) = _fig(ncols=2)
    a.plot(summary["layer"], summary["any_overlap"], marker=".")
    a.axhline(summary["uniform_any_overlap"].iloc[0], **_BASE, label="uniform")
    a.set(xlabel="layer", ylabel="P(>= 1 shared)", ylim=(0, 1), title="consecutive tokens share an expert")
    a.legend(frameon=False)
    b.plot(summary["layer"], summary["mean_overlap"], marker=".")
    b.axhline(summary["uniform_mean_overlap"].iloc[0], **_BASE, label="uniform (A^2/E)")
    b.set(xlabel="layer", ylabel="experts", title="mean shared experts")
    b.legend(frameon=False)
    fig.tight_layout()
    return fig


def reuse_distance(reuse: pd.DataFrame, layers: list[int]) -> Figure:
    """Distribution of reuse distances for a few layers against the geometric uniform baseline."""
    fig, ax = _fig()
    top = reuse["distance"].max()
    for layer in layers:
        g = reuse[(reuse["layer"] == layer) & (reuse["distance"] > 0) & (reuse["distance"] < top)]
        ax.plot(g["distance"], g["share"], marker=".", ms=3, label=f"layer {layer}")
    g = reuse[(reuse["layer"] == layers[0]) & (reuse["distance"] > 0) & (reuse["distance"] < top)]
    ax.plot(g["distance"], g["uniform_share"], **_BASE, label="uniform (geometric)")
    ax.set_yscale("log")
    ax.set(xlabel="tokens since the expert's last use (same layer, same document)", ylabel="share of reuses",
           title="reuse distance")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def cache_curves(cache: pd.DataFrame) -> Figure:
    """Hit rate against per-layer capacity for each policy (mean over layers), with the uniform c/E."""
    m = cache.groupby(["policy", "capacity"])[["hit_rate", "uniform_hit_rate"]].mean().reset_index()
    fig, ax = _fig()
    for pol, g in m.groupby("policy"):
        ax.plot(g["capacity"], g["hit_rate"], marker="o", ms=3, label=pol)
    g = m[m["policy"] == m["policy"].iloc[0]]
    ax.plot(g["capacity"], g["uniform_hit_rate"], **_BASE, label="uniform (c/E)")
    ax.set(xlabel="experts resident per layer", ylabel="hit rate", ylim=(0, 1.02),
           title="per-layer expert cache, decode order")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def adaptive_capacities(adaptive: pd.DataFrame) -> Figure:
    """Per-layer capacities from the trace against an even split of the same budget."""
    fig, ax = _fig()
    ax.bar(adaptive["layer"], adaptive["capacity"], color="C0", label="adaptive")
    ax.axhline(adaptive["uniform_capacity"].iloc[0], **_BASE, label="even split")
    ax2 = ax.twinx()
    ax2.plot(adaptive["layer"], adaptive["hit_rate"], color="C1", marker=".", label="hit rate (adaptive)")
    ax2.plot(adaptive["layer"], adaptive["uniform_hit_rate"], color="C2", marker=".", label="hit rate (even)")
    ax2.set(ylim=(0, 1.02), ylabel="hit rate")
    ax.set(xlabel="layer", ylabel="experts resident",
           title=f"budget {adaptive.attrs.get('budget', '?')} experts, {adaptive.attrs.get('policy', '')}")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, frameon=False, fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def expert_prediction(pred: pd.DataFrame) -> Figure:
    """Accuracy per layer of each expert predictor, chance included."""
    fig, ax = _fig()
    for name, g in pred.groupby("predictor", sort=False):
        style = _BASE if name == "chance" else dict(marker=".")
        ax.plot(g["layer"], g["accuracy"], label=name, **style)
    ax.set(xlabel="layer", ylabel="share of the chosen experts predicted", ylim=(0, 1.02),
           title="expert prediction on held-out documents")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
