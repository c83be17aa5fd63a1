/*
 * The int8 GEMM (int8_gemm_q) against the fp32 packed GEMM (quant_gemm_f32) on one matrix, timed
 * by the calling thread's CPU time (one thread: the pool is not used), so other processes on a
 * shared machine delay the figures little. With "peak", the cores' ceilings the same way: 12
 * independent chains of vfmadd / vpdpbusd zmm. Not built by the package; from the repository:
 *
 *   gcc -O2 -std=gnu11 -pthread -ffp-contract=off -Ipipespec_fast/cpu/csrc \
 *       -o /tmp/int8_bench bench/int8_gemm_cpu_time.c \
 *       pipespec_fast/cpu/csrc/{int8_gemm,quant_gemm,thread_pool}.c
 *   /tmp/int8_bench KIND M K [NS [REPS]]   # KIND 2 = Q4_1, 3 = Q8_0; NS e.g. 1,2,4,8,16
 *   /tmp/int8_bench peak
 *
 * Weights are random bytes with fixed block scales; x is uniform in [-0.5, 0.5).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "int8_gemm.h"
#include "quant_gemm.h"

#define NMAX 512

static double cpu_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

#define X12(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)

__attribute__((target("avx512f,avx512vnni"))) static void peak(void) {
    const long iters = 50000000;
    const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-9f);
#define DECLF(i) __m512 a##i = _mm512_set1_ps((float)i);
    X12(DECLF)
    double t0 = cpu_s();
    for (long it = 0; it < iters; ++it) {
#define STEPF(i) a##i = _mm512_fmadd_ps(a##i, b, c);
        X12(STEPF)
    }
    double t1 = cpu_s();
#define SUMF(i) +_mm512_reduce_add_ps(a##i)
    const float sf = 0 X12(SUMF);
    printf("fp32 FMA zmm: %.0f GMAC/s per core (%g)\n", iters * 12.0 * 16 / (t1 - t0) / 1e9, sf);
    const __m512i u = _mm512_set1_epi32(0x01020304), s = _mm512_set1_epi32(0x01010101);
#define DECLI(i) __m512i d##i = _mm512_set1_epi32(i);
    X12(DECLI)
    t0 = cpu_s();
    for (long it = 0; it < iters; ++it) {
#define STEPI(i) d##i = _mm512_dpbusd_epi32(d##i, u, s);
        X12(STEPI)
    }
    t1 = cpu_s();
#define SUMI(i) +_mm512_reduce_add_epi32(d##i)
    const int si = 0 X12(SUMI);
    printf("vpdpbusd zmm: %.0f GMAC/s per core (%d)\n", iters * 12.0 * 64 / (t1 - t0) / 1e9, si);
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "peak")) {
        peak();
        return 0;
    }
    if (argc < 4) {
        fprintf(stderr, "usage: %s KIND M K [NS [REPS]] | %s peak\n", argv[0], argv[0]);
        return 2;
    }
    const int kind = atoi(argv[1]), m = atoi(argv[2]), k = atoi(argv[3]);
    const int reps = argc > 5 ? atoi(argv[5]) : 30, nb = k / 32, bb = kind == QUANT_Q4_1 ? 20 : 34;
    const long long rb = quant_row_bytes(kind, k);
    uint8_t *w = malloc((size_t)rb * m);
    float *x = malloc(sizeof(float) * NMAX * (size_t)k);
    float *y = malloc(sizeof(float) * NMAX * (size_t)m);
    int8_t *q = malloc((size_t)NMAX * k);
    int8_xblock_t *xs = malloc(sizeof(int8_xblock_t) * NMAX * (size_t)nb);
    srand(1);
    for (long long i = 0; i < rb * m; ++i) w[i] = (uint8_t)rand();
    for (int o = 0; o < m; ++o)
        for (int b = 0; b < nb; ++b) { /* d = 2^-4 (fp16 0x2C00), Q4_1 min = -2^-4 */
            uint8_t *p = w + (size_t)o * rb + (size_t)b * bb;
            p[0] = 0x00, p[1] = 0x2C;
            if (kind == QUANT_Q4_1) p[2] = 0x00, p[3] = 0xAC;
        }
    for (size_t i = 0; i < (size_t)NMAX * k; ++i) x[i] = (float)rand() / RAND_MAX - 0.5f;
    int8_quantize_rows(x, NMAX, k, k, q, xs);
    char list[256];
    snprintf(list, sizeof list, "%s", argc > 4 ? argv[4] : "1,2,4,8,16");
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        const int n = atoi(tok);
        if (n < 1 || n > NMAX) continue;
        double bi = 1e9, bp = 1e9;
        for (int r = 0; r < reps; ++r) { /* interleaved; best of reps */
            const double t0 = cpu_s();
            int8_gemm_q(q, xs, w, y, n, k, m, kind, 1);
            const double t1 = cpu_s();
            quant_gemm_f32(x, w, y, n, k, m, k, kind, 1);
            const double t2 = cpu_s();
            bi = t1 - t0 < bi ? t1 - t0 : bi;
            bp = t2 - t1 < bp ? t2 - t1 : bp;
        }
        const double macs = (double)m * k * n, blocks = (double)m / 16 * nb;
        printf("%s m=%d k=%d n=%3d: int8 %9.1f us (%6.1f ns per 16-row block, %4.0f GMAC/s)  "
               "packed %9.1f us (%4.0f GMAC/s)  packed/int8 %.2f\n",
               kind == QUANT_Q4_1 ? "Q4_1" : "Q8_0", m, k, n, bi * 1e6, bi * 1e9 / blocks,
               macs / bi / 1e9, bp * 1e6, macs / bp / 1e9, bp / bi);
    }
    return 0;
}
