"""Routing metrics per layer, each a function from a trace frame (see `q3lab.record`) to a tidy DataFrame.

A trace has one row per (prompt, token_index, layer, rank) with the chosen `expert`. A token's set S is the
k experts it chose in a layer; E (the number of experts) comes from `num_experts=` or `frame.attrs`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from q3lab.errors import InputError


# -- shared helpers --------------------------------------------------------------------------------
def _num_experts(frame: pd.DataFrame, num_experts: int | None) -> int:
    E = num_experts if num_experts is not None else frame.attrs.get("num_experts")
    if E is None:
        raise InputError("metrics: the trace does not say how many experts the model has (frame.attrs has no "
                         "'num_experts'); pass num_experts=")
    E = int(E)
    top = int(frame["expert"].max()) if len(frame) else -1
    if top >= E or (len(frame) and int(frame["expert"].min()) < 0):
        raise InputError(f"metrics: expert ids span [{int(frame['expert'].min())}, {top}], outside [0, {E})")
    return E


def _need(frame: pd.DataFrame, cols: tuple[str, ...]) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise InputError(f"metrics: the trace lacks columns {missing} (has {list(frame.columns)})")
    if not len(frame):
        raise InputError("metrics: the trace is empty")


def token_sets(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(tokens [prompt, token_index] in order, layers, sets [L, N, k] of expert ids in rank order).

    Every token must have exactly k rows in every layer; otherwise this raises `InputError`.
    """
    _need(frame, ("prompt", "token_index", "layer", "rank", "expert"))
    f = frame.sort_values(["prompt", "token_index", "layer", "rank"], kind="stable")
    layers = np.sort(f["layer"].unique())
    tokens = f[["prompt", "token_index"]].drop_duplicates(ignore_index=True)
    L, N = len(layers), len(tokens)
    if len(f) % (L * N):
        raise InputError(f"metrics: {len(f)} rows do not split into {N} tokens x {L} layers x k ranks: "
                         f"the trace is ragged (some token lacks some layer or rank)")
    k = len(f) // (L * N)
    grid = f["layer"].to_numpy().reshape(N, L, k)
    if not (grid == layers[None, :, None]).all() or not (f["rank"].to_numpy().reshape(N, L, k)
                                                          == np.arange(k)[None, None, :]).all():
        raise InputError(f"metrics: the trace is ragged: expected every token to have ranks 0..{k - 1} in each "
                         f"of layers {layers.tolist()}")
    sets = f["expert"].to_numpy().astype(np.int64).reshape(N, L, k).transpose(1, 0, 2)
    return tokens, layers, np.ascontiguousarray(sets)


def _indicator(sets: np.ndarray, E: int) -> np.ndarray:
    """[..., k] expert ids -> [..., E] booleans."""
    out = np.zeros(sets.shape[:-1] + (E,), dtype=bool)
    np.put_along_axis(out, sets, True, axis=-1)
    return out


def _counts(frame: pd.DataFrame, E: int) -> tuple[np.ndarray, np.ndarray]:
    """(layers, counts [L, E]) of selections per layer and expert."""
    _need(frame, ("layer", "expert"))
    layers = np.sort(frame["layer"].unique())
    li = np.searchsorted(layers, frame["layer"].to_numpy())
    flat = np.bincount(li * E + frame["expert"].to_numpy().astype(np.int64), minlength=len(layers) * E)
    return layers, flat.reshape(len(layers), E)


