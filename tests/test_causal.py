"""The causal studies on the embedded mini model: each number checked against a direct computation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import q3lab
from q3lab.analysis import causal
from q3lab.errors import InputError
from q3lab.analysis.interventions import intervene

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mini():
    model = q3lab.load(ROOT / "data" / "mini")
    tok = q3lab.load_tokenizer(ROOT / "data" / "mini")
    facts = [json.loads(line) for line in open(ROOT / "data" / "prompts" / "facts.jsonl")]
    texts = [json.loads(line)["prompt"] for line in open(ROOT / "data" / "prompts" / "domains.jsonl")][:6]
    return model, tok, facts[:8], texts


def _answer_logprob(model, tok, item) -> float:
    from q3lab.analysis.ranking import expected_token_id
    ids = torch.tensor([tok.encode(item["prompt"])])
    target = expected_token_id(tok, item["prompt"], item["expected"])
    return float(torch.log_softmax(model(ids)[0, -1], -1)[target])


def test_fact_batch_scores_equal_one_prompt_at_a_time(mini):
    model, tok, facts, _ = mini
    batch = causal.FactBatch(tok, facts).score(model)
    single = [_answer_logprob(model, tok, it) for it in facts]
    assert np.allclose(batch["per_prompt"].numpy(), single, atol=1e-4)
    assert batch["logprob"] == pytest.approx(np.mean(single), abs=1e-4)


def test_subject_positions(mini):
    _, tok, _, _ = mini
    prompt = "The capital of France is"
    pos = causal.subject_positions(tok, prompt, "France")
    ids = tok.encode(prompt)
    assert tok.decode([ids[p] for p in pos]) == " France"
    with pytest.raises(InputError):
        causal.subject_positions(tok, prompt, "Spain")


def test_importance_effect_is_the_zero_ablation_drop(mini):
    model, tok, facts, _ = mini
    imp = causal.expert_importance(model, tok, facts[:4], layers=[44])
    assert len(imp) == model.config.num_experts and set(imp.layer) == {44}
    assert imp.frequency.sum() == pytest.approx(model.config.num_experts_per_tok, abs=1e-6)   # k choices a token
    row = imp.sort_values("effect").iloc[-1]
    base = np.mean([_answer_logprob(model, tok, it) for it in facts[:4]])
    with intervene(model, zero=[(44, int(row.expert))]):
        ablated = np.mean([_answer_logprob(model, tok, it) for it in facts[:4]])
    assert row.effect == pytest.approx(base - ablated, abs=1e-4)


def test_sweeps_at_the_trained_setting_equal_the_intact_model(mini):
    model, tok, facts, texts = mini
    k = model.config.num_experts_per_tok
    intact = causal.FactBatch(tok, facts).score(model)
    loss = causal.TextBatch(tok, texts).loss(model)
    sweep = causal.topk_sweep(model, tok, facts, texts, ks=[1, k])
    row = sweep[sweep.k == k].iloc[0]
    assert bool(row.trained) and row.facts_top1 == intact["top1"] and row.val_loss == pytest.approx(loss, abs=1e-6)
    assert (sweep.facts_logprob.iloc[0] != row.facts_logprob)
    imp = causal.expert_importance(model, tok, facts[:2], layers=[40])
    knock = causal.knockout_curves(model, tok, facts, texts, imp, fractions=(0.0, 0.25))
    assert set(knock.order) == {"frequent", "causal", "random"}
    zero = knock[knock.fraction == 0.0]
    assert np.allclose(zero.facts_logprob, intact["logprob"], atol=1e-5)
    assert (knock[knock.fraction == 0.25].removed == 8).all()


def test_causal_trace_rows_equal_a_direct_patch(mini):
    model, tok, facts, _ = mini
    item = facts[0]
    tr = causal.causal_trace(model, tok, [item], experts=True, layers=[3], min_effect=0.0)
    assert set(tr.layer) == {3} and -1 in set(tr.expert) and (tr.expert >= 0).sum() >= model.config.num_experts_per_tok
    from q3lab.analysis.interventions import capture
    from q3lab.analysis.ranking import expected_token_id
    ids = torch.tensor([tok.encode(item["prompt"])])
    target = expected_token_id(tok, item["prompt"], item["expected"])
    subj = causal.subject_positions(tok, item["prompt"], item["country"])
    noise = dict(embed_noise=(subj, 3.0 * float(model.model.embed_tokens.weight.std()), 0))
    clean = capture(model, ids)
    lp = lambda logits: float(torch.log_softmax(logits[0, -1], -1)[target])  # noqa: E731
    with intervene(model, **noise):
        corrupt = lp(model(ids))
    row = tr[tr.expert == -1].iloc[0]
    assert row.clean_logprob == pytest.approx(lp(clean.logits), abs=1e-6)
    assert row.corrupt_logprob == pytest.approx(corrupt, abs=1e-6) and corrupt < lp(clean.logits)
    e = int(tr[tr.expert >= 0].iloc[0].expert)
    for expert, r in ((None, row), (e, tr[tr.expert == e].iloc[0])):
        with intervene(model, patch=[(3, expert)], patch_from=clean, patch_tokens=[subj[-1]], **noise):
            want = lp(model(ids))
        assert r.restored == pytest.approx((want - corrupt) / (lp(clean.logits) - corrupt), abs=1e-5)


def test_rank_correlation():
    x = np.arange(20.0)
    r = causal.rank_correlation(x, x ** 3)
    assert r["rho"] == pytest.approx(1.0) and r["low"] == pytest.approx(1.0)
    r = causal.rank_correlation(x, -x)
    assert r["rho"] == pytest.approx(-1.0)
    # hand example: ranks [1,2,3,4] vs [2,1,4,3]: rho = 1 - 6*4/(4*15) = 0.6
    assert causal.rank_correlation([1, 2, 3, 4], [2, 1, 4, 3], n_boot=10)["rho"] == pytest.approx(0.6)
    with pytest.raises(InputError):
        causal.rank_correlation([1, 2], [1, 2])
