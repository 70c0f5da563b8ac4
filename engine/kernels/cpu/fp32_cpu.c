/* fp32 CPU kernels for the small-batch (decode) hot path: one call where torch needs several
 * dispatches, and matmuls that stream the weights at the machine's read bandwidth.
 *
 * Built at first use by engine/kernels/cpu/build.py with `-O3 -march=native -ffp-contract=off
 * -fopenmp` and called through ctypes (engine/kernels/cpu/ops.py). Threads come from the libgomp
 * pool torch has loaded already.
 *
 * Every output element is computed by the same sequence of operations whatever the batch size, the
 * tile it falls in or the thread that runs it, so a row's result never depends on the rest of the
 * batch (f32_linear: 8 lane-wise FMA chains over k in order, a fixed horizontal sum, then the scalar
 * tail; attention: keys visited in order in chunks of one fixed size).
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define F32_AVX2 1
#define F32_ISA "avx2"
#else
#define F32_ISA "generic"
#endif

const char *f32_isa(void) { return F32_ISA; }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- vector helpers: hsum8, exp8, exp1 (fp32_simd.h) ---------------------------------------- */
#include "fp32_simd.h"

/* ---- y = x @ w.T (+ bias) ------------------------------------------------------------------------
 * x [M, K] (row stride ldx), w [N, K] row-major (row stride ldw), y [M, N] (row stride ldy).
 * Threads split the output channels into contiguous ranges, so each streams its own rows of w once;
 * a tile of NB weight rows stays in L1 while every row tile of x passes over it. */
#define NB 6 /* weight rows per tile */
#define RB 2 /* batch rows per tile (2 x 6 measured best of 4x3, 3x3, 3x4, 2x5, 3x5, 2x6, 2x7, 2x8) */
#define NB1 8 /* weight rows per tile at M = 1 */

static inline float dot_tail(const float *a, const float *b, int64_t k0, int64_t K, float s) {
    for (int64_t k = k0; k < K; k++) s += a[k] * b[k];
    return s;
}

#ifdef F32_AVX2
static inline __attribute__((always_inline)) void linear_tile(const float *x, int64_t ldx, int R, const float *w,
                                                               int64_t ldw, int C, int64_t K, float *y, int64_t ldy,
                                                               const float *bias) {
    __m256 acc[RB][NB];
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < NB; j++) acc[r][j] = _mm256_setzero_ps();
    const int64_t K8 = K & ~(int64_t)7;
    const float *wr[NB]; /* rows past the end repeat row 0; their sums are dropped */
    for (int j = 0; j < NB; j++) wr[j] = w + (j < C ? j : 0) * ldw;
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = _mm256_loadu_ps(wr[j] + k);
        for (int r = 0; r < RB; r++) {
            if (r >= R) break;
            const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
            for (int j = 0; j < NB; j++) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) {
            float s = dot_tail(x + r * ldx, w + j * ldw, K8, K, hsum8(acc[r][j]));
            y[r * ldy + j] = bias ? s + bias[j] : s;
        }
}

static inline __attribute__((always_inline)) void linear_row(const float *x, const float *w, int64_t ldw, int C,
                                                              int64_t K, float *y, const float *bias) {
    __m256 acc[NB1];
    for (int j = 0; j < NB1; j++) acc[j] = _mm256_setzero_ps();
    const int64_t K8 = K & ~(int64_t)7;
    const float *wr[NB1];
    for (int j = 0; j < NB1; j++) wr[j] = w + (j < C ? j : 0) * ldw;
    for (int64_t k = 0; k < K8; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        for (int j = 0; j < NB1; j++) acc[j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wr[j] + k), acc[j]);
    }
    for (int j = 0; j < C; j++) {
        float s = dot_tail(x, w + j * ldw, K8, K, hsum8(acc[j]));
        y[j] = bias ? s + bias[j] : s;
    }
}
#else
static void linear_tile(const float *x, int64_t ldx, int R, const float *w, int64_t ldw, int C, int64_t K, float *y,
                        int64_t ldy, const float *bias) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) {
            float lane[8] = {0};
            const int64_t K8 = K & ~(int64_t)7;
            for (int64_t k = 0; k < K8; k += 8)
                for (int l = 0; l < 8; l++) lane[l] += x[r * ldx + k + l] * w[j * ldw + k + l];
            float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
            s = dot_tail(x + r * ldx, w + j * ldw, K8, K, s);
            y[r * ldy + j] = bias ? s + bias[j] : s;
        }
}
static void linear_row(const float *x, const float *w, int64_t ldw, int C, int64_t K, float *y, const float *bias) {
    linear_tile(x, 0, 1, w, ldw, C, K, y, 0, bias);
}
#endif

void f32_linear(const float *x, int64_t M, int64_t K, int64_t ldx, const float *w, int64_t N, int64_t ldw,
                const float *bias, float *y, int64_t ldy) {
    if (M == 1) {
        const int64_t tiles = (N + NB1 - 1) / NB1;
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * NB1;
            linear_row(x, w + n0 * ldw, ldw, (int)min64(NB1, N - n0), K, y + n0, bias ? bias + n0 : NULL);
        }
        return;
    }
    const int64_t tiles = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * NB;
        const int C = (int)min64(NB, N - n0);
        const float *wt = w + n0 * ldw, *bt = bias ? bias + n0 : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += RB) {
            const float *xt = x + m0 * ldx;
            float *yt = y + m0 * ldy + n0;
            if (M - m0 >= 2) /* constant R: the row loop unrolls */
                linear_tile(xt, ldx, 2, wt, ldw, C, K, yt, ldy, bt);
            else
                linear_tile(xt, ldx, 1, wt, ldw, C, K, yt, ldy, bt);
        }
    }
}