# -- load ------------------------------------------------------------------------------------------
def selection_counts(frame: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """layer, expert, count, share: how often each expert was chosen (all E experts, zeros included)."""
    E = _num_experts(frame, num_experts)
    layers, c = _counts(frame, E)
    return pd.DataFrame({"layer": np.repeat(layers, E).astype(np.int16),
                         "expert": np.tile(np.arange(E, dtype=np.int16), len(layers)),
                         "count": c.reshape(-1).astype(np.int64),
                         "share": (c / c.sum(1, keepdims=True)).reshape(-1)})


def unique_experts(frame: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """layer, unique_experts, num_experts, fraction: how many distinct experts a layer used at all."""
    E = _num_experts(frame, num_experts)
    layers, c = _counts(frame, E)
    u = (c > 0).sum(1)
    return pd.DataFrame({"layer": layers.astype(np.int16), "unique_experts": u, "num_experts": E,
                         "fraction": u / E})


def load_entropy(frame: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """layer, entropy_bits, normalised_entropy: entropy of the load p_e = count_e / total, over log2(E).

    1 means every expert carries the same load; log(k)/log(E) means the same k experts always.
    """
    E = _num_experts(frame, num_experts)
    layers, c = _counts(frame, E)
    p = c / c.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum(1)
    return pd.DataFrame({"layer": layers.astype(np.int16), "entropy_bits": h,
                         "normalised_entropy": h / math.log2(E)})


def load_cv(frame: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """layer, cv: coefficient of variation std/mean of the per-expert counts (population std, all E)."""
    E = _num_experts(frame, num_experts)
    layers, c = _counts(frame, E)
    c = c.astype(np.float64)
    return pd.DataFrame({"layer": layers.astype(np.int16), "cv": c.std(1) / c.mean(1)})


def layer_summary(frame: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """unique_experts, normalised_entropy, cv and reuse side by side, one row per layer."""
    E = _num_experts(frame, num_experts)
    out = unique_experts(frame, E)
    for part in (load_entropy(frame, E), load_cv(frame, E), reuse(frame, E)):
        out = out.merge(part, on="layer")
    return out


# -- reuse over time -------------------------------------------------------------------------------
def reuse(frame: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """layer, pairs, mean_overlap, reuse, chance: top-k overlap of consecutive tokens of the same prompt.

    reuse = mean |S_t ∩ S_{t+1}| / k over pairs (t, t+1) of one prompt; chance = k/E is its value when
    each token picks k experts uniformly at random and independently.
    """
    E = _num_experts(frame, num_experts)
    tokens, layers, sets = token_sets(frame)
    k = sets.shape[2]
    same = tokens["prompt"].to_numpy()[1:] == tokens["prompt"].to_numpy()[:-1]
    nxt = tokens["token_index"].to_numpy()[1:] == tokens["token_index"].to_numpy()[:-1] + 1
    pair = same & nxt                                                         # [N-1]
    ind = _indicator(sets, E)                                                 # [L, N, E]
    overlap = (ind[:, 1:] & ind[:, :-1]).sum(-1)[:, pair]                     # [L, pairs]
    n = int(pair.sum())
    mean = overlap.mean(1) if n else np.full(len(layers), np.nan)
    return pd.DataFrame({"layer": layers.astype(np.int16), "pairs": n, "mean_overlap": mean,
                         "reuse": mean / k, "chance": k / E})


# -- co-activation ---------------------------------------------------------------------------------
def coactivation_matrix(frame: pd.DataFrame, layer: int, num_experts: int | None = None) -> np.ndarray:
    """[E, E] counts: entry (a, b) = tokens that chose both a and b in `layer`; the diagonal = selections."""
    E = _num_experts(frame, num_experts)
    _, layers, sets = token_sets(frame[frame["layer"] == layer])
    if not len(layers):
        raise InputError(f"metrics: layer {layer} is not in the trace")
    x = _indicator(sets[0], E).astype(np.float64)                            # [N, E]
    return np.rint(x.T @ x).astype(np.int64)     # float64 matmul uses BLAS and is exact for counts < 2**53


def coactivation(frame: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """layer, expert_a, expert_b, count: the co-activation matrix of every layer as a tidy frame."""
    E = _num_experts(frame, num_experts)
    _, layers, sets = token_sets(frame)
    parts = []
    a, b = np.meshgrid(np.arange(E, dtype=np.int16), np.arange(E, dtype=np.int16), indexing="ij")
    for li, layer in enumerate(layers):
        x = _indicator(sets[li], E).astype(np.float64)
        parts.append(pd.DataFrame({"layer": np.int16(layer), "expert_a": a.reshape(-1), "expert_b": b.reshape(-1),
                                   "count": np.rint(x.T @ x).astype(np.int64).reshape(-1)}))
    return pd.concat(parts, ignore_index=True)


# -- cross-layer association -----------------------------------------------------------------------
def cross_layer_association(frame: pd.DataFrame, num_experts: int | None = None, *, shuffles: int = 200,
                            seed: int = 0) -> pd.DataFrame:
    """Does expert id e in layer l predict the same id e in layer l+1, beyond chance?

    Per pair of adjacent recorded layers: observed = P(e in S_{l+1} | e in S_l) over a token's choices
    (= mean |S_l ∩ S_{l+1}| / k); chance = k/E (uniform independent choices); independent = the value
    expected if the two layers' choices were independent given each layer's own load
    (sum_e c_l(e) c_{l+1}(e) / (N * sum_e c_l(e))); shuffle_mean/std = the same statistic with layer l+1's
    sets given to randomly permuted tokens (`shuffles` permutations); p_value = (1 + #shuffles >= observed)
    / (1 + shuffles); lift = observed / shuffle_mean.
    """
    E = _num_experts(frame, num_experts)
    _, layers, sets = token_sets(frame)
    if len(layers) < 2:
        raise InputError(f"metrics: cross-layer association needs two layers or more, the trace has {len(layers)}")
    N, k = sets.shape[1], sets.shape[2]
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(N) for _ in range(shuffles)]
    ind = _indicator(sets, E)                                                  # [L, N, E]
    rows = []
    for li in range(len(layers) - 1):
        a, b = ind[li], ind[li + 1]
        observed = (a & b).sum() / (N * k)
        ca, cb = a.sum(0).astype(np.float64), b.sum(0).astype(np.float64)
        independent = float((ca * cb).sum() / (N * ca.sum()))
        # gather b at each token's own k ids instead of and-ing [N, E] masks: N*k work per shuffle
        shuf = np.array([b[p[:, None], sets[li]].sum() / (N * k) for p in perms]) if shuffles \
            else np.array([np.nan])
        rows.append(dict(layer=np.int16(layers[li]), next_layer=np.int16(layers[li + 1]), observed=observed,
                         chance=k / E, independent=independent, shuffle_mean=shuf.mean(),
                         shuffle_std=shuf.std(), p_value=(1 + (shuf >= observed).sum()) / (1 + shuffles)
                         if shuffles else np.nan,
                         lift=observed / shuf.mean() if shuf.mean() > 0 else np.nan))
    return pd.DataFrame(rows)


# -- domain specificity ----------------------------------------------------------------------------
def _mutual_information_bits(labels: np.ndarray, experts: np.ndarray, n_labels: int, E: int) -> float:
    joint = np.bincount(labels * E + experts, minlength=n_labels * E).reshape(n_labels, E).astype(np.float64)
    p = joint / joint.sum()
    pd_, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (pd_ * pe)), 0.0)
    return float(terms.sum())


def _entropy_bits(codes: np.ndarray) -> float:
    p = np.bincount(codes) / len(codes)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def domain_specificity(frame: pd.DataFrame, label: str = "domain", num_experts: int | None = None, *,
                       shuffles: int = 200, seed: int = 0) -> pd.DataFrame:
    """Mutual information (bits) between a prompt's label and the experts its tokens choose, per layer.

    Each selection (token, rank) is one sample of (label, expert). Columns: layer, mi_bits, h_label_bits
    (the upper bound: MI = H(label) when the label can be read off the expert), normalised (mi / H),
    shuffle_mean/std (MI with labels permuted among prompts, the finite-sample bias to compare against),
    p_value ((1 + #shuffles >= observed) / (1 + shuffles)). Rows without a label are left out.
    """
    _need(frame, ("prompt", "layer", "expert", label))
    E = _num_experts(frame, num_experts)
    f = frame[frame[label].notna()]
    if not len(f):
        raise InputError(f"metrics: no row of the trace has a {label!r} label")
    prompts, pcode = np.unique(f["prompt"].astype(str).to_numpy(), return_inverse=True)
    per_prompt = f.groupby(f["prompt"].astype(str), observed=True)[label].nunique()
    if (per_prompt > 1).any():
        bad = per_prompt[per_prompt > 1].index[0]
        raise InputError(f"metrics: prompt {bad!r} carries more than one {label!r} label")
    cats, lcode = np.unique(f[label].astype(str).to_numpy(), return_inverse=True)
    prompt_label = np.zeros(len(prompts), dtype=np.int64)
    prompt_label[pcode] = lcode
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(prompts)) for _ in range(shuffles)]
    layer = f["layer"].to_numpy()
    experts = f["expert"].to_numpy().astype(np.int64)
    rows = []
    for lay in np.sort(np.unique(layer)):
        m = layer == lay
        pc, ex = pcode[m], experts[m]
        mi = _mutual_information_bits(prompt_label[pc], ex, len(cats), E)
        h = _entropy_bits(prompt_label[pc])
        shuf = np.array([_mutual_information_bits(prompt_label[p][pc], ex, len(cats), E) for p in perms]) \
            if shuffles else np.array([np.nan])
        rows.append(dict(layer=np.int16(lay), mi_bits=mi, h_label_bits=h, normalised=mi / h if h > 0 else np.nan,
                         shuffle_mean=shuf.mean(), shuffle_std=shuf.std(),
                         p_value=(1 + (shuf >= mi - 1e-12).sum()) / (1 + shuffles) if shuffles else np.nan))
    return pd.DataFrame(rows)
