"""The weighted SwiGLU experts of many tokens at once (prefill, batched decode) as grouped GEMMs: tokens sorted by
expert, one GEMM per projection over all experts (`torch._grouped_mm` / `torch.nn.functional.grouped_mm`), with a
plain-torch twin of the same arithmetic.

Dimensions as in `q3lab.runtime.step`: N tokens, A experts per token, E experts, D hidden, I expert intermediate,
M = N*A (token, expert) pairs.

The layout: each token's A experts sorted ascending (as `step.moe_torch`'s grouped path does, so the sum over A runs
in the same order), the M pairs sorted by expert (stable), the token rows gathered in that order; expert e owns rows
offs[e-1]..offs[e] (offs [E] int32, cumulative ends, computed on the device by a search over the sorted ids: no host
sync and fixed shapes, so a CUDA graph can capture it). Then

    a = x @ gate[e].T, b = x @ up[e].T            (rounded to the weights' dtype)
    y = (silu(a) * b) @ down[e].T                 (rounded to the weights' dtype)
    out[n, j] = float(y) * float(w[n, j] rounded to the weights' dtype)

in float32, put back to [N, A, D] (ascending expert per token): the rounding of `step.moe_torch`.

`moe_grouped` uses the grouped GEMM where `grouped_mm_available` says the torch build has one for the weights'
dtype and device (bf16 on CUDA; any float dtype on CPU), else it raises `KernelError` (callers choose, nothing falls
back silently); `moe_grouped_torch` is the twin: the same sort and offsets, one `F.linear` per expert over its slice
(offsets read on the host).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from q3lab.errors import Q3LabError


class KernelError(Q3LabError):
    """A kernel that cannot run on these tensors (dtype, device, or the torch build)."""


def _grouped_mm_fn():
    """The torch grouped GEMM (`F.grouped_mm` in newer builds, else `torch._grouped_mm`), or None."""
    fn = getattr(F, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def grouped_mm_available(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `moe_grouped` can run its grouped GEMM for weights of `dtype` on `device`: the torch build has one,
    and on CUDA the dtype is bf16 on a card of compute capability >= 8.0 (the CUDA kernels are bf16 only)."""
    if _grouped_mm_fn() is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_ok(gate: torch.Tensor) -> bool:
    """Whether `moe_grouped` runs for experts stacked like `gate` [E, I, D]: `grouped_mm_available` for its dtype
    and device, and rows of I and D elements a multiple of 16 bytes (the grouped GEMM's stride rule)."""
    size = gate.element_size()
    return (grouped_mm_available(gate.dtype, gate.device) and (gate.shape[1] * size) % 16 == 0
            and (gate.shape[2] * size) % 16 == 0)


def fused_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """The [E, 2I, D] tensor whose halves gate and up [E, I, D] are (transformers' gate_up_proj sliced), else
    None: then gate and up are two separate GEMMs."""
    E, I, D = gate.shape
    size = gate.element_size()
    if (up.shape == gate.shape and up.dtype == gate.dtype and up.stride() == gate.stride()
            and gate.stride() == (2 * I * D, D, 1)
            and up.data_ptr() == gate.data_ptr() + I * D * size):
        return gate.as_strided((E, 2 * I, D), (2 * I * D, D, 1))
    return None


def group_by_expert(ids: torch.Tensor, w: torch.Tensor, E: int):
    """The grouped layout of routing ids/w [N, A]: (order [M] the flat (token, ascending-expert slot) index of each
    sorted row, w_sorted [M] the routing weights in that order, offs [E] int32 cumulative row ends per expert).
    All on ids' device, without a host sync."""
    N, A = ids.shape
    sid, perm = ids.sort(dim=1)                                   # each token's experts ascending
    flat = sid.reshape(-1)
    order = torch.argsort(flat, stable=True)                      # rows grouped by expert, token order inside
    sorted_ids = flat.index_select(0, order)
    experts = torch.arange(E, device=ids.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)
    w_sorted = w.gather(1, perm).reshape(-1).index_select(0, order)
    return order, w_sorted, offs


def _finish(y: torch.Tensor, w_sorted: torch.Tensor, order: torch.Tensor, N: int, A: int) -> torch.Tensor:
    """Weighted rows y [M, D] (weights' dtype) back to [N, A, D] float32 (ascending expert per token)."""
    yw = y.float() * w_sorted.to(y.dtype).float()[:, None]
    out = torch.empty_like(yw)
    out.index_copy_(0, order, yw)
    return out.view(N, A, -1)


