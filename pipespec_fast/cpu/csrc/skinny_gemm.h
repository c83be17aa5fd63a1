/* The batch-invariant skinny fp32 GEMM (skinny_gemm.c): y[n, m] = x[n, k] @ w[m, k]^T.
 * Called by the fused decoder layers (cpu_decoder.c) and, through ctypes, by
 * pipespec_fast/cpu/gemm.py (signatures declared once, in pipespec_fast/cpu/library.py). */
#ifndef PIPESPEC_SKINNY_GEMM_H
#define PIPESPEC_SKINNY_GEMM_H

/* Bumped when a signature below changes; library.py refuses a library of another version. */
#define SKINNY_GEMM_ABI_VERSION 2

/* The kernel paths (bit-identical results): the best available, AVX2 + FMA, or AVX-512F for
 * n >= 3 (AVX2 below). */
enum { SKINNY_ISA_BEST = 0, SKINNY_ISA_AVX2 = 1, SKINNY_ISA_AVX512 = 2 };

int skinny_gemm_abi_version(void);

/* Whether this CPU has avx2 and fma (plain x86-64 code: safe to call anywhere). */
int skinny_gemm_supported(void);

/* Choose a path (SKINNY_ISA_*; one the CPU lacks means the best it has); returns the path now
 * in effect (0 if the CPU lacks avx2/fma). */
int skinny_gemm_set_isa(int isa);

/* The path in effect (the best available until set). */
int skinny_gemm_get_isa(void);

/* x: [n, k] with row stride ldx; w: [m, k] contiguous; y: [n, m] contiguous. nthreads pool
 * threads split the output columns; the result depends on none of n's split, nthreads or the
 * path. Requires skinny_gemm_supported(). */
void skinny_gemm_f32(const float *x, const float *w, float *y, int n, int k, int m, int ldx,
                     int nthreads);

#endif
