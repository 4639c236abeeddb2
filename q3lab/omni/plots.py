"""Figures of routing per modality (notebook 08) and of 3-axis positions (notebook 03): frame -> Figure, no
pyplot. `note` is written under every title: notebook 08 passes "random weights" when it runs on the tiny
random model, so no figure can be mistaken for the real thinker's routing. Save with
`q3lab.viz.plots.save_figure` (byte-reproducible)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from q3lab.omni.modality import MODALITIES

_COLOURS = {"text": "tab:blue", "audio": "tab:orange", "image": "tab:green", "video": "tab:purple",
            "special": "0.5"}
_BASE = dict(color="0.45", ls="--", lw=1.2)


def _order(mods) -> list[str]:
    rank = {m: i for i, m in enumerate(MODALITIES)}
    return sorted(dict.fromkeys(mods), key=lambda m: rank.get(m, len(rank)))


def _title(fig: Figure, title: str, note: str) -> None:
    fig.suptitle(title + (f"\n({note})" if note else ""), fontsize=10)


def modality_entropy(entropy: pd.DataFrame, *, note: str = "") -> Figure:
    """Normalised routing entropy and distinct experts per layer, one line per modality (`modality_entropy`)."""
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    a, b = fig.subplots(1, 2)
    for m in _order(entropy["modality"]):
        g = entropy[entropy["modality"] == m].sort_values("layer")
        label = f"{m} ({int(g['tokens'].iloc[0])} tok)"
        a.plot(g["layer"], g["normalised_entropy"], marker=".", color=_COLOURS.get(m), label=label)
        b.plot(g["layer"], g["distinct_experts"], marker=".", color=_COLOURS.get(m), label=label)
    a.axhline(1.0, **_BASE, label="uniform")
    a.set(xlabel="layer", ylabel="entropy / log2 E", title="load entropy")
    b.set(xlabel="layer", ylabel="experts", title="distinct experts used")
    a.legend(frameon=False, fontsize=7)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _title(fig, "Routing per modality", note)
    return fig


def modality_load(load: pd.DataFrame, layers: list[int] | None = None, *, note: str = "") -> Figure:
    """Share of each modality's tokens routed to each expert, one heatmap per layer (default: first, middle
    and last), modalities as rows (`modality_load`)."""
    all_layers = sorted(load["layer"].unique().tolist())
    if layers is None:
        layers = sorted({all_layers[0], all_layers[len(all_layers) // 2], all_layers[-1]})
    mods = _order(load["modality"])
    E = int(load["expert"].max()) + 1
    fig = Figure(figsize=(min(12.0, 2.5 + 0.09 * E * len(layers) + 1.5 * len(layers)), 1.8 + 0.35 * len(mods)),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(layers)))
    vmax = float(load["share"].max()) or 1.0
    for ax, layer in zip(axes, layers):
        g = load[load["layer"] == layer]
        m = np.stack([g[g["modality"] == mod].sort_values("expert")["share"].to_numpy() for mod in mods])
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(mods)), mods if ax is axes[0] else [""] * len(mods))
        ax.set(xlabel="expert", title=f"layer {layer}")
    fig.colorbar(im, ax=list(axes), label="share of tokens", shrink=0.9)
    _title(fig, "Expert load per modality", note)
    return fig


def modality_overlap(overlap: pd.DataFrame, *, note: str = "") -> Figure:
    """Cross-modal overlap of the expert distributions per layer, one line per pair (`modality_overlap`)."""
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    for (a, b), g in overlap.groupby(["modality_a", "modality_b"], sort=False):
        g = g.sort_values("layer")
        ax.plot(g["layer"], g["overlap"], marker=".", label=f"{a} / {b}")
    ax.set(xlabel="layer", ylabel="sum min(q_a, q_b)", ylim=(0, 1.02), title="overlap of expert distributions")
    ax.legend(frameon=False, fontsize=7, ncol=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _title(fig, "Cross-modal overlap (1 = same experts, same proportions)", note)
    return fig


def modality_hit_rate(hits: pd.DataFrame, *, note: str = "") -> Figure:
    """Expert-cache hit rate by the modality of the accessing token, when a modality arrives and within its
    run (`modality_hit_rate`)."""
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    mods = _order(hits["modality"])
    phases = [p for p in ("arrival", "within") if p in set(hits["phase"])]
    w = 0.8 / max(len(phases), 1)
    for j, ph in enumerate(phases):
        g = hits[hits["phase"] == ph].set_index("modality").reindex(mods)
        ax.bar(np.arange(len(mods)) + (j - (len(phases) - 1) / 2) * w, g["hit_rate"].fillna(0), w, label=ph)
    ax.set_xticks(range(len(mods)), mods)
    ax.set(ylabel="hit rate", ylim=(0, 1),
           title=f"{hits.attrs.get('policy', '')} cache of {hits.attrs.get('capacity', '?')} experts; arrival = "
                 f"first {hits.attrs.get('arrival_tokens', '?')} tokens of a run")
    ax.title.set_fontsize(8)
    ax.legend(frameon=False)
    _title(fig, "Expert-cache hits per modality", note)
    return fig


def position_axes(positions: pd.DataFrame, *, note: str = "") -> Figure:
    """The temporal, height and width positions of each token of one multimodal input, tokens coloured by
    modality; `positions` has token_index, modality, t, h, w (notebook 03)."""
    fig = Figure(figsize=(9, 5.6), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    x = positions["token_index"].to_numpy()
    for ax, axis in zip(axes, ("t", "h", "w")):
        ax.plot(x, positions[axis], color="0.8", lw=0.8, zorder=1)
        for m in _order(positions["modality"]):
            sel = positions["modality"] == m
            ax.scatter(x[sel], positions.loc[sel, axis], s=9, color=_COLOURS.get(m), label=m, zorder=2)
        ax.set_ylabel({"t": "temporal", "h": "height", "w": "width"}[axis])
    axes[0].legend(frameon=False, fontsize=7, ncol=5, loc="upper left")
    axes[-1].set_xlabel("token")
    _title(fig, "3-axis mRoPE positions of one input", note)
    return fig
