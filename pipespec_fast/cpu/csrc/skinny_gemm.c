/*
 * Skinny fp32 GEMM for CPU decoding: y[n, m] = x[n, k] @ w[m, k]^T, tuned for 1 <= n <= 16
 * (any n >= 1 is computed correctly; large n is just not what it is tuned for).
 *
 * Memory: the weight w is streamed from DRAM once per call. Output columns (weight rows) are
 * taken in tiles of TILE_M weight rows; a tile is used against every row of x (x is small and
 * stays in L1/L2) before the next one, and the tile PF_DIST tiles ahead is prefetched meanwhile.
 *
 * Batch invariance: every output element y[i, o] is computed by exactly the same sequence of
 * floating-point operations whatever n, i, the kernel shapes, the ISA path, the thread count or
 * the split of the work; the order depends on k only:
 *
 *   acc[0..7] = 0
 *   for each block b of 8 consecutive k (b = 0, 1, ...):
 *       acc[j] = fma(x[i, 8b + j], w[o, 8b + j], acc[j])            (j = 0..7)
 *   if k % 8: one more such step with both operands zero beyond k (masked loads)
 *   s[j] = acc[j] + acc[j + 4]                                       (j = 0..3)
 *   y[i, o] = (s[0] + s[2]) + (s[1] + s[3])
 *
 * Independent accumulation chains (to hide FMA latency) come from computing several (i, o)
 * pairs at once, never from splitting one element's sum. The 4-at-a-time horizontal reduction
 * performs, lane for lane, the same additions as the 1-at-a-time one (IEEE addition is
 * commutative, so operand order inside a pair is free). The AVX-512 path holds two elements'
 * 8-lane accumulators in one 16-lane register (x rows 2p and 2p+1 against one weight row), so it
 * performs the very same operations as the AVX2 path, twice as many per instruction. Built
 * without -ffast-math and with -ffp-contract=off, so the compiler cannot reassociate or fuse.
 *
 * Called through ctypes on raw pointers (no Python C-API); the caller checks
 * skinny_gemm_supported() (avx2 + fma at run time) before calling skinny_gemm_f32.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "skinny_gemm.h"
#include "thread_pool.h"

int skinny_gemm_abi_version(void) { return SKINNY_GEMM_ABI_VERSION; }

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

/* The SKINNY_ISA_* path in use (skinny_gemm.h); SKINNY_ISA_BEST: not chosen yet. */
static int isa_in_use = SKINNY_ISA_BEST;

/* Plain x86-64 code (no AVX): safe to call on any x86-64 CPU. */
int skinny_gemm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static int best_isa(void) {
    __builtin_cpu_init();
    if (!skinny_gemm_supported()) return 0;
    return __builtin_cpu_supports("avx512f") ? SKINNY_ISA_AVX512 : SKINNY_ISA_AVX2;
}

/* Results do not depend on the path (see skinny_gemm.h). */
int skinny_gemm_set_isa(int isa) {
    const int best = best_isa();
    isa_in_use = (isa <= SKINNY_ISA_BEST || isa > best) ? best : isa;
    return isa_in_use;
}

int skinny_gemm_get_isa(void) {
    if (isa_in_use == SKINNY_ISA_BEST) isa_in_use = best_isa();
    return isa_in_use;
}

#define TILE_M 6 /* weight rows per tile (a multiple of every kernel width below); measured: 6 >
                   * 12 > 24 (a short prefetch distance, and a tile that stays in L1) */
#define PF_HINT _MM_HINT_T0 /* measured: T0 > NTA > T1 here */
#define PF_DIST 1 /* prefetch the tile this many tiles ahead */
#define MAX_R 4   /* AVX2: rows of x per kernel */
#define MAX_C 3   /* AVX2: weight rows per kernel */
#define MAX_P 8   /* AVX-512: pairs of x rows per kernel */
#define MAX_C2 6  /* AVX-512: weight rows per kernel */
#define ROW_GROUP 256 /* large n: rows of x per pass over a thread's weight rows */

