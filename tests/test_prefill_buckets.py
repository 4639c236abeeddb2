"""StaticDecoder's bucket prefill (issue 15 goal 3) on the CPU: the prompt right-padded to a bucket and run by the
model's own forward, the last real token's logits picked by a device-side index. prefill_graphs="padded" runs
exactly what the CUDA graph captures (tests/gpu/test_gpu_prefill_graphs.py replays it on a GPU), here without the
graph. Against the unpadded eager prefill in float32: bit for bit when the prompt fills its bucket (the same
computation); with pads, the same operations on longer tensors, whose CPU kernels block the sums differently
(F.linear with other row counts, SDPA's causal blocks: ~3e-7 of the largest logit measured, to 2e-6 here), so
logits and the cache's real slots agree to float32 rounding and the greedy tokens of generate are equal; the
pads' slots are overwritten or masked by the decode steps."""
from __future__ import annotations

import pytest
import torch

import q3lab
from q3lab.errors import InputError
from q3lab.fast.decoders import StaticDecoder


@pytest.fixture(scope="module", params=["tiny", "small"])
def model(request, tmp_path_factory):
    """tiny (hidden 64: the torch kernel set) and small (hidden 256: the C kernels for up to 64 rows)."""
    from q3lab.weights.synthetic import synth
    path = synth(tmp_path_factory.mktemp("buckets") / request.param, request.param, seed=7, layers=3,
                 dtype="fp32", progress=False)
    return q3lab.load(path, dtype=torch.float32)


def _ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_default_buckets_and_who_takes_the_eager_prefill(model):
    dec = StaticDecoder(model, 100, prefill_graphs="padded")
    assert dec.prefill_buckets == (16, 32, 64)
    assert [dec.prefill_bucket(t) for t in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, None]
    assert dec.prefill_bucket(5, torch.ones(1, 5)) is None                    # left-padded batches: eager
    with q3lab.record(model):
        assert dec.prefill_bucket(5) is None                                  # the recorder's hooks see the prompt
    assert StaticDecoder(model, 100).prefill_bucket(5) is None                # CPU default: no graphs, eager
    assert StaticDecoder(model, 100, prefill_graphs="padded", prefill_buckets=[40, 8]).prefill_buckets == (8, 40)
    with pytest.raises(InputError, match="prefill_buckets"):
        StaticDecoder(model, 100, prefill_buckets=[128])
    with pytest.raises(InputError, match="captures CUDA graphs"):
        StaticDecoder(model, 100, prefill_graphs=True)
    with pytest.raises(InputError, match="prefill_graphs must be"):
        StaticDecoder(model, 100, prefill_graphs="yes")


@pytest.mark.parametrize("T", [5, 16, 23])
def test_padded_prefill_equals_the_eager_one_bit_for_bit(model, T):
    """The pads come after the real tokens (causal attention, per-token routing): nothing of them reaches the last
    real token's logits; T = 16 fills its bucket: the same computation, equal bits."""
    V = model.config.vocab_size
    ids = _ids(V, T, T)
    eager = StaticDecoder(model, 80, prefill_graphs=False)
    padded = StaticDecoder(model, 80, prefill_graphs="padded", prefill_buckets=(16, 32))
    want = eager.prefill(ids)
    got = padded.prefill(ids)
    assert padded.prefill_bucket(T) == (16 if T <= 16 else 32)
    close = dict(rtol=0, atol=2e-6 * want.abs().max().item())
    if T == 16:
        assert torch.equal(got, want)
        assert torch.equal(padded.cache.k[:, :, :, :T], eager.cache.k[:, :, :, :T])
    else:
        assert not torch.equal(got, want)      # (the rounding described above; if this starts to hold, say so)
        torch.testing.assert_close(got, want, **close)
        torch.testing.assert_close(padded.cache.k[:, :, :, :T], eager.cache.k[:, :, :, :T], rtol=0, atol=1e-5)
        torch.testing.assert_close(padded.cache.v[:, :, :, :T], eager.cache.v[:, :, :, :T], rtol=0, atol=1e-5)
    assert padded.cache.length == T
    for name in ("tok", "pos", "slot", "n"):
        assert torch.equal(getattr(padded, name), getattr(eager, name)), name
    # and against the model's forward (no decoder at all), the unpadded prompt
    torch.testing.assert_close(got[0], model(ids, last_only=True)[0, -1], **close)


def test_pads_are_overwritten_and_masked_by_the_steps(model):
    """After a padded prefill the pads' keys sit in slots T.. of the cache; the next steps write their own keys
    there before attending, and the bias masks every later slot: step logits equal the eager prefill's steps."""
    V, T = model.config.vocab_size, 9
    ids = _ids(V, T, 1)
    eager = StaticDecoder(model, 48, prefill_graphs=False)
    padded = StaticDecoder(model, 48, prefill_graphs="padded", prefill_buckets=(32,))
    eager.prefill(ids), padded.prefill(ids)
    assert padded.cache.k[:, :, :, T:32].abs().amax((0, 1, 2, 4)).min() > 0               # the pads' keys
    assert eager.cache.k[:, :, :, T:32].abs().max() == 0
    for _ in range(6):
        eager.step(), padded.step()
        torch.testing.assert_close(padded.logits, eager.logits, rtol=0, atol=2e-6 * eager.logits.abs().max().item())
        assert torch.equal(padded.tok, eager.tok)
    s = T + 6
    torch.testing.assert_close(padded.cache.k[:, :, :, :s], eager.cache.k[:, :, :, :s], rtol=0, atol=1e-5)
    # a pad's key left in a later slot would be attended if the bias did not mask it: overwrite the pads' slots
    # after the next step's with huge keys/values (finite: a masked weight is 0, and 0 * nan would be nan);
    # the next step is unchanged
    padded.cache.k[:, :, :, s + 1:32] = 1e4
    padded.cache.v[:, :, :, s + 1:32] = 1e4
    eager.step(), padded.step()
    torch.testing.assert_close(padded.logits, eager.logits, rtol=0, atol=2e-6 * eager.logits.abs().max().item())


@pytest.mark.parametrize("T", [7, 12, 30])
def test_padded_generate_equals_eager_generate(model, T):
    """The greedy tokens of generate (bucket prefill, then the steps) equal the eager model's and the eager
    decoder's, for two lengths in one bucket (7, 12 -> 16) and across buckets (30 -> 32)."""
    V = model.config.vocab_size
    ids = _ids(V, T, 100 + T)
    want = model.generate(ids, 12)
    dec = StaticDecoder(model, 64, prefill_graphs="padded", prefill_buckets=(16, 32))
    assert torch.equal(dec.generate(ids, 12), want)
    assert torch.equal(StaticDecoder(model, 64, prefill_graphs=False).generate(ids, 12), want)


def test_the_same_decoder_serves_other_lengths_and_a_left_padded_batch(model):
    """Buckets reused for another prompt leave nothing of the earlier one behind; a left-padded batch (eager)
    after them gives the eager decoder's tokens."""
    V = model.config.vocab_size
    dec = StaticDecoder(model, 64, prefill_graphs="padded", prefill_buckets=(16, 32))
    for T in (14, 3, 20, 14):
        ids = _ids(V, T, T)
        assert torch.equal(dec.generate(ids, 5), model.generate(ids, 5)), T
    ids = torch.cat([_ids(V, 10, 1), _ids(V, 10, 2)])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    assert torch.equal(dec.generate(ids, 5, attention_mask=mask), model.generate(ids, 5, attention_mask=mask))
