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
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif
/* software prefetch this far ahead of the row being read: 2 KiB measured 45 -> 52 GB/s for the one-token
   MoE (cold experts, 2 threads; 4 KiB 49-51) */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

/* which inner loops were compiled: 2 AVX-512 BF16 (vdpbf16ps) + AVX-512F FMA, 1 AVX-512F only, 0 portable C */
int q3_isa(void) {
#if HAVE_DPBF16
    return 2;
#elif defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* sum_k w[k] x[k] of bf16 rows: exact products, float32 sums (vdpbf16ps adds pairs of products) */
static inline float dot_bf16(const uint16_t *w, const uint16_t *x, int K) {
#if HAVE_DPBF16
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES + 64, _MM_HINT_T0);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    if (k < K) {                                     /* the tail: masked loads read zeros past the row */
        for (; k < K; k += 32) {
            int r = K - k < 32 ? K - k : 32;
            __mmask32 m = (__mmask32)(r == 32 ? 0xffffffffu : ((1u << r) - 1u));
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k),
                                  (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int k = 0; k < K; k++) acc += bf2f(w[k]) * bf2f(x[k]);
    return acc;
#endif
}

static inline float dot_f32(const float *w, const float *x, int K) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES + 64, _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    }
    for (; k < K; k += 16) {
        int r = K - k < 16 ? K - k : 16;
        __mmask16 m = (__mmask16)(r == 16 ? 0xffffu : ((1u << r) - 1u));
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int k = 0; k < K; k++) acc += w[k] * x[k];
    return acc;
#endif
}

/* y[m, n] = sum_k w[n,k] x[m,k] for M rows of x (each weight row read once, used for every x row) */
void linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
    for (int n = 0; n < N; n++)
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = f2bf(dot_bf16(w + (int64_t)n * K, x + (int64_t)m * K, K));
}

void linear_f32(const float *x, const float *w, float *y, int M, int N, int K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
    for (int n = 0; n < N; n++)
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = dot_f32(w + (int64_t)n * K, x + (int64_t)m * K, K);
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* One token through A experts of one layer: gate/up [E, I, D], down [E, D, I]; out[D] float32 =
   sum_a wts[a] * down[ids[a]] @ act_a, act_a = silu(gate[ids[a]] @ h) * (up[ids[a]] @ h). In bf16 act_a is
   rounded to bf16 once (as torch's bf16 experts round it) so that the down rows run on vdpbf16ps too.
   Returns 0, or -1 (nothing computed) when an id is outside 0..E-1. */
int moe_bf16(const uint16_t *h, const uint16_t *gate, const uint16_t *up, const uint16_t *down,
             const int64_t *ids, const void *wv, float *out, int A, int I, int D, int E, int threads, int wbf) {
    for (int a = 0; a < A; a++) if (ids[a] < 0 || ids[a] >= E) return -1;
    float wts[A];                                       /* routing weights in bf16 or float32 */
    for (int a = 0; a < A; a++) wts[a] = wbf ? bf2f(((const uint16_t *)wv)[a]) : ((const float *)wv)[a];
    uint16_t act[A * I];
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < A * I; r++) {               /* gate and up rows of every chosen expert */
            int a = r / I, i = r % I;
            int64_t off = (ids[a] * (int64_t)I + i) * D;
            act[r] = f2bf(silu(dot_bf16(gate + off, h, D)) * dot_bf16(up + off, h, D));
        }
        /* down rows: each thread owns a range of outputs and walks the experts one after the other (one
           sequential stream of rows at a time for the prefetcher), summing in rank order */
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int d0 = (int)((int64_t)D * t / nt), d1 = (int)((int64_t)D * (t + 1) / nt);
        for (int d = d0; d < d1; d++) out[d] = 0.f;
        for (int a = 0; a < A; a++) {
            const uint16_t *base = down + ids[a] * (int64_t)D * I;
            for (int d = d0; d < d1; d++) out[d] += wts[a] * dot_bf16(base + (int64_t)d * I, act + a * I, I);
        }
    }
    return 0;
}

/* moe_bf16 with the eager model's (and the GPU experts kernels') roundings: the gate and up projections, silu
   of the gate, silu * up and each expert's output rounded to bf16, then times its weight, float32 sums in rank
   order (q3lab.fast.host_experts: host-computed experts that agree with the device's to the last bit mostly) */
int moe_bf16_rounded(const uint16_t *h, const uint16_t *gate, const uint16_t *up, const uint16_t *down,
                     const int64_t *ids, const void *wv, float *out, int A, int I, int D, int E, int threads, int wbf) {
    for (int a = 0; a < A; a++) if (ids[a] < 0 || ids[a] >= E) return -1;
    float wts[A];
    for (int a = 0; a < A; a++) wts[a] = wbf ? bf2f(((const uint16_t *)wv)[a]) : ((const float *)wv)[a];
    uint16_t act[A * I];
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < A * I; r++) {
            int a = r / I, i = r % I;
            int64_t off = (ids[a] * (int64_t)I + i) * D;
            float g = bf2f(f2bf(dot_bf16(gate + off, h, D))), u = bf2f(f2bf(dot_bf16(up + off, h, D)));
            act[r] = f2bf(bf2f(f2bf(silu(g))) * u);
        }
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int d0 = (int)((int64_t)D * t / nt), d1 = (int)((int64_t)D * (t + 1) / nt);
        for (int d = d0; d < d1; d++) out[d] = 0.f;
        for (int a = 0; a < A; a++) {
            const uint16_t *base = down + ids[a] * (int64_t)D * I;
            for (int d = d0; d < d1; d++) out[d] += wts[a] * bf2f(f2bf(dot_bf16(base + (int64_t)d * I, act + a * I, I)));
        }
    }
    return 0;
}