#define INLINE static inline __attribute__((always_inline))
#define MIN_THREAD_WORK 65536 /* weights per thread, at least */

/* mask_src[8 - rem .. 15 - rem] = rem lanes of -1 then zeros */
static const int32_t mask_src[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

typedef struct {
    const float *x; /* [n, k], row stride ldx */
    size_t ldx;
    const float *xp; /* AVX-512: x in row pairs, [ceil(n/2)][nbt][16], zero padded */
    size_t ldxp;     /* floats per pair = 16 * nbt */
    const float *w;  /* [m, k] */
    float *y;        /* [n, m] */
    int n, k, m, isa;
    int tiles; /* TILE_M-row tiles of w, split among the threads */
} skinny_job_t;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

/* The canonical reduction of one 8-lane accumulator. */
INLINE float reduce1(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                    /* s0+s2, s1+s3 */
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, _MM_SHUFFLE(1, 1, 1, 1))); /* (s0+s2)+(s1+s3) */
    return _mm_cvtss_f32(t);
}

/* reduce1 of four accumulators at once, returned as [a, b, c, d]; bit-identical to reduce1. */
INLINE __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 sab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                                     _mm256_permute2f128_ps(a, b, 0x31)); /* [sa | sb] */
    const __m256 scd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20),
                                     _mm256_permute2f128_ps(c, d, 0x31)); /* [sc | sd] */
    const __m256 u = _mm256_shuffle_ps(sab, scd, _MM_SHUFFLE(1, 0, 1, 0)); /* sa0 sa1 sc0 sc1 */
    const __m256 v = _mm256_shuffle_ps(sab, scd, _MM_SHUFFLE(3, 2, 3, 2)); /* sa2 sa3 sc2 sc3 */
    const __m256 p = _mm256_add_ps(u, v); /* sa0+sa2, sa1+sa3, sc0+sc2, sc1+sc3 | same b, d */
    const __m256 q = _mm256_hadd_ps(p, p); /* A, C, A, C | B, D, B, D */
    return _mm_unpacklo_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)); /* A B C D */
}

/* Spread pf_lines cache-line prefetches from pf evenly over nblk loop iterations. */
#define PREFETCH_STEP()                                                                       \
    for (pf_acc += pf_lines; pf_acc >= nblk; pf_acc -= nblk, pf += 64) _mm_prefetch(pf, PF_HINT)

/*
 * AVX2: R rows of x against C rows of w over all k. R and C are compile-time constants at every
 * call site (the switch in avx2_kernel), so the loops unroll and acc lives in registers.
 */
