"""On CUDA (skipped elsewhere): the grouped expert GEMM (q3lab.kernels.grouped_moe) against its torch twin, in and out of a
CUDA graph; prefill logits of the CUDA path against the torch kernel set; batched decode against eager (issue 15).

Run on a GPU machine: python -m pytest -q tests/gpu
"""
from __future__ import annotations

import pytest
import torch

import q3lab
from q3lab.kernels import grouped_moe as gm
from q3lab.runtime import step
from q3lab.fast.decoders import StaticDecoder

from batches import left_padded  # noqa: E402  (tests/batches.py)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The medium preset cut to 2 layers: D 1024, E 64 x I 512, top-8, hd 64."""
    from q3lab.weights.synthetic import synth
    return synth(tmp_path_factory.mktemp("gpuprefill") / "ckpt", "medium", seed=5, layers=2, dtype="fp32",
                 progress=False)


def _routing(N, E, A, D, seed, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, D, generator=g, device="cuda").to(dtype)
    ids = torch.rand(N, E, generator=g, device="cuda").topk(A, -1).indices
    w = torch.softmax(torch.randn(N, A, generator=g, device="cuda"), -1).to(dtype)
    return h, ids, w


@pytest.mark.parametrize("N", [1, 4, 64, 700])
def test_grouped_gemm_matches_twin_on_fused_layout(N):
    """bf16 experts as transformers stores them (gate_up [E, 2I, D] sliced into views, down [E, D, I])."""
    assert gm.grouped_mm_available(torch.bfloat16, "cuda"), "this torch has no CUDA bf16 grouped GEMM"
    E, I, D, A = 64, 512, 1024, 8
    g = torch.Generator(device="cuda").manual_seed(N)
    gate_up = (torch.randn(E, 2 * I, D, generator=g, device="cuda") * 0.03).bfloat16()
    down = (torch.randn(E, D, I, generator=g, device="cuda") * 0.03).bfloat16()
    gate, up = gate_up[:, :I], gate_up[:, I:]
    h, ids, w = _routing(N, E, A, D, N + 1, torch.bfloat16)
    got = gm.moe_grouped(h, ids, w, gate, up, down)
    twin = gm.moe_grouped_torch(h, ids, w, gate, up, down)
    assert got.shape == (N, A, D) and got.dtype == torch.float32
    assert _rel(got, twin) < 1e-2
    # the fp32 arithmetic on the same bf16 numbers: only the bf16 roundings differ
    ref = gm.moe_grouped_torch(h.float(), ids, w.float(), gate.float(), up.float(), down.float())
    assert _rel(got, ref) < 2e-2
    # the step's dispatch: moe_triton (several tokens) and moe_torch (N > 8) run it on CUDA
    if N > 1:
        torch.testing.assert_close(step.moe_triton(h, ids, w, gate, up, down, gather=True), got, rtol=1e-5, atol=1e-6)
    if N > 8:
        torch.testing.assert_close(step.moe_torch(h, ids, w, gate, up, down), got, rtol=1e-5, atol=1e-6)
        summed = step.moe_sum(h, ids, w, gate, up, down)             # the prefill's form: [N, D] bf16
        assert summed.shape == (N, D) and summed.dtype == torch.bfloat16
        assert _rel(summed, twin.sum(1)) < 1e-2


def test_grouped_gemm_in_a_cuda_graph():
    """Fixed shapes and device-side offsets: a captured call replays with new routing written in place."""
    E, I, D, A, N = 32, 256, 512, 8, 16
    g = torch.Generator(device="cuda").manual_seed(3)
    gate, up = ((torch.randn(E, I, D, generator=g, device="cuda") * 0.05).bfloat16() for _ in range(2))
    down = (torch.randn(E, D, I, generator=g, device="cuda") * 0.05).bfloat16()
    h, ids, w = _routing(N, E, A, D, 4, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gm.moe_grouped(h, ids, w, gate, up, down)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gm.moe_grouped(h, ids, w, gate, up, down)
    for seed in (5, 6):
        h2, ids2, w2 = _routing(N, E, A, D, seed, torch.bfloat16)
        h.copy_(h2), ids.copy_(ids2), w.copy_(w2)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, gm.moe_grouped(h2, ids2, w2, gate, up, down), rtol=1e-5, atol=1e-6)