int moe_f32(const float *h, const float *gate, const float *up, const float *down,
            const int64_t *ids, const void *wv, float *out, int A, int I, int D, int E, int threads, int wbf) {
    for (int a = 0; a < A; a++) if (ids[a] < 0 || ids[a] >= E) return -1;
    float wts[A];
    for (int a = 0; a < A; a++) wts[a] = wbf ? bf2f(((const uint16_t *)wv)[a]) : ((const float *)wv)[a];
    float act[A * I];
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < A * I; r++) {
            int a = r / I, i = r % I;
            int64_t off = (ids[a] * (int64_t)I + i) * D;
            act[r] = silu(dot_f32(gate + off, h, D)) * dot_f32(up + off, h, D);
        }
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int d0 = (int)((int64_t)D * t / nt), d1 = (int)((int64_t)D * (t + 1) / nt);
        for (int d = d0; d < d1; d++) out[d] = 0.f;
        for (int a = 0; a < A; a++) {
            const float *base = down + ids[a] * (int64_t)D * I;
            for (int d = d0; d < d1; d++) out[d] += wts[a] * dot_f32(base + (int64_t)d * I, act + a * I, I);
        }
    }
    return 0;
}

/* A few tokens (a short prompt) through their experts: h [N, D], ids/wts [N, A]; out [N, D] float32. The
   (token, expert) pairs are grouped by expert, so each expert row is read once for all its tokens; each token's
   sum runs over its experts in ascending id. Returns 0, -1 for an id outside 0..E-1, -2 when out of memory. */
int moe_tokens(const void *h, const void *gate, const void *up, const void *down, const int64_t *ids,
               const float *wts, float *out, int N, int A, int I, int D, int E, int threads, int dt) {
    int P = N * A;
    for (int p = 0; p < P; p++) if (ids[p] < 0 || ids[p] >= E) return -1;
    int *start = calloc(E + 1, sizeof(int)), *pair = malloc(P * sizeof(int)), *fill = calloc(E, sizeof(int));
    int *used = malloc(E * sizeof(int));
    void *act = malloc((size_t)P * I * (dt ? 2 : 4));
    if (!start || !pair || !fill || !used || !act) { free(start); free(pair); free(fill); free(used); free(act); return -2; }
    for (int p = 0; p < P; p++) start[ids[p] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    for (int p = 0; p < P; p++) { int e = (int)ids[p]; pair[start[e] + fill[e]++] = p; }   /* ascending token */
    int U = 0;
    for (int e = 0; e < E; e++) if (start[e + 1] > start[e]) used[U++] = e;
    size_t es = dt ? 2 : 4;
    #pragma omp parallel num_threads(threads) if(threads > 1)
    {
        #pragma omp for schedule(static)
        for (int r = 0; r < U * I; r++) {
            int e = used[r / I], i = r % I;
            int64_t off = ((int64_t)e * I + i) * D;
            for (int j = start[e]; j < start[e + 1]; j++) {
                int p = pair[j], n = p / A;
                if (dt) {
                    float g = dot_bf16((const uint16_t *)gate + off, (const uint16_t *)h + (int64_t)n * D, D);
                    float u = dot_bf16((const uint16_t *)up + off, (const uint16_t *)h + (int64_t)n * D, D);
                    ((uint16_t *)act)[(int64_t)j * I + i] = f2bf(silu(g) * u);
                } else {
                    float g = dot_f32((const float *)gate + off, (const float *)h + (int64_t)n * D, D);
                    float u = dot_f32((const float *)up + off, (const float *)h + (int64_t)n * D, D);
                    ((float *)act)[(int64_t)j * I + i] = silu(g) * u;
                }
            }
        }
        #pragma omp for schedule(static)
        for (int d = 0; d < D; d++) {
            for (int n = 0; n < N; n++) out[(int64_t)n * D + d] = 0.f;
            for (int u = 0; u < U; u++) {
                int e = used[u];
                int64_t row = ((int64_t)e * D + d) * I;
                for (int j = start[e]; j < start[e + 1]; j++) {
                    int p = pair[j];
                    float y = dt ? dot_bf16((const uint16_t *)down + row, (const uint16_t *)act + (int64_t)j * I, I)
                                 : dot_f32((const float *)down + row, (const float *)act + (int64_t)j * I, I);
                    out[(int64_t)(p / A) * D + d] += wts[p] * y;
                }
            }
        }
    }
    (void)es;
    free(start); free(pair); free(fill); free(used); free(act);
    return 0;
}

/* -- the rest of a one-token layer: norms, rotary, attention over the cache, the router ----------------------
   dt: 1 bf16, 0 float32 for every tensor argument. Rounding as torch's ops on that dtype: float32 math inside,
   each op's result rounded to the dtype once. */
static inline float ld(const void *p, int64_t i, int dt) { return dt ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i]; }
static inline void st(void *p, int64_t i, float v, int dt) { if (dt) ((uint16_t *)p)[i] = f2bf(v); else ((float *)p)[i] = v; }
static inline float rnd(float v, int dt) { return dt ? bf2f(f2bf(v)) : v; }

/* out[r] = w[r % wrows] * rms_norm(x[r]) over C columns, R rows (bf16: the normed row rounded, then times w) */
void rms_norm_rows(const void *x, const void *w, void *out, int R, int C, int wrows, float eps, int dt) {
    for (int r = 0; r < R; r++) {
        float ss = 0.f;
        for (int c = 0; c < C; c++) { float v = ld(x, (int64_t)r * C + c, dt); ss += v * v; }
        float inv = 1.f / sqrtf(ss / C + eps);
        int64_t wr = (int64_t)(r % wrows) * C;
        for (int c = 0; c < C; c++)
            st(out, (int64_t)r * C + c, ld(w, wr + c, dt) * rnd(ld(x, (int64_t)r * C + c, dt) * inv, dt), dt);
    }
}

/* out[r] = x[r] @ M ([R, n] times [n, n]) */
void rows_matmul(const void *x, const void *M, void *out, int R, int n, int dt) {
    float m[n * n], acc[n];
    for (int i = 0; i < n * n; i++) m[i] = ld(M, i, dt);
    for (int r = 0; r < R; r++) {
        for (int j = 0; j < n; j++) acc[j] = 0.f;
        for (int i = 0; i < n; i++) {
            float xi = ld(x, (int64_t)r * n + i, dt);
            if (xi != 0.f) for (int j = 0; j < n; j++) acc[j] += xi * m[i * n + j];
        }
        for (int j = 0; j < n; j++) st(out, (int64_t)r * n + j, acc[j], dt);
    }
}

/* One query token, every cache slot 0..S-1: q head h (stride qs) reads kv head h / (H/K) (k/v head stride ks,
   slot stride hd); out [H, hd] contiguous. softmax(q.k * scale) in float32; probabilities rounded to the dtype
   before they weight v (as torch's bf16 attention does). */
