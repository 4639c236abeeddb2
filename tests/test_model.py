"""q3lab's thinker against transformers' Qwen3-Omni thinker on identical weights (float32)."""
from __future__ import annotations

import json

import pytest
import torch

import q3lab
from q3lab.weights.checkpoint import Checkpoint
from q3lab.errors import CheckpointError, InputError
from q3lab.runtime.thinker import load, mrope_freqs, rope_inv_freq

pytest.importorskip("transformers")
import hf_reference as R  # noqa: E402

CONFIGS = {
    # seed: tiny text config; every one has GQA > 1, top-k >= 2, >= 8 experts, mRoPE sections = hd/2
    0: dict(layers=2, experts=8, top_k=2, heads=4, kv_heads=2, head_dim=16, mrope_section=(4, 2, 2)),
    1: dict(layers=3, experts=16, top_k=4, heads=8, kv_heads=2, head_dim=16, mrope_section=(2, 3, 3)),
    2: dict(layers=2, experts=8, top_k=3, heads=6, kv_heads=3, head_dim=24, mrope_section=(6, 3, 3),
            norm_topk_prob=False),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(reference thinker, q3lab thinker, vocab) loaded from the same save_pretrained folder."""
    seed = request.param
    path = tmp_path_factory.mktemp(f"ref{seed}")
    ref = R.save_full(path, seed=seed, **CONFIGS[seed])
    ours = q3lab.load(Checkpoint(path))
    return ref.thinker, ours, ref.config.thinker_config.text_config.vocab_size - 12


def _ids(vocab: int, shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_equal_reference(pair):
    ref, ours, vocab = pair
    ids = _ids(vocab, (2, 23))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours(ids)
    assert got.shape == want.shape == (2, 23, ours.config.vocab_size)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-4


def test_greedy_continuation_equal_reference(pair):
    ref, ours, vocab = pair
    ids = _ids(vocab, (1, 9), seed=1)
    want = ref.generate(input_ids=ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    got = ours.generate(ids, 32)
    assert got.shape == (1, 9 + 32)
    assert got.tolist() == want.tolist()


def _our_topk(model, ids):
    seen = {}
    hooks = [layer.mlp.hook_topk_ids.register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out.clone())) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_router_choices_equal_reference(pair):
    ref, ours, vocab = pair
    ids = _ids(vocab, (2, 19), seed=2)
    with torch.no_grad():
        router_logits = ref(input_ids=ids, output_router_logits=True).router_logits
    ours_topk = _our_topk(ours, ids)
    k = ours.config.num_experts_per_tok
    compared = 0
    for layer, logits in enumerate(router_logits):
        probs = torch.softmax(logits.float(), dim=-1)                 # [N, E]
        top = torch.topk(probs, k + 1, dim=-1)
        clear = (top.values[:, k - 1] - top.values[:, k]) > 1e-6      # k-th and (k+1)-th distinct
        assert torch.equal(ours_topk[layer][clear], top.indices[clear, :k])
        compared += int(clear.sum())
    assert compared >= 0.9 * len(router_logits) * ids.numel()


def test_text_positions_equal_three_equal_axes(pair):
    _, ours, vocab = pair
    ids = _ids(vocab, (2, 11), seed=3)
    pos1 = torch.arange(11)[None].expand(2, 11)
    with torch.no_grad():
        a = ours(ids)
        b = ours(ids, position_ids=pos1)
        c = ours(ids, position_ids=pos1[None].expand(3, 2, 11))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_multimodal_positions_match_reference(pair):
    ref, ours, vocab = pair
    ids = _ids(vocab, (2, 12), seed=4)
    g = torch.Generator().manual_seed(5)
    # a video-like grid: temporal runs slowly, height/width cycle, all three axes differ
    t = torch.arange(12) // 4
    pos = torch.stack([t, (torch.arange(12) // 2) % 2 + 3, torch.arange(12) % 4 + 3])[:, None].expand(3, 2, 12)
    pos = pos + torch.randint(0, 3, (3, 2, 1), generator=g)
    with torch.no_grad():
        want = ref(input_ids=ids, position_ids=pos).logits
        got = ours(ids, position_ids=pos)
        flat = ours(ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - flat).abs().max().item() > 1e-3      # the positions matter


def test_prefill_then_decode_equals_full_forward(pair):
    _, ours, vocab = pair
    ids = _ids(vocab, (2, 14), seed=6)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 14)
        parts = [ours(ids[:, :6], cache=cache), ours(ids[:, 6:9], cache=cache)]
        parts += [ours(ids[:, i:i + 1], cache=cache) for i in range(9, 14)]
    assert cache.length == 14
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_interleaved_text_rope_is_bit_identical_to_1d():
    inv = rope_inv_freq(128, 1e6)
    pos = torch.arange(300)[None]
    one_d = pos[..., None].float() * inv                              # plain 1-D RoPE angles
    three = mrope_freqs(pos[None].expand(3, 1, 300), inv, [24, 20, 20], interleaved=True)
    assert torch.equal(three, one_d)
    chunked = mrope_freqs(pos[None].expand(3, 1, 300), inv, [24, 20, 20], interleaved=False)
    assert torch.equal(chunked, one_d)                                 # equal axes: layout does not matter


def test_interleaved_and_chunked_layouts_differ_on_multimodal_positions():
    inv = rope_inv_freq(128, 1e6)
    pos = torch.stack([torch.zeros(5), torch.arange(5) * 1.0, torch.arange(5) * 2.0]).long()[:, None]
    inter = mrope_freqs(pos, inv, [24, 20, 20], interleaved=True)[0]    # [5, 64]
    chunk = mrope_freqs(pos, inv, [24, 20, 20], interleaved=False)[0]
    # interleaved: index 1 is height, 2 is width, 0 temporal (all zero here); chunked: 0..23 temporal
    assert torch.equal(inter[:, 1], pos[1, 0].float() * inv[1])
    assert torch.equal(inter[:, 2], pos[2, 0].float() * inv[2])
    assert torch.equal(chunk[:, 1], torch.zeros(5))
    assert not torch.equal(inter, chunk)
    # THW repeated 20 times, then TTTT: indices 60..63 take the temporal axis
    assert torch.equal(inter[:, 60:], torch.zeros(5, 4))


def test_missing_tensor_is_refused_with_its_name(tmp_path):
    R.save_full(tmp_path, seed=0, **CONFIGS[0])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = "thinker.model.layers.1.post_attention_layernorm.weight"
    shard = index["weight_map"].pop(key)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"thinker\.model\.layers\.1\.post_attention_layernorm\.weight"):
        q3lab.load(Checkpoint(tmp_path))
    name = key[len("thinker."):]
    with pytest.warns(UserWarning, match="post_attention_layernorm.*substituted ones"):
        m = q3lab.load(Checkpoint(tmp_path), allow_missing=[name])
    assert torch.equal(m.model.layers[1].post_attention_layernorm.weight, torch.ones(64))
    assert shard.endswith(".safetensors")


def test_bad_inputs_raise_input_error(pair):
    _, ours, vocab = pair
    with pytest.raises(InputError, match="outside the vocabulary"):
        ours(torch.tensor([[1, ours.config.vocab_size]]))
    with pytest.raises(InputError, match="empty prompt"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(InputError, match="max_position_embeddings"):
        ours.generate(torch.tensor([[1, 2]]), ours.config.max_position_embeddings)


def test_left_padded_batch_matches_unpadded_rows(pair):
    ref, ours, vocab = pair
    a, b = _ids(vocab, (1, 7), seed=7), _ids(vocab, (1, 4), seed=8)
    pad = torch.zeros(1, 3, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], dim=1)])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    got = ours.generate(batch, 6, attention_mask=mask)
    assert got[0, 7:].tolist() == ours.generate(a, 6)[0, 7:].tolist()
    assert got[1, 7:].tolist() == ours.generate(b, 6)[0, 4:].tolist()
    want = ref.generate(input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert got.tolist() == want.tolist()


def test_sampling_is_reproducible_with_seed(pair):
    _, ours, vocab = pair
    ids = _ids(vocab, (1, 5), seed=9)
    a = ours.generate(ids, 12, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    b = ours.generate(ids, 12, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    c = ours.generate(ids, 12, do_sample=True, temperature=5.0, seed=4)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
