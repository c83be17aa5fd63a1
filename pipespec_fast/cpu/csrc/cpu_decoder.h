/* Every decoder layer of a LLaMA forward on CPU in one call (cpu_decoder.c), through ctypes
 * from pipespec_fast/cpu/decoder.py (signatures and the layer struct mirrored once, in
 * pipespec_fast/cpu/library.py). */
#ifndef PIPESPEC_CPU_DECODER_H
#define PIPESPEC_CPU_DECODER_H

#include <stdint.h>

/* Bumped when a signature or decoder_layer_t changes; library.py checks it. */
#define DECODER_ABI_VERSION 2

/* The storage of a layer matrix: fp32 rows, else a QUANT_* format (quant_gemm.h). */
#define DECODER_WEIGHT_FP32 0

/* How a layer's products on packed Q4_1 / Q8_0 rows are computed (decoder_layer_t.compute):
 * exact fp32 arithmetic (quant_gemm), or the input rows quantised once per product to int8 per
 * 32-value block and integer block dots (int8_gemm.h). Both are batch invariant; fp32 and F16
 * weights are exact in either mode. */
enum { DECODER_COMPUTE_EXACT = 0, DECODER_COMPUTE_INT8 = 1 };

/* One layer's parameters. Matrices in order wqkv [qkv, dim], wo [dim, q], w13 [2 inter, dim],
 * w2 [dim, inter]; kind: DECODER_WEIGHT_FP32 (row-major) or a QUANT_* format (packed rows);
 * compute: a DECODER_COMPUTE_* mode. */
typedef struct {
    const float *attn_norm, *ffn_norm;
    const void *w[4];
    int32_t kind[4];
    int32_t compute;
} decoder_layer_t;

/* What decoder_layers_f32 returns. */
enum {
    DECODER_OK = 0,
    DECODER_OUT_OF_MEMORY = -1,
    DECODER_BAD_WEIGHTS = -2, /* a packed format the GEMM refuses (kind, k, or the CPU) */
    DECODER_BAD_SHAPE = -3,
};

int decoder_abi_version(void);

/* Whether this CPU has avx2 and fma. */
int decoder_supported(void);

/* Use the AVX-512F attention sums where the CPU has them (the default) or not (on = 0: the AVX2
 * path, for comparisons: both give the same bits). Returns whether they are in use. */
int decoder_set_avx512(int on);

/* Run n tokens through n_layers layers, in place on x [n, dim].
 *
 * cosv, sinv: [n, hd] RoPE tables of the tokens' positions. bits: [n, words] ancestor-or-self
 * masks of the block. k_cache, v_cache: the stage's caches, layer l / kv head g / slot s at
 * offset l * layer_stride + (g * max_len + s) * hd; slots [start, start + n) are overwritten. */
int decoder_layers_f32(const decoder_layer_t *layers, int n_layers, float *x, int n, int dim,
                       int n_heads, int n_kv, int hd, int inter, float eps, const float *cosv,
                       const float *sinv, const int32_t *bits, int words, float *k_cache,
                       float *v_cache, long long layer_stride, int max_len, int start,
                       int nthreads);

#endif
