/*
 * Weight-compressed fp32 GEMM for CPU decoding: y[n, m] = x[n, k] @ dequant(w)[m, k]^T, with x and
 * y fp32 and the weight kept in its storage format, dequantised in registers:
 *
 *   kind 1  F16   w[o] = k halves (2 bytes each); exact conversion to fp32
 *   kind 2  Q4_1  per 32 values: fp16 d, fp16 m, 16 bytes of nibbles (value j < 16 in the low
 *                 nibble of byte j, value j + 16 in its high nibble); w = fl(fl(q * d) + m)
 *   kind 3  Q8_0  per 32 values: fp16 d, 32 int8; w = fl(q * d)
 *
 * The dequantised values are bit-identical to ggml's reference dequantisation
 * (dequantize_row_q4_1 / _q8_0), gguf-py's and this project's converter's numpy one (a multiply,
 * then an add, each rounded to fp32; no FMA), so the product uses
 * exactly the fp32 weights of the converted checkpoint while reading 2x (F16), 6.4x (Q4_1) or
 * 3.8x (Q8_0) fewer bytes. Decoding on a CPU is bound by those bytes.
 *
 * Batch invariance: y[i, o] is always computed by the same sequence of operations, whatever n,
 * i, the kernel shape, the thread count or the work split:
 *
 *   acc[0..15] = 0
 *   for each chunk c of 16 consecutive k (c = 0, 1, ...): acc[j] = fma(x[i, 16c + j], w[o, 16c + j], acc[j])
 *   a[j] = acc[j] + acc[j + 8]; s[j] = a[j] + a[j + 4]       (j = 0..7, then 0..3)
 *   y[i, o] = (s[0] + s[2]) + (s[1] + s[3])
 *
 * so row i of a batched call equals the 1-row call on x[i] bit for bit (greedy speculative
 * decoding reproduces the target's own greedy tokens). Built with -ffp-contract=off, no
 * -ffast-math. Needs AVX-512F, FMA and F16C (checked by quant_gemm_supported); k must be a
 * multiple of 32 for Q4_1/Q8_0 and of 16 for F16 (the Python side checks).
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "quant_gemm.h"
#include "thread_pool.h"

/* Bytes per stored weight row of k values. */
long long quant_row_bytes(int kind, int k) {
    switch (kind) {
    case QUANT_F16: return 2LL * k;
    case QUANT_Q4_1: return (long long)(k / 32) * 20;
    case QUANT_Q8_0: return (long long)(k / 32) * 34;
    default: return -1;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

int quant_gemm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

#define INLINE static inline __attribute__((always_inline))
#define MIN_THREAD_WORK 65536 /* weights per thread, at least */
#define QTILE 4  /* weight rows per tile (threads split tiles) */
#define QGROUP 8 /* rows of x per kernel call */
#define PF_ROWS 8 /* software prefetch distance in weight rows (measured: 8 > 4, 16, 32) */

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")

INLINE float reduce16(__m512 v) {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 a = _mm256_add_ps(lo, hi);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                    /* s0+s2, s1+s3 */
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, _MM_SHUFFLE(1, 1, 1, 1))); /* (s0+s2)+(s1+s3) */
    return _mm_cvtss_f32(t);
}

INLINE float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* One 32-value block as two 16-lane vectors (values 0..15 and 16..31). The block has only 16
 * distinct values, fl(fl(q * d) + m) for q = 0..15: they are computed once into one register
 * (the same two roundings as the reference) and each value is looked up by its nibble
 * (vpermps reads the low 4 bits of each lane, so the low nibble needs no mask). */
INLINE void deq_q4_1(const uint8_t *blk, __m512 *w0, __m512 *w1) {
    const __m512 iota = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f,
                                       11.f, 12.f, 13.f, 14.f, 15.f);
    const __m512 table = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(half_at(blk))),
                                       _mm512_set1_ps(half_at(blk + 2)));
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 4)));
    *w0 = _mm512_permutexvar_ps(q, table);
    *w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
}