void attend_one(const void *q, const void *k, const void *v, void *out, int H, int K, int S, int hd,
                int64_t qs, int64_t ks, float scale, int dt) {
    float p[S], acc[hd];
    int g = H / K;
    for (int h = 0; h < H; h++) {
        int64_t kh = (int64_t)(h / g) * ks;
        float mx = -INFINITY;
        for (int s = 0; s < S; s++) {
            float a = dt ? dot_bf16((const uint16_t *)k + kh + (int64_t)s * hd, (const uint16_t *)q + h * qs, hd)
                         : dot_f32((const float *)k + kh + (int64_t)s * hd, (const float *)q + h * qs, hd);
            p[s] = a * scale;
            if (p[s] > mx) mx = p[s];
        }
        float sum = 0.f;
        for (int s = 0; s < S; s++) { p[s] = expf(p[s] - mx); sum += p[s]; }
        for (int j = 0; j < hd; j++) acc[j] = 0.f;
        if (dt) {
            const uint16_t *vb = (const uint16_t *)v + kh;
            for (int s = 0; s < S; s++) {
                float ps = bf2f(f2bf(p[s] / sum));
                #pragma omp simd
                for (int j = 0; j < hd; j++) acc[j] += ps * bf2f(vb[(int64_t)s * hd + j]);
            }
            for (int j = 0; j < hd; j++) ((uint16_t *)out)[(int64_t)h * hd + j] = f2bf(acc[j]);
        } else {
            const float *vf = (const float *)v + kh;
            for (int s = 0; s < S; s++) {
                float ps = p[s] / sum;
                #pragma omp simd
                for (int j = 0; j < hd; j++) acc[j] += ps * vf[(int64_t)s * hd + j];
            }
            for (int j = 0; j < hd; j++) ((float *)out)[(int64_t)h * hd + j] = acc[j];
        }
    }
}

/* One token's q, k, v from the normed input h [D]: the projections wq [H*hd, D], wk/wv [K*hd, D] (rows split
   over threads), each q and k head RMS-normed with its row of qkn [H+K, hd] and rotated by R [hd, hd]; q to
   qout [H, hd], k and v into cache slot `slot` of kc/vc (kv head stride cs, slot stride hd). Each op's result
   rounded to the dtype, as `step.qkv` + `step.kv_write` do. */
void project_one(const void *h, const void *wq, const void *wk, const void *wv, const void *qkn, const void *R,
                 void *qout, void *kc, void *vc, int D, int H, int K, int hd, int64_t cs, int slot, float eps,
                 int dt, int threads) {
    int nq = H * hd, nk = K * hd, n = nq + 2 * nk;
    float raw[n];
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
    for (int r = 0; r < n; r++) {
        const void *w = r < nq ? wq : (r < nq + nk ? wk : wv);
        int64_t row = r < nq ? r : (r < nq + nk ? r - nq : r - nq - nk);
        float a = dt ? dot_bf16((const uint16_t *)w + row * D, (const uint16_t *)h, D)
                     : dot_f32((const float *)w + row * D, (const float *)h, D);
        raw[r] = rnd(a, dt);
    }
    float m[hd * hd], x[hd];
    for (int i = 0; i < hd * hd; i++) m[i] = ld(R, i, dt);
    for (int head = 0; head < H + K; head++) {            /* q heads, then k heads */
        float *src = raw + (int64_t)head * hd, ss = 0.f;
        for (int j = 0; j < hd; j++) ss += src[j] * src[j];
        float inv = 1.f / sqrtf(ss / hd + eps);
        for (int j = 0; j < hd; j++) x[j] = rnd(ld(qkn, (int64_t)head * hd + j, dt) * rnd(src[j] * inv, dt), dt);
        float acc[hd];
        for (int j = 0; j < hd; j++) acc[j] = 0.f;
        for (int i = 0; i < hd; i++) {
            float xi = x[i];
            if (xi != 0.f) for (int j = 0; j < hd; j++) acc[j] += xi * m[i * hd + j];
        }
        if (head < H) for (int j = 0; j < hd; j++) st(qout, (int64_t)head * hd + j, acc[j], dt);
        else for (int j = 0; j < hd; j++) st(kc, (head - H) * cs + (int64_t)slot * hd + j, acc[j], dt);
    }
    for (int kh = 0; kh < K; kh++)
        for (int j = 0; j < hd; j++) st(vc, kh * cs + (int64_t)slot * hd + j, raw[nq + nk + kh * hd + j], dt);
}

/* The router of one token: logits [E] (rounded to the dtype) = W [E, D] @ h, float32 softmax, top-A in
   descending order (the lower id first among equals), renormalised when renorm; weights rounded to the dtype. */
void route_one(const void *h, const void *W, void *logits, int64_t *ids, void *wts, int E, int D, int A,
               int renorm, int dt) {
    float l[E], pr[E];
    for (int e = 0; e < E; e++) {
        float a = dt ? dot_bf16((const uint16_t *)W + (int64_t)e * D, (const uint16_t *)h, D)
                     : dot_f32((const float *)W + (int64_t)e * D, (const float *)h, D);
        st(logits, e, a, dt);
        l[e] = rnd(a, dt);
    }
    float mx = -INFINITY, sum = 0.f;
    for (int e = 0; e < E; e++) if (l[e] > mx) mx = l[e];
    for (int e = 0; e < E; e++) { pr[e] = expf(l[e] - mx); sum += pr[e]; }
    for (int e = 0; e < E; e++) pr[e] /= sum;
    float top[A], tsum = 0.f;
    for (int a = 0; a < A; a++) {
        int best = -1;
        for (int e = 0; e < E; e++) if (pr[e] >= 0.f && (best < 0 || pr[e] > pr[best])) best = e;
        ids[a] = best; top[a] = pr[best]; tsum += top[a]; pr[best] = -1.f;
    }
    for (int a = 0; a < A; a++) st(wts, a, renorm ? top[a] / tsum : top[a], dt);
}

