/*
 * Sampled decoding from a verifier's logits on CPU: the tempered softmax, one token's draw and
 * speculative sampling over a chain or a tree of drafts (sample.h).
 *
 * Why: pipespec_fast.reference states these in torch, a dozen vocabulary-wide tensor operations
 * per verify step (temperature, softmax, the row maxima, the residual's subtraction and clamp,
 * the sum it is tested against) plus ~40 small ones (the accept tests' uniforms, the loop's 0-d
 * comparisons). Measured in a pipeline, where each runs right after a forward that streamed the
 * weights through the caches: ~0.37 ms per sampled verify of one or two drafts against
 * ~0.16-0.18 ms for a draw alone, so a draft accepted a third of the time did not pay. Here a
 * row takes rows_max's scans for its maximum (race.c), one pass writing its exponentials and
 * one normalising them, and only the rows the acceptance visits (those of the accepted drafts
 * and of the next token) are computed; every row's maximum is still checked.
 *
 * exp(a) for a <= 0: Cody-Waite reduction a = k ln2 + r (k = rint(a log2 e), ln2 in two parts),
 * exp(r) as its Taylor polynomial to r^7 (|r| <= 0.35: truncation < 1e-8 relative), times 2^k
 * built in the exponent bits; a < -87 (incl. -inf) gives 0 (exp(-87) is 1.6e-38). Sums run in 16
 * double lanes (lane l: elements l, l + 16, ...; a tail adds to its first lanes) reduced in lane
 * order (fp32 lanes left the 49k-entry sums ~4e-6 off). The AVX-512F path and the portable one
 * run the same operations (explicit fmas, no contraction), so they give the same bits; the
 * portable one calls libm's fmaf per operation, so sample_fast() tells the engine whether the
 * AVX-512F path runs (else it keeps torch's vectorised ops).
 *
 * Acceptance (reference.stochastic_accept): node c with token x is accepted iff
 * U_c * q_c[x] * sum(r) < r[x], in that order of fp32 operations, r being the verifier's row
 * after c's parent or, after a rejected sibling, the residual max(r - q * sum(r), 0); when no
 * child is accepted (or a leaf or the chain's end is reached) r races for the next token. The
 * uniforms are reference.counter_uniform's (race.c). The probabilities differ from
 * torch.softmax's by float rounding, so a decision or a race can differ from the torch
 * reference's where it is decided by the last bits; the distribution is the verifier's to fp32
 * precision (tests/test_cpu_sample.py: chi-square, and agreement with the reference).
 *
 * Built with -ffp-contract=off: no fusing beyond the fmas written here.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "race.h"
#include "sample.h"

#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f       /* ln 2 = LN2_HI - LN2_LO, LN2_HI with 9 significant bits */
#define LN2_LO 2.12194440e-4f
#define EXP_MIN (-87.0f)          /* below: 0 */
/* 1/7!, 1/6!, ..., 1/2!, 1, 1: exp(r) ~ sum r^j / j! */
static const float EXP_C[8] = {1.98412698e-4f, 1.38888889e-3f, 8.33333333e-3f, 4.16666667e-2f,
                               1.66666667e-1f, 0.5f, 1.0f, 1.0f};

#define LANES 16

static inline float exp_neg(float a) {
    if (!(a >= EXP_MIN)) return 0.0f;
    const float k = rintf(a * LOG2E);
    float r = fmaf(-k, LN2_HI, a);
    r = fmaf(k, LN2_LO, r);
    float p = EXP_C[0];
    for (int j = 1; j < 8; ++j) p = fmaf(p, r, EXP_C[j]);
    const uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, 4);
    return p * two_k;
}

static float lanes_sum(const double *acc) {
    double s = acc[0];
    for (int l = 1; l < LANES; ++l) s += acc[l];
    return (float)s;
}

/* p[v] = exp((x[v] - m) * inv_t); returns the lane sum. */
static float exps_scalar(const float *x, int64_t V, float m, float inv_t, float *p) {
    double acc[LANES] = {0};
    for (int64_t v = 0; v < V; ++v) {
        p[v] = exp_neg((x[v] - m) * inv_t);
        acc[v % LANES] += (double)p[v];
    }
    return lanes_sum(acc);
}

/* p[v] *= inv; returns the lane sum of the results. */
static float scale_scalar(float *p, int64_t V, float inv) {
    double acc[LANES] = {0};
    for (int64_t v = 0; v < V; ++v) {
        p[v] *= inv;
        acc[v % LANES] += (double)p[v];
    }
    return lanes_sum(acc);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("avx512f"))) static inline __m512 exp_neg16(__m512 a) {
    const __mmask16 keep = _mm512_cmp_ps_mask(a, _mm512_set1_ps(EXP_MIN), _CMP_GE_OQ);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), a);
    r = _mm512_fmadd_ps(k, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_C[0]);
    for (int j = 1; j < 8; ++j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_C[j]));
    const __m512i bits = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(bits));
}

