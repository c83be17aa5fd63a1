/*
 * int8-activation GEMM on packed weights: y[n, m] = x[n, k] @ W[m, k]^T with W kept as ggml's
 * Q4_1 or Q8_0 blocks (layouts in quant_gemm.c) and x quantised per 32-value block to int8, so
 * that the 32 products of a block are one exact integer dot product. On this project's CPU (an
 * AMD EPYC) an AVX-512 VNNI vpdpbusd does 4x the multiply-adds per cycle of an fp32 FMA; the
 * fp32 packed kernel (quant_gemm.c) is bound by its FMAs once the weights are packed, so a
 * verify step of n tokens costs about n times one. Here the per-token work is a quarter of that.
 *
 * Activation blocks (int8_quantize_rows; ggml's Q8_0/Q8_1 scheme with an fp32 scale and sum):
 *
 *   amax = max_j |x_j|;  d = fl(amax / 127);  id = fl(1 / d)
 *   q_j = clamp(rne(fl(x_j * id)), -127, 127)          (rne: round half to even, as ggml's SIMD)
 *   sum = sum_j q_j;  ds = fl(d * sum);  off = -128 * sum
 *
 * ggml keeps d (and Q8_1's s = d * sum) in fp16; fp32 here loses nothing to the scale. A block
 * holding a NaN or an infinity gets d = ds = NaN and q = 0, so every output it touches is NaN
 * (the engine's non-finite check sees it); a block whose 1 / d overflows is all zero.
 *
 * Products (per output element y[r, o], blocks b = 0, 1, ... in order, acc = +0.0f):
 *
 *   I_b = sum_j qw_j * q_j                       exact int32 (Q4_1: qw in 0..15; Q8_0: -128..127)
 *   acc = fma((float)I_b, fl(dw_b * d_b), acc)   (dw_b: the weight block's fp16 d, exact in fp32)
 *   Q4_1 also: acc = fma(mw_b, ds_b, acc)        (mw_b: the block's fp16 min)
 *
 * So W's values enter as dw * qw + mw, exactly (the fp32 packed kernel rounds fl(fl(qw * dw) +
 * mw) first: < 1 ulp per weight). Each output element is one lane's chain of fmas in block order,
 * never split and never reduced across lanes, so y[r, o] depends only on k: the same bits for
 * every n, row position, thread count, work split and path (batch invariance). The integer dot
 * is exact on every path, whatever its order:
 *
 *   VNNI512  16 output columns per zmm lane set. A weight block of 16 rows is transposed in
 *            registers so that lane i holds 4 consecutive values of row i; vpdpbusd multiplies
 *            those (unsigned) by 4 activation bytes broadcast to every lane (signed), 8 times
 *            per block. Q4_1 nibbles are unsigned as stored; Q8_0 bytes get +128 (xor 0x80) and
 *            the chain starts at off = -128 * sum (exact: sum (qw + 128) q - 128 sum q).
 *   AVX2     8 columns per ymm, vpmaddubsw + vpmaddwd. No int16 saturation: Q4_1 pairs are at
 *            most 2 * 15 * 127 and 8 of them 30480 < 32767; Q8_0 uses |qw| times sign(q, qw)
 *            (ggml's trick), pairs at most 2 * 128 * 127 = 32512, widened at once.
 *   scalar   plain C, the same fmas (the oracle's twin).
 *
 * Built with -ffp-contract=off and without -ffast-math: the compiler cannot fuse or reorder.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int8_gemm.h"
#include "quant_gemm.h"
#include "thread_pool.h"

#define INLINE static inline __attribute__((always_inline))
#define MIN_THREAD_WORK 65536 /* weights per thread, at least (as quant_gemm.c) */

int int8_gemm_abi_version(void) { return INT8_GEMM_ABI_VERSION; }

static int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ------------------------------------------------------------------------------ portable C */

/* fp16 bits -> fp32, exactly (normal, subnormal, inf, NaN). */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, f = h & 0x3FF;
    uint32_t bits;
    if (e == 0x1F) {
        bits = sign | 0x7F800000 | (f << 13);
    } else if (e != 0) {
        bits = sign | ((e + 112) << 23) | (f << 13);
    } else if (f == 0) {
        bits = sign;
    } else { /* subnormal: f * 2^-24, exact in fp32 */
        const float v = (float)f * 0x1p-24f;
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

static float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return half_to_float(h);
}

