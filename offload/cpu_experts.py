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

from moed.model.fp8 import dequantize_block_fp8
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

/* A worker thread that runs one job at a time, so the caller (holding Python's GIL) can queue GPU work while
   the experts compute: the handoff is a condition variable, never the GIL. States: 0 idle, 1 queued,
   2 done, 3 exiting. The job's arrays must stay alive until worker_wait returns. */
typedef struct { pthread_t th; pthread_mutex_t mu; pthread_cond_t cv; int state; job_t job; } worker_t;

static void* worker_main(void* arg) {
    worker_t* w = (worker_t*)arg;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        while (w->state != 1 && w->state != 3) pthread_cond_wait(&w->cv, &w->mu);
        int quit = w->state == 3;
        pthread_mutex_unlock(&w->mu);
        if (quit) return NULL;
        experts_run(&w->job);
        pthread_mutex_lock(&w->mu);
        w->state = 2;
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
}

void* worker_new(void) {
    worker_t* w = (worker_t*)calloc(1, sizeof(worker_t));
    if (!w) return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    if (pthread_create(&w->th, NULL, worker_main, w) != 0) { free(w); return NULL; }
    return w;
}

/* Returns 0, or -1 when the last job was not waited for (the caller must wait first). */
int worker_submit(void* p, const job_t* j) {
    worker_t* w = (worker_t*)p;
    pthread_mutex_lock(&w->mu);
    if (w->state != 0) { pthread_mutex_unlock(&w->mu); return -1; }
    w->job = *j;
    w->state = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

/* Blocks until the queued job is done; returns its wall time in seconds (-1 when nothing was queued). */
double worker_wait(void* p) {
    worker_t* w = (worker_t*)p;
    pthread_mutex_lock(&w->mu);
    if (w->state == 0) { pthread_mutex_unlock(&w->mu); return -1.0; }
    while (w->state != 2) pthread_cond_wait(&w->cv, &w->mu);
    w->state = 0;
    double s = w->job.seconds;
    pthread_mutex_unlock(&w->mu);
    return s;
}

void worker_free(void* p) {
    worker_t* w = (worker_t*)p;
    pthread_mutex_lock(&w->mu);
    while (w->state == 1) pthread_cond_wait(&w->cv, &w->mu);
    w->state = 3;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->th, NULL);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
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
        lib.worker_new.argtypes, lib.worker_new.restype = [], _P
        lib.worker_submit.argtypes, lib.worker_submit.restype = [_P, job_p], ctypes.c_int
        lib.worker_wait.argtypes, lib.worker_wait.restype = [_P], ctypes.c_double
        lib.worker_free.argtypes, lib.worker_free.restype = [_P], None
        _lib = lib
        return lib


def _ptrs(values: list[int]) -> ctypes.Array:
    return (_P * len(values))(*values)


class CpuExpertKernel:
    """Computes routed experts on the CPU from host-store views; releases the GIL while it runs.

    `forward_many` / `forward_grouped` compute on the calling thread's OpenMP team; `submit_grouped` hands the
    same work to this kernel's own worker thread and returns at once (`wait` collects it), so the caller can
    queue GPU work meanwhile. One submitted job at a time per kernel."""

    def __init__(self, layout: ExpertLayout, threads: int = 0) -> None:
        # 0: every core this process may run on but one, which the runner's thread keeps to queue GPU work while
        # the job runs (a hybrid batch-1 layer on the lent 16-core host: 3.85 ms with 15 threads, 4.10 with 16).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.layout, self.threads = layout, threads or max(1, cores - 1)
        self.lib = _build()
        self._worker: int | None = None
        self._pending: tuple | None = None  # the submitted job and every array it points into

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

    def submit_grouped(self, sections: dict[str, torch.Tensor], experts: np.ndarray, counts: np.ndarray,
                       x: torch.Tensor, y: torch.Tensor, *, tok: torch.Tensor | None = None,
                       w: torch.Tensor | None = None, out: torch.Tensor | None = None) -> None:
        """Queue the hybrid path's call on the worker thread, with no per-expert tensor work: `sections` are one
        layer's [E, ...] host views (HostExpertStore.sections), x / y fp32 [R, K] hold the routes grouped by
        expert in `experts` order, counts[i] rows for experts[i]; y receives every route's expert output. With
        tok / w (int64 / fp32 [R]) and out (fp32 [M_out, K]) the routes are also reduced per token:
        out[m] = sum of w[r] * y[r] over the routes r of token m, in row order. Every tensor must stay alive and
        untouched until `wait` returns."""
        L = self.layout
        K, N = L.hidden, L.inter
        n = len(experts)
        R = int(counts.sum())
        if (not 0 < n <= 256 or len(counts) != n or x.shape != (R, K) or y.shape != (R, K)
                or x.dtype != torch.float32 or y.dtype != torch.float32 or not x.is_contiguous()
                or not y.is_contiguous() or x.device.type != "cpu" or y.device.type != "cpu"):
            raise ValueError(f"forward_grouped: 1..256 experts with fp32 host rows [{R}, {K}] in and out, got "
                             f"{n} experts, x {x.dtype}{list(x.shape)}, y {y.dtype}{list(y.shape)}")
        reduce = out is not None
        if reduce and (tok is None or w is None or tok.shape != (R,) or w.shape != (R,) or tok.dtype != torch.int64
                       or w.dtype != torch.float32 or out.dim() != 2 or out.shape[1] != K
                       or out.dtype != torch.float32 or not out.is_contiguous() or not tok.is_contiguous()
                       or not w.is_contiguous() or not 0 <= tok.numpy().min() <= tok.numpy().max() < out.shape[0]):
            raise ValueError(f"forward_grouped: the per-token sum takes tok int64 [{R}] in [0, M_out), w fp32 [{R}] "
                             f"and out fp32 [M_out, {K}]")
        if self._pending is not None:
            raise RuntimeError("CPU experts: a job is already queued; wait() for it first")
        gu = torch.empty(R, 2 * N, dtype=torch.float32)
        h = torch.empty(R, N, dtype=torch.float32)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        e = np.asarray(experts, dtype=np.int64)

        def rows(t: torch.Tensor, width: int) -> list[int]:
            return (t.data_ptr() + starts * (width * 4)).tolist()

        def section(name: str) -> list[int]:
            t = sections.get(name)
            if t is None:
                return [0] * n
            return (t.data_ptr() + t[0].numel() * t.element_size() * e).tolist()

        job, arrays = self._job(n, section("w13"), section("w13_scale"), section("w2"), section("w2_scale"),
                                rows(x, K), counts.tolist(), rows(gu, 2 * N), rows(h, N), rows(y, K))
        if reduce:
            assert tok is not None and w is not None and out is not None
            job.R, job.M_out, job.tok, job.w, job.out = R, out.shape[0], tok.data_ptr(), w.data_ptr(), out.data_ptr()
        if self._worker is None:
            self._worker = self.lib.worker_new()
            if not self._worker:
                raise CpuKernelUnavailable("CPU experts: could not start the worker thread")
        if self.lib.worker_submit(self._worker, ctypes.byref(job)) != 0:
            raise RuntimeError("CPU experts: the worker still holds a job that was not waited for")
        self._pending = (job, arrays, gu, h, x, y, tok, w, out)

    def wait(self) -> float:
        """Block (GIL released) until the submitted job is done; returns its compute time in seconds."""
        if self._pending is None or self._worker is None:
            raise RuntimeError("CPU experts: wait() without a submitted job")
        seconds = self.lib.worker_wait(self._worker)
        self._pending = None
        return seconds

    def forward_grouped(self, sections: dict[str, torch.Tensor], experts: np.ndarray, counts: np.ndarray,
                        x: torch.Tensor, y: torch.Tensor, **reduce: torch.Tensor) -> float:
        """`submit_grouped` then `wait`: the same call, finished on return; returns the compute seconds."""
        self.submit_grouped(sections, experts, counts, x, y, **reduce)
        return self.wait()

    def close(self) -> None:
        """Stop the worker thread (after its job, if one is queued)."""
        if self._worker is not None:
            self.lib.worker_free(self._worker)
            self._worker, self._pending = None, None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may already be gone
            self.close()


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
