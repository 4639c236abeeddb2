"""The grouped expert GEMM (q3lab.kernels.grouped_moe, issue 15): its torch twin, its layout against a hand computation,
and batched greedy decoding through it (left padding) equal to eager `Thinker.generate` in fp32 on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import q3lab
from q3lab.kernels import grouped_moe as gm
from q3lab.runtime import step
from q3lab.fast.decoders import StaticDecoder
from batches import left_padded  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _experts(E=6, I=4, D=8, N=11, A=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(E, I, D, generator=g).to(dtype) for _ in range(2))
    down = torch.randn(E, D, I, generator=g).to(dtype)
    h = torch.randn(N, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(N)])
    w = torch.softmax(torch.randn(N, A, generator=g), -1).to(dtype)
    return h, ids, w, gate, up, down


def _by_hand(h, ids, w, gate, up, down):
    """Each token's experts in float64, in ascending expert order per token: [N, A, D]."""
    h, gate, up, down, w = (t.double() for t in (h, gate, up, down, w))
    N, A = ids.shape
    out = torch.zeros(N, A, h.shape[1], dtype=torch.float64)
    for n in range(N):
        for j, a in enumerate(sorted(range(A), key=lambda a: int(ids[n, a]))):
            e = int(ids[n, a])
            out[n, j] = w[n, a] * (down[e] @ (F.silu(gate[e] @ h[n]) * (up[e] @ h[n])))
    return out


def test_layout_offsets_and_distinct():
    h, ids, w, *_ = _experts(E=6, N=9, A=3, seed=3)
    order, w_sorted, offs = gm.group_by_expert(ids, w, 6)
    sid, perm = ids.sort(dim=1)
    counts = torch.bincount(sid.reshape(-1), minlength=6)
    assert offs.tolist() == counts.cumsum(0).tolist()
    # rows come grouped by expert: the expert of each sorted row is non-decreasing
    assert torch.all(sid.reshape(-1)[order].diff() >= 0)
    assert torch.equal(w_sorted, w.gather(1, perm).reshape(-1)[order])
    many = torch.tensor([[[0, 1, 1, 5], [2, 2, 2, 2]], [[0, 1, 2, 3], [4, 4, 0, 0]]])
    assert gm.distinct_experts(many, 6).tolist() == [[3, 1], [4, 2]]


