/* The CPU expert kernel and the hybrid miss service's expert server, loaded by cpu_experts.py through ctypes.

Routed experts straight from the host store's slabs, in their format (fmt: 0 bf16, 1 FP8 e4m3 block, 2 int4).
FP8 / bf16: 16 weights at a time converted to fp32 in registers (e4m3 -> fp16 by a sign-extend, a shift and a
mask, exact for every e4m3 value incl. subnormals, then vcvtph2ps; the fp16 value is 2^-8 of the e4m3 value,
folded into the block scale), fp32 FMAs in two chains per row and token; from 3 tokens on each activation load
serves two weight rows. AVX-512 (F, BW) where the build targets it, a scalar loop otherwise.
int4 (moed.formats.int4: two weights a byte, even k in the low nibble, stored u = q + 8; bf16 scale and packed zero
point z + 8 per row and group along K), read in place: activations are quantised per token and 128-wide block to
int8 (scale amax / 127, and the block's sum of int8 values), each block stored as its even-k then its odd-k half,
so 64 weight bytes (128 weights) give the even half by one AND and the odd half by a shift and an AND; the block's
dot is sum u * x_q - (z + 8) * sum x_q, exact in int32 (AVX-512 VNNI vpdpbusd: unsigned weight bytes times signed
activation bytes, 4 products a lane), then one fp32 FMA by weight scale * activation scale. Needs the group and
both widths to be multiples of 128; otherwise, and with `exact`, int4 runs an fp32 path with unquantised
activations (scalar, exact up to fp32 summation order: the reference the int8 path's error is measured against).
Without VNNI the int8 path runs as scalar integer code with the same arithmetic.
The structs job_t and server_cfg_t are mirrored by ctypes in cpu_experts.py, which compares its mirrors with
`struct_layout` at load. */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <time.h>
#include <pthread.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VEC 1
#if defined(__AVX512VNNI__)
#define VNNI 1
#endif
#endif

enum { FMT_BF16 = 0, FMT_FP8 = 1, FMT_INT4 = 2 };

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
/* Software prefetch of the weight stream this many bytes ahead of the k-block being read (0: off); 4 KiB and T0
   measured fastest on the GPU machine's host (docs/benchmarks.md, prefetch distance). */
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
        const void* W, const float* scale, int r, int cols, int bn, int kblocks, int sstride, int kb_len, size_t rb,
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
        float s = FP8 ? scale[(r / bn) * sstride + kb] * 256.0f : 1.0f;
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
        const void* W, const float* scale, int r, int cols, int bn, int kblocks, int sstride, int kb_len, size_t rb,
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
        float sa = FP8 ? scale[(r / bn) * sstride + kb] * 256.0f : 1.0f;
        float sb = FP8 ? scale[((r + 1) / bn) * sstride + kb] * 256.0f : 1.0f;
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

/* Task t of y = x @ W^T over all M tokens: row t when M <= 2, rows 2t and 2t+1 otherwise. W's rows hold `ld`
   weights (ceil(ld / bk) scales) of which the `cols` from W on are used: a column slice starts at a k-block. */
static inline __attribute__((always_inline)) void gemm_task_t(
        const void* W, const float* scale, int rows, int cols, int ld, int bn, int bk, const float* x, int ldx,
        int M, float* y, int ldy, long t, const int FP8, const int TAIL) {
    int kblocks = FP8 ? (cols + bk - 1) / bk : 1;
    int sstride = FP8 ? (ld + bk - 1) / bk : 1;
    int kb_len = FP8 ? bk : cols;
    size_t rb = (size_t)ld * (FP8 ? 1 : 2);
    if (M <= 2) {
        if (M == 1) rows1(W, scale, (int)t, cols, bn, kblocks, sstride, kb_len, rb, x, ldx, 0, y, ldy, 1, FP8, TAIL);
        else rows1(W, scale, (int)t, cols, bn, kblocks, sstride, kb_len, rb, x, ldx, 0, y, ldy, 2, FP8, TAIL);
        return;
    }
    int r = 2 * (int)t;
    for (int m0 = 0; m0 < M; m0 += MB2) {
        int mb = M - m0 < MB2 ? M - m0 : MB2;
        if (r + 1 < rows) {
            switch (mb) {
#define CASE(n) case n: rows2(W, scale, r, cols, bn, kblocks, sstride, kb_len, rb, x, ldx, m0, y, ldy, n, FP8, TAIL); break;
                CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
            }
        } else {
            switch (mb) {
#define CASE(n) case n: rows1(W, scale, r, cols, bn, kblocks, sstride, kb_len, rb, x, ldx, m0, y, ldy, n, FP8, TAIL); break;
                CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
            }
        }
    }
}

