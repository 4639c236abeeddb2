"""q3lab.intervene against transformers' thinker on identical weights (float32), and its exactness rules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import q3lab
from q3lab.weights.checkpoint import Checkpoint
from q3lab.errors import InputError
from q3lab.analysis.interventions import capture, intervene

pytest.importorskip("transformers")
import hf_reference as R  # noqa: E402

CFG = dict(layers=3, experts=8, top_k=2, heads=4, kv_heads=2, head_dim=16, mrope_section=(4, 2, 2))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref")
    full = R.save_full(path, seed=3, **CFG)
    return full.thinker, q3lab.load(Checkpoint(path)), path


def _ids(shape=(2, 13), seed=0, vocab=244):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _ref_layers(ref):
    inner = ref.model
    return getattr(inner, "language_model", inner).layers


def test_zero_equals_reference_with_down_proj_zeroed(pair):
    ref, ours, _ = pair
    ids = _ids()
    sites = [(0, 3), (1, 5), (2, 0)]
    layers = _ref_layers(ref)
    saved = [layers[l].mlp.experts.down_proj.data[e].clone() for l, e in sites]
    try:
        for l, e in sites:
            layers[l].mlp.experts.down_proj.data[e].zero_()
        with torch.no_grad():
            want = ref(input_ids=ids).logits
    finally:
        for (l, e), w in zip(sites, saved):
            layers[l].mlp.experts.down_proj.data[e].copy_(w)
    base = ours(ids)
    with intervene(ours, zero=sites):
        got = ours(ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert (base - want).abs().max().item() > 1e-3          # the ablation changed something
    assert torch.equal(ours(ids), base)                     # undone on exit


def test_mask_equals_reference_router_that_never_picks_them(pair):
    ref, ours, _ = pair
    ids = _ids(seed=1)
    sites = {0: [1, 2], 2: [4]}
    layers = _ref_layers(ref)
    originals = {}
    for l, experts in sites.items():
        gate = layers[l].mlp.gate
        originals[l] = gate.forward

        def masked(h, gate=gate, experts=experts):   # the router of transformers with those logits at -inf
            logits = F.linear(h.reshape(-1, gate.hidden_dim), gate.weight)
            logits = logits.index_fill(1, torch.tensor(experts), float("-inf"))
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            v, i = torch.topk(probs, gate.top_k, dim=-1)
            v = v / v.sum(-1, keepdim=True)
            return logits, v.to(logits.dtype), i
        gate.forward = masked
    try:
        with torch.no_grad():
            want = ref(input_ids=ids).logits
    finally:
        for l, fwd in originals.items():
            layers[l].mlp.gate.forward = fwd
    with intervene(ours, mask=[(l, e) for l, es in sites.items() for e in es]) as _:
        with q3lab.record(ours) as rec:
            got = ours(ids)
    assert (got - want).abs().max().item() <= 1e-4
    frame = rec.to_frame()
    for l, experts in sites.items():
        assert not frame[(frame.layer == l) & frame.expert.isin(experts)].size


def test_top_k_and_temperature_equal_reference(pair):
    ref, ours, _ = pair
    ids = _ids(seed=2)
    layers = _ref_layers(ref)
    for k in (1, 3, 8):
        for lay in layers:
            lay.mlp.gate.top_k = k
        try:
            with torch.no_grad():
                want = ref(input_ids=ids).logits
        finally:
            for lay in layers:
                lay.mlp.gate.top_k = CFG["top_k"]
        with intervene(ours, top_k=k):
            got = ours(ids)
        assert (got - want).abs().max().item() <= 1e-4, k
    t = 2.5
    saved = [lay.mlp.gate.weight.data.clone() for lay in layers]
    try:
        for lay in layers:
            lay.mlp.gate.weight.data /= t     # logits / t, exactly the temperature
        with torch.no_grad():
            want = ref(input_ids=ids).logits
    finally:
        for lay, w in zip(layers, saved):
            lay.mlp.gate.weight.data.copy_(w)
    with intervene(ours, router_temperature=t):
        got = ours(ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_self_patch_is_bit_identical(pair):
    _, ours, _ = pair
    ids = _ids(seed=4)
    base = ours(ids)
    cap = capture(ours, ids)
    assert torch.equal(cap.logits, base)
    sites = [(0, None), (1, 3), (1, 0), (2, 7)]
    with intervene(ours, patch=sites, patch_from=cap):
        assert torch.equal(ours(ids), base)


def test_patch_all_experts_equals_patch_moe_output(pair):
    _, ours, _ = pair
    clean, corrupt = _ids(seed=5), _ids(seed=6)
    cap = capture(ours, clean)
    with intervene(ours, patch=[(1, None)], patch_from=cap, patch_tokens=[4, 5]):
        layer_patch = ours(corrupt)
    with intervene(ours, patch=[(1, e) for e in range(CFG["experts"])], patch_from=cap, patch_tokens=[4, 5]):
        expert_patch = ours(corrupt)
    base = ours(corrupt)
    assert (layer_patch - expert_patch).abs().max().item() <= 1e-4
    assert (layer_patch - base).abs().max().item() > 1e-3
    # the tokens before the patched ones are untouched (causal attention)
    assert torch.equal(layer_patch[:, :4], base[:, :4])


def test_force_with_the_natural_routing_changes_nothing_and_other_routing_does(pair):
    _, ours, _ = pair
    ids = _ids((1, 9), seed=7)
    cap = capture(ours, ids)
    base = cap.logits
    ids0, w0 = cap.ids[1][5].tolist(), cap.weights[1][5].tolist()
    with intervene(ours, force={(1, 5): (ids0, w0)}):
        assert (ours(ids) - base).abs().max().item() <= 1e-6
    with intervene(ours, force={(1, 5): ([6], [1.0])}):
        with q3lab.record(ours) as rec:
            got = ours(ids)
    f = rec.to_frame()
    row = f[(f.layer == 1) & (f.token_index == 5)].sort_values("rank")
    assert row.expert.tolist()[0] == 6 and row.weight.tolist() == [1.0, 0.0]
    assert torch.equal(got[:, :5], base[:, :5]) and (got[:, 5:] - base[:, 5:]).abs().max().item() > 1e-4


def test_zero_renormalize_option(pair):
    _, ours, _ = pair
    ids = _ids((1, 7), seed=8)
    cap = capture(ours, ids)
    e = int(cap.ids[0][3, 0])
    with intervene(ours, zero=[(0, e)], renormalize_zero=True):
        with q3lab.record(ours) as rec:
            ours(ids)
    f = rec.to_frame()
    w = f[f.layer == 0].groupby("token_index").weight.sum()
    chosen = f[(f.layer == 0) & (f.expert == e)].token_index.unique()
    assert len(chosen) and all(abs(w[t] - 1.0) < 1e-6 for t in w.index)   # renormalised over the rest
    assert (f[(f.layer == 0) & (f.expert == e)].weight == 0).all()


def test_zero_with_expert_cache_equals_resident(pair):
    _, ours, path = pair
    cached = q3lab.load(Checkpoint(path), experts=q3lab.ExpertCache(capacity=4, per_layer=True))
    ids = _ids(seed=9)
    sites = [(0, 1), (2, 2)]
    with intervene(ours, zero=sites, mask=[(1, 0)]):
        want = ours(ids)
    with intervene(cached, zero=sites, mask=[(1, 0)]):
        got = cached(ids)
    assert torch.equal(got, want)


def test_bad_arguments_are_refused(pair):
    _, ours, _ = pair
    for kw in (dict(mask=[(9, 0)]), dict(zero=[(0, 99)]), dict(top_k=0), dict(top_k=True),
               dict(router_temperature=0.0), dict(patch=[(0, None)]),
               dict(mask=[(0, e) for e in range(7)])):
        with pytest.raises(InputError):
            with intervene(ours, **kw):
                pass
