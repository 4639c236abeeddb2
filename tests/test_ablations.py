"""Ablations reproduce each known bug exactly and restore the model; rankings and KL by hand."""
from __future__ import annotations

import math

import pytest
import torch

import q3lab
from q3lab.analysis.ablations import ablate, default_norm_layers, missing_norms
from q3lab.weights.checkpoint import Checkpoint
from q3lab.analysis.ranking import kl_divergence, rank_of

pytest.importorskip("transformers")
import hf_reference as R  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("abl")
    R.save_full(path, seed=3, layers=6, experts=8, top_k=2)
    return q3lab.load(Checkpoint(path)), path


def _record(m, ids, point):
    got = []
    hs = [getattr(layer.mlp, point).register_forward_hook(lambda mod, a, out: got.append(out.clone()))
          for layer in m.model.layers]
    with torch.no_grad():
        m(ids)
    for h in hs:
        h.remove()
    return got


IDS = torch.randint(0, 240, (1, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["per_sequence_routing", "scalar_expert_output", "router_masked",
                                  "missing_norms", "second_softmax"])
def test_each_ablation_changes_logits_and_restores(model, kind):
    m, _ = model
    with torch.no_grad():
        before = m(IDS)
        with ablate(m, kind):
            during = m(IDS)
        after = m(IDS)
    assert torch.equal(before, after)
    assert (during - before).abs().max() > 1e-3


def test_per_sequence_routing_gives_every_token_the_same_experts(model):
    m, _ = model
    with ablate(m, "per_sequence_routing"):
        ids_per_layer = _record(m, IDS, "hook_topk_ids")
    for idx in ids_per_layer:
        assert (idx == idx[0]).all()
    normal = _record(m, IDS, "hook_topk_ids")
    assert any(not (idx == idx[0]).all() for idx in normal)


def test_router_masked_uses_only_the_first_experts(model):
    m, _ = model
    with ablate(m, "router_masked", n=2):
        for idx in _record(m, IDS, "hook_topk_ids"):
            assert set(idx.unique().tolist()) <= {0, 1}


def _record_many(m, ids, points):
    got = {p: [] for p in points}
    hs = []
    for layer in m.model.layers:
        for p in points:
            mod = getattr(layer.mlp, p, None) or getattr(layer, p)
            hs.append(mod.register_forward_hook(lambda mod, a, out, p=p: got[p].append(out.clone())))
    with torch.no_grad():
        m(ids)
    for h in hs:
        h.remove()
    return got


def test_second_softmax_weights_by_hand(model):
    m, _ = model
    with ablate(m, "second_softmax"):
        got = _record_many(m, IDS, ["hook_router_logits", "hook_topk_weights"])
    for lg, wl in zip(got["hook_router_logits"], got["hook_topk_weights"]):
        p = torch.softmax(lg.double(), -1).topk(2).values
        want = torch.exp(p) / torch.exp(p).sum(-1, keepdim=True)
        assert torch.allclose(wl.double(), want, atol=1e-6)
        assert not torch.allclose(wl.double(), p / p.sum(-1, keepdim=True), atol=1e-3)


def test_scalar_expert_output_is_constant_over_hidden(model):
    m, _ = model
    with ablate(m, "scalar_expert_output"):
        outs = _record_many(m, IDS, ["hook_mlp_out"])["hook_mlp_out"]
    assert len(outs) == 6
    for o in outs:
        assert torch.equal(o, o[..., :1].expand_as(o)) and o.abs().max() > 0


def test_missing_norms_sets_ones_and_restores(model):
    m, _ = model
    assert default_norm_layers(48) == list(range(1, 48, 4)) and default_norm_layers(48)[-1] == 45
    w = m.model.layers[1].input_layernorm.weight.clone()
    with missing_norms(m) as names:
        assert "model.layers.1.input_layernorm.weight" in names and "model.layers.5.post_attention_layernorm.weight" in names
        assert torch.equal(m.model.layers[1].input_layernorm.weight, torch.ones(64))
        assert not torch.equal(m.model.layers[0].input_layernorm.weight, torch.ones(64))
    assert torch.equal(m.model.layers[1].input_layernorm.weight, w)


def test_rank_and_kl_by_hand():
    logits = torch.tensor([0.5, 2.0, -1.0, 2.0, 1.0])
    assert rank_of(logits, 1) == 1 and rank_of(logits, 3) == 1 and rank_of(logits, 4) == 3
    assert rank_of(logits, 2) == 5
    p = torch.tensor([math.log(0.5), math.log(0.5)], dtype=torch.float64)
    q = torch.tensor([math.log(0.25), math.log(0.75)], dtype=torch.float64)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(kl_divergence(p, q).item() - want) < 1e-12
    assert abs(kl_divergence(q, q).item()) < 1e-12


def test_reference_oracle_matches_ours(model):
    from q3lab.oracle import load_reference
    m, path = model
    ref = load_reference(Checkpoint(path))
    assert (ref(IDS) - m(IDS)).abs().max().item() <= 1e-4