/* Round half to even without the FP environment's rounding mode (|v| < 2^23). */
static int32_t rne(float v) {
    int32_t t = (int32_t)v; /* toward zero */
    const float f = v - (float)t; /* exact */
    if (f > 0.5f || (f == 0.5f && (t & 1))) t += 1;
    else if (f < -0.5f || (f == -0.5f && (t & 1))) t -= 1;
    return t;
}

static void block_bad(int8_t *q, int8_xblock_t *s) {
    memset(q, 0, INT8_QK);
    s->d = s->ds = NAN;
    s->sum = s->off = 0;
}

/* d and 1 / d for a block of largest magnitude amax (0 and 0 when 1 / d overflows). */
static void block_scale(float amax, float *d, float *id) {
    *d = amax / 127.0f;
    *id = *d != 0.0f ? 1.0f / *d : 0.0f;
    if (!(*id < INFINITY)) *d = *id = 0.0f;
}

static void block_sums(int32_t sum, float d, int8_xblock_t *s) {
    s->d = d;
    s->sum = sum;
    s->ds = d * (float)sum;
    s->off = -128 * sum;
}

static void quantize_block_scalar(const float *x, int8_t *q, int8_xblock_t *s) {
    float amax = 0.0f, d, id;
    for (int j = 0; j < INT8_QK; ++j) {
        const float a = fabsf(x[j]);
        if (!(a < INFINITY)) {
            block_bad(q, s);
            return;
        }
        amax = a > amax ? a : amax;
    }
    block_scale(amax, &d, &id);
    int32_t sum = 0;
    for (int j = 0; j < INT8_QK; ++j) {
        int32_t v = rne(x[j] * id);
        v = v > 127 ? 127 : v < -127 ? -127 : v;
        q[j] = (int8_t)v;
        sum += v;
    }
    block_sums(sum, d, s);
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("fma") /* the library loads only on FMA CPUs; fmaf is then one instruction */
#endif

static void range_scalar(const int8_t *q, const int8_xblock_t *xs, int n, int k,
                         const uint8_t *w, int kind, int ob, int oe, float *y, int ldy) {
    const int nb = k / INT8_QK;
    const size_t ldw = (size_t)quant_row_bytes(kind, k), bb = kind == QUANT_Q4_1 ? 20 : 34;
    for (int o = ob; o < oe; ++o) {
        for (int r = 0; r < n; ++r) {
            float acc = 0.0f;
            for (int b = 0; b < nb; ++b) {
                const uint8_t *blk = w + (size_t)o * ldw + (size_t)b * bb;
                const int8_t *xq = q + (size_t)r * k + (size_t)b * INT8_QK;
                const int8_xblock_t *s = xs + (size_t)r * nb + b;
                int32_t dot = 0;
                if (kind == QUANT_Q4_1) {
                    for (int j = 0; j < 16; ++j)
                        dot += (blk[4 + j] & 0x0F) * xq[j] + (blk[4 + j] >> 4) * xq[j + 16];
                } else {
                    for (int j = 0; j < INT8_QK; ++j) dot += (int8_t)blk[2 + j] * xq[j];
                }
                const float sc = half_at(blk) * s->d;
                acc = fmaf((float)dot, sc, acc);
                if (kind == QUANT_Q4_1) acc = fmaf(half_at(blk + 2), s->ds, acc);
            }
            y[(size_t)r * ldy + o] = acc;
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC pop_options
#endif

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

/* ------------------------------------------------------------------------------ path choice */

static int isa_in_use = INT8_ISA_BEST;

static int best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni"))
        return INT8_ISA_VNNI512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return INT8_ISA_AVX2;
    return INT8_ISA_SCALAR;
}

int int8_gemm_set_isa(int isa) {
    const int best = best_isa();
    isa_in_use = (isa <= INT8_ISA_BEST || isa > best) ? best : isa;
    return isa_in_use;
}

int int8_gemm_get_isa(void) {
    if (isa_in_use == INT8_ISA_BEST) isa_in_use = best_isa();
    return isa_in_use;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

/* ------------------------------------------------------------------------------ AVX2 */

static void quantize_block_avx2(const float *x, int8_t *q, int8_xblock_t *s) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 inf = _mm256_set1_ps(INFINITY);
    __m256 v[4], a[4];
    int bad = 0;
    for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        a[i] = _mm256_and_ps(v[i], absmask);
        bad |= _mm256_movemask_ps(_mm256_cmp_ps(a[i], inf, _CMP_NLT_UQ));
    }
    if (bad) {
        block_bad(q, s);
        return;
    }
    __m256 mx = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    float d, id;
    block_scale(_mm_cvtss_f32(m4), &d, &id);
    const __m256 vid = _mm256_set1_ps(id), hi = _mm256_set1_ps(127.0f);
    const __m256 lo = _mm256_set1_ps(-127.0f);
    __m256i iv[4];
    for (int i = 0; i < 4; ++i) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], vid),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        iv[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi)); /* exact */
    }
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, _MM_SHUFFLE(1, 0, 3, 2)));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, _MM_SHUFFLE(2, 3, 0, 1)));
    /* packs: [iv0 0-3, iv1 0-3, iv2 0-3, iv3 0-3 | the same for 4-7] -> back into order */
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]),
                                         _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(
                                          p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    block_sums(_mm_cvtsi128_si32(t4), d, s);
}

