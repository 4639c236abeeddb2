"""Routing-atlas analyses out of core: DuckDB scans the Parquet parts, nothing loads the dataset whole.

Dimensions: N tokens, L layers, A experts per token (top-k), E experts per layer.

How the work is split. DuckDB scans and projects the parts (only the columns an analysis needs, in dataset
order: documents in part order, tokens in order) and streams Arrow batches of `batch_rows` tokens; each
analysis folds a batch into a small accumulator (counts of [L, E], [L, E, E], [V', L, E], histograms) with
numpy, so memory is bounded by one batch plus the accumulator, whatever the dataset's size. Aggregates whose
key space grows with the data (token ids) are restricted to the `top_tokens` most frequent ids, found by a
DuckDB GROUP BY. Every function returns a tidy pandas frame of results (never of the trace), most with the
uniform-routing baseline alongside: what routing would look like if each token picked A of E experts
uniformly at random, independently of everything.

Sequential analyses (consecutive overlap, reuse distance, next tokens) need document boundaries: a document
never spans parts, its tokens are stored in order, and a new document starts where token_index does not
continue the previous row (token_index 0).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from q3lab.errors import InputError
from q3lab.atlas.dataset import Dataset, open_dataset

BATCH_ROWS = 16384


# -- plumbing -----------------------------------------------------------------------------------
def _ds(ds: Dataset | str | Path) -> Dataset:
    return ds if isinstance(ds, Dataset) else open_dataset(ds)


def connect(memory_limit: str = "1GB", threads: int | None = None):
    """A DuckDB connection with a memory limit (it spills to a temporary folder beyond it)."""
    import duckdb
    con = duckdb.connect()
    con.execute(f"SET memory_limit='{memory_limit}'")
    con.execute("SET preserve_insertion_order=true")
    con.execute("SET enable_progress_bar=false")   # its bar would land in notebook outputs
    if threads:
        con.execute(f"SET threads={int(threads)}")
    return con


def source(ds: Dataset | str | Path) -> str:
    """The SQL table expression over a dataset's complete parts: `SELECT ... FROM {source(ds)}`."""
    ds = _ds(ds)
    files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in ds.parts)
    return f"read_parquet([{files}])"


def sql(ds: Dataset | str | Path, query: str, con=None) -> pd.DataFrame:
    """Run a query over the dataset, written with `{src}` for the table: a small result frame.

    `sql(ds, "SELECT domain, count(*) AS tokens FROM {src} GROUP BY domain")`
    """
    con = con or connect()
    return con.sql(query.format(src=source(ds))).df()


def stream(ds: Dataset | str | Path, columns: Sequence[str] = ("token_index", "experts"), *,
           batch_rows: int = BATCH_ROWS, max_tokens: int | None = None, con=None) -> Iterator[dict]:
    """Batches of at most `batch_rows` tokens in dataset order, as numpy arrays: experts [n, L, A] uint8,
    weights [n, L, A] float32, token_index / token int32, domain / doc_id / modality object arrays (modality
    "text" throughout for a dataset of q3lab-atlas/1); `max_tokens` stops early.

    One DuckDB query per part, so dataset order is the parts' order and each part's row order.
    """
    ds = _ds(ds)
    con = con or connect()
    L, A = ds.num_layers, ds.top_k
    # a q3lab-atlas/1 dataset has no modality column: every token of it was text
    cols = ", ".join("'text' AS modality" if c == "modality" and not ds.has_modality else c for c in columns)
    seen = 0
    for part in ds.parts:
        q = f"SELECT {cols} FROM read_parquet('{str(part).replace(chr(39), chr(39) * 2)}')"
        for batch in con.sql(q).to_arrow_reader(batch_rows):
            n = batch.num_rows
            if max_tokens is not None:
                n = min(n, max_tokens - seen)
                if n <= 0:
                    return
                batch = batch.slice(0, n)
            out = {}
            for name in columns:
                col = batch.column(name)
                if name in ("experts", "weights"):
                    vals = col.flatten().to_numpy(zero_copy_only=False)
                    if len(vals) != n * L * A:
                        raise InputError(f"{part}: column {name} holds {len(vals)} values for {n} tokens, "
                                         f"expected {L}x{A} per token")
                    out[name] = vals.reshape(n, L, A).astype(np.uint8 if name == "experts" else np.float32,
                                                             copy=False)
                elif name in ("domain", "doc_id", "modality"):
                    out[name] = np.asarray(col.to_pylist(), dtype=object)
                else:
                    out[name] = col.to_numpy(zero_copy_only=False)
            seen += n
            yield out
            if max_tokens is not None and seen >= max_tokens:
                return


def _boundaries(token_index: np.ndarray, prev_index: int | None) -> np.ndarray:
    """True where a row starts a new document (token_index does not continue the previous row)."""
    prev = np.empty_like(token_index, dtype=np.int64)
    prev[0] = -2 if prev_index is None else prev_index
    prev[1:] = token_index[:-1]
    return token_index != prev + 1


