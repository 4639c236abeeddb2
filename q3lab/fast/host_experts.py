"""Missed experts computed on the host CPU from the (pinned) host weights, while other misses are copied.

When the host -> device link is the bottleneck of an offloaded decode, a miss can either be copied (its
3 * I * D weights over the link) or computed where the weights already are: the host reads them at its own
memory bandwidth, and only the token's hidden state (D values) and the expert's output (D values) cross the
link. `HostExperts` computes a token's experts on the host with `q3lab.kernels.cpu`'s one-token MoE (C, OpenMP, bf16
rows on vdpbf16ps where the CPU has AVX-512 BF16: memory speed, where torch's bf16 F.linear on one row reads at
a fraction of it, bench/NOTES.md issue 21), reading the host tensors in place, all of a layer's host experts in
one call; or with its torch twin (kernel="torch": `q3lab.runtime.step.moe_torch`'s one-token arithmetic expert
by expert). `HostSplit` decides, per layer, how many of a step's misses go to the host: the k minimising
max(k * host_s, (m - k) * link_s) for m misses, with host_s a per-layer running mean of the measured host time
per expert and link_s the copy time of one expert at the measured link rate.

Tolerance: the host path agrees with the resident decoder to the weights' rounding, not bit for bit. float32:
relative 1e-5 on one expert's output (sums in another order). bf16: both kernels round as the device's experts
kernels and the eager model do (gate and up projections, silu, silu * up and each expert's output to bf16; C:
`moe_bf16_rounded`), so they differ from the device only where a float32 sum in another order lands on the
other side of a bf16 rounding; relative 1.5e-2 on one expert's output against float64 for either.
(The first C version rounded only silu * up, which is closer to the exact value but not to the GPU's
arithmetic: at the real dimensions on the H200 greedy tokens matched for 12 of 32 steps, KV relative error
1.9e-2, against 32/32 and 1.6e-3 for the torch twin.) tests/test_offload_replay.py checks both kernels against
float64 and each other, and greedy tokens equal to the resident decoder.
"""
from __future__ import annotations

import ctypes
import os
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from q3lab.errors import InputError, Q3LabError