/* ---- RMSNorm -------------------------------------------------------------------------------------
 * With residual (not NULL): residual = x + residual, then out = w * norm(residual); else out = w *
 * norm(x). x, residual and out are [M, H] contiguous rows. The sum of squares is accumulated in
 * double: the result rounds as torch's fp32 mean would round the exact value. */
void f32_rms_norm(const float *x, float *residual, const float *w, int64_t M, int64_t H, double eps, float *out) {
#pragma omp parallel for schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * H;
        float *rr = residual ? residual + m * H : NULL;
        /* the squares summed in 8 double lanes (element i into lane i % 8, in order), then the lanes
         * pairwise and the tail: the same order in every build, and no 576-long chain of adds */
        double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
#ifdef __AVX512F__
        __m512d acc = _mm512_setzero_pd();
        for (; i + 8 <= H; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            if (rr) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(rr + i));
                _mm256_storeu_ps(rr + i, v);
            }
            const __m512d vd = _mm512_cvtps_pd(v);
            acc = _mm512_add_pd(acc, _mm512_mul_pd(vd, vd));
        }
        _mm512_storeu_pd(lane, acc);
#elif defined(F32_AVX2)
        __m256d a0 = _mm256_setzero_pd(), a1 = a0;
        for (; i + 8 <= H; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            if (rr) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(rr + i));
                _mm256_storeu_ps(rr + i, v);
            }
            const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            a0 = _mm256_add_pd(a0, _mm256_mul_pd(lo, lo));
            a1 = _mm256_add_pd(a1, _mm256_mul_pd(hi, hi));
        }
        _mm256_storeu_pd(lane, a0);
        _mm256_storeu_pd(lane + 4, a1);
#else
        for (; i + 8 <= H; i += 8)
            for (int j = 0; j < 8; j++) {
                float v = xr[i + j];
                if (rr) {
                    v += rr[i + j];
                    rr[i + j] = v;
                }
                lane[j] += (double)v * v;
            }
#endif
        double ss = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
        for (; i < H; i++) {
            float v = xr[i];
            if (rr) {
                v += rr[i];
                rr[i] = v;
            }
            ss += (double)v * v;
        }
        const float inv = (float)(1.0 / sqrt(ss / (double)H + eps));
        const float *src = rr ? rr : xr;
        float *o = out + m * H;
        for (int64_t k = 0; k < H; k++) o[k] = w[k] * (src[k] * inv);
    }
}

/* ---- silu(gate) * up: x [M, 2I] (gate then up), out [M, I] ----------------------------------------- */
void f32_silu_and_mul(const float *x, int64_t M, int64_t I, float *out) {
#pragma omp parallel for schedule(static) if (M * I > 65536)
    for (int64_t m = 0; m < M; m++) {
        const float *g = x + m * 2 * I, *u = g + I;
        float *o = out + m * I;
        int64_t i = 0;
#ifdef F32_AVX2
        const __m256 one = _mm256_set1_ps(1.f);
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = g[i] / (1.f + exp1(-g[i])) * u[i];
    }
}

/* ---- rotary embedding, rotate-half layout, in place ------------------------------------------------
 * q [T, H, D] and k [T, KVH, D] with token strides ldq and ldk (heads contiguous, D apart);
 * cos_sin [max_pos, D]: cos of the D/2 frequencies, then their sin. */
static void rotate_heads(float *x, int64_t heads, int64_t D, const float *c, const float *s) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *a = x + h * D, *b = a + half;
        for (int64_t i = 0; i < half; i++) {
            const float x1 = a[i], x2 = b[i];
            a[i] = x1 * c[i] - x2 * s[i];
            b[i] = x2 * c[i] + x1 * s[i];
        }
    }
}

void f32_rotary(float *q, int64_t ldq, float *k, int64_t ldk, const int64_t *positions, int64_t T, int64_t H,
                int64_t KVH, int64_t D, const float *cos_sin) {
#pragma omp parallel for schedule(static) if (T > 16)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_sin + positions[t] * D, *s = c + D / 2;
        rotate_heads(q + t * ldq, H, D, c, s);
        rotate_heads(k + t * ldk, KVH, D, c, s);
    }
}

/* ---- KV-cache write: rows of k / v [T, W] (token strides ldk, ldv) to cache slots (-1: skip) ---- */
void f32_write_kv(const float *k, int64_t ldk, const float *v, int64_t ldv, const int64_t *slots, int64_t T,
                  int64_t W, float *k_cache, float *v_cache) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t s = slots[t];
        if (s < 0) continue;
        memcpy(k_cache + s * W, k + t * ldk, (size_t)W * sizeof(float));
        memcpy(v_cache + s * W, v + t * ldv, (size_t)W * sizeof(float));
    }
}

/* ---- decode attention over the paged cache ---------------------------------------------------------
 * q [B, H, D] (row stride ldq), one query token per request, whose K/V is in the cache already;
 * caches [num_blocks, BS, KVH, D]; block_tables [B, max_blocks] int32; seq_lens [B] int32;
 * out [B, H, D] contiguous. The GQA group of H / KVH query heads of a KV head reads each of its keys
 * and values once. Softmax runs online over chunks of CH keys, in order from the first key attended
 * (position 0, or L - window for a sliding-window layer); scores are soft-capped when softcap > 0. */