def uniform_overlap(num_experts: int, top_k: int) -> dict[str, float]:
    """Consecutive tokens picking top_k of num_experts uniformly: P(any shared) and the mean shared count."""
    E, A = num_experts, top_k
    return {"any_overlap": 1 - math.comb(E - A, A) / math.comb(E, A), "mean_overlap": A * A / E}


def uniform_overlap_share(num_experts: int, top_k: int, j: int) -> float:
    """P(exactly j shared experts) under uniform routing (hypergeometric)."""
    E, A = num_experts, top_k
    return math.comb(A, j) * math.comb(E - A, A - j) / math.comb(E, A)


# -- one-pass accumulators --------------------------------------------------------------------------
# Each analysis is an accumulator: `update(batch)` folds one streamed batch in, `result()` gives the frame.
# `run(ds, accumulators)` feeds them all from one scan; the public functions below run one each.
class _Acc:
    columns: tuple[str, ...] = ()

    def __init__(self, ds: Dataset):
        self.L, self.A, self.E = ds.num_layers, ds.top_k, ds.num_experts
        self.offs = (np.arange(self.L, dtype=np.int64) * self.E)[None, :, None]

    def update(self, b: dict) -> None:
        raise NotImplementedError

    def result(self) -> pd.DataFrame:
        raise NotImplementedError


def run(ds: Dataset | str | Path, accs: Sequence[_Acc], *, batch_rows: int = BATCH_ROWS,
        max_tokens: int | None = None) -> list[pd.DataFrame]:
    """Feed every accumulator from one DuckDB scan of the columns they need; their results in order."""
    ds = _ds(ds)
    cols = ["token_index"] + sorted({c for a in accs for c in a.columns} - {"token_index"})
    stream_ = stream(ds, cols, batch_rows=batch_rows, max_tokens=max_tokens)
    prev_ti = None
    for b in _with_next(stream_) if "token" in cols else stream_:
        b["new_doc"] = _boundaries(b["token_index"].astype(np.int64), prev_ti)
        prev_ti = int(b["token_index"][-1])
        for a in accs:
            a.update(b)
    return [a.result() for a in accs]


class LayerLoad(_Acc):
    """Tokens routed to each expert of each layer."""
    columns = ("experts",)

    def __init__(self, ds):
        super().__init__(ds)
        self.counts = np.zeros(self.L * self.E, np.int64)
        self.n = 0

    def update(self, b):
        keys = (b["experts"].astype(np.uint16) + self.offs.astype(np.uint16)).reshape(-1)
        self.counts += np.bincount(keys, minlength=self.L * self.E)
        self.n += len(b["experts"])

    def result(self):
        L, E = self.L, self.E
        return pd.DataFrame({"layer": np.repeat(np.arange(L), E).astype(np.int16),
                             "expert": np.tile(np.arange(E), L).astype(np.int16), "count": self.counts,
                             "share": self.counts / max(self.n, 1), "uniform_share": self.A / E})


def layer_load(ds: Dataset | str | Path, *, batch_rows: int = BATCH_ROWS) -> pd.DataFrame:
    """Tokens routed to each expert of each layer: layer, expert, count, share (of the layer's tokens: sums
    to A over a layer), uniform_share (= A/E)."""
    ds = _ds(ds)
    return run(ds, [LayerLoad(ds)], batch_rows=batch_rows)[0]


def layer_summary(load: pd.DataFrame, num_experts: int, top_k: int, mass: float = 0.9) -> pd.DataFrame:
    """Per layer from `layer_load`: entropy of the expert distribution (bits; uniform = log2 E), distinct
    experts used, experts carrying `mass` of the routing, the max/mean load ratio; uniform baselines."""
    rows = []
    for layer, g in load.groupby("layer", sort=True):
        c = g["count"].to_numpy(np.float64)
        p = c / c.sum() if c.sum() else c
        nz = p[p > 0]
        srt = np.sort(p)[::-1]
        rows.append(dict(layer=int(layer), entropy_bits=float(-(nz * np.log2(nz)).sum()),
                         uniform_entropy_bits=math.log2(num_experts), distinct_experts=int((c > 0).sum()),
                         experts_for_mass=int(np.searchsorted(np.cumsum(srt), mass - 1e-12) + 1),
                         uniform_experts_for_mass=int(math.ceil(mass * num_experts)),
                         max_over_mean=float(srt[0] * num_experts) if len(srt) else float("nan")))
    out = pd.DataFrame(rows)
    out["normalised_entropy"] = out["entropy_bits"] / out["uniform_entropy_bits"]
    out.attrs["mass"] = mass
    return out


