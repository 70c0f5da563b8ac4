/* fp32 activations times GGUF weight blocks (Q4_0, Q4_1, Q8_0), dequantized in registers.
 *
 * A weight is [N, K] in the GGUF block layout, row after row (row stride ldw bytes), each row K/32
 * blocks of 32 values along K:
 *   Q4_0 (18 bytes): fp16 d, 16 bytes of nibbles;     w = d * (q - 8)
 *   Q4_1 (20 bytes): fp16 d, fp16 m, 16 nibbles;       w = d * q + m
 *   Q8_0 (34 bytes): fp16 d, 32 int8;                  w = d * q
 * Byte j of the nibbles holds value j (low nibble) and value j + 16 (high nibble).
 *
 * Exactness: every value is rebuilt with the bits the gguf package's numpy dequantization gives
 * (d * q is exact in fp32: 11 + 8 significant bits at most, so Q4_1's fma(d, q, m) rounds once,
 * as d * q + m does). The products are then summed exactly as f32_linear in fp32_cpu.c sums them
 * (8 lane-wise FMA chains over k in order, the same horizontal sum), so a row's result has the same
 * bits as f32_linear on the dequantized weight, at every batch size.
 *
 * M == 1 streams each block once and never writes the dequantized values; M > 1 dequantizes a tile
 * of weight rows once into a per-thread buffer that every row of x then passes over.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GQ_AVX2 1
#ifdef __AVX512VL__ /* 4-bit values by a 16-entry table lookup (vpermt2ps on 256-bit vectors) */
#define GQ_ISA "avx2+avx512vl"
#else
#define GQ_ISA "avx2"
#endif
#else
#define GQ_ISA "generic"
#endif

enum { GQ_Q4_0 = 2, GQ_Q4_1 = 3, GQ_Q8_0 = 8 }; /* GGML type numbers */

const char *gq_isa(void) { return GQ_ISA; }

/* bytes per block of 32 values, 0 for a type this file does not know */
int64_t gq_block_bytes(int64_t type) {
    switch (type) {
    case GQ_Q4_0: return 18;
    case GQ_Q4_1: return 20;
    case GQ_Q8_0: return 34;
    default: return 0;
    }
}

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef GQ_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, mant = h & 0x3ff;
    uint32_t bits;
    float f;
    if (e == 0) { /* zero or subnormal: mant * 2^-24 is exact in fp32 */
        f = (float)mant * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    bits = e == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((e + 112) << 23) | (mant << 13);
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* one block's 32 values, scalar (the reference for the vector path, and the generic build) */
static void dequant_block(const uint8_t *b, int64_t type, float *out) {
    const float d = half_to_float(b);
    if (type == GQ_Q8_0) {
        const int8_t *q = (const int8_t *)(b + 2);
        for (int i = 0; i < 32; i++) out[i] = d * (float)q[i];
        return;
    }
    const int q41 = type == GQ_Q4_1;
    const float m = q41 ? half_to_float(b + 2) : 0.0f;
    const uint8_t *qs = b + (q41 ? 4 : 2);
    for (int i = 0; i < 16; i++) {
        const int lo = qs[i] & 0x0f, hi = qs[i] >> 4;
        if (q41) {
            const float pl = d * (float)lo, ph = d * (float)hi; /* exact; the sum rounds once */
            out[i] = pl + m;
            out[i + 16] = ph + m;
        } else {
            out[i] = d * (float)(lo - 8);
            out[i + 16] = d * (float)(hi - 8);
        }
    }
}

#ifdef GQ_AVX2
/* one block's 32 values as 4 vectors (values 0-7, 8-15, 16-23, 24-31), same bits as dequant_block */
static inline __attribute__((always_inline)) void dequant8x4(const uint8_t *b, int type, __m256 w[4]) {
    uint32_t dm;
    memcpy(&dm, b, 4); /* d (and Q4_1's m, or Q4_0's first nibbles: unused) */
    const __m128 s = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm));
    const __m256 d = _mm256_broadcastss_ps(s);
    if (type == GQ_Q8_0) {
        for (int i = 0; i < 4; i++) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i)));
            w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
        }
        return;
    }
    const int q41 = type == GQ_Q4_1;
    /* Q4_0: fma(d, q, -8 d) = d * (q - 8) exactly (the exact value is an fp32 number) */
    const __m256 c = q41 ? _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), _mm256_set1_epi32(1))
                         : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
    const uint8_t *qs = b + (q41 ? 4 : 2);
    /* bytes 0-7 and 8-15 widened to int32 lanes: low nibbles are values 0-15, high ones 16-31 */
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
#ifdef __AVX512VL__
    /* the block's 16 possible values (the same fma per value), picked by each lane's nibble: vpermt2ps
     * reads only the low 4 bits of an index, so the low nibbles need no mask */
    const __m256 lo = _mm256_fmadd_ps(d, _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), c);
    const __m256 hi = _mm256_fmadd_ps(d, _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), c);
    w[0] = _mm256_permutex2var_ps(lo, b0, hi);
    w[1] = _mm256_permutex2var_ps(lo, b1, hi);
    w[2] = _mm256_permutex2var_ps(lo, _mm256_srli_epi32(b0, 4), hi);
    w[3] = _mm256_permutex2var_ps(lo, _mm256_srli_epi32(b1, 4), hi);
    return;
