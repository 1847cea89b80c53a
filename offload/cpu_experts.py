"""Routed experts computed on the host CPU, straight from the host store's FP8 (or bf16) slabs.

Why this kernel and not the candidates DESIGN.md lists: every Python-reachable int8 path needs a
second, re-quantised copy of the experts in host memory (as large as the FP8 slab) and loses
accuracy to it (torch `_weight_int8pack_mm` 1.6%, fbgemm 5%), while the bytes each expert moves
(what bounds batch-1 speed) are the same one byte per weight. This kernel reads the FP8 e4m3 bytes
and the fp32 128x128 block scales where the copies read them, converts 16 weights at a time to
fp32 in registers (e4m3 -> fp16 by a sign-extend, a shift and a mask, exact for every e4m3 value
incl. subnormals, then `vcvtph2ps`; the fp16 value is 2^-8 of the e4m3 value, folded into the
block scale) and accumulates in fp32 with FMAs in two chains per row and token; from 3 tokens on
each activation load serves two weight rows. All of a step's CPU experts run in one OpenMP
parallel region (three work-shared loops: gate/up rows, SiLU*up, down rows). Its only
error against the FP8 reference is fp32 rounding (~1e-6 relative): no re-quantisation at all.

The C source below is compiled once per machine (`gcc -O3 -march=native -fopenmp`, plus `$MOED_CPU_CFLAGS`) into
a cache folder and loaded with ctypes (calls release the GIL); AVX-512 is used where the CPU has it, a
plain loop otherwise. Without a C compiler `CpuExpertKernel` raises and the runner serves all
misses by copies.

Layout read (per expert, from host_store.py): w13 [2N, K] (gate rows, then up rows), w2 [K, N],
w13_scale [2N/bn, ceil(K/bk)], w2_scale [ceil(K/bn), N/bk] fp32.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moed.formats.fp8 import dequantize_block_fp8
from moed.offload.host_store import ExpertLayout

log = logging.getLogger(__name__)

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <time.h>
#include <pthread.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VEC 1
#endif

/* e4m3 byte -> fp32 equal to 2^-8 of its value (exact; the 2^8 is folded into the block scale). */
static inline float fp8_scalar(uint8_t b) {
    int e = (b >> 3) & 0xf, m = b & 7;
    float v = e ? ldexpf((float)(8 | m), e - 18) : ldexpf((float)m, -17);
    return (b & 0x80) ? -v : v;
}
static inline float bf16_scalar(uint16_t h) { union { uint32_t u; float f; } c; c.u = (uint32_t)h << 16; return c.f; }
static inline float w_scalar(const void* row, int c, int fp8) {
    return fp8 ? fp8_scalar(((const uint8_t*)row)[c]) : bf16_scalar(((const uint16_t*)row)[c]);
}

#ifdef VEC
/* 32 weights -> two fp32 vectors. e4m3: sign-extend to 16 bits, shift the 7 magnitude bits to 7..13 and
   clear bit 14: that is the fp16 of 2^-8 times the value, subnormals included; vcvtph2ps widens it. */
static inline __attribute__((always_inline)) void load32(const void* row, int c, int fp8, __m512* lo, __m512* hi) {
    if (fp8) {
        __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)((const uint8_t*)row + c)));
        w = _mm512_and_si512(_mm512_slli_epi16(w, 7), _mm512_set1_epi16((short)0xBFFF));
        *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
        *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
    } else {
        const uint16_t* p = (const uint16_t*)row + c;
        __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
        __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p + 16)));
        *lo = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
        *hi = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
    }
}
#endif

#define MB1 8
#define MB2 4
/* Software prefetch of the weight stream this many bytes ahead of the k-block being read (0: off). On the lent
   16-core host, batch 1, 8 GLM-5.1 experts: none 54 GB/s, 1 KiB 65, 2 KiB 74, 4 KiB 86; NTA hints were slower. */
#ifndef PF_DIST
#define PF_DIST 4096
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif
#ifdef VEC
#define PREFETCH(p, c) do { if (PF_DIST) { _mm_prefetch((const char*)(p) + (c) + PF_DIST, PF_HINT); \
                                            _mm_prefetch((const char*)(p) + (c) + PF_DIST + 64, PF_HINT); } } while (0)
#else
#define PREFETCH(p, c) do { } while (0)
#endif
/* Scalar tail of one row: columns [c, c1) of k-block, for MBC tokens; returns nothing, adds into acc. */
static inline __attribute__((always_inline)) void tail(const void* row, int c, int c1, const float* x, int ldx,
                                                       int m0, float* acc, const int MBC, const int FP8) {
    for (; c < c1; c++) {
        float wv = w_scalar(row, c, FP8);
        for (int i = 0; i < MBC; i++) acc[i] += wv * x[(size_t)(m0 + i) * ldx + c];
    }
}

/* One weight row r for tokens m0..m0+MBC-1 (MBC, FP8 compile-time constants in each inlined copy, so the
   accumulators stay in registers); two chains per token (even/odd 16 columns) hide the FMA latency.
   y[m, r] = sum_c W[r, c] * scale[r / bn, c / bk] * x[m, c]. Measured fastest at 1-2 tokens. */
static inline __attribute__((always_inline)) void rows1(
        const void* W, const float* scale, int r, int cols, int bn, int kblocks, int kb_len, size_t rb,
        const float* x, int ldx, int m0, float* y, int ldy, const int MBC, const int FP8, const int TAIL) {
    const void* row = (const uint8_t*)W + r * rb;
    float tot[MB1];
    for (int i = 0; i < MBC; i++) tot[i] = 0.0f;
#ifdef VEC
    __m512 vt[MB1];
    for (int i = 0; i < MBC; i++) vt[i] = _mm512_setzero_ps();
#endif
    for (int kb = 0; kb < kblocks; kb++) {
        int c = kb * kb_len, c1 = c + kb_len < cols ? c + kb_len : cols;
        float s = FP8 ? scale[(r / bn) * kblocks + kb] * 256.0f : 1.0f;
        PREFETCH(row, c * (FP8 ? 1 : 2));
#ifdef VEC
        __m512 a0[MB1], a1[MB1];
        for (int i = 0; i < MBC; i++) { a0[i] = _mm512_setzero_ps(); a1[i] = _mm512_setzero_ps(); }
        for (; c + 32 <= c1; c += 32) {
            __m512 w0, w1;
            load32(row, c, FP8, &w0, &w1);
            for (int i = 0; i < MBC; i++) {
                const float* xr = x + (size_t)(m0 + i) * ldx + c;
                a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a0[i]);
                a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a1[i]);
            }
        }
        __m512 vs = _mm512_set1_ps(s);
        for (int i = 0; i < MBC; i++) vt[i] = _mm512_fmadd_ps(_mm512_add_ps(a0[i], a1[i]), vs, vt[i]);
#endif
        if (TAIL) {
            float acc[MB1];
            for (int i = 0; i < MBC; i++) acc[i] = 0.0f;
            tail(row, c, c1, x, ldx, m0, acc, MBC, FP8);
            for (int i = 0; i < MBC; i++) tot[i] += acc[i] * s;
        }
    }
    for (int i = 0; i < MBC; i++) {
#ifdef VEC
        tot[i] += _mm512_reduce_add_ps(vt[i]);
#endif
        y[(size_t)(m0 + i) * ldy + r] = tot[i];
    }
}

/* Rows r and r+1 together: each activation load serves both rows (measured fastest from 3 tokens on). */
static inline __attribute__((always_inline)) void rows2(
        const void* W, const float* scale, int r, int cols, int bn, int kblocks, int kb_len, size_t rb,
        const float* x, int ldx, int m0, float* y, int ldy, const int MBC, const int FP8, const int TAIL) {
    const void* ra = (const uint8_t*)W + r * rb;
    const void* rbw = (const uint8_t*)W + (r + 1) * rb;
    float ta[MB2], tb[MB2];
    for (int i = 0; i < MBC; i++) ta[i] = tb[i] = 0.0f;
#ifdef VEC
    __m512 va[MB2], vb[MB2];
    for (int i = 0; i < MBC; i++) { va[i] = _mm512_setzero_ps(); vb[i] = _mm512_setzero_ps(); }
#endif
    for (int kb = 0; kb < kblocks; kb++) {
        int c = kb * kb_len, c1 = c + kb_len < cols ? c + kb_len : cols;
        float sa = FP8 ? scale[(r / bn) * kblocks + kb] * 256.0f : 1.0f;
        float sb = FP8 ? scale[((r + 1) / bn) * kblocks + kb] * 256.0f : 1.0f;
        PREFETCH(ra, c * (FP8 ? 1 : 2));
        PREFETCH(rbw, c * (FP8 ? 1 : 2));
#ifdef VEC
        __m512 a0[MB2], a1[MB2], b0[MB2], b1[MB2];
        for (int i = 0; i < MBC; i++) {
            a0[i] = _mm512_setzero_ps(); a1[i] = _mm512_setzero_ps();
            b0[i] = _mm512_setzero_ps(); b1[i] = _mm512_setzero_ps();
        }
        for (; c + 32 <= c1; c += 32) {
            __m512 wa0, wa1, wb0, wb1;
            load32(ra, c, FP8, &wa0, &wa1);
            load32(rbw, c, FP8, &wb0, &wb1);
            for (int i = 0; i < MBC; i++) {
                const float* xr = x + (size_t)(m0 + i) * ldx + c;
                __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16);
                a0[i] = _mm512_fmadd_ps(wa0, x0, a0[i]); a1[i] = _mm512_fmadd_ps(wa1, x1, a1[i]);
                b0[i] = _mm512_fmadd_ps(wb0, x0, b0[i]); b1[i] = _mm512_fmadd_ps(wb1, x1, b1[i]);
            }
        }
        __m512 vsa = _mm512_set1_ps(sa), vsb = _mm512_set1_ps(sb);
        for (int i = 0; i < MBC; i++) {
            va[i] = _mm512_fmadd_ps(_mm512_add_ps(a0[i], a1[i]), vsa, va[i]);
            vb[i] = _mm512_fmadd_ps(_mm512_add_ps(b0[i], b1[i]), vsb, vb[i]);
        }
#endif
        if (TAIL) {
            float acc_a[MB2], acc_b[MB2];
            for (int i = 0; i < MBC; i++) acc_a[i] = acc_b[i] = 0.0f;
            tail(ra, c, c1, x, ldx, m0, acc_a, MBC, FP8);
            tail(rbw, c, c1, x, ldx, m0, acc_b, MBC, FP8);
            for (int i = 0; i < MBC; i++) { ta[i] += acc_a[i] * sa; tb[i] += acc_b[i] * sb; }
        }
    }
    for (int i = 0; i < MBC; i++) {
#ifdef VEC
        ta[i] += _mm512_reduce_add_ps(va[i]);
        tb[i] += _mm512_reduce_add_ps(vb[i]);
#endif
        y[(size_t)(m0 + i) * ldy + r] = ta[i];
        y[(size_t)(m0 + i) * ldy + r + 1] = tb[i];
    }
}

/* Task t of y = x @ W^T over all M tokens: row t when M <= 2, rows 2t and 2t+1 otherwise. */
static inline __attribute__((always_inline)) void gemm_task_t(
        const void* W, const float* scale, int rows, int cols, int bn, int bk, const float* x, int ldx, int M,
        float* y, int ldy, long t, const int FP8, const int TAIL) {
    int kblocks = FP8 ? (cols + bk - 1) / bk : 1;
    int kb_len = FP8 ? bk : cols;
    size_t rb = (size_t)cols * (FP8 ? 1 : 2);
    if (M <= 2) {
        if (M == 1) rows1(W, scale, (int)t, cols, bn, kblocks, kb_len, rb, x, ldx, 0, y, ldy, 1, FP8, TAIL);
        else rows1(W, scale, (int)t, cols, bn, kblocks, kb_len, rb, x, ldx, 0, y, ldy, 2, FP8, TAIL);
        return;
    }
    int r = 2 * (int)t;
    for (int m0 = 0; m0 < M; m0 += MB2) {
        int mb = M - m0 < MB2 ? M - m0 : MB2;
        if (r + 1 < rows) {
            switch (mb) {
#define CASE(n) case n: rows2(W, scale, r, cols, bn, kblocks, kb_len, rb, x, ldx, m0, y, ldy, n, FP8, TAIL); break;
                CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
            }
        } else {
            switch (mb) {
#define CASE(n) case n: rows1(W, scale, r, cols, bn, kblocks, kb_len, rb, x, ldx, m0, y, ldy, n, FP8, TAIL); break;
                CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
            }
        }
    }
}

static void gemm_task(const void* W, const float* scale, int rows, int cols, int bn, int bk, int fp8,
                      const float* x, int ldx, int M, float* y, int ldy, long t) {
    /* without AVX-512, or when a k-block is not a multiple of 32 columns, the scalar tail runs */
#ifdef VEC
    int exact = fp8 ? (bk % 32 == 0 && cols % 32 == 0) : (cols % 32 == 0);
#else
    int exact = 0;
#endif
    if (fp8 && exact) gemm_task_t(W, scale, rows, cols, bn, bk, x, ldx, M, y, ldy, t, 1, 0);
    else if (fp8) gemm_task_t(W, scale, rows, cols, bn, bk, x, ldx, M, y, ldy, t, 1, 1);
    else if (exact) gemm_task_t(W, scale, rows, cols, bn, bk, x, ldx, M, y, ldy, t, 0, 0);
    else gemm_task_t(W, scale, rows, cols, bn, bk, x, ldx, M, y, ldy, t, 0, 1);
}

static long tasks_for(int rows, int M) { return M <= 2 ? rows : (rows + 1) / 2; }

static int find(const long* offs, int n, long t) {  /* offs: n + 1 prefix sums; the e with offs[e] <= t < offs[e+1] */
    int lo = 0, hi = n - 1;
    while (lo < hi) { int mid = (lo + hi + 1) / 2; if (offs[mid] <= t) lo = mid; else hi = mid - 1; }
    return lo;
}

/* One call's arguments (mirrored by `_Job` in Python). n routed experts:
   y_e = down_e(silu(gate_e(x_e)) * up_e(x_e)); per expert e: x[e] [M[e], K] fp32, scratch gu[e] [M[e], 2N],
   h[e] [M[e], N], output y[e] [M[e], K]. With `out` set, the outputs are also reduced per token: the R rows of
   y (contiguous from y[0]) are routes of tokens tok[r] with weights w[r], and out [M_out, K] receives
   out[m] = sum over r with tok[r] == m of w[r] * y_r, r in order. */
typedef struct {
    int n;
    const void** w13; const float** s13; const void** w2; const float** s2;
    const float** x; const int* M; float** gu; float** h; float** y;
    int K, N, bn, bk, fp8, threads;
    int R, M_out; const int64_t* tok; const float* w; float* out;
    double seconds;  /* set by the call: its own wall time */
} job_t;

static double now_s(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

/* All of a job in one parallel region: three work-shared loops (gate/up rows, SiLU*up, down rows) and, with
   `out`, a fourth over column chunks of the output (each chunk sums its routes in order: deterministic). */
void experts_run(job_t* j) {
    double t0 = now_s();
    long o1[257], o2[257], o3[257];
    int n = j->n, K = j->K, N = j->N;
    if (n > 256) return;
    o1[0] = o2[0] = o3[0] = 0;
    for (int e = 0; e < n; e++) {
        o1[e + 1] = o1[e] + tasks_for(2 * N, j->M[e]);
        o2[e + 1] = o2[e] + (long)j->M[e] * N;
        o3[e + 1] = o3[e] + tasks_for(K, j->M[e]);
    }
    long chunks = j->out ? (K + 255) / 256 : 0;
    if (j->threads > 0) omp_set_num_threads(j->threads);
    #pragma omp parallel
    {
        #pragma omp for schedule(dynamic, 16)  /* threads that wake late take less */
        for (long t = 0; t < o1[n]; t++) {
            int e = find(o1, n, t);
            gemm_task(j->w13[e], j->s13[e], 2 * N, K, j->bn, j->bk, j->fp8, j->x[e], K, j->M[e], j->gu[e], 2 * N,
                      t - o1[e]);
        }
        #pragma omp for schedule(static)
        for (long t = 0; t < o2[n]; t++) {
            int e = find(o2, n, t);
            long i = t - o2[e];
            int m = (int)(i / N), c = (int)(i % N);
            float g = j->gu[e][(size_t)m * 2 * N + c], u = j->gu[e][(size_t)m * 2 * N + N + c];
            j->h[e][i] = g / (1.0f + expf(-g)) * u;
        }
        #pragma omp for schedule(dynamic, 16)  /* threads that wake late take less */
        for (long t = 0; t < o3[n]; t++) {
            int e = find(o3, n, t);
            gemm_task(j->w2[e], j->s2[e], K, N, j->bn, j->bk, j->fp8, j->h[e], N, j->M[e], j->y[e], K, t - o3[e]);
        }
        #pragma omp for schedule(static)
        for (long ch = 0; ch < chunks; ch++) {
            int c0 = (int)ch * 256, c1 = c0 + 256 < K ? c0 + 256 : K;
            const float* y0 = j->y[0];
            for (int m = 0; m < j->M_out; m++)
                for (int c = c0; c < c1; c++) j->out[(size_t)m * K + c] = 0.0f;
            for (int r = 0; r < j->R; r++) {
                float* o = j->out + (size_t)j->tok[r] * K;
                const float* yr = y0 + (size_t)r * K;
                float wr = j->w[r];
                for (int c = c0; c < c1; c++) o[c] += wr * yr[c];
            }
        }
    }
    j->seconds = now_s() - t0;
}

/* Host memory read ceiling: `threads` threads stream n bytes (64-byte lines, work-shared), as the experts' weights
   are streamed; returns the wall seconds. The xor keeps the loads alive. */
static volatile uint64_t read_sink;
double read_bytes(const uint8_t* p, size_t n, int threads) {
    double t0 = now_s();
    size_t lines = n / 64;
    uint64_t acc = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(^:acc)
    for (size_t i = 0; i < lines; i += 4) {
#ifdef VEC
        __m512i a = _mm512_loadu_si512((const void*)(p + i * 64));
        if (i + 4 <= lines) {
            a = _mm512_xor_si512(a, _mm512_loadu_si512((const void*)(p + (i + 1) * 64)));
            a = _mm512_xor_si512(a, _mm512_loadu_si512((const void*)(p + (i + 2) * 64)));
            a = _mm512_xor_si512(a, _mm512_loadu_si512((const void*)(p + (i + 3) * 64)));
        }
        acc ^= (uint64_t)_mm512_reduce_add_epi64(a);
#else
        for (size_t q = i; q < i + 4 && q < lines; q++) acc ^= *(const uint64_t*)(p + q * 64);
#endif
    }
    read_sink = acc;
    return now_s() - t0;
}

/* Wait until *p == v (the host device's side of the stream signals): spin, then sleep. 0, or -1 on timeout. */
int wait_u32(volatile uint32_t* p, uint32_t v, double timeout_s) {
    double t0 = now_s();
    for (long i = 0; *p != v; i++) {
        if (i < 4096) { __builtin_ia32_pause(); continue; }
        if (now_s() - t0 > timeout_s) return -1;
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return 0;
}

/* The expert server: a thread that takes jobs the GPU posts in a host mailbox, with no host code in between.
   The GPU's split kernel writes the header and arrays through UVA, then a stream write sets *ready = 1 (ordered
   after the kernel's writes); the server clears it, computes the CPU's experts and their weighted per-token sum
   into `out`, and sets *done = 1, which a stream wait on the GPU blocks on. A job it cannot read (a header out of
   range: a bug, never a user input) is counted in errors[0] and answered with out = 0, so the GPU never hangs.
   Header: layer index, n_cpu, n_miss, M, R, k. Arrays: experts [n_cpu] (in the order their routes are grouped),
   ids [R] and w [R] (route r = token * k + j), x [M, K] fp32. Per-layer stats [L, 4]: jobs, experts, routes,
   seconds; the log ring [cap, 7]: layer, n_miss, n_cpu, M, rows, t_start, t_end (CLOCK_MONOTONIC seconds). */
typedef struct {
    volatile uint32_t* ready; volatile uint32_t* done; const volatile int32_t* hdr;
    const int32_t* experts; const int32_t* ids; const float* w; const float* x; float* out;
    int R_max, M_max, E, L;
    const uint8_t** w13; const uint8_t** s13; const uint8_t** w2; const uint8_t** s2;  /* [L] section bases */
    int64_t st13, sts13, st2, sts2;  /* bytes per expert in each section */
    int K, N, bn, bk, fp8, threads;
    float* xr; float* gu; float* hbuf; float* y; int64_t* tok; float* wr;  /* scratch for R_max rows */
    double spin_s;
    double* layer_stats; double* log; int64_t log_cap; volatile int64_t* log_n; volatile int64_t* errors;
} server_cfg_t;

typedef struct { pthread_t th; server_cfg_t c; volatile int quit; } server_t;

static void serve_one(server_cfg_t* c) {
    double t0 = now_s();
    int layer = c->hdr[0], n = c->hdr[1], n_miss = c->hdr[2], M = c->hdr[3], R = c->hdr[4], k = c->hdr[5];
    int K = c->K, N = c->N;
    int ok = layer >= 0 && layer < c->L && n >= 0 && n <= n_miss && n <= 256 && M >= 1 && M <= c->M_max && k >= 1
             && R == M * k && R <= c->R_max;
    for (int i = 0; ok && i < n; i++) ok = c->experts[i] >= 0 && c->experts[i] < c->E;
    if (!ok) {
        __atomic_fetch_add(c->errors, 1, __ATOMIC_RELAXED);
        for (size_t i = 0; i < (size_t)c->M_max * K; i++) c->out[i] = 0.0f;
        return;
    }
    int rows = 0;
    if (n == 0) {
        for (size_t i = 0; i < (size_t)M * K; i++) c->out[i] = 0.0f;
    } else {
        const void *w13[256], *s13[256], *w2[256], *s2[256];
        const float* xs[256]; float *gus[256], *hs[256], *ys[256]; int Ms[256];
        for (int i = 0; i < n; i++) {
            int e = c->experts[i], start = rows;
            for (int r = 0; r < R; r++) {
                if (c->ids[r] != e) continue;
                c->tok[rows] = r / k;
                c->wr[rows] = c->w[r];
                const float* src = c->x + (size_t)(r / k) * K;
                float* dst = c->xr + (size_t)rows * K;
                for (int q = 0; q < K; q++) dst[q] = src[q];
                rows++;
            }
            Ms[i] = rows - start;
            xs[i] = c->xr + (size_t)start * K; gus[i] = c->gu + (size_t)start * 2 * N;
            hs[i] = c->hbuf + (size_t)start * N; ys[i] = c->y + (size_t)start * K;
            w13[i] = c->w13[layer] + e * c->st13; w2[i] = c->w2[layer] + e * c->st2;
            s13[i] = c->fp8 ? (const void*)(c->s13[layer] + e * c->sts13) : NULL;
            s2[i] = c->fp8 ? (const void*)(c->s2[layer] + e * c->sts2) : NULL;
        }
        job_t j = {n, w13, (const float**)s13, w2, (const float**)s2, xs, Ms, gus, hs, ys, K, N, c->bn, c->bk,
                   c->fp8, c->threads, rows, M, c->tok, c->wr, c->out, 0.0};
        experts_run(&j);
    }
    double t1 = now_s();
    double* ls = c->layer_stats + 4 * layer;
    ls[0] += 1; ls[1] += n; ls[2] += rows; ls[3] += t1 - t0;
    int64_t at = *c->log_n;
    double* rec = c->log + 7 * (at % c->log_cap);
    rec[0] = layer; rec[1] = n_miss; rec[2] = n; rec[3] = M; rec[4] = rows; rec[5] = t0; rec[6] = t1;
    __atomic_store_n(c->log_n, at + 1, __ATOMIC_RELEASE);
}

static void* server_main(void* arg) {
    server_t* s = (server_t*)arg;
    double last = now_s();
    while (!s->quit) {
        if (*s->c.ready == 1) {
            *s->c.ready = 0;
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            serve_one(&s->c);
            __atomic_thread_fence(__ATOMIC_RELEASE);
            *s->c.done = 1;
            last = now_s();
        } else {
            double idle = now_s() - last;
            if (idle < s->c.spin_s) {
                for (int i = 0; i < 16; i++) __builtin_ia32_pause();
            } else {  /* between bursts poll every ~20 us; after a second idle every ~1 ms (an idle daemon) */
                struct timespec ts = {0, idle < 1.0 ? 20000 : 1000000};
                nanosleep(&ts, NULL);
            }
        }
    }
    return NULL;
}

void* server_new(const server_cfg_t* cfg) {
    server_t* s = (server_t*)calloc(1, sizeof(server_t));
    if (!s) return NULL;
    s->c = *cfg;
    if (pthread_create(&s->th, NULL, server_main, s) != 0) { free(s); return NULL; }
    return s;
}

void server_free(void* p) {
    server_t* s = (server_t*)p;
    s->quit = 1;
    pthread_join(s->th, NULL);
    free(s);
}
"""

