/* int8 matmuls on CPU: one call does what takes torch 10-30 dispatches per layer.
 *
 * Built at first use by engine/layers/quantization/cpu_kernels.py with `-O3 -march=native
 * -ffp-contract=off -fopenmp` and called through ctypes. Per-output-channel int8 weights, packed
 * once at load time into the layouts below, fp32 scales.
 *
 * q8_w8a8: y = x @ dequant(w).T (+ bias) with x quantized here per row and group of G channels.
 *   Each group's int32 sum is exact; the float epilogue is sum over groups, in order, of
 *   (float)acc_g * x_scale_g, then * w_scale, then + bias: what int8.py's torch path computes from
 *   torch._int_mm, so both give the same bits, and a row never depends on the rest of the batch.
 * q8_w8: weight-only (fp32 activations), for the LM head; one FMA chain per output over k in
 *   order, whatever M is, so a row does not depend on the rest of the batch either.
 *
 * Quantization of a group: amax = max|x| (at least 1e-12), inv = 127 / amax, q = round_half_even(x *
 * inv), scale = amax / 127; int8.py: quantize_groups computes the same numbers.
 *
 * On CPUs with AMX (Sapphire Rapids and later) batches of q8_amx_min_rows() rows or more run the
 * group sums on AMX tiles (tdpbssd: 16 rows x 16 outputs x 64 channels per instruction) instead of
 * VNNI vectors. The sums are the same exact integers and the float epilogue is the same code, so
 * both paths give the same bits and a row still never depends on the batch.
 */
#define _DEFAULT_SOURCE /* syscall() under -std=c11: the AMX permission request */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__linux__) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && \
    defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define Q8_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define Q8_ISA "avx512_vnni"
#define Q8_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define Q8_ISA "avx2"
#define Q8_AVX2 1
#else
#define Q8_ISA "generic"
#endif

#define Q8_EPS 1e-12f
#define NBLK 2 /* W8A8: blocks of 16 output channels per tile */
#define RB 4   /* batch rows per tile */
#define WPF 64 /* AVX2 W8A8: k steps (64-byte weight lines of each block) prefetched ahead, 4 KB. A decode step
                * streams every weight once, and the AVX2 tile's arithmetic leaves the stream's latency
                * exposed: one row 4-13% faster than without in interleaved A/B runs over 30 layers of
                * weights (16 and 32 ahead: less); 16 rows unchanged.
                * Past a block's end it fetches the next block's lines, which come next anyway. */

const char *q8_isa(void) { return Q8_ISA; }

#ifdef __AVX512F__
/* y[n .. n + 15] = acc * w_scale[n ..] (+ bias[n ..]), the lanes past N left alone: the epilogue of
 * every AVX-512 tile (W8A8 on VNNI and AMX, weight-only). */
static inline void store16_scaled(__m512 acc, const float *w_scale, const float *bias, float *y, int64_t n,
                                  int64_t N) {
    __m512 v = _mm512_mul_ps(acc, _mm512_loadu_ps(w_scale + n));
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n));
    const __mmask16 mk = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
    _mm512_mask_storeu_ps(y + n, mk, v);
}
#endif

/* ---- activation quantization: per row, per group of G channels ------------------------------ */

/* One row: q [ldq] (columns K..ldq-1 set to 0), scale [ceil(K / G)]. The AVX-512 loop computes the
 * scalar loop's numbers: the max is exact in any order, the same 127 / amax, and cvtps rounds half to
 * even like nearbyintf in the default rounding mode. */
