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


# -- splits by modality (the `modality` column; q3lab.omni.modality) -------------------------------------------
# The functions below take a `modality_load` frame, whether it came from a record frame (here) or from a corpus
# dataset (`q3lab.atlas.queries.modality_load`): both count the same thing, so the analyses are written once.
def modality_counts(labels: np.ndarray, experts: np.ndarray, num_experts: int,
                    modalities: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(modalities, counts [M, L, E] of selections, tokens [M]) from per-token labels [N] and experts [N, L, A]."""
    from q3lab.omni.modality import MODALITIES
    mods = MODALITIES if modalities is None else modalities
    lookup = {m: i for i, m in enumerate(mods)}
    labels = np.asarray(labels, dtype=object)
    unknown = sorted(set(labels.tolist()) - set(lookup), key=str)
    if unknown:
        raise InputError(f"metrics: unknown modality labels {unknown[:4]}; expected some of {list(mods)}")
    N, L, A = experts.shape
    M, E = len(mods), int(num_experts)
    code = np.fromiter((lookup[m] for m in labels), dtype=np.int64, count=N)
    keys = (code[:, None, None] * L + np.arange(L)[None, :, None]) * E + experts.astype(np.int64)
    counts = np.bincount(keys.reshape(-1), minlength=M * L * E).reshape(M, L, E)
    return tuple(mods), counts, np.bincount(code, minlength=M)


def modality_load_frame(modalities: tuple[str, ...], counts: np.ndarray, tokens: np.ndarray,
                        top_k: int) -> pd.DataFrame:
    """The tidy frame of `modality_load` from counts [M, L, E] and tokens [M] (modalities without tokens left
    out): modality, layer, expert, count, tokens, share (of the modality's tokens that chose the expert: sums
    to top_k over a layer), overall_share (all tokens), lift = share / overall_share, uniform_share (A/E)."""
    M, L, E = counts.shape
    keep = [i for i in range(M) if tokens[i] > 0]
    total = counts.sum(0)                                                       # [L, E]
    n_all = max(int(tokens.sum()), 1)
    frames = []
    for i in keep:
        share = counts[i] / tokens[i]
        overall = total / n_all
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(overall > 0, share / overall, np.nan)
        frames.append(pd.DataFrame({
            "modality": modalities[i], "layer": np.repeat(np.arange(L), E).astype(np.int16),
            "expert": np.tile(np.arange(E), L).astype(np.int16), "count": counts[i].reshape(-1).astype(np.int64),
            "tokens": int(tokens[i]), "share": share.reshape(-1), "overall_share": overall.reshape(-1),
            "lift": lift.reshape(-1), "uniform_share": top_k / E}))
    cols = ["modality", "layer", "expert", "count", "tokens", "share", "overall_share", "lift", "uniform_share"]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    out.attrs.update(num_experts=int(E), top_k=int(top_k))
    return out


def _token_experts(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """(tokens: prompt, token_index, modality in decode order, experts [N, L, A]) of a record frame. Decode
    order is that of `q3lab.analysis.cachesim.access_sequence(frame, "decode")`: prompts in order of first appearance,
    tokens in order."""
    _need(frame, ("prompt", "token_index", "layer", "rank", "expert", "modality"))
    f = frame.assign(_p=pd.factorize(frame["prompt"])[0]).sort_values(["_p", "token_index", "layer", "rank"],
                                                                      kind="stable")
    L = f["layer"].nunique()
    first = f.drop_duplicates(["_p", "token_index"])
    N = len(first)
    if len(f) % (N * L):
        raise InputError(f"metrics: {len(f)} rows do not split into {N} tokens x {L} layers x k ranks: the trace "
                         f"is ragged")
    A = len(f) // (N * L)
    if (f.groupby(["_p", "token_index"], sort=False)["modality"].nunique() > 1).any():
        raise InputError("metrics: a token carries more than one modality label")
    tokens = first[["prompt", "token_index", "modality", "_p"]].reset_index(drop=True)
    return tokens, f["expert"].to_numpy().astype(np.int64).reshape(N, L, A)


def modality_load(frame: pd.DataFrame, num_experts: int | None = None) -> pd.DataFrame:
    """Per-layer expert load split by the trace's `modality` column (the columns of `modality_load_frame`)."""
    E = _num_experts(frame, num_experts)
    tokens, ex = _token_experts(frame)
    mods, counts, n = modality_counts(tokens["modality"].to_numpy(), ex, E)
    return modality_load_frame(mods, counts, n, ex.shape[2])


def modality_entropy(load: pd.DataFrame) -> pd.DataFrame:
    """modality, layer, tokens, entropy_bits, normalised_entropy (over log2 E), distinct_experts,
    uniform_entropy_bits: entropy of each modality's load p_e = count_e / its selections, per layer."""
    E = int(load.attrs.get("num_experts", load["expert"].max() + 1))
    rows = []
    for (mod, layer), g in load.groupby(["modality", "layer"], sort=False):
        c = g["count"].to_numpy(np.float64)
        p = c / c.sum() if c.sum() else c
        nz = p[p > 0]
        h = float(-(nz * np.log2(nz)).sum())
        rows.append(dict(modality=mod, layer=np.int16(layer), tokens=int(g["tokens"].iloc[0]), entropy_bits=h,
                         normalised_entropy=h / math.log2(E), distinct_experts=int((c > 0).sum()),
                         uniform_entropy_bits=math.log2(E)))
    return pd.DataFrame(rows)


def modality_experts(load: pd.DataFrame, *, min_share: float | None = None, rare: float = 0.25,
                     exclude: tuple[str, ...] = ("special",)) -> pd.DataFrame:
    """Experts that one modality uses and the others rarely do, per layer.

    A row for (modality m, layer, expert) when m's tokens choose it with share >= min_share (default the
    uniform share A/E) and every other modality's share is at most `rare` times m's. Modalities in `exclude`
    (the few framing tokens by default) are neither candidates nor compared against. Columns: modality,
    layer, expert, share, max_other_share, other_modality (the one with the largest share), ratio =
    share / max_other_share (inf when no other modality chose it), tokens; most exclusive first.
    """
    cols = ["modality", "layer", "expert", "share", "max_other_share", "other_modality", "ratio", "tokens"]
    f = load[~load["modality"].isin(exclude)]
    mods = list(dict.fromkeys(f["modality"]))
    if len(mods) < 2:
        return pd.DataFrame(columns=cols)
    floor = float(f["uniform_share"].iloc[0]) if min_share is None else float(min_share)
    wide = f.pivot_table(index=["layer", "expert"], columns="modality", values="share", observed=True)[mods]
    tok = f.groupby("modality", sort=False)["tokens"].first()
    rows = []
    for m in mods:
        others = wide.drop(columns=m)
        mx, arg = others.max(axis=1), others.idxmax(axis=1)
        ok = (wide[m] >= floor) & (mx <= rare * wide[m])
        for (layer, expert), s in wide.loc[ok, m].items():
            o = float(mx.loc[(layer, expert)])
            rows.append(dict(modality=m, layer=np.int16(layer), expert=np.int16(expert), share=float(s),
                             max_other_share=o, other_modality=arg.loc[(layer, expert)],
                             ratio=float(s / o) if o > 0 else math.inf, tokens=int(tok[m])))
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["modality", "ratio", "share", "layer", "expert"], ascending=[True, False, False, True,
                                                                                          True],
                           kind="stable", ignore_index=True)