def test_grouped_twin_and_hand_computation_fp32():
    args = _experts(E=7, I=8, D=16, N=13, A=3, seed=1)
    want = _by_hand(*args)
    twin = gm.moe_grouped_torch(*args)
    torch.testing.assert_close(twin.double(), want, rtol=1e-5, atol=1e-5)
    # moe_torch's grouped path has the same layout and rounding: equal to the twin
    torch.testing.assert_close(step.moe_torch(*args, gather=False), twin, rtol=1e-6, atol=1e-6)
    if gm.grouped_mm_available(torch.float32, "cpu"):
        torch.testing.assert_close(gm.moe_grouped(*args), twin, rtol=1e-5, atol=1e-5)
        # the summed form (a prefill's): the twin's partials summed over A
        torch.testing.assert_close(gm.moe_grouped_sum(*args), twin.sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(step.moe_sum(*args), step.expert_sum(step.moe_torch(*args), torch.float32))   # off CUDA


def test_fused_gate_up_layout():
    h, ids, w, _, _, down = _experts(E=5, I=8, D=16, N=9, A=2, seed=6)
    gate_up = torch.randn(5, 16, 16, generator=torch.Generator().manual_seed(1))
    gate, up = gate_up[:, :8], gate_up[:, 8:]
    assert gm.fused_gate_up(gate, up).data_ptr() == gate_up.data_ptr()
    assert torch.equal(gm.fused_gate_up(gate, up), gate_up)
    assert gm.fused_gate_up(gate.contiguous(), up.contiguous()) is None
    assert gm.fused_gate_up(up, gate) is None
    want = _by_hand(h, ids, w, gate, up, down)
    torch.testing.assert_close(gm.moe_grouped_torch(h, ids, w, gate, up, down).double(), want, rtol=1e-5, atol=1e-5)
    if gm.grouped_mm_available(torch.float32, "cpu"):
        torch.testing.assert_close(gm.moe_grouped(h, ids, w, gate, up, down).double(), want, rtol=1e-5, atol=1e-5)


def test_grouped_bf16_rounding_matches_twin():
    if not gm.grouped_mm_available(torch.bfloat16, "cpu"):
        pytest.skip("this torch has no CPU grouped GEMM for bf16")
    args = _experts(E=8, I=16, D=32, N=20, A=4, seed=2, dtype=torch.bfloat16)
    got, twin = gm.moe_grouped(*args), gm.moe_grouped_torch(*args)
    want = _by_hand(*args)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    # bf16 rounding of the projections: about 2^-8 relative against float64
    assert rel(twin, want) < 1e-2
    assert rel(got, twin) < 1e-2


def test_an_expert_without_tokens_and_refusal():
    h, ids, w, gate, up, down = _experts(E=6, N=4, A=2, seed=4)
    ids = torch.tensor([[0, 5], [5, 0], [0, 2], [2, 5]])          # experts 1, 3, 4 get nothing
    torch.testing.assert_close(gm.moe_grouped_torch(h, ids, w, gate, up, down).double(),
                               _by_hand(h, ids, w, gate, up, down), rtol=1e-5, atol=1e-5)
    with pytest.raises(gm.KernelError, match="float64"):
        gm.moe_grouped(h.double(), ids, w.double(), gate.double(), up.double(), down.double())
    if gm.grouped_mm_available(torch.float32, "cpu"):
        odd = _experts(E=6, I=5, D=8, N=4, A=2, seed=4)          # rows of 5 floats: 20 bytes
        assert not gm.grouped_ok(odd[3])
        with pytest.raises(gm.KernelError, match="I=5"):
            gm.moe_grouped(*odd)


@pytest.fixture(scope="module")
def mini():
    return q3lab.load(ROOT / "data" / "mini", dtype=torch.float32)


@pytest.mark.skipif(not gm.grouped_mm_available(torch.float32, "cpu"), reason="no CPU grouped GEMM in this torch")
@pytest.mark.parametrize("lengths", [[9, 4, 7, 9], [3, 9, 9, 5, 8, 2]])
def test_batched_decode_through_grouped_experts_equals_generate(mini, lengths):
    ids, mask = left_padded(mini.config.vocab_size - 12, lengths, seed=len(lengths))
    want = mini.generate(ids, 10, attention_mask=mask)
    dec = StaticDecoder(mini, 24, batch=len(lengths))
    dec.kernels = gm.grouped_kernels()          # every step's experts through the grouped GEMM
    got = dec.generate(ids, 10, attention_mask=mask)
    assert got.tolist() == want.tolist()
    # one step's logits against the eager model's after the same tokens (fp32: rounding only)
    full = torch.cat([mask, torch.ones(len(lengths), 10, dtype=torch.long)], 1)
    ref = mini(want, attention_mask=full[:, :want.shape[1]])[:, -2]
    torch.testing.assert_close(dec.logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not gm.grouped_mm_available(torch.float32, "cpu"), reason="no CPU grouped GEMM in this torch")
def test_prefill_layers_through_grouped_experts_equal_forward(mini):
    """The shared step with the grouped experts over a whole prompt = Thinker.forward (its grouped loop)."""
    ids, _ = left_padded(mini.config.vocab_size, [40, 40], seed=9)
    want = mini(ids)
    m = mini.model
    d = m.layers[0].self_attn.dims
    x = F.embedding(ids, m.embed_tokens.weight)
    rope = mini._rope(x, ids.shape[1], 0, None, None, None)
    ks = gm.grouped_kernels()
    p = mini.experts_provider
    for i, (w, _) in enumerate(mini.plan()):
        x = step.layer(x, w, d, rope, None, ks,
                       lambda h, idx, wt, i=i: step.expert_sum(ks.moe(h, idx, wt, p.gate[i], p.up[i], p.down[i]),
                                                               h.dtype))
    got = F.linear(step.rms_norm(x, m.norm.weight, mini.config.rms_norm_eps), mini.lm_head.weight).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