/* acc[0] (lanes 0-7) and acc[1] (lanes 8-15) += the 16 floats of e, widened. */
__attribute__((target("avx512f"))) static inline void add_lanes(__m512d *acc, __m512 e) {
    const __m512i b = _mm512_castps_si512(e);
    const __m256 lo = _mm256_castsi256_ps(_mm512_castsi512_si256(b));
    const __m256 hi = _mm256_castsi256_ps(_mm512_extracti64x4_epi64(b, 1));
    acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(lo));
    acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(hi));
}

__attribute__((target("avx512f"))) static float reduce_lanes(const __m512d *acc) {
    double lanes[LANES];
    _mm512_storeu_pd(lanes, acc[0]);
    _mm512_storeu_pd(lanes + 8, acc[1]);
    return lanes_sum(lanes);
}

__attribute__((target("avx512f"))) static float exps_512(const float *x, int64_t V, float m,
                                                        float inv_t, float *p) {
    const __m512 mv = _mm512_set1_ps(m), it = _mm512_set1_ps(inv_t);
    __m512d acc[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
    int64_t v = 0;
    for (; v + LANES <= V; v += LANES) {
        const __m512 e = exp_neg16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + v), mv), it));
        _mm512_storeu_ps(p + v, e);
        add_lanes(acc, e);
    }
    const __mmask16 tail = (__mmask16)((1u << (V - v)) - 1u);
    if (tail) {
        const __m512 a = _mm512_mask_loadu_ps(mv, tail, x + v); /* absent lanes: 0 */
        const __m512 e = exp_neg16(_mm512_mul_ps(_mm512_sub_ps(a, mv), it));
        _mm512_mask_storeu_ps(p + v, tail, e);
        add_lanes(acc, _mm512_maskz_mov_ps(tail, e));
    }
    return reduce_lanes(acc);
}

__attribute__((target("avx512f"))) static float scale_512(float *p, int64_t V, float inv) {
    const __m512 iv = _mm512_set1_ps(inv);
    __m512d acc[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
    int64_t v = 0;
    for (; v + LANES <= V; v += LANES) {
        const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(p + v), iv);
        _mm512_storeu_ps(p + v, s);
        add_lanes(acc, s);
    }
    const __mmask16 tail = (__mmask16)((1u << (V - v)) - 1u);
    if (tail) {
        const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p + v), iv);
        _mm512_mask_storeu_ps(p + v, tail, s);
        add_lanes(acc, _mm512_maskz_mov_ps(tail, s));
    }
    return reduce_lanes(acc);
}

/* 16 values of q from v on: q's own, or (q NULL: a point mass at x) 1 at x and 0 elsewhere. */
__attribute__((target("avx512f"))) static __m512 q_at(const float *q, int64_t x, int64_t v,
                                                     __mmask16 lanes) {
    if (q) return _mm512_maskz_loadu_ps(lanes, q + v);
    const __mmask16 at = (x >= v && x < v + LANES) ? (__mmask16)(1u << (x - v)) : 0;
    return _mm512_maskz_mov_ps((__mmask16)(at & lanes), _mm512_set1_ps(1.0f));
}

/* residual() on 16 lanes: the same operations (max(d, 0) keeps +0 where d is -0, as d > 0 ? d
 * : 0 does), the same lane sums. */
__attribute__((target("avx512f"))) static float residual_512(const float *r, const float *q,
                                                            int64_t x, float mass, int64_t V,
                                                            float *work) {
    const __m512 mv = _mm512_set1_ps(mass), zero = _mm512_setzero_ps();
    __m512d acc[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
    int64_t v = 0;
    for (; v + LANES <= V; v += LANES) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(r + v),
                                       _mm512_mul_ps(q_at(q, x, v, 0xFFFF), mv));
        const __m512 w = _mm512_max_ps(d, zero);
        _mm512_storeu_ps(work + v, w);
        add_lanes(acc, w);
    }
    const __mmask16 tail = (__mmask16)((1u << (V - v)) - 1u);
    if (tail) {
        const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, r + v),
                                       _mm512_mul_ps(q_at(q, x, v, tail), mv));
        const __m512 w = _mm512_maskz_max_ps(tail, d, zero);
        _mm512_mask_storeu_ps(work + v, tail, w);
        add_lanes(acc, w);
    }
    return reduce_lanes(acc);
}

#endif

static int allow_512 = 1; /* sample_set_avx512 (tests compare the two paths) */

