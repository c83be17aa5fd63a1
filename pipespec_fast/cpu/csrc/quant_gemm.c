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
 *
 * Two loop nests compute that same sequence:
 *
 *   short blocks (n < long_rows: decoding, verification) stream the packed rows from memory
 *     once per call and dequantise them in registers for at most QGROUP rows of x at a time:
 *     the step is bound by the weight bytes, so reading fewer of them is the speed;
 *   long blocks (prefills) are bound by the FMAs, and dequantising a weight for every 8 rows
 *     of x would cost more than it saves. They dequantise PANEL weight rows at a time into an
 *     fp32 panel (L2-resident, one per thread) and run every row of a block of ROW_BLOCK rows
 *     of x against it, PR x PC outputs per kernel call; each panel is dequantised once per
 *     ROW_BLOCK rows (a few percent of the FMAs). No fp32 copy of the weight outlives the call.
 *
 * Only the loops differ: an output's 16-lane accumulator still takes its chunks of k in order
 * from zero with one fma each, the panel holds the very values deq_* computes, and the final
 * reduction is reduce16. So which path ran (n, the long_rows threshold) never changes a bit.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
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
#define PANEL 24 /* long blocks: weight rows dequantised into one fp32 panel (a multiple of PC) */
#define PR 4     /* long blocks: rows of x per panel kernel */
#define PC 6     /* long blocks: panel rows per panel kernel (PR * PC = 24 accumulators) */
#define ROW_BLOCK 64 /* long blocks: rows of x that stay in L2 while a part's panels pass */

/* n from which quant_gemm_f32 takes the panel path (quant_gemm_set_long_rows; the results are
 * the same either way, only the speed differs). */
static int long_rows = QUANT_LONG_ROWS;

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

/* Dequantise c packed rows (row stride ldw) into panel rows p[r * k .. r * k + k), with the
 * very deq_* functions of the short path. */
static void panel_dequant(int kind, const uint8_t *restrict w, size_t ldw, int c, int k,
                          float *restrict p) {
    for (int r = 0; r < c; ++r) {
        const uint8_t *row = w + (size_t)r * ldw;
        float *out = p + (size_t)r * k;
        __m512 w0, w1;
        switch (kind) {
        case QUANT_F16:
            for (int q = 0; q < k / 16; ++q)
                _mm512_storeu_ps(out + 16 * q, _mm512_cvtph_ps(_mm256_loadu_si256(
                                                   (const __m256i *)(row + (size_t)q * 32))));
            break;
        case QUANT_Q4_1:
            for (int b = 0; b < k / 32; ++b) {
                deq_q4_1(row + (size_t)b * 20, &w0, &w1);
                _mm512_storeu_ps(out + 32 * b, w0);
                _mm512_storeu_ps(out + 32 * b + 16, w1);
            }
            break;
        default:
            for (int b = 0; b < k / 32; ++b) {
                deq_q8_0(row + (size_t)b * 34, &w0, &w1);
                _mm512_storeu_ps(out + 32 * b, w0);
                _mm512_storeu_ps(out + 32 * b + 16, w1);
            }
        }
    }
}

/* reduce16 of eight accumulators at once, the very additions of reduce16 for each (a[j] =
 * v[j] + v[j + 8]; s[j] = a[j] + a[j + 4]; (s0 + s2) + (s1 + s3)), done with the eight side by
 * side in the lanes: about 3 instructions per result instead of 8, which matters where every
 * output of a long block ends in a reduction (k / 16 FMAs each). */
INLINE void reduce16x8(const __m512 *v, float *out) {
    __m512 a[4], s[2];
    for (int i = 0; i < 4; ++i) /* [v0 lanes 0-7 | v1 lanes 0-7] + [v0 8-15 | v1 8-15] */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; ++i) /* blocks [a0 | a1 | a2 | a3] of four vectors: a0 + a1 */
        s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    /* per 128-bit block: (s0, s1) of s[0] and s[1] + (s2, s3) of each: (t0, t1) pairs */
    const __m512 t = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s[0]), _mm512_castps_pd(s[1]))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s[0]), _mm512_castps_pd(s[1]))));
    const __m512 y = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));
    const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm256_storeu_ps(out, _mm512_castps512_ps256(_mm512_permutexvar_ps(pick, y)));
}

/* R rows of x against C panel rows (row stride k) over all k: quant_block's arithmetic on
 * weights already dequantised. R and C are constants at every call site (the switch below). */
INLINE void panel_block(const int R, const int C, const float *restrict x, size_t ldx,
                        const float *restrict p, int k, float *restrict y, size_t ldy) {
    __m512 acc[PR][PC];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int q = 0; q < k / 16; ++q) {
        __m512 wv[PC];
        for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(p + (size_t)c * k + (size_t)q * 16);
        for (int r = 0; r < R; ++r) {
            const __m512 xv = _mm512_loadu_ps(x + r * ldx + (size_t)q * 16);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    /* the accumulators, row-major, padded with zeros to whole groups of 8, reduced together */
    __m512 v[PR * PC + 7];
    float out[PR * PC + 7];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) v[r * C + c] = acc[r][c];
    for (int i = R * C; i < (R * C + 7) / 8 * 8; ++i) v[i] = _mm512_setzero_ps();
    for (int i = 0; i < R * C; i += 8) reduce16x8(v + i, out + i);
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) y[r * ldy + c] = out[r * C + c];
}