/* One decode token through one whole layer, as the CPU kernel set composes it (step.layer with step.CPU):
   h1 = rms_norm(x, ln1); q, k, v = project_one(h1) (k, v written at `slot`); y = attend_one(q, cache 0..slot);
   x1 = x + linear(y, wo); h2 = rms_norm(x1, ln2); logits, ids, wts = route_one(h2); out = x1 + moe(h2)
   rounded to the dtype. The very same functions in the same order, each with the thread count the Python
   wrappers give it (threads when its weights have at least min_par elements): bit-equal to the composition.
   xout [D] the layer's output; logits [E], ids [A], wts [A] the routing (for a recorder). Returns moe's code. */
static inline int thr(int64_t n, int threads, int64_t min_par) { return n >= min_par ? threads : 1; }

int layer_one(const void *x, void *xout, const void *ln1, const void *wq, const void *wk, const void *wv,
              const void *qkn, const void *wo, const void *ln2, const void *router, const void *gate,
              const void *up, const void *down, const void *R, void *kc, void *vc, void *logits, int64_t *ids,
              void *wts, int D, int H, int K, int hd, int64_t cs, int slot, int E, int A, int I, int renorm,
              float eps, float scale, int dt, int threads, int64_t min_par) {
    size_t es = dt ? 2 : 4;
    int nq = H * hd;
    char h1[D * es], q[nq * es], y[nq * es], o[D * es], x1[D * es], h2[D * es];
    float mo[D];
    rms_norm_rows(x, ln1, h1, 1, D, 1, eps, dt);
    project_one(h1, wq, wk, wv, qkn, R, q, kc, vc, D, H, K, hd, cs, slot, eps, dt,
                thr((int64_t)(H + 2 * K) * hd * D, threads, min_par));
    attend_one(q, kc, vc, y, H, K, slot + 1, hd, hd, cs, scale, dt);
    int tl = thr((int64_t)D * nq, threads, min_par);
    if (dt) linear_bf16((const uint16_t *)y, (const uint16_t *)wo, (uint16_t *)o, 1, D, nq, tl);
    else linear_f32((const float *)y, (const float *)wo, (float *)o, 1, D, nq, tl);
    for (int i = 0; i < D; i++) st(x1, i, ld(x, i, dt) + ld(o, i, dt), dt);
    rms_norm_rows(x1, ln2, h2, 1, D, 1, eps, dt);
    route_one(h2, router, logits, ids, wts, E, D, A, renorm, dt);
    int tm = thr((int64_t)3 * A * I * D, threads, min_par);
    int rc = dt ? moe_bf16((const uint16_t *)h2, gate, up, down, ids, wts, mo, A, I, D, E, tm, 1)
                : moe_f32((const float *)h2, gate, up, down, ids, wts, mo, A, I, D, E, tm, 0);
    for (int i = 0; i < D; i++) st(xout, i, ld(x1, i, dt) + rnd(mo[i], dt), dt);
    return rc;
}

/* layer_one's arguments in one struct: a decode step fills in the few that change (x, out, rotation, cache,
   slot) and passes one pointer, instead of converting 34 arguments per layer and token (ctypes: ~0.15 us each) */
typedef struct {
    const void *x; void *xout; const void *ln1, *wq, *wk, *wv, *qkn, *wo, *ln2, *router, *gate, *up, *down, *R;
    void *kc, *vc, *logits; int64_t *ids; void *wts;
    int64_t D, H, K, hd, cs, slot, E, A, I, renorm, dt, threads, min_par;
    double eps, scale;
} LayerArgs;

int layer_run(const LayerArgs *a) {
    return layer_one(a->x, a->xout, a->ln1, a->wq, a->wk, a->wv, a->qkn, a->wo, a->ln2, a->router, a->gate, a->up,
                     a->down, a->R, a->kc, a->vc, a->logits, a->ids, a->wts, (int)a->D, (int)a->H, (int)a->K,
                     (int)a->hd, a->cs, (int)a->slot, (int)a->E, (int)a->A, (int)a->I, (int)a->renorm,
                     (float)a->eps, (float)a->scale, (int)a->dt, (int)a->threads, a->min_par);
}
"""
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
ISA = {2: "AVX-512 BF16 (vdpbf16ps) and AVX-512F FMA", 1: "AVX-512F FMA (no AVX-512 BF16: bf16 rows widened in C)",
       0: "portable C vectorised by the compiler (no AVX-512)"}


class KernelError(Q3LabError):
    """The CPU kernels cannot be built or were given tensors they do not handle."""


class LayerArgs(ctypes.Structure):
    """layer_one's arguments (the C struct of the same name, field for field)."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "xout", "ln1", "wq", "wk", "wv", "qkn", "wo", "ln2", "router",
                                                 "gate", "up", "down", "R", "kc", "vc", "logits", "ids", "wts")]
                + [(n, ctypes.c_int64) for n in ("D", "H", "K", "hd", "cs", "slot", "E", "A", "I", "renorm", "dt",
                                                  "threads", "min_par")]
                + [("eps", ctypes.c_double), ("scale", ctypes.c_double)])


_LIB: ctypes.CDLL | None = None
# Below this many weight elements a call runs on one thread: an OpenMP fork/join costs a few microseconds
# idle and a scheduler time slice (milliseconds) when another process holds the second core, which the data
# of a small matrix does not repay (data/mini's 48 layers of 96-wide matrices ran 8x slower threaded).
PARALLEL_MIN_ELEMENTS = 1 << 18


def _threads(elements: int) -> int:
    return torch.get_num_threads() if elements >= PARALLEL_MIN_ELEMENTS else 1