/* One weight block of 8 rows, transposed: lane i of q[t] holds values 4t..4t+3 of row i (Q4_1:
 * nibbles; Q8_0: |qw|, with the signed bytes in sg[t]); d (and Q4_1's m) per row. */
typedef struct {
    __m256i q[8], sg[8];
    __m256 d, m;
} w8_t;

INLINE void prep8(const int KIND, const uint8_t *const *row, __m256i gidx, int b, w8_t *o) {
    if (KIND == QUANT_Q4_1) {
        const size_t off = (size_t)b * 20;
        __m256i A[4];
        for (int s = 0; s < 4; ++s)
            A[s] = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(row[s] + off + 4))),
                _mm_loadu_si128((const __m128i *)(row[s + 4] + off + 4)), 1);
        const __m256i t0 = _mm256_unpacklo_epi32(A[0], A[1]);
        const __m256i t1 = _mm256_unpackhi_epi32(A[0], A[1]);
        const __m256i t2 = _mm256_unpacklo_epi32(A[2], A[3]);
        const __m256i t3 = _mm256_unpackhi_epi32(A[2], A[3]);
        const __m256i z[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                              _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
        const __m256i nib = _mm256_set1_epi8(0x0F);
        for (int u = 0; u < 4; ++u) {
            o->q[u] = _mm256_and_si256(z[u], nib);
            o->q[u + 4] = _mm256_and_si256(_mm256_srli_epi32(z[u], 4), nib);
        }
        const __m256i dm = _mm256_i32gather_epi32((const int *)(row[0] + off), gidx, 1);
        const __m256i pk = _mm256_permute4x64_epi64(
            _mm256_packus_epi32(_mm256_and_si256(dm, _mm256_set1_epi32(0xFFFF)),
                                _mm256_srli_epi32(dm, 16)), 0xD8);
        o->d = _mm256_cvtph_ps(_mm256_castsi256_si128(pk));
        o->m = _mm256_cvtph_ps(_mm256_extracti128_si256(pk, 1));
    } else {
        const size_t off = (size_t)b * 34;
        __m256i A[8], t[8];
        for (int p = 0; p < 8; ++p) A[p] = _mm256_loadu_si256((const __m256i *)(row[p] + off + 2));
        for (int j = 0; j < 4; ++j) {
            t[2 * j] = _mm256_unpacklo_epi32(A[2 * j], A[2 * j + 1]);
            t[2 * j + 1] = _mm256_unpackhi_epi32(A[2 * j], A[2 * j + 1]);
        }
        for (int h = 0; h < 2; ++h) { /* rows 0-3 (h = 0) and 4-7 */
            const __m256i *s = t + 4 * h;
            A[4 * h + 0] = _mm256_unpacklo_epi64(s[0], s[2]);
            A[4 * h + 1] = _mm256_unpackhi_epi64(s[0], s[2]);
            A[4 * h + 2] = _mm256_unpacklo_epi64(s[1], s[3]);
            A[4 * h + 3] = _mm256_unpackhi_epi64(s[1], s[3]);
        }
        for (int dd = 0; dd < 4; ++dd) {
            o->sg[dd] = _mm256_permute2x128_si256(A[dd], A[4 + dd], 0x20);
            o->sg[dd + 4] = _mm256_permute2x128_si256(A[dd], A[4 + dd], 0x31);
        }
        for (int u = 0; u < 8; ++u) o->q[u] = _mm256_abs_epi8(o->sg[u]);
        const __m256i dm = _mm256_i32gather_epi32((const int *)(row[0] + off), gidx, 1);
        const __m256i lo = _mm256_and_si256(dm, _mm256_set1_epi32(0xFFFF));
        o->d = _mm256_cvtph_ps(_mm256_castsi256_si128(
            _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, lo), 0x08)));
        o->m = _mm256_setzero_ps();
    }
}

