"""bf16 decode kernels for the CPU: matrix-vector products that read bf16 weights at memory speed.

Why: torch 2.13's CPU kernels for a bf16 matrix times one vector run at 1.3-10 GB/s on this machine (mv 1.3,
F.linear 9.5), against 30-75 GB/s for float32 (bench/NOTES.md, "CPU decode vs llama.cpp"): a bf16 decode step
is bound by that kernel, not by the bytes, so q3lab's bf16 decode ran at 0.35-0.5x llama.cpp's, whose bf16 dot
products stream the weights. Here each weight row is widened to float32 in registers (a bf16 is the top half
of a float32: a 16-bit shift) and multiplied into a float32 accumulator; activations are float32 inside and
the result is rounded to bf16 once (round to nearest even). The loops are plain C that gcc vectorises for the
machine it runs on (-O3 -march=native); OpenMP splits rows across torch's own thread count (torch ships
libgomp.so.1, so the kernel shares its runtime and pool when torch is imported first).

    linear_bf16(x [1, K] bf16, w [N, K] bf16) -> [1, N] bf16          (q/k/v/o, router, lm_head)
    moe_decode_bf16(h [1, D], gate [E, I, D], up [E, I, D], down [E, D, I], ids [A], weights [A]) -> [1, D]
        sum_a weights[a] * down[ids[a]] @ (silu(gate[ids[a]] @ h) * (up[ids[a]] @ h)), one token, the layer's
        resident expert tensors used in place (no gather copy), float32 inside, one rounding at the end.

The shared library is compiled on first use with the system C compiler (about a second) into
$Q3LAB_KERNEL_DIR (default ~/.cache/q3lab/kernels), named by a hash of source and flags. No compiler, or a
failed build, raises `KernelError`: nothing falls back silently. `python -m q3lab.kernels.cpu` times the
kernels against torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from q3lab.errors import Q3LabError

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>

static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* round to nearest even */
    return (uint16_t)(u >> 16);
}
static inline float dot(const uint16_t *w, const float *x, int K) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int k = 0; k < K; k++) acc += bf2f(w[k]) * x[k];
    return acc;
}

/* y[n] = bf16(sum_k w[n,k] x[k]) */
void linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int N, int K, int threads) {
    float xf[K];
    for (int k = 0; k < K; k++) xf[k] = bf2f(x[k]);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) y[n] = f2bf(dot(w + (int64_t)n * K, xf, K));
}

/* One token through A experts of one layer: gate/up [E, I, D], down [E, D, I], all bf16. */
void moe_decode_bf16(const uint16_t *h, const uint16_t *gate, const uint16_t *up, const uint16_t *down,
                     const int64_t *ids, const float *wts, uint16_t *out, int A, int I, int D, int threads) {
    float x[D], act[A * I];
    for (int d = 0; d < D; d++) x[d] = bf2f(h[d]);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < A * I; r++) {               /* gate and up rows of every chosen expert */
            int a = r / I, i = r % I;
            int64_t off = (ids[a] * (int64_t)I + i) * D;
            float g = dot(gate + off, x, D), u = dot(up + off, x, D);
            act[r] = wts[a] * (g / (1.f + expf(-g))) * u;     /* weight folded into the activation */
        }
        #pragma omp for schedule(static)
        for (int d = 0; d < D; d++) {                   /* down rows: sum over experts in rank order */
            float acc = 0.f;
            for (int a = 0; a < A; a++) acc += dot(down + (ids[a] * (int64_t)D + d) * I, act + a * I, I);
            out[d] = f2bf(acc);
        }
    }
}
"""
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


class KernelError(Q3LabError):
    """The CPU kernels cannot be built or were given tensors they do not handle."""


_LIB: ctypes.CDLL | None = None
# Below this many weight elements a call runs on one thread: an OpenMP fork/join costs a few microseconds
# idle and a scheduler time slice (milliseconds) when another process holds the second core, which the data
# of a small matrix does not repay (data/mini's 48 layers of 96-wide matrices ran 8x slower threaded).
PARALLEL_MIN_ELEMENTS = 1 << 18


def _threads(elements: int) -> int:
    return torch.get_num_threads() if elements >= PARALLEL_MIN_ELEMENTS else 1


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelError("q3lab.kernels.cpu needs a C compiler (cc or gcc on PATH, or $CC): none found")
    tag = hashlib.sha256((SOURCE + " ".join(FLAGS) + cc).encode()).hexdigest()[:16]
    where = Path(os.environ.get("Q3LAB_KERNEL_DIR", Path.home() / ".cache" / "q3lab" / "kernels"))
    lib = where / f"cpu_kernels-{tag}.so"
    if not lib.exists():
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            src, so = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(SOURCE)
            p = subprocess.run([cc, *FLAGS, str(src), "-o", str(so), "-lm"], capture_output=True, text=True)
            if p.returncode:
                raise KernelError(f"building {lib.name} with {cc} failed:\n{p.stderr[-2000:]}")
            os.replace(so, lib)   # atomic: a concurrent build never sees half a library
    dll = ctypes.CDLL(str(lib))
    p16, i64, f32 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
    dll.linear_bf16.argtypes = [p16, p16, p16, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    dll.moe_decode_bf16.argtypes = [p16, p16, p16, p16, i64, f32, p16] + [ctypes.c_int] * 4
    return dll


def lib() -> ctypes.CDLL:
    """The compiled kernels (built on first use)."""
    global _LIB
    if _LIB is None:
        _LIB = _build()
    return _LIB


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, dim: int) -> None:
    if t.dtype != dtype or t.dim() != dim or not t.is_contiguous() or t.device.type != "cpu":
        raise KernelError(f"{name}: expected a contiguous {dim}-D {dtype} CPU tensor, got {t.dim()}-D {t.dtype} "
                          f"on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ w[N, K].T -> [1, N], all bf16, float32 accumulation (F.linear for one decode row)."""
    _check(x, "x", torch.bfloat16, 2)
    _check(w, "w", torch.bfloat16, 2)
    if x.shape[0] != 1 or x.shape[1] != w.shape[1]:
        raise KernelError(f"linear_bf16: x {list(x.shape)} and w {list(w.shape)}: expected [1, K] and [N, K]")
    y = torch.empty(1, w.shape[0], dtype=torch.bfloat16)
    lib().linear_bf16(x.data_ptr(), w.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1], _threads(w.numel()))
    return y