#endif
    const __m256i mask = _mm256_set1_epi32(0x0f);
    const __m256i parts[4] = {_mm256_and_si256(b0, mask), _mm256_and_si256(b1, mask), _mm256_srli_epi32(b0, 4),
                              _mm256_srli_epi32(b1, 4)};
    for (int i = 0; i < 4; i++) w[i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(parts[i]), c);
}

#define F32_AVX2 1
#include "fp32_simd.h" /* hsum8: f32_linear's horizontal sum, so both kernels sum in one order */
#endif

/* dequantize rows [0, rows) of a weight into out [rows, K] (row stride ldo floats) */
static inline __attribute__((always_inline)) void dequant_rows(const uint8_t *w, int64_t type, int64_t rows,
                                                                int64_t K, int64_t ldw, float *out, int64_t ldo) {
    const int64_t bb = gq_block_bytes(type), nb = K / 32;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + r * ldw + b * bb;
            float *o = out + r * ldo + 32 * b;
#ifdef GQ_AVX2
            __m256 v[4];
            dequant8x4(blk, (int)type, v);
            for (int s = 0; s < 4; s++) _mm256_storeu_ps(o + 8 * s, v[s]);
#else
            dequant_block(blk, type, o);
#endif
        }
}

/* the whole weight (or any rows of it) as fp32: out [N, K] contiguous */
void gq_dequant(const uint8_t *w, int64_t type, int64_t N, int64_t K, int64_t ldw, float *out) {
    const int64_t chunk = 64;
#pragma omp parallel for schedule(static) if (N * K > 65536)
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
        const int64_t rows = N - r0 < chunk ? N - r0 : chunk;
        dequant_rows(w + r0 * ldw, type, rows, K, ldw, out + r0 * K, K);
    }
}

/* rows ids[0..n) of a weight (an embedding lookup): out [n, K] contiguous */
void gq_dequant_rows(const uint8_t *w, int64_t type, const int64_t *ids, int64_t n, int64_t K, int64_t ldw,
                     float *out) {
#pragma omp parallel for schedule(static) if (n * K > 65536)
    for (int64_t i = 0; i < n; i++) dequant_rows(w + ids[i] * ldw, type, 1, K, ldw, out + i * K, K);
}

#define NB1 8 /* weight rows per tile at M = 1 */
#define TN 12 /* weight rows dequantized per tile at M > 1 */
#define RB 2 /* x rows per microtile at M > 1 */
#define NB 6 /* weight rows per microtile at M > 1 */

/* M == 1: C <= NB1 rows of w, each block dequantized in registers and used once (always inlined
 * with a constant type: one specialized loop per type, no branch on the type inside it) */
static inline __attribute__((always_inline)) void row_tile(const float *x, const uint8_t *w, int64_t ldw,
                                                            int type, int C, int64_t K, float *y,
                                                            const float *bias) {
    const int64_t bb = gq_block_bytes(type), nb = K / 32;
#ifdef GQ_AVX2
    __m256 acc[NB1];
    for (int j = 0; j < NB1; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256 xv[4];
        for (int s = 0; s < 4; s++) xv[s] = _mm256_loadu_ps(x + 32 * b + 8 * s);
        for (int j = 0; j < NB1; j++) {
            if (j >= C) break;
            __m256 wv[4];
            dequant8x4(w + j * ldw + b * bb, type, wv);
            for (int s = 0; s < 4; s++) acc[j] = _mm256_fmadd_ps(xv[s], wv[s], acc[j]);
        }
    }
    for (int j = 0; j < C; j++) {
        const float s = hsum8(acc[j]);
        y[j] = bias ? s + bias[j] : s;
    }
#else
    for (int j = 0; j < C; j++) {
        float lane[8] = {0}, v[32];
        for (int64_t b = 0; b < nb; b++) {
            dequant_block(w + j * ldw + b * bb, type, v);
            for (int i = 0; i < 32; i++) lane[i & 7] += x[32 * b + i] * v[i];
        }
        const float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
        y[j] = bias ? s + bias[j] : s;
    }
#endif
}