def modality_overlap(load: pd.DataFrame) -> pd.DataFrame:
    """Cross-modal overlap per layer: for each pair of modalities a < b (in MODALITIES order),
    overlap = sum_e min(q_a(e), q_b(e)) with q the modality's load distribution (count / its selections):
    1 = the same experts in the same proportions, 0 = disjoint expert sets. Columns layer, modality_a,
    modality_b, tokens_a, tokens_b, overlap."""
    from q3lab.omni.modality import MODALITIES
    rank = {m: i for i, m in enumerate(MODALITIES)}
    mods = sorted(dict.fromkeys(load["modality"]), key=lambda m: rank.get(m, len(rank)))
    q, tok = {}, {}
    for m, g in load.groupby("modality", sort=False):
        c = g.sort_values(["layer", "expert"])
        L = c["layer"].nunique()
        cnt = c["count"].to_numpy(np.float64).reshape(L, -1)
        q[m] = cnt / np.maximum(cnt.sum(1, keepdims=True), 1)
        tok[m] = int(c["tokens"].iloc[0])
        layers = np.sort(c["layer"].unique())
    rows = []
    for i, a in enumerate(mods):
        for b in mods[i + 1:]:
            ov = np.minimum(q[a], q[b]).sum(1)
            rows += [dict(layer=np.int16(lay), modality_a=a, modality_b=b, tokens_a=tok[a], tokens_b=tok[b],
                          overlap=float(v)) for lay, v in zip(layers, ov)]
    return pd.DataFrame(rows, columns=["layer", "modality_a", "modality_b", "tokens_a", "tokens_b", "overlap"])