class HostExperts:
    """Experts of host tensors gate/up [L, E, I, D] and down [L, E, D, I], computed on the CPU.

    threads: CPU threads for the host products (default: torch's current setting, read once here); the C
        kernels get it explicitly per call (OpenMP num_threads), the torch twin sets torch's intra-op threads.
    kernel: "c" (`q3lab.kernels.cpu`'s one-token MoE, reading the host tensors in place, bf16 on vdpbf16ps where
        the CPU has AVX-512 BF16, else widened in C), "torch" (F.linear per expert: the twin), or None (default):
        "c" where the library builds and the tensors suit it (bf16/float32, contiguous), else "torch" with a
        one-time warning naming the reason; Q3LAB_CPU_KERNELS=0 (as for `step.kernels_for`) chooses "torch".
        An explicit "c" that cannot run raises `KernelError`.
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, threads: int | None = None,
                 kernel: str | None = None):
        if gate.device.type != "cpu" or up.device.type != "cpu" or down.device.type != "cpu":
            raise InputError(f"HostExperts needs host (CPU) expert tensors, got gate on {gate.device}")
        if gate.dim() != 4 or up.shape != gate.shape or down.shape != (*gate.shape[:2], gate.shape[3], gate.shape[2]):
            raise InputError(f"HostExperts: want gate/up [L, E, I, D] and down [L, E, D, I], got "
                             f"{list(gate.shape)}, {list(up.shape)}, {list(down.shape)}")
        if kernel not in (None, "c", "torch"):
            raise InputError(f"HostExperts: kernel must be 'c', 'torch' or None, got {kernel!r}")
        self.gate, self.up, self.down = gate, up, down
        self.threads = int(threads) if threads else torch.get_num_threads()
        self.dtype = gate.dtype
        self._lib = None
        if kernel is None and os.environ.get("Q3LAB_CPU_KERNELS", "1") == "0":
            kernel = "torch"
        if kernel != "torch":
            why = self._c_unusable()
            if why is None:
                self.kernel = "c"
            elif kernel == "c":
                from q3lab.kernels.cpu import KernelError
                raise KernelError(f"HostExperts(kernel='c'): {why}")
            else:
                _warn_once(f"HostExperts: the C kernels cannot serve these experts ({why}); the torch kernels "
                           f"(F.linear per expert, several times slower in bf16) compute them")
                self.kernel = "torch"
        else:
            self.kernel = "torch"

    def _c_unusable(self) -> str | None:
        """Why q3lab.kernels.cpu cannot compute these experts (None: it can; the library is then loaded)."""
        if self.dtype not in (torch.bfloat16, torch.float32):
            return f"experts are {self.dtype}; the C kernels take bf16 or float32"
        for t, n in ((self.gate, "gate"), (self.up, "up"), (self.down, "down")):
            if not t.is_contiguous():
                return f"host {n} {list(t.shape)} is not contiguous"
        try:
            from q3lab.kernels import cpu
            self._lib = cpu.lib()
        except (Q3LabError, OSError) as e:    # KernelError (no compiler, failed build) or loading it failed
            return f"{type(e).__name__}: {str(e)[:300]}"
        # bf16: the kernel that rounds as the device's experts kernels do (projections, silu, each output)
        self._fn = self._lib.moe_bf16_rounded if self.dtype == torch.bfloat16 else self._lib.moe_f32
        return None

    def isa(self) -> str:
        """What computes the experts: the C library's inner loops (`q3lab.kernels.cpu.isa`) or the torch twin."""
        if self.kernel == "torch":
            return "torch F.linear"
        from q3lab.kernels import cpu
        return cpu.isa()

    def _args(self, experts: Sequence[int], weights: Sequence[float]):
        if len(experts) != len(weights):
            raise InputError(f"HostExperts.compute: {len(experts)} experts but {len(weights)} weights")
        # the router weights rounded to the experts' dtype, as the resident kernels use them (bf16: round to
        # nearest even on the float32 bits, in numpy: a few us less than a torch round trip per layer)
        a = np.asarray(weights, dtype=np.float32)
        if self.dtype == torch.bfloat16:
            u = a.view(np.uint32)
            a = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)
        elif self.dtype != torch.float32:
            return torch.from_numpy(a).to(self.dtype).float()
        return torch.from_numpy(np.ascontiguousarray(a))

    def _c(self, layer: int, x: torch.Tensor, ids: Sequence[int], wt: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
        """The C kernel on `ids` of `layer`: the weighted sum [D] float32 (into `out` when given)."""
        L, E, I, D = self.gate.shape
        if not 0 <= layer < L:
            raise InputError(f"HostExperts: layer {layer} outside 0..{L - 1}")
        A = len(ids)
        idx = (ctypes.c_int64 * A)(*ids)
        if out is None:
            out = torch.empty(D, dtype=torch.float32)
        elif out.dtype != torch.float32 or out.numel() != D or not out.is_contiguous() or out.device.type != "cpu":
            raise InputError(f"HostExperts: out must be a contiguous float32 CPU tensor of {D}, got "
                             f"{list(out.shape)} {out.dtype} on {out.device}")
        rc = self._fn(x.data_ptr(), self.gate[layer].data_ptr(), self.up[layer].data_ptr(),
                      self.down[layer].data_ptr(), ctypes.addressof(idx), wt.data_ptr(), out.data_ptr(),
                      A, I, D, E, self.threads, 0)
        if rc:
            raise InputError(f"HostExperts: expert ids {list(ids)} of layer {layer} outside 0..{E - 1}")
        return out

    def compute(self, layer: int, h: torch.Tensor, experts: Sequence[int], weights: Sequence[float]) -> torch.Tensor:
        """The weighted outputs [len(experts), D] float32 of one token's hidden state h [D] (or [1, D]) through
        `experts` of `layer` with their router weights (one row per expert)."""
        wt = self._args(experts, weights)
        x = h.reshape(1, -1).to(self.dtype).contiguous()
        if self.kernel == "c":
            return torch.stack([self._c(layer, x, [e], wt[k:k + 1]) for k, e in enumerate(experts)]) \
                if len(experts) else torch.empty(0, x.shape[1])
        return self._torch(layer, x, experts, wt)

    def compute_sum(self, layer: int, h: torch.Tensor, experts: Sequence[int], weights: Sequence[float],
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """The sum [D] float32 of `compute`'s rows: with the C kernel one call for all of `experts` (the threads
        split every expert's rows, one fork/join a layer), summed in the given order; written into `out` (a
        contiguous float32 [D]) by the C kernel when given (the torch twin returns a new tensor)."""
        wt = self._args(experts, weights)
        x = h.reshape(1, -1).to(self.dtype).contiguous()
        if not len(experts):
            return torch.zeros(x.shape[1])
        if self.kernel == "c":
            return self._c(layer, x, experts, wt, out)
        return self._torch(layer, x, experts, wt).sum(0)

    def _torch(self, layer: int, x: torch.Tensor, experts: Sequence[int], wt: torch.Tensor) -> torch.Tensor:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        out = torch.empty(len(experts), x.shape[1], dtype=torch.float32)
        for k, e in enumerate(experts):
            # F.linear on a [1, D] row: the GEMM path (oneDNN for bf16), not the generic matrix-vector kernel
            act = F.silu(F.linear(x, self.gate[layer, e])) * F.linear(x, self.up[layer, e])   # [1, I], in dt
            out[k] = F.linear(act, self.down[layer, e])[0].float() * wt[k]
        return out


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class HostSplit:
    """How many of a layer's misses to compute on the host: from the link's measured bytes/s and a per-layer
    running mean of the host's seconds per expert (measured by `record`).

    max_host: at most this many per layer (0 turns the host path off).
    bias: the split uses bias * host_s (1: the rule; a benchmark checks the rule's optimum by moving the split
        toward the host, bias < 1, or toward the link, bias > 1, while host_s still learns the measured rate)."""

    def __init__(self, layers: int, expert_bytes: int, link_bytes_per_s: float, host_s_per_expert: float,
                 max_host: int = 8, smoothing: float = 0.3, bias: float = 1.0):
        if link_bytes_per_s <= 0 or host_s_per_expert <= 0:
            raise InputError(f"HostSplit: rates must be positive (link {link_bytes_per_s} B/s, host "
                             f"{host_s_per_expert} s/expert)")
        self.link_s = expert_bytes / link_bytes_per_s
        self.host_s = [float(host_s_per_expert)] * layers
        self.max_host, self.smoothing, self.bias = int(max_host), float(smoothing), float(bias)
        self.host_experts = [0] * layers
        self.copied = [0] * layers

    def split(self, layer: int, misses: int) -> int:
        """The number k of `misses` to compute on the host: argmin over k of max(k host_s, (m - k) link_s)."""
        hs, ls = self.host_s[layer] * self.bias, self.link_s
        best, best_t = 0, misses * ls
        for k in range(1, min(misses, self.max_host) + 1):
            t = max(k * hs, (misses - k) * ls)
            if t < best_t:
                best, best_t = k, t
        return best

    def record(self, layer: int, experts: int, seconds: float, copied: int) -> None:
        """Measured: `experts` computed on the host in `seconds`; `copied` misses went over the link."""
        if experts:
            a = self.smoothing
            self.host_s[layer] = (1 - a) * self.host_s[layer] + a * seconds / experts
        self.host_experts[layer] += experts
        self.copied[layer] += copied


def time_host_expert(host: HostExperts, layer: int = 0, repeats: int = 5, experts: int = 4) -> float:
    """Median seconds per expert of `host.compute_sum` (what the offloaded decoder calls) on one token, `experts`
    at a time (a calibration for `HostSplit`). Each repeat reads other experts (of the next layer), so the
    host's caches cannot serve the weights of a previous one."""
    L, E, _, D = host.gate.shape
    h = torch.randn(D).to(host.dtype)
    n = min(experts, E)
    ws = [1.0 / n] * n
    host.compute_sum(layer, h, list(range(n)), ws)   # warm-up (threads, kernels)
    ts = []
    for r in range(repeats):
        lay = (layer + 1 + r) % L
        ids = [(n * r + k) % E for k in range(n)]
        t = time.perf_counter()
        host.compute_sum(lay, h, ids, ws)
        ts.append((time.perf_counter() - t) / n)
    ts.sort()
    return ts[len(ts) // 2]
