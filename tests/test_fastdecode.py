"""The static (graph-capturable) decoder and the offloaded one, on the CPU: same tokens as the eager model and as
transformers, logits within rounding, and offloaded == resident bit for bit (the GPU runs are in bench/)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import q3lab
from q3lab.errors import InputError
from q3lab.fast.decoders import DeviceExpertCache, OffloadedDecoder, StaticDecoder
from q3lab.kernels.triton_moe import moe_one_token_torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    from q3lab.weights.synthetic import synth
    return synth(tmp_path_factory.mktemp("fd") / "ckpt", "small", seed=3, progress=False)


def _prompt(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_moe_one_token_matches_float64_expert_sum():
    g = torch.Generator().manual_seed(1)
    E, I, D = 6, 24, 32
    gate, up = torch.randn(E, I, D, generator=g), torch.randn(E, I, D, generator=g)
    down = torch.randn(E, D, I, generator=g)
    x, ids = torch.randn(D, generator=g), torch.tensor([4, 1, 5])
    w = torch.softmax(torch.randn(3, generator=g), 0)
    ref = sum(w[a].double() * (down[e].double() @ (torch.nn.functional.silu(gate[e].double() @ x.double())
                                                    * (up[e].double() @ x.double())))
              for a, e in enumerate(ids.tolist()))
    got = moe_one_token_torch(x, ids, w, gate, up, down)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4)
    # the order of the top-k does not matter beyond rounding; an expert's id is honoured
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(moe_one_token_torch(x, ids[perm], w[perm], gate, up, down), got, atol=1e-4)
    assert not torch.allclose(moe_one_token_torch(x, torch.tensor([0, 1, 5]), w, gate, up, down), got)


@pytest.mark.parametrize("path,fused,router", [("mini", False, False), ("small", False, False),
                                               ("mini", True, True), ("small", True, False)])
def test_static_decoder_equals_eager_generate(path, fused, router, small_ckpt):
    src = ROOT / "data" / "mini" if path == "mini" else small_ckpt
    model = q3lab.load(src, dtype=torch.float32)
    ids = _prompt(model.config.vocab_size, 9)
    want = model.generate(ids, 24)
    dec = StaticDecoder(model, 40, fused=fused, fused_router=router)
    got = dec.generate(ids, 24)
    assert torch.equal(got, want)
    # the step's logits against the eager model's on the same cache contents
    first = dec.prefill(ids).argmax(-1)
    cache = model.new_cache(1, 40)
    model(ids, cache=cache)
    eager = model(first[None], cache=cache, last_only=True)[0, -1]
    dec.tok.copy_(first)
    dec.step()
    mine = dec.logits[0]
    assert (mine - eager).abs().max().item() < 1e-4 * eager.abs().max().item()


def test_static_decoder_matches_transformers_greedy(small_ckpt):
    pytest.importorskip("transformers")
    from q3lab.oracle import load_reference_generator
    model = q3lab.load(small_ckpt, dtype=torch.float32)
    ref = load_reference_generator(small_ckpt)
    ids = _prompt(model.config.vocab_size, 7, seed=5)
    want = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                        pad_token_id=0)
    got = StaticDecoder(model, 32).generate(ids, 16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("capacity,fused", [(4, False), (20, True), (10_000, False)])
def test_offloaded_decoder_is_bit_equal_to_resident(capacity, fused, small_ckpt):
    model = q3lab.load(small_ckpt, dtype=torch.bfloat16)
    ids = _prompt(model.config.vocab_size, 11, seed=2)
    res = StaticDecoder(model, 48, fused=fused)
    want = res.generate(ids, 30)
    p = model.experts_provider
    cache = DeviceExpertCache(p.gate, p.up, p.down, capacity=min(capacity, p.gate.shape[0] * p.gate.shape[1]),
                              device="cpu")
    off = OffloadedDecoder(model, 48, cache, fused=fused)
    got = off.generate(ids, 30)
    assert torch.equal(got, want)
    assert torch.equal(off.cache.k, res.cache.k) and torch.equal(off.cache.v, res.cache.v)
    st = cache.stats()
    L, E, A = model.config.num_hidden_layers, model.config.num_experts, model.config.num_experts_per_tok
    assert st["hits"] + st["misses"] >= L * A * 29        # every decode step asked for A experts per layer
    if capacity >= L * E:
        assert st["misses"] <= L * E                      # nothing evicted: each expert copied at most once
    else:
        assert st["misses"] > L * E // 2 and len(cache.resident()) == capacity


def test_fused_kernel_twins_match_plain_torch():
    from q3lab.kernels.triton_decode import decode_attention_torch, topk_renorm_torch
    g = torch.Generator().manual_seed(4)
    H, K, hd, S = 8, 2, 16, 12
    q, kc, vc = torch.randn(H, hd, generator=g), torch.randn(K, S, hd, generator=g), torch.randn(K, S, hd, generator=g)
    bias = torch.where(torch.arange(S) <= 6, 0.0, float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(q.view(1, H, 1, hd), kc[None, :, :7], vc[None, :, :7],
                                                            enable_gqa=True)[0, :, 0]
    assert torch.allclose(decode_attention_torch(q, kc, vc, bias, hd ** -0.5), want, atol=1e-5)
    from q3lab.kernels.triton_decode import route_torch
    h, wr = torch.randn(hd, generator=g), torch.randn(40, hd, generator=g)
    p = torch.softmax(wr @ h, 0)
    _, ids_r, w_r = route_torch(h, wr, 5, True)
    assert ids_r.tolist() == p.argsort(descending=True)[:5].tolist()
    assert torch.allclose(w_r, p[ids_r] / p[ids_r].sum(), atol=1e-6)
    idx, w = topk_renorm_torch(p, 5, True, torch.float32)
    assert idx.tolist() == p.argsort(descending=True)[:5].tolist()
    assert torch.allclose(w, p[idx] / p[idx].sum())


def test_static_decoder_refuses_what_it_cannot_do(small_ckpt):
    model = q3lab.load(small_ckpt, dtype=torch.float32)
    dec = StaticDecoder(model, 16)
    with pytest.raises(InputError, match="max_len"):
        dec.generate(_prompt(model.config.vocab_size, 10), 10)
    p = model.experts_provider
    with pytest.raises(InputError, match="disagree"):
        DeviceExpertCache(p.gate, p.up, p.gate, capacity=8, device="cpu")
    with pytest.raises(InputError, match="capacity"):
        DeviceExpertCache(p.gate, p.up, p.down, capacity=0, device="cpu")
    h = model.model.layers[0].hook_resid_post.register_forward_hook(lambda m, i, o: o)
    with pytest.raises(InputError, match="hook"):
        StaticDecoder(model, 16)
    h.remove()
