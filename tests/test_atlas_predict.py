"""q3lab.atlas.predict: the hooked residual streams are the ones the routers saw; predictors beat chance."""
from __future__ import annotations

from pathlib import Path


import q3lab
from q3lab.atlas.predict import _forward, _topk_hits, expert_prediction
from q3lab.runtime.thinker import _rms

MINI = Path(__file__).resolve().parents[1] / "data" / "mini"


def test_own_router_on_the_hooked_mid_stream_reproduces_routing_and_predictors_beat_chance(tmp_path):
    model, tok = q3lab.load(MINI), q3lab.load_tokenizer(MINI)
    ids = tok.encode("The capital of France is Paris.\n12 + 30 = 42\ndef f(x):\n    return x")
    pre, mid, ex, _ = _forward(model, ids)
    A = model.config.num_experts_per_tok
    for layer in (0, 23, 47):
        mlp, pan = model.model.layers[layer].mlp, model.model.layers[layer].post_attention_layernorm
        scores = _rms(mid[layer], pan.weight, pan.eps) @ mlp.gate.weight.T
        assert (_topk_hits(scores, ex[:, layer], A) == A).all()      # the router's own input: exact
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join((MINI.parent / "heldout.jsonl").read_text().splitlines()[:12]) + "\n")
    r = expert_prediction(model, tok, corpus, max_tokens=1500, window=128)
    mean = r.groupby("predictor")["accuracy"].mean()
    assert mean["chance"] == A / model.config.num_experts
    for k in ("next_router", "own_router_pre", "fitted_pre"):
        assert mean[k] > 3 * mean["chance"], mean
    assert set(r["layer"]) == set(range(48))
    assert (r[r["predictor"] == "next_router"]["layer"] > 0).all()