class Coactivation(_Acc):
    """Pairs of experts chosen by one token in one layer, over the first `max_tokens` tokens."""
    columns = ("experts",)

    def __init__(self, ds, max_tokens: int | None = 100_000):
        super().__init__(ds)
        self.pair = np.zeros(self.L * self.E * self.E, np.int64)
        self.left = max_tokens

    def update(self, b):
        ex = b["experts"]
        if self.left is not None:
            if self.left <= 0:
                return
            ex = ex[:self.left]
            self.left -= len(ex)
        E = self.E
        base = self.offs[..., None] * E                                               # [1, L, 1, 1]
        for s in range(0, len(ex), 1024):   # keys of 1024 tokens: 25 MB for 48 x top-8, not 400 per batch
            x = ex[s:s + 1024].astype(np.int64)
            keys = base + x[:, :, :, None] * E + x[:, :, None, :]                      # [n, L, A, A]
            self.pair += np.bincount(keys.reshape(-1), minlength=self.L * E * E)

    def result(self):
        L, A, E = self.L, self.A, self.E
        pair = self.pair.reshape(L, E, E)
        diag = np.einsum("lii->li", pair)                                             # tokens choosing a
        la, aa, bb = np.meshgrid(np.arange(L), np.arange(E), np.arange(E), indexing="ij")
        keep = aa != bb
        with np.errstate(invalid="ignore", divide="ignore"):
            p = pair / diag[:, :, None]
        uni = (A - 1) / (E - 1)
        return pd.DataFrame({"layer": la[keep].astype(np.int16), "a": aa[keep].astype(np.int16),
                             "b": bb[keep].astype(np.int16), "count": pair[keep], "p_b_given_a": p[keep],
                             "uniform": uni, "lift": p[keep] / uni})


def coactivation(ds: Dataset | str | Path, *, max_tokens: int | None = 100_000,
                 batch_rows: int = BATCH_ROWS) -> pd.DataFrame:
    """P(b | a): of the tokens that chose expert a in a layer, the share that also chose b (a != b).

    Columns layer, a, b, count (tokens choosing both), p_b_given_a, uniform (= (A-1)/(E-1)), lift.
    Counted over the first `max_tokens` tokens (None: all; the pair count grows as A^2 per token-layer, at
    ~70 us per token of the real thinker; 1e5 tokens give each P(b | a) a standard error near 0.003 there:
    about 6,250 tokens choose each expert, sqrt(p (1 - p) / 6250) at p = 7/127).
    """
    ds = _ds(ds)
    return run(ds, [Coactivation(ds, max_tokens)], batch_rows=batch_rows)[0]


class DomainLoad(_Acc):
    """Expert counts per domain (tokens without a domain left out)."""
    columns = ("domain", "experts")

    def __init__(self, ds):
        super().__init__(ds)
        self.names: dict[str, int] = {}
        self.acc: list[np.ndarray] = []
        self.ntok: list[int] = []

    def update(self, b):
        dom = b["domain"]
        for d in pd.unique(dom):
            if d is None:
                continue
            if d not in self.names:
                self.names[d] = len(self.names)
                self.acc.append(np.zeros(self.L * self.E, np.int64))
                self.ntok.append(0)
            rows = dom == d
            k = self.names[d]
            keys = (b["experts"][rows].astype(np.uint16) + self.offs.astype(np.uint16)).reshape(-1)
            self.acc[k] += np.bincount(keys, minlength=self.L * self.E)
            self.ntok[k] += int(rows.sum())

    def result(self):
        L, A, E = self.L, self.A, self.E
        cols = ["domain", "layer", "expert", "count", "tokens", "share", "overall_share", "lift", "uniform_share"]
        if not self.names:
            return pd.DataFrame(columns=cols)
        order = sorted(self.names)
        counts = np.stack([self.acc[self.names[d]] for d in order])                  # [D, L*E]
        toks = np.array([self.ntok[self.names[d]] for d in order])
        overall = counts.sum(0) / toks.sum()
        D = len(order)
        out = pd.DataFrame({"domain": np.repeat(order, L * E), "layer": np.tile(np.repeat(np.arange(L), E), D),
                            "expert": np.tile(np.arange(E), L * D), "count": counts.reshape(-1),
                            "tokens": np.repeat(toks, L * E), "share": (counts / toks[:, None]).reshape(-1),
                            "overall_share": np.tile(overall, D)})
        with np.errstate(invalid="ignore", divide="ignore"):
            out["lift"] = out["share"] / out["overall_share"]
        out["uniform_share"] = A / E
        return out[cols]


def domain_specialisation(ds: Dataset | str | Path, *, batch_rows: int = BATCH_ROWS) -> pd.DataFrame:
    """Share of each domain's tokens routed to each expert: domain, layer, expert, count, tokens (of the
    domain), share, overall_share (all domains), lift = share / overall_share (1 = no specialisation),
    uniform_share (A/E). Tokens without a domain are left out; an empty frame when no token has one."""
    ds = _ds(ds)
    return run(ds, [DomainLoad(ds)], batch_rows=batch_rows)[0]


