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

/* x: [n, k] with row stride ldx; w: [m, quant_row_bytes(kind, k)] bytes; y: [n, m]. Returns 0,
 * or -1 for an unknown kind, a k the format cannot hold, or a CPU without the instructions. */
int quant_gemm_f32(const float *x, const uint8_t *w, float *y, int n, int k, int m, int ldx,
                   int kind, int nthreads);

#endif