def _machine() -> str:
    """What -march=native compiles for: a library built on another CPU (a shared home) must not be reused."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() + platform.machine()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelError("q3lab.kernels.cpu needs a C compiler (cc or gcc on PATH, or $CC): none found")
    tag = hashlib.sha256((SOURCE + " ".join(FLAGS) + cc + _machine()).encode()).hexdigest()[:16]
    where = Path(os.environ.get("Q3LAB_KERNEL_DIR", Path.home() / ".cache" / "q3lab" / "kernels"))
    lib = where / f"cpu_kernels-{tag}.so"
    try:
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
    except OSError as e:
        raise KernelError(f"building or loading {lib} failed: {e} (set Q3LAB_KERNEL_DIR to a writable folder)") from e
    vp, ci = ctypes.c_void_p, ctypes.c_int
    dll.linear_bf16.argtypes = dll.linear_f32.argtypes = [vp, vp, vp, ci, ci, ci, ci]
    dll.linear_bf16.restype = dll.linear_f32.restype = None
    dll.moe_bf16.argtypes = dll.moe_f32.argtypes = dll.moe_bf16_rounded.argtypes = [vp] * 7 + [ci] * 6
    dll.moe_bf16.restype = dll.moe_f32.restype = dll.moe_bf16_rounded.restype = ci
    dll.q3_isa.restype = ci
    dll.moe_tokens.argtypes = [vp] * 7 + [ci] * 7
    dll.moe_tokens.restype = ci
    fl, i64 = ctypes.c_float, ctypes.c_int64
    dll.rms_norm_rows.argtypes = [vp, vp, vp, ci, ci, ci, fl, ci]
    dll.rows_matmul.argtypes = [vp, vp, vp, ci, ci, ci]
    dll.attend_one.argtypes = [vp, vp, vp, vp, ci, ci, ci, ci, i64, i64, fl, ci]
    dll.route_one.argtypes = [vp, vp, vp, vp, vp, ci, ci, ci, ci, ci]
    dll.project_one.argtypes = [vp] * 9 + [ci] * 4 + [i64, ci, fl, ci, ci]
    dll.layer_one.argtypes = [vp] * 19 + [ci] * 4 + [i64] + [ci] * 5 + [fl, fl, ci, ci, i64]
    dll.layer_one.restype = ci
    dll.layer_run.argtypes = [ctypes.POINTER(LayerArgs)]
    dll.layer_run.restype = ci
    for f in (dll.rms_norm_rows, dll.rows_matmul, dll.attend_one, dll.route_one, dll.project_one):
        f.restype = None
    return dll


def lib() -> ctypes.CDLL:
    """The compiled kernels (built on first use)."""
    global _LIB
    if _LIB is None:
        _LIB = _build()
    return _LIB


def isa() -> str:
    """Which inner loops the built library runs (AVX-512 BF16, AVX-512F or portable C)."""
    return ISA[(_LIB or lib()).q3_isa()]


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, dim: int) -> None:
    if t.dtype != dtype or t.dim() != dim or not t.is_contiguous() or not t.is_cpu:
        raise KernelError(f"{name}: expected a contiguous {dim}-D {dtype} CPU tensor, got {t.dim()}-D {t.dtype} "
                          f"on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")


DTYPES = (torch.bfloat16, torch.float32)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in w's dtype (bf16 or float32): float32 accumulation, one rounding (F.linear
    for a decode row or a short prompt; each weight row is read once for all M rows)."""
    dt = w.dtype
    if dt not in DTYPES:
        raise KernelError(f"linear: w is {dt}; the CPU kernels take bf16 or float32")
    _check(x, "x", dt, 2)
    _check(w, "w", dt, 2)
    N, K = w.shape
    M = x.shape[0]
    if x.shape[1] != K or M == 0:
        raise KernelError(f"linear: x {list(x.shape)} and w {list(w.shape)}: expected [M, K] and [N, K]")
    y = torch.empty(M, N, dtype=dt)
    fn = (_LIB or lib()).linear_bf16 if dt == torch.bfloat16 else (_LIB or lib()).linear_f32
    fn(x.data_ptr(), w.data_ptr(), y.data_ptr(), M, N, K, _threads(N * K))
    return y


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ w[N, K].T -> [1, N], all bf16, float32 accumulation (F.linear for one decode row)."""
    _check(w, "w", torch.bfloat16, 2)
    return linear(x, w)


# -- float32 GEMMs of many rows (a prefill) ---------------------------------------------------------------
# torch's float32 F.linear on the CPU calls MKL's sgemm, which on this AMD CPU runs its AVX2 code (~200 GFLOP/s on
# 2 cores); oneDNN, which torch also ships (and uses for bf16), dispatches on the ISA and runs AVX-512: 380-500
# GFLOP/s on the same shapes (bench/NOTES.md, issue 21 v3). Same float32 math, sums in another order.
_ONEDNN: list = []   # [op] once found, [None] once refused (the reason warned once)


def _onednn():
    if not _ONEDNN:
        op, why = None, ""
        try:
            if not torch.backends.mkldnn.is_available():
                why = "this torch was built without oneDNN (mkldnn)"
            else:
                cand = torch.ops.mkldnn._linear_pointwise
                x, w = torch.ones(2, 3), torch.ones(4, 3)
                if torch.equal(cand(x, w, None, "none", [], ""), torch.full((2, 4), 3.0)):
                    op = cand
                else:
                    why = "torch.ops.mkldnn._linear_pointwise gave a wrong product"
        except (AttributeError, RuntimeError) as e:
            why = f"torch.ops.mkldnn._linear_pointwise is not usable: {e}"
        if op is None:
            import warnings
            warnings.warn(f"q3lab: float32 prefill GEMMs run on torch's F.linear (MKL, slower here): {why}",
                          RuntimeWarning, stacklevel=3)
        _ONEDNN.append(op)
    return _ONEDNN[0]


def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x [..., K], w [N, K]) in float32 (no bias) through oneDNN's matmul (`torch.ops.mkldnn.
    _linear_pointwise`): AVX-512 where torch's MKL sgemm runs AVX2. Where oneDNN is missing, F.linear (warned
    once). Any other dtype: F.linear."""
    op = _onednn() if x.dtype == torch.float32 else None
    if op is None or w.dtype != torch.float32 or x.requires_grad or w.requires_grad:
        import torch.nn.functional as F
        return F.linear(x, w)
    return op(x if x.is_contiguous() else x.contiguous(), w if w.is_contiguous() else w.contiguous(),
              None, "none", [], "")


