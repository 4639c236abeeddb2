"""Router saturation (OLMoE, Muennighoff et al. 2024, section 5.1) from routing probes recorded during training.

A probe set is a fixed list of held-out tokens whose routing (the top-k expert ids of every layer) was recorded
at several training checkpoints. Saturation of checkpoint c, layer l, at k is the share of the top-k ids chosen
at c that are also among the top-k ids the final model chooses for the same token and layer:

    saturation(c, l, k) = mean over tokens t of |topk_c(t, l) ∩ topk_final(t, l)| / k

so the final checkpoint saturates to 1.0, and random routing of top-k among E experts scores k / E.

Probe folder layout (`data/mini128/probes/`, written by scripts/train_mini128.py):
  routing.npy   uint8 [C, T, L, A]: checkpoint, probe token, layer, rank (column 0 is the top-1 expert)
  tokens.npy    uint16 [T]: the probe token ids (validation split; `index.json` "segments" names the domains)
  index.json    "steps" [C] (optimizer steps done at each checkpoint), "tokens_seen" [C], "segments", notes

Dimensions: C checkpoints, T probe tokens, L layers, A experts per token (top-k), E experts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from q3lab.errors import InputError

ROUTING_FILE, TOKENS_FILE, INDEX_FILE = "routing.npy", "tokens.npy", "index.json"


@dataclass
class RouterProbes:
    """Routing probes of one training run: ids [C, T, L, A], steps [C], tokens [T] and the JSON index."""

    ids: np.ndarray
    steps: list[int]
    tokens: np.ndarray
    index: dict = field(default_factory=dict)


def load_probes(path: str | Path) -> RouterProbes:
    """Read a probe folder (routing.npy, tokens.npy, index.json), or a checkpoint folder holding `probes/`."""
    path = Path(path)
    if (path / "probes" / INDEX_FILE).exists():
        path = path / "probes"
    for name in (ROUTING_FILE, TOKENS_FILE, INDEX_FILE):
        if not (path / name).exists():
            raise InputError(f"load_probes: {path / name} not found (a probe folder holds {ROUTING_FILE}, "
                             f"{TOKENS_FILE} and {INDEX_FILE})")
    ids = np.load(path / ROUTING_FILE)
    tokens = np.load(path / TOKENS_FILE)
    index = json.loads((path / INDEX_FILE).read_text())
    steps = [int(s) for s in index.get("steps", [])]
    if ids.ndim != 4 or len(steps) != ids.shape[0] or tokens.shape != (ids.shape[1],):
        raise InputError(f"load_probes: {path}: {ROUTING_FILE} has shape {list(ids.shape)} (expected [C, T, L, A]), "
                         f"{INDEX_FILE} names {len(steps)} steps and {TOKENS_FILE} has shape {list(tokens.shape)}; "
                         f"expected C steps and T tokens")
    return RouterProbes(ids=ids, steps=steps, tokens=tokens, index=index)


def router_saturation(ids: np.ndarray | RouterProbes, steps: Sequence[int] | None = None, *,
                      ks: Sequence[int] = (1, 8), reference: int = -1) -> pd.DataFrame:
    """OLMoE's router saturation: per checkpoint, layer and k, the share of top-k ids matching the reference.

    ids: [C, T, L, A] expert ids in rank order (column 0 = top-1), or a `RouterProbes`; steps: [C] step numbers
    (default 0..C-1, or the probes' steps); reference: the checkpoint compared against (default the last, the
    final model). Returns a tidy frame with columns checkpoint, step, layer, k, saturation (in [0, 1]).
    """
    if isinstance(ids, RouterProbes):
        steps = ids.steps if steps is None else steps
        ids = ids.ids
    ids = np.asarray(ids)
    if ids.ndim != 4:
        raise InputError(f"router_saturation: ids must be [checkpoints, tokens, layers, top-k], got shape "
                         f"{list(ids.shape)}")
    C, T, L, A = ids.shape
    steps = list(range(C)) if steps is None else [int(s) for s in steps]
    if len(steps) != C:
        raise InputError(f"router_saturation: {len(steps)} steps for {C} checkpoints")
    if not -C <= reference < C:
        raise InputError(f"router_saturation: reference checkpoint {reference} out of range for {C} checkpoints")
    bad = [k for k in ks if not 1 <= k <= A]
    if bad:
        raise InputError(f"router_saturation: k {bad} outside 1..{A} (the ids hold the top-{A})")
    srt = np.sort(ids, axis=-1)
    if (np.diff(srt, axis=-1) == 0).any():
        c, t, l = np.argwhere((np.diff(srt, axis=-1) == 0).any(-1))[0]
        raise InputError(f"router_saturation: checkpoint {c}, token {t}, layer {l} lists an expert twice: "
                         f"{ids[c, t, l].tolist()}")
    rows = []
    ref = ids[reference]                                                          # [T, L, A]
    for k in ks:
        ref_k = ref[..., :k]                                                      # [T, L, k]
        for c in range(C):
            # [T, L, k, k] -> ids of checkpoint c found among the reference's top-k, per token and layer
            hit = (ids[c, ..., :k, None] == ref_k[..., None, :]).any(-1).sum(-1)  # [T, L]
            share = hit.mean(0) / k                                               # [L]
            rows += [(c, steps[c], layer, k, float(share[layer])) for layer in range(L)]
    return pd.DataFrame(rows, columns=["checkpoint", "step", "layer", "k", "saturation"])


def plot_saturation(frame: pd.DataFrame, *, title: str | None = None) -> Figure:
    """One panel per k: saturation against training step, a thin line per layer (colour = depth) and the
    mean over layers in black (the frame of `router_saturation`)."""
    from matplotlib import colormaps

    missing = [c for c in ("step", "layer", "k", "saturation") if c not in frame.columns]
    if missing or not len(frame):
        raise InputError(f"plot_saturation: expected the non-empty frame of router_saturation, got columns "
                         f"{list(frame.columns)} and {len(frame)} rows")
    ks = sorted(frame["k"].unique())
    layers = sorted(frame["layer"].unique())
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(4.2 * len(ks), 3.2))
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    for ax, k in zip(axes, ks):
        sub = frame[frame["k"] == k]
        for layer in layers:
            one = sub[sub["layer"] == layer].sort_values("step")
            ax.plot(one["step"], one["saturation"], color=cmap(layer / max(1, len(layers) - 1)), lw=0.7,
                    alpha=0.6)
        mean = sub.groupby("step")["saturation"].mean()
        ax.plot(mean.index, mean.values, color="black", lw=2, marker="o", ms=3, label="mean over layers")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"top-{k} ids matching the final model")
        ax.set_title(f"top-{k}")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title or f"Router saturation (colour: layer 0 dark to {layers[-1]} light)", fontsize=10)
    fig.tight_layout()
    return fig