def top_tokens_of(ds: Dataset | str | Path, n: int, con=None) -> np.ndarray:
    """The n most frequent token ids of the dataset (DuckDB GROUP BY), most frequent first."""
    con = con or connect()
    top = con.sql(f"SELECT token, count(*) AS n FROM {source(ds)} GROUP BY token ORDER BY n DESC, token "
                  f"LIMIT {int(n)}").fetchnumpy()
    return np.asarray(top["token"], np.int64)


class TokenCounts(_Acc):
    """Expert counts per token id (input, or the next token of the document), for a fixed set of ids."""
    columns = ("token", "experts")

    def __init__(self, ds, ids: np.ndarray, by: str = "input"):
        super().__init__(ds)
        if by not in ("input", "predicted"):
            raise InputError(f"atlas: by must be 'input' or 'predicted', got {by!r}")
        self.by, self.ids = by, ids
        self.lookup = np.full(int(ids.max()) + 1 if len(ids) else 1, -1, np.int64)
        self.lookup[ids] = np.arange(len(ids))
        self.counts = np.zeros(len(ids) * self.L * self.E, np.int64)
        self.occ = np.zeros(len(ids), np.int64)

    def update(self, b):
        tok = b["token"].astype(np.int64) if self.by == "input" else b["next_token"]
        ok = (tok >= 0) & (tok < len(self.lookup))
        idx = np.full(len(tok), -1, np.int64)
        idx[ok] = self.lookup[tok[ok]]
        ok = idx >= 0
        if not ok.any():
            return
        LE = self.L * self.E
        keys = (idx[ok, None, None] * LE + self.offs + b["experts"][ok]).reshape(-1)
        self.counts += np.bincount(keys, minlength=len(self.ids) * LE)
        self.occ += np.bincount(idx[ok], minlength=len(self.ids))

    def result(self):
        return self.ids, self.occ, self.counts.reshape(len(self.ids), self.L, self.E)


def _with_next(batches: Iterator[dict]) -> Iterator[dict]:
    """Add `next_token` (the next token of the same document, -1 at a document's end) with one batch of
    lookahead."""
    prev = None
    for b in batches:
        if prev is not None:
            yield _attach_next(prev, b)
        prev = b
    if prev is not None:
        yield _attach_next(prev, None)


def _attach_next(b: dict, nxt: dict | None) -> dict:
    ti, tok = b["token_index"].astype(np.int64), b["token"].astype(np.int64)
    n = len(ti)
    next_ti = np.empty(n, np.int64)
    next_tok = np.empty(n, np.int64)
    next_ti[:-1], next_tok[:-1] = ti[1:], tok[1:]
    next_ti[-1], next_tok[-1] = (int(nxt["token_index"][0]), int(nxt["token"][0])) if nxt is not None else (-9, -1)
    next_tok[next_ti != ti + 1] = -1
    return {**b, "next_token": next_tok}


def vocab_frame(counts_result, num_experts: int, top_k: int, *, per_expert: int = 5, min_count: int = 20,
                by: str = "input") -> pd.DataFrame:
    """Each expert's most frequent token ids, from a TokenCounts result (see `vocab_specialisation`)."""
    ids, occ, counts = counts_result
    ok = occ >= min_count
    ids, occ, counts = ids[ok], occ[ok], counts[ok]
    rows = []
    for layer in range(counts.shape[1]):
        c = counts[:, layer, :]                                                          # [V', E]
        spec = c / np.maximum(occ[:, None], 1)
        for e in range(num_experts):
            top = np.lexsort((-spec[:, e], -c[:, e]))[:per_expert]
            for r, v in enumerate(top):
                if c[v, e] == 0:
                    break
                rows.append((layer, e, r + 1, int(ids[v]), int(c[v, e]), int(occ[v]), float(spec[v, e])))
    out = pd.DataFrame(rows, columns=["layer", "expert", "rank", "token", "routed", "occurrences",
                                      "specialisation"])
    out["uniform"] = top_k / num_experts
    out["by"] = by
    return out


def token_frame(counts_result, num_experts: int, top_k: int, *, min_count: int = 20, by: str = "input",
                seed: int = 0) -> pd.DataFrame:
    """Per layer, how deterministic routing is per token id, from a TokenCounts result (see
    `token_specialisation`)."""
    ids, occ, counts = counts_result
    E, A = num_experts, top_k
    ok = occ >= min_count
    occ, counts = occ[ok], counts[ok]
    rng = np.random.default_rng(seed)
    sim = (rng.binomial(occ[:, None, None], A / E, size=(len(occ), 8, E)).max(-1).mean(-1) / np.maximum(occ, 1)
           if len(occ) else np.zeros(0))
    w = occ / max(occ.sum(), 1)
    rows = []
    for layer in range(counts.shape[1]):
        top = counts[:, layer, :].max(-1) / np.maximum(occ, 1) if len(occ) else np.zeros(0)
        rows.append(dict(layer=layer, tokens=int(len(occ)), occurrences=int(occ.sum()),
                         top_share=float((w * top).sum()), uniform_top_share=float((w * sim).sum()), by=by))
    return pd.DataFrame(rows)