def moe_decode(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One token's MoE output [1, D] in float32 from a layer's resident experts (gate/up [E, I, D], down [E, D, I],
    bf16 or float32, read in place) and its chosen experts `ids` (A of them, rank order, any shape) with routing
    `weights` (A, bf16 or float32):
    sum_a weights[a] * down[ids[a]] @ (silu(gate[ids[a]] @ h) * (up[ids[a]] @ h)), float32 sums; in bf16 the
    activation silu * up is rounded to bf16 once (as torch's bf16 experts round it)."""
    dt = gate.dtype
    if dt not in DTYPES:
        raise KernelError(f"moe_decode: experts are {dt}; the CPU kernels take bf16 or float32")
    _check(h, "h", dt, 2)
    for t, n in ((gate, "gate"), (up, "up"), (down, "down")):
        _check(t, n, dt, 3)
    E, I, D = gate.shape
    if h.shape != (1, D) or up.shape != (E, I, D) or down.shape != (E, D, I):
        raise KernelError(f"moe_decode: h {list(h.shape)}, gate {list(gate.shape)}, up {list(up.shape)}, "
                          f"down {list(down.shape)}: expected [1, D], [E, I, D], [E, I, D], [E, D, I]")
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    if weights.dtype not in DTYPES or not weights.is_contiguous():
        weights = weights.to(torch.float32).contiguous()
    A = ids.numel()
    if weights.numel() != A or A == 0:
        raise KernelError(f"moe_decode: {A} expert ids but {weights.numel()} weights")
    out = torch.empty(1, D, dtype=torch.float32)
    fn = (_LIB or lib()).moe_bf16 if dt == torch.bfloat16 else (_LIB or lib()).moe_f32
    rc = fn(h.data_ptr(), gate.data_ptr(), up.data_ptr(), down.data_ptr(), ids.data_ptr(), weights.data_ptr(),
            out.data_ptr(), A, I, D, E, _threads(3 * A * I * D), int(weights.dtype == torch.bfloat16))
    if rc:   # the C code checks the ids before it reads any expert
        raise KernelError(f"moe_decode: expert ids {ids.tolist()} outside 0..{E - 1}")
    return out


def moe_tokens(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`moe_decode` for a few tokens h [N, D], ids/weights [N, A]: [N, D] float32, the (token, expert) pairs
    grouped by expert so that each chosen expert's rows are read once (a short prompt's prefill)."""
    dt = gate.dtype
    if dt not in DTYPES:
        raise KernelError(f"moe_tokens: experts are {dt}; the CPU kernels take bf16 or float32")
    _check(h, "h", dt, 2)
    for t, n in ((gate, "gate"), (up, "up"), (down, "down")):
        _check(t, n, dt, 3)
    E, I, D = gate.shape
    N = h.shape[0]
    if h.shape[1] != D or up.shape != (E, I, D) or down.shape != (E, D, I) or ids.shape != weights.shape \
            or ids.dim() != 2 or ids.shape[0] != N:
        raise KernelError(f"moe_tokens: h {list(h.shape)}, gate {list(gate.shape)}, up {list(up.shape)}, down "
                          f"{list(down.shape)}, ids {list(ids.shape)}, weights {list(weights.shape)}: expected "
                          f"[N, D], [E, I, D], [E, I, D], [E, D, I], [N, A], [N, A]")
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty(N, D, dtype=torch.float32)
    rc = (_LIB or lib()).moe_tokens(h.data_ptr(), gate.data_ptr(), up.data_ptr(), down.data_ptr(), ids.data_ptr(),
                          weights.data_ptr(), out.data_ptr(), N, ids.shape[1], I, D, E,
                          _threads(3 * ids.numel() * I * D), int(dt == torch.bfloat16))
    if rc == -1:
        raise KernelError(f"moe_tokens: expert ids outside 0..{E - 1}: {sorted(set(ids.flatten().tolist()))}")
    if rc:
        raise KernelError(f"moe_tokens: out of memory for {ids.numel()} x {I} activations")
    return out


def moe_decode_bf16(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`moe_decode` on bf16 experts, rounded once to bf16: [1, D]."""
    _check(gate, "gate", torch.bfloat16, 3)
    return moe_decode(h, gate, up, down, ids, weights).to(torch.bfloat16)


def _dt(t: torch.Tensor, name: str) -> int:
    if t.dtype not in DTYPES or t.device.type != "cpu":
        raise KernelError(f"{name}: expected a bf16 or float32 CPU tensor, got {t.dtype} on {t.device}")
    return int(t.dtype == torch.bfloat16)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`step.rms_norm` of a few contiguous rows x [..., C] with weight [C] or one row per head [R', C] (row r of x
    takes weight row r % R'), x and weight in one dtype."""
    dt = _dt(x, "x")
    if weight.dtype != x.dtype or not x.is_contiguous() or not weight.is_contiguous():
        raise KernelError(f"rms_norm_rows: x {x.dtype} and weight {weight.dtype} must be contiguous, one dtype")
    C = x.shape[-1]
    wrows = 1 if weight.dim() == 1 else weight.shape[0]
    if weight.shape[-1] != C:
        raise KernelError(f"rms_norm_rows: x {list(x.shape)} and weight {list(weight.shape)}: last dims differ")
    out = torch.empty_like(x)
    (_LIB or lib()).rms_norm_rows(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // C, C, wrows, eps, dt)
    return out


def rows_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [..., n] @ m [n, n] (the one-token rotary matrix), one dtype, float32 sums."""
    dt = _dt(x, "x")
    n = x.shape[-1]
    if m.dtype != x.dtype or m.shape != (n, n) or not x.is_contiguous() or not m.is_contiguous():
        raise KernelError(f"rows_matmul: x {list(x.shape)} {x.dtype} and m {list(m.shape)} {m.dtype}: expected "
                          f"contiguous [..., n] and [n, n] of one dtype")
    out = torch.empty_like(x)
    (_LIB or lib()).rows_matmul(x.data_ptr(), m.data_ptr(), out.data_ptr(), x.numel() // n, n, dt)
    return out


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token over every slot of k/v: q [1, H, 1, hd], k/v [1, K, S, hd] (each slot's row contiguous,
    as a KV cache's narrow view is) -> [1, H, 1, hd]; float32 softmax (sdpa without a mask)."""
    dt = _dt(q, "q")
    _, H, T, hd = q.shape
    _, K, S, _ = k.shape
    if (T != 1 or q.shape[0] != 1 or k.shape != v.shape or k.shape[0] != 1 or k.shape[3] != hd or H % K
            or k.dtype != q.dtype or v.dtype != q.dtype or q.stride(3) != 1 or k.stride(3) != 1
            or k.stride(2) != hd or k.stride() != v.stride()):
        raise KernelError(f"attend_one: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}: expected one "
                          f"token [1, H, 1, hd] and [1, K, S, hd] caches of one dtype with rows contiguous")
    out = torch.empty(1, H, 1, hd, dtype=q.dtype)
    (_LIB or lib()).attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), H, K, S, hd, q.stride(1),
                     k.stride(1), scale, dt)
    return out


def project_one(h: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, qk_norm: torch.Tensor,
                rot: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slot: int, eps: float) -> torch.Tensor:
    """`step.qkv` + `step.kv_write` for one token: h [1, 1, D] normed; wq [H*hd, D], wk/wv [K*hd, D]; qk_norm
    [H+K, hd]; rot the rotation matrix [hd, hd]; kc/vc one layer's cache [1, K, max_len, hd] (k and v written
    at `slot`). Returns q [1, H, 1, hd]."""
    dt = _dt(h, "h")
    D = h.shape[-1]
    K, L, hd = kc.shape[1], kc.shape[2], kc.shape[3]
    H = wq.shape[0] // hd
    if (not (h.dtype == wq.dtype == wk.dtype == wv.dtype == qk_norm.dtype == rot.dtype == kc.dtype == vc.dtype)
            or not (h.is_contiguous() and wq.is_contiguous() and wk.is_contiguous() and wv.is_contiguous()
                    and qk_norm.is_contiguous() and rot.is_contiguous() and kc.is_contiguous() and vc.is_contiguous())
            or h.numel() != D or kc.shape != vc.shape
            or kc.shape[0] != 1 or wq.shape != (H * hd, D) or wk.shape != (K * hd, D) or wv.shape != wk.shape
            or qk_norm.shape != (H + K, hd) or rot.shape != (hd, hd) or not 0 <= slot < L):
        raise KernelError(f"project_one: h {list(h.shape)}, wq {list(wq.shape)}, wk {list(wk.shape)}, wv "
                          f"{list(wv.shape)}, qk_norm {list(qk_norm.shape)}, rot {list(rot.shape)}, cache "
                          f"{list(kc.shape)} slot {slot}: expected contiguous tensors of one dtype, [1, 1, D], "
                          f"[H*hd, D], [K*hd, D], [H+K, hd], [hd, hd], [1, K, max_len, hd]")
    q = torch.empty(1, H, 1, hd, dtype=h.dtype)
    (_LIB or lib()).project_one(h.data_ptr(), wq.data_ptr(), wk.data_ptr(), wv.data_ptr(), qk_norm.data_ptr(), rot.data_ptr(),
                      q.data_ptr(), kc.data_ptr(), vc.data_ptr(), D, H, K, hd, L * hd, slot, eps, dt,
                      _threads((H + 2 * K) * hd * D))
    return q


def layer_one(x: torch.Tensor, ln1: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
              qk_norm: torch.Tensor, wo: torch.Tensor, ln2: torch.Tensor, router: torch.Tensor, gate: torch.Tensor,
              up: torch.Tensor, down: torch.Tensor, rot: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slot: int,
              A: int, renorm: bool, eps: float, check_only: bool = False):
    """One decode token x [1, 1, D] through a whole layer in one call: the composition `step.layer` runs on the
    CPU set (rms_norm, project_one with the cache write at `slot`, attend_one over slots 0..slot, o projection +
    residual, rms_norm, route_one, moe_decode + residual), bit-equal to it. The weights as in `project_one` /
    `route_one` / `moe_decode` (one dtype, contiguous; experts [E, I, D] / [E, D, I] read in place). Returns
    (x out [1, 1, D], logits [1, E], ids [1, A] int64, weights [1, A]); check_only: only check, return None
    (`LayerCall`)."""
    dt = _dt(x, "x")
    D = x.shape[-1]
    E, I = gate.shape[0], gate.shape[1]
    K, L, hd = kc.shape[1], kc.shape[2], kc.shape[3]
    H = wq.shape[0] // hd
    ts = (x, ln1, wq, wk, wv, qk_norm, wo, ln2, router, gate, up, down, rot, kc, vc)
    if (any(t.dtype != x.dtype or not t.is_contiguous() for t in ts) or x.numel() != D
            or wq.shape != (H * hd, D) or wk.shape != (K * hd, D) or wv.shape != wk.shape or wo.shape != (D, H * hd)
            or qk_norm.shape != (H + K, hd) or rot.shape != (hd, hd) or kc.shape != vc.shape or kc.shape[0] != 1
            or router.shape != (E, D) or gate.shape != (E, I, D) or up.shape != gate.shape
            or down.shape != (E, D, I) or ln1.shape != (D,) or ln2.shape != (D,) or not 0 <= slot < L
            or not 0 < A <= E):
        raise KernelError(f"layer_one: x {list(x.shape)}, wq {list(wq.shape)}, wk {list(wk.shape)}, wo "
                          f"{list(wo.shape)}, router {list(router.shape)}, experts {list(gate.shape)}/"
                          f"{list(down.shape)}, cache {list(kc.shape)} slot {slot}: expected contiguous tensors of "
                          f"one dtype, [1, 1, D], [H*hd, D], [K*hd, D], [D, H*hd], [E, D], [E, I, D]/[E, D, I], "
                          f"[1, K, max_len, hd]")
    if check_only:
        return None
    out = torch.empty_like(x)
    logits = torch.empty(1, E, dtype=x.dtype)
    ids = torch.empty(1, A, dtype=torch.int64)
    wts = torch.empty(1, A, dtype=x.dtype)
    rc = (_LIB or lib()).layer_one(
        x.data_ptr(), out.data_ptr(), ln1.data_ptr(), wq.data_ptr(), wk.data_ptr(), wv.data_ptr(),
        qk_norm.data_ptr(), wo.data_ptr(), ln2.data_ptr(), router.data_ptr(), gate.data_ptr(), up.data_ptr(),
        down.data_ptr(), rot.data_ptr(), kc.data_ptr(), vc.data_ptr(), logits.data_ptr(), ids.data_ptr(),
        wts.data_ptr(), D, H, K, hd, L * hd, slot, E, A, I, int(renorm), eps, hd ** -0.5, dt,
        torch.get_num_threads(), PARALLEL_MIN_ELEMENTS)
    if rc:
        raise KernelError(f"layer_one: the router chose expert ids {ids.tolist()} outside 0..{E - 1}")
    return out, logits, ids, wts


class LayerCall:
    """`layer_one` for one layer's fixed weights, checked once: `run(x, rot, kc, vc, slot)` per decode step checks
    only what changes and makes one ctypes call with one argument (~5 us a layer less than `layer_one` on a
    96-wide model, whose whole layer computes in a few us). The routing it returns is scratch: overwritten by the
    layer's next call (copy it to keep it)."""

    def __init__(self, ln1, wq, wk, wv, qk_norm, wo, ln2, router, gate, up, down, K: int, hd: int, A: int,
                 renorm: bool, eps: float):
        x = torch.empty(1, 1, wq.shape[1], dtype=wq.dtype)
        rot = torch.empty(hd, hd, dtype=wq.dtype)
        kc = torch.empty(1, K, 1, hd, dtype=wq.dtype)
        # every check of layer_one on the weights, once (a 1-slot cache stands for the real one)
        layer_one(x, ln1, wq, wk, wv, qk_norm, wo, ln2, router, gate, up, down, rot, kc, kc, 0, A, renorm, eps,
                  check_only=True)
        self.keep = (ln1, wq, wk, wv, qk_norm, wo, ln2, router, gate, up, down)   # the pointers stay valid
        self.dtype, self.D, self.K, self.hd, self.E = wq.dtype, wq.shape[1], K, hd, gate.shape[0]
        self.A = A
        self.logits = torch.empty(1, self.E, dtype=wq.dtype)
        self.ids = torch.empty(1, A, dtype=torch.int64)
        self.wts = torch.empty(1, A, dtype=wq.dtype)
        a = self.args = LayerArgs()
        for name, t in zip(("ln1", "wq", "wk", "wv", "qkn", "wo", "ln2", "router", "gate", "up", "down"), self.keep):
            setattr(a, name, t.data_ptr())
        a.logits, a.ids, a.wts = self.logits.data_ptr(), self.ids.data_ptr(), self.wts.data_ptr()
        a.D, a.H, a.K, a.hd, a.E, a.A, a.I = self.D, wq.shape[0] // hd, K, hd, self.E, A, gate.shape[1]
        a.renorm, a.dt, a.min_par = int(renorm), int(wq.dtype == torch.bfloat16), PARALLEL_MIN_ELEMENTS
        a.eps, a.scale = eps, hd ** -0.5
        self.ref = ctypes.byref(a)

    def run(self, x: torch.Tensor, rot: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slot: int):
        """(x out [1, 1, D], logits [1, E], ids [1, A], weights [1, A]) of one token x [1, 1, D] (see `layer_one`)."""
        dt, K, hd = self.dtype, self.K, self.hd
        L = kc.shape[2]
        if (x.dtype != dt or rot.dtype != dt or kc.dtype != dt or vc.dtype != dt or x.numel() != self.D
                or not (x.is_contiguous() and rot.is_contiguous() and kc.is_contiguous() and vc.is_contiguous())
                or rot.shape != (hd, hd) or kc.shape != (1, K, L, hd) or vc.shape != kc.shape or not 0 <= slot < L):
            raise KernelError(f"layer_one: x {list(x.shape)} {x.dtype}, rotation {list(rot.shape)}, cache "
                              f"{list(kc.shape)} {kc.dtype} slot {slot}: expected contiguous {dt} [1, 1, "
                              f"{self.D}], [{hd}, {hd}], [1, {K}, max_len, {hd}] with slot < max_len")
        out = torch.empty_like(x)
        a = self.args
        a.x, a.xout, a.R, a.kc, a.vc = x.data_ptr(), out.data_ptr(), rot.data_ptr(), kc.data_ptr(), vc.data_ptr()
        a.cs, a.slot, a.threads = L * hd, slot, torch.get_num_threads()
        if (_LIB or lib()).layer_run(self.ref):
            raise KernelError(f"layer_one: the router chose expert ids {self.ids.tolist()} outside 0..{self.E - 1}")
        return out, self.logits, self.ids, self.wts


def route_one(h: torch.Tensor, w: torch.Tensor, A: int, renorm: bool):
    """The router of one token h [1, D] with w [E, D]: (logits [1, E] in h's dtype, ids [1, A] int64 in
    descending order, weights [1, A] in h's dtype), as `step.route_torch`: float32 softmax of the rounded
    logits, top-A, renormalised when `renorm`."""
    dt = _dt(h, "h")
    E, D = w.shape
    if w.dtype != h.dtype or h.shape != (1, D) or not h.is_contiguous() or not w.is_contiguous() or not 0 < A <= E:
        raise KernelError(f"route_one: h {list(h.shape)} {h.dtype}, router {list(w.shape)} {w.dtype}, top-{A}")
    logits = torch.empty(1, E, dtype=h.dtype)
    ids = torch.empty(1, A, dtype=torch.int64)
    wts = torch.empty(1, A, dtype=h.dtype)
    (_LIB or lib()).route_one(h.data_ptr(), w.data_ptr(), logits.data_ptr(), ids.data_ptr(), wts.data_ptr(), E, D, A,
                    int(renorm), dt)
    return logits, ids, wts


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
    w32, gate32, up32, down32, h32 = w.float(), gate.float(), up.float(), down.float(), h.float()
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
            ("linear [1,D]x[D,D]", "q3lab linear bf16", lambda: linear(h, w), D * D * 2),
            ("linear [1,D]x[D,D]", "q3lab linear f32", lambda: linear(h32, w32), D * D * 4),
            (f"MoE {A} of {E} experts", "torch bf16 loop", lambda: torch_moe(h, gate, up, down), moe_bytes),
            (f"MoE {A} of {E} experts", "torch f32 loop", lambda: torch_moe(h.float(), gate32, up32, down32),
             2 * moe_bytes),
            (f"MoE {A} of {E} experts", "q3lab moe_decode_bf16",
             lambda: moe_decode(h, gate, up, down, ids, wt), moe_bytes),
            (f"MoE {A} of {E} experts", "q3lab moe_decode f32",
             lambda: moe_decode(h32, gate32, up32, down32, ids, wt), 2 * moe_bytes)]
    out = []
    for op, impl, fn, nbytes in rows:
        t = _time(fn, 50)
        out.append(dict(op=op, impl=impl, us=t * 1e6, GB_s=nbytes / t / 1e9))
    return pd.DataFrame(out)


if __name__ == "__main__":
    import sys
    print(micro(threads=int(sys.argv[1]) if len(sys.argv) > 1 else 2).to_string(index=False, float_format="%.1f"))