static void quantize_row(const float *xr, int64_t K, int64_t G, int8_t *qr, int64_t ldq, float *scale) {
    const int64_t ng = (K + G - 1) / G;
    for (int64_t g = 0; g < ng; g++) {
        const int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
        float amax = 0.f;
        int64_t k = k0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        __m512 vmax = _mm512_setzero_ps();
        for (; k + 16 <= k1; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
        amax = _mm512_reduce_max_ps(vmax);
#endif
        for (; k < k1; k++) {
            const float a = fabsf(xr[k]);
            amax = a > amax ? a : amax;
        }
        amax = amax > Q8_EPS ? amax : Q8_EPS;
        const float inv = 127.f / amax;
        k = k0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        const __m512 vinv = _mm512_set1_ps(inv);
        for (; k + 16 <= k1; k += 16) {
            const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), vinv));
            _mm_storeu_si128((__m128i *)(qr + k), _mm512_cvtsepi32_epi8(qi));
        }
#endif
        for (; k < k1; k++) qr[k] = (int8_t)nearbyintf(xr[k] * inv);
        scale[g] = amax / 127.f;
    }
    for (int64_t k = K; k < ldq; k++) qr[k] = 0;
}

/* q [M, ldq] (ldq >= K; columns K..ldq-1 are set to 0), scale [M, ceil(K / G)] */
void q8_quantize(const float *x, int64_t M, int64_t K, int64_t ldx, int64_t G, int8_t *q, int64_t ldq, float *scale) {
    const int64_t ng = (K + G - 1) / G;
#pragma omp parallel for schedule(static) if (M * K >= 16384)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * ldx, K, G, q + m * ldq, ldq, scale + m * ng);
}

/* ---- W8A8 tiles: R batch rows x NBLK blocks of 16 output channels ----------------------------
 * Weights are packed [N/16][K/4][16][4]: one 64-byte vector holds 4 consecutive k of 16 outputs, so
 * a broadcast of 4 activation bytes multiplies into 16 output lanes, and each group's exact int32
 * sums come out as a vector (no horizontal sums). */

#if Q8_VNNI
typedef __m512i ivec;
typedef __m512 fvec;
/* u8 x s8 (vpdpbusd): activations shifted to u8 (q + 128); comp[g][n] = 128 * sum over group g of
 * w[n, k] is subtracted from each group's sum. */
static inline __attribute__((always_inline)) void w8a8_tile(
    const uint8_t *u, int64_t ldu, const float *xs, int64_t ng, int R, const int8_t *wp, int64_t K4, int64_t G4,
    const int32_t *comp, int64_t Np, int64_t n0, fvec out[RB][NBLK]) {
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < NBLK; j++) out[r][j] = _mm512_setzero_ps();
    for (int64_t g = 0, k0 = 0; k0 < K4; g++, k0 += G4) {
        const int64_t k1 = k0 + G4 < K4 ? k0 + G4 : K4;
        ivec acc[RB][NBLK];
        for (int r = 0; r < RB; r++)
            for (int j = 0; j < NBLK; j++) acc[r][j] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k1; k++) {
            ivec wv[NBLK];
            for (int j = 0; j < NBLK; j++) wv[j] = _mm512_loadu_si512(wp + (j * K4 + k) * 64);
            for (int r = 0; r < RB; r++) {
                if (r >= R) break;
                int32_t xb4;
                memcpy(&xb4, u + r * ldu + 4 * k, 4);
                const ivec xb = _mm512_set1_epi32(xb4);
                for (int j = 0; j < NBLK; j++) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], xb, wv[j]);
            }
        }
        for (int j = 0; j < NBLK; j++) {
            const ivec c = _mm512_loadu_si512(comp + g * Np + n0 + 16 * j);
            for (int r = 0; r < RB; r++) {
                if (r >= R) break;
                const fvec f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], c)), _mm512_set1_ps(xs[r * ng + g]));
                out[r][j] = _mm512_add_ps(out[r][j], f);
            }
        }
    }
}
#elif Q8_AVX2
/* s8 x s8 with the sign trick: maddubs(|w|, sign(x, w)) never saturates since |w|, |x| <= 127.
 * A block of 16 outputs is two 256-bit halves. */