#define CH 32
#define MAXG 16  /* query heads per KV head */
#define MAXKV 16 /* KV heads one work item may take */

/* s[j] = scale * dot(q, k_j) for n keys, four at a time (four independent FMA chains); every key's
 * sum is reduced the same way whichever group of four it falls in. */
static inline void attn_scores(const float *q, const float *const *kp, int64_t n, int64_t D, float scale, float *s) {
    int64_t j = 0;
#ifdef F32_AVX2
    for (; j + 4 <= n; j += 4) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[j] + d), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[j + 1] + d), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[j + 2] + d), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[j + 3] + d), a3);
        }
        s[j] = hsum8(a0) * scale;
        s[j + 1] = hsum8(a1) * scale;
        s[j + 2] = hsum8(a2) * scale;
        s[j + 3] = hsum8(a3) * scale;
    }
    for (; j < n; j++) {
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kp[j] + d), a0);
        s[j] = hsum8(a0) * scale;
    }
#else
    for (; j < n; j++) {
        float a = 0.f;
        for (int64_t d = 0; d < D; d++) a += q[d] * kp[j][d];
        s[j] = a * scale;
    }
#endif
}

/* The largest of s[0..n), and s[j] = exp(s[j] - m) returning their sum: eight lanes, then the tail;
 * the order depends on n only. */
static inline float max_of(const float *s, int64_t n) {
    float r = -INFINITY;
    int64_t j = 0;
#ifdef F32_AVX2
    if (n >= 8) {
        __m256 mv = _mm256_loadu_ps(s);
        for (j = 8; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
        float lanes[8];
        _mm256_storeu_ps(lanes, mv);
        for (int i = 0; i < 8; i++) r = lanes[i] > r ? lanes[i] : r;
    }
#endif
    for (; j < n; j++) r = s[j] > r ? s[j] : r;
    return r;
}

static inline float exp_minus_and_sum(float *s, int64_t n, float m) {
    float r = 0.f;
    int64_t j = 0;
#ifdef F32_AVX2
    if (n >= 8) {
        const __m256 mv = _mm256_set1_ps(m);
        __m256 acc = _mm256_setzero_ps();
        for (; j + 8 <= n; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
            _mm256_storeu_ps(s + j, e);
            acc = _mm256_add_ps(acc, e);
        }
        r = hsum8(acc);
    }
#endif
    for (; j < n; j++) {
        s[j] = exp1(s[j] - m);
        r += s[j];
    }
    return r;
}

/* o = o * alpha + sum_j p[j] * v_j, 64 channels at a time: eight independent accumulators. */
static inline void attn_accumulate(float *o, float alpha, const float *p, const float *const *vp, int64_t n, int64_t D) {
#ifdef F32_AVX2
    const __m256 av = _mm256_set1_ps(alpha);
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) {
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_mul_ps(_mm256_loadu_ps(o + d0 + 8 * i), av);
        for (int64_t j = 0; j < n; j++) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            const float *v = vp[j] + d0;
            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * i), acc[i]);
        }
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
    }
    for (; d0 < D; d0 += 8) {
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(o + d0), av);
        for (int64_t j = 0; j < n; j++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(vp[j] + d0), acc);
        _mm256_storeu_ps(o + d0, acc);
    }
#else
    for (int64_t d = 0; d < D; d++) {
        float acc = o[d] * alpha;
        for (int64_t j = 0; j < n; j++) acc += p[j] * vp[j][d];
        o[d] = acc;
    }
#endif
}

#define PGR 3 /* query rows (GQA heads) that share each key and value load */

#ifdef F32_AVX2
/* acc[c] += m * v[c] for c < 4: one row's four 8-lane FMA chains against four shared vectors */
static inline __attribute__((always_inline)) void fma_x4(__m256 acc[4], __m256 m, const __m256 v[4]) {
    for (int c = 0; c < 4; c++) acc[c] = _mm256_fmadd_ps(m, v[c], acc[c]);
}

/* v[c] = the 8 floats at x + 8 * c */
static inline __attribute__((always_inline)) void load_x4(__m256 v[4], const float *x) {
    for (int c = 0; c < 4; c++) v[c] = _mm256_loadu_ps(x + 8 * c);
}
#endif
#ifdef __AVX512F__
/* the same two steps over 16-lane vectors (AVX-512 builds): lane by lane the same operations */
static inline __attribute__((always_inline)) void fma_x4_16(__m512 acc[4], __m512 m, const __m512 v[4]) {
    for (int c = 0; c < 4; c++) acc[c] = _mm512_fmadd_ps(m, v[c], acc[c]);
}

static inline __attribute__((always_inline)) void load_x4_16(__m512 v[4], const float *x) {
    for (int c = 0; c < 4; c++) v[c] = _mm512_loadu_ps(x + 16 * c);
}
#endif

/* s[r][j] = scale * dot(q[r], k_j) for nr (<= PGR) query rows over the same n keys: each key load
 * serves every row; per key and row the operations of attn_scores, so the bits are its bits. */
