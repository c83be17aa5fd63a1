/*
 * The decoder layers of a LLaMA on CPU in one call: for a block of n new tokens (a chain or a
 * tree given by its ancestor bitmask) and every layer, RMSNorm -> QKV -> RoPE -> KV-cache append
 * -> verification attention -> O -> residual -> RMSNorm -> gate/up -> SiLU * up -> down ->
 * residual. Same contract as models/llama.py's Block.forward with
 * pipespec_fast.reference.verify_attention (which stays the reference); it exists because
 * Python and op dispatch cost more than the arithmetic when decoding a 135M model.
 *
 * Matmuls go to skinny_gemm_f32 (fp32 weights), quant_gemm_f32 (packed weights) or, in the int8
 * compute mode, int8_gemm_f32 (Q4_1 / Q8_0 packed weights), all batch invariant. Everything else is computed per row (norms, RoPE, SiLU) or per (token, head) pair
 * (attention: keys in slot order, dot products in a fixed 8-lane order, a two-pass softmax;
 * the heads of a key/value head share loads, never an operation)
 * with the same operations whatever n, the position of the row in the block, the thread count
 * or the split of the work, so the layer stack is batch invariant too: verifying a block gives
 * each token bit for bit the hidden state that decoding it alone gives.
 *
 * Built with the GEMMs into one library; called through ctypes (the GIL is released).
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_decoder.h"
#include "int8_gemm.h"
#include "quant_gemm.h"
#include "skinny_gemm.h"
#include "thread_pool.h"

int decoder_abi_version(void) { return DECODER_ABI_VERSION; }

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))

#pragma GCC push_options
#pragma GCC target("avx2,fma")

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, _MM_SHUFFLE(1, 1, 1, 1)));
    return _mm_cvtss_f32(t);
}

/* The largest lane (exact: max does not round; a NaN lane loses to any number). */
INLINE float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    s = _mm_max_ps(_mm_movehl_ps(s, s), s);
    s = _mm_max_ss(_mm_shuffle_ps(s, s, _MM_SHUFFLE(1, 1, 1, 1)), s);
    return _mm_cvtss_f32(s);
}

/* sum_j a[j] * b[j] in a fixed order: 8 lanes over blocks of 8, the canonical reduction, then
 * the tail in order. */
INLINE float dot(const float *a, const float *b, int d) {
    __m256 acc = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= d; j += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    float s = hsum8(acc);
    for (; j < d; ++j) s += a[j] * b[j];
    return s;
}

