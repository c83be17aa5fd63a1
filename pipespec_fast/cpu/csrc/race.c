/*
 * Sampling a token by an exponential race on CPU: argmax_v w[v] / E_v with E_v = -log(U_v)
 * i.i.d. Exp(1), which picks v with probability w[v] / sum(w). pipespec_fast.reference states
 * it in torch (sample_from_probs; the residual token of stochastic_accept), where the uniforms
 * take five passes of 64-bit tensor arithmetic over the vocabulary: ~0.6 ms per draw for a
 * 49k vocabulary, as much as a draft model's forward. Here it is one pass, ~20 us.
 *
 * Uniforms: reference.counter_uniform exactly (murmur3's finaliser on uint32, wrapping):
 *   x = fmix32((index * 0x9E3779B1) ^ key);  x = fmix32(x ^ 0x5BD1E995)
 *   U = ((x >> 9) + 0.5) * 2^-23                 (exact in fp32, strictly inside (0, 1))
 *
 * -log(U) by range reduction U = 2^e * f (f in [sqrt(1/2), sqrt(2))), s = (f - 1) / (f + 1),
 * log f = 2 atanh(s) as an odd polynomial to s^9 (|s| <= 0.172: truncation < 1e-9 relative),
 * then fma(e, ln 2, log f). A few ulp from libm's logf, which moves the race's winner only
 * where two ratios agree to the last bits: the tokens equal the torch reference's on every
 * draw of the tests (tests/test_cpu_race.py), and the distribution is Exp(1)'s to fp32
 * precision. The AVX-512 path and the portable one run the same operations (explicit fmas,
 * IEEE division), so they give the same E_v and the same index.
 *
 * Built with -ffp-contract=off: no fusing beyond the fmas written here.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "race.h"

#define LN2 0.693147180559945309f
#define SQRT2 1.41421356237309505f
/* 2 atanh(s) = 2 (s + s^3 / 3 + s^5 / 5 + s^7 / 7 + s^9 / 9) */
#define C1 2.0f
#define C3 0.666666666666666667f
#define C5 0.4f
#define C7 0.285714285714285714f
#define C9 0.222222222222222222f

static inline uint32_t fmix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    x ^= x >> 16;
    return x;
}

static inline float uniform_at(uint32_t key, int64_t index) {
    uint32_t x = fmix32(((uint32_t)index * 0x9E3779B1u) ^ key);
    x = fmix32(x ^ 0x5BD1E995u);
    return ((float)(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

/* -log(u) for u in (0, 1), normal. */
static inline float neg_log(float u) {
    uint32_t b;
    memcpy(&b, &u, 4);
    float e = (float)((int32_t)(b >> 23) - 127);
    b = (b & 0x7FFFFF) | 0x3F800000;
    float f;
    memcpy(&f, &b, 4);
    if (f > SQRT2) {
        f *= 0.5f;
        e += 1.0f;
    }
    const float s = (f - 1.0f) / (f + 1.0f), z = s * s;
    float p = fmaf(z, C9, C7);
    p = fmaf(z, p, C5);
    p = fmaf(z, p, C3);
    p = fmaf(z, p, C1);
    return -fmaf(e, LN2, s * p);
}

void race_uniforms(float *out, int64_t n, uint32_t key, int64_t index0) {
    for (int64_t i = 0; i < n; ++i) out[i] = uniform_at(key, index0 + i);
}

static int64_t argmax_scalar(const float *w, int64_t V, uint32_t key, int64_t index0,
                             int64_t v0, float *best_out) {
    float best = -1.0f;
    int64_t arg = -1;
    for (int64_t v = v0; v < V; ++v) {
        const float r = w[v] / neg_log(uniform_at(key, index0 + v));
        if (r > best) {
            best = r;
            arg = v;
        }
    }
    *best_out = best;
    return arg;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("avx512f"))) static inline __m512i fmix32x16(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x85EBCA6Bu));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0xC2B2AE35u));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

/* 16 lanes of argmax_scalar's ratio, the same operations. */
__attribute__((target("avx512f"))) static inline __m512 ratio16(const float *w, uint32_t key,
                                                                 int64_t index) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i x = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)index), lane);
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x9E3779B1u));
    x = fmix32x16(_mm512_xor_si512(x, _mm512_set1_epi32((int)key)));
    x = fmix32x16(_mm512_xor_si512(x, _mm512_set1_epi32(0x5BD1E995)));
    const __m512 u = _mm512_mul_ps(
        _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x, 9)), _mm512_set1_ps(0.5f)),
        _mm512_set1_ps(1.0f / 8388608.0f));
    const __m512i b = _mm512_castps_si512(u);
    __m512 e = _mm512_cvtepi32_ps(
        _mm512_sub_epi32(_mm512_srli_epi32(b, 23), _mm512_set1_epi32(127)));
    __m512 f = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFF)),
                                                   _mm512_set1_epi32(0x3F800000)));
    const __mmask16 big = _mm512_cmp_ps_mask(f, _mm512_set1_ps(SQRT2), _CMP_GT_OQ);
    f = _mm512_mask_mul_ps(f, big, f, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 s = _mm512_div_ps(_mm512_sub_ps(f, one), _mm512_add_ps(f, one));
    const __m512 z = _mm512_mul_ps(s, s);
    __m512 p = _mm512_fmadd_ps(z, _mm512_set1_ps(C9), _mm512_set1_ps(C7));
    p = _mm512_fmadd_ps(z, p, _mm512_set1_ps(C5));
    p = _mm512_fmadd_ps(z, p, _mm512_set1_ps(C3));
    p = _mm512_fmadd_ps(z, p, _mm512_set1_ps(C1));
    const __m512 nl = _mm512_sub_ps(_mm512_setzero_ps(),
                                    _mm512_fmadd_ps(e, _mm512_set1_ps(LN2), _mm512_mul_ps(s, p)));
    return _mm512_div_ps(_mm512_loadu_ps(w), nl);
}