static inline __attribute__((always_inline)) void attn_scores_rows(const float *const *q, const int nr,
                                                                    const float *const *kp, int64_t n, int64_t D,
                                                                    float scale, float s[][CH]) {
#ifdef F32_AVX2
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        __m256 a[PGR][4];
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < 4; c++) a[r][c] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 k[4] = {_mm256_loadu_ps(kp[j] + d), _mm256_loadu_ps(kp[j + 1] + d),
                                 _mm256_loadu_ps(kp[j + 2] + d), _mm256_loadu_ps(kp[j + 3] + d)};
            for (int r = 0; r < nr; r++) fma_x4(a[r], _mm256_loadu_ps(q[r] + d), k);
        }
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < 4; c++) s[r][j + c] = hsum8(a[r][c]) * scale;
    }
    if (j < n)
        for (int r = 0; r < nr; r++) attn_scores(q[r], kp + j, n - j, D, scale, s[r] + j);
#else
    for (int r = 0; r < nr; r++) attn_scores(q[r], kp, n, D, scale, s[r]);
#endif
}

/* o[r] = o[r] * alpha[r] + sum over j < n of p[r][j] * v_j for nr (<= PGR) query rows that attend to
 * the same keys (the heads of one GQA group): each v_j load serves all of them; per lane the
 * operations of attn_accumulate, so the bits are its bits. */
static inline __attribute__((always_inline)) void rows_accumulate(float *const *o, const float *alpha,
                                                                      const float *const *p, const int nr,
                                                                      const float *const *vp, int64_t n, int64_t D,
                                                                      const int wide) {
#ifdef F32_AVX2
    int64_t d0 = 0;
#ifdef __AVX512F__
    /* wide: 16-lane vectors, lane by lane the 8-lane loop's operations (prefill: 1.1x; decode, which
     * waits on memory, measured 3-5% slower with them) */
    for (; wide && d0 + 64 <= D; d0 += 64) {
        __m512 acc[PGR][4];
        for (int r = 0; r < nr; r++) {
            const __m512 av = _mm512_set1_ps(alpha[r]);
            load_x4_16(acc[r], o[r] + d0);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_mul_ps(acc[r][c], av);
        }
        for (int64_t j = 0; j < n; j++) {
            __m512 v[4];
            load_x4_16(v, vp[j] + d0);
            for (int r = 0; r < nr; r++) fma_x4_16(acc[r], _mm512_set1_ps(p[r][j]), v);
        }
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(o[r] + d0 + 16 * c, acc[r][c]);
    }
#endif
    for (; d0 + 32 <= D; d0 += 32) {
        __m256 acc[PGR][4];
        for (int r = 0; r < nr; r++) {
            const __m256 av = _mm256_set1_ps(alpha[r]);
            load_x4(acc[r], o[r] + d0);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm256_mul_ps(acc[r][c], av);
        }
        for (int64_t j = 0; j < n; j++) {
            __m256 v[4];
            load_x4(v, vp[j] + d0);
            for (int r = 0; r < nr; r++) fma_x4(acc[r], _mm256_set1_ps(p[r][j]), v);
        }
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < 4; c++) _mm256_storeu_ps(o[r] + d0 + 8 * c, acc[r][c]);
    }
    for (int r = 0; r < nr && d0 < D; r++) { /* D not a multiple of 32: the rest row by row */
        for (int64_t d = d0; d < D; d += 8) {
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(o[r] + d), _mm256_set1_ps(alpha[r]));
            for (int64_t j = 0; j < n; j++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(p[r][j]), _mm256_loadu_ps(vp[j] + d), acc);
            _mm256_storeu_ps(o[r] + d, acc);
        }
    }
#else
    (void)wide;
    for (int r = 0; r < nr; r++) attn_accumulate(o[r], alpha[r], p[r], vp, n, D);
#endif
}

/* One online-softmax step for nr (<= PGR) rows over keys [lo, lo + n) of their chunk scores s[r]:
 * soft-cap, update the running max m[r] and sum l[r], turn the scores into probabilities, then
 * o[r] = o[r] * alpha[r] + p[r] @ v over those keys (vp: the keys' value rows from lo). */
static inline __attribute__((always_inline)) void softmax_accumulate_rows(float s[][CH], int64_t lo, int64_t n,
                                                                           float *m, float *l, float *const *o,
                                                                           const float *const *vp, const int nr,
                                                                           int64_t D, float softcap, const int wide) {
    float alpha[PGR];
    const float *p[PGR];
    for (int r = 0; r < nr; r++) {
        float *sr = s[r] + lo;
        for (int64_t j = 0; softcap > 0.f && j < n; j++) sr[j] = softcap * tanhf(sr[j] / softcap);
        const float cmax = max_of(sr, n);
        const float mnew = cmax > m[r] ? cmax : m[r];
        alpha[r] = exp1(m[r] - mnew); /* 0 on the row's first chunk (m = -inf) */
        l[r] = l[r] * alpha[r] + exp_minus_and_sum(sr, n, mnew);
        m[r] = mnew;
        p[r] = sr;
    }
    rows_accumulate(o, alpha, p, nr, vp, n, D, wide);
}

/* Runs call(NR) with NR = nr (1..PGR) as a constant, so the row loops it reaches unroll. */
#define DISPATCH_NR(nr, call)            \
    do {                                 \
        if ((nr) == 3)                   \
            call(3);                     \
        else if ((nr) == 2)              \
            call(2);                     \
        else                             \
            call(1);                     \
    } while (0)

/* Asks for the keys and values of the next chunk while this one is computed: blocks sit anywhere in
 * the cache, so the hardware prefetchers lose the stream at every block boundary. row_bytes: bytes of one
 * token's one KV head in the cache. */