/* y[j] += a * x[j] (one fma per element). */
INLINE void axpy(float *restrict y, float a, const float *restrict x, int d) {
    const __m256 av = _mm256_set1_ps(a);
    int j = 0;
    for (; j + 8 <= d; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
    for (; j < d; ++j) y[j] = fmaf(a, x[j], y[j]);
}

static void rmsnorm(float *restrict out, const float *restrict x, const float *restrict w,
                    int dim, float eps) {
    const float r = 1.0f / sqrtf(dot(x, x, dim) / (float)dim + eps);
    for (int j = 0; j < dim; ++j) out[j] = w[j] * (x[j] * r);
}

/* HF half-split RoPE of one head vector in place: v * cos + rotate_half(v) * sin. */
static void rope(float *restrict v, const float *restrict c, const float *restrict s, int hd) {
    const int half = hd / 2;
    float tmp[512];
    memcpy(tmp, v, (size_t)hd * sizeof(float));
    for (int j = 0; j < half; ++j) v[j] = tmp[j] * c[j] + (-tmp[j + half]) * s[j];
    for (int j = half; j < hd; ++j) v[j] = tmp[j] * c[j] + tmp[j - half] * s[j];
}

/* exp(x) for 8 lanes (x <= 0 here): Cody-Waite reduction x = k ln2 + r, a degree-6 polynomial
 * for e^r on |r| <= ln2 / 2 (about 1 ulp), times 2^k; 0 below -87. Per lane, so the same for a
 * score whatever its neighbours. */
INLINE __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 kf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(kf),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* silu(g) * u for 8 lanes: g * sigmoid(g) * u, the sigmoid from e = exp8(-|g|) (exp8's domain,
 * so no overflow): 1 / (1 + e) for g >= 0, e / (1 + e) below. About 2 ulp from the libm form
 * g / (1 + expf(-g)) * u, 30x cheaper; a NaN in g or u stays NaN (g multiplies the result). */
INLINE __m256 swiglu8(__m256 g, __m256 u) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 e = exp8(_mm256_or_ps(g, _mm256_set1_ps(-0.0f)));
    const __m256 num = _mm256_blendv_ps(one, e, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_mul_ps(_mm256_mul_ps(g, _mm256_div_ps(num, _mm256_add_ps(one, e))), u);
}

/* a[j] = silu(g[j]) * u[j], j < m: 8 lanes at a time, the tail through the same lanes (so an
 * element's bits never depend on its position). */
static void swiglu_row(const float *restrict g, const float *restrict u, float *restrict a,
                       int m) {
    int j = 0;
    for (; j + 8 <= m; j += 8)
        _mm256_storeu_ps(a + j, swiglu8(_mm256_loadu_ps(g + j), _mm256_loadu_ps(u + j)));
    if (j < m) {
        float gt[8] = {0}, ut[8] = {0}, at[8];
        memcpy(gt, g + j, sizeof(float) * (size_t)(m - j));
        memcpy(ut, u + j, sizeof(float) * (size_t)(m - j));
        _mm256_storeu_ps(at, swiglu8(_mm256_loadu_ps(gt), _mm256_loadu_ps(ut)));
        memcpy(a + j, at, sizeof(float) * (size_t)(m - j));
    }
}

#define GMAX 4 /* query heads attended together: they share their token's keys and values */

/* hsum8 of eight vectors at once: lane s of the result is hsum8(v[s]), bit for bit (the same
 * pairs added in the same tree: halves, then dwords 0 + 2 and 1 + 3, then those two). */
INLINE __m256 hsum8x8(const __m256 *v) {
    __m256 S[4];
    for (int i = 0; i < 4; ++i)
        S[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[i], v[i + 4], 0x20),
                             _mm256_permute2f128_ps(v[i], v[i + 4], 0x31)); /* [s^i | s^i+4] */
    const __m256 T0 = _mm256_add_ps(_mm256_shuffle_ps(S[0], S[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm256_shuffle_ps(S[0], S[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 T1 = _mm256_add_ps(_mm256_shuffle_ps(S[2], S[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm256_shuffle_ps(S[2], S[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm256_add_ps(_mm256_shuffle_ps(T0, T1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm256_shuffle_ps(T0, T1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* sc[h * ld + t] = dot(q_h, k[slots[t]]) * scale for G queries q (rows hd apart) and every slot,
 * each dot in dot()'s order: 8 keys at a time share one transposed reduction (hd % 8 == 0), the
 * rest one by one. Returns nothing; the scale is one rounding after the dot, as before. */
static void scores(const float *q, int G, const float *kc, const int *slots, int cnt, int hd,
                   float scale, float *sc, int ld) {
    int t = 0;
    if (hd % 8 == 0) {
        const __m256 sv = _mm256_set1_ps(scale);
        for (; t + 8 <= cnt; t += 8) {
            const float *k[8];
            for (int s = 0; s < 8; ++s) k[s] = kc + (size_t)slots[t + s] * hd;
            for (int h = 0; h < G; ++h) {
                const float *qh = q + (size_t)h * hd;
                __m256 acc[8];
                for (int s = 0; s < 8; ++s) acc[s] = _mm256_setzero_ps();
                for (int j = 0; j < hd; j += 8) {
                    const __m256 qv = _mm256_loadu_ps(qh + j);
                    for (int s = 0; s < 8; ++s)
                        acc[s] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[s] + j), acc[s]);
                }
                _mm256_storeu_ps(sc + (size_t)h * ld + t, _mm256_mul_ps(hsum8x8(acc), sv));
            }
        }
    }
    for (; t < cnt; ++t)
        for (int h = 0; h < G; ++h)
            sc[(size_t)h * ld + t] = dot(q + (size_t)h * hd, kc + (size_t)slots[t] * hd, hd) * scale;
}

/* p[0..cnt) = exp(sc - max sc) (a two-pass softmax's numerators; exp8 on 8 lanes, the tail
 * through the same lanes); returns 1 / sum p, the sum in 8 lanes (lane l: p[l], p[l + 8], ...
 * in order; the tail's missing lanes add +0) reduced by hsum8. The max is exact in any order:
 * vector lanes, a NaN score ignored as before. */
static float softmax_numerators(const float *sc, int cnt, float *p) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 8 <= cnt; t += 8) m8 = _mm256_max_ps(_mm256_loadu_ps(sc + t), m8);
    float mx = hmax8(m8);
    for (; t < cnt; ++t) mx = sc[t] > mx ? sc[t] : mx;
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 s8 = _mm256_setzero_ps();
    for (t = 0; t + 8 <= cnt; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), mv));
        _mm256_storeu_ps(p + t, e);
        s8 = _mm256_add_ps(s8, e);
    }
    if (t < cnt) {
        float tmp[8] = {0}, e[8];
        for (int u = t; u < cnt; ++u) tmp[u - t] = sc[u] - mx;
        _mm256_storeu_ps(e, exp8(_mm256_loadu_ps(tmp)));
        for (int u = cnt - t; u < 8; ++u) e[u] = 0.0f;
        for (int u = t; u < cnt; ++u) p[u] = e[u - t];
        s8 = _mm256_add_ps(s8, _mm256_loadu_ps(e));
    }
    return 1.0f / hsum8(s8);
}

/* out_h[d] = inv_h * sum_t p_h[t] * v[slots[t]][d] for G heads (p rows ld apart, out rows hd
 * apart): for each element one fma chain over the slots in order from 0, then one multiply,
 * whatever the vector width (so this and the AVX-512 twin give the same bits). Dimensions go
 * 32 at a time (4 accumulators per head stay in registers), then 8, then one by one. */
static void weighted_sums(const float *vc, const int *slots, int cnt, const float *p, int ld,
                          const float *inv, int G, int hd, float *out) {
    int d0 = 0;
    for (; d0 + 32 <= hd; d0 += 32) {
        __m256 acc[GMAX][4];
        for (int h = 0; h < G; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = _mm256_setzero_ps();
        for (int t = 0; t < cnt; ++t) {
            const float *v = vc + (size_t)slots[t] * hd + d0;
            for (int h = 0; h < G; ++h) {
                const __m256 pv = _mm256_set1_ps(p[(size_t)h * ld + t]);
                for (int c = 0; c < 4; ++c)
                    acc[h][c] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * c), acc[h][c]);
            }
        }
        for (int h = 0; h < G; ++h)
            for (int c = 0; c < 4; ++c)
                _mm256_storeu_ps(out + (size_t)h * hd + d0 + 8 * c,
                                 _mm256_mul_ps(acc[h][c], _mm256_set1_ps(inv[h])));
    }
    for (; d0 + 8 <= hd; d0 += 8) {
        __m256 acc[GMAX];
        for (int h = 0; h < G; ++h) acc[h] = _mm256_setzero_ps();
        for (int t = 0; t < cnt; ++t)
            for (int h = 0; h < G; ++h)
                acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(p[(size_t)h * ld + t]),
                                         _mm256_loadu_ps(vc + (size_t)slots[t] * hd + d0),
                                         acc[h]);
        for (int h = 0; h < G; ++h)
            _mm256_storeu_ps(out + (size_t)h * hd + d0,
                             _mm256_mul_ps(acc[h], _mm256_set1_ps(inv[h])));
    }
    for (; d0 < hd; ++d0)
        for (int h = 0; h < G; ++h) {
            float acc = 0.0f;
            for (int t = 0; t < cnt; ++t)
                acc = fmaf(p[(size_t)h * ld + t], vc[(size_t)slots[t] * hd + d0], acc);
            out[(size_t)h * hd + d0] = acc * inv[h];
        }
}

#pragma GCC pop_options

/* weighted_sums for hd % 64 == 0 with 16-lane vectors: the same fma chain per element. */
__attribute__((target("avx512f"))) static void weighted_sums_512(
    const float *vc, const int *slots, int cnt, const float *p, int ld, const float *inv, int G,
    int hd, float *out) {
    for (int d0 = 0; d0 < hd; d0 += 64) {
        __m512 acc[GMAX][4];
        for (int h = 0; h < G; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_setzero_ps();
        for (int t = 0; t < cnt; ++t) {
            const float *v = vc + (size_t)slots[t] * hd + d0;
            for (int h = 0; h < G; ++h) {
                const __m512 pv = _mm512_set1_ps(p[(size_t)h * ld + t]);
                for (int c = 0; c < 4; ++c)
                    acc[h][c] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 16 * c), acc[h][c]);
            }
        }
        for (int h = 0; h < G; ++h)
            for (int c = 0; c < 4; ++c)
                _mm512_storeu_ps(out + (size_t)h * hd + d0 + 16 * c,
                                 _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h])));
    }
}

static int use_512 = -1; /* the AVX-512F weighted sums: -1 until decided */

int decoder_set_avx512(int on) {
    __builtin_cpu_init();
    use_512 = on && __builtin_cpu_supports("avx512f");
    return use_512;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

/* G <= GMAX query heads of one token that share a key/value head (q and out: G rows hd apart)
 * against the token's keys: every prefix slot, then the new slots of its ancestors-or-self, in
 * slot order. Each head's arithmetic is exactly what it would be alone (G changes which loads
 * are shared, never an operation), so the split of heads into groups and threads is free.
 * scratch: (2 * GMAX + 1) * (start + n) floats. */
static void attend(const float *restrict q, int G, const float *restrict kc,
                   const float *restrict vc, int start, int n, const int32_t *restrict bits,
                   int hd, float scale, float *restrict scratch, float *restrict out) {
    const int ctx = start + n;
    float *sc = scratch, *p = scratch + (size_t)GMAX * ctx;
    int *slots = (int *)(scratch + 2 * (size_t)GMAX * ctx);
    int cnt = 0;
    for (int s = 0; s < start; ++s) slots[cnt++] = s;
    for (int j = 0; j < n; ++j)
        if ((bits[j >> 5] >> (j & 31)) & 1) slots[cnt++] = start + j;
    scores(q, G, kc, slots, cnt, hd, scale, sc, ctx);
    float inv[GMAX];
    for (int h = 0; h < G; ++h)
        inv[h] = softmax_numerators(sc + (size_t)h * ctx, cnt, p + (size_t)h * ctx);
    if (use_512 && hd % 64 == 0)
        weighted_sums_512(vc, slots, cnt, p, ctx, inv, G, hd, out);
    else
        weighted_sums(vc, slots, cnt, p, ctx, inv, G, hd, out);
}



/* y[n, m] = x[n, k] @ w^T by the GEMM for the weight's storage (decoder_layer_t.kind) and the
 * layer's compute mode: in int8 mode, Q4_1 / Q8_0 rows take the int8 GEMM (x quantised once for
 * the whole product: QKV and gate/up are one product each), everything else stays exact. */
static void layer_matmul(const float *x, int n, int k, const void *w, int kind, int compute,
                         int m, float *y, int nt, int *err) {
    if (kind == DECODER_WEIGHT_FP32) {
        skinny_gemm_f32(x, (const float *)w, y, n, k, m, k, nt);
        return;
    }
    if (compute == DECODER_COMPUTE_INT8 && (kind == QUANT_Q4_1 || kind == QUANT_Q8_0)) {
        const int rc = int8_gemm_f32(x, (const uint8_t *)w, y, n, k, m, k, kind, nt);
        if (rc != 0) *err = rc == -2 ? DECODER_OUT_OF_MEMORY : DECODER_BAD_WEIGHTS;
        return;
    }
    const int rc = quant_gemm_f32(x, (const uint8_t *)w, y, n, k, m, k, kind, nt);
    if (rc != 0) *err = rc == QUANT_OUT_OF_MEMORY ? DECODER_OUT_OF_MEMORY : DECODER_BAD_WEIGHTS;
}

/* What the per-row and per-(token, head) steps of one layer read and write. */
typedef struct {
    const decoder_layer_t *L;
    float *x, *h, *qkv, *att, *gu, *act, *scores, *kl, *vl;
    const float *cosv, *sinv;
    const int32_t *bits;
    int words, n, dim, n_heads, n_kv, hd, inter, qo, kvo, qkvw, group, start, max_len, ctx;
    float eps, scale;
    int step; /* which of the STEP_* below a pool job runs */
} layer_job_t;

enum { STEP_ATTN_NORM, STEP_ROPE_KV, STEP_ATTEND, STEP_FFN_NORM, STEP_SWIGLU };

/* Part t of T of the current step: a contiguous range of rows (or of (token, head) pairs). */
static void layer_part(void *arg, int t, int T) {
    const layer_job_t *c = arg;
    const int count = c->step == STEP_ATTEND ? c->n * c->n_heads : c->n;
    int b, e;
    pool_part(count, t, T, &b, &e);
    for (int i = b; i < e; ++i) {
        switch (c->step) {
        case STEP_ATTN_NORM:
        case STEP_FFN_NORM:
            rmsnorm(c->h + (size_t)i * c->dim, c->x + (size_t)i * c->dim,
                    c->step == STEP_ATTN_NORM ? c->L->attn_norm : c->L->ffn_norm, c->dim, c->eps);
            break;
        case STEP_ROPE_KV: {
            float *r = c->qkv + (size_t)i * c->qkvw;
            const float *cs = c->cosv + (size_t)i * c->hd, *sn = c->sinv + (size_t)i * c->hd;
            const size_t hd = (size_t)c->hd;
            for (int hh = 0; hh < c->n_heads + c->n_kv; ++hh) rope(r + hh * hd, cs, sn, c->hd);
            for (int g = 0; g < c->n_kv; ++g) {
                const size_t slot = ((size_t)g * c->max_len + (size_t)(c->start + i)) * hd;
                memcpy(c->kl + slot, r + c->qo + g * hd, sizeof(float) * hd);
                memcpy(c->vl + slot, r + c->qo + c->kvo + g * hd, sizeof(float) * hd);
            }
            break;
        }
        case STEP_ATTEND: { /* heads i.. of one token and key/value head, up to GMAX */
            const int tok = i / c->n_heads, hh = i % c->n_heads, g = hh / c->group;
            int G = (g + 1) * c->group - hh;
            G = G < GMAX ? G : GMAX;
            G = G < e - i ? G : e - i;
            attend(c->qkv + (size_t)tok * c->qkvw + (size_t)hh * c->hd, G,
                   c->kl + (size_t)g * c->max_len * c->hd, c->vl + (size_t)g * c->max_len * c->hd,
                   c->start, c->n, c->bits + (size_t)tok * c->words, c->hd, c->scale,
                   c->scores + (size_t)t * (2 * GMAX + 1) * c->ctx,
                   c->att + (size_t)tok * c->qo + (size_t)hh * c->hd);
            i += G - 1;
            break;
        }
        case STEP_SWIGLU: {
            const float *g = c->gu + (size_t)i * 2 * c->inter, *u = g + c->inter;
            swiglu_row(g, u, c->act + (size_t)i * c->inter, c->inter);
            break;
        }
        }
    }
}

static void run_step(layer_job_t *c, int step, int parts) {
    c->step = step;
    pool_run(layer_part, c, parts);
}

/* See cpu_decoder.h. Returns a DECODER_* code. */
int decoder_layers_f32(const decoder_layer_t *layers, int n_layers, float *x, int n, int dim,
                       int n_heads, int n_kv, int hd, int inter, float eps, const float *cosv,
                       const float *sinv, const int32_t *bits, int words, float *k_cache,
                       float *v_cache, long long layer_stride, int max_len, int start,
                       int nthreads) {
    if (n <= 0) return DECODER_OK;
    if (hd > 512 || hd % 2 || n_kv <= 0 || n_heads % n_kv || start + n > max_len ||
        words < (n + 31) / 32)
        return DECODER_BAD_SHAPE;
    if (use_512 < 0) decoder_set_avx512(1);
    const int nt = nthreads < 1 ? 1 : nthreads;
    const int qo = n_heads * hd, kvo = n_kv * hd, qkvw = qo + 2 * kvo;
    const int ctx = start + n;
    layer_job_t c = {.x = x, .cosv = cosv, .sinv = sinv, .bits = bits, .words = words, .n = n,
                     .dim = dim, .n_heads = n_heads, .n_kv = n_kv, .hd = hd, .inter = inter,
                     .qo = qo, .kvo = kvo, .qkvw = qkvw, .group = n_heads / n_kv,
                     .start = start, .max_len = max_len, .ctx = ctx, .eps = eps,
                     .scale = (float)(1.0 / sqrt((double)hd))};
    c.h = malloc(sizeof(float) * (size_t)n * dim);
    c.qkv = malloc(sizeof(float) * (size_t)n * qkvw);
    c.att = malloc(sizeof(float) * (size_t)n * qo);
    c.gu = malloc(sizeof(float) * (size_t)n * 2 * inter);
    c.act = malloc(sizeof(float) * (size_t)n * inter);
    float *o = malloc(sizeof(float) * (size_t)n * dim);
    c.scores = malloc(sizeof(float) * (size_t)nt * (2 * GMAX + 1) * ctx); /* per part */
    int err = DECODER_OK;
    if (!c.h || !c.qkv || !c.att || !c.gu || !c.act || !o || !c.scores) {
        err = DECODER_OUT_OF_MEMORY;
        goto done;
    }
    /* Split the per-row and per-(token, head) work only when it is worth a hand-off (the
     * pool's workers spin between jobs, so a hand-off costs ~1-2 us). Attention is split from
     * ~30 tokens of context for one token: on the default target with 2 threads a decode step
     * (n = 1) took ~8% less than with the heads split only from n * ctx >= 900 (alternating
     * processes, 60 and 200 tokens of context, 14 of 18 comparisons). */
    const int rows = nt > 1 && (long long)n * inter >= 65536 ? nt : 1;
    const int heads = nt > 1 && (long long)n * n_heads * ctx * hd >= (1 << 14) ? nt : 1;
    for (int l = 0; l < n_layers && !err; ++l) {
        c.L = &layers[l];
        c.kl = k_cache + (size_t)l * layer_stride;
        c.vl = v_cache + (size_t)l * layer_stride;
        run_step(&c, STEP_ATTN_NORM, rows);
        layer_matmul(c.h, n, dim, c.L->w[0], c.L->kind[0], c.L->compute, qkvw, c.qkv, nt, &err);
        if (err) break; /* nothing past a failed product: the buffers hold no result */
        run_step(&c, STEP_ROPE_KV, rows);
        run_step(&c, STEP_ATTEND, heads);
        layer_matmul(c.att, n, qo, c.L->w[1], c.L->kind[1], c.L->compute, dim, o, nt, &err);
        if (err) break;
        for (size_t j = 0; j < (size_t)n * dim; ++j) x[j] += o[j];
        run_step(&c, STEP_FFN_NORM, rows);
        layer_matmul(c.h, n, dim, c.L->w[2], c.L->kind[2], c.L->compute, 2 * inter, c.gu, nt,
                     &err);
        if (err) break;
        run_step(&c, STEP_SWIGLU, rows);
        layer_matmul(c.act, n, inter, c.L->w[3], c.L->kind[3], c.L->compute, dim, o, nt, &err);
        if (err) break;
        for (size_t j = 0; j < (size_t)n * dim; ++j) x[j] += o[j];
    }
done:
    free(c.h);
    free(c.qkv);
    free(c.att);
    free(c.gu);
    free(c.act);
    free(o);
    free(c.scores);
    return err;
}

int decoder_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#else

int decoder_supported(void) { return 0; }
int decoder_set_avx512(int on) { (void)on; return 0; }
int decoder_layers_f32(const decoder_layer_t *layers, int n_layers, float *x, int n, int dim,
                       int n_heads, int n_kv, int hd, int inter, float eps, const float *cosv,
                       const float *sinv, const int32_t *bits, int words, float *k_cache,
                       float *v_cache, long long layer_stride, int max_len, int start,
                       int nthreads) {
    return DECODER_BAD_SHAPE;
}

#endif