INLINE __m256 step8(const int KIND, const w8_t *wv, const int8_t *xq, const int8_xblock_t *s,
                    __m256 acc) {
    __m256i dot;
    if (KIND == QUANT_Q4_1) {
        __m256i p = _mm256_maddubs_epi16(wv->q[0], _mm256_set1_epi32(load_i32(xq)));
        for (int t = 1; t < 8; ++t)
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(wv->q[t],
                                                         _mm256_set1_epi32(load_i32(xq + 4 * t))));
        dot = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
    } else {
        dot = _mm256_setzero_si256();
        for (int t = 0; t < 8; ++t) {
            const __m256i xb = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xq + 4 * t)), wv->sg[t]);
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(wv->q[t], xb),
                                                          _mm256_set1_epi16(1)));
        }
    }
    const __m256 sc = _mm256_mul_ps(wv->d, _mm256_set1_ps(s->d));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc);
    if (KIND == QUANT_Q4_1) acc = _mm256_fmadd_ps(wv->m, _mm256_set1_ps(s->ds), acc);
    return acc;
}

#define R8 4 /* AVX2: rows of x per pass (the weight block is transposed once per pass) */

INLINE void group8(const int KIND, const uint8_t *const *row, __m256i gidx, int valid, int n,
                   int k, const int8_t *q, const int8_xblock_t *xs, float *y, int ldy) {
    const int nb = k / INT8_QK;
    for (int r0 = 0; r0 < n; r0 += R8) {
        const int R = n - r0 < R8 ? n - r0 : R8;
        __m256 acc[R8];
        for (int r = 0; r < R8; ++r) acc[r] = _mm256_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            w8_t wv;
            prep8(KIND, row, gidx, b, &wv);
            for (int r = 0; r < R; ++r)
                acc[r] = step8(KIND, &wv, q + (size_t)(r0 + r) * k + (size_t)b * INT8_QK,
                               xs + (size_t)(r0 + r) * nb + b, acc[r]);
        }
        for (int r = 0; r < R; ++r) {
            float out[8];
            _mm256_storeu_ps(out, acc[r]);
            memcpy(y + (size_t)(r0 + r) * ldy, out, sizeof(float) * (size_t)valid);
        }
    }
}

static void range_avx2(const int8_t *q, const int8_xblock_t *xs, int n, int k, const uint8_t *w,
                       int kind, int ob, int oe, float *y, int ldy) {
    const size_t ldw = (size_t)quant_row_bytes(kind, k);
    for (int o = ob; o < oe; o += 8) {
        const int valid = oe - o < 8 ? oe - o : 8;
        const uint8_t *row[8];
        int32_t offs[8];
        for (int i = 0; i < 8; ++i) {
            const int ri = i < valid ? i : valid - 1; /* a tail repeats its last row */
            row[i] = w + (size_t)(o + ri) * ldw;
            offs[i] = (int32_t)((size_t)ri * ldw);
        }
        const __m256i gidx = _mm256_loadu_si256((const __m256i *)offs);
        if (kind == QUANT_Q4_1)
            group8(QUANT_Q4_1, row, gidx, valid, n, k, q, xs, y + o, ldy);
        else
            group8(QUANT_Q8_0, row, gidx, valid, n, k, q, xs, y + o, ldy);
    }
}

#pragma GCC pop_options

/* ------------------------------------------------------------------------------ AVX-512 VNNI */

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vnni,avx2,fma,f16c")

#define RMAX 8 /* rows of x whose accumulators stay in registers */
#define KC 16  /* weight blocks transposed ahead into an L1 buffer when n > RMAX */

/* One weight block of 16 rows, transposed: lane i of q[t] holds values 4t..4t+3 of row i as
 * unsigned bytes (Q4_1: nibbles; Q8_0: qw + 128); d (and Q4_1's m) per row. */