INLINE void avx2_block(const int R, const int C, const float *restrict x, size_t ldx,
                       const float *restrict w, size_t ldw, float *restrict y, size_t ldy, int k,
                       const char *pf, int pf_lines) {
    const int nblk = k / 8, rem = k % 8;
    __m256 acc[MAX_R][MAX_C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();

    int pf_acc = 0;
    for (int b = 0; b < nblk; ++b) {
        const size_t off = (size_t)b * 8;
        PREFETCH_STEP();
        if (R <= C) { /* x rows in registers, w streamed */
            __m256 xv[MAX_R];
            for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + off);
            for (int c = 0; c < C; ++c) {
                const __m256 wv = _mm256_loadu_ps(w + c * ldw + off);
                for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
            }
        } else { /* w rows in registers, x streamed */
            __m256 wv[MAX_C];
            for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * ldw + off);
            for (int r = 0; r < R; ++r) {
                const __m256 xv = _mm256_loadu_ps(x + r * ldx + off);
                for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
    }
    if (rem) { /* the k % 8 tail: zero-filled lanes add +0 products */
        const size_t off = (size_t)nblk * 8;
        const __m256i mask = _mm256_loadu_si256((const __m256i *)(mask_src + 8 - rem));
        __m256 wv[MAX_C];
        for (int c = 0; c < C; ++c) wv[c] = _mm256_maskload_ps(w + c * ldw + off, mask);
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_maskload_ps(x + r * ldx + off, mask);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }

    if (R == 4) { /* reduce down the 4 rows: one __m128 per weight row */
        for (int c = 0; c < C; ++c) {
            const __m128 v = reduce4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]);
            y[c] = _mm_cvtss_f32(v);
            y[ldy + c] = _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1));
            y[2 * ldy + c] = _mm_cvtss_f32(_mm_shuffle_ps(v, v, 2));
            y[3 * ldy + c] = _mm_cvtss_f32(_mm_shuffle_ps(v, v, 3));
        }
    } else {
        for (int r = 0; r < R; ++r) {
            int c = 0;
            for (; c + 4 <= C; c += 4)
                _mm_storeu_ps(y + r * ldy + c,
                              reduce4(acc[r][c], acc[r][c + 1], acc[r][c + 2], acc[r][c + 3]));
            for (; c < C; ++c) y[r * ldy + c] = reduce1(acc[r][c]);
        }
    }
}

/* AVX2 weight rows per kernel: 3 for R = 1..4 rows of x (3 to 12 accumulation chains; R * 3
 * accumulators plus the operands fit in 16 ymm registers). Few weight rows at once stream best
 * from DRAM, and small n is memory-bound. */
static int avx2_cols(int r) {
    (void)r;
    return 3;
}

#define AVX2_CASE(R_, C_)                                                                     \
    case (R_) * 16 + (C_):                                                                    \
        avx2_block(R_, C_, x, ldx, w, ldw, y, ldy, k, pf, pf_lines);                          \
        break;

