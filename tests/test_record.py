"""q3lab.record and q3lab.analysis.lens against transformers: router choices, weights, probs; prompts, decode steps, padding,
files; logit lens vs the reference hidden states."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import q3lab
from q3lab.weights.checkpoint import Checkpoint
from q3lab.errors import InputError
from q3lab.runtime.recording import load_trace, record, save_trace

pytest.importorskip("transformers")
import hf_reference as R  # noqa: E402

CFG = dict(layers=3, experts=16, top_k=4, heads=4, kv_heads=2, head_dim=16, mrope_section=(4, 2, 2))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref")
    ref = R.save_full(path, seed=3, **CFG)
    return ref.thinker, q3lab.load(Checkpoint(path))


def _ids(shape, seed=0, vocab=240):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_recorded_experts_and_weights_equal_reference(pair):
    ref, ours = pair
    ids = _ids((2, 13), seed=1)
    with torch.no_grad():
        router_logits = ref(input_ids=ids, output_router_logits=True).router_logits
    with record(ours, probs=True) as rec:
        ours(ids)
    f = rec.to_frame()
    B, T, L, E, k = 2, 13, CFG["layers"], CFG["experts"], CFG["top_k"]
    assert len(f) == B * T * L * k
    assert f["prompt"].unique().tolist() == [0, 1]          # batch rows are separate prompts
    compared = 0
    for layer in range(L):
        probs = torch.softmax(router_logits[layer].float(), dim=-1)             # [N, E], rows batch-major
        top_p, top_i = probs.topk(k + 1, dim=-1)
        want_w = top_p[:, :k] / top_p[:, :k].sum(-1, keepdim=True)
        got = f[f["layer"] == layer].sort_values(["prompt", "token_index", "rank"])
        got_e = torch.tensor(got["expert"].to_numpy().astype(np.int64)).view(B * T, k)
        got_w = torch.tensor(got["weight"].to_numpy()).view(B * T, k)
        got_p = torch.tensor(got["prob"].to_numpy()).view(B * T, k)
        # ranks are only defined where consecutive probabilities differ
        distinct = (top_p[:, :-1] - top_p[:, 1:]).abs() > 1e-6                   # [N, k]
        clear = distinct.all(-1)
        assert clear.float().mean() > 0.9
        assert torch.equal(got_e[clear], top_i[clear, :k])
        compared += int(clear.sum())
        assert (got_w - want_w).abs().max() <= 1e-6
        assert (got_p - top_p[:, :k]).abs().max() <= 1e-6
    assert compared >= 0.9 * B * T * L
    # token, position and index columns follow the input
    first = f[(f["layer"] == 0) & (f["rank"] == 0)]
    assert first["token"].tolist() == ids.reshape(-1).tolist()
    assert first["token_index"].tolist() == list(range(T)) * B
    assert first["position"].tolist() == list(range(T)) * B
    assert {c: str(f[c].dtype) for c in ("token_index", "layer", "rank", "expert", "weight")} == \
        {"token_index": "int32", "layer": "int16", "rank": "int16", "expert": "int16", "weight": "float32"}
    assert f.attrs == {"num_experts": E, "top_k": k, "num_layers": L}


def test_router_probs_are_the_full_softmax(pair):
    ref, ours = pair
    ids = _ids((1, 7), seed=2)
    with torch.no_grad():
        logits = ref(input_ids=ids, output_router_logits=True).router_logits
    with record(ours, probs=True) as rec:
        ours(ids)
    index, mat = rec.router_probs(2)
    assert index["token_index"].tolist() == list(range(7))
    np.testing.assert_allclose(mat, torch.softmax(logits[2].float(), -1).numpy(), atol=1e-6, rtol=0)


def test_generate_trace_continues_token_index_and_matches_one_full_forward(pair):
    _, ours = pair
    ids = _ids((1, 6), seed=3)
    with record(ours, prompt="p0", domain="code") as rec:
        out = ours.generate(ids, 5)
    f = rec.to_frame()
    # generate feeds the prompt, then every new token but the last: 6 + 5 - 1 tokens are routed
    fed = out[0, :10].tolist()
    first = f[(f["layer"] == 0) & (f["rank"] == 0)]
    assert first["token_index"].tolist() == list(range(10))
    assert first["position"].tolist() == list(range(10))
    assert first["token"].tolist() == fed
    assert set(f["prompt"]) == {"p0"} and set(f["domain"]) == {"code"}
    # decode-step routing equals the routing of one forward over the same tokens (KV cache is exact)
    with record(ours) as rec2:
        ours(out[:, :10])
    g = rec2.to_frame()
    w_dec, w_full = f["weight"].to_numpy(), g["weight"].to_numpy()
    e_dec, e_full = f["expert"].to_numpy(), g["expert"].to_numpy()
    assert np.abs(w_dec - w_full).max() < 1e-4
    assert (e_dec == e_full).mean() > 0.99


def test_prompts_labels_and_new_prompt_per_uncached_call(pair):
    _, ours = pair
    with record(ours) as rec:
        rec.set_prompt("a", domain="code", source="x")
        ours(_ids((1, 3), seed=4))
        ours(_ids((1, 2), seed=5))                    # no cache: a new prompt with an automatic id
        rec.set_prompt("c", domain="poetry")
        ours.generate(_ids((1, 2), seed=6), 2)
        with pytest.raises(InputError, match="already used"):
            rec.set_prompt("a")
    f = rec.to_frame()
    per = f.drop_duplicates("prompt").set_index("prompt")
    assert list(per.index) == ["a", "1", "c"]         # mixed ids become strings, in order of appearance
    assert per["domain"].tolist()[0] == "code" and pd.isna(per["domain"].iloc[1]) and per["domain"].iloc[2] == "poetry"
    assert per["source"].tolist()[0] == "x"
    assert f.groupby("prompt")["token_index"].nunique().to_dict() == {"a": 3, "1": 2, "c": 3}


def test_left_padding_is_dropped_and_positions_follow_the_mask(pair):
    _, ours = pair
    ids = _ids((2, 5), seed=7)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with record(ours) as rec:
        ours.generate(ids, 2, attention_mask=mask)
    f = rec.to_frame()
    first = f[(f["layer"] == 0) & (f["rank"] == 0)]
    row0 = first[first["prompt"] == 0]
    assert row0["token_index"].tolist() == [2, 3, 4, 5]
    assert row0["position"].tolist() == [0, 1, 2, 3]
    assert row0["token"].tolist()[:3] == ids[0, 2:].tolist()
    assert first[first["prompt"] == 1]["position"].tolist() == list(range(6))


def test_hooks_are_removed_even_on_error(pair):
    _, ours = pair
    before = _hooks(ours)
    with pytest.raises(RuntimeError, match="boom"):
        with record(ours, probs=True):
            assert _hooks(ours) == before + 2 + 3 * CFG["layers"]
            raise RuntimeError("boom")
    assert _hooks(ours) == before
    with pytest.raises(InputError):
        with record(ours):
            ours(torch.tensor([[10_000]]))            # outside the vocabulary: the model's own check
    assert _hooks(ours) == before


def test_continuing_an_unrecorded_cache_is_refused(pair):
    _, ours = pair
    cache = ours.new_cache(1, 8)
    ours(_ids((1, 3)), cache=cache)
    with record(ours):
        with pytest.raises(InputError, match="no recorded call"):
            ours(_ids((1, 1)), cache=cache)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_save_load_round_trip(pair, tmp_path, suffix):
    _, ours = pair
    with record(ours, probs=True, prompt=0, domain="math") as rec:
        ours(_ids((1, 4), seed=8))
    f = rec.to_frame()
    path = save_trace(f, tmp_path / "data" / f"trace{suffix}")
    g = load_trace(path)
    assert g.attrs == f.attrs
    pd.testing.assert_frame_equal(g.drop(columns="domain"), f.drop(columns="domain"), check_dtype=True)
    assert g["domain"].astype(str).tolist() == f["domain"].astype(str).tolist()
    with pytest.raises(InputError, match="format"):
        save_trace(f, tmp_path / "trace.txt")
    with pytest.raises(InputError, match="missing columns"):
        save_trace(f.drop(columns="expert"), tmp_path / "t.parquet")


# -- logit lens (q3lab.analysis.lens): checked here against the same transformers reference ---------------------
def test_logit_lens_equals_reference_hidden_states(pair):
    from q3lab.analysis.lens import lens_logits, logit_lens, residual_stream
    ref, ours = pair
    ids = _ids((1, 9), seed=9)
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        lm = ref.model.language_model
        # transformers: hidden_states[l + 1] is the residual after layer l, except the last, which is normed
        want = [ref.lm_head(lm.norm(h)) for h in out.hidden_states[1:-1]] + [out.logits]
    resid = residual_stream(ours, ids)
    L = CFG["layers"]
    assert len(resid) == L
    for layer in range(L):
        assert (lens_logits(ours, resid[layer]) - want[layer]).abs().max() <= 1e-4
    # the last layer's lens is the model's output, bit for bit
    assert torch.equal(lens_logits(ours, resid[-1]), ours(ids))

    target = 17
    f = logit_lens(ours, ids[0], target_token=target, top=3)
    assert len(f) == L * 9
    for layer in range(L):
        w = want[layer][0]                                                  # [T, V]
        g = f[f["layer"] == layer].sort_values("position")
        tl = w[:, target]
        close = ((w - tl[:, None]).abs() < 1e-4).sum(-1) > 1                # another logit ties the target
        rank = (w > tl[:, None]).sum(-1) + 1
        assert g["rank_of_target"].to_numpy()[~close.numpy()].tolist() == rank[~close].tolist()
        top = w.topk(3, dim=-1)
        assert g["top1"].tolist() == top.indices[:, 0].tolist()
        np.testing.assert_allclose(g["top1_prob"].to_numpy(), torch.softmax(w, -1).max(-1).values.numpy(),
                                   atol=1e-5)


def test_logit_lens_next_token_target(pair):
    from q3lab.analysis.lens import logit_lens
    _, ours = pair
    ids = _ids((2, 5), seed=10)
    f = logit_lens(ours, ids, target_token="next", top=1)
    last = f[f["layer"] == CFG["layers"] - 1]
    logits = ours(ids)
    for row in range(2):
        g = last[last["row"] == row].sort_values("position")
        assert g["target"].tolist()[:4] == ids[row, 1:].tolist()
        assert pd.isna(g["rank_of_target"].iloc[4]) and pd.isna(g["target_prob"].iloc[4])
        for t in range(4):
            tl = logits[row, t, ids[row, t + 1]]
            assert g["rank_of_target"].iloc[t] == int((logits[row, t] > tl).sum()) + 1
    with pytest.raises(InputError, match="vocabulary"):
        logit_lens(ours, ids, target_token=10_000)


# -- q3lab trace (CLI) -------------------------------------------------------------------------------
def test_cli_trace_writes_a_trace_equal_to_recording_directly(tmp_path):
    from q3lab.cli import main
    from q3lab.weights.synthetic import synth
    from q3lab.base.tokenizer import load_tokenizer
    ckpt = synth(tmp_path / "ckpt", preset="tiny", seed=2)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "experts route tokens", "domain": "prose"}\n\n'
                       '{"prompt": "def f(x): return x", "domain": "code", "id": "c1"}\n')
    out = tmp_path / "data" / "trace.parquet"
    assert main(["trace", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "3",
                 "--full-probs", "--no-progress"]) == 0
    got = load_trace(out)
    model, tok = q3lab.load(ckpt), load_tokenizer(ckpt)
    with record(model, probs=True) as rec:
        for pid, text, dom in (("0", "experts route tokens", "prose"), ("c1", "def f(x): return x", "code")):
            rec.set_prompt(pid, domain=dom)
            model.generate(torch.tensor([tok.encode(text)]), 3, eos_token_id=tok.eos_token_id)
    want = rec.to_frame()
    pd.testing.assert_frame_equal(got.drop(columns="domain"), want.drop(columns="domain"))
    assert got["domain"].astype(str).tolist() == want["domain"].astype(str).tolist()
    probs = load_trace(tmp_path / "data" / "trace.probs.parquet")
    n_tok = len(want[["prompt", "token_index"]].drop_duplicates())
    assert len(probs) == n_tok * 4 * 8
    np.testing.assert_allclose(probs.groupby(["prompt", "token_index", "layer"])["prob"].sum(), 1.0, atol=1e-5)
    # a bad prompts file is a clear error, exit status 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    assert main(["trace", str(ckpt), "--prompts", str(bad), "--out", str(out), "--no-progress"]) == 2


def test_package_functions_survive_importing_their_submodules(pair):
    import importlib
    for name in ("record", "extract", "synth"):
        mod = importlib.import_module(f"q3lab.{name}")      # what `from q3lab.record import ...` does
        assert getattr(q3lab, name) is getattr(mod, name)     # the function, not its module
    _, ours = pair
    with q3lab.record(ours, prompt="x") as rec:
        ours(_ids((1, 2)))
    assert rec.to_frame()["prompt"].unique().tolist() == ["x"]
