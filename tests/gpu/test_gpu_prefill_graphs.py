"""On CUDA (skipped elsewhere): StaticDecoder's bucket prefill captured as a CUDA graph per bucket (issue 15 goal 3)
against the eager prefill: logits (bf16 to rounding, float32 tight), the cache's real slots, the step state, and
the greedy tokens of generate (float32: equal), for two prompt lengths in one bucket, one that fills it and one
in the next bucket. The CPU twin of the padded path: tests/test_prefill_buckets.py.

Run on a GPU machine: python -m pytest -q tests/gpu/test_gpu_prefill_graphs.py
"""
from __future__ import annotations

import pytest
import torch

import q3lab
from q3lab.fast.decoders import StaticDecoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BUCKETS = (16, 32, 64)
LENGTHS = (9, 13, 16, 27)          # 9 and 13 -> 16 (pads), 16 fills it, 27 -> 32


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """bf16 runs the grouped expert GEMMs: the medium preset cut to 2 layers (D 1024, E 64 x I 512, top-8).
    float32 (gathered experts under capture): the small preset, 3 layers (D 256, E 16 x I 128, top-4)."""
    from q3lab.weights.synthetic import synth
    root = tmp_path_factory.mktemp("prefill_graphs")
    return {torch.bfloat16: synth(root / "medium", "medium", seed=11, layers=2, dtype="fp32", progress=False),
            torch.float32: synth(root / "small", "small", seed=12, layers=3, dtype="fp32", progress=False)}


def _model(ckpts, dtype):
    return q3lab.load(ckpts[dtype], dtype=dtype, device="cuda")


def _ids(vocab, T, seed):
    return torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed)).cuda()


def _dec(model, graphs, max_len=96, **kw):
    return StaticDecoder(model, max_len, prefill_graphs=graphs, prefill_buckets=BUCKETS, **kw)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graphed_prefill_matches_the_eager_prefill(ckpts, dtype):
    model = _model(ckpts, dtype)
    eager, graphed = _dec(model, False), _dec(model, True)
    assert StaticDecoder(model, 96).prefill_graphs is False           # opt-in
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for T in LENGTHS:
        ids = _ids(model.config.vocab_size, T, T)
        want, got = eager.prefill(ids), graphed.prefill(ids)
        assert graphed.prefill_bucket(T) == (16 if T <= 16 else 32)
        assert got.shape == want.shape == (1, model.config.vocab_size) and got.dtype == torch.float32
        assert _rel(got, want) < tol, (T, _rel(got, want))
        assert _rel(graphed.cache.k[:, :, :, :T], eager.cache.k[:, :, :, :T]) < tol
        assert _rel(graphed.cache.v[:, :, :, :T], eager.cache.v[:, :, :, :T]) < tol
        for name in ("tok", "pos", "slot", "n"):
            assert torch.equal(getattr(graphed, name), getattr(eager, name)), (T, name)
        assert graphed.cache.length == T
    assert sorted(graphed._prefill_state) == [(1, 16), (1, 32)]          # one graph per bucket, captured once
    assert all(st.graph.get("graph") is not None for st in graphed._prefill_state.values())


def test_graph_replays_the_padded_forward_bit_for_bit(ckpts):
    """bf16: the graph replays the kernels of the same padded forward run eagerly (prefill_graphs='padded')."""
    model = _model(ckpts, torch.bfloat16)
    graphed, padded = _dec(model, True), _dec(model, "padded")
    for T in (9, 27, 9):
        ids = _ids(model.config.vocab_size, T, 50 + T)
        got, want = graphed.prefill(ids), padded.prefill(ids)
        assert torch.equal(got, want), (T, _rel(got, want))
        b = graphed.prefill_bucket(T)
        assert torch.equal(graphed.cache.k[:, :, :, :b], padded.cache.k[:, :, :, :b])


@pytest.mark.parametrize("T", [9, 13, 27])
def test_graphed_generate_equals_the_eager_decoder_fp32(ckpts, T):
    model = _model(ckpts, torch.float32)
    ids = _ids(model.config.vocab_size, T, 100 + T)
    want = _dec(model, False).generate(ids, 16)
    assert torch.equal(_dec(model, True).generate(ids, 16), want)
    assert torch.equal(model.generate(ids, 16), want)


def test_bf16_generate_agreement_is_reported(ckpts, capsys):
    """bf16: greedy tokens of the graphed-prefill decoder against the eager-prefill one (reported; bf16 rounding
    of the padded GEMMs may move a near tie), and equal to itself when replayed."""
    model = _model(ckpts, torch.bfloat16)
    eager, graphed = _dec(model, False), _dec(model, True)
    for T in (9, 27):
        ids = _ids(model.config.vocab_size, T, 200 + T)
        want, got = eager.generate(ids, 24), graphed.generate(ids, 24)
        same = int((got[0, T:] == want[0, T:]).int().cumprod(0).sum())
        la, lb = graphed.prefill(ids), eager.prefill(ids)
        with capsys.disabled():
            print(f"\nbf16 T={T}: graphed-prefill tokens equal to the eager-prefill decoder's for {same}/24; "
                  f"prefill logits bit-equal {torch.equal(la, lb)} (rel. diff {_rel(la, lb):.1e}), keys bit-equal "
                  f"{torch.equal(graphed.cache.k[:, :, :, :T], eager.cache.k[:, :, :, :T])}")
        assert torch.equal(graphed.generate(ids, 24), got)
        assert same >= 1                    # the first token comes from logits within 2e-2 of each other


def test_eager_cases_and_a_changed_rope(ckpts):
    """A prompt beyond the largest bucket, and a left-padded batch, take the eager prefill; writing inv_freq in
    place (rope_check) rebuilds the rope table, and the graph is recaptured on it."""
    model = _model(ckpts, torch.float32)
    V = model.config.vocab_size
    eager, graphed = _dec(model, False, max_len=120), _dec(model, True, max_len=120)
    ids = _ids(V, 70, 1)
    assert graphed.prefill_bucket(70) is None
    assert torch.equal(graphed.generate(ids, 8), eager.generate(ids, 8))
    ids2 = torch.cat([_ids(V, 12, 2), _ids(V, 12, 3)])
    mask = torch.ones_like(ids2)
    mask[0, :4] = 0
    assert graphed.prefill_bucket(12, mask) is None
    assert torch.equal(graphed.generate(ids2, 8, attention_mask=mask), eager.generate(ids2, 8, attention_mask=mask))
    ids = _ids(V, 11, 4)
    graphed.prefill(ids)
    old = graphed._prefill_state[(1, 16)].graph["graph"]
    try:
        with torch.no_grad():
            model.inv_freq.mul_(1.5)
        want = eager.prefill(ids)
        got = graphed.prefill(ids)
        assert graphed._prefill_state[(1, 16)].graph["graph"] is not old
        assert _rel(got, want) < 1e-5
    finally:
        with torch.no_grad():
            model.inv_freq.div_(1.5)
