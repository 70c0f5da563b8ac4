/* y = x @ w.T (+ bias) over a weight packed once into column panels: the fp32 GEMM for every batch
 * size, from a decode step of one row to a 2,048-token prefill chunk.
 *
 * Layout: w [N, K] becomes ceil(N / 16) panels of K x 16 floats, k-major (panel p holds output
 * channels 16p..16p+15; the last one is zero-padded). A 6 x 16 register tile multiplies 6 rows of x
 * (each x[r][k] broadcast) with one k-row of the panel (two 8-lane vectors): 12 FMAs per 8 loads,
 * every accumulator a finished output, no horizontal sums.
 *
 * Blocking: threads take contiguous ranges of panels (each streams its own weights once); rows come
 * in blocks of MC so that a block's slice of x stays in L2 while the panels pass over it; k comes in
 * blocks of KC so that the panel's slice stays in L1 while every row tile of the block uses it.
 *
 * Batch invariance: every output is one FMA chain over k in order, started from 0 (a k block
 * resumes from the value the previous block stored), then + bias: the same operations whatever M,
 * the tile an output falls in, or the thread that runs it. A row's result never depends on the rest
 * of the batch, and a kernel plan's replay equals an eager call bit for bit. */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define G_AVX2 1
#endif

#define NR 16  /* output channels per panel */
#define MR 6   /* rows per register tile (8-lane builds) */
#define ZR 8   /* rows per register tile (AVX-512: 8 x 3 panels = 24 of the 32 vector registers) */
#define KC 192 /* k per block: a panel slice of 12 KB (three panels' fit L1; 256 measured 5-10% slower) */
#define MC 144 /* rows per block: 144 x 192 x 4 = 108 KB of x in L2 */
#define GP 6   /* panels per group: the unit a thread takes when the channels fill whole groups */

int64_t f32_gemm_panel_width(void) { return NR; }

/* which tiles this build runs: 16-lane (avx512), 8-lane (avx2) or the scalar chain (generic) */
const char *f32_gemm_isa(void) {
#if defined(G_AVX2) && defined(__AVX512F__)
    return "avx512";
#elif defined(G_AVX2)
    return "avx2";
#else
    return "generic";
#endif
}

/* w [N, K] (row stride ldw) -> packed [ceil(N/16), K, 16] */
void f32_gemm_pack(const float *w, int64_t N, int64_t K, int64_t ldw, float *packed) {
    const int64_t panels = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        float *dst = packed + p * K * NR;
        for (int64_t j = 0; j < NR; j++) {
            const int64_t n = p * NR + j;
            if (n < N)
                for (int64_t k = 0; k < K; k++) dst[k * NR + j] = w[n * ldw + k];
            else
                for (int64_t k = 0; k < K; k++) dst[k * NR + j] = 0.f;
        }
    }
}

#ifdef G_AVX2
/* R rows (1..6, a constant after inlining) x 16 channels over k in [0, kc): acc = first ? 0 : y,
 * then acc += x[r][k] * b[k][:] in k order, stored to y (cols valid channels; bias on the last block) */
static inline __attribute__((always_inline)) void tile(const int R, const float *x, int64_t ldx, const float *b,
                                                       int64_t kc, float *y, int64_t ldy, int cols, int first,
                                                       const float *bias) {
    __m256 c0[MR], c1[MR];
    float tmp[NR];
    for (int r = 0; r < R; r++) {
        if (first) {
            c0[r] = _mm256_setzero_ps();
            c1[r] = _mm256_setzero_ps();
        } else if (cols == NR) {
            c0[r] = _mm256_loadu_ps(y + r * ldy);
            c1[r] = _mm256_loadu_ps(y + r * ldy + 8);
        } else {
            memset(tmp, 0, sizeof tmp);
            memcpy(tmp, y + r * ldy, (size_t)cols * sizeof(float));
            c0[r] = _mm256_loadu_ps(tmp);
            c1[r] = _mm256_loadu_ps(tmp + 8);
        }
    }
    for (int64_t k = 0; k < kc; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + k * NR), b1 = _mm256_loadu_ps(b + k * NR + 8);
        for (int r = 0; r < R; r++) {
            const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
            c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
            c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        if (bias) {
            c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(bias));
            c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(bias + 8));
        }
        if (cols == NR) {
            _mm256_storeu_ps(y + r * ldy, c0[r]);
            _mm256_storeu_ps(y + r * ldy + 8, c1[r]);
        } else {
            _mm256_storeu_ps(tmp, c0[r]);
            _mm256_storeu_ps(tmp + 8, c1[r]);
            memcpy(y + r * ldy, tmp, (size_t)cols * sizeof(float));
        }
    }
}

