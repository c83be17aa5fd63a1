/* The int8-activation GEMM on packed weights (int8_gemm.c): y[n, m] = x[n, k] @ W[m, k]^T with W
 * in ggml's Q4_1 or Q8_0 blocks (quant_gemm.h's layouts, as PackedWeight holds them) and x
 * quantised per 32-value block to int8, so the block dot products are integer (AVX-512 VNNI
 * vpdpbusd, an AVX2 fallback, a portable scalar path: bit-identical results). Called through
 * ctypes by pipespec_fast/cpu/int8.py (signatures in pipespec_fast/cpu/library.py); the fused
 * decoder can quantise a row block once (int8_quantize_rows) and run ranges of output columns
 * in its own pool parts (int8_gemm_range). */
#ifndef PIPESPEC_INT8_GEMM_H
#define PIPESPEC_INT8_GEMM_H

#include <stdint.h>

/* Bumped when a signature or int8_xblock_t changes; library.py refuses another version. */
#define INT8_GEMM_ABI_VERSION 1

/* Values per activation (and weight) block. */
#define INT8_QK 32

/* The kernel paths (bit-identical results): the best available, portable C, AVX2 (+FMA, F16C),
 * AVX-512F + AVX512-VNNI. */
enum { INT8_ISA_BEST = 0, INT8_ISA_SCALAR = 1, INT8_ISA_AVX2 = 2, INT8_ISA_VNNI512 = 3 };

/* One quantised activation block: q[j] = clamp(rne(fl(x[j] * fl(1 / d))), -127, 127) with
 * d = fl(amax / 127). A block holding a NaN or an infinity gets d = ds = NaN and q = 0 (so every
 * output it touches is NaN); a block whose 1/d overflows (amax < ~4e-37) is all zero (d = 0). */
typedef struct {
    float d;     /* the block's scale */
    float ds;    /* fl(d * sum): the Q4_1 min term's factor (ggml Q8_1's s, in fp32) */
    int32_t sum; /* sum of the 32 int8 values */
    int32_t off; /* -128 * sum: the VNNI path's compensation for offset Q8_0 weights */
} int8_xblock_t;

int int8_gemm_abi_version(void);

/* Choose a path (INT8_ISA_*; one the CPU lacks means the best it has); returns the path now in
 * effect. Plain x86-64 code: safe to call anywhere. */
int int8_gemm_set_isa(int isa);

/* The path in effect (the best available until set). */
int int8_gemm_get_isa(void);

/* Quantise n rows of x (row stride ldx floats, k % 32 == 0) into q [n, k] (row stride k) and
 * xs [n, k / 32] (row stride k / 32). Every path gives the same bytes. */
void int8_quantize_rows(const float *x, int n, int k, int ldx, int8_t *q, int8_xblock_t *xs);

/* The inner product for output columns [o_begin, o_end) on the calling thread: y[r, o] for
 * r < n, from quantised rows (q, xs as int8_quantize_rows writes them) and the weight rows
 * w [m, quant_row_bytes(kind, k)] (kind QUANT_Q4_1 or QUANT_Q8_0, k % 32 == 0; the caller
 * checks). y has row stride ldy. */
void int8_gemm_range(const int8_t *q, const int8_xblock_t *xs, int n, int k, const uint8_t *w,
                     int kind, int o_begin, int o_end, float *y, int ldy);

/* y [n, m] (contiguous) from quantised rows, nthreads pool threads splitting the columns.
 * Returns 0, or -1 for a kind other than Q4_1 / Q8_0 or k % 32 != 0. */
int int8_gemm_q(const int8_t *q, const int8_xblock_t *xs, const uint8_t *w, float *y, int n,
                int k, int m, int kind, int nthreads);

/* Quantise x [n, k] (row stride ldx), then int8_gemm_q. Returns 0, -1 as above, or -2 if the
 * scratch could not be allocated. */
int int8_gemm_f32(const float *x, const uint8_t *w, float *y, int n, int k, int m, int ldx,
                  int kind, int nthreads);

#endif