def test_prefill_logits_cuda_path_vs_torch_set(ckpt, monkeypatch):
    cpu = q3lab.load(ckpt, dtype=torch.float32)
    ids = torch.randint(0, cpu.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(7))
    want = cpu(ids)
    # fp32 on CUDA: the same arithmetic (experts grouped on the host; no fp32 grouped GEMM on CUDA)
    f32 = q3lab.load(ckpt, dtype=torch.float32, device="cuda")
    assert _rel(f32(ids.cuda()).cpu(), want) < 1e-4
    # bf16: the grouped GEMM against the torch set's host loop over experts, and both against fp32
    b16 = q3lab.load(ckpt, dtype=torch.bfloat16, device="cuda")
    grouped = b16(ids.cuda()).cpu()
    monkeypatch.setattr(step, "_grouped_ok", lambda gate: False)
    loop = b16(ids.cuda()).cpu()
    assert _rel(grouped, loop) < 2e-2
    assert _rel(grouped, want) < 5e-2
    assert (grouped.argmax(-1) == loop.argmax(-1)).float().mean().item() > 0.85


def _left_padded(vocab, lengths, seed):
    ids, mask = left_padded(vocab, lengths, seed)
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("fused,compile", [(False, False), (True, True)])
def test_batched_decode_on_cuda_vs_eager(ckpt, fused, compile):
    """bf16, B = 5 with left padding: the graph decoder (experts grouped) gives the tokens of the same decoder
    without a graph, and its step logits agree with the eager model's after the same tokens."""
    model = q3lab.load(ckpt, dtype=torch.bfloat16, device="cuda")
    ids, mask = _left_padded(model.config.vocab_size, [9, 4, 7, 9, 2], seed=8)
    graph_dec = StaticDecoder(model, 40, batch=5, fused=fused, compile=compile, cuda_graph=True)
    plain = StaticDecoder(model, 40, batch=5, fused=fused, cuda_graph=False)
    got = graph_dec.generate(ids, 12, attention_mask=mask)
    if not compile:
        assert got.tolist() == plain.generate(ids, 12, attention_mask=mask).tolist()
    full = torch.cat([mask, torch.ones(5, 12, dtype=torch.long, device="cuda")], 1)
    ref = model(got, attention_mask=full[:, :got.shape[1]])[:, -2]      # eager logits after the same tokens
    assert _rel(graph_dec.logits, ref) < 3e-2
    eager = model.generate(ids, 12, attention_mask=mask)
    first = (got[:, 9:] == eager[:, 9:]).int().cumprod(1).sum(1)
    assert first.float().mean().item() >= 3, first.tolist()          # bf16: a few tokens before any divergence


def test_batched_decode_fp32_on_cuda_equals_generate(ckpt):
    model = q3lab.load(ckpt, dtype=torch.float32, device="cuda")
    ids, mask = _left_padded(model.config.vocab_size, [6, 9, 3], seed=9)
    want = model.generate(ids, 10, attention_mask=mask)
    got = StaticDecoder(model, 32, batch=3, cuda_graph=True).generate(ids, 10, attention_mask=mask)
    assert got.tolist() == want.tolist()


def test_offloaded_prefill_matches_resident_on_cuda(ckpt):
    """bf16, 2 x 40 tokens: experts served by a DeviceExpertCache (stacked per call, grouped GEMMs) give the
    resident model's logits (the same GEMMs on the same rows; a wrong slot mapping would be far off)."""
    from q3lab.fast.decoders import DeviceExpertCache
    model = q3lab.load(ckpt, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(11)).cuda()
    want = model(ids)
    p = model.experts_provider
    host = [t.cpu().pin_memory() for t in (p.gate, p.up, p.down)]
    model.set_experts(DeviceExpertCache(*host, capacity=80, device="cuda"))
    got = model(ids)
    assert _rel(got, want) < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()