/* R rows (1..3) over G full panels at once (R x 2G independent FMA chains: a tile of few rows is
 * bound by FMA latency otherwise); per output the same chain over k as tile(). */
static inline __attribute__((always_inline)) void small_tile(const int R, const int G, const float *x, int64_t ldx,
                                                             const float *b, int64_t K, int64_t kc, float *y,
                                                             int64_t ldy, int first, const float *bias) {
    __m256 c[3][12];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 2 * G; j++) c[r][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * ldy + j * 8);
    for (int64_t k = 0; k < kc; k++) {
        __m256 a[3];
        for (int r = 0; r < R; r++) a[r] = _mm256_broadcast_ss(x + r * ldx + k);
        for (int g = 0; g < G; g++) {
            const __m256 b0 = _mm256_loadu_ps(b + g * K * NR + k * NR), b1 = _mm256_loadu_ps(b + g * K * NR + k * NR + 8);
            for (int r = 0; r < R; r++) {
                c[r][2 * g] = _mm256_fmadd_ps(a[r], b0, c[r][2 * g]);
                c[r][2 * g + 1] = _mm256_fmadd_ps(a[r], b1, c[r][2 * g + 1]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 2 * G; j++) {
            __m256 v = c[r][j];
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j * 8));
            _mm256_storeu_ps(y + r * ldy + j * 8, v);
        }
}

#ifdef __AVX512F__
/* AVX-512: a panel's k-row is one 16-lane vector. R rows (1..8) over P full panels at once (R x P
 * accumulators, <= 24), each lane the same FMA chain over k as tile()'s, so the bits are the same
 * as the 8-lane path's and the portable one's. */
static inline __attribute__((always_inline)) void ztile(const int R, const int P, const float *x, int64_t ldx,
                                                        const float *b, int64_t K, int64_t kc, float *y,
                                                        int64_t ldy, int first, const float *bias) {
    __m512 c[ZR][6]; /* R * P <= 24 live */
    for (int r = 0; r < R; r++)
        for (int j = 0; j < P; j++) c[r][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + r * ldy + j * NR);
    for (int64_t k = 0; k < kc; k++) {
        __m512 bv[6];
        for (int j = 0; j < P; j++) bv[j] = _mm512_loadu_ps(b + j * K * NR + k * NR);
        for (int r = 0; r < R; r++) {
            const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
            for (int j = 0; j < P; j++) c[r][j] = _mm512_fmadd_ps(a, bv[j], c[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < P; j++) {
            __m512 v = c[r][j];
            if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j * NR));
            _mm512_storeu_ps(y + r * ldy + j * NR, v);
        }
}

/* All rows of one block over a group of GP full panels: 8-row tiles over three panels (24 chains of
 * 16 lanes: 1.05-1.08x the 6-row tiles at 16-512 rows; 6 x 2 measured 8% slower than 6 x 3), three
 * panels at a time across all the row tiles (1.08-1.16x at 16-512 rows over row tiles outermost),
 * and the 1..7 rows left as a 6-row tile and tiles over more panels at once. */
static void group_rows(const float *x, int64_t ldx, int64_t rows, const float *b, int64_t K, int64_t kc, float *y,
                       int64_t ldy, int first, const float *bias) {
#define PB(g) (b + (g) * K * NR)
#define BB(g) (bias ? bias + (g) * NR : NULL)
#define ZT(R, P, g) ztile(R, P, xm, ldx, PB(g), K, kc, ym + (g) * NR, ldy, first, BB(g))
    const int64_t full = rows / ZR * ZR;
    for (int g = 0; g < GP; g += 3) /* three panels' k block (36 KB) stays in L1 for every row tile */
        for (int64_t m = 0; m < full; m += ZR) {
            const float *xm = x + m * ldx;
            float *ym = y + m * ldy;
            ZT(ZR, 3, g);
        }
    int64_t m = full;
    if (rows - m >= 6) {
        const float *xm = x + m * ldx;
        float *ym = y + m * ldy;
        for (int g = 0; g < GP; g += 3) ZT(6, 3, g);
        m += 6;
    }
    const float *xm = x + m * ldx;
    float *ym = y + m * ldy;
    switch (rows - m) {
    case 1: ZT(1, 6, 0); break;
    case 2: ZT(2, 6, 0); break;
    case 3: ZT(3, 6, 0); break;
    case 4: for (int g = 0; g < GP; g += 3) ZT(4, 3, g); break;
    case 5: for (int g = 0; g < GP; g += 3) ZT(5, 3, g); break;
    default: break;
    }
#undef ZT
#undef PB
#undef BB
}
#else
/* All rows of one block over a group of GP full panels: 6-row tiles panel by panel, and the 1..5
 * rows left as small tiles over several panels, so every tile keeps 12 accumulators busy. */
static void group_rows(const float *x, int64_t ldx, int64_t rows, const float *b, int64_t K, int64_t kc, float *y,
                       int64_t ldy, int first, const float *bias) {
#define PB(g) (b + (g) * K * NR)
#define BB(g) (bias ? bias + (g) * NR : NULL)
    int64_t m = 0;
    for (; m + MR <= rows; m += MR)
        for (int g = 0; g < GP; g++) tile(MR, x + m * ldx, ldx, PB(g), kc, y + m * ldy + g * NR, ldy, NR, first, BB(g));
    const float *xm = x + m * ldx;
    float *ym = y + m * ldy;
    switch (rows - m) {
    case 1: small_tile(1, 6, xm, ldx, PB(0), K, kc, ym, ldy, first, BB(0)); break;
    case 2:
        for (int g = 0; g < GP; g += 3) small_tile(2, 3, xm, ldx, PB(g), K, kc, ym + g * NR, ldy, first, BB(g));
        break;
    case 3:
        for (int g = 0; g < GP; g += 2) small_tile(3, 2, xm, ldx, PB(g), K, kc, ym + g * NR, ldy, first, BB(g));
        break;
    case 4:
        for (int g = 0; g < GP; g += 3) {
            small_tile(2, 3, xm, ldx, PB(g), K, kc, ym + g * NR, ldy, first, BB(g));
            small_tile(2, 3, xm + 2 * ldx, ldx, PB(g), K, kc, ym + 2 * ldy + g * NR, ldy, first, BB(g));
        }
        break;
    case 5:
        for (int g = 0; g < GP; g += 2) small_tile(3, 2, xm, ldx, PB(g), K, kc, ym + g * NR, ldy, first, BB(g));
        for (int g = 0; g < GP; g += 3)
            small_tile(2, 3, xm + 3 * ldx, ldx, PB(g), K, kc, ym + 3 * ldy + g * NR, ldy, first, BB(g));
        break;
    default: break;
    }
#undef PB
#undef BB
}
#endif
#define HAVE_GROUPS 1
#else
static inline void tile(const int R, const float *x, int64_t ldx, const float *b, int64_t kc, float *y, int64_t ldy,
                        int cols, int first, const float *bias) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < cols; j++) {
            float s = first ? 0.f : y[r * ldy + j];
            for (int64_t k = 0; k < kc; k++) s = __builtin_fmaf(x[r * ldx + k], b[k * NR + j], s);
            y[r * ldy + j] = bias ? s + bias[j] : s;
        }
}
#endif