/* Lane l keeps the largest ratio of v = v0 + l (mod 16) and its first index; the lanes are then
 * merged (largest value, lowest index among equals): the scalar loop's answer. */
__attribute__((target("avx512f"))) static int64_t argmax_512(const float *w, int64_t V,
                                                             uint32_t key, int64_t index0) {
    __m512 best = _mm512_set1_ps(-1.0f);
    __m512i arg = _mm512_set1_epi32(-1);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t v = 0;
    for (; v + 16 <= V; v += 16) {
        const __m512 r = ratio16(w + v, key, index0 + v);
        const __mmask16 gt = _mm512_cmp_ps_mask(r, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, gt, r);
        arg = _mm512_mask_mov_epi32(arg, gt, _mm512_add_epi32(_mm512_set1_epi32((int)v), lane));
    }
    float bv[16];
    int32_t av[16];
    _mm512_storeu_ps(bv, best);
    _mm512_storeu_si512(av, arg);
    float tail_best;
    int64_t out = argmax_scalar(w, V, key, index0, v, &tail_best);
    float top = out >= 0 ? tail_best : -1.0f;
    for (int l = 0; l < 16; ++l) /* the tail's indices are larger than every lane's */
        if (av[l] >= 0 && (bv[l] > top || (bv[l] == top && (out < 0 || av[l] < out)))) {
            top = bv[l];
            out = av[l];
        }
    return out;
}

static int has_512(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") ? 1 : 0;
    }
    return cached;
}
#endif

int race_cpu_avx512f(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    return has_512();
#else
    return 0;
#endif
}

int64_t race_argmax(const float *w, int64_t V, uint32_t key, int64_t index0) {
    if (V <= 0) return -1;
#if defined(__x86_64__) && defined(__GNUC__)
    if (has_512() && V < ((int64_t)1 << 31)) return argmax_512(w, V, key, index0);
#endif
    float best;
    return argmax_scalar(w, V, key, index0, 0, &best);
}

/* ----------------------------------------------------------------------- rows_max */

static void row_max_scalar(const float *x, int64_t V, float *val, int64_t *idx) {
    int64_t best = 0;
    for (int64_t v = 0; v < V; ++v) {
        if (x[v] != x[v]) { /* NaN: torch.max reports the first one */
            *val = x[v];
            *idx = v;
            return;
        }
        if (x[v] > x[best]) best = v;
    }
    *val = x[best];
    *idx = best;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) static void row_max_512(const float *x, int64_t V, float *val,
                                                           int64_t *idx) {
    const __m512 lo = _mm512_set1_ps(-INFINITY);
    __m512 m = lo;
    __mmask16 nan = 0;
    int64_t v = 0;
    for (; v + 16 <= V; v += 16) {
        const __m512 a = _mm512_loadu_ps(x + v);
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, a);
    }
    const __mmask16 tail = (__mmask16)((1u << (V - v)) - 1u);
    if (tail) {
        const __m512 a = _mm512_mask_loadu_ps(lo, tail, x + v);
        nan |= _mm512_mask_cmp_ps_mask(tail, a, a, _CMP_UNORD_Q);
        m = _mm512_max_ps(m, a);
    }
    if (nan) { /* the first NaN, as torch reports it */
        row_max_scalar(x, V, val, idx);
        return;
    }
    const float top = _mm512_reduce_max_ps(m);
    const __m512 t = _mm512_set1_ps(top);
    for (v = 0; v + 16 <= V; v += 16) {
        const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + v), t, _CMP_EQ_OQ);
        if (eq) {
            *val = top;
            *idx = v + __builtin_ctz((unsigned)eq);
            return;
        }
    }
    for (; v < V; ++v)
        if (x[v] == top) break;
    *val = top;
    *idx = v;
}
#endif

void rows_max(const float *x, int64_t n, int64_t V, int64_t ld, float *val, int64_t *idx) {
    for (int64_t i = 0; i < n; ++i) {
        const float *row = x + i * ld;
        if (V <= 0) {
            val[i] = -INFINITY;
            idx[i] = -1;
            continue;
        }
#if defined(__x86_64__) && defined(__GNUC__)
        if (has_512()) {
            row_max_512(row, V, val + i, idx + i);
            continue;
        }
#endif
        row_max_scalar(row, V, val + i, idx + i);
    }
}