static void gemm_task(const void* W, const float* scale, int rows, int cols, int ld, int bn, int bk, int fp8,
                      const float* x, int ldx, int M, float* y, int ldy, long t) {
    /* without AVX-512, or when a k-block is not a multiple of 32 columns, the scalar tail runs */
#ifdef VEC
    int exact = fp8 ? (bk % 32 == 0 && cols % 32 == 0) : (cols % 32 == 0);
#else
    int exact = 0;
#endif
    if (fp8 && exact) gemm_task_t(W, scale, rows, cols, ld, bn, bk, x, ldx, M, y, ldy, t, 1, 0);
    else if (fp8) gemm_task_t(W, scale, rows, cols, ld, bn, bk, x, ldx, M, y, ldy, t, 1, 1);
    else if (exact) gemm_task_t(W, scale, rows, cols, ld, bn, bk, x, ldx, M, y, ldy, t, 0, 0);
    else gemm_task_t(W, scale, rows, cols, ld, bn, bk, x, ldx, M, y, ldy, t, 0, 1);
}

/* ---------------------------------------------------------------------------------------------- int4 */

#define MBQ 4  /* tokens per pass over int4 weight rows */
#define RQ 4  /* int4 weight rows per task */
#define QBLK 128  /* activation quantisation block (weights per 64 packed bytes) */

/* Bytes of one quantised activation row of `cols` values: int8 [cols] (per block: even k, then odd k), fp32 scale
   [cols / 128], int32 sum [cols / 128], padded to 64 bytes. */
static inline size_t qrow_bytes(int cols) { return ((size_t)cols + 8 * (size_t)(cols / QBLK) + 63) / 64 * 64; }

/* Scratch an int4 job with int8 activations needs for `rows` expert rows (sum of M over its experts); the Python side
   sizes its buffers with this. */
int64_t int4_scratch_bytes(int rows, int K, int N) {
    return (int64_t)rows * (int64_t)(qrow_bytes(K) + qrow_bytes(N)) + 64;
}

/* Quantise block b (values 128b .. 128b+127) of row x into its quantised row qrow of `cols` values. */
static void quant_block(const float* x, int8_t* qrow, int cols, int b) {
    const float* xb = x + (size_t)b * QBLK;
    float amax = 0.0f;
    for (int i = 0; i < QBLK; i++) amax = fmaxf(amax, fabsf(xb[i]));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int8_t* qb = qrow + (size_t)b * QBLK;
    int32_t sum = 0;
    for (int i = 0; i < QBLK / 2; i++) {
        int even = (int)nearbyintf(xb[2 * i] * inv), odd = (int)nearbyintf(xb[2 * i + 1] * inv);
        qb[i] = (int8_t)even;
        qb[QBLK / 2 + i] = (int8_t)odd;
        sum += even + odd;
    }
    float* scales = (float*)(qrow + cols);
    scales[b] = amax / 127.0f;
    ((int32_t*)(scales + cols / QBLK))[b] = sum;
}

/* Int4 weight rows r0..r0+R-1 against the int8 rows of tokens m0..m0+MBC-1 (int8 path: cols and group multiples of
   128); R independent rows give the out-of-order core R x MBC accumulation chains, and each activation load serves
   R rows. y[m, r] = sum_b s_w[r, g(b)] * s_x[m, b] * (sum_k u[r, k] x_q[m, k] - zp[r, g(b)] * sum_k x_q[m, k]). */