static void row_tiles(const float *x, int64_t ldx, int64_t rows, const float *b, int64_t kc, float *y, int64_t ldy,
                      int cols, int first, const float *bias) {
    int64_t m = 0;
    for (; m + MR <= rows; m += MR) tile(MR, x + m * ldx, ldx, b, kc, y + m * ldy, ldy, cols, first, bias);
    switch (rows - m) { /* constant R per case: the row loops unroll */
    case 1: tile(1, x + m * ldx, ldx, b, kc, y + m * ldy, ldy, cols, first, bias); break;
    case 2: tile(2, x + m * ldx, ldx, b, kc, y + m * ldy, ldy, cols, first, bias); break;
    case 3: tile(3, x + m * ldx, ldx, b, kc, y + m * ldy, ldy, cols, first, bias); break;
    case 4: tile(4, x + m * ldx, ldx, b, kc, y + m * ldy, ldy, cols, first, bias); break;
    case 5: tile(5, x + m * ldx, ldx, b, kc, y + m * ldy, ldy, cols, first, bias); break;
    default: break;
    }
}

/* x [M, K] (row stride ldx), packed from f32_gemm_pack (N channels), y [M, N] (row stride ldy) */
void f32_gemm_packed(const float *x, int64_t M, int64_t K, int64_t ldx, const float *packed, int64_t N,
                     const float *bias, float *y, int64_t ldy) {
    const int64_t panels = (N + NR - 1) / NR;
#ifdef HAVE_GROUPS
    const int64_t groups = N % NR ? 0 : panels / GP; /* whole groups of full panels */
#else
    const int64_t groups = 0;
#endif
    const int64_t units = groups + (panels - groups * GP); /* a group, or one leftover panel */
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t rows = M - m0 < MC ? M - m0 : MC;
#pragma omp parallel for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            const int64_t p = u < groups ? u * GP : groups * GP + (u - groups);
            const int cols = (int)(N - p * NR < NR ? N - p * NR : NR);
            const float *bp = packed + p * K * NR;
            float bpad[NR] = {0}; /* a partial panel's bias, zero-padded: the tile reads 16 */
            const float *bz = bias ? bias + p * NR : NULL;
            if (bias && cols < NR) {
                memcpy(bpad, bz, (size_t)cols * sizeof(float));
                bz = bpad;
            }
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t kc = K - k0 < KC ? K - k0 : KC;
                const float *bb = k0 + kc == K ? bz : NULL;
                const float *xk = x + m0 * ldx + k0;
                float *yp = y + m0 * ldy + p * NR;
#ifdef HAVE_GROUPS
                if (u < groups) {
                    group_rows(xk, ldx, rows, bp + k0 * NR, K, kc, yp, ldy, k0 == 0, bb);
                    continue;
                }
#endif
                row_tiles(xk, ldx, rows, bp + k0 * NR, kc, yp, ldy, cols, k0 == 0, bb);
            }
        }
    }
}