int sample_set_avx512(int on) {
    allow_512 = on != 0;
#if defined(__x86_64__) && defined(__GNUC__)
    return allow_512 && race_cpu_avx512f();
#else
    return 0;
#endif
}

/* The AVX-512F path for rows of V floats (the tail mask and lane counters are 32-bit, as in
 * race.c's argmax). */
static int use_512(int64_t V) {
#if defined(__x86_64__) && defined(__GNUC__)
    return allow_512 && race_cpu_avx512f() && V < ((int64_t)1 << 31);
#else
    (void)V;
    return 0;
#endif
}

int sample_fast(void) { return use_512(1); }

/* The row's maximum; 0 when it is not finite. */
static int row_max(const float *x, int64_t V, float *m) {
    int64_t idx;
    rows_max(x, 1, V, V, m, &idx);
    return V > 0 && isfinite(*m);
}

/* p = softmax((x - m) * inv_t) for the row's finite maximum m; returns sum(p) (~1). */
static float softmax_at(const float *x, int64_t V, float m, float inv_t, float *p) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (use_512(V)) return scale_512(p, V, 1.0f / exps_512(x, V, m, inv_t, p));
#endif
    return scale_scalar(p, V, 1.0f / exps_scalar(x, V, m, inv_t, p));
}

int sample_softmax(const float *x, int64_t V, float inv_t, float *p) {
    float m;
    if (!row_max(x, V, &m)) return 0;
    softmax_at(x, V, m, inv_t, p);
    return 1;
}

int64_t sample_row(const float *x, int64_t V, float inv_t, uint32_t key, int64_t index0,
                   float *p) {
    if (!sample_softmax(x, V, inv_t, p)) return -1;
    return race_argmax(p, V, key, index0);
}

#define CHAIN_MAX 256 /* nodes of one chain or tree, at most (>= reference.MAX_TREE_NODES) */

/* work = max(r - q * mass, 0) (the reference's clamp(r - q * mass, min=0)); returns its sum,
 * in the lanes of the softmax's sums. q NULL: a point mass at x (a deterministic drafter's
 * row, one-hot at its token), the same operations on the same values as that row. */
static float residual(const float *r, const float *q, int64_t x, float mass, int64_t V,
                      float *work) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (use_512(V)) return residual_512(r, q, x, mass, V, work);
#endif
    double acc[LANES] = {0};
    for (int64_t v = 0; v < V; ++v) {
        const float qv = q ? q[v] : (v == x ? 1.0f : 0.0f);
        const float d = r[v] - qv * mass;
        work[v] = d > 0.0f ? d : 0.0f;
        acc[v % LANES] += (double)work[v];
    }
    return lanes_sum(acc);
}

/* Every row's maximum, into m; 0 when one is not finite. */
static int rows_finite(const float *logits, int64_t rows, int64_t V, int64_t ld, float *m) {
    for (int64_t i = 0; i < rows; ++i)
        if (!row_max(logits + i * ld, V, &m[i])) return 0;
    return 1;
}

int64_t sample_accept_tree(const float *logits, int64_t n, int64_t V, int64_t ld, float inv_t,
                           const int64_t *tokens, const int64_t *parents, const float *q,
                           int64_t ldq, uint32_t key_accept, uint32_t key_residual, float *p,
                           float *work, int64_t *path, int64_t *next) {
    float m[CHAIN_MAX + 1];
    if (n < 0 || n > CHAIN_MAX || V <= 0) return -2;
    if (!rows_finite(logits, n + 1, V, ld, m)) return -1;
    for (int64_t i = 0; i < n; ++i) path[i] = -1;
    int64_t cur = -1, num = 0;
    const float *r = p; /* the residual: row cur + 1 of p, then work after a rejection */
    float mass = softmax_at(logits, V, m[0], inv_t, p);
    for (;;) {
        int64_t taken = -1;
        for (int64_t c = cur + 1; c < n && taken < 0; ++c) {
            if (parents[c] != cur) continue;
            const int64_t x = tokens[c];
            const float *qc = q ? q + c * ldq : NULL; /* NULL: a point mass at x */
            float u;
            race_uniforms(&u, 1, key_accept, c);
            if (x >= 0 && x < V && u * (qc ? qc[x] : 1.0f) * mass < r[x]) {
                taken = c;
            } else {
                mass = residual(r, qc, x, mass, V, work);
                r = work;
            }
        }
        if (taken < 0) break;
        path[num++] = cur = taken;
        r = p + (cur + 1) * V;
        mass = softmax_at(logits + (cur + 1) * ld, V, m[cur + 1], inv_t, p + (cur + 1) * V);
    }
    *next = race_argmax(r, V, key_residual, 0);
    return num;
}
