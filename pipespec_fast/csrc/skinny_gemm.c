/*
 * Skinny fp32 GEMM for CPU decoding: y[n, m] = x[n, k] @ w[m, k]^T, built for 1 <= n <= 16
 * (any n >= 1 is computed correctly; large n is just not what it is tuned for).
 *
 * Memory: the weight w is streamed from DRAM once per call. Output rows are taken in tiles of
 * TILE_M weight rows; each tile is used against every row of x (x is small and stays in L1/L2)
 * before the next tile is touched, and the next tile is prefetched while the current one is
 * read the first time.
 *
 * Batch invariance: every output element y[i, o] is computed by exactly the same sequence of
 * floating-point operations, whatever n, i, the tile shapes, the thread count or the split:
 *
 *   acc = 0 (8 lanes)
 *   for each block b of 8 consecutive k (b = 0, 1, ...):  acc = fma(x[i, 8b:8b+8], w[o, 8b:8b+8], acc)
 *   if k % 8: one more fma with both operands zero-filled beyond k (masked loads)
 *   s[j]  = acc[j] + acc[j + 4]            (j = 0..3)
 *   y     = (s[0] + s[2]) + (s[1] + s[3])
 *
 * Independent accumulation chains (to hide FMA latency) come from computing several (i, o)
 * pairs at once, never from splitting one element's sum, so the order above depends on k only.
 * The 4-at-a-time horizontal reduction below performs, lane for lane, the same additions as the
 * 1-at-a-time one (IEEE addition is commutative, so operand order inside a pair is free).
 * Compiled without -ffast-math and with -ffp-contract=off, so the compiler cannot reassociate.
 *
 * Called through ctypes on raw pointers (no Python C-API); the caller checks
 * skinny_gemm_supported() (avx2 + fma at run time) before calling skinny_gemm_f32.
 */

#include <stddef.h>
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define SKINNY_ABI_VERSION 1

int skinny_gemm_abi_version(void) { return SKINNY_ABI_VERSION; }

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

/* Plain x86-64 code (no AVX): safe to call on any x86-64 CPU. */
int skinny_gemm_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#define TILE_M 24 /* weight rows per tile: a multiple of every C below (8, 6, 4, 3) */
#define MAX_R 4
#define MAX_C 8

#define INLINE static inline __attribute__((always_inline))

/* The canonical reduction of one 8-lane accumulator. */
INLINE float reduce1(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                 /* s0+s2, s1+s3 */
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, _MM_SHUFFLE(1, 1, 1, 1))); /* (s0+s2)+(s1+s3) */
    return _mm_cvtss_f32(t);
}

/* reduce1 of four accumulators at once, returned as [a, b, c, d]; bit-identical to reduce1. */
INLINE __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 sab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                               _mm256_permute2f128_ps(a, b, 0x31)); /* [sa0..3 | sb0..3] */
    __m256 scd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20),
                               _mm256_permute2f128_ps(c, d, 0x31)); /* [sc0..3 | sd0..3] */
    __m256 u = _mm256_shuffle_ps(sab, scd, _MM_SHUFFLE(1, 0, 1, 0)); /* [sa0 sa1 sc0 sc1 | b, d] */
    __m256 w = _mm256_shuffle_ps(sab, scd, _MM_SHUFFLE(3, 2, 3, 2)); /* [sa2 sa3 sc2 sc3 | b, d] */
    __m256 p = _mm256_add_ps(u, w);      /* [sa0+sa2, sa1+sa3, sc0+sc2, sc1+sc3 | b, d] */
    __m256 q = _mm256_hadd_ps(p, p);     /* [A, C, A, C | B, D, B, D] */
    return _mm_unpacklo_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)); /* A B C D */
}

/*
 * R rows of x against C rows of w, all k. R and C are compile-time constants at every call
 * site (the switch in run_tile), so the loops unroll and acc lives in registers.
 * pf: when not NULL, the same C rows one tile further on (prefetched into L2 as we go).
 */