def moe_grouped(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Weighted expert outputs [N, A, D] float32 of h [N, D] routed to ids/w [N, A] over stacked experts gate/up
    [E, I, D], down [E, D, I], as three grouped GEMMs (see the module docstring). Raises KernelError where the torch
    build has no grouped GEMM for these weights (`grouped_mm_available`)."""
    if not grouped_mm_available(gate.dtype, gate.device):
        raise KernelError(f"moe_grouped: no grouped GEMM for {gate.dtype} expert weights on {gate.device} in torch "
                          f"{torch.__version__} (CUDA needs bf16); use moe_grouped_torch")
    if not grouped_ok(gate):
        raise KernelError(f"moe_grouped: expert rows of I={gate.shape[1]} and D={gate.shape[2]} {gate.dtype} "
                          f"elements are not multiples of 16 bytes (the grouped GEMM's stride rule); "
                          f"use moe_grouped_torch")
    y, w_sorted, order = _grouped_rows(h, ids, w, gate, up, down)
    return _finish(y, w_sorted, order, *ids.shape)


def moe_grouped_sum(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """Each token's weighted expert sum [N, D] in h's dtype, the grouped GEMMs of `moe_grouped` followed by one
    batched product w [N, 1, A] @ y [N, A, D] (float32 accumulation, one rounding) instead of float32 partials
    [N, A, D]: about a fifth of the memory traffic after the GEMMs (a prefill). The same numbers as
    `step.expert_sum(moe_grouped(...))` up to the order of the sum over A."""
    if not grouped_ok(gate):
        moe_grouped(h, ids, w, gate, up, down)          # raises the reason
    y, w_sorted, order = _grouped_rows(h, ids, w, gate, up, down)
    N, A = ids.shape
    inv = torch.empty_like(order)
    inv.scatter_(0, order, torch.arange(order.numel(), device=order.device))   # sorted row of each (token, slot)
    y_tok = y.index_select(0, inv).view(N, A, -1)
    w_tok = w_sorted.to(y.dtype).index_select(0, inv).view(N, 1, A)
    return torch.bmm(w_tok, y_tok).view(N, -1).to(h.dtype)


def _grouped_rows(h, ids, w, gate, up, down):
    """(y [M, D] each (token, expert) row's output in the weights' dtype, grouped by expert; w_sorted; order)."""
    mm = _grouped_mm_fn()
    N, A = ids.shape
    order, w_sorted, offs = group_by_expert(ids, w, gate.shape[0])
    dt = gate.dtype
    x = h.to(dt).index_select(0, order // A)                                        # [M, D]
    fused = fused_gate_up(gate, up)
    if fused is not None:       # transformers' layout: one GEMM over [E, 2I, D], each group's rows contiguous
        a, b = mm(x, fused.transpose(-2, -1), offs=offs).split(gate.shape[1], dim=-1)   # [M, I] each
    else:
        a = mm(x, gate.transpose(-2, -1), offs=offs)                                # [M, I]
        b = mm(x, up.transpose(-2, -1), offs=offs)
    y = mm(F.silu(a) * b, down.transpose(-2, -1), offs=offs)                        # [M, D]
    return y, w_sorted, order


def moe_grouped_torch(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """`moe_grouped`'s plain-torch twin: the same layout and rounding, one F.linear per expert with tokens."""
    N, A = ids.shape
    order, w_sorted, offs = group_by_expert(ids, w, gate.shape[0])
    dt = gate.dtype
    x = h.to(dt).index_select(0, order // A)
    ends = offs.tolist()
    ys, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            xe = x[start:end]
            ys.append(F.linear(F.silu(F.linear(xe, gate[e])) * F.linear(xe, up[e]), down[e]))
        start = end
    y = torch.cat(ys) if ys else x.new_zeros(0, down.shape[1])
    return _finish(y, w_sorted, order, N, A)


def distinct_experts(ids: torch.Tensor, E: int) -> torch.Tensor:
    """Distinct experts touched per group of routing ids [..., M] (e.g. [steps, layers, B*A]): [...] int64."""
    hit = torch.zeros(*ids.shape[:-1], E, dtype=torch.bool, device=ids.device)
    hit.scatter_(-1, ids.long(), True)
    return hit.sum(-1)


def moe_kernel(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, gate, up=None, down=None, *,
               gather: bool | None = None) -> torch.Tensor:
    """`moe_grouped` with a kernel set's `moe` signature (`step.Kernels`; `gather` is meaningless here)."""
    return moe_grouped(h, ids, w, gate, up, down)


def grouped_kernels():
    """A kernel set with torch attention and router and the grouped experts everywhere (any N, CPU too): what
    the CUDA sets run for many tokens, for tests of the grouped path off CUDA."""
    from q3lab.runtime.step import Kernels, attend_torch, route_torch
    return Kernels("torch+grouped-moe", attend_torch, route_torch, moe_kernel)