def vocab_specialisation(ds: Dataset | str | Path, *, by: str = "input", top_tokens: int = 4096,
                         per_expert: int = 5, min_count: int = 20, batch_rows: int = BATCH_ROWS) -> pd.DataFrame:
    """Each expert's vocabulary (OLMoE's vocabulary specialisation): per layer and expert, the token ids it
    receives most often, with specialisation = routed / occurrences (the share of that token's occurrences
    routed to this expert; uniform routing: A/E).

    by: "input" (the token at that position) or "predicted" (the next token of the document: the target the
    model is trained to predict; the dataset stores no model outputs). Among the `top_tokens` most frequent
    ids with at least `min_count` occurrences. Columns layer, expert, rank, token, routed, occurrences,
    specialisation, uniform, by.
    """
    ds = _ds(ds)
    res = run(ds, [TokenCounts(ds, top_tokens_of(ds, top_tokens), by)], batch_rows=batch_rows)[0]
    return vocab_frame(res, ds.num_experts, ds.top_k, per_expert=per_expert, min_count=min_count, by=by)


def token_specialisation(ds: Dataset | str | Path, *, by: str = "input", top_tokens: int = 4096,
                         min_count: int = 20, batch_rows: int = BATCH_ROWS, seed: int = 0) -> pd.DataFrame:
    """How deterministic routing is per token id: per layer, over token ids with at least `min_count`
    occurrences (among the `top_tokens` most frequent), the occurrence-weighted mean of max_e P(e | token)
    (the share of a token's occurrences that goes to its favourite expert), and the same under uniform
    routing with the same occurrence counts (simulated: each expert's count ~ Binomial(n, A/E)).
    Columns layer, tokens, occurrences, top_share, uniform_top_share, by."""
    ds = _ds(ds)
    res = run(ds, [TokenCounts(ds, top_tokens_of(ds, top_tokens), by)], batch_rows=batch_rows)[0]
    return token_frame(res, ds.num_experts, ds.top_k, min_count=min_count, by=by, seed=seed)