static inline __attribute__((always_inline)) void w8a8_tile(
    const int8_t *q, int64_t ldq, const float *xs, int64_t ng, int R, const int8_t *wp, int64_t K4, int64_t G4,
    const int32_t *comp, int64_t Np, int64_t n0, __m256 out[RB][2 * NBLK]) {
    (void)comp; (void)Np; (void)n0;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < 2 * NBLK; j++) out[r][j] = _mm256_setzero_ps();
    for (int64_t g = 0, k0 = 0; k0 < K4; g++, k0 += G4) {
        const int64_t k1 = k0 + G4 < K4 ? k0 + G4 : K4;
        __m256i acc[RB][2 * NBLK];
        for (int r = 0; r < RB; r++)
            for (int j = 0; j < 2 * NBLK; j++) acc[r][j] = _mm256_setzero_si256();
        for (int64_t k = k0; k < k1; k++) {
            for (int j = 0; j < NBLK; j++) _mm_prefetch((const char *)(wp + (j * K4 + k + WPF) * 64), _MM_HINT_T0);
            __m256i wv[2 * NBLK], wa[2 * NBLK];
            for (int j = 0; j < 2 * NBLK; j++) {
                wv[j] = _mm256_loadu_si256((const __m256i *)(wp + ((j / 2) * K4 + k) * 64 + 32 * (j % 2)));
                wa[j] = _mm256_abs_epi8(wv[j]);
            }
            for (int r = 0; r < RB; r++) {
                if (r >= R) break;
                int32_t xb4;
                memcpy(&xb4, q + r * ldq + 4 * k, 4);
                const __m256i xb = _mm256_set1_epi32(xb4);
                for (int j = 0; j < 2 * NBLK; j++) {
                    const __m256i p = _mm256_maddubs_epi16(wa[j], _mm256_sign_epi8(xb, wv[j]));
                    acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for (int r = 0; r < RB; r++) {
            if (r >= R) break;
            const __m256 s = _mm256_set1_ps(xs[r * ng + g]);
            for (int j = 0; j < 2 * NBLK; j++)
                out[r][j] = _mm256_add_ps(out[r][j], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][j]), s));
        }
    }
}
#else
static inline void w8a8_tile(const int8_t *q, int64_t ldq, const float *xs, int64_t ng, int R, const int8_t *wp,
                             int64_t K4, int64_t G4, const int32_t *comp, int64_t Np, int64_t n0,
                             float out[RB][16 * NBLK]) {
    (void)comp; (void)Np; (void)n0;
    for (int r = 0; r < R; r++)
        for (int l = 0; l < 16 * NBLK; l++) out[r][l] = 0.f;
    for (int64_t g = 0, k0 = 0; k0 < K4; g++, k0 += G4) {
        const int64_t k1 = k0 + G4 < K4 ? k0 + G4 : K4;
        for (int r = 0; r < R; r++)
            for (int l = 0; l < 16 * NBLK; l++) {
                const int8_t *w = wp + (l / 16) * K4 * 64 + (l % 16) * 4;
                int32_t t = 0;
                for (int64_t k = k0; k < k1; k++)
                    for (int i = 0; i < 4; i++) t += (int32_t)q[r * ldq + 4 * k + i] * (int32_t)w[k * 64 + i];
                out[r][l] = out[r][l] + (float)t * xs[r * ng + g];
            }
    }
}
#endif

/* Output channels are padded to a multiple of 16 * NBLK in the packed weights, comp, scales and bias. */
int64_t q8_padded_n(int64_t N) { return (N + 16 * NBLK - 1) / (16 * NBLK) * (16 * NBLK); }

int q8_needs_comp(void) {
#if Q8_VNNI
    return 1;
#else
    return 0;
#endif
}

/* Calls a tile function with R as a constant, so its loops unroll and the accumulators stay in
 * registers. */
#define DISPATCH_R(call_with_r, R) \
    do {                           \
        switch (R) {               \
            case 1: call_with_r(1); break; \
            case 2: call_with_r(2); break; \
            case 3: call_with_r(3); break; \
            default: call_with_r(4); break; \
        }                          \
    } while (0)