static inline void prefetch_chunk(const char *k_cache, const char *v_cache, const int32_t *table, int64_t j0,
                                  int64_t n, int64_t BS, int64_t KVH, int64_t kh0, int64_t span, int64_t row_bytes) {
#ifdef F32_AVX2
    const int64_t row = span * row_bytes; /* bytes of one token's heads in this item */
    for (int64_t j = 0; j < n; j++) {
        const int64_t pos = j0 + j, off = (((int64_t)table[pos / BS] * BS + pos % BS) * KVH + kh0) * row_bytes;
        for (int64_t b = 0; b < row; b += 64) {
            _mm_prefetch(k_cache + off + b, _MM_HINT_T0);
            _mm_prefetch(v_cache + off + b, _MM_HINT_T0);
        }
    }
#else
    (void)k_cache; (void)v_cache; (void)table; (void)j0; (void)n; (void)BS; (void)KVH; (void)kh0; (void)span;
    (void)row_bytes;
#endif
}

/* ---- int8 KV cache (engine/attention/kv_format.py) ---------------------------------------------------
 * A row is one token's one KV head: D int8 values, then their fp32 scale (R = D + 4 bytes).
 * scale = max|x| / 127 (1 for a row of zeros), q = rint(x / scale) clamped to +-127, read back as
 * q * scale: the same operations as the torch format, so both give the same bits. */
#define MAXD 256 /* head_dim of the kernels that lay out a chunk of keys in a buffer (int8 decode, prefill) */

/* The vector loops do the scalar tail's operations lane by lane (an exact max, IEEE division, round
 * half to even, the clamp), so a row's bytes do not depend on the build. */
static inline void quantize_row(const float *x, int64_t D, int8_t *row) {
    float amax = 0.f;
    int64_t d = 0;
#ifdef __AVX512F__
    __m512 mx = _mm512_setzero_ps();
    for (; d + 16 <= D; d += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + d)));
    amax = _mm512_reduce_max_ps(mx);
#endif
    for (; d < D; d++) {
        const float a = fabsf(x[d]);
        amax = a > amax ? a : amax;
    }
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    d = 0;
#ifdef __AVX512F__
    const __m512 sv = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
    for (; d + 16 <= D; d += 16) {
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + d), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_max_ps(_mm512_min_ps(r, hi), lo);
        _mm_storeu_si128((__m128i *)(row + d), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
    }
#endif
    for (; d < D; d++) {
        float r = rintf(x[d] / scale);
        r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
        row[d] = (int8_t)r;
    }
    memcpy(row + D, &scale, sizeof scale);
}

static inline void dequantize_row(const int8_t *row, int64_t D, float *x) {
    float scale;
    memcpy(&scale, row + D, sizeof scale);
    int64_t d = 0;
#ifdef __AVX512F__
    const __m512 sz = _mm512_set1_ps(scale);
    for (; d + 16 <= D; d += 16) {
        const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + d)));
        _mm512_storeu_ps(x + d, _mm512_mul_ps(_mm512_cvtepi32_ps(q), sz));
    }
#endif
#ifdef F32_AVX2
    const __m256 sv = _mm256_set1_ps(scale);
    for (; d + 8 <= D; d += 8) {
        const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + d)));
        _mm256_storeu_ps(x + d, _mm256_mul_ps(_mm256_cvtepi32_ps(q), sv));
    }
#endif
    for (; d < D; d++) x[d] = (float)row[d] * scale;
}

/* k / v [T, KVH, D] (token strides ldk, ldv) quantized into their cache slots (-1: skip). */
void i8_write_kv(const float *k, int64_t ldk, const float *v, int64_t ldv, const int64_t *slots, int64_t T,
                 int64_t KVH, int64_t D, int8_t *k_cache, int8_t *v_cache) {
    const int64_t R = D + 4;
#pragma omp parallel for schedule(static) if (T * KVH >= 64)
    for (int64_t t = 0; t < T; t++) {
        const int64_t s = slots[t];
        if (s < 0) continue;
        for (int64_t h = 0; h < KVH; h++) {
            quantize_row(k + t * ldk + h * D, D, k_cache + (s * KVH + h) * R);
            quantize_row(v + t * ldv + h * D, D, v_cache + (s * KVH + h) * R);
        }
    }
}

/* Work items are (request, range of KV heads): with many requests one item takes all of a request's
 * heads, so each chunk of its keys and values (contiguous per token) is read from memory once; with
 * few, an item is one KV head, for parallelism. Each head sees the same operations either way.
 * With an int8 cache (quantized = 1) each chunk's rows of a KV head are dequantized once into fp32
 * for its whole query group, and from there the operations are the fp32 cache's: the result has
 * the same bits as this kernel on a cache holding the dequantized values. */
