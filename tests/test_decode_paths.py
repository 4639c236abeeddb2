"""Every execution path runs the one layer step (q3lab.runtime.step) and gives what `Thinker.generate` gives (issue 14):

- StaticDecoder / OffloadedDecoder `generate` with Thinker.generate's signature: batches with left padding, eos,
  sampling; greedy tokens equal Thinker.generate's on the CPU in fp32;
- `q3lab.record` around either decoder gives the frame it gives around `Thinker.generate` (same rows and
  experts, weights to 1e-6), the steps' routing written on the device;
- hooks other than the recorder's are refused with a message pointing to the eager path;
- many compiled decoders for several models in one process (no dynamo recompile-limit failure).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import q3lab
from q3lab.errors import InputError
from q3lab.fast.decoders import DeviceExpertCache, OffloadedDecoder, StaticDecoder
from q3lab.runtime.recording import record
from batches import left_padded  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mini():
    return q3lab.load(ROOT / "data" / "mini", dtype=torch.float32)


def _offloaded(model, max_len: int, capacity: int) -> OffloadedDecoder:
    p = model.experts_provider
    cache = DeviceExpertCache(p.gate, p.up, p.down, capacity=capacity, device="cpu")
    return OffloadedDecoder(model, max_len, cache)


@pytest.mark.parametrize("lengths", [[9], [6, 9], [9, 4, 7], [3, 9, 9, 5]])
def test_static_decoder_greedy_batches_equal_generate(mini, lengths):
    ids, mask = left_padded(mini.config.vocab_size - 12, lengths, seed=len(lengths))
    padded = min(lengths) < max(lengths)
    want = mini.generate(ids, 12, attention_mask=mask if padded else None)
    dec = StaticDecoder(mini, 32)
    got = dec.generate(ids, 12, attention_mask=mask if padded else None)
    assert got.tolist() == want.tolist()
    # the decoder reallocates for another batch and still agrees
    one = dec.generate(ids[-1:, -lengths[-1]:], 12)
    assert one.tolist() == mini.generate(ids[-1:, -lengths[-1]:], 12).tolist()


def test_offloaded_decoder_batches_equal_generate(tmp_path):
    model = q3lab.load(ROOT / "data" / "mini", dtype=torch.float32)
    ids, mask = left_padded(model.config.vocab_size - 12, [8, 5, 8], seed=7)
    want = model.generate(ids, 10, attention_mask=mask)
    off = _offloaded(model, 24, capacity=40)       # 48 layers x 32 experts: misses and evictions
    assert off.generate(ids, 10, attention_mask=mask).tolist() == want.tolist()
    assert off.expert_cache.stats()["misses"] > 40


def test_eos_and_sampling_follow_generate(mini):
    ids, mask = left_padded(mini.config.vocab_size - 12, [7, 7], seed=3)
    free = mini.generate(ids, 16)
    eos = int(free[0, 7 + 4])                        # a token row 0 emits on its 5th step
    want = mini.generate(ids, 16, eos_token_id=eos)
    dec = StaticDecoder(mini, 32)
    got = dec.generate(ids, 16, eos_token_id=[eos])
    assert got.tolist() == want.tolist()
    assert (got[0, 7 + 4:] == eos).all()
    # sampling: the seed fixes the tokens; a top_p this small keeps only the most likely token (greedy)
    a = dec.generate(ids, 8, do_sample=True, temperature=0.8, seed=5)
    b = dec.generate(ids, 8, do_sample=True, temperature=0.8, seed=5)
    assert a.tolist() == b.tolist()
    assert dec.generate(ids, 8, do_sample=True, top_p=1e-6, seed=1).tolist() == free[:, :15].tolist()
    with pytest.raises(InputError, match="temperature"):
        dec.generate(ids, 4, do_sample=True, temperature=0.0)
    with pytest.raises(InputError, match="left padding"):
        dec.generate(ids, 4, attention_mask=torch.tensor([[1] * 7, [1] * 6 + [0]]))


def _frames_equal(got, want) -> None:
    assert len(got) == len(want) > 0
    for col in ("prompt", "token_index", "position", "token", "layer", "rank", "expert", "call"):
        assert got[col].tolist() == want[col].tolist(), col
    assert np.abs(got["weight"].to_numpy() - want["weight"].to_numpy()).max() <= 1e-6
    if "prob" in want:
        assert np.abs(got["prob"].to_numpy() - want["prob"].to_numpy()).max() <= 1e-6


@pytest.mark.parametrize("which", ["static", "offloaded"])
def test_record_around_fast_decoders_equals_generate(which):
    model = q3lab.load(ROOT / "data" / "mini", dtype=torch.float32)
    ids, mask = left_padded(model.config.vocab_size - 12, [6, 9], seed=11)
    with record(model, probs=True) as rec:
        model.generate(ids, 8, attention_mask=mask)
    want = rec.to_frame()
    dec = StaticDecoder(model, 24) if which == "static" else _offloaded(model, 24, capacity=64)
    with record(model, probs=True) as rec:
        dec.generate(ids, 8, attention_mask=mask)
    _frames_equal(rec.to_frame(), want)
    # unpadded, without probs, two generations in one recording (prompt ids go on)
    one = ids[1:]
    with record(model) as rec:
        model.generate(one, 5)
        model.generate(one, 3)
    want = rec.to_frame()
    with record(model) as rec:
        dec.generate(one, 5)
        dec.generate(one, 3)
    _frames_equal(rec.to_frame(), want)
    assert sorted(want["prompt"].unique().tolist()) == [0, 1]
    # recording ended: the decoder runs unrecorded again, with the same tokens
    assert dec.generate(one, 5).tolist() == model.generate(one, 5).tolist()


def test_fast_decoders_refuse_python_hooks(mini):
    dec = StaticDecoder(mini, 16)
    h = mini.model.layers[1].hook_resid_post.register_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(InputError, match="eager path"):
            StaticDecoder(mini, 16)
        with pytest.raises(InputError, match="eager path"):
            dec.generate(torch.tensor([[1, 2, 3]]), 4)
        with record(mini):       # a recorder does not make other hooks acceptable
            with pytest.raises(InputError, match="layers.1"):
                dec.generate(torch.tensor([[1, 2, 3]]), 4)
    finally:
        h.remove()


def test_many_compiled_decoders_for_several_models(make_ckpt):
    """More than eight compiled decoders for three models (two shapes) in one process: before issue 14, the
    ninth compiled decoder failed with torch._dynamo's FailOnRecompileLimitHit."""
    import torch._dynamo
    paths = [make_ckpt("tiny", seed=s, dtype="fp32") for s in (0, 1)] + [ROOT / "data" / "mini"]
    models = [q3lab.load(p, dtype=torch.float32) for p in paths]
    prompt = torch.tensor([[5, 6, 7, 8]])
    want = [m.generate(prompt, 5).tolist() for m in models]
    old = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 8            # the default, whatever other tests set
    try:
        for n in range(10):
            m = n % len(models)
            dec = StaticDecoder(models[m], 10 + n, compile="eager")
            assert dec.generate(prompt, 5).tolist() == want[m]
    finally:
        torch._dynamo.config.recompile_limit = old