#if Q8_AMX
/* ---- W8A8 on AMX tiles ------------------------------------------------------------------------
 * The packed weights [Np/16][K4][16][4] are already AMX's B layout: 16 k4 rows of one block are a
 * 16 x 64-byte tile. A tile of activations is 16 batch rows x 64 channels of the signed int8 q, so
 * one tdpbssd is one group's exact int32 sum for 16 rows x 16 outputs (no +128 shift, no comp).
 * Tiles: tmm0-3 sums (2 row tiles x 2 blocks), tmm4-5 activations, tmm6-7 weights. */

#define AMX_MIN_ROWS 16 /* below this the VNNI tile is faster (measured: 0.9x at 8 rows, 1.4x at 16) */

static int amx_permitted = -1; /* -1: not asked yet; Linux grants the tile state per process */
static int amx_enabled = 1;    /* q8_set_amx(0) turns AMX off (tests compare both paths) */

static int amx_usable(void) {
    if (amx_permitted < 0) /* ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18) */
        amx_permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return amx_permitted && amx_enabled;
}

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

static void amx_configure(void) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* One N tile (NBLK = 2 blocks of 16 outputs) for RT (1 or 2, a constant after inlining) row tiles of
 * the row-padded q [.., ldq]: out [32][32] floats (row r, output 16 * j + l) gets the same epilogue
 * as the VNNI tile: out = out + (float)sum_g * x_scale_g, group after group. */
static inline __attribute__((always_inline)) void amx_tile(const int RT, const int8_t *q, int64_t ldq,
                                                           const float *xs, int64_t ng, const int8_t *wt,
                                                           int64_t K4, int64_t G4, float out[32][32]) {
    int32_t sums[4][16][16]; /* [2 * row tile + block][row][output] */
    for (int r = 0; r < 16 * RT; r++)
        for (int j = 0; j < 2; j++) _mm512_storeu_ps(out[r] + 16 * j, _mm512_setzero_ps());
    for (int64_t g = 0; g < ng; g++) {
        _tile_zero(0);
        _tile_zero(1);
        if (RT == 2) {
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int64_t k = g * G4; k < (g + 1) * G4; k += 16) {
            _tile_loadd(4, q + 4 * k, ldq);
            if (RT == 2) _tile_loadd(5, q + 16 * ldq + 4 * k, ldq);
            _tile_loadd(6, wt + k * 64, 64);
            _tile_loadd(7, wt + (K4 + k) * 64, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            if (RT == 2) {
                _tile_dpbssd(2, 5, 6);
                _tile_dpbssd(3, 5, 7);
            }
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        if (RT == 2) {
            _tile_stored(2, sums[2], 64);
            _tile_stored(3, sums[3], 64);
        }
        for (int t = 0; t < RT; t++)
            for (int r = 0; r < 16; r++) {
                const __m512 s = _mm512_set1_ps(xs[(16 * t + r) * ng + g]);
                for (int j = 0; j < 2; j++) {
                    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sums[2 * t + j][r])), s);
                    float *o = out[16 * t + r] + 16 * j;
                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), f));
                }
            }
    }
}

/* q8_w8a8 on AMX tiles: q [Mp, ldq] int8 with Mp = M rounded up to 32 (zero rows), K a multiple
 * of G and G of 64. */
static void w8a8_amx(const int8_t *q, int64_t M, int64_t ldq, const float *xs, int64_t ng, const int8_t *wp,
                     int64_t K4, int64_t G4, const float *w_scale, const float *bias, float *y, int64_t N,
                     int64_t ldy, int64_t ntiles) {
#pragma omp parallel
    {
        amx_configure();
        float out[32][32];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < ntiles; t++) {
            const int64_t b0 = t * NBLK;
            const int8_t *wt = wp + b0 * K4 * 64;
            for (int64_t m0 = 0; m0 < M; m0 += 32) {
                const int R = M - m0 < 32 ? (int)(M - m0) : 32;
                if (R > 16)
                    amx_tile(2, q + m0 * ldq, ldq, xs + m0 * ng, ng, wt, K4, G4, out);
                else
                    amx_tile(1, q + m0 * ldq, ldq, xs + m0 * ng, ng, wt, K4, G4, out);
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < NBLK && (b0 + j) * 16 < N; j++)
                        store16_scaled(_mm512_loadu_ps(out[r] + 16 * j), w_scale, bias, y + (m0 + r) * ldy,
                                       (b0 + j) * 16, N);
            }
        }
        _tile_release();
    }
}
#endif