INLINE void kernel(const int R, const int C, const float *restrict x, size_t ldx,
                   const float *restrict w, size_t ldw, float *restrict y, size_t ldy,
                   int nblk, int rem, __m256i tailmask, const float *pf) {
    __m256 acc[MAX_R][MAX_C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();

    for (int b = 0; b < nblk; ++b) {
        const size_t off = (size_t)b * 8;
        if (pf && !(b & 1))
            for (int c = 0; c < C; ++c) _mm_prefetch((const char *)(pf + c * ldw + off), _MM_HINT_T1);
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
        __m256 wv[MAX_C];
        for (int c = 0; c < C; ++c) wv[c] = _mm256_maskload_ps(w + c * ldw + off, tailmask);
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_maskload_ps(x + r * ldx + off, tailmask);
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

/* Weight columns per register tile for R rows of x: R * C accumulators (>= 8 chains to cover
 * FMA latency at 2 FMAs per cycle), plus the operand registers, fit in 16 ymm registers. */
static int cols_for_rows(int r) { return r == 1 ? 8 : r == 2 ? 6 : r == 3 ? 4 : 3; }

#define CASE(R_, C_)                                                                     \
    case (R_) * 16 + (C_):                                                               \
        kernel(R_, C_, xr, ldx, wc, ldw, yc, ldy, nblk, rem, tailmask, pfc);             \
        break;

/* One kernel call of shape (r, c), 1 <= r <= 4, 1 <= c <= cols_for_rows(r). */
static void run_kernel(int r, int c, const float *xr, size_t ldx, const float *wc, size_t ldw,
                       float *yc, size_t ldy, int nblk, int rem, __m256i tailmask,
                       const float *pfc) {
    switch (r * 16 + c) {
        CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(1, 5) CASE(1, 6) CASE(1, 7) CASE(1, 8)
        CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4) CASE(2, 5) CASE(2, 6)
        CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4)
        CASE(4, 1) CASE(4, 2) CASE(4, 3)
        default: break;
    }
}

/* Split n rows of x into ceil(n / 4) blocks of near-equal size (4, 3 or 2 rows, or 1 if n = 1):
 * block sizes only change speed, never results. */
static void row_blocks(int n, int nb_out[1], int *starts, int *sizes) {
    const int nb = (n + MAX_R - 1) / MAX_R, base = n / nb, extra = n % nb;
    int s = 0;
    for (int b = 0; b < nb; ++b) {
        starts[b] = s;
        sizes[b] = base + (b < extra);
        s += sizes[b];
    }
    nb_out[0] = nb;
}

/* Weight rows [o_begin, o_end) against all n rows of x. */
static void run_range(const float *x, const float *w, float *y, int n, int k, int m, int ldx,
                      int o_begin, int o_end) {
    const size_t ldxs = (size_t)ldx, ldw = (size_t)k, ldy = (size_t)m;
    const int nblk = k / 8, rem = k % 8;
    int32_t maskv[8];
    for (int j = 0; j < 8; ++j) maskv[j] = j < rem ? -1 : 0;
    const __m256i tailmask = _mm256_loadu_si256((const __m256i *)maskv);

    int nb;
    int starts_buf[64], sizes_buf[64];
    /* Large n: process x in groups of 256 rows (each group reads this range of w again). */
    for (int g0 = 0; g0 < n; g0 += 256) {
        const int gn = n - g0 < 256 ? n - g0 : 256;
        row_blocks(gn, &nb, starts_buf, sizes_buf);
        for (int o = o_begin; o < o_end; o += TILE_M) {
            const int ct = o_end - o < TILE_M ? o_end - o : TILE_M;
            const float *wt = w + (size_t)o * ldw;
            /* Prefetch the next tile (contiguous rows) while this one is first read. */
            const int next = o + TILE_M < o_end ? (o_end - o - TILE_M < TILE_M ? o_end - o - TILE_M : TILE_M) : 0;
            for (int b = 0; b < nb; ++b) {
                const int r0 = g0 + starts_buf[b], rb = sizes_buf[b];
                const int cmax = cols_for_rows(rb);
                for (int c0 = 0; c0 < ct; c0 += cmax) {
                    const int cc = ct - c0 < cmax ? ct - c0 : cmax;
                    const float *pfc = NULL;
                    if (b == 0 && c0 < next) pfc = wt + (size_t)(TILE_M + c0) * ldw;
                    /* (a prefetch of rows beyond `next` is harmless but wasteful; clip it) */
                    if (pfc && c0 + cc > next) pfc = NULL;
                    run_kernel(rb, cc, x + (size_t)r0 * ldxs, ldxs, wt + (size_t)c0 * ldw, ldw,
                               y + (size_t)r0 * ldy + o + c0, ldy, nblk, rem, tailmask, pfc);
                }
            }
        }
    }
}

void skinny_gemm_f32(const float *x, const float *w, float *y, int n, int k, int m, int ldx,
                     int nthreads) {
    if (n <= 0 || m <= 0) return;
    if (k <= 0) {
        for (size_t i = 0; i < (size_t)n * (size_t)m; ++i) y[i] = 0.0f;
        return;
    }
    const int tiles = (m + TILE_M - 1) / TILE_M;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > tiles) nt = tiles;
    if (nt == 1) {
        run_range(x, w, y, n, k, m, ldx, 0, m);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int tb = (int)((long long)tiles * t / T), te = (int)((long long)tiles * (t + 1) / T);
        const int ob = tb * TILE_M, oe = te * TILE_M < m ? te * TILE_M : m;
        if (ob < oe) run_range(x, w, y, n, k, m, ldx, ob, oe);
    }
#else
    run_range(x, w, y, n, k, m, ldx, 0, m);
#endif
}

#pragma GCC pop_options

#else /* not x86-64 with GCC/Clang: a portable (slow) version, never used by the Python side */

int skinny_gemm_supported(void) { return 0; }

void skinny_gemm_f32(const float *x, const float *w, float *y, int n, int k, int m, int ldx,
                     int nthreads) {
    (void)nthreads;
    for (int i = 0; i < n; ++i)
        for (int o = 0; o < m; ++o) {
            float s = 0.0f;
            for (int j = 0; j < k; ++j) s += x[(size_t)i * ldx + j] * w[(size_t)o * k + j];
            y[(size_t)i * m + o] = s;
        }
}

#endif