static void avx2_kernel(int r, int c, const float *x, size_t ldx, const float *w, size_t ldw,
                        float *y, size_t ldy, int k, const char *pf, int pf_lines) {
    switch (r * 16 + c) {
        AVX2_CASE(1, 1) AVX2_CASE(1, 2) AVX2_CASE(1, 3)
        AVX2_CASE(2, 1) AVX2_CASE(2, 2) AVX2_CASE(2, 3)
        AVX2_CASE(3, 1) AVX2_CASE(3, 2) AVX2_CASE(3, 3)
        AVX2_CASE(4, 1) AVX2_CASE(4, 2) AVX2_CASE(4, 3)
        default: break;
    }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

INLINE __m512 bcast256(const float *p) { /* [p[0..7] | p[0..7]] */
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}

INLINE __m256 hi256(__m512 v) {
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

/*
 * AVX-512: P pairs of x rows (packed: [x[2p] block | x[2p+1] block] per 8-wide k block) against
 * C rows of w (each block broadcast to both halves). Lane j of the low (high) half follows
 * exactly the AVX2 accumulation of element (2p, o) ((2p+1, o)). `rows`: valid rows (2P or 2P-1).
 */
INLINE void avx512_block(const int P, const int C, const float *restrict xp, size_t ldxp,
                         const float *restrict w, size_t ldw, float *restrict y, size_t ldy,
                         int k, int rows, const char *pf, int pf_lines) {
    const int nblk = k / 8, rem = k % 8;
    __m512 acc[MAX_P][MAX_C2];
    for (int p = 0; p < P; ++p)
        for (int c = 0; c < C; ++c) acc[p][c] = _mm512_setzero_ps();

    int pf_acc = 0;
    for (int b = 0; b < nblk; ++b) {
        const size_t off = (size_t)b * 8;
        PREFETCH_STEP();
        if (P <= C) {
            __m512 xv[MAX_P];
            for (int p = 0; p < P; ++p) xv[p] = _mm512_loadu_ps(xp + p * ldxp + 2 * off);
            for (int c = 0; c < C; ++c) {
                const __m512 wv = bcast256(w + c * ldw + off);
                for (int p = 0; p < P; ++p) acc[p][c] = _mm512_fmadd_ps(xv[p], wv, acc[p][c]);
            }
        } else {
            __m512 wv[MAX_C2];
            for (int c = 0; c < C; ++c) wv[c] = bcast256(w + c * ldw + off);
            for (int p = 0; p < P; ++p) {
                const __m512 xv = _mm512_loadu_ps(xp + p * ldxp + 2 * off);
                for (int c = 0; c < C; ++c) acc[p][c] = _mm512_fmadd_ps(xv, wv[c], acc[p][c]);
            }
        }
    }
    if (rem) { /* packed x is zero beyond k already; mask the weights */
        const size_t off = (size_t)nblk * 8;
        const __m256i mask = _mm256_loadu_si256((const __m256i *)(mask_src + 8 - rem));
        for (int c = 0; c < C; ++c) {
            const __m256 t = _mm256_maskload_ps(w + c * ldw + off, mask);
            const __m512 wv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(t)));
            for (int p = 0; p < P; ++p)
                acc[p][c] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + p * ldxp + 2 * off), wv,
                                            acc[p][c]);
        }
    }

    /* Reduce four (row, column) elements at a time: rows 2p .. 2p+3 of one weight row. */
    for (int c = 0; c < C; ++c) {
        for (int p = 0; p < P; p += 2) {
            const int q = p + 1 < P ? p + 1 : p; /* a lone last pair is reduced twice */
            const __m128 v =
                reduce4(_mm512_castps512_ps256(acc[p][c]), hi256(acc[p][c]),
                        _mm512_castps512_ps256(acc[q][c]), hi256(acc[q][c]));
            float *yc = y + (size_t)(2 * p) * ldy + c;
            const int held = q > p ? 4 : 2, left = rows - 2 * p;
            const int nr = left < held ? left : held; /* rows of these 4 that exist */
            yc[0] = _mm_cvtss_f32(v);
            if (nr > 1) yc[ldy] = _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1));
            if (nr > 2) yc[2 * ldy] = _mm_cvtss_f32(_mm_shuffle_ps(v, v, 2));
            if (nr > 3) yc[3 * ldy] = _mm_cvtss_f32(_mm_shuffle_ps(v, v, 3));
        }
    }
}

/* AVX-512 weight rows per kernel for P row pairs: P * C <= 24 accumulators plus the operands fit
 * in 32 zmm registers; 4 pairs x 6 is the fastest compute shape, 3 weight rows at a time stream
 * best from DRAM. */
static int avx512_cols(int p) { return p == 4 ? 6 : 3; }

#define AVX512_CASE(P_, C_)                                                                   \
    case (P_) * 16 + (C_):                                                                    \
        avx512_block(P_, C_, xp, ldxp, w, ldw, y, ldy, k, rows, pf, pf_lines);                \
        break;

static void avx512_kernel(int p, int c, const float *xp, size_t ldxp, const float *w,
                          size_t ldw, float *y, size_t ldy, int k, int rows, const char *pf,
                          int pf_lines) {
    switch (p * 16 + c) {
        AVX512_CASE(1, 1) AVX512_CASE(1, 2) AVX512_CASE(1, 3)
        AVX512_CASE(2, 1) AVX512_CASE(2, 2) AVX512_CASE(2, 3)
        AVX512_CASE(3, 1) AVX512_CASE(3, 2) AVX512_CASE(3, 3)
        AVX512_CASE(4, 1) AVX512_CASE(4, 2) AVX512_CASE(4, 3)
        AVX512_CASE(4, 4) AVX512_CASE(4, 5) AVX512_CASE(4, 6)
        AVX512_CASE(5, 1) AVX512_CASE(5, 2) AVX512_CASE(5, 3)
        AVX512_CASE(6, 1) AVX512_CASE(6, 2) AVX512_CASE(6, 3)
        AVX512_CASE(7, 1) AVX512_CASE(7, 2) AVX512_CASE(7, 3)
        AVX512_CASE(8, 1) AVX512_CASE(8, 2) AVX512_CASE(8, 3)
        default: break;
    }
}

