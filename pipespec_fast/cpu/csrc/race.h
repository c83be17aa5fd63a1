/* The exponential race that samples a token on CPU (race.c): the counter-based uniforms of
 * pipespec_fast.reference.counter_uniform, bit for bit, and argmax_v w[v] / -log(U_v). Called
 * through ctypes by pipespec_fast/cpu/race.py (signatures in pipespec_fast/cpu/library.py). */
#ifndef PIPESPEC_RACE_H
#define PIPESPEC_RACE_H

#include <stdint.h>

/* out[i] = U(key, index0 + i) for i < n: reference.counter_uniform's value for the counter
 * index0 + i under a key from reference.rng_key (the same bits). */
void race_uniforms(float *out, int64_t n, uint32_t key, int64_t index0);

/* argmax over v < V of w[v] / E_v, E_v = -log(U(key, index0 + v)) (w >= 0 and finite; the
 * first of equal maxima). Returns the index, or -1 when V <= 0. Every path (AVX-512F, portable
 * C) computes the same E_v and returns the same index. */
int64_t race_argmax(const float *w, int64_t V, uint32_t key, int64_t index0);

/* Greedy choice per row of x[n][V] (row i at x + i * ld): val[i] the row's maximum, idx[i] the
 * index of its first occurrence (torch.max(-1)'s answer). A row holding a NaN gets val NaN and
 * the first NaN's index, as torch's: the caller refuses a non-finite maximum. One pass to find
 * the maximum, one to find where it first is; AVX-512F where the CPU has it. */
void rows_max(const float *x, int64_t n, int64_t V, int64_t ld, float *val, int64_t *idx);

/* Whether this CPU has AVX-512F (checked once; sample.c's paths ask too). */
int race_cpu_avx512f(void);

#endif