/* M > 1: R <= RB rows of x times C <= NB dequantized rows (wb, row stride K) */
static inline __attribute__((always_inline)) void micro_tile(const float *x, int64_t ldx, int R, const float *wb,
                                                              int C, int64_t K, float *y, int64_t ldy,
                                                              const float *bias) {
#ifdef GQ_AVX2
    __m256 acc[RB][NB];
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < NB; j++) acc[r][j] = _mm256_setzero_ps();
    const float *wr[NB]; /* rows past C repeat row 0; their sums are dropped */
    for (int j = 0; j < NB; j++) wr[j] = wb + (j < C ? j : 0) * K;
    for (int64_t k = 0; k < K; k += 8) {
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
            const float s = hsum8(acc[r][j]);
            y[r * ldy + j] = bias ? s + bias[j] : s;
        }
#else
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) {
            float lane[8] = {0};
            for (int64_t k = 0; k < K; k++) lane[k & 7] += x[r * ldx + k] * wb[j * K + k];
            const float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
            y[r * ldy + j] = bias ? s + bias[j] : s;
        }
#endif
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ dequant(w).T (+ bias); K % 32 == 0 */
void gq_linear(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, int64_t type, int64_t N,
               int64_t ldw, const float *bias, float *y, int64_t ldy) {
    if (M == 1) {
        const int64_t tiles = (N + NB1 - 1) / NB1;
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * NB1;
            const int C = (int)(N - n0 < NB1 ? N - n0 : NB1);
            const uint8_t *wt = w + n0 * ldw;
            const float *bt = bias ? bias + n0 : NULL;
            switch (type) { /* a constant type per case: each is its own specialized loop */
            case GQ_Q4_0: row_tile(x, wt, ldw, GQ_Q4_0, C, K, y + n0, bt); break;
            case GQ_Q4_1: row_tile(x, wt, ldw, GQ_Q4_1, C, K, y + n0, bt); break;
            default: row_tile(x, wt, ldw, GQ_Q8_0, C, K, y + n0, bt); break;
            }
        }
        return;
    }
    const int64_t tiles = (N + TN - 1) / TN;
#pragma omp parallel
    {
        float *wb = aligned_alloc(64, (size_t)(TN * K * sizeof(float) + 63) & ~(size_t)63);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * TN;
            const int rows = (int)(N - n0 < TN ? N - n0 : TN);
            switch (type) {
            case GQ_Q4_0: dequant_rows(w + n0 * ldw, GQ_Q4_0, rows, K, ldw, wb, K); break;
            case GQ_Q4_1: dequant_rows(w + n0 * ldw, GQ_Q4_1, rows, K, ldw, wb, K); break;
            default: dequant_rows(w + n0 * ldw, GQ_Q8_0, rows, K, ldw, wb, K); break;
            }
            for (int64_t m0 = 0; m0 < M; m0 += RB) {
                const int R = M - m0 >= RB ? RB : (int)(M - m0);
                for (int j0 = 0; j0 < rows; j0 += NB) {
                    const int C = rows - j0 < NB ? rows - j0 : NB;
                    const float *bt = bias ? bias + n0 + j0 : NULL;
                    float *yt = y + m0 * ldy + n0 + j0;
                    if (R == RB) /* constant R: the row loop unrolls */
                        micro_tile(x + m0 * ldx, ldx, RB, wb + j0 * K, C, K, yt, ldy, bt);
                    else
                        micro_tile(x + m0 * ldx, ldx, 1, wb + j0 * K, C, K, yt, ldy, bt);
                }
            }
        }
        free(wb);
    }
}

/* gq_linear with its arguments as one int64 array, for kernel plans (engine/kernels/cpu/plan.py) */
void gq_linear_a(const int64_t *a) {
    gq_linear((const float *)(intptr_t)a[0], a[1], a[2], a[3], (const uint8_t *)(intptr_t)a[4], a[5], a[6], a[7],
              (const float *)(intptr_t)a[8], (float *)(intptr_t)a[9], a[10]);
}