#pragma GCC pop_options

/* Split `units` (rows of x, or row pairs) into nb blocks of near-equal size: block sizes only
 * change speed, never results. Returns nb. */
static int split_blocks(int units, int nb, int *starts, int *sizes) {
    const int base = units / nb, extra = units % nb;
    int s = 0;
    for (int b = 0; b < nb; ++b) {
        starts[b] = s;
        sizes[b] = base + (b < extra);
        s += sizes[b];
    }
    return nb;
}

/* Weight rows [o_begin, o_end) against all n rows of x. */
static void run_range(const skinny_job_t *j, int o_begin, int o_end) {
    const size_t ldw = (size_t)j->k, ldy = (size_t)j->m;
    const int wide = j->isa == SKINNY_ISA_AVX512; /* row pairs */
    int starts[ROW_GROUP], sizes[ROW_GROUP];
    for (int g0 = 0; g0 < j->n; g0 += ROW_GROUP) { /* large n only: x in groups of rows */
        const int gn = j->n - g0 < ROW_GROUP ? j->n - g0 : ROW_GROUP;
        /* AVX2: blocks of <= 4 rows. AVX-512: blocks of 4 pairs (the fastest kernel) when the
         * pairs divide so, else the fewest blocks of <= 8 pairs (more chains per kernel). */
        const int pairs = (gn + 1) / 2;
        const int nb = !wide ? (gn + MAX_R - 1) / MAX_R
                             : pairs % 4 == 0 ? pairs / 4 : (pairs + MAX_P - 1) / MAX_P;
        split_blocks(wide ? pairs : gn, nb, starts, sizes);
        int ncalls = 0; /* kernel calls per full tile, to spread the prefetches over */
        for (int b = 0; b < nb; ++b) {
            const int cm = wide ? avx512_cols(sizes[b]) : avx2_cols(sizes[b]);
            ncalls += (TILE_M + cm - 1) / cm;
        }
        for (int o = o_begin; o < o_end; o += TILE_M) {
            const int ct = o_end - o < TILE_M ? o_end - o : TILE_M;
            const float *wt = j->w + (size_t)o * ldw;
            /* Prefetch the tile PF_DIST ahead (contiguous rows) over this tile's kernel calls. */
            const int pf_row = o + PF_DIST * TILE_M;
            const int pf_rows =
                pf_row >= o_end ? 0 : (o_end - pf_row < TILE_M ? o_end - pf_row : TILE_M);
            const long long lines = ((long long)pf_rows * j->k * 4 + 63) / 64;
            const char *pf = (const char *)(j->w + (size_t)pf_row * ldw);
            int call = 0;
            for (int b = 0; b < nb; ++b) {
                const int cm = wide ? avx512_cols(sizes[b]) : avx2_cols(sizes[b]);
                for (int c0 = 0; c0 < ct; c0 += cm, ++call) {
                    const int cc = ct - c0 < cm ? ct - c0 : cm;
                    const long long l0 = lines * call / ncalls, l1 = lines * (call + 1) / ncalls;
                    const int pf_lines = call < ncalls && j->k >= 8 ? (int)(l1 - l0) : 0;
                    const char *pfc = pf + l0 * 64;
                    if (wide) {
                        const int r0 = g0 + 2 * starts[b];
                        const int rows = j->n - r0 < 2 * sizes[b] ? j->n - r0 : 2 * sizes[b];
                        avx512_kernel(sizes[b], cc, j->xp + (size_t)(r0 / 2) * j->ldxp, j->ldxp,
                                  wt + (size_t)c0 * ldw, ldw, j->y + (size_t)r0 * ldy + o + c0,
                                  ldy, j->k, rows, pfc, pf_lines);
                    } else {
                        const int r0 = g0 + starts[b];
                        avx2_kernel(sizes[b], cc, j->x + (size_t)r0 * j->ldx, j->ldx,
                                  wt + (size_t)c0 * ldw, ldw, j->y + (size_t)r0 * ldy + o + c0,
                                  ldy, j->k, pfc, pf_lines);
                    }
                }
            }
        }
    }
}