/* 1 when q8_w8a8 runs batches of q8_amx_min_rows() rows or more on AMX tiles (an AMX build, a CPU
 * and kernel that grant the tile state, not turned off by q8_set_amx(0)). */
int q8_uses_amx(void) {
#if Q8_AMX
    return amx_usable();
#else
    return 0;
#endif
}

int64_t q8_amx_min_rows(void) {
#if Q8_AMX
    return AMX_MIN_ROWS;
#else
    return 0;
#endif
}

void q8_set_amx(int on) {
#if Q8_AMX
    amx_enabled = on != 0;
#else
    (void)on;
#endif
}

/* y [M, N] (row stride ldy) = dequant(x) @ dequant(w).T (+ bias) with x [M, K] fp32 quantized here
 * per row and group of G channels (G a multiple of 4). wp: packed [Np/16][K4][16][4] int8 with
 * K4 = ceil(K / 4) and Np = q8_padded_n(N) (zero rows and columns); comp [ng][Np] int32 (VNNI
 * builds only, see q8_needs_comp); w_scale and bias (or NULL) padded to Np. Per output: sum over groups, in order, of (float)(int32 sum) * x_scale,
 * then * w_scale, then + bias. */
void q8_w8a8(const float *x, int64_t M, int64_t K, int64_t ldx, int64_t G, const int8_t *wp, const int32_t *comp,
             const float *w_scale, const float *bias, float *y, int64_t N, int64_t ldy) {
    const int64_t K4 = (K + 3) / 4, G4 = G / 4, ng = (K + G - 1) / G;
    const int64_t Np = q8_padded_n(N), Nb = Np / 16, ldq = 4 * K4;
    const int64_t ntiles = Nb / NBLK;
#if Q8_AMX
    if (M >= AMX_MIN_ROWS && G % 64 == 0 && K % G == 0 && amx_usable()) {
        const int64_t Mp = (M + 31) / 32 * 32; /* whole row tiles: the padding rows are zeros */
        int8_t *q = (int8_t *)calloc((size_t)(Mp * ldq), 1);
        float *xs = (float *)calloc((size_t)(Mp * ng), sizeof(float));
        q8_quantize(x, M, K, ldx, G, q, ldq, xs);
        w8a8_amx(q, M, ldq, xs, ng, wp, K4, G4, w_scale, bias, y, N, ldy, ntiles);
        free(q);
        free(xs);
        return;
    }
#endif
    int8_t *q = (int8_t *)malloc((size_t)(M * ldq) + 64);
    float *xs = (float *)malloc((size_t)(M * ng) * sizeof(float));
    q8_quantize(x, M, K, ldx, G, q, ldq, xs);
#if Q8_VNNI
    uint8_t *a = (uint8_t *)q;
    for (int64_t i = 0; i < M * ldq; i++) a[i] = (uint8_t)(q[i] ^ 0x80); /* q + 128 */
#else
    const int8_t *a = q;
#endif
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < ntiles; t++) {
        const int64_t b0 = t * NBLK;
        const int nb = NBLK;
        const int8_t *wt = wp + b0 * K4 * 64;
        for (int64_t m0 = 0; m0 < M; m0 += RB) {
            const int R = M - m0 < RB ? (int)(M - m0) : RB;
            const uint8_t *at = (const uint8_t *)a + m0 * ldq;
            const float *xst = xs + m0 * ng;
#if Q8_VNNI
            fvec out[RB][NBLK];
#define CALL(RR) w8a8_tile(at, ldq, xst, ng, RR, wt, K4, G4, comp, Np, b0 * 16, out)
            DISPATCH_R(CALL, R);
#undef CALL
            for (int r = 0; r < R; r++)
                for (int j = 0; j < nb && (b0 + j) * 16 < N; j++)
                    store16_scaled(out[r][j], w_scale, bias, y + (m0 + r) * ldy, (b0 + j) * 16, N);
#elif Q8_AVX2
            __m256 out[RB][2 * NBLK];
#define CALL(RR) w8a8_tile((const int8_t *)at, ldq, xst, ng, RR, wt, K4, G4, comp, Np, b0 * 16, out)
            DISPATCH_R(CALL, R);
#undef CALL
            for (int r = 0; r < R; r++)
                for (int j = 0; j < 2 * nb; j++) {
                    const int64_t n = b0 * 16 + 8 * j;
                    if (n >= N) break;
                    __m256 v = _mm256_mul_ps(out[r][j], _mm256_loadu_ps(w_scale + n));
                    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
                    float tmp[8];
                    _mm256_storeu_ps(tmp, v);
                    for (int l = 0; l < 8 && n + l < N; l++) y[(m0 + r) * ldy + n + l] = tmp[l];
                }
#else
            float out[RB][16 * NBLK];
            w8a8_tile((const int8_t *)at, ldq, xst, ng, R, wt, K4, G4, comp, Np, b0 * 16, out);
            for (int r = 0; r < R; r++)
                for (int l = 0; l < 16 * nb; l++) {
                    const int64_t n = b0 * 16 + l;
                    if (n >= N) break;
                    float v = out[r][l] * w_scale[n];
                    if (bias) v = v + bias[n];
                    y[(m0 + r) * ldy + n] = v;
                }
#endif
        }
    }
    free(q);
    free(xs);
}