/* plan twin (arguments as one int64 array), as in fp32_cpu.c */
#define P(i, T) ((T)(intptr_t)a[i])
void f32_gemm_packed_a(const int64_t *a) {
    f32_gemm_packed(P(0, const float *), a[1], a[2], a[3], P(4, const float *), a[5], P(6, const float *),
                    P(7, float *), a[8]);
}

/* ---- LoRA: out[m] += (x[m] @ A[s].T) @ B[s].T for every row m on slot s = row_slot[m] >= 0 -------
 * A[s] [R, K] and B[s] [N, R] packed like weights (a_packed + s * a_stride, b_packed + s * b_stride).
 * Each slot's rows are gathered, shrunk and expanded by the packed GEMM (every adapter's matrices
 * read once per call however many rows use it), then added back; a row's delta depends on that
 * row alone. scratch: M * (K + R + N) floats. */
void f32_lora_add(const float *x, int64_t M, int64_t K, int64_t ldx, const int32_t *row_slot, int64_t S,
                  const float *a_packed, int64_t R, const float *b_packed, int64_t N, float *scratch, float *out,
                  int64_t ldo) {
    const int64_t a_stride = (R + NR - 1) / NR * K * NR, b_stride = (N + NR - 1) / NR * R * NR;
    float *xs = scratch, *ts = xs + M * K, *ds = ts + M * R;
    for (int64_t s = 0; s < S; s++) {
        int64_t n = 0;
        for (int64_t m = 0; m < M; m++)
            if (row_slot[m] == s) n++;
        if (n == 0) continue;
        int64_t i = 0;
        for (int64_t m = 0; m < M; m++) /* gather, in row order */
            if (row_slot[m] == s) memcpy(xs + (i++) * K, x + m * ldx, (size_t)K * sizeof(float));
        f32_gemm_packed(xs, n, K, K, a_packed + s * a_stride, R, NULL, ts, R);
        f32_gemm_packed(ts, n, R, R, b_packed + s * b_stride, N, NULL, ds, N);
        i = 0;
        for (int64_t m = 0; m < M; m++) {
            if (row_slot[m] != s) continue;
            float *o = out + m * ldo;
            const float *d = ds + (i++) * N;
            for (int64_t j = 0; j < N; j++) o[j] += d[j];
        }
    }
}

void f32_lora_add_a(const int64_t *a) {
    f32_lora_add(P(0, const float *), a[1], a[2], a[3], P(4, const int32_t *), a[5], P(6, const float *), a[7],
                 P(8, const float *), a[9], P(10, float *), P(11, float *), a[12]);
}

/* The fp32 FMA peak of this build's vectors: every thread runs `iters` rounds of 12 independent
 * FMA chains (enough to cover the FMA latency on two pipes) on registers only, no memory. Returns
 * the FLOPs done, and a checksum in *sink so the loop is not optimized away. The ceiling no GEMM,
 * and no whole workload, can pass (engine/bench/ceilings.py). */
int64_t f32_fma_peak(int64_t iters, float *sink) {
    int64_t flops = 0;
#pragma omp parallel reduction(+ : flops)
    {
#if defined(G_AVX2) && defined(__AVX512F__)
        typedef __m512 V;
#define VSET(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VLANES 16
#elif defined(G_AVX2)
        typedef __m256 V;
#define VSET(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VLANES 8
#else
        typedef float V;
#define VSET(x) (x)
#define VFMA(a, b, c) __builtin_fmaf(a, b, c)
#define VLANES 1
#endif
        V c[12];
        const V a = VSET(0.999999f), b = VSET(1e-7f);
        for (int i = 0; i < 12; i++) c[i] = VSET((float)i);
        for (int64_t it = 0; it < iters; it++)
            for (int i = 0; i < 12; i++) c[i] = VFMA(c[i], a, b);
        float out[VLANES];
        V s = c[0];
        for (int i = 1; i < 12; i++) s = VFMA(s, a, c[i]);
        memcpy(out, &s, sizeof out);
#pragma omp critical
        *sink += out[0];
        flops += iters * 12 * 2 * VLANES;
#undef VSET
#undef VFMA
#undef VLANES
    }
    return flops;
}