#define PK(R_, C_)                                                                            \
    case (R_) * 8 + (C_): panel_block(R_, C_, x, ldx, p, k, y, ldy); return
#define PK_COLS(R_) PK(R_, 1); PK(R_, 2); PK(R_, 3); PK(R_, 4); PK(R_, 5); PK(R_, 6)

static void panel_kernel(int r, int c, const float *x, size_t ldx, const float *p, int k,
                         float *y, size_t ldy) {
    switch (r * 8 + c) {
        PK_COLS(1);
        PK_COLS(2);
        PK_COLS(3);
        PK_COLS(4);
    default: return;
    }
}

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
    float *panels; /* long blocks: one PANEL x k fp32 panel per part */
    size_t ldx, ldw;
    int n, k, m, tiles, kind;
} quant_job_t;

/* Long blocks, part t of T: a contiguous range of panels (output columns) against every row of
 * x, ROW_BLOCK rows at a time (those rows stay in L2 while the part's panels pass). */
static void quant_long_part(void *arg, int t, int T) {
    const quant_job_t *j = arg;
    int tb, te;
    pool_part(j->tiles, t, T, &tb, &te);
    float *p = j->panels + (size_t)t * PANEL * j->k;
    for (int r0 = 0; r0 < j->n; r0 += ROW_BLOCK) {
        const int rb = j->n - r0 < ROW_BLOCK ? j->n - r0 : ROW_BLOCK;
        for (int tile = tb; tile < te; ++tile) {
            const int o = tile * PANEL, pc = j->m - o < PANEL ? j->m - o : PANEL;
            panel_dequant(j->kind, j->w + (size_t)o * j->ldw, j->ldw, pc, j->k, p);
            for (int c0 = 0; c0 < pc; c0 += PC) /* PC panel rows stay in L1 ... */
                for (int i = r0; i < r0 + rb; i += PR) /* ... while the x rows pass */
                    panel_kernel(i + PR <= r0 + rb ? PR : r0 + rb - i, pc - c0 < PC ? pc - c0 : PC,
                                 j->x + (size_t)i * j->ldx, j->ldx, p + (size_t)c0 * j->k, j->k,
                                 j->y + (size_t)i * j->m + o + c0, (size_t)j->m);
        }
    }
}

/* The panel path for n >= long_rows; returns 0, or -2 if the panels cannot be allocated. */
static int quant_gemm_long(quant_job_t *j, int nthreads) {
    j->tiles = (j->m + PANEL - 1) / PANEL;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > j->tiles) nt = j->tiles;
    const long long work = (long long)j->n * j->m * j->k; /* multiply-adds */
    if (work < (long long)MIN_THREAD_WORK * 16) nt = 1;
    j->panels = aligned_alloc(64, sizeof(float) * PANEL * (size_t)j->k * nt);
    if (!j->panels) return QUANT_OUT_OF_MEMORY;
    pool_run(quant_long_part, j, nt);
    free(j->panels);
    return 0;
}

int quant_gemm_set_long_rows(int n) {
    const int old = long_rows;
    long_rows = n < 1 ? QUANT_LONG_ROWS : n;
    return old;
}

/* Part t of T: a contiguous range of weight tiles (the prefetch stream runs across tiles). */
static void quant_part(void *arg, int t, int T) {
    const quant_job_t *j = arg;
    int tb, te;
    pool_part(j->tiles, t, T, &tb, &te);
    const int ob = tb * QTILE, oe = te * QTILE < j->m ? te * QTILE : j->m;
    if (ob < oe) quant_range(j->fn, j->x, j->ldx, j->w, j->ldw, j->y, j->n, j->k, j->m, ob, oe);
}

/* y[n, m] = x[n, k] (row stride ldx) @ dequant(w)^T; returns 0, QUANT_REFUSED for a bad kind
 * or k or a CPU without AVX-512F/FMA/F16C, QUANT_OUT_OF_MEMORY when a long block's panels
 * cannot be allocated. */
int quant_gemm_f32(const float *x, const uint8_t *w, float *y, int n, int k, int m, int ldx,
                   int kind, int nthreads) {
    static int supported = -1; /* the CPU check, once (a benign race: same value) */
    if (supported < 0) supported = quant_gemm_supported();
    if (!supported) return QUANT_REFUSED;
    quant_kernel_fn fn;
    switch (kind) {
    case QUANT_F16: fn = quant_kernel_f16; if (k % 16) return QUANT_REFUSED; break;
    case QUANT_Q4_1: fn = quant_kernel_q4_1; if (k % 32) return QUANT_REFUSED; break;
    case QUANT_Q8_0: fn = quant_kernel_q8_0; if (k % 32) return QUANT_REFUSED; break;
    default: return QUANT_REFUSED;
    }
    if (n <= 0 || m <= 0) return 0;
    quant_job_t j = {fn, x, w, y, NULL, (size_t)ldx, (size_t)quant_row_bytes(kind, k), n, k, m,
                     (m + QTILE - 1) / QTILE, kind};
    if (n >= long_rows) return quant_gemm_long(&j, nthreads);
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
int quant_gemm_set_long_rows(int n) { (void)n; return QUANT_LONG_ROWS; }
int quant_gemm_f32(const float *x, const uint8_t *w, float *y, int n, int k, int m, int ldx,
                   int kind, int nthreads) {
    (void)x; (void)w; (void)y; (void)n; (void)k; (void)m; (void)ldx; (void)kind; (void)nthreads;
    return QUANT_REFUSED;
}

#endif
