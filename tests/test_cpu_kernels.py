"""q3lab.cpu_kernels: the bf16 decode kernels against float32 math on the same bf16 weights."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

if not (shutil.which("cc") or shutil.which("gcc")):
    pytest.skip("no C compiler: q3lab.cpu_kernels cannot be built here", allow_module_level=True)

from q3lab.cpu_kernels import KernelError, linear_bf16, moe_decode_bf16  # noqa: E402


def test_linear_is_float32_math_rounded_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 300, generator=g).bfloat16()
    w = torch.randn(70, 300, generator=g).bfloat16()
    ref = x.float() @ w.float().T                         # exact products of bf16 values, float32 sums
    y = linear_bf16(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 70)
    # one rounding of a float32 sum (whose order differs from torch's): within one bf16 step of ref
    torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-6)
    assert (y.float() == ref.bfloat16().float()).float().mean() > 0.95


def _moe_ref(h, gate, up, down, ids, wts, act_dtype=torch.bfloat16):
    """float32 math on the weights' values, the activation silu * up rounded to `act_dtype` (what the kernel and
    torch's bf16 experts do before the down projection)."""
    x = h.float()[0]
    return sum(float(wts[a]) * (down[e].float() @ (F.silu(gate[e].float() @ x) * (up[e].float() @ x))
                                .to(act_dtype).float())
               for a, e in enumerate(ids.tolist()))


def test_moe_decode_matches_float32_and_beats_the_bf16_loop():
    g = torch.Generator().manual_seed(1)
    E, I, D = 6, 40, 72
    gate, up = (torch.randn(E, I, D, generator=g) * 0.1).bfloat16(), (torch.randn(E, I, D, generator=g) * 0.1).bfloat16()
    down = (torch.randn(E, D, I, generator=g) * 0.1).bfloat16()
    h = torch.randn(1, D, generator=g).bfloat16()
    ids, wts = torch.tensor([4, 0, 2]), torch.tensor([0.5, 0.3, 0.2]).bfloat16()
    ref = _moe_ref(h, gate, up, down, ids, wts)
    out = moe_decode_bf16(h, gate, up, down, ids, wts)
    assert out.shape == (1, D) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float()[0], ref, rtol=2**-8, atol=1e-5)
    # torch's bf16 loop (what q3lab's half-precision decode computes: rounded after every op) is further off
    loop = sum(F.linear(F.silu(F.linear(h, gate[e])) * F.linear(h, up[e]), down[e]) * wts[a]
               for a, e in enumerate(ids.tolist()))
    assert (out.float()[0] - ref).abs().max() <= (loop.float()[0] - ref).abs().max()


def test_refusals():
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(KernelError, match="expected a contiguous 2-D torch.bfloat16"):
        linear_bf16(torch.zeros(1, 8), w)
    with pytest.raises(KernelError, match=r"expected \[1, K\] and \[N, K\]"):
        linear_bf16(torch.zeros(1, 7, dtype=torch.bfloat16), w)
    gate = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    down = torch.zeros(2, 4, 3, dtype=torch.bfloat16)
    with pytest.raises(KernelError, match=r"expert ids \[0, 2\] outside 0..1"):
        moe_decode_bf16(torch.zeros(1, 4, dtype=torch.bfloat16), gate, gate, down, torch.tensor([0, 2]),
                        torch.ones(2))