static inline __attribute__((always_inline)) void int4_rows_q(
        const uint8_t* W, const uint16_t* S, const int32_t* Z, int r0, int cols, int ld, int G, int group,
        const int8_t* q, size_t ldq, int m0, float* y, int ldy, const int R, const int MBC) {
    int nb = cols / QBLK, per_group = group / QBLK;
    const uint8_t* row[RQ]; const uint16_t* srow[RQ]; const int32_t* zrow[RQ]; int zsh[RQ];
    for (int j = 0; j < R; j++) {
        int r = r0 + j;
        row[j] = W + (size_t)r * (ld / 2);
        srow[j] = S + (size_t)r * G;
        zrow[j] = Z + (size_t)(r / 8) * G;
        zsh[j] = 4 * (r % 8);
    }
    const int8_t* qr[MBQ]; const float* qs[MBQ]; const int32_t* qsum[MBQ];
    for (int i = 0; i < MBC; i++) {
        qr[i] = q + (size_t)(m0 + i) * ldq;
        qs[i] = (const float*)(qr[i] + cols);
        qsum[i] = (const int32_t*)(qs[i] + nb);
    }
#ifdef VNNI
    __m512 acc[RQ][MBQ];
    for (int j = 0; j < R; j++)
        for (int i = 0; i < MBC; i++) acc[j][i] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        int g = b / per_group;
        __m512i xe[MBQ], xo[MBQ];
        for (int i = 0; i < MBC; i++) {
            xe[i] = _mm512_loadu_si512((const void*)(qr[i] + (size_t)b * QBLK));
            xo[i] = _mm512_loadu_si512((const void*)(qr[i] + (size_t)b * QBLK + QBLK / 2));
        }
        for (int j = 0; j < R; j++) {
            float sw = bf16_scalar(srow[j][g]);
            int zp = (zrow[j][g] >> zsh[j]) & 0xF;
            if (PF_DIST) _mm_prefetch((const char*)row[j] + (size_t)b * 64 + PF_DIST, PF_HINT);
            __m512i wv = _mm512_loadu_si512((const void*)(row[j] + (size_t)b * 64));
            __m512i even = _mm512_and_si512(wv, nib), odd = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nib);
            for (int i = 0; i < MBC; i++) {
                __m512i d = _mm512_maskz_set1_epi32(1, -zp * qsum[i][b]);  /* the zero point's share, in lane 0 */
                d = _mm512_dpbusd_epi32(d, even, xe[i]);
                d = _mm512_dpbusd_epi32(d, odd, xo[i]);
                acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sw * qs[i][b]), acc[j][i]);
            }
        }
    }
    for (int j = 0; j < R; j++)
        for (int i = 0; i < MBC; i++) y[(size_t)(m0 + i) * ldy + r0 + j] = _mm512_reduce_add_ps(acc[j][i]);
#else
    float acc[RQ][MBQ];
    for (int j = 0; j < R; j++)
        for (int i = 0; i < MBC; i++) acc[j][i] = 0.0f;
    for (int b = 0; b < nb; b++) {
        int g = b / per_group;
        for (int j = 0; j < R; j++) {
            float sw = bf16_scalar(srow[j][g]);
            int zp = (zrow[j][g] >> zsh[j]) & 0xF;
            const uint8_t* wb = row[j] + (size_t)b * 64;
            for (int i = 0; i < MBC; i++) {
                const int8_t* qb = qr[i] + (size_t)b * QBLK;
                int32_t d = -zp * qsum[i][b];
                for (int k = 0; k < QBLK / 2; k++) d += (wb[k] & 0xF) * qb[k] + (wb[k] >> 4) * qb[QBLK / 2 + k];
                acc[j][i] += (float)d * (sw * qs[i][b]);
            }
        }
    }
    for (int j = 0; j < R; j++)
        for (int i = 0; i < MBC; i++) y[(size_t)(m0 + i) * ldy + r0 + j] = acc[j][i];
#endif
}