_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None

_P = ctypes.c_void_p


class _Job(ctypes.Structure):
    """Mirror of the C `job_t` (field order and types must match)."""

    _fields_ = [("n", ctypes.c_int), ("w13", ctypes.POINTER(_P)), ("s13", ctypes.POINTER(_P)),
                ("w2", ctypes.POINTER(_P)), ("s2", ctypes.POINTER(_P)), ("x", ctypes.POINTER(_P)),
                ("M", ctypes.POINTER(ctypes.c_int)), ("gu", ctypes.POINTER(_P)), ("h", ctypes.POINTER(_P)),
                ("y", ctypes.POINTER(_P)), ("K", ctypes.c_int), ("N", ctypes.c_int), ("bn", ctypes.c_int),
                ("bk", ctypes.c_int), ("fp8", ctypes.c_int), ("threads", ctypes.c_int), ("R", ctypes.c_int),
                ("M_out", ctypes.c_int), ("tok", _P), ("w", _P), ("out", _P), ("seconds", ctypes.c_double)]


class _ServerCfg(ctypes.Structure):
    """Mirror of the C `server_cfg_t` (field order and types must match)."""

    _fields_ = [("ready", _P), ("done", _P), ("hdr", _P), ("experts", _P), ("ids", _P), ("w", _P), ("x", _P),
                ("out", _P), ("R_max", ctypes.c_int), ("M_max", ctypes.c_int), ("E", ctypes.c_int),
                ("L", ctypes.c_int), ("w13", ctypes.POINTER(_P)), ("s13", ctypes.POINTER(_P)),
                ("w2", ctypes.POINTER(_P)), ("s2", ctypes.POINTER(_P)), ("st13", ctypes.c_int64),
                ("sts13", ctypes.c_int64), ("st2", ctypes.c_int64), ("sts2", ctypes.c_int64), ("K", ctypes.c_int),
                ("N", ctypes.c_int), ("bn", ctypes.c_int), ("bk", ctypes.c_int), ("fp8", ctypes.c_int),
                ("threads", ctypes.c_int), ("xr", _P), ("gu", _P), ("hbuf", _P), ("y", _P), ("tok", _P), ("wr", _P),
                ("spin_s", ctypes.c_double), ("layer_stats", _P), ("log", _P), ("log_cap", ctypes.c_int64),
                ("log_n", _P), ("errors", _P)]