static inline __attribute__((always_inline)) void paged_decode(
    const float *q, int64_t ldq, const char *k_cache, const char *v_cache, const int32_t *block_tables,
    int64_t max_blocks, const int32_t *seq_lens, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale,
    int64_t window, float softcap, float *out, const int quantized) {
    const int64_t G = H / KVH;
    const int64_t RW = quantized ? D + 4 : D * (int64_t)sizeof(float); /* bytes of one cache row */
#ifdef _OPENMP
    const int64_t threads = omp_get_max_threads();
#else
    const int64_t threads = 1;
#endif
    const int64_t span = (B >= 4 * threads && KVH <= MAXKV) ? KVH : 1; /* KV heads per work item */
    const int64_t per_request = KVH / span;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * per_request; item++) {
        const int64_t b = item / per_request, kh0 = (item % per_request) * span;
        const int64_t L = seq_lens[b], first = (window > 0 && L > window) ? L - window : 0; /* window */
        const int32_t *table = block_tables + b * max_blocks;
        float m[MAXKV * MAXG], l[MAXKV * MAXG], sc[MAXG][CH];
        float kbuf[quantized ? CH * MAXD : 1], vbuf[quantized ? CH * MAXD : 1]; /* a dequantized chunk */
        for (int64_t i = 0; i < span * G; i++) {
            m[i] = -INFINITY;
            l[i] = 0.f;
        }
        memset(out + (b * H + kh0 * G) * D, 0, (size_t)(span * G * D) * sizeof(float));
        for (int64_t j0 = first; j0 < L; j0 += CH) {
            const int64_t n = min64(CH, L - j0);
            int64_t tok[CH]; /* cache row of each key of the chunk */
            for (int64_t j = 0; j < n; j++) {
                const int64_t pos = j0 + j;
                tok[j] = (int64_t)table[pos / BS] * BS + pos % BS;
            }
            prefetch_chunk(k_cache, v_cache, table, j0 + CH, min64(CH, L - j0 - CH), BS, KVH, kh0, span, RW);
            for (int64_t kh = kh0; kh < kh0 + span; kh++) {
                const float *kp[CH], *vp[CH];
                for (int64_t j = 0; j < n; j++) {
                    const char *kr = k_cache + (tok[j] * KVH + kh) * RW, *vr = v_cache + (tok[j] * KVH + kh) * RW;
                    if (quantized) {
                        dequantize_row((const int8_t *)kr, D, kbuf + j * D);
                        dequantize_row((const int8_t *)vr, D, vbuf + j * D);
                        kp[j] = kbuf + j * D;
                        vp[j] = vbuf + j * D;
                    } else {
                        kp[j] = (const float *)kr;
                        vp[j] = (const float *)vr;
                    }
                }
                for (int64_t g0 = 0; g0 < G; g0 += PGR) {
                    const int nr = (int)min64(PGR, G - g0);
                    const float *qr[PGR];
                    float *orow[PGR];
                    for (int r = 0; r < nr; r++) {
                        qr[r] = q + b * ldq + (kh * G + g0 + r) * D;
                        orow[r] = out + (b * H + kh * G + g0 + r) * D;
                    }
                    const int64_t slot = (kh - kh0) * G + g0; /* the rows' state in this item */
#define DECODE_ROWS(NR)                                                                              \
    do {                                                                                             \
        attn_scores_rows(qr, NR, kp, n, D, scale, sc + g0);                                          \
        softmax_accumulate_rows(sc + g0, 0, n, m + slot, l + slot, orow, vp, NR, D, softcap, 0);         \
    } while (0)
                    DISPATCH_NR(nr, DECODE_ROWS);
#undef DECODE_ROWS
                }
            }
        }
        for (int64_t i = 0; i < span * G; i++) {
            float *o = out + (b * H + kh0 * G + i) * D;
            const float inv = 1.f / l[i];
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
        }
    }
}

void f32_paged_decode_attention(const float *q, int64_t ldq, const float *k_cache, const float *v_cache,
                                const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens, int64_t B,
                                int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale, int64_t window,
                                float softcap, float *out) {
    paged_decode(q, ldq, (const char *)k_cache, (const char *)v_cache, block_tables, max_blocks, seq_lens, B, H, KVH,
                 D, BS, scale, window, softcap, out, 0);
}

/* As f32_paged_decode_attention over int8 caches [num_blocks, BS, KVH, D + 4]; D <= MAXD. */
void i8_paged_decode_attention(const float *q, int64_t ldq, const int8_t *k_cache, const int8_t *v_cache,
                               const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens, int64_t B,
                               int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale, int64_t window,
                               float softcap, float *out) {
    paged_decode(q, ldq, (const char *)k_cache, (const char *)v_cache, block_tables, max_blocks, seq_lens, B, H, KVH,
                 D, BS, scale, window, softcap, out, 1);
}

int64_t f32_chunk_max_head_dim(void) { return MAXD; }

/* ---- prefill attention over the paged cache ----------------------------------------------------------
 * q [T, H, D] (row stride ldq): each request's query span, query_start_loc [B + 1] (int32, from 0);
 * request b's keys are its first seq_lens[b] cache positions, its new tokens' K/V already written,
 * and query j of its span sits at position seq_lens[b] - q_len + j (causal; with window > 0 it sees
 * only the last `window` positions). out [T, H, D] contiguous.
 *
 * A work item is (request, KV head, tile of PQT query positions): the tile's PQT x G query rows
 * share every chunk of PCH keys, which is laid out once per item as kT [D][PCH] (transposed,
 * dequantized from an int8 cache), so a row's scores over the chunk are PCH / 8 vector FMA chains
 * over d with no horizontal sums. Chunks start at multiples of PCH from position 0, whatever the
 * tile, so a row's result depends only on its own position and keys: not on the tile it falls in,
 * how the prompt was chunked, or the rest of the batch. */
#define PCH CH /* keys per chunk: the decode kernel's, so both use its row helpers */
#define PQT 32