def moe_decode_bf16(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One token's MoE output [1, D] from a layer's resident experts (gate/up [E, I, D], down [E, D, I], bf16)
    and its chosen experts `ids` [A] (rank order) with their routing `weights` [A]."""
    _check(h, "h", torch.bfloat16, 2)
    for t, n in ((gate, "gate"), (up, "up"), (down, "down")):
        _check(t, n, torch.bfloat16, 3)
    E, I, D = gate.shape
    if h.shape != (1, D) or up.shape != (E, I, D) or down.shape != (E, D, I):
        raise KernelError(f"moe_decode_bf16: h {list(h.shape)}, gate {list(gate.shape)}, up {list(up.shape)}, "
                          f"down {list(down.shape)}: expected [1, D], [E, I, D], [E, I, D], [E, D, I]")
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    wts = weights.reshape(-1).to(torch.float32).contiguous()
    if ids.numel() != wts.numel() or ids.numel() == 0:
        raise KernelError(f"moe_decode_bf16: {ids.numel()} expert ids but {wts.numel()} weights")
    if int(ids.min()) < 0 or int(ids.max()) >= E:    # the C code trusts ids: check them here
        raise KernelError(f"moe_decode_bf16: expert ids {ids.tolist()} outside 0..{E - 1}")
    out = torch.empty(1, D, dtype=torch.bfloat16)
    lib().moe_decode_bf16(h.data_ptr(), gate.data_ptr(), up.data_ptr(), down.data_ptr(), ids.data_ptr(),
                          wts.data_ptr(), out.data_ptr(), ids.numel(), I, D, _threads(3 * ids.numel() * I * D))
    return out


# -- the micro-benchmark --------------------------------------------------------------------------
def _time(fn, n: int) -> float:
    import time
    for _ in range(5):
        fn()
    best = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t) / n)
    return sorted(best)[2]   # median of 5


def micro(D: int = 1024, I: int = 512, E: int = 64, A: int = 8, threads: int = 2):
    """Median time per call (us) and weight bytes per second (GB/s): these kernels against torch's, on
    weights larger than the caches (E experts per layer, as in `q3lab synth --preset medium`)."""
    import pandas as pd
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(E, I, D, generator=g) * 0.02).bfloat16(), (torch.randn(E, I, D, generator=g) * 0.02).bfloat16()
    down = (torch.randn(E, D, I, generator=g) * 0.02).bfloat16()
    h = torch.randn(1, D, generator=g).bfloat16()
    w = torch.randn(D, D, generator=g).bfloat16()
    w32, gate32, up32, down32 = w.float(), gate.float(), up.float(), down.float()
    ids = torch.randperm(E, generator=g)[:A]
    wt = torch.softmax(torch.randn(A, generator=g), 0)
    moe_bytes = 3 * A * I * D * 2

    def torch_moe(hh, G, U, Dn):   # what q3lab's half-precision decode loop does today
        out = None
        for e, we in zip(ids.tolist(), wt.tolist()):
            y = F.linear(F.silu(F.linear(hh, G[e])) * F.linear(hh, U[e]), Dn[e]) * we
            out = y if out is None else out.add_(y)
        return out

    rows = [("linear [1,D]x[D,D]", "torch bf16 F.linear", lambda: F.linear(h, w), D * D * 2),
            ("linear [1,D]x[D,D]", "torch f32 F.linear", lambda: F.linear(h.float(), w32), D * D * 4),
            ("linear [1,D]x[D,D]", "q3lab linear_bf16", lambda: linear_bf16(h, w), D * D * 2),
            (f"MoE {A} of {E} experts", "torch bf16 loop", lambda: torch_moe(h, gate, up, down), moe_bytes),
            (f"MoE {A} of {E} experts", "torch f32 loop", lambda: torch_moe(h.float(), gate32, up32, down32),
             2 * moe_bytes),
            (f"MoE {A} of {E} experts", "q3lab moe_decode_bf16",
             lambda: moe_decode_bf16(h, gate, up, down, ids, wt), moe_bytes)]
    out = []
    for op, impl, fn, nbytes in rows:
        t = _time(fn, 50)
        out.append(dict(op=op, impl=impl, us=t * 1e6, GB_s=nbytes / t / 1e9))
    return pd.DataFrame(out)


if __name__ == "__main__":
    import sys
    print(micro(threads=int(sys.argv[1]) if len(sys.argv) > 1 else 2).to_string(index=False, float_format="%.1f"))