/* Part t of T: a contiguous range of weight tiles. */
static void skinny_part(void *arg, int t, int T) {
    const skinny_job_t *j = arg;
    int tb, te;
    pool_part(j->tiles, t, T, &tb, &te);
    const int ob = tb * TILE_M, oe = te * TILE_M < j->m ? te * TILE_M : j->m;
    if (ob < oe) run_range(j, ob, oe);
}

void skinny_gemm_f32(const float *x, const float *w, float *y, int n, int k, int m, int ldx,
                     int nthreads) {
    if (n <= 0 || m <= 0) return;
    if (k <= 0) {
        memset(y, 0, (size_t)n * (size_t)m * sizeof(float));
        return;
    }
    skinny_job_t j = {x, (size_t)ldx, NULL, 0, w, y, n, k, m, skinny_gemm_get_isa(), 0};
    float *xp = NULL;
    if (j.isa == SKINNY_ISA_AVX512 && n < 3)
        j.isa = SKINNY_ISA_AVX2; /* memory-bound anyway, and no pair to waste */
    if (j.isa == SKINNY_ISA_AVX512) {
        const size_t nbt = ((size_t)k + 7) / 8, pairs = ((size_t)n + 1) / 2;
        j.ldxp = 16 * nbt;
        xp = aligned_alloc(64, pairs * j.ldxp * sizeof(float));
        if (xp == NULL) {
            j.isa = SKINNY_ISA_AVX2;
        } else {
            memset(xp, 0, pairs * j.ldxp * sizeof(float));
            for (size_t i = 0; i < (size_t)n; ++i)
                for (size_t b = 0; b < nbt; ++b) {
                    const size_t len = (b + 1) * 8 <= (size_t)k ? 8 : (size_t)k - b * 8;
                    memcpy(xp + (i / 2) * j.ldxp + b * 16 + (i % 2) * 8,
                           x + i * (size_t)ldx + b * 8, len * sizeof(float));
                }
            j.xp = xp;
        }
    }
    const int tiles = (m + TILE_M - 1) / TILE_M;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > tiles) nt = tiles;
    /* a fork/join costs about as much as streaming MIN_THREAD_WORK weights: small matrices
     * (tiny test models) stay on the calling thread. Results do not depend on nt. */
    const long long per = (long long)m * k / MIN_THREAD_WORK;
    if (nt > per) nt = per < 1 ? 1 : (int)per;
    /* Static split (contiguous tiles per thread: the prefetch stream continues across tiles).
     * Measured better than dynamic chunks, even with another process on a core. */
    j.tiles = tiles;
    pool_run(skinny_part, &j, nt);
    free(xp);
}

#else /* not x86-64 with GCC/Clang: a portable (slow) version, never used by the Python side */

int skinny_gemm_supported(void) { return 0; }
int skinny_gemm_set_isa(int isa) { (void)isa; return 0; }
int skinny_gemm_get_isa(void) { return 0; }

void skinny_gemm_f32(const float *x, const float *w, float *y, int n, int k, int m, int ldx,
                     int nthreads) {
    (void)nthreads;
    for (int i = 0; i < n; ++i)
        for (int o = 0; o < m; ++o) {
            float s = 0.0f;
            for (int q = 0; q < k; ++q) s += x[(size_t)i * ldx + q] * w[(size_t)o * k + q];
            y[(size_t)i * m + o] = s;
        }
}

#endif