/* s[r][j] = scale * dot(q[r], k_j) over a chunk laid out as kT [D][PCH], for the nr (<= PGR) query
 * heads of one position: every kT load serves all of them. Each score is one FMA chain over d. */
static inline __attribute__((always_inline)) void prefill_scores(const float *const *q, const int nr,
                                                                  const float *kT, int64_t D, float scale,
                                                                  float s[PGR][PCH]) {
#ifdef __AVX512F__
    __m512 a[PGR][2];
    for (int r = 0; r < nr; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        const __m512 k0 = _mm512_loadu_ps(kT + d * PCH), k1 = _mm512_loadu_ps(kT + d * PCH + 16);
        for (int r = 0; r < nr; r++) {
            const __m512 qb = _mm512_set1_ps(q[r][d]);
            a[r][0] = _mm512_fmadd_ps(qb, k0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(qb, k1, a[r][1]);
        }
    }
    const __m512 sv = _mm512_set1_ps(scale);
    for (int r = 0; r < nr; r++) {
        _mm512_storeu_ps(s[r], _mm512_mul_ps(a[r][0], sv));
        _mm512_storeu_ps(s[r] + 16, _mm512_mul_ps(a[r][1], sv));
    }
#elif defined(F32_AVX2)
    __m256 a[PGR][4];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < 4; c++) a[r][c] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m256 k[4];
        load_x4(k, kT + d * PCH);
        for (int r = 0; r < nr; r++) fma_x4(a[r], _mm256_set1_ps(q[r][d]), k);
    }
    const __m256 sv = _mm256_set1_ps(scale);
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(s[r] + 8 * c, _mm256_mul_ps(a[r][c], sv));
#else
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < PCH; j++) {
            float a = 0.f;
            for (int64_t d = 0; d < D; d++) a += q[r][d] * kT[d * PCH + j];
            s[r][j] = a * scale;
        }
#endif
}

/* One position's nr query heads over one chunk: scores, then the online-softmax step over the
 * position's keys [lo, hi) of the chunk. */
static inline __attribute__((always_inline)) void prefill_rows(const float *const *q, float *const *o, float *m,
                                                                float *l, const int nr, const float *kT,
                                                                const float *const *vp, int64_t lo, int64_t hi,
                                                                int64_t D, float scale, float softcap) {
    float sc[PGR][PCH];
    prefill_scores(q, nr, kT, D, scale, sc);
    softmax_accumulate_rows(sc, lo, hi - lo, m, l, o, vp + lo, nr, D, softcap, 1);
}

void f32_paged_prefill_attention(const float *q, int64_t ldq, const char *k_cache, const char *v_cache,
                                 int64_t quantized, const int32_t *block_tables, int64_t max_blocks,
                                 const int32_t *seq_lens, const int32_t *query_start_loc, int64_t B, int64_t H,
                                 int64_t KVH, int64_t D, int64_t BS, float scale, int64_t window, float softcap,
                                 float *out) {
    const int64_t G = H / KVH;
    const int64_t RW = quantized ? D + 4 : D * (int64_t)sizeof(float);
    int64_t *tiles = (int64_t *)malloc((size_t)(B + 1) * sizeof(int64_t)); /* first tile of each request */
    tiles[0] = 0;
    for (int64_t b = 0; b < B; b++)
        tiles[b + 1] = tiles[b] + (query_start_loc[b + 1] - query_start_loc[b] + PQT - 1) / PQT;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles[B] * KVH; item++) {
        const int64_t kh = item % KVH, tile = item / KVH;
        int64_t b = 0;
        while (tiles[b + 1] <= tile) b++;
        const int64_t qs = query_start_loc[b], q_len = query_start_loc[b + 1] - qs, L = seq_lens[b];
        const int64_t p0 = (tile - tiles[b]) * PQT, np = min64(PQT, q_len - p0);
        const int64_t pos0 = L - q_len + p0, pos_last = pos0 + np - 1; /* positions of the tile's queries */
        const int32_t *table = block_tables + b * max_blocks;
        const int64_t R = np * G;
        float m[PQT * MAXG], l[PQT * MAXG];
        float kT[MAXD * PCH], vbuf[quantized ? PCH * MAXD : 1];
        for (int64_t r = 0; r < R; r++) {
            m[r] = -INFINITY;
            l[r] = 0.f;
            memset(out + ((qs + p0 + r / G) * H + kh * G + r % G) * D, 0, (size_t)D * sizeof(float));
        }
        const int64_t first = window > 0 && pos0 - window + 1 > 0 ? pos0 - window + 1 : 0;
        for (int64_t j0 = first / PCH * PCH; j0 <= pos_last; j0 += PCH) {
            const int64_t n = min64(PCH, pos_last + 1 - j0);
            const float *vp[PCH];
            for (int64_t j = 0; j < PCH; j++) {
                if (j >= n) { /* zero keys past the chunk's end: their scores are masked anyway */
                    for (int64_t d = 0; d < D; d++) kT[d * PCH + j] = 0.f;
                    continue;
                }
                const int64_t pos = j0 + j, row = ((int64_t)table[pos / BS] * BS + pos % BS) * KVH + kh;
                const char *kr = k_cache + row * RW, *vr = v_cache + row * RW;
                float kd[MAXD];
                const float *kv = (const float *)kr;
                if (quantized) {
                    dequantize_row((const int8_t *)kr, D, kd);
                    dequantize_row((const int8_t *)vr, D, vbuf + j * D);
                    kv = kd;
                    vp[j] = vbuf + j * D;
                } else {
                    vp[j] = (const float *)vr;
                }
                for (int64_t d = 0; d < D; d++) kT[d * PCH + j] = kv[d];
            }
            for (int64_t i = 0; i < np; i++) { /* the tile's positions; their G query heads share lo, hi */
                const int64_t pos = pos0 + i, tok = qs + p0 + i;
                const int64_t lo = window > 0 && pos - window + 1 > j0 ? pos - window + 1 - j0 : 0;
                const int64_t hi = min64(n, pos + 1 - j0); /* this position's keys in the chunk: [lo, hi) */
                if (hi <= lo) continue;
                for (int64_t g0 = 0; g0 < G; g0 += PGR) {
                    const int nr = (int)min64(PGR, G - g0);
                    const float *qr[PGR];
                    float *orow[PGR];
                    for (int r = 0; r < nr; r++) {
                        qr[r] = q + tok * ldq + (kh * G + g0 + r) * D;
                        orow[r] = out + (tok * H + kh * G + g0 + r) * D;
                    }
                    float *mr = m + i * G + g0, *lr = l + i * G + g0;
#define PREFILL_ROWS(NR) prefill_rows(qr, orow, mr, lr, NR, kT, vp, lo, hi, D, scale, softcap)
                    DISPATCH_NR(nr, PREFILL_ROWS);
#undef PREFILL_ROWS
                }
            }
        }
        for (int64_t r = 0; r < R; r++) {
            float *o = out + ((qs + p0 + r / G) * H + kh * G + r % G) * D;
            const float inv = 1.f / l[r];
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
        }
    }
    free(tiles);
}