typedef struct {
    __m512i q[8];
    __m512 d, m;
} w16_t;

INLINE __m512i load4x128(const uint8_t *a, const uint8_t *b, const uint8_t *c,
                         const uint8_t *d) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)a));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)b), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)c), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)d), 3);
}

/* Dword `off` of the 16 rows, lane i = row i: the first of a 4x4 transpose of 16-byte loads
 * (this project's CPU: 9.2 -> 6.7 ns per 16-row Q4_1 block at n = 1 against vpgatherdd). */
INLINE __m512i dword0_16(const uint8_t *const *row, size_t off) {
    __m512i A[4];
    for (int s = 0; s < 4; ++s)
        A[s] = load4x128(row[s] + off, row[s + 4] + off, row[s + 8] + off, row[s + 12] + off);
    return _mm512_unpacklo_epi64(_mm512_unpacklo_epi32(A[0], A[1]),
                                 _mm512_unpacklo_epi32(A[2], A[3]));
}

INLINE void prep16_q4_1(const uint8_t *const *row, int b, w16_t *o) {
    const size_t off = (size_t)b * 20 + 4;
    __m512i A[4]; /* 128-bit lane l of A[s]: the 16 nibble bytes of row s + 4l */
    for (int s = 0; s < 4; ++s)
        A[s] = load4x128(row[s] + off, row[s + 4] + off, row[s + 8] + off, row[s + 12] + off);
    const __m512i t0 = _mm512_unpacklo_epi32(A[0], A[1]), t1 = _mm512_unpackhi_epi32(A[0], A[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(A[2], A[3]), t3 = _mm512_unpackhi_epi32(A[2], A[3]);
    const __m512i z[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                          _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
    const __m512i nib = _mm512_set1_epi32(0x0F0F0F0F);
    for (int u = 0; u < 4; ++u) { /* byte j: value j (low nibble) and value j + 16 (high) */
        o->q[u] = _mm512_and_si512(z[u], nib);
        o->q[u + 4] = _mm512_and_si512(_mm512_srli_epi32(z[u], 4), nib);
    }
    const __m512i dm = dword0_16(row, off - 4);
    o->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
    o->m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
}

INLINE void prep16_q8_0(const uint8_t *const *row, int b, w16_t *o) {
    const size_t off = (size_t)b * 34 + 2;
    __m512i A[8], t[8];
    for (int p = 0; p < 8; ++p) { /* halves: rows p, p + 4 (p < 4); p + 4, p + 8 (p >= 4) */
        const int lo = p < 4 ? p : p + 4;
        A[p] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(row[lo] + off))),
            _mm256_loadu_si256((const __m256i *)(row[lo + 4] + off)), 1);
    }
    for (int j = 0; j < 4; ++j) {
        t[2 * j] = _mm512_unpacklo_epi32(A[2 * j], A[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_epi32(A[2 * j], A[2 * j + 1]);
    }
    for (int h = 0; h < 2; ++h) { /* 128-bit lane L of A[4h + dd]: dword 4 (L % 2) + dd */
        const __m512i *s = t + 4 * h;
        A[4 * h + 0] = _mm512_unpacklo_epi64(s[0], s[2]);
        A[4 * h + 1] = _mm512_unpackhi_epi64(s[0], s[2]);
        A[4 * h + 2] = _mm512_unpacklo_epi64(s[1], s[3]);
        A[4 * h + 3] = _mm512_unpackhi_epi64(s[1], s[3]);
    }
    const __m512i flip = _mm512_set1_epi32((int)0x80808080u);
    for (int dd = 0; dd < 4; ++dd) { /* lanes 0-3, 4-7, 8-11, 12-15: rows in order */
        o->q[dd] = _mm512_xor_si512(_mm512_shuffle_i32x4(A[dd], A[4 + dd], 0x88), flip);
        o->q[dd + 4] = _mm512_xor_si512(_mm512_shuffle_i32x4(A[dd], A[4 + dd], 0xDD), flip);
    }
    o->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dword0_16(row, off - 2)));
    o->m = _mm512_setzero_ps();
}

