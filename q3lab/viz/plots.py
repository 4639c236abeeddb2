"""Routing figures, and `save_figure`, the one helper every notebook saves figures with.

Each plotting function takes the tidy frame of a `q3lab.analysis.metrics` / `q3lab.analysis.cachesim` / `q3lab.analysis.lens` function
and returns a `matplotlib.figure.Figure` built without pyplot: no global figure registry, no backend needed
(headless-safe), and Jupyter still displays it when it is a cell's value.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from q3lab.errors import InputError

DPI = 150
_METADATA = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None, "ModDate": None}}
POLICY_COLORS = {"lru": "#4C72B0", "lfu": "#DD8452", "score": "#55A868", "belady": "#C44E52"}


def save_figure(fig: Figure, path: str | Path, *, dpi: int = DPI) -> Path:
    """Write `fig` to `path` (.png, .svg or .pdf) so that the same figure always gives the same bytes.

    Fixes what would change from run to run: the SVG id salt, the date/software stamps, the resolution.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in _METADATA:
        raise InputError(f"save_figure: {path}: unsupported format {path.suffix!r}; use .png, .svg or .pdf")
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": "q3lab", "svg.fonttype": "path", "pdf.fonttype": 42}):
        fig.savefig(path, format=fmt, dpi=dpi, metadata=_METADATA[fmt], bbox_inches="tight")
    return path


def _need(frame: pd.DataFrame, cols: tuple[str, ...], what: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise InputError(f"plots.{what}: the frame lacks columns {missing} (has {list(frame.columns)}); "
                         f"pass the output of the matching q3lab.analysis.metrics / cachesim / lens function")
    if not len(frame):
        raise InputError(f"plots.{what}: the frame is empty")


def _layer_axis(ax, layers) -> None:
    ax.set_xlabel("layer")
    layers = np.asarray(layers)
    if len(layers) <= 16:
        ax.set_xticks(layers)


def selection_heatmap(counts: pd.DataFrame, *, share: bool = False) -> Figure:
    """Layers x experts heatmap of selection counts (`metrics.selection_counts`); share=True for fractions."""
    import seaborn as sns
    _need(counts, ("layer", "expert", "count"), "selection_heatmap")
    value = "share" if share else "count"
    grid = counts.pivot(index="layer", columns="expert", values=value).sort_index().sort_index(axis=1)
    L, E = grid.shape
    fig = Figure(figsize=(min(12.0, 3 + 0.08 * E), min(10.0, 1.5 + 0.18 * L)))
    ax = fig.add_subplot()
    sns.heatmap(grid, ax=ax, cmap="viridis", cbar_kws={"label": "share of selections" if share else "selections"},
                xticklabels=max(1, E // 16), yticklabels=max(1, L // 16))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("How often each expert is chosen, per layer")
    fig.tight_layout()
    return fig


def unique_experts_per_layer(unique: pd.DataFrame) -> Figure:
    """Bars: distinct experts each layer used (`metrics.unique_experts`), with the total as a line."""
    _need(unique, ("layer", "unique_experts", "num_experts"), "unique_experts_per_layer")
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
    ax.bar(unique["layer"], unique["unique_experts"], color="#4C72B0")
    E = int(unique["num_experts"].iloc[0])
    ax.axhline(E, color="0.3", ls="--", lw=1, label=f"all {E} experts")
    ax.set_ylim(0, E * 1.1)
    ax.set_ylabel("experts used")
    _layer_axis(ax, unique["layer"])
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Distinct experts used per layer")
    fig.tight_layout()
    return fig


def entropy_per_layer(entropy: pd.DataFrame) -> Figure:
    """Normalised load entropy per layer (`metrics.load_entropy`): 1 = perfectly even load."""
    _need(entropy, ("layer", "normalised_entropy"), "entropy_per_layer")
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
    ax.plot(entropy["layer"], entropy["normalised_entropy"], marker="o", color="#4C72B0")
    ax.axhline(1.0, color="0.3", ls="--", lw=1, label="uniform load")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("entropy / log E")
    _layer_axis(ax, entropy["layer"])
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Load entropy per layer")
    fig.tight_layout()
    return fig


def reuse_per_layer(reuse: pd.DataFrame) -> Figure:
    """Top-k overlap of consecutive tokens per layer (`metrics.reuse`), with the chance line k/E."""
    _need(reuse, ("layer", "reuse", "chance"), "reuse_per_layer")
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
    ax.plot(reuse["layer"], reuse["reuse"], marker="o", color="#4C72B0", label="consecutive tokens")
    ax.axhline(float(reuse["chance"].iloc[0]), color="#C44E52", ls="--", lw=1,
               label=f"chance k/E = {float(reuse['chance'].iloc[0]):.3g}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("|S_t ∩ S_t+1| / k")
    _layer_axis(ax, reuse["layer"])
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Expert reuse between consecutive tokens")
    fig.tight_layout()
    return fig


def cache_hit_rates(sim: pd.DataFrame) -> Figure:
    """Hit rate against capacity, one line per policy (`cachesim.simulate`; per-layer rows are summed)."""
    _need(sim, ("policy", "capacity", "hits", "misses"), "cache_hit_rates")
    agg = sim.groupby(["policy", "capacity"], sort=False)[["hits", "misses"]].sum().reset_index()
    agg["hit_rate"] = agg["hits"] / (agg["hits"] + agg["misses"])
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    for policy, g in agg.groupby("policy", sort=False):
        g = g.sort_values("capacity")
        ax.plot(g["capacity"], g["hit_rate"], marker="o", label=policy, color=POLICY_COLORS.get(policy),
                ls="--" if policy == "belady" else "-")
    ax.set_xlabel("capacity (experts" + (" per layer)" if "layer" in sim.columns else ")"))
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.legend(title="policy", fontsize=8)
    ax.set_title("Expert cache hit rate (Belady: the offline bound)")
    fig.tight_layout()
    return fig


def logit_lens_ranks(lens: pd.DataFrame, position: int | None = None) -> Figure:
    """Rank of the target token after each layer (`lens.logit_lens`), log scale, 1 = top token.

    One line per prompt (`prompt_id`/`prompt` column) or per batch `row`, at `position` (default: the last
    position of each).
    """
    _need(lens, ("layer", "position", "rank_of_target"), "logit_lens_ranks")
    key = next((c for c in ("prompt_id", "prompt", "row") if c in lens.columns), None)
    groups = lens.groupby(key, sort=False) if key else [(None, lens)]
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    n, worst = 0, 1.0
    for name, g in groups:
        pos = g["position"].max() if position is None else position
        g = g[(g["position"] == pos) & g["rank_of_target"].notna()].sort_values("layer")
        if not len(g):
            continue
        label = str(g["prompt"].iloc[0]) if "prompt" in g.columns else str(name)
        ranks = g["rank_of_target"].astype(float)
        ax.plot(g["layer"], ranks, marker="o", ms=3, lw=1, label=label[:40])
        worst = max(worst, float(ranks.max()))
        n += 1
    if not n:
        raise InputError("plots.logit_lens_ranks: no row has a target rank at the chosen position")
    ax.set_yscale("log")
    ax.set_ylim(worst * 2, 0.8)            # inverted, and rank 1 always in view
    ax.set_ylabel("rank of target (1 = top)")
    _layer_axis(ax, sorted(lens["layer"].unique()))
    if 1 < n <= 10:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Logit lens: where the target token rises")
    fig.tight_layout()
    return fig
