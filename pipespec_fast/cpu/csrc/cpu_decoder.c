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
 * (attention: keys in slot order, dot products in a fixed 8-lane order, a two-pass softmax)
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

/* Four dot products q . k[slot[t]] (t = 0..3), each in exactly dot()'s order. */
INLINE void dot4(const float *q, const float *k0, const float *k1, const float *k2,
                 const float *k3, int d, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int j = 0;
    for (; j + 8 <= d; j += 8) {
        const __m256 qv = _mm256_loadu_ps(q + j);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + j), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + j), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + j), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + j), a3);
    }
    float s0 = hsum8(a0), s1 = hsum8(a1), s2 = hsum8(a2), s3 = hsum8(a3);
    for (; j < d; ++j) {
        s0 += q[j] * k0[j];
        s1 += q[j] * k1[j];
        s2 += q[j] * k2[j];
        s3 += q[j] * k3[j];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
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

/* out[0..hd) = sum_t p[t] * v[slot[t]] / sum, the slots in order; HD8 = hd / 8 when the
 * accumulators fit in registers (a constant at the call site), else 0 (memory). */
INLINE void weighted_sum(const int HD8, const float *restrict vc, const int *restrict slots,
                         const float *restrict p, int cnt, int hd, float inv,
                         float *restrict out) {
    if (HD8) {
        __m256 acc[16];
        for (int c = 0; c < HD8; ++c) acc[c] = _mm256_setzero_ps();
        for (int t = 0; t < cnt; ++t) {
            const __m256 pv = _mm256_set1_ps(p[t]);
            const float *v = vc + (size_t)slots[t] * hd;
            for (int c = 0; c < HD8; ++c)
                acc[c] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * c), acc[c]);
        }
        const __m256 iv = _mm256_set1_ps(inv);
        for (int c = 0; c < HD8; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], iv));
        return;
    }
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int t = 0; t < cnt; ++t) axpy(out, p[t], vc + (size_t)slots[t] * hd, hd);
    for (int d = 0; d < hd; ++d) out[d] *= inv;
}

/* One query (token i, head h) against its keys: every prefix slot, then the new slots of its
 * ancestors-or-self, in slot order. scratch: 2 * (start + n) floats + as many ints. */
static void attend(const float *restrict q, const float *restrict kc, const float *restrict vc,
                   int start, int n, const int32_t *restrict bits, int hd, float scale,
                   float *restrict scratch, float *restrict out) {
    const int ctx = start + n;
    float *sc = scratch, *p = scratch + ctx;
    int *slots = (int *)(scratch + 2 * (size_t)ctx);
    int cnt = 0;
    for (int s = 0; s < start; ++s) slots[cnt++] = s;
    for (int j = 0; j < n; ++j)
        if ((bits[j >> 5] >> (j & 31)) & 1) slots[cnt++] = start + j;
    int t = 0;
    for (; t + 4 <= cnt; t += 4)
        dot4(q, kc + (size_t)slots[t] * hd, kc + (size_t)slots[t + 1] * hd,
             kc + (size_t)slots[t + 2] * hd, kc + (size_t)slots[t + 3] * hd, hd, sc + t);
    for (; t < cnt; ++t) sc[t] = dot(q, kc + (size_t)slots[t] * hd, hd);
    float mx = -INFINITY;
    for (t = 0; t < cnt; ++t) {
        sc[t] *= scale;
        mx = sc[t] > mx ? sc[t] : mx;
    }
    const __m256 mv = _mm256_set1_ps(mx);
    for (t = 0; t + 8 <= cnt; t += 8)
        _mm256_storeu_ps(p + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), mv)));
    if (t < cnt) { /* the tail through the same 8-lane function */
        float tmp[8] = {0};
        for (int u = t; u < cnt; ++u) tmp[u - t] = sc[u] - mx;
        float e[8];
        _mm256_storeu_ps(e, exp8(_mm256_loadu_ps(tmp)));
        for (int u = t; u < cnt; ++u) p[u] = e[u - t];
    }
    float sum = 0.0f;
    for (t = 0; t < cnt; ++t) sum += p[t];
    const float inv = 1.0f / sum;
    if (hd == 64)
        weighted_sum(8, vc, slots, p, cnt, hd, inv, out);
    else if (hd == 128)
        weighted_sum(16, vc, slots, p, cnt, hd, inv, out);
    else
        weighted_sum(0, vc, slots, p, cnt, hd, inv, out);
}

#pragma GCC pop_options

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
        case STEP_ATTEND: {
            const int tok = i / c->n_heads, hh = i % c->n_heads, g = hh / c->group;
            attend(c->qkv + (size_t)tok * c->qkvw + (size_t)hh * c->hd,
                   c->kl + (size_t)g * c->max_len * c->hd, c->vl + (size_t)g * c->max_len * c->hd,
                   c->start, c->n, c->bits + (size_t)tok * c->words, c->hd, c->scale,
                   c->scores + (size_t)t * 3 * c->ctx,
                   c->att + (size_t)tok * c->qo + (size_t)hh * c->hd);
            break;
        }
        case STEP_SWIGLU: {
            const float *g = c->gu + (size_t)i * 2 * c->inter, *u = g + c->inter;
            float *a = c->act + (size_t)i * c->inter;
            for (int j = 0; j < c->inter; ++j) a[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
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
    c.scores = malloc(sizeof(float) * (size_t)nt * 3 * ctx); /* attend()'s scratch, per part */
    int err = DECODER_OK;
    if (!c.h || !c.qkv || !c.att || !c.gu || !c.act || !o || !c.scores) {
        err = DECODER_OUT_OF_MEMORY;
        goto done;
    }
    /* Split the per-row and per-(token, head) work only when it is worth a hand-off. */
    const int rows = nt > 1 && (long long)n * inter >= 65536 ? nt : 1;
    const int heads = nt > 1 && (long long)n * n_heads * ctx * hd >= (1 << 19) ? nt : 1;
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
int decoder_layers_f32(const decoder_layer_t *layers, int n_layers, float *x, int n, int dim,
                       int n_heads, int n_kv, int hd, int inter, float eps, const float *cosv,
                       const float *sinv, const int32_t *bits, int words, float *k_cache,
                       float *v_cache, long long layer_stride, int max_len, int start,
                       int nthreads) {
    return DECODER_BAD_SHAPE;
}

#endif