INLINE __m512 step16(const int KIND, const w16_t *wv, const int8_t *xq, const int8_xblock_t *s,
                     __m512 acc) {
    __m512i i0 = KIND == QUANT_Q8_0 ? _mm512_set1_epi32(s->off) : _mm512_setzero_si512();
    __m512i i1 = _mm512_setzero_si512();
    for (int t = 0; t < 8; t += 2) { /* two chains: vpdpbusd's latency */
        i0 = _mm512_dpbusd_epi32(i0, wv->q[t], _mm512_set1_epi32(load_i32(xq + 4 * t)));
        i1 = _mm512_dpbusd_epi32(i1, wv->q[t + 1], _mm512_set1_epi32(load_i32(xq + 4 * t + 4)));
    }
    const __m512 sc = _mm512_mul_ps(wv->d, _mm512_set1_ps(s->d));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)), sc, acc);
    if (KIND == QUANT_Q4_1) acc = _mm512_fmadd_ps(wv->m, _mm512_set1_ps(s->ds), acc);
    return acc;
}

/* The group's 16 rows are one contiguous stretch of 16 * nb blocks, read block column by block
 * column: 16 streams at once, more than the hardware prefetchers follow. So block b of a group
 * prefetches stretch b of the next group's bytes (a group ahead: nb blocks of work). */
INLINE void prefetch_next(const uint8_t *const *row, size_t bb, int b) {
    const uint8_t *p = row[0] + 16 * (size_t)(row[1] - row[0]) + (size_t)b * 16 * bb;
    for (size_t i = 0; i < 16 * bb; i += 64) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
}

INLINE void prep16(const int KIND, const uint8_t *const *row, int b, w16_t *o) {
    prefetch_next(row, KIND == QUANT_Q4_1 ? 20 : 34, b);
    if (KIND == QUANT_Q4_1)
        prep16_q4_1(row, b, o);
    else
        prep16_q8_0(row, b, o);
}

/* The arguments every 16-column tile function takes. */
typedef struct {
    const uint8_t *row[16]; /* the group's weight rows (a tail repeats its last row) */
    __mmask16 mask;         /* the columns that exist */
    const int8_t *q;        /* the tile's first x row */
    const int8_xblock_t *xs;
    int k, nb, ldy;
    float *y; /* y[first row, first column] */
} tile16_t;

/* R <= RMAX rows, every block, the weight block transposed in registers once for all R. */
INLINE void tile16_direct(const int KIND, const int R, const tile16_t *t) {
    __m512 acc[RMAX];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < t->nb; ++b) {
        w16_t wv;
        prep16(KIND, t->row, b, &wv);
        for (int r = 0; r < R; ++r)
            acc[r] = step16(KIND, &wv, t->q + (size_t)r * t->k + (size_t)b * INT8_QK,
                            t->xs + (size_t)r * t->nb + b, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(t->y + (size_t)r * t->ldy, t->mask, acc[r]);
}

/* R <= RMAX rows over blocks [b0, b0 + kc) from transposed blocks buf; y holds the running sums
 * between chunks (a float round-trips memory exactly). */
INLINE void tile16_chunk(const int KIND, const int R, const tile16_t *t, const w16_t *buf,
                         int b0, int kc) {
    __m512 acc[RMAX];
    for (int r = 0; r < R; ++r)
        acc[r] = b0 ? _mm512_maskz_loadu_ps(t->mask, t->y + (size_t)r * t->ldy)
                    : _mm512_setzero_ps();
    for (int i = 0; i < kc; ++i)
        for (int r = 0; r < R; ++r)
            acc[r] = step16(KIND, &buf[i], t->q + (size_t)r * t->k + (size_t)(b0 + i) * INT8_QK,
                            t->xs + (size_t)r * t->nb + b0 + i, acc[r]);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(t->y + (size_t)r * t->ldy, t->mask, acc[r]);
}

typedef void (*direct_fn)(const tile16_t *);
typedef void (*chunk_fn)(const tile16_t *, const w16_t *, int, int);

#define TILE_FNS(KNAME, KIND_, R_)                                                             \
    static void direct_##KNAME##_##R_(const tile16_t *t) { tile16_direct(KIND_, R_, t); }     \
    static void chunk_##KNAME##_##R_(const tile16_t *t, const w16_t *buf, int b0, int kc) {   \
        tile16_chunk(KIND_, R_, t, buf, b0, kc);                                               \
    }
