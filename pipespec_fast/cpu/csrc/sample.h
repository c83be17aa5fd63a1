/* Sampled decoding from a verifier's logits on CPU (sample.c): the tempered softmax, one token's
 * draw and speculative sampling over a tree (or chain) of drafts, in C. The same rules as
 * pipespec_fast.reference (probs_from_logits without top-k / top-p, sample_from_probs,
 * stochastic_accept) with the same counter-based uniforms (race.h); the
 * probabilities differ from torch.softmax's by float rounding only. Called through ctypes by
 * pipespec_fast/cpu/sample.py (signatures in pipespec_fast/cpu/library.py). */
#ifndef PIPESPEC_SAMPLE_H
#define PIPESPEC_SAMPLE_H

#include <stdint.h>

/* p[v] = exp((x[v] - max x) * inv_t) / sum, for v < V (inv_t = 1 / temperature > 0). Returns 1,
 * or 0 when the row has no finite maximum (a NaN, +inf, or every value -inf; p is then not
 * written). The AVX-512F path and the portable one give the same bits. */
int sample_softmax(const float *x, int64_t V, float inv_t, float *p);

/* One token from the tempered softmax of x[V]: the exponential race (race_argmax) over p under
 * key (reference.rng_key(seed, offset, STREAM_DRAFT)), counters index0 + v. p: [V] out (the
 * distribution drawn from). Returns the token, or -1 when the row has no finite maximum. */
int64_t sample_row(const float *x, int64_t V, float inv_t, uint32_t key, int64_t index0,
                   float *p);

/* Speculative sampling over a tree of n drafts (reference.stochastic_accept; a chain is the tree
 * with parents[c] = c - 1): node c has token tokens[c] and parent parents[c] (-1: the root;
 * topological), row c + 1 of logits (rows at logits + i * ld) is the verifier's after it and row
 * c of q (at q + c * ldq) the distribution it was drawn from (q NULL: every node a point mass
 * at its token, a deterministic drafter's one-hot rows, without reading them). The children of the current node
 * are tried in index order: child c with token x is accepted iff
 * U(key_accept, c) * q_c[x] * sum(r) < r[x], r being the verifier's row after the current node
 * or, after a rejected sibling, the residual max(r - q_c * sum(r), 0); an acceptance descends.
 * When no child is accepted (or a leaf is reached) r races for the next token (key_residual,
 * counters from 0). path: [n] out, the accepted nodes in order then -1; p: [(n + 1), V] out,
 * rows 0 and c + 1 of each accepted c written; work: [V] scratch. Returns the number accepted
 * and *next, -1 when some row of logits has no finite maximum (every row is checked, visited or
 * not), -2 for n outside [0, 256] or V <= 0. */
int64_t sample_accept_tree(const float *logits, int64_t n, int64_t V, int64_t ld, float inv_t,
                           const int64_t *tokens, const int64_t *parents, const float *q,
                           int64_t ldq, uint32_t key_accept, uint32_t key_residual, float *p,
                           float *work, int64_t *path, int64_t *next);

/* Allow (1, the default) or forbid (0) the AVX-512F path; returns whether it is used now. */
int sample_set_avx512(int on);

/* Whether the AVX-512F path runs (the portable one calls libm's fmaf per operation: slower than
 * torch's vectorised ops, which the engine keeps then). */
int sample_fast(void);

#endif