def modality_hit_rate_arrays(labels: np.ndarray, experts: np.ndarray, new_doc: np.ndarray, capacity: int,
                             policy: str = "lru", *, arrival_tokens: int = 4,
                             per_layer: bool = False) -> pd.DataFrame:
    """`modality_hit_rate` on arrays: labels [N], experts [N, L, A] and new_doc [N] (True where a prompt or
    document starts) in decode order. The cache runs on over document boundaries, as one serving cache."""
    from q3lab.analysis.cachesim import replay
    from q3lab.omni.modality import MODALITIES
    N, L, A = experts.shape
    if arrival_tokens < 1:
        raise InputError(f"metrics: arrival_tokens must be >= 1, got {arrival_tokens}")
    ex = np.sort(experts.astype(np.int64), axis=-1)          # a layer call's experts in ascending order
    seq = pd.DataFrame({"group": np.repeat(np.arange(N * L), A),
                        "layer": np.broadcast_to(np.arange(L)[None, :, None], ex.shape).reshape(-1),
                        "expert": ex.reshape(-1), "weight": 0.0})
    hits = replay(seq, int(capacity), policy, per_layer=per_layer)["hit"].to_numpy().reshape(N, L * A)
    labels = np.asarray(labels, dtype=object)
    # index of each token within its run of one modality, restarting at each document
    run = np.zeros(N, np.int64)
    for i in range(1, N):
        run[i] = 0 if new_doc[i] or labels[i] != labels[i - 1] else run[i - 1] + 1
    phase = np.where(run < arrival_tokens, "arrival", "within")
    rank = {m: i for i, m in enumerate(MODALITIES)}
    rows = []
    for mod in sorted(set(labels.tolist()), key=lambda m: rank.get(m, len(rank))):
        for ph in ("arrival", "within", "all"):
            sel = (labels == mod) & ((phase == ph) if ph != "all" else True)
            n = int(sel.sum())
            if not n:
                continue
            h = int(hits[sel].sum())
            rows.append(dict(modality=mod, phase=ph, tokens=n, accesses=n * L * A, hits=h,
                             hit_rate=h / (n * L * A)))
    out = pd.DataFrame(rows)
    out.attrs.update(capacity=int(capacity), policy=policy, arrival_tokens=int(arrival_tokens),
                     per_layer=bool(per_layer))
    return out


def modality_hit_rate(frame: pd.DataFrame, capacity: int, policy: str = "lru", *, arrival_tokens: int = 4,
                      per_layer: bool = False) -> pd.DataFrame:
    """Expert-cache hit rate split by the modality of the token that makes the accesses, in the recorded
    order (decode order of `q3lab.analysis.cachesim`, one cache of `capacity` experts over all layers, or per layer).

    phase "arrival": the first `arrival_tokens` tokens of each run of one modality (when audio or image
    tokens arrive after text, and text after them), "within": the rest of the run, "all": both. Columns
    modality, phase, tokens, accesses, hits, hit_rate.
    """
    tokens, ex = _token_experts(frame)
    new_doc = np.r_[True, tokens["_p"].to_numpy()[1:] != tokens["_p"].to_numpy()[:-1]] if len(tokens) else \
        np.zeros(0, bool)
    return modality_hit_rate_arrays(tokens["modality"].to_numpy(), ex, new_doc, capacity, policy,
                                    arrival_tokens=arrival_tokens, per_layer=per_layer)