/* ---- weight-only int8 (fp32 activations) ------------------------------------------------------
 * Weights packed [Np/16][K][16]: the 16 bytes at [b][k] are w[16b .. 16b + 15][k]. Each output lane
 * accumulates x[k] * w[n][k] over k in order in one FMA chain, whatever the batch size, so a row's
 * result does not depend on the other rows. */

#define WB 4 /* weight-only: blocks of 16 output channels per tile (the packing pads N to 16 * WB) */

int64_t q8_w8_padded_n(int64_t N) { return (N + 16 * WB - 1) / (16 * WB) * (16 * WB); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static inline __attribute__((always_inline)) void w8_tile(const float *x, int64_t ldx, int R, const int8_t *wp,
                                                          int64_t K, __m512 out[RB][WB]) {
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < WB; j++) out[r][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 wv[WB];
        for (int j = 0; j < WB; j++)
            wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wp + (j * K + k) * 16))));
        for (int r = 0; r < RB; r++) {
            if (r >= R) break;
            const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
            for (int j = 0; j < WB; j++) out[r][j] = _mm512_fmadd_ps(wv[j], xb, out[r][j]);
        }
    }
}

static void w8_store(__m512 out[RB][WB], int R, const float *w_scale, const float *bias, float *y, int64_t ldy,
                     int64_t n0, int64_t N) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < WB && n0 + 16 * j < N; j++)
            store16_scaled(out[r][j], w_scale, bias, y + r * ldy, n0 + 16 * j, N);
}
#define W8_OUT __m512 out[RB][WB]
#elif defined(__AVX2__) && defined(__FMA__)
/* 16 registers: one block (two 8-lane halves) per tile step, the WB blocks one after the other */
static inline __attribute__((always_inline)) void w8_tile(const float *x, int64_t ldx, int R, const int8_t *wp,
                                                          int64_t K, __m256 out[RB][2 * WB]) {
    for (int j = 0; j < WB; j++) {
        __m256 acc[RB][2];
        for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k++) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(wp + (j * K + k) * 16));
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
            for (int r = 0; r < RB; r++) {
                if (r >= R) break;
                const __m256 xb = _mm256_set1_ps(x[r * ldx + k]);
                acc[r][0] = _mm256_fmadd_ps(w0, xb, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w1, xb, acc[r][1]);
            }
        }
        for (int r = 0; r < RB; r++) {
            out[r][2 * j] = acc[r][0];
            out[r][2 * j + 1] = acc[r][1];
        }
    }
}