#define TILE_FNS_ALL(KNAME, KIND_)                                                             \
    TILE_FNS(KNAME, KIND_, 1) TILE_FNS(KNAME, KIND_, 2) TILE_FNS(KNAME, KIND_, 3)              \
    TILE_FNS(KNAME, KIND_, 4) TILE_FNS(KNAME, KIND_, 5) TILE_FNS(KNAME, KIND_, 6)              \
    TILE_FNS(KNAME, KIND_, 7) TILE_FNS(KNAME, KIND_, 8)

TILE_FNS_ALL(q4_1, QUANT_Q4_1)
TILE_FNS_ALL(q8_0, QUANT_Q8_0)

static const direct_fn DIRECT[2][RMAX] = {
    {direct_q4_1_1, direct_q4_1_2, direct_q4_1_3, direct_q4_1_4, direct_q4_1_5, direct_q4_1_6,
     direct_q4_1_7, direct_q4_1_8},
    {direct_q8_0_1, direct_q8_0_2, direct_q8_0_3, direct_q8_0_4, direct_q8_0_5, direct_q8_0_6,
     direct_q8_0_7, direct_q8_0_8}};
static const chunk_fn CHUNK[2][RMAX] = {
    {chunk_q4_1_1, chunk_q4_1_2, chunk_q4_1_3, chunk_q4_1_4, chunk_q4_1_5, chunk_q4_1_6,
     chunk_q4_1_7, chunk_q4_1_8},
    {chunk_q8_0_1, chunk_q8_0_2, chunk_q8_0_3, chunk_q8_0_4, chunk_q8_0_5, chunk_q8_0_6,
     chunk_q8_0_7, chunk_q8_0_8}};

static void prep16_into(int kind, const tile16_t *t, int b0, int kc, w16_t *buf) {
    for (int i = 0; i < kc; ++i) {
        if (kind == QUANT_Q4_1)
            prep16(QUANT_Q4_1, t->row, b0 + i, &buf[i]);
        else
            prep16(QUANT_Q8_0, t->row, b0 + i, &buf[i]);
    }
}

/* n > RMAX rows: each chunk of KC blocks is transposed once into buf and used by every group of
 * rows (groups of near-equal sizes <= RMAX). */
static void group16_many(int kind, tile16_t *t, int n) {
    const int kix = kind == QUANT_Q4_1 ? 0 : 1, groups = (n + RMAX - 1) / RMAX;
    const int8_t *q0 = t->q;
    const int8_xblock_t *xs0 = t->xs;
    float *y0 = t->y;
    w16_t buf[KC];
    for (int b0 = 0; b0 < t->nb; b0 += KC) {
        const int kc = t->nb - b0 < KC ? t->nb - b0 : KC;
        prep16_into(kind, t, b0, kc, buf);
        for (int g = 0; g < groups; ++g) {
            int rb, re;
            pool_part(n, g, groups, &rb, &re);
            t->q = q0 + (size_t)rb * t->k;
            t->xs = xs0 + (size_t)rb * t->nb;
            t->y = y0 + (size_t)rb * t->ldy;
            CHUNK[kix][re - rb - 1](t, buf, b0, kc);
        }
    }
}

static void range_vnni(const int8_t *q, const int8_xblock_t *xs, int n, int k, const uint8_t *w,
                       int kind, int ob, int oe, float *y, int ldy) {
    const size_t ldw = (size_t)quant_row_bytes(kind, k);
    for (int o = ob; o < oe; o += 16) {
        const int valid = oe - o < 16 ? oe - o : 16;
        tile16_t t = {.q = q, .xs = xs, .k = k, .nb = k / INT8_QK, .ldy = ldy, .y = y + o,
                      .mask = (__mmask16)((1u << valid) - 1)};
        for (int i = 0; i < 16; ++i) /* a tail repeats its last row */
            t.row[i] = w + (size_t)(o + (i < valid ? i : valid - 1)) * ldw;
        if (n <= RMAX)
            DIRECT[kind == QUANT_Q4_1 ? 0 : 1][n - 1](&t);
        else
            group16_many(kind, &t, n);
    }
}

#pragma GCC pop_options

static void quantize_block(const float *x, int8_t *q, int8_xblock_t *s, int isa) {
    if (isa >= INT8_ISA_AVX2)
        quantize_block_avx2(x, q, s);
    else
        quantize_block_scalar(x, q, s);
}

