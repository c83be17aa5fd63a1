/* The packed-weight fp32 GEMM (quant_gemm.c): y[n, m] = x[n, k] @ dequant(w)[m, k]^T with the
 * weight kept as stored (fp16 or ggml's Q4_1 / Q8_0 blocks). Called by the fused decoder layers
 * (cpu_decoder.c) and, through ctypes, by pipespec_fast/cpu/quant.py. */
#ifndef PIPESPEC_QUANT_GEMM_H
#define PIPESPEC_QUANT_GEMM_H

#include <stdint.h>

/* Storage formats of a weight row (pipespec_fast.cpu.quant.F16 / Q4_1 / Q8_0). */
enum { QUANT_F16 = 1, QUANT_Q4_1 = 2, QUANT_Q8_0 = 3 };

/* Bytes of one stored row of k values of that format (-1 for an unknown format). */
long long quant_row_bytes(int kind, int k);

/* Whether this CPU has AVX-512F, FMA and F16C. */
int quant_gemm_supported(void);

/* What quant_gemm_f32 returns besides 0. */
enum { QUANT_REFUSED = -1, QUANT_OUT_OF_MEMORY = -2 };

/* x: [n, k] with row stride ldx; w: [m, quant_row_bytes(kind, k)] bytes; y: [n, m]. Returns 0,
 * QUANT_REFUSED for an unknown kind, a k the format cannot hold, or a CPU without the
 * instructions, QUANT_OUT_OF_MEMORY if a long block's panels cannot be allocated. Blocks of
 * n >= the long-rows threshold (default QUANT_LONG_ROWS) take the panel path (quant_gemm.c);
 * the results are bit for bit the same on either path. */
int quant_gemm_f32(const float *x, const uint8_t *w, float *y, int n, int k, int m, int ldx,
                   int kind, int nthreads);

/* The default n from which quant_gemm_f32 dequantises panels of weight rows once for many rows
 * of x (prefills) instead of streaming them for every few rows (decoding). */
#define QUANT_LONG_ROWS 24

/* Set that threshold (n < 1: the default) and return the previous one; for benchmarks and
 * tests, which compare the two paths. Process-wide, not synchronised with running calls. */
int quant_gemm_set_long_rows(int n);

#endif
