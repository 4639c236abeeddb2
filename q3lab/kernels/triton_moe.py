"""One token's mixture of experts as two fused kernels, with the expert ids read on the device.

`moe_one_token(x, ids, w, gate, up, down)` computes sum_a w[a] * down[ids[a]] @ (silu(gate[ids[a]] @ x) * up[ids[a]] @ x)
for one token without asking the host which experts were chosen: `ids` stays on the device, so a decode step
can be captured in a CUDA graph. On CUDA (with Triton) the experts' rows are read in place from the stacked
weights (no gathered copy: the bytes moved are the chosen experts' bytes, the floor); elsewhere a torch version
with the same arithmetic runs (gathers, then the same fp32 sums).

Rounding follows the eager model: gate and up projections are rounded to the weight dtype before silu * up, and
each expert's output is rounded before it is weighted; the weighted outputs are summed in float32 in rank order
and rounded once (the eager model rounds after every add, so the two agree to a few units in the last place,
not bit for bit). `ids` may index experts (resident weights) or cache slots (an expert cache's slab): the
kernels do not care, which is what makes the cached model bit-equal to the resident one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton is present where CUDA PyTorch is; the CPU wheel has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
if triton is not None:
    try:  # grid dependency control (PDL); without it PDL stays off and the kernels never call these
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # pragma: no cover - depends on the Triton version
        gdc_launch_dependents = gdc_wait = None


def triton_available(device: torch.device) -> bool:
    """True when the fused kernels can run for tensors on `device`."""
    return triton is not None and torch.device(device).type == "cuda"


def moe_one_token_torch(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor,
                        up: torch.Tensor, down: torch.Tensor, *, partials: bool = False) -> torch.Tensor:
    """Reference arithmetic. x [D]; ids [A] (int); w [A]; gate/up [E, I, D]; down [E, D, I] -> [D] (x.dtype),
    or with partials=True the weighted expert outputs [A, D] in float32 before their sum."""
    dt = gate.dtype
    g = gate.index_select(0, ids).float()                                        # [A, I, D]
    u = up.index_select(0, ids).float()
    d = down.index_select(0, ids).float()                                        # [A, D, I]
    xf = x.to(dt).float()
    gx = (g @ xf).to(dt).float()                                                 # [A, I]
    ux = (u @ xf).to(dt).float()
    h = (F.silu(gx).to(dt).float() * ux).to(dt).float()                          # [A, I]
    y = (d @ h[:, :, None])[:, :, 0].to(dt).float()                              # [A, D]
    return (y * w.to(dt).float()[:, None]).sum(0).to(x.dtype) if not partials else y * w.to(dt).float()[:, None]


if triton is not None:
    @triton.jit
    def _gate_up_kernel(x_ptr, ids_ptr, g_ptr, u_ptr, h_ptr, I,
                        s_ge, s_gi, s_ue, s_ui,
                        D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr):
        a = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        rmask = rows < I
        if USE_GDC:      # ids and x come from the previous kernel (the router)
            gdc_wait()
        e = tl.load(ids_ptr + a).to(tl.int64)
        g_rows = g_ptr + e * s_ge + rows[:, None].to(tl.int64) * s_gi
        u_rows = u_ptr + e * s_ue + rows[:, None].to(tl.int64) * s_ui
        acc_g = tl.zeros([BLOCK_I], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_I], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            cols = k0 + tl.arange(0, BLOCK_D)
            xk = tl.load(x_ptr + cols).to(tl.float32)
            g = tl.load(g_rows + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            u = tl.load(u_rows + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            acc_g += tl.sum(g * xk[None, :], axis=1)
            acc_u += tl.sum(u * xk[None, :], axis=1)
        if USE_GDC:
            gdc_launch_dependents()
        dt = h_ptr.dtype.element_ty
        gb = acc_g.to(dt).to(tl.float32)
        ub = acc_u.to(dt).to(tl.float32)
        act = (gb * tl.sigmoid(gb)).to(dt).to(tl.float32)
        tl.store(h_ptr + a * I + rows, (act * ub).to(dt), mask=rmask)

    @triton.jit
    def _down_kernel(h_ptr, ids_ptr, w_ptr, d_ptr, y_ptr, D,
                     s_de, s_dd,
                     I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
        a = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        rmask = rows < D
        e = tl.load(ids_ptr + a).to(tl.int64)
        d_rows = d_ptr + e * s_de + rows[:, None].to(tl.int64) * s_dd
        if USE_GDC:      # h comes from the previous kernel; ids from the one before (complete by then)
            gdc_wait()
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            kmask = cols < I
            hk = tl.load(h_ptr + a * I + cols, mask=kmask, other=0.0).to(tl.float32)
            dw = tl.load(d_rows + cols[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(dw * hk[None, :], axis=1)
        if USE_GDC:
            gdc_launch_dependents()
        dt = d_ptr.dtype.element_ty
        wa = tl.load(w_ptr + a).to(dt).to(tl.float32)
        tl.store(y_ptr + a * D + rows, acc.to(dt).to(tl.float32) * wa, mask=rmask)


def moe_one_token_triton(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor,
                         up: torch.Tensor, down: torch.Tensor, *, block_i: int = 16, block_d: int = 256,
                         block_o: int = 16, block_k: int = 256, warps_up: int = 4,
                         warps_down: int = 4, partials: bool = False) -> torch.Tensor:
    """The fused version of `moe_one_token_torch` (same arguments); rows of each expert must be contiguous."""
    A = ids.shape[0]
    E, I, D = gate.shape
    if D % block_d:
        raise ValueError(f"hidden size {D} must be a multiple of block_d={block_d}")
    for t, name in ((gate, "gate"), (up, "up"), (down, "down")):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} weights need contiguous rows (stride 1 in the last dim), got {t.stride()}")
    from q3lab.kernels.triton_decode import _pdl
    pdl = _pdl()
    h = torch.empty(A, I, device=x.device, dtype=gate.dtype)
    y = torch.empty(A, D, device=x.device, dtype=torch.float32)
    xd = x.to(gate.dtype).contiguous()
    _gate_up_kernel[(A, triton.cdiv(I, block_i))](xd, ids, gate, up, h, I, gate.stride(0), gate.stride(1),
                                                  up.stride(0), up.stride(1), D=D, BLOCK_I=block_i, BLOCK_D=block_d,
                                                  num_warps=warps_up, **pdl)
    _down_kernel[(A, triton.cdiv(D, block_o))](h, ids, w, down, y, D, down.stride(0), down.stride(1),
                                               I=I, BLOCK_O=block_o, BLOCK_K=block_k, num_warps=warps_down, **pdl)
    return y if partials else y.sum(0).to(x.dtype)


# block sizes and warps of the two kernels: the fastest of 40 configs swept by bench/gpu_decode.py --sweep on an
# H100 (2026-11-28: 36.5 us per full-size layer, 2.07 TB/s of expert reads; the old 16/256 config ran 108 us)
# (H200, 2026-12-01, 70 configs: 2 x 2048 / 8 warps + 16 x 256 / 8 warps 27.8 us against 28.5 for this H100 choice,
# inside one run's noise; the H100 choice kept for gate/up, the down config taken)
TRITON_CONFIG: dict[str, int] = dict(block_i=2, block_d=1024, warps_up=4, block_o=16, block_k=256, warps_down=8)


def moe_one_token(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  down: torch.Tensor, *, partials: bool = False) -> torch.Tensor:
    """One token's weighted expert sum [D] (or, partials=True, the weighted outputs [A, D] in float32, for a
    caller that fuses the sum into its next kernel): fused kernels on CUDA, the torch version elsewhere."""
    if triton_available(x.device) and x.shape[-1] % TRITON_CONFIG["block_d"] == 0:
        return moe_one_token_triton(x, ids, w, gate, up, down, partials=partials, **TRITON_CONFIG)
    return moe_one_token_torch(x, ids, w, gate, up, down, partials=partials)