/* The exact path: one int4 row against fp32 activations, dequantised weight by weight ((u - zp) * s_w per group). */
static inline __attribute__((always_inline)) void int4_row_exact(
        const uint8_t* W, const uint16_t* S, const int32_t* Z, int r, int cols, int ld, int G, int group,
        const float* x, int ldx, int m0, float* y, int ldy, const int MBC) {
    const uint8_t* row = W + (size_t)r * (ld / 2);
    int zsh = 4 * (r % 8);
    float tot[MBQ];
    for (int i = 0; i < MBC; i++) tot[i] = 0.0f;
    for (int g = 0; g < (cols + group - 1) / group; g++) {
        int c0 = g * group, c1 = c0 + group < cols ? c0 + group : cols;
        float sw = bf16_scalar(S[(size_t)r * G + g]);
        int zp = (Z[(size_t)(r / 8) * G + g] >> zsh) & 0xF;
        float acc[MBQ];
        for (int i = 0; i < MBC; i++) acc[i] = 0.0f;
        for (int c = c0; c < c1; c += 2) {
            uint8_t byte = row[c / 2];
            float w0 = (float)((byte & 0xF) - zp), w1 = (float)((byte >> 4) - zp);
            for (int i = 0; i < MBC; i++) {
                const float* xr = x + (size_t)(m0 + i) * ldx + c;
                acc[i] += w0 * xr[0] + w1 * xr[1];
            }
        }
        for (int i = 0; i < MBC; i++) tot[i] += acc[i] * sw;
    }
    for (int i = 0; i < MBC; i++) y[(size_t)(m0 + i) * ldy + r] = tot[i];
}

/* Task t of y = x @ W^T for an int4 W [rows, cols] (rows a multiple of RQ, as int4 layouts' 8 | rows gives): rows
   RQ t .. RQ t + RQ - 1 for all M tokens, MBQ at a time; int8 rows q (qrow_bytes(ld) bytes apart, each quantised over
   `cols` values) when given, else the exact path on x (rows ld apart). W's rows hold `ld` weights (ceil(ld / group)
   scales and zero points) of which the `cols` from W on are used: a column slice starts at a group. */
static void int4_task(const uint8_t* W, const uint16_t* S, const int32_t* Z, int cols, int ld, int group,
                      const int8_t* q, const float* x, int M, float* y, int ldy, long t) {
    int r0 = (int)t * RQ, G = (ld + group - 1) / group;
    size_t ldq = qrow_bytes(ld);
    for (int m0 = 0; m0 < M; m0 += MBQ) {
        int mb = M - m0 < MBQ ? M - m0 : MBQ;
        if (q) {
            switch (mb) {
#define CASE(n) case n: int4_rows_q(W, S, Z, r0, cols, ld, G, group, q, ldq, m0, y, ldy, RQ, n); break;
                CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
            }
        } else {
            for (int r = r0; r < r0 + RQ; r++) {
                switch (mb) {
#define CASE(n) case n: int4_row_exact(W, S, Z, r, cols, ld, G, group, x, ld, m0, y, ldy, n); break;
                    CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
                }
            }
        }
    }
}

static long tasks_for(int rows, int M, int fmt) {
    return fmt == FMT_INT4 ? rows / RQ : M <= 2 ? rows : (rows + 1) / 2;
}

static int find(const long* offs, int n, long t) {  /* offs: n + 1 prefix sums; the e with offs[e] <= t < offs[e+1] */
    int lo = 0, hi = n - 1;
    while (lo < hi) { int mid = (lo + hi + 1) / 2; if (offs[mid] <= t) lo = mid; else hi = mid - 1; }
    return lo;
}

/* One call's arguments (mirrored by `_Job` in Python). n routed experts:
   y_e = down_e(silu(gate_e(x_e)) * up_e(x_e)); per expert e: x[e] [M[e], K] fp32, scratch gu[e] [M[e], 2N],
   h[e] [M[e], N], output y[e] [M[e], K]. Weights per format (fmt): w13 / w2 with block scales s13 / s2 (fp32, FP8),
   or int4 bytes with bf16 group scales s13 / s2 and packed zero points z13 / z2 (`group` inputs each); int4 with
   int8 activations needs `q`, int4_scratch_bytes(sum of M, K, N) of scratch (`exact` = 1: the fp32 path instead).
   c0 (NULL: all 0): expert e computes only its intermediate columns [c0[e], N) (gate and up rows, down columns; a
   multiple of 128 and of the format's blocks): its share of a split with the GPU, which computes [0, c0[e]); the
   down projection is linear in those columns, so the two partial outputs add up to the expert's.
   With `out` set, the outputs are also reduced per token: the R rows of y (contiguous from y[0]) are routes of
   tokens tok[r] with weights w[r], and out [M_out, K] receives out[m] = sum over r with tok[r] == m of w[r] * y_r,
   r in order. */
