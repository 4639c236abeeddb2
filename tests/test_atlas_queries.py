"""q3lab.atlas.queries against brute-force references computed from the whole (small) dataset in memory."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from q3lab.atlas import open_dataset
from q3lab.atlas import queries as Q
from q3lab.atlas.export import export_routed_experts
from q3lab.atlas.synthetic import synthetic_dataset
from q3lab.analysis.cachesim import simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=[(3, 4, 16), (2, 8, 128)], ids=["E16", "E128"])
def small(request, tmp_path_factory):
    L, A, E = request.param
    path = synthetic_dataset(tmp_path_factory.mktemp("syn") / "ds", 3000, layers=L, top_k=A, experts=E,
                             doc_tokens=170, part_tokens=700, vocab=50, persistence=0.4, seed=3)
    ds = open_dataset(path, require_complete=True)
    t = pa.concat_tables([pq.read_table(p) for p in ds.parts])
    ex = t.column("experts").combine_chunks().flatten().to_numpy().reshape(-1, L, A)
    w = t.column("weights").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(-1, L, A)
    return ds, t, ex, w


def _docs(t):
    return np.array(t.column("doc_id").to_pylist())


def test_uniform_baselines_by_hand():
    u = Q.uniform_overlap(128, 8)
    assert u["any_overlap"] == pytest.approx(0.41228, abs=1e-5)   # REFERENCE.md: 41% for top-8 of 128
    assert u["mean_overlap"] == 0.5
    assert sum(Q.uniform_overlap_share(128, 8, j) for j in range(9)) == pytest.approx(1.0)
    assert sum(j * Q.uniform_overlap_share(128, 8, j) for j in range(9)) == pytest.approx(0.5)


def test_layer_load_and_summary(small):
    ds, t, ex, _ = small
    load = Q.layer_load(ds, batch_rows=97)
    L, A, E = ds.num_layers, ds.top_k, ds.num_experts
    for layer in range(L):
        ref = np.bincount(ex[:, layer].reshape(-1), minlength=E)
        np.testing.assert_array_equal(load[load["layer"] == layer]["count"].to_numpy(), ref)
    assert load.groupby("layer")["share"].sum().to_numpy() == pytest.approx(A)
    s = Q.layer_summary(load, E, A)
    p = np.bincount(ex[:, 0].reshape(-1), minlength=E) / ex[:, 0].size
    assert s.loc[0, "entropy_bits"] == pytest.approx(-(p[p > 0] * np.log2(p[p > 0])).sum())
    assert s.loc[0, "distinct_experts"] == (p > 0).sum()
    srt = np.sort(p)[::-1]
    assert s.loc[0, "experts_for_mass"] == np.argmax(np.cumsum(srt) >= 0.9 - 1e-12) + 1


def test_coactivation(small):
    ds, t, ex, _ = small
    co = Q.coactivation(ds, max_tokens=1000, batch_rows=256)
    E = ds.num_experts
    layer = ds.num_layers - 1
    m = np.zeros((1000, E), bool)
    np.put_along_axis(m, ex[:1000, layer].astype(np.int64), True, axis=1)
    pair = m.T.astype(int) @ m.astype(int)
    a, b = int(ex[0, layer, 0]), int(ex[0, layer, 1])
    row = co[(co["layer"] == layer) & (co["a"] == a) & (co["b"] == b)].iloc[0]
    assert row["count"] == pair[a, b]
    assert row["p_b_given_a"] == pytest.approx(pair[a, b] / pair[a, a])
    assert row["uniform"] == pytest.approx((ds.top_k - 1) / (E - 1))


def test_domain_specialisation(small):
    ds, t, ex, _ = small
    d = Q.domain_specialisation(ds, batch_rows=333)
    dom = np.array(t.column("domain").to_pylist())
    rows = dom == "math"
    e = int(ex[rows][0, 1, 0])
    ref_share = (ex[rows][:, 1, :] == e).any(-1).mean()
    ref_all = (ex[:, 1, :] == e).any(-1).mean()
    r = d[(d["domain"] == "math") & (d["layer"] == 1) & (d["expert"] == e)].iloc[0]
    assert r["tokens"] == rows.sum()
    assert r["share"] == pytest.approx(ref_share)
    assert r["lift"] == pytest.approx(ref_share / ref_all)


def _brute_overlap(t, ex):
    docs = _docs(t)
    L, A = ex.shape[1:]
    hist = np.zeros((L, A + 1), int)
    for i in range(1, len(ex)):
        if docs[i] != docs[i - 1]:
            continue
        for layer in range(L):
            hist[layer, len(set(ex[i, layer]) & set(ex[i - 1, layer]))] += 1
    return hist


def test_consecutive_overlap_matches_brute_force(small):
    ds, t, ex, _ = small
    ov = Q.consecutive_overlap(ds, batch_rows=61)
    ref = _brute_overlap(t, ex)
    np.testing.assert_array_equal(ov["pairs"].to_numpy().reshape(ref.shape), ref)
    s = Q.overlap_summary(ov, ds.num_experts, ds.top_k)
    assert s.loc[0, "any_overlap"] == pytest.approx(ref[0, 1:].sum() / ref[0].sum())
    assert s.loc[0, "mean_overlap"] == pytest.approx((ref[0] * np.arange(ds.top_k + 1)).sum() / ref[0].sum())


def test_reuse_distance_matches_brute_force(small):
    ds, t, ex, _ = small
    M = 12
    r = Q.reuse_distance(ds, max_distance=M, batch_rows=89)
    docs = _docs(t)
    L = ex.shape[1]
    ref = np.zeros((L, M + 2), int)
    for layer in range(L):
        last: dict = {}
        for i in range(len(ex)):
            if i == 0 or docs[i] != docs[i - 1]:
                last = {}
            for e in ex[i, layer]:
                ref[layer, 0 if e not in last else min(i - last[e], M + 1)] += 1
                last[e] = i
    np.testing.assert_array_equal(r["count"].to_numpy().reshape(ref.shape), ref)
    p = ds.top_k / ds.num_experts
    assert r.loc[1, "uniform_share"] == pytest.approx(p)
    assert r.loc[3, "uniform_share"] == pytest.approx(p * (1 - p) ** 2)


def test_vocab_and_token_specialisation(small):
    ds, t, ex, _ = small
    tok = t.column("token").to_numpy().astype(np.int64)
    docs = _docs(t)
    nxt = np.full(len(tok), -1)
    same = docs[1:] == docs[:-1]
    nxt[:-1][same] = tok[1:][same]
    for by, key in (("input", tok), ("predicted", nxt)):
        v = Q.vocab_specialisation(ds, by=by, top_tokens=10, min_count=5, batch_rows=77)
        row = v[(v["layer"] == 0) & (v["rank"] == 1)].iloc[0]
        x, e = row["token"], row["expert"]
        rows = key == x
        assert row["occurrences"] == rows.sum()
        assert row["routed"] == (ex[rows][:, 0, :] == e).any(-1).sum()
        assert row["specialisation"] == pytest.approx(row["routed"] / row["occurrences"])
        ts = Q.token_specialisation(ds, by=by, top_tokens=10, min_count=5, batch_rows=77)
        ids = pd.Series(tok).value_counts().sort_index().sort_values(ascending=False, kind="stable").index[:10]
        occ = np.array([(key == i).sum() for i in ids])
        keep = occ >= 5
        tops = np.array([np.bincount(ex[key == i][:, 0, :].reshape(-1), minlength=ds.num_experts).max()
                         for i in ids]) / np.maximum(occ, 1)
        assert ts.loc[0, "top_share"] == pytest.approx((occ[keep] * tops[keep]).sum() / occ[keep].sum())
        assert ts.loc[0, "uniform_top_share"] < ts.loc[0, "top_share"] or ds.num_experts == 16


def _long_frame(t, ex, w, n):
    L, A = ex.shape[1:]
    docs = _docs(t)[:n]
    ti = t.column("token_index").to_numpy()[:n]
    return pd.DataFrame({"prompt": np.repeat(docs, L * A), "token_index": np.repeat(ti, L * A),
                         "layer": np.tile(np.repeat(np.arange(L), A), n), "rank": np.tile(np.arange(A), L * n),
                         "expert": ex[:n].reshape(-1).astype(np.int16), "weight": w[:n].reshape(-1)})


def test_hit_rate_curves_equal_cachesim_on_the_trace(small):
    ds, t, ex, w = small
    caps = [ds.top_k, ds.top_k + 3, ds.num_experts // 2]
    got = Q.hit_rate_curves(ds, caps, max_tokens=400)
    ref = simulate(_long_frame(t, ex, w, 400), caps, per_layer=True)
    pd.testing.assert_frame_equal(got.drop(columns="uniform_hit_rate"), ref, check_dtype=False)
    shared = Q.hit_rate_curves(ds, [ds.top_k * ds.num_layers + 5], per_layer=False, max_tokens=300)
    ref = simulate(_long_frame(t, ex, w, 300), [ds.top_k * ds.num_layers + 5])
    np.testing.assert_array_equal(shared["hits"].to_numpy(), ref["hits"].to_numpy())


def test_adaptive_capacities_by_hand():
    # layer 0 saturates at 4 experts, layer 1 keeps gaining: a budget of 12 goes 4 / 8
    curves = pd.DataFrame({"layer": [0] * 3 + [1] * 3, "policy": "lru", "capacity": [2, 4, 8] * 2,
                           "accesses": 100, "hits": [50, 90, 91, 10, 40, 80]})
    curves["hit_rate"] = curves["hits"] / 100
    a = Q.adaptive_capacities(curves, 12)
    assert a["capacity"].tolist() == [4, 8]
    assert a["hit_rate"].tolist() == [0.90, 0.80]
    assert a["uniform_capacity"].tolist() == [4, 4]
    assert a["uniform_hit_rate"].tolist() == [0.90, 0.40]
    # a convex start (layer 0 gains only past 4): the exact allocation still finds 8 / 4
    curves["hits"] = [10, 20, 90, 10, 40, 50]
    curves["hit_rate"] = curves["hits"] / 100
    assert Q.adaptive_capacities(curves, 12)["capacity"].tolist() == [8, 4]


def test_export_routed_experts(small, tmp_path):
    ds, t, ex, _ = small
    out = export_routed_experts(ds, tmp_path / "routed.npy")
    arr = np.load(out)
    assert arr.dtype == np.int16 and arr.shape == ex.shape
    np.testing.assert_array_equal(arr, ex)
    idx = pq.read_table(out.with_suffix(".index.parquet"))
    assert idx.column("doc_id").to_pylist() == t.column("doc_id").to_pylist()


def test_atlas_peak_rss_in_a_subprocess(tmp_path):
    """The whole analysis plan (`atlas()`) on a synthetic dataset of the real thinker's routing shape
    (48 layers, top-8 of 128) in a fresh process stays far under 4 GB. CI uses 4,000 and 16,000 tokens
    (1.5 and 6 MB of experts), not 10^7 (3.8 GB: minutes on 2 cores; measured once, bench/RESULTS.md).
    Streaming keeps the peak independent of the dataset's size, which this test checks as
    peak(16k) - peak(4k) < 300 MB (the peak's run-to-run noise here reaches ~100 MB), with accumulators of
    fixed size (top_tokens=256 ids, both runs see them)."""
    peaks = []
    for n in (4_000, 16_000):
        path = synthetic_dataset(tmp_path / f"ds{n}", n, part_tokens=8192, doc_tokens=1000, seed=1)
        code = ("import json, resource, sys; from q3lab.atlas import queries as Q; "
                f"r = Q.atlas(sys.argv[1], cache_tokens=16, capacities=[8, 64], coactivation_tokens=2000, "
                f"top_tokens=256, batch_rows=4096); "
                "print(json.dumps({'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
                "'tokens': int(r['load']['count'].sum() // 384)}))")
        res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                             env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        info = json.loads(res.stdout.strip().splitlines()[-1])
        assert info["tokens"] == n
        peaks.append(info["rss_mb"])
    assert max(peaks) < 1536, peaks
    assert peaks[1] - peaks[0] < 300, peaks