int64_t f32_max_group(void) { return MAXG; }

/* ---- kernel plans: a decode step's kernels replayed in one call ------------------------------------
 * Each kernel has a twin taking its arguments as one int64 array (pointers and integers as they are,
 * a float or double by its bits), so a recorded sequence of calls can run from C without returning
 * to Python between them (engine/kernels/cpu/plan.py). */
typedef void (*plan_fn)(const int64_t *);

static inline float bits_f32(int64_t v) {
    const int32_t b = (int32_t)v;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}
static inline double bits_f64(int64_t v) {
    double d;
    memcpy(&d, &v, sizeof d);
    return d;
}
#define P(i, T) ((T)(intptr_t)a[i])

void f32_linear_a(const int64_t *a) {
    f32_linear(P(0, const float *), a[1], a[2], a[3], P(4, const float *), a[5], a[6], P(7, const float *),
               P(8, float *), a[9]);
}
void f32_rms_norm_a(const int64_t *a) {
    f32_rms_norm(P(0, const float *), P(1, float *), P(2, const float *), a[3], a[4], bits_f64(a[5]), P(6, float *));
}
void f32_silu_and_mul_a(const int64_t *a) { f32_silu_and_mul(P(0, const float *), a[1], a[2], P(3, float *)); }
void f32_rotary_a(const int64_t *a) {
    f32_rotary(P(0, float *), a[1], P(2, float *), a[3], P(4, const int64_t *), a[5], a[6], a[7], a[8],
               P(9, const float *));
}
void f32_write_kv_a(const int64_t *a) {
    f32_write_kv(P(0, const float *), a[1], P(2, const float *), a[3], P(4, const int64_t *), a[5], a[6],
                 P(7, float *), P(8, float *));
}
void f32_paged_decode_attention_a(const int64_t *a) {
    f32_paged_decode_attention(P(0, const float *), a[1], P(2, const float *), P(3, const float *),
                               P(4, const int32_t *), a[5], P(6, const int32_t *), a[7], a[8], a[9], a[10], a[11],
                               bits_f32(a[12]), a[13], bits_f32(a[14]), P(15, float *));
}
void i8_write_kv_a(const int64_t *a) {
    i8_write_kv(P(0, const float *), a[1], P(2, const float *), a[3], P(4, const int64_t *), a[5], a[6], a[7],
                P(8, int8_t *), P(9, int8_t *));
}
void f32_paged_prefill_attention_a(const int64_t *a) {
    f32_paged_prefill_attention(P(0, const float *), a[1], P(2, const char *), P(3, const char *), a[4],
                                P(5, const int32_t *), a[6], P(7, const int32_t *), P(8, const int32_t *), a[9], a[10],
                                a[11], a[12], a[13], bits_f32(a[14]), a[15], bits_f32(a[16]), P(17, float *));
}
void i8_paged_decode_attention_a(const int64_t *a) {
    i8_paged_decode_attention(P(0, const float *), a[1], P(2, const int8_t *), P(3, const int8_t *),
                              P(4, const int32_t *), a[5], P(6, const int32_t *), a[7], a[8], a[9], a[10], a[11],
                              bits_f32(a[12]), a[13], bits_f32(a[14]), P(15, float *));
}

/* fns[i] is called with args + offsets[i], in order. With ns (not NULL), ns[i] += the nanoseconds
 * call i took (benchmarks/profile_step.py). */
void f32_run_plan(int64_t n, const int64_t *fns, const int64_t *offsets, const int64_t *args, int64_t *ns) {
    if (ns == NULL) {
        for (int64_t i = 0; i < n; i++) ((plan_fn)(intptr_t)fns[i])(args + offsets[i]);
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        ((plan_fn)(intptr_t)fns[i])(args + offsets[i]);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ns[i] += (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
    }
}