typedef struct {
    int n;
    const void** w13; const void** s13; const void** w2; const void** s2; const void** z13; const void** z2;
    const float** x; const int* M; float** gu; float** h; float** y; const int* c0;
    int K, N, bn, bk, fmt, group, exact, threads;
    int8_t* q; int64_t q_bytes;
    int R, M_out; const int64_t* tok; const float* w; float* out;
    double seconds;  /* set by the call: its own wall time */
} job_t;

static double now_s(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static inline float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* All of a job in one parallel region: three work-shared loops (gate/up rows, SiLU*up, down rows) and, with
   `out`, a fourth over column chunks of the output (each chunk sums its routes in order: deterministic). int4 with
   int8 activations quantises x first (per row and 128-block) and quantises h as SiLU*up writes it. */
void experts_run(job_t* j) {
    double t0 = now_s();
    long o0[257], o1[257], o2[257], o3[257], o4[257];
    int c0[256];
    int n = j->n, K = j->K, N = j->N, fmt = j->fmt;
    if (n > 256) return;
    int int4 = fmt == FMT_INT4;
    o0[0] = o1[0] = o2[0] = o3[0] = o4[0] = 0;
    for (int e = 0; e < n; e++) {
        c0[e] = j->c0 ? j->c0[e] : 0;
        int Ne = N - c0[e];  /* this expert's intermediate columns */
        o0[e + 1] = o0[e] + j->M[e];
        o1[e + 1] = o1[e] + 2 * tasks_for(Ne, j->M[e], fmt);
        o2[e + 1] = o2[e] + (long)j->M[e] * Ne;
        o3[e + 1] = o3[e] + tasks_for(K, j->M[e], fmt);
        o4[e + 1] = o4[e] + (long)j->M[e] * (Ne / QBLK);
    }
    int i8 = int4 && !j->exact && K % QBLK == 0 && N % QBLK == 0 && j->group % QBLK == 0 && j->q != NULL
             && j->q_bytes >= int4_scratch_bytes((int)o0[n], K, N);
    for (int e = 0; i8 && e < n; e++) i8 = c0[e] % QBLK == 0 && c0[e] % j->group == 0;
    int8_t* qx = i8 ? (int8_t*)(((uintptr_t)j->q + 63) & ~(uintptr_t)63) : NULL;
    int8_t* qh = i8 ? qx + o0[n] * qrow_bytes(K) : NULL;
    long nbK = K / QBLK;
    long chunks = j->out ? (K + 255) / 256 : 0;
    size_t eb = fmt == FMT_BF16 ? 2 : 1;  /* bytes per weight (int4: per two, handled below) */
    if (j->threads > 0) omp_set_num_threads(j->threads);
    #pragma omp parallel
    {
        if (i8) {
            #pragma omp for schedule(static)
            for (long t = 0; t < o0[n] * nbK; t++) {
                long row = t / nbK;
                int e = find(o0, n, row);
                quant_block(j->x[e] + (size_t)(row - o0[e]) * K, qx + row * qrow_bytes(K), K, (int)(t % nbK));
            }
        }
        #pragma omp for schedule(dynamic, 16)  /* threads that wake late take less */
        for (long t = 0; t < o1[n]; t++) {
            int e = find(o1, n, t), Ne = N - c0[e];
            long half = tasks_for(Ne, j->M[e], fmt), tt = t - o1[e];
            int base = tt < half ? c0[e] : N + c0[e];  /* gate rows [c0, N), then up rows [N + c0, 2N) */
            tt = tt < half ? tt : tt - half;
            if (int4) {
                long G = (K + j->group - 1) / j->group;
                int4_task((const uint8_t*)j->w13[e] + (size_t)base * (K / 2),
                          (const uint16_t*)j->s13[e] + (size_t)base * G, (const int32_t*)j->z13[e] + (size_t)base / 8 * G,
                          K, K, j->group, i8 ? qx + o0[e] * qrow_bytes(K) : NULL, j->x[e], j->M[e],
                          j->gu[e] + base, 2 * N, tt);
            } else {
                const float* s13 = fmt == FMT_FP8 ? (const float*)j->s13[e] + (size_t)(base / j->bn) * ((K + j->bk - 1) / j->bk)
                                                  : NULL;
                gemm_task((const uint8_t*)j->w13[e] + (size_t)base * K * eb, s13, Ne, K, K, j->bn, j->bk,
                          fmt == FMT_FP8, j->x[e], K, j->M[e], j->gu[e] + base, 2 * N, tt);
            }
        }
        if (i8) {
            #pragma omp for schedule(static)
            for (long t = 0; t < o4[n]; t++) {
                int e = find(o4, n, t), Ne = N - c0[e];
                long nb = Ne / QBLK, row = o0[e] + (t - o4[e]) / nb;
                int b = (int)((t - o4[e]) % nb);
                const float* gu = j->gu[e] + (size_t)(row - o0[e]) * 2 * N + c0[e];
                float* h = j->h[e] + (size_t)(row - o0[e]) * N + c0[e];
                for (int c = b * QBLK; c < (b + 1) * QBLK; c++) h[c] = silu_mul(gu[c], gu[N + c]);
                quant_block(h, qh + row * qrow_bytes(N), Ne, b);
            }
        } else {
            #pragma omp for schedule(static)
            for (long t = 0; t < o2[n]; t++) {
                int e = find(o2, n, t), Ne = N - c0[e];
                long i = t - o2[e];
                int m = (int)(i / Ne), c = c0[e] + (int)(i % Ne);
                j->h[e][(size_t)m * N + c] = silu_mul(j->gu[e][(size_t)m * 2 * N + c], j->gu[e][(size_t)m * 2 * N + N + c]);
            }
        }
        #pragma omp for schedule(dynamic, 16)  /* threads that wake late take less */
        for (long t = 0; t < o3[n]; t++) {
            int e = find(o3, n, t), c = c0[e];
            if (int4) {
                int4_task((const uint8_t*)j->w2[e] + c / 2, (const uint16_t*)j->s2[e] + c / j->group,
                          (const int32_t*)j->z2[e] + c / j->group, N - c, N, j->group,
                          i8 ? qh + o0[e] * qrow_bytes(N) : NULL, j->h[e] + c, j->M[e], j->y[e], K, t - o3[e]);
            } else {
                const float* s2 = fmt == FMT_FP8 ? (const float*)j->s2[e] + c / j->bk : NULL;
                gemm_task((const uint8_t*)j->w2[e] + (size_t)c * eb, s2, K, N - c, N, j->bn, j->bk, fmt == FMT_FP8,
                          j->h[e] + c, N, j->M[e], j->y[e], K, t - o3[e]);
            }
        }
        #pragma omp for schedule(static)
        for (long ch = 0; ch < chunks; ch++) {
            int cc0 = (int)ch * 256, cc1 = cc0 + 256 < K ? cc0 + 256 : K;
            const float* y0 = j->y[0];
            for (int m = 0; m < j->M_out; m++)
                for (int c = cc0; c < cc1; c++) j->out[(size_t)m * K + c] = 0.0f;
            for (int r = 0; r < j->R; r++) {
                float* o = j->out + (size_t)j->tok[r] * K;
                const float* yr = y0 + (size_t)r * K;
                float wr = j->w[r];
                for (int c = cc0; c < cc1; c++) o[c] += wr * yr[c];
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
   Header: layer index, n_cpu, n_miss, M, R, k, split column (0, or the first intermediate column of the last of the
   CPU's experts that the CPU computes: the GPU computes the columns before it). Arrays: experts [n_cpu] (in the order their routes are grouped),
   ids [R] and w [R] (route r = token * k + j), x [M, K] fp32. Per-layer stats [L, 4]: jobs, experts, routes,
   seconds; the log ring [cap, 8]: layer, n_miss, n_cpu, M, rows, t_start, t_end (CLOCK_MONOTONIC seconds), and the
   CPU's share of a split expert's columns (0 without one). */
typedef struct {
    volatile uint32_t* ready; volatile uint32_t* done; const volatile int32_t* hdr;
    const int32_t* experts; const int32_t* ids; const float* w; const float* x; float* out;
    int R_max, M_max, E, L;
    const uint8_t** w13; const uint8_t** s13; const uint8_t** w2; const uint8_t** s2;  /* [L] section bases */
    const uint8_t** z13; const uint8_t** z2;  /* [L] int4 zero point section bases */
    int64_t st13, sts13, st2, sts2, stz13, stz2;  /* bytes per expert in each section */
    int K, N, bn, bk, fmt, group, exact, threads;
    float* xr; float* gu; float* hbuf; float* y; int64_t* tok; float* wr;  /* scratch for R_max rows */
    int8_t* q; int64_t q_bytes;  /* int4: quantised activations of R_max rows (int4_scratch_bytes) */
    double spin_s;
    double* layer_stats; double* log; int64_t log_cap; volatile int64_t* log_n; volatile int64_t* errors;
} server_cfg_t;

typedef struct { pthread_t th; server_cfg_t c; volatile int quit; } server_t;

static void serve_one(server_cfg_t* c) {
    double t0 = now_s();
    int layer = c->hdr[0], n = c->hdr[1], n_miss = c->hdr[2], M = c->hdr[3], R = c->hdr[4], k = c->hdr[5];
    int split = c->hdr[6];
    int K = c->K, N = c->N;
    int ok = layer >= 0 && layer < c->L && n >= 0 && n <= n_miss && n <= 256 && M >= 1 && M <= c->M_max && k >= 1
             && R == M * k && R <= c->R_max && split >= 0 && split < N && (split == 0 || n >= 1) && split % 32 == 0
             && (c->fmt != FMT_FP8 || (split % c->bn == 0 && split % c->bk == 0))
             && (c->fmt != FMT_INT4 || (split % c->group == 0 && split % QBLK == 0));  /* column_granule */
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
        const void *w13[256], *s13[256], *w2[256], *s2[256], *z13[256], *z2[256];
        const float* xs[256]; float *gus[256], *hs[256], *ys[256]; int Ms[256], c0[256];
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
            c0[i] = i == n - 1 ? split : 0;
            xs[i] = c->xr + (size_t)start * K; gus[i] = c->gu + (size_t)start * 2 * N;
            hs[i] = c->hbuf + (size_t)start * N; ys[i] = c->y + (size_t)start * K;
            w13[i] = c->w13[layer] + e * c->st13; w2[i] = c->w2[layer] + e * c->st2;
            s13[i] = c->fmt != FMT_BF16 ? (const void*)(c->s13[layer] + e * c->sts13) : NULL;
            s2[i] = c->fmt != FMT_BF16 ? (const void*)(c->s2[layer] + e * c->sts2) : NULL;
            z13[i] = c->fmt == FMT_INT4 ? (const void*)(c->z13[layer] + e * c->stz13) : NULL;
            z2[i] = c->fmt == FMT_INT4 ? (const void*)(c->z2[layer] + e * c->stz2) : NULL;
        }
        job_t j = {n, w13, s13, w2, s2, z13, z2, xs, Ms, gus, hs, ys, c0, K, N, c->bn, c->bk, c->fmt, c->group,
                   c->exact, c->threads, c->q, c->q_bytes, rows, M, c->tok, c->wr, c->out, 0.0};
        experts_run(&j);
    }
    double t1 = now_s();
    double* ls = c->layer_stats + 4 * layer;
    double part = split ? (double)(N - split) / N : 0.0;  /* the CPU's share of the split expert */
    ls[0] += 1; ls[1] += n - (split ? 1 : 0) + part; ls[2] += rows; ls[3] += t1 - t0;
    int64_t at = *c->log_n;
    double* rec = c->log + 8 * (at % c->log_cap);
    rec[0] = layer; rec[1] = n_miss; rec[2] = n; rec[3] = M; rec[4] = rows; rec[5] = t0; rec[6] = t1; rec[7] = part;
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

/* Field names and offsets of the structs above, for the loader's check against its ctypes mirrors. */
typedef struct { const char* name; int64_t offset; } field_t;
#define FIELD(T, f) {#f, (int64_t)offsetof(T, f)},
static const field_t job_fields[] = {
    FIELD(job_t, n) FIELD(job_t, w13) FIELD(job_t, s13) FIELD(job_t, w2) FIELD(job_t, s2) FIELD(job_t, z13)
    FIELD(job_t, z2) FIELD(job_t, x) FIELD(job_t, M) FIELD(job_t, gu) FIELD(job_t, h) FIELD(job_t, y) FIELD(job_t, c0)
    FIELD(job_t, K) FIELD(job_t, N) FIELD(job_t, bn) FIELD(job_t, bk) FIELD(job_t, fmt) FIELD(job_t, group)
    FIELD(job_t, exact) FIELD(job_t, threads) FIELD(job_t, q) FIELD(job_t, q_bytes) FIELD(job_t, R)
    FIELD(job_t, M_out) FIELD(job_t, tok) FIELD(job_t, w) FIELD(job_t, out) FIELD(job_t, seconds)
};
static const field_t server_cfg_fields[] = {
    FIELD(server_cfg_t, ready) FIELD(server_cfg_t, done) FIELD(server_cfg_t, hdr) FIELD(server_cfg_t, experts)
    FIELD(server_cfg_t, ids) FIELD(server_cfg_t, w) FIELD(server_cfg_t, x) FIELD(server_cfg_t, out)
    FIELD(server_cfg_t, R_max) FIELD(server_cfg_t, M_max) FIELD(server_cfg_t, E) FIELD(server_cfg_t, L)
    FIELD(server_cfg_t, w13) FIELD(server_cfg_t, s13) FIELD(server_cfg_t, w2) FIELD(server_cfg_t, s2)
    FIELD(server_cfg_t, z13) FIELD(server_cfg_t, z2) FIELD(server_cfg_t, st13) FIELD(server_cfg_t, sts13)
    FIELD(server_cfg_t, st2) FIELD(server_cfg_t, sts2) FIELD(server_cfg_t, stz13) FIELD(server_cfg_t, stz2)
    FIELD(server_cfg_t, K) FIELD(server_cfg_t, N) FIELD(server_cfg_t, bn) FIELD(server_cfg_t, bk)
    FIELD(server_cfg_t, fmt) FIELD(server_cfg_t, group) FIELD(server_cfg_t, exact) FIELD(server_cfg_t, threads)
    FIELD(server_cfg_t, xr) FIELD(server_cfg_t, gu) FIELD(server_cfg_t, hbuf) FIELD(server_cfg_t, y)
    FIELD(server_cfg_t, tok) FIELD(server_cfg_t, wr) FIELD(server_cfg_t, q) FIELD(server_cfg_t, q_bytes)
    FIELD(server_cfg_t, spin_s) FIELD(server_cfg_t, layer_stats) FIELD(server_cfg_t, log) FIELD(server_cfg_t, log_cap)
    FIELD(server_cfg_t, log_n) FIELD(server_cfg_t, errors)
};
#undef FIELD

/* which 0: job_t, 1: server_cfg_t. Sets *n_fields and *size; NULL for an unknown `which`. */
const field_t* struct_layout(int which, int* n_fields, int64_t* size) {
    if (which == 0) {
        *n_fields = (int)(sizeof(job_fields) / sizeof(job_fields[0]));
        *size = (int64_t)sizeof(job_t);
        return job_fields;
    }
    if (which == 1) {
        *n_fields = (int)(sizeof(server_cfg_fields) / sizeof(server_cfg_fields[0]));
        *size = (int64_t)sizeof(server_cfg_t);
        return server_cfg_fields;
    }
    return NULL;
}