INLINE void deq_q8_0(const uint8_t *blk, __m512 *w0, __m512 *w1) {
    const __m512 d = _mm512_set1_ps(half_at(blk));
    const __m128i a = _mm_loadu_si128((const __m128i *)(blk + 2));
    const __m128i b = _mm_loadu_si128((const __m128i *)(blk + 18));
    *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d);
    *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
}

/* R rows of x against C weight rows over all k. KIND, R and C are constants at every call site
 * (the switch below), so the loops unroll and the accumulators live in registers. */
INLINE void quant_block(const int KIND, const int R, const int C, const float *restrict x,
                        size_t ldx, const uint8_t *restrict w, size_t ldw, float *restrict y,
                        size_t ldy, int k) {
    __m512 acc[QGROUP][QTILE];
    const size_t pf = PF_ROWS * ldw; /* prefetch distance: the rows two tiles ahead */
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    if (KIND == QUANT_F16) {
        for (int q = 0; q < k / 16; ++q) {
            __m512 wv[QTILE];
            for (int c = 0; c < C; ++c)
                _mm_prefetch((const char *)(w + c * ldw + (size_t)q * 32) + pf, _MM_HINT_T0);
            for (int c = 0; c < C; ++c)
                wv[c] = _mm512_cvtph_ps(
                    _mm256_loadu_si256((const __m256i *)(w + c * ldw + (size_t)q * 32)));
            for (int r = 0; r < R; ++r) {
                const __m512 xv = _mm512_loadu_ps(x + r * ldx + (size_t)q * 16);
                for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
    } else {
        const size_t bb = KIND == QUANT_Q4_1 ? 20 : 34;
        for (int b = 0; b < k / 32; ++b) {
            __m512 w0[QTILE], w1[QTILE];
            for (int c = 0; c < C; ++c)
                _mm_prefetch((const char *)(w + c * ldw + (size_t)b * bb) + pf, _MM_HINT_T0);
            for (int c = 0; c < C; ++c) {
                if (KIND == QUANT_Q4_1)
                    deq_q4_1(w + c * ldw + (size_t)b * bb, &w0[c], &w1[c]);
                else
                    deq_q8_0(w + c * ldw + (size_t)b * bb, &w0[c], &w1[c]);
            }
            for (int r = 0; r < R; ++r) {
                const __m512 x0 = _mm512_loadu_ps(x + r * ldx + (size_t)b * 32);
                const __m512 x1 = _mm512_loadu_ps(x + r * ldx + (size_t)b * 32 + 16);
                for (int c = 0; c < C; ++c) {
                    acc[r][c] = _mm512_fmadd_ps(x0, w0[c], acc[r][c]);
                    acc[r][c] = _mm512_fmadd_ps(x1, w1[c], acc[r][c]);
                }
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) y[r * ldy + c] = reduce16(acc[r][c]);
}

#define QK(KIND_, R_, C_)                                                                     \
    case (R_) * 8 + (C_): quant_block(KIND_, R_, C_, x, ldx, w, ldw, y, ldy, k); return

#define QK_ROWS(KIND_, C_)                                                                    \
    QK(KIND_, 1, C_); QK(KIND_, 2, C_); QK(KIND_, 3, C_); QK(KIND_, 4, C_);                  \
    QK(KIND_, 5, C_); QK(KIND_, 6, C_); QK(KIND_, 7, C_); QK(KIND_, 8, C_)

/* C <= 4 weight rows for r <= 4 x rows, C <= 2 for r <= 8: at most 16 accumulators. */
#define QK_KIND(NAME, KIND_)                                                                  \
    static void NAME(int r, int c, const float *x, size_t ldx, const uint8_t *w, size_t ldw,  \
                     float *y, size_t ldy, int k) {                                           \
        switch (r * 8 + c) {                                                                  \
            QK_ROWS(KIND_, 1);                                                                \
            QK_ROWS(KIND_, 2);                                                                \
            QK(KIND_, 1, 4); QK(KIND_, 2, 4); QK(KIND_, 3, 4); QK(KIND_, 4, 4);              \
        default: return;                                                                      \
        }                                                                                     \
    }

QK_KIND(quant_kernel_f16, QUANT_F16)
QK_KIND(quant_kernel_q4_1, QUANT_Q4_1)
QK_KIND(quant_kernel_q8_0, QUANT_Q8_0)

#pragma GCC pop_options

typedef void (*quant_kernel_fn)(int, int, const float *, size_t, const uint8_t *, size_t,
                                float *, size_t, int);

static void quant_range(quant_kernel_fn fn, const float *x, size_t ldx, const uint8_t *w,
                        size_t ldw, float *y, int n, int k, int m, int o_begin, int o_end) {
    for (int o = o_begin; o < o_end; o += QTILE) {
        const int ct = o_end - o < QTILE ? o_end - o : QTILE;
        for (int r0 = 0; r0 < n; r0 += QGROUP) {
            const int r = n - r0 < QGROUP ? n - r0 : QGROUP;
            const int cmax = r <= 4 ? 4 : 2;
            for (int c0 = 0; c0 < ct; c0 += cmax) {
                const int c = ct - c0 < cmax ? ct - c0 : cmax;
                fn(r, c == 3 ? 2 : c, x + (size_t)r0 * ldx, ldx, w + (size_t)(o + c0) * ldw, ldw,
                   y + (size_t)r0 * m + o + c0, (size_t)m, k);
                if (c == 3) /* no 3-column kernel: 2 + 1 */
                    fn(r, 1, x + (size_t)r0 * ldx, ldx, w + (size_t)(o + c0 + 2) * ldw, ldw,
                       y + (size_t)r0 * m + o + c0 + 2, (size_t)m, k);
            }
        }
    }
}

typedef struct {
    quant_kernel_fn fn;
    const float *x;
    const uint8_t *w;
    float *y;
    size_t ldx, ldw;
    int n, k, m, tiles;
} quant_job_t;

/* Part t of T: a contiguous range of weight tiles (the prefetch stream runs across tiles). */
static void quant_part(void *arg, int t, int T) {
    const quant_job_t *j = arg;
    int tb, te;
    pool_part(j->tiles, t, T, &tb, &te);
    const int ob = tb * QTILE, oe = te * QTILE < j->m ? te * QTILE : j->m;
    if (ob < oe) quant_range(j->fn, j->x, j->ldx, j->w, j->ldw, j->y, j->n, j->k, j->m, ob, oe);
}

/* y[n, m] = x[n, k] (row stride ldx) @ dequant(w)^T; returns 0, or -1 for a bad kind or k or
 * a CPU without AVX-512F/FMA/F16C. */
int quant_gemm_f32(const float *x, const uint8_t *w, float *y, int n, int k, int m, int ldx,
                   int kind, int nthreads) {
    static int supported = -1; /* the CPU check, once (a benign race: same value) */
    if (supported < 0) supported = quant_gemm_supported();
    if (!supported) return -1;
    quant_kernel_fn fn;
    switch (kind) {
    case QUANT_F16: fn = quant_kernel_f16; if (k % 16) return -1; break;
    case QUANT_Q4_1: fn = quant_kernel_q4_1; if (k % 32) return -1; break;
    case QUANT_Q8_0: fn = quant_kernel_q8_0; if (k % 32) return -1; break;
    default: return -1;
    }
    if (n <= 0 || m <= 0) return 0;
    const quant_job_t j = {fn, x, w, y, (size_t)ldx, (size_t)quant_row_bytes(kind, k), n, k, m,
                           (m + QTILE - 1) / QTILE};
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > j.tiles) nt = j.tiles;
    /* a fork/join costs about as much as streaming MIN_THREAD_WORK weights: small matrices
     * (tiny test models) stay on the calling thread. Results do not depend on nt. */
    const long long per = (long long)m * k / MIN_THREAD_WORK;
    if (nt > per) nt = per < 1 ? 1 : (int)per;
    pool_run(quant_part, (void *)&j, nt);
    return 0;
}

#else

int quant_gemm_supported(void) { return 0; }
int quant_gemm_f32(const float *x, const uint8_t *w, float *y, int n, int k, int m, int ldx,
                   int kind, int nthreads) {
    (void)x; (void)w; (void)y; (void)n; (void)k; (void)m; (void)ldx; (void)kind; (void)nthreads;
    return -1;
}

#endif
