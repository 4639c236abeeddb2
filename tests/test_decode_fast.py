"""The CPU decode fast path (issue 8): each shortcut against the computation it replaces and the reference.

- `_rms` (F.rms_norm) against the reference's explicit RMSNorm formula: bit-equal.
- folded-sin rotary against `apply_rotary`: bit-equal; the one-token rotation matrix: within float rounding.
- `step.layer` over `Thinker.plan()` (forward/generate without hooks) against the modules: bit-equal.
- generate with and without a hook (module path vs flat step), against transformers' generate.
- one-token experts: the stacked block against the per-expert loop, and ExpertCache against resident experts.
"""
from __future__ import annotations

import pytest
import torch

import q3lab
from q3lab.weights.checkpoint import Checkpoint
from q3lab.runtime import step
from q3lab.runtime.thinker import _rms, apply_rotary, mrope_freqs, rope_cos_sin, rope_inv_freq, rope_matrix
from q3lab.runtime.step import Rope

pytest.importorskip("transformers")
import hf_reference as R  # noqa: E402

CFG = dict(layers=3, experts=16, top_k=4, heads=8, kv_heads=2, head_dim=16, mrope_section=(2, 3, 3))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(transformers thinker, checkpoint path, usable vocabulary)."""
    path = tmp_path_factory.mktemp("fast")
    ref = R.save_full(path, seed=1, **CFG)
    return ref.thinker, path, ref.config.thinker_config.text_config.vocab_size - 12


@pytest.fixture(params=["stacked", "loop"])
def expert_path(request, monkeypatch):
    """Run a test with the one-token experts gathered into one block (default here) or served one by one."""
    if request.param == "loop":
        monkeypatch.setattr(step, "GATHER_MAX_ELEMENTS", 0)
    return request.param


def _ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _explicit_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 1, 4, 32), (2, 37, 256), (1, 5, 8, 128)])
def test_rms_is_bit_equal_to_the_explicit_formula(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    assert torch.equal(_rms(x, w, 1e-6), _explicit_rms(x, w, 1e-6))


def test_folded_rotary_is_bit_equal_and_the_matrix_is_close():
    hd, T = 32, 9
    inv = rope_inv_freq(hd, 1e4)
    pos = torch.arange(100, 100 + T)[None, None].expand(3, 1, T)
    freqs = mrope_freqs(pos, inv, [6, 5, 5])                                   # [1, T, hd/2]
    emb = torch.cat((freqs, freqs), -1)
    x = torch.randn(1, 4, T, hd, generator=torch.Generator().manual_seed(0))   # [B, heads, T, hd]
    want = apply_rotary(x, emb.cos(), emb.sin())
    cos, sin = rope_cos_sin(freqs, torch.float32)                              # [1, T, hd]
    got = step.rotate(x.transpose(1, 2), Rope(cos[:, :, None], sin[:, :, None])).transpose(1, 2)
    assert torch.equal(got, want)
    for t in range(T):
        by_matrix = x[:, :, t] @ rope_matrix(cos[0, t], sin[0, t])
        torch.testing.assert_close(by_matrix, want[:, :, t], rtol=0, atol=1e-6)


def test_decode_step_is_bit_equal_to_the_module_path(ckpt, expert_path):
    _, path, vocab = ckpt
    model = q3lab.load(Checkpoint(path))
    ids = _ids(vocab, 7, seed=1)
    plan = model.plan()
    with torch.inference_mode():
        a, b = model.new_cache(1, 20), model.new_cache(1, 20)
        model._forward(ids, None, a, None, False, plan)
        h = model.model.layers[0].hook_attn_out.register_forward_hook(lambda m, i, o: None)   # the module path
        model(ids, cache=b)
        tok = torch.tensor([[3]])
        for _ in range(6):
            fast = model._forward(tok, None, a, None, True, plan)[:, -1]
            slow = model(tok, cache=b)[:, -1]
            assert torch.equal(fast, slow)
            tok = fast.argmax(-1, keepdim=True)
        h.remove()
    assert a.length == b.length == 13
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_generate_fast_equals_hooked_and_reference(ckpt, expert_path):
    ref, path, vocab = ckpt
    model = q3lab.load(Checkpoint(path))
    ids = _ids(vocab, 9, seed=2)
    fast = model.generate(ids, 40)
    seen = []
    handle = model.model.layers[0].hook_resid_post.register_forward_hook(lambda m, a, out: seen.append(1))
    try:
        hooked = model.generate(ids, 40)   # any hook sends every step through the modules
    finally:
        handle.remove()
    assert len(seen) == 40                  # the prompt call and 39 decode steps
    want = ref.generate(input_ids=ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert fast.tolist() == hooked.tolist() == want.tolist()


def test_stacked_experts_match_the_loop_within_rounding(ckpt, monkeypatch):
    _, path, _ = ckpt
    model = q3lab.load(Checkpoint(path))
    experts = model.model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, model.config.hidden_size, generator=g)
    w, idx = torch.topk(torch.softmax(torch.randn(1, model.config.num_experts, generator=g), -1), 4)
    w = w / w.sum(-1, keepdim=True)
    stacked = experts.forward(h, idx, w)
    monkeypatch.setattr(step, "GATHER_MAX_ELEMENTS", 0)
    loop = experts.forward(h, idx, w)
    assert not torch.equal(stacked, torch.zeros_like(stacked))
    torch.testing.assert_close(stacked, loop, rtol=1e-5, atol=1e-6)
    # the N > 1 path (grouped by expert, matrix products over several rows) on copies of the same token
    many = experts.forward(h.expand(3, -1).contiguous(), idx.expand(3, -1), w.expand(3, -1))
    for row in many:
        torch.testing.assert_close(row, loop[0], rtol=1e-5, atol=1e-6)


def test_cache_decodes_bit_equal_to_resident(ckpt, expert_path):
    _, path, vocab = ckpt
    resident = q3lab.load(Checkpoint(path))
    cached = q3lab.load(Checkpoint(path), experts=q3lab.ExpertCache(capacity=6))   # 48 experts: misses
    ids = _ids(vocab, 5, seed=4)
    assert cached.generate(ids, 30).tolist() == resident.generate(ids, 30).tolist()
    assert cached.experts_provider.summary()["misses"] > 0
    with torch.inference_mode():
        a, b = resident.new_cache(1, 8), cached.new_cache(1, 8)
        resident(ids, cache=a)
        cached(ids, cache=b)
        tok = torch.tensor([[1]])
        assert torch.equal(resident._forward(tok, None, a, None, True, resident.plan()),
                           cached._forward(tok, None, b, None, True, cached.plan()))


def test_prefill_experts_equal_a_scatter_per_expert(ckpt):
    """The N > 1 path (one gather and one sum) against the per-expert index_add_ it replaced: bit-equal."""
    import torch.nn.functional as F
    _, path, _ = ckpt
    model = q3lab.load(Checkpoint(path))
    experts, p = model.model.layers[2].mlp.experts, model.experts_provider
    g = torch.Generator().manual_seed(5)
    N, E, A = 37, model.config.num_experts, model.config.num_experts_per_tok
    h = torch.randn(N, model.config.hidden_size, generator=g)
    w, idx = torch.topk(torch.softmax(torch.randn(N, E, generator=g), -1), A)
    w = w / w.sum(-1, keepdim=True)
    want = torch.zeros_like(h)
    for e in range(E):                                   # ascending expert, each token's rows added in turn
        tok, rank = (idx == e).nonzero(as_tuple=True)
        if len(tok):
            gate, up, down = p.weights(2, e)
            y = F.linear(F.silu(F.linear(h[tok], gate)) * F.linear(h[tok], up), down)
            want.index_add_(0, tok, y * w[tok, rank, None])
    assert torch.equal(experts.forward(h, idx, w), want)


def test_rope_table_follows_inv_freq_written_in_place(ckpt):
    """The per-cache rotary table is rebuilt when the angles change (q3lab.analysis.rope_check writes inv_freq)."""
    _, path, vocab = ckpt
    model = q3lab.load(Checkpoint(path))
    ids = _ids(vocab, 6, seed=6)
    with torch.inference_mode():
        cache = model.new_cache(1, 8)
        model(ids[:, :5], cache=cache)
        before = model(ids[:, 5:], cache=cache)
        saved = model.inv_freq.clone()
        model.inv_freq.mul_(3.0)
        cache.length = 0                              # the same cache (and its table) filled again
        model(ids[:, :5], cache=cache)
        changed = model(ids[:, 5:], cache=cache)
        want = model(ids)[:, -1:]                     # no cache: angles computed from positions
        model.inv_freq.copy_(saved)
    torch.testing.assert_close(changed, want, rtol=0, atol=1e-5)
    assert (changed - before).abs().max().item() > 1e-4