def _bitsets(ex: np.ndarray, E: int) -> np.ndarray:
    """Expert sets as bitmasks: [n, L, ceil(E/64)] uint64 (a token's A experts are distinct: sum = or)."""
    words = -(-E // 64)
    one = np.left_shift(np.uint64(1), (ex & 63).astype(np.uint64))                    # [n, L, A]
    if words == 1:
        return one.sum(-1, dtype=np.uint64)[:, :, None]
    word = ex >> 6
    out = np.empty(ex.shape[:2] + (words,), np.uint64)
    for w in range(words):
        out[:, :, w] = (one * (word == w)).sum(-1, dtype=np.uint64)
    return out


class Overlap(_Acc):
    """Experts shared by consecutive tokens of a document, per layer (popcount of bitmask intersections)."""
    columns = ("experts",)

    def __init__(self, ds):
        super().__init__(ds)
        self.hist = np.zeros((self.L, self.A + 1), np.int64)
        self.last = None

    def update(self, b):
        bits = _bitsets(b["experts"], self.E)                                         # [n, L, W]
        prev = np.concatenate([self.last[None] if self.last is not None else bits[:1], bits[:-1]])
        cont = ~b["new_doc"]
        ov = np.bitwise_count(bits[cont] & prev[cont]).sum(-1)                        # [pairs, L]
        for layer in range(self.L):
            self.hist[layer] += np.bincount(ov[:, layer], minlength=self.A + 1)
        self.last = bits[-1].copy()

    def result(self):
        L, A, E = self.L, self.A, self.E
        pairs = self.hist.sum(1, keepdims=True)
        uni = np.array([uniform_overlap_share(E, A, j) for j in range(A + 1)])
        return pd.DataFrame({"layer": np.repeat(np.arange(L), A + 1), "overlap": np.tile(np.arange(A + 1), L),
                             "pairs": self.hist.reshape(-1), "share": (self.hist / np.maximum(pairs, 1)).reshape(-1),
                             "uniform_share": np.tile(uni, L)})


def consecutive_overlap(ds: Dataset | str | Path, *, batch_rows: int = BATCH_ROWS) -> pd.DataFrame:
    """Experts shared by consecutive tokens of a document, per layer: layer, overlap (0..A), pairs, share,
    uniform_share (hypergeometric: top-A of E chosen independently and uniformly)."""
    ds = _ds(ds)
    return run(ds, [Overlap(ds)], batch_rows=batch_rows)[0]


def overlap_summary(overlap: pd.DataFrame, num_experts: int, top_k: int) -> pd.DataFrame:
    """Per layer from `consecutive_overlap`: any_overlap (P(>= 1 shared)), mean_overlap, and the uniform
    baselines 1 - C(E-A, A)/C(E, A) and A^2/E."""
    uni = uniform_overlap(num_experts, top_k)
    f = overlap.assign(any=overlap["share"].where(overlap["overlap"] > 0, 0.0),
                       mean=overlap["overlap"] * overlap["share"])
    out = f.groupby("layer", sort=True)[["any", "mean"]].sum().reset_index()
    out = out.rename(columns={"any": "any_overlap", "mean": "mean_overlap"})
    out["uniform_any_overlap"] = uni["any_overlap"]
    out["uniform_mean_overlap"] = uni["mean_overlap"]
    return out


class ReuseDistance(_Acc):
    """Tokens since the same expert was last used in the same layer of the same document."""
    columns = ("experts",)

    def __init__(self, ds, max_distance: int = 64):
        super().__init__(ds)
        self.M = max_distance
        self.hist = np.zeros((self.L, self.M + 2), np.int64)
        self.last_use = np.full((self.L, self.E), -1, np.int64)    # global row of the last use
        self.doc_start = 0
        self.base = 0

    def update(self, b):
        ex, A, M = b["experts"], self.A, self.M
        n = len(ex)
        g = self.base + np.arange(n, dtype=np.int64)
        starts = np.where(b["new_doc"], g, -1)
        if not b["new_doc"][0]:
            starts[0] = self.doc_start
        starts = np.maximum.accumulate(starts)                                        # doc start per row
        rows = np.repeat(g, A)
        for layer in range(self.L):
            e = ex[:, layer, :].reshape(-1)                                           # [n*A], row-major
            order = np.argsort(e, kind="stable")                                      # by expert, rows ascending
            es, rs = e[order], rows[order]
            first = np.ones(len(es), bool)
            first[1:] = es[1:] != es[:-1]
            prev = np.empty_like(rs)
            prev[1:] = rs[:-1]
            prev[first] = self.last_use[layer, es[first]]
            valid = prev >= starts[rs - self.base]
            bins = np.where(valid, np.minimum(rs - prev, M + 1), 0)
            self.hist[layer] += np.bincount(bins, minlength=M + 2)
            last_of = np.ones(len(es), bool)
            last_of[:-1] = es[1:] != es[:-1]
            self.last_use[layer, es[last_of]] = rs[last_of]
        self.doc_start = int(starts[-1])
        self.base += n

    def result(self):
        L, A, E, M = self.L, self.A, self.E, self.M
        p = A / E
        d = np.arange(M + 2)
        uni = np.where(d == 0, np.nan, np.where(d <= M, p * (1 - p) ** np.maximum(d - 1, 0), (1 - p) ** M))
        reuses = self.hist[:, 1:].sum(1, keepdims=True)
        share = np.where(d[None] == 0, np.nan, self.hist / np.maximum(reuses, 1))
        return pd.DataFrame({"layer": np.repeat(np.arange(L), M + 2), "distance": np.tile(d, L),
                             "count": self.hist.reshape(-1), "share": share.reshape(-1),
                             "uniform_share": np.tile(uni, L)})


def reuse_distance(ds: Dataset | str | Path, *, max_distance: int = 64, batch_rows: int = BATCH_ROWS) -> pd.DataFrame:
    """Tokens since the same expert was last used in the same layer of the same document.

    Columns layer, distance (1..max_distance; max_distance + 1 = longer; 0 = first use in the document),
    count, share (of the reuses, first uses left out), uniform_share (geometric: p (1-p)^(d-1), p = A/E).
    """
    ds = _ds(ds)
    return run(ds, [ReuseDistance(ds, max_distance)], batch_rows=batch_rows)[0]


# -- expert caches ------------------------------------------------------------------------------------
def access_chunks(ds: Dataset | str | Path, *, max_tokens: int, layers: Sequence[int] | None = None,
                  batch_rows: int = 4096) -> Iterator[pd.DataFrame]:
    """The decode-order access sequence of the first `max_tokens` tokens, in chunks streamed from DuckDB:
    frames of group, layer, expert, weight (one group per token and layer, experts ascending within it:
    what `q3lab.analysis.cachesim.access_sequence(trace, "decode")` makes of a trace)."""
    ds = _ds(ds)
    L, A = ds.num_layers, ds.top_k
    sel = np.arange(L) if layers is None else np.asarray(list(layers))
    g0 = 0
    for b in stream(ds, ("experts", "weights"), batch_rows=batch_rows, max_tokens=max_tokens):
        ex = b["experts"][:, sel, :].astype(np.int64)
        w = b["weights"][:, sel, :].astype(np.float64)
        order = np.argsort(ex, axis=-1, kind="stable")
        ex, w = np.take_along_axis(ex, order, -1), np.take_along_axis(w, order, -1)
        n, nl = ex.shape[:2]
        group = g0 + np.repeat(np.arange(n * nl), A)
        yield pd.DataFrame({"group": group, "layer": np.broadcast_to(sel[None, :, None], ex.shape).reshape(-1),
                            "expert": ex.reshape(-1), "weight": w.reshape(-1)})
        g0 += n * nl


def hit_rate_curves(ds: Dataset | str | Path, capacities: Sequence[int],
                    policies: Sequence[str] = ("lru", "lfu", "score", "belady"), *, per_layer: bool = True,
                    max_tokens: int = 2048, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Hit rate against capacity for each eviction policy (q3lab.analysis.cachesim.simulate, Belady included), on the
    decode-order accesses of the first `max_tokens` tokens.

    per_layer=True: one cache of `capacity` experts per layer, each layer's sequence simulated on its own
    (only that layer's accesses are in memory at a time); False: one cache shared by all layers. Columns
    (layer,) policy, capacity, accesses, hits, misses, hit_rate, uniform_hit_rate (a cache of c experts under
    uniform routing hits c/E, whatever the policy). The sample is bounded because the replay is
    Python-speed (~1 us per access and policy) and Belady needs the whole sequence's future.
    """
    from q3lab.analysis.cachesim import simulate
    ds = _ds(ds)
    L, E = ds.num_layers, ds.num_experts
    # the sample's accesses, streamed once in chunks (bounded by max_tokens, not by the dataset)
    full = pd.concat(list(access_chunks(ds, max_tokens=max_tokens, layers=layers)), ignore_index=True)
    scopes = [[layer] for layer in (range(L) if layers is None else layers)] if per_layer else [layers]
    frames = []
    for sel in scopes:
        seq = full[full["layer"] == sel[0]] if per_layer else full
        res = simulate(seq, [int(c) for c in capacities], policies=tuple(policies), per_layer=False)
        if per_layer:
            res.insert(0, "layer", int(sel[0]))
        per = E if per_layer else E * (L if sel is None else len(sel))
        res["uniform_hit_rate"] = np.minimum(res["capacity"] / per, 1.0)
        frames.append(res)
    return pd.concat(frames, ignore_index=True)


def adaptive_capacities(curves: pd.DataFrame, budget: int, *, policy: str = "lru") -> pd.DataFrame:
    """Per-layer capacities for a total budget of experts, from per-layer hit-rate curves of the trace.

    Picks one capacity of each layer's grid (the curves' capacities) so that the total is at most `budget`
    and the total hits are the largest (exact: a dynamic programme over layers and budget, so the result is
    never worse than the even split, whatever the curves' shape). Columns layer, capacity, hit_rate,
    accesses, uniform_capacity, uniform_hit_rate (the budget split evenly, at the grid point at or below it).
    """
    c = curves[curves["policy"] == policy]
    if c.empty or "layer" not in c:
        raise InputError(f"atlas: adaptive_capacities needs per-layer curves of policy {policy!r}")
    grid = [(int(k), g.sort_values("capacity").reset_index(drop=True)) for k, g in c.groupby("layer")]
    L = len(grid)
    need = sum(int(g["capacity"].iloc[0]) for _, g in grid)
    if need > budget:
        raise InputError(f"atlas: budget {budget} is below the smallest capacities ({need} over {L} layers)")
    neg = -np.inf
    best = np.full(budget + 1, neg)
    best[0] = 0.0                                  # best[b]: most hits of the layers so far using exactly b
    choice = []
    for _, g in grid:
        caps, hits = g["capacity"].to_numpy(int), g["hits"].to_numpy(float)
        new = np.full(budget + 1, neg)
        arg = np.full(budget + 1, -1)
        for j, (cap, h) in enumerate(zip(caps, hits)):
            if cap > budget:
                continue
            cand = np.full(budget + 1, neg)
            cand[cap:] = best[:budget + 1 - cap] + h
            better = cand > new
            new[better], arg[better] = cand[better], j
        best = new
        choice.append(arg)
    b = int(np.argmax(best))
    picks = []
    for (_, g), arg in zip(reversed(grid), reversed(choice)):
        j = int(arg[b])
        picks.append(j)
        b -= int(g["capacity"].iloc[j])
    picks.reverse()
    even = budget // L
    rows = []
    for (k, g), j in zip(grid, picks):
        r = g.iloc[j]
        below = g[g["capacity"] <= even]
        u = below.iloc[-1] if len(below) else g.iloc[0]
        rows.append(dict(layer=k, capacity=int(r["capacity"]), hit_rate=float(r["hit_rate"]),
                         accesses=int(r["accesses"]), uniform_capacity=int(u["capacity"]),
                         uniform_hit_rate=float(u["hit_rate"])))
    out = pd.DataFrame(rows)
    out.attrs.update(budget=budget, policy=policy)
    return out


# -- splits by modality --------------------------------------------------------------------------------
class ModalityLoad(_Acc):
    """Expert counts per modality (the dataset's `modality` column; "text" throughout for q3lab-atlas/1)."""
    columns = ("modality", "experts")

    def __init__(self, ds):
        from q3lab.omni.modality import MODALITIES
        super().__init__(ds)
        self.mods = MODALITIES
        self.counts = np.zeros((len(self.mods), self.L, self.E), np.int64)
        self.tokens = np.zeros(len(self.mods), np.int64)

    def update(self, b):
        from q3lab.analysis.metrics import modality_counts
        _, c, n = modality_counts(b["modality"], b["experts"], self.E, self.mods)
        self.counts += c
        self.tokens += n

    def result(self):
        from q3lab.analysis.metrics import modality_load_frame
        return modality_load_frame(self.mods, self.counts, self.tokens, self.A)


def modality_load(ds: Dataset | str | Path, *, batch_rows: int = BATCH_ROWS) -> pd.DataFrame:
    """Per-layer expert load split by modality, the frame of `q3lab.analysis.metrics.modality_load` (modality, layer,
    expert, count, tokens, share, overall_share, lift, uniform_share), so `q3lab.analysis.metrics.modality_entropy`,
    `modality_experts` and `modality_overlap` apply to it as to a record frame's."""
    ds = _ds(ds)
    return run(ds, [ModalityLoad(ds)], batch_rows=batch_rows)[0]


def modality_summary(ds: Dataset | str | Path, *, batch_rows: int = BATCH_ROWS) -> dict[str, pd.DataFrame]:
    """The modality splits of a dataset as tidy frames: load, entropy, experts (used by one modality and
    rarely by the others), overlap (cross-modal), from one scan."""
    from q3lab.analysis.metrics import modality_entropy, modality_experts, modality_overlap
    load = modality_load(ds, batch_rows=batch_rows)
    return {"load": load, "entropy": modality_entropy(load), "experts": modality_experts(load),
            "overlap": modality_overlap(load)}


def modality_hit_rate(ds: Dataset | str | Path, capacity: int, policy: str = "lru", *, max_tokens: int = 2048,
                      arrival_tokens: int = 4, per_layer: bool = False) -> pd.DataFrame:
    """Expert-cache hit rate split by the modality of the accessing token, over the decode-order accesses of
    the first `max_tokens` tokens (as `hit_rate_curves`); the columns of `q3lab.analysis.metrics.modality_hit_rate`
    (modality, phase arrival/within/all, tokens, accesses, hits, hit_rate)."""
    from q3lab.analysis.metrics import modality_hit_rate_arrays
    ds = _ds(ds)
    labels, experts, new_doc, prev = [], [], [], None
    for b in stream(ds, ("token_index", "modality", "experts"), max_tokens=max_tokens):
        new_doc.append(_boundaries(b["token_index"].astype(np.int64), prev))
        prev = int(b["token_index"][-1])
        labels.append(b["modality"])
        experts.append(b["experts"])
    if not labels:
        raise InputError(f"{ds.path}: no tokens to replay")
    return modality_hit_rate_arrays(np.concatenate(labels), np.concatenate(experts), np.concatenate(new_doc),
                                    capacity, policy, arrival_tokens=arrival_tokens, per_layer=per_layer)


# -- everything at once ------------------------------------------------------------------------------
def atlas(ds: Dataset | str | Path, *, capacities: Sequence[int] | None = None, cache_tokens: int = 1024,
          coactivation_tokens: int | None = 100_000, top_tokens: int = 4096, min_count: int = 20,
          batch_rows: int = BATCH_ROWS) -> dict[str, pd.DataFrame]:
    """Every dataset analysis of this module as a dict of tidy frames, from one DuckDB scan of the dataset
    (plus a GROUP BY for the frequent tokens and the cache sample): what notebook 06 and the benchmark run."""
    ds = _ds(ds)
    E, A = ds.num_experts, ds.top_k
    ids = top_tokens_of(ds, top_tokens)
    accs = [LayerLoad(ds), Coactivation(ds, coactivation_tokens), DomainLoad(ds), TokenCounts(ds, ids, "input"),
            TokenCounts(ds, ids, "predicted"), Overlap(ds), ReuseDistance(ds)]
    load, co, dom, tin, tpred, ov, reuse = run(ds, accs, batch_rows=batch_rows)
    caps = list(capacities) if capacities is not None else sorted({A, E // 8, E // 4, E // 2, 3 * E // 4, E} - {0})
    curves = hit_rate_curves(ds, caps, max_tokens=cache_tokens)
    return {
        "load": load, "layers": layer_summary(load, E, A), "coactivation": co, "domains": dom,
        "vocab": pd.concat([vocab_frame(t, E, A, min_count=min_count, by=by)
                            for t, by in ((tin, "input"), (tpred, "predicted"))], ignore_index=True),
        "tokens": pd.concat([token_frame(t, E, A, min_count=min_count, by=by)
                             for t, by in ((tin, "input"), (tpred, "predicted"))], ignore_index=True),
        "overlap": ov, "overlap_summary": overlap_summary(ov, E, A), "reuse": reuse, "cache": curves,
        "adaptive": adaptive_capacities(curves, budget=ds.num_layers * caps[len(caps) // 2]),
    }