class CpuKernelUnavailable(RuntimeError):
    """The CPU expert kernel could not be built here; the message says why."""


def _build() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        extra = os.environ.get("MOED_CPU_CFLAGS", "").split()  # e.g. -march=... for a build machine's target
        digest = hashlib.sha256("\0".join([_C_SOURCE, *extra]).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("MOED_CACHE", Path(tempfile.gettempdir()) / f"moed-{os.getuid()}")) / "build"
        so = cache / f"cpu_experts_{digest}_{os.uname().machine}.so"
        if not so.exists():
            cache.mkdir(parents=True, exist_ok=True)
            src = cache / f"cpu_experts_{digest}.c"
            src.write_text(_C_SOURCE)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cmd = [os.environ.get("CC", "gcc"), "-O3", "-march=native", "-fopenmp", "-pthread", "-shared", "-fPIC",
                   *extra, "-o", str(tmp), str(src), "-lm"]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
            except FileNotFoundError:
                raise CpuKernelUnavailable(f"no C compiler ({cmd[0]}) to build the CPU expert kernel; "
                                           "install gcc or leave CPU experts off") from None
            except subprocess.CalledProcessError as e:
                raise CpuKernelUnavailable(f"building the CPU expert kernel failed: {' '.join(cmd)}\n{e.stderr}") \
                    from None
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
        job_p = ctypes.POINTER(_Job)
        lib.experts_run.argtypes, lib.experts_run.restype = [job_p], None
        lib.server_new.argtypes, lib.server_new.restype = [ctypes.POINTER(_ServerCfg)], _P
        lib.server_free.argtypes, lib.server_free.restype = [_P], None
        lib.wait_u32.argtypes, lib.wait_u32.restype = [_P, ctypes.c_uint32, ctypes.c_double], ctypes.c_int
        lib.read_bytes.argtypes, lib.read_bytes.restype = [_P, ctypes.c_size_t, ctypes.c_int], ctypes.c_double
        _lib = lib
        return lib