static void range_isa(const int8_t *q, const int8_xblock_t *xs, int n, int k, const uint8_t *w,
                      int kind, int ob, int oe, float *y, int ldy, int isa) {
    if (isa == INT8_ISA_VNNI512)
        range_vnni(q, xs, n, k, w, kind, ob, oe, y, ldy);
    else if (isa == INT8_ISA_AVX2)
        range_avx2(q, xs, n, k, w, kind, ob, oe, y, ldy);
    else
        range_scalar(q, xs, n, k, w, kind, ob, oe, y, ldy);
}

#else /* not x86-64 + GCC: the portable path only */

int int8_gemm_set_isa(int isa) { (void)isa; return INT8_ISA_SCALAR; }
int int8_gemm_get_isa(void) { return INT8_ISA_SCALAR; }

static void quantize_block(const float *x, int8_t *q, int8_xblock_t *s, int isa) {
    (void)isa;
    quantize_block_scalar(x, q, s);
}

static void range_isa(const int8_t *q, const int8_xblock_t *xs, int n, int k, const uint8_t *w,
                      int kind, int ob, int oe, float *y, int ldy, int isa) {
    (void)isa;
    range_scalar(q, xs, n, k, w, kind, ob, oe, y, ldy);
}

#endif

/* ------------------------------------------------------------------------------ entries */

void int8_quantize_rows(const float *x, int n, int k, int ldx, int8_t *q, int8_xblock_t *xs) {
    const int nb = k / INT8_QK, isa = int8_gemm_get_isa();
    for (int r = 0; r < n; ++r)
        for (int b = 0; b < nb; ++b)
            quantize_block(x + (size_t)r * ldx + (size_t)b * INT8_QK,
                           q + (size_t)r * k + (size_t)b * INT8_QK, xs + (size_t)r * nb + b, isa);
}

void int8_gemm_range(const int8_t *q, const int8_xblock_t *xs, int n, int k, const uint8_t *w,
                     int kind, int o_begin, int o_end, float *y, int ldy) {
    if (n > 0 && o_begin < o_end)
        range_isa(q, xs, n, k, w, kind, o_begin, o_end, y, ldy, int8_gemm_get_isa());
}

typedef struct {
    const int8_t *q;
    const int8_xblock_t *xs;
    const uint8_t *w;
    float *y;
    int n, k, m, kind, groups;
} int8_job_t;

#define GROUP 16 /* columns per unit of the thread split (the VNNI tile width) */

static void int8_part(void *arg, int t, int T) {
    const int8_job_t *j = arg;
    int gb, ge;
    pool_part(j->groups, t, T, &gb, &ge);
    const int ob = gb * GROUP, oe = ge * GROUP < j->m ? ge * GROUP : j->m;
    int8_gemm_range(j->q, j->xs, j->n, j->k, j->w, j->kind, ob, oe, j->y, j->m);
}

int int8_gemm_q(const int8_t *q, const int8_xblock_t *xs, const uint8_t *w, float *y, int n,
                int k, int m, int kind, int nthreads) {
    if ((kind != QUANT_Q4_1 && kind != QUANT_Q8_0) || k <= 0 || k % INT8_QK) return -1;
    if (n <= 0 || m <= 0) return 0;
    const int8_job_t j = {q, xs, w, y, n, k, m, kind, (m + GROUP - 1) / GROUP};
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > j.groups) nt = j.groups;
    const long long per = (long long)m * k / MIN_THREAD_WORK; /* a fork/join's worth */
    if (nt > per) nt = per < 1 ? 1 : (int)per;
    pool_run(int8_part, (void *)&j, nt);
    return 0;
}

int int8_gemm_f32(const float *x, const uint8_t *w, float *y, int n, int k, int m, int ldx,
                  int kind, int nthreads) {
    if ((kind != QUANT_Q4_1 && kind != QUANT_Q8_0) || k <= 0 || k % INT8_QK) return -1;
    if (n <= 0 || m <= 0) return 0;
    const size_t nb = (size_t)k / INT8_QK;
    int8_t *q = malloc((size_t)n * k);
    int8_xblock_t *xs = malloc((size_t)n * nb * sizeof(int8_xblock_t));
    int rc = -2;
    if (q && xs) {
        int8_quantize_rows(x, n, k, ldx, q, xs);
        rc = int8_gemm_q(q, xs, w, y, n, k, m, kind, nthreads);
    }
    free(q);
    free(xs);
    return rc;
}