static void w8_store(__m256 out[RB][2 * WB], int R, const float *w_scale, const float *bias, float *y, int64_t ldy,
                     int64_t n0, int64_t N) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 2 * WB; j++) {
            const int64_t n = n0 + 8 * j;
            if (n >= N) break;
            __m256 v = _mm256_mul_ps(out[r][j], _mm256_loadu_ps(w_scale + n));
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
            float tmp[8];
            _mm256_storeu_ps(tmp, v);
            for (int l = 0; l < 8 && n + l < N; l++) y[r * ldy + n + l] = tmp[l];
        }
}
#define W8_OUT __m256 out[RB][2 * WB]
#else
static inline void w8_tile(const float *x, int64_t ldx, int R, const int8_t *wp, int64_t K, float out[RB][16 * WB]) {
    for (int r = 0; r < R; r++)
        for (int l = 0; l < 16 * WB; l++) {
            float t = 0.f;
            for (int64_t k = 0; k < K; k++) t = t + x[r * ldx + k] * (float)wp[((l / 16) * K + k) * 16 + l % 16];
            out[r][l] = t;
        }
}

static void w8_store(float out[RB][16 * WB], int R, const float *w_scale, const float *bias, float *y, int64_t ldy,
                     int64_t n0, int64_t N) {
    for (int r = 0; r < R; r++)
        for (int l = 0; l < 16 * WB && n0 + l < N; l++) {
            float v = out[r][l] * w_scale[n0 + l];
            if (bias) v = v + bias[n0 + l];
            y[r * ldy + n0 + l] = v;
        }
}
#define W8_OUT float out[RB][16 * WB]
#endif

/* Batch rows are taken MT at a time (a block of x stays in cache while the weights stream by). */
#define MT 64

/* y [M, N] = x @ (w * w_scale[:, None]).T (+ bias), x [M, K] fp32; wp packed [Np/16][K][16] with
 * Np = q8_w8_padded_n(N); w_scale and bias (or NULL) padded to Np. */
void q8_w8(const float *x, int64_t M, int64_t K, int64_t ldx, const int8_t *wp, const float *w_scale,
           const float *bias, float *y, int64_t N, int64_t ldy) {
    const int64_t ntiles = q8_w8_padded_n(N) / (16 * WB);
    for (int64_t mb = 0; mb < M; mb += MT) {
        const int64_t me = M - mb < MT ? M : mb + MT;
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < ntiles; t++) {
            const int64_t n0 = t * 16 * WB;
            const int8_t *wt = wp + n0 * K;
            for (int64_t m0 = mb; m0 < me; m0 += RB) {
                const int R = me - m0 < RB ? (int)(me - m0) : RB;
                W8_OUT;
#define CALL(RR) w8_tile(x + m0 * ldx, ldx, RR, wt, K, out)
                DISPATCH_R(CALL, R);
#undef CALL
                w8_store(out, R, w_scale, bias, y + m0 * ldy, ldy, n0, N);
            }
        }
    }
}

/* q8_w8a8 with its arguments as one int64 array, for kernel plans (engine/kernels/cpu/plan.py). */
void q8_w8a8_a(const int64_t *a) {
    q8_w8a8((const float *)(intptr_t)a[0], a[1], a[2], a[3], a[4], (const int8_t *)(intptr_t)a[5],
            (const int32_t *)(intptr_t)a[6], (const float *)(intptr_t)a[7], (const float *)(intptr_t)a[8],
            (float *)(intptr_t)a[9], a[10], a[11]);
}