def _ptrs(values: list[int]) -> ctypes.Array:
    return (_P * len(values))(*values)


class CpuExpertKernel:
    """Computes routed experts on the CPU from host-store views; releases the GIL while it runs.

    `forward_many` computes on the calling thread's OpenMP team; `serve` starts an `ExpertServer`, a thread of the
    library's own that computes the jobs a GPU posts in a host mailbox (the hybrid miss service)."""

    def __init__(self, layout: ExpertLayout, threads: int = 0) -> None:
        # 0: every core this process may run on but one, which the runner's thread keeps to queue GPU work while
        # a job runs (a hybrid batch-1 layer on the lent 16-core host: 3.85 ms with 15 threads, 4.10 with 16).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.layout, self.threads = layout, threads or max(1, cores - 1)
        self.lib = _build()

    def _job(self, n: int, w13: list[int], s13: list[int], w2: list[int], s2: list[int], x: list[int],
             M: list[int], gu: list[int], h: list[int], y: list[int]) -> tuple[_Job, tuple]:
        L = self.layout
        bn, bk = L.block or (1, 1)
        arrays = (_ptrs(w13), _ptrs(s13), _ptrs(w2), _ptrs(s2), _ptrs(x), (ctypes.c_int * n)(*M), _ptrs(gu),
                  _ptrs(h), _ptrs(y))
        job = _Job(n, *arrays, L.hidden, L.inter, bn, bk, int(L.is_fp8), self.threads, 0, 0, None, None, None, 0.0)
        return job, arrays

    def forward(self, expert: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """expert: one expert's section views (host, see module doc); x: [M, K] fp32 -> y [M, K] fp32."""
        return self.forward_many([expert], [x])[0]

    def forward_many(self, experts: list[dict[str, torch.Tensor]], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several experts in one parallel region: experts[i] applied to xs[i] ([M_i, K] fp32) -> [M_i, K] fp32."""
        L = self.layout
        n = len(experts)
        if n != len(xs) or not 0 < n <= 256:
            raise ValueError(f"forward_many takes 1..256 experts with one input each, got {n} and {len(xs)}")
        for x in xs:
            if (x.dim() != 2 or x.shape[1] != L.hidden or x.dtype != torch.float32 or not x.is_contiguous()
                    or x.device.type != "cpu"):
                raise ValueError(f"CPU experts take contiguous fp32 host activations [M, {L.hidden}], got "
                                 f"{x.dtype}{list(x.shape)} on {x.device}")
        K, N = L.hidden, L.inter
        ys = [torch.empty(x.shape[0], K, dtype=torch.float32) for x in xs]
        gus = [torch.empty(x.shape[0], 2 * N, dtype=torch.float32) for x in xs]
        hs = [torch.empty(x.shape[0], N, dtype=torch.float32) for x in xs]

        def ptr(t: torch.Tensor | None) -> int:
            return t.data_ptr() if t is not None else 0

        job, _arrays = self._job(n, [ptr(e["w13"]) for e in experts], [ptr(e.get("w13_scale")) for e in experts],
                                 [ptr(e["w2"]) for e in experts], [ptr(e.get("w2_scale")) for e in experts],
                                 [x.data_ptr() for x in xs], [x.shape[0] for x in xs], [ptr(t) for t in gus],
                                 [ptr(t) for t in hs], [ptr(t) for t in ys])
        self.lib.experts_run(ctypes.byref(job))
        return ys

    def serve(self, sections: list[dict[str, torch.Tensor]], max_tokens: int, k: int, pin: bool,
              spin_s: float = 0.05) -> ExpertServer:
        """Start a server thread computing the jobs a GPU posts for layers `sections[i]` (HostExpertStore.sections
        views, one dict per layer index i) in steps of up to `max_tokens` tokens with k routes each."""
        return ExpertServer(self, sections, max_tokens, k, pin, spin_s)


class ExpertServer:
    """The CPU's side of the hybrid miss service (C thread `server_main`): one mailbox in host memory, pinned when a
    GPU posts into it. Word layout of `words` (int32): ready [0], done [16] (their own cache lines), header [32:38]
    (layer index, n_cpu, n_miss, M, R, k), then experts [R_max], ids [R_max], w [R_max] (fp32), x [M_max, K] and
    out [M_max, K] (fp32, 64-byte aligned). Jobs come from `kernels.miss_split.split_misses` plus a stream write of
    ready = 1; the answer is done = 1 and `out`, the CPU routes' weighted sum per token."""

    HEADER = 6
    LOG_CAP = 1024

    def __init__(self, kernel: CpuExpertKernel, sections: list[dict[str, torch.Tensor]], max_tokens: int, k: int,
                 pin: bool, spin_s: float) -> None:
        L = kernel.layout
        K, N = L.hidden, L.inter
        if not sections or max_tokens < 1 or k < 1:
            raise ValueError(f"expert server: needs >= 1 layer, max_tokens >= 1 and k >= 1, got {len(sections)}, "
                             f"{max_tokens}, {k}")
        self.kernel, self.layout, self.k, self.max_tokens = kernel, L, k, max_tokens
        R = self.R_max = max_tokens * k
        arrays = 3 * R
        x0 = -(-(48 + arrays) // 16) * 16  # x starts on a 64-byte line
        self._x0, self._out0 = x0, x0 + max_tokens * K
        self.words = torch.zeros(self._out0 + max_tokens * K, dtype=torch.int32, pin_memory=pin)
        w = self.words
        self.header = w[32:32 + self.HEADER]
        self.experts, self.ids = w[48:48 + R], w[48 + R:48 + 2 * R]
        self.w = w[48 + 2 * R:48 + 3 * R].view(torch.float32)
        self.x = w[x0:self._out0].view(torch.float32).view(max_tokens, K)
        self.out = w[self._out0:].view(torch.float32).view(max_tokens, K)
        self.ready_addr, self.done_addr = w.data_ptr(), w.data_ptr() + 16 * 4
        f32 = dict(dtype=torch.float32)
        self._scratch = [torch.empty(R, K, **f32), torch.empty(R, 2 * N, **f32), torch.empty(R, N, **f32),
                         torch.empty(R, K, **f32), torch.empty(R, dtype=torch.int64), torch.empty(R, **f32)]
        self.layer_stats = np.zeros((len(sections), 4))
        self.log = np.zeros((self.LOG_CAP, 7))
        self._counters = np.zeros(2, dtype=np.int64)  # log_n, errors
        self._read = 0

        def bases(name: str) -> ctypes.Array:
            return _ptrs([sec[name].data_ptr() if name in sec else 0 for sec in sections])

        def stride(name: str) -> int:
            t = sections[0].get(name)
            return 0 if t is None else t[0].numel() * t.element_size()

        self._bases = [bases(n) for n in ("w13", "w13_scale", "w2", "w2_scale")]
        bn, bk = L.block or (1, 1)
        cnt = self._counters.ctypes.data
        self._cfg = _ServerCfg(
            self.ready_addr, self.done_addr, self.header.data_ptr(), self.experts.data_ptr(), self.ids.data_ptr(),
            self.w.data_ptr(), self.x.data_ptr(), self.out.data_ptr(), R, max_tokens, L.num_experts, len(sections),
            *self._bases, stride("w13"), stride("w13_scale"), stride("w2"), stride("w2_scale"), K, N, bn, bk,
            int(L.is_fp8), kernel.threads, *(t.data_ptr() for t in self._scratch), spin_s,
            self.layer_stats.ctypes.data, self.log.ctypes.data, self.LOG_CAP, cnt, cnt + 8)
        self._sections = sections  # the bases point into these views
        self._handle = kernel.lib.server_new(ctypes.byref(self._cfg))
        if not self._handle:
            raise CpuKernelUnavailable("CPU experts: could not start the expert server thread")

    @property
    def errors(self) -> int:
        """Jobs the server could not read (answered with zeros); nonzero means a bug upstream."""
        return int(self._counters[1])

    def new_records(self) -> np.ndarray:
        """The jobs logged since the last call, oldest first: rows of (layer index, n_miss, n_cpu, M, rows,
        t_start, t_end); at most the last LOG_CAP. The newest record may be read while a later one is written:
        only records before the count are returned, and the count is published after its record."""
        n = int(self._counters[0])
        lo = max(self._read, n - self.LOG_CAP + 1)  # the slot at n % cap may be under rewrite
        self._read = n
        if n <= lo:
            return np.zeros((0, 7))
        idx = np.arange(lo, n) % self.LOG_CAP
        return self.log[idx].copy()

    def close(self) -> None:
        if self._handle:
            self.kernel.lib.server_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def host_read_GBps(t: torch.Tensor, threads: int, reps: int = 3) -> float:
    """Read bandwidth of host memory `t` (any dtype, contiguous, on the CPU) by `threads` threads streaming it with
    wide loads, as the expert kernel streams weights: the best of `reps` passes, GB/s. A benchmark ceiling."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"host_read_GBps takes a contiguous host tensor, got a "
                         f"{'contiguous' if t.is_contiguous() else 'strided'} one on {t.device}")
    lib = _build()
    n = t.numel() * t.element_size()
    lib.read_bytes(t.data_ptr(), n, threads)  # first touch, threads woken
    return n / min(lib.read_bytes(t.data_ptr(), n, threads) for _ in range(reps)) / 1e9


def expert_forward_reference(expert: dict[str, torch.Tensor], x: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """The same expert in float64 from the stored weights (FP8 dequantised exactly): [M, K] -> [M, K]."""
    N = layout.inter
    if layout.block is not None:
        bn, bk = layout.block
        w13 = dequantize_block_fp8(expert["w13"], expert["w13_scale"], bn, bk, torch.float64)
        w2 = dequantize_block_fp8(expert["w2"], expert["w2_scale"], bn, bk, torch.float64)
    else:
        w13, w2 = expert["w13"].double(), expert["w2"].double()
    gu = x.double() @ w13.T
    return (F.silu(gu[:, :N]) * gu[:, N:]) @ w2.T
