"""q3lab.analysis.metrics on hand-made traces whose answers are worked out by hand in each test."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from q3lab.analysis import metrics as M
from q3lab.errors import InputError


def trace(prompts: dict, E: int, domains: dict | None = None) -> pd.DataFrame:
    """prompts: {prompt id: [token -> [layer -> expert ids in rank order]]} -> a trace frame."""
    rows = []
    for pid, toks in prompts.items():
        for t, layers in enumerate(toks):
            for layer, experts in enumerate(layers):
                for rank, e in enumerate(experts):
                    row = dict(prompt=pid, token_index=t, layer=layer, rank=rank, expert=e, weight=1 / len(experts))
                    if domains is not None:
                        row["domain"] = domains[pid]
                    rows.append(row)
    f = pd.DataFrame(rows)
    f.attrs["num_experts"] = E
    return f


def one_layer(sets: list, E: int, pid=0) -> pd.DataFrame:
    return trace({pid: [[s] for s in sets]}, E)


def test_uniform_load_has_entropy_one_and_cv_zero():
    # Every pair of 4 experts once: each expert chosen 3 times out of 12 selections.
    f = one_layer(list(itertools.combinations(range(4), 2)), E=4)
    counts = M.selection_counts(f)
    assert counts["count"].tolist() == [3, 3, 3, 3]
    assert counts["share"].tolist() == [0.25] * 4
    assert M.load_entropy(f)["normalised_entropy"].item() == pytest.approx(1.0, abs=1e-12)
    assert M.load_entropy(f)["entropy_bits"].item() == pytest.approx(2.0, abs=1e-12)
    assert M.load_cv(f)["cv"].item() == pytest.approx(0.0, abs=1e-12)
    assert M.unique_experts(f)["unique_experts"].item() == 4


def test_constant_choice_gives_reuse_one_and_entropy_log_k_over_log_e():
    f = one_layer([(5, 2)] * 6, E=8)
    r = M.reuse(f)
    assert r["pairs"].item() == 5
    assert r["reuse"].item() == 1.0
    assert r["chance"].item() == 2 / 8
    # two experts with half the load each: H = 1 bit, log2(8) = 3 bits
    assert M.load_entropy(f)["normalised_entropy"].item() == pytest.approx(1 / 3, abs=1e-12)
    assert M.unique_experts(f)["unique_experts"].item() == 2
    # counts [0,0,6,0,0,6,0,0]: mean 1.5, population std sqrt((2*4.5^2 + 6*1.5^2)/8) = sqrt(6.75)
    assert M.load_cv(f)["cv"].item() == pytest.approx(math.sqrt(6.75) / 1.5, abs=1e-12)


def test_cv_of_skewed_counts():
    # counts [3, 1, 0, 0] with k = 1: mean 1, population variance (4 + 0 + 1 + 1) / 4 = 1.5
    f = one_layer([(0,), (0,), (0,), (1,)], E=4)
    assert M.load_cv(f)["cv"].item() == pytest.approx(math.sqrt(1.5), abs=1e-12)
    # entropy of (3/4, 1/4) over log2(4)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert M.load_entropy(f)["normalised_entropy"].item() == pytest.approx(h / 2, abs=1e-12)


def test_reuse_counts_only_consecutive_tokens_of_one_prompt():
    # prompt a: {0,1} -> {1,2} -> {3,4}: overlaps 1 and 0; prompt b: {3,4} -> {3,4}: overlap 2.
    # The a->b boundary ({3,4} then {3,4}) must not count. Mean overlap (1 + 0 + 2) / 3 = 1, reuse 1/2.
    f = pd.concat([one_layer([(0, 1), (1, 2), (3, 4)], E=8, pid="a"),
                   one_layer([(3, 4), (4, 3)], E=8, pid="b")], ignore_index=True)
    f.attrs["num_experts"] = 8
    r = M.reuse(f)
    assert r["pairs"].item() == 3
    assert r["mean_overlap"].item() == pytest.approx(1.0)
    assert r["reuse"].item() == pytest.approx(0.5)


def test_reuse_skips_gaps_in_token_index():
    f = one_layer([(0, 1), (0, 1), (0, 1)], E=4)
    f = f[f["token_index"] != 1]          # tokens 0 and 2 are not consecutive
    f.attrs["num_experts"] = 4
    assert M.reuse(f)["pairs"].item() == 0


def test_coactivation_matrix_by_hand():
    f = one_layer([(0, 1), (0, 2), (2, 0)], E=3)
    want = np.array([[3, 1, 2],
                     [1, 1, 0],
                     [2, 0, 2]])
    np.testing.assert_array_equal(M.coactivation_matrix(f, 0), want)
    tidy = M.coactivation(f)
    assert len(tidy) == 9
    assert tidy.set_index(["expert_a", "expert_b"])["count"].loc[(2, 0)] == 2


def test_cross_layer_identity_copy_beats_chance():
    # Layer 1 copies layer 0's set; 4 tokens with disjoint sets of 2 out of 8 experts.
    sets = [(0, 1), (2, 3), (4, 5), (6, 7)]
    f = trace({0: [[s, s] for s in sets]}, E=8)
    r = M.cross_layer_association(f, shuffles=4000, seed=1).iloc[0]
    assert r["observed"] == 1.0
    assert r["chance"] == 0.25
    # under independence: sum_e c0(e) c1(e) / (N * sum c0) = 8 * 1 * 1 / (4 * 8)
    assert r["independent"] == pytest.approx(0.25)
    # a random permutation of 4 tokens has 1 fixed point on average -> overlap 2/4 per token -> 0.25
    assert r["shuffle_mean"] == pytest.approx(0.25, abs=0.02)
    # only the identity permutation (1/24) reaches the observed value
    assert r["p_value"] == pytest.approx(1 / 24, abs=0.01)


def test_cross_layer_shifted_ids_give_half():
    # layer 1 uses e+1 for each e of layer 0: {0,1}->{1,2} etc.: |S0 ∩ S1| = 1 of k = 2
    sets0 = [(0, 1), (2, 3), (4, 5)]
    f = trace({0: [[s, (s[0] + 1, s[1] + 1)] for s in sets0]}, E=8)
    r = M.cross_layer_association(f, shuffles=10).iloc[0]
    assert r["observed"] == pytest.approx(0.5)
    assert (r["layer"], r["next_layer"]) == (0, 1)


def test_domain_mi_perfect_separation_equals_domain_entropy():
    # two prompts per domain; code uses experts {0,1}, poetry {2,3}: MI = H(domain) = 1 bit
    prompts = {"c1": [[(0, 1)]] * 3, "c2": [[(1, 0)]] * 3, "p1": [[(2, 3)]] * 3, "p2": [[(3, 2)]] * 3}
    doms = {"c1": "code", "c2": "code", "p1": "poetry", "p2": "poetry"}
    r = M.domain_specificity(trace(prompts, E=4, domains=doms), shuffles=300).iloc[0]
    assert r["mi_bits"] == pytest.approx(1.0, abs=1e-12)
    assert r["h_label_bits"] == pytest.approx(1.0, abs=1e-12)
    assert r["normalised"] == pytest.approx(1.0, abs=1e-12)
    # 4 prompts, 2 labels: 6 label arrangements, 2 of which separate perfectly (MI 1), 4 mix (MI 0)
    assert r["shuffle_mean"] == pytest.approx(1 / 3, abs=0.08)


def test_domain_mi_unequal_domains_and_independence():
    # 3 domains with 1, 1, 2 tokens of k=1, each domain on its own expert: MI = H(1/4, 1/4, 1/2) = 1.5 bits
    prompts = {"a": [[(0,)]], "b": [[(1,)]], "c": [[(2,)], [(2,)]]}
    r = M.domain_specificity(trace(prompts, E=4, domains={"a": "x", "b": "y", "c": "z"}), shuffles=0).iloc[0]
    assert r["mi_bits"] == pytest.approx(1.5, abs=1e-12)
    # every domain with the same expert mix: MI = 0
    same = {"a": [[(0, 1)], [(2, 3)]], "b": [[(2, 3)], [(1, 0)]]}
    r = M.domain_specificity(trace(same, E=4, domains={"a": "x", "b": "y"}), shuffles=0).iloc[0]
    assert r["mi_bits"] == pytest.approx(0.0, abs=1e-12)


def test_layer_summary_has_one_row_per_layer():
    f = trace({0: [[(0, 1), (2, 3)], [(0, 1), (3, 2)]]}, E=4)
    s = M.layer_summary(f)
    assert s["layer"].tolist() == [0, 1]
    assert s["reuse"].tolist() == [1.0, 1.0]
    assert s["unique_experts"].tolist() == [2, 2]


def test_errors_name_the_problem():
    f = one_layer([(0, 1), (1, 2)], E=4)
    f.attrs.clear()
    with pytest.raises(InputError, match="num_experts"):
        M.load_entropy(f)
    with pytest.raises(InputError, match="outside"):
        M.load_entropy(f, num_experts=2)
    ragged = one_layer([(0, 1), (1, 2)], E=4).iloc[:-1]
    with pytest.raises(InputError, match="ragged"):
        M.reuse(ragged, num_experts=4)
    with pytest.raises(InputError, match="domain"):
        M.domain_specificity(one_layer([(0, 1)], E=4))
