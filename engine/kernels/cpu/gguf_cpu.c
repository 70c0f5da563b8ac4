/* fp32 activations times GGUF weight blocks, dequantized in registers.
 *
 * A weight is [N, K] in the GGUF block layout, row after row (row stride ldw bytes), each row K/32
 * blocks of 32 values along K, or K/256 k-quant super-blocks of eight 32-value sub-blocks:
 *   Q4_0 (18 bytes): fp16 d, 16 bytes of nibbles;                 w = d * (q - 8)
 *   Q4_1 (20 bytes): fp16 d, fp16 m, 16 nibbles;                   w = d * q + m
 *   Q5_0 (22 bytes): fp16 d, 4 bytes of fifth bits, 16 nibbles;    w = d * (q - 16)
 *   Q5_1 (24 bytes): fp16 d, fp16 m, fifth bits, nibbles;          w = d * q + m
 *   Q8_0 (34 bytes): fp16 d, 32 int8;                              w = d * q
 *   Q4_K (144 bytes / 256): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles;
 *                                                                  w = (d * sc_j) * q - dmin * m_j
 *   Q5_K (176 bytes / 256): as Q4_K with 32 bytes of fifth bits before the nibbles
 *   Q6_K (210 bytes / 256): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one
 *                           per 16 values), fp16 d;                w = (d * sc) * (q - 32)
 * In the 32-value types byte j of the nibbles holds value j (low) and value j + 16 (high); the
 * k-quants' orders are in sub_q (the gguf package's numpy dequantization is the reference).
 *
 * Exactness: every value is rebuilt with the bits the gguf package's numpy dequantization gives
 * (each product of scales and integers is exact in fp32, at most 11 + 7 + 6 significant bits, so a
 * value with an offset, fma(a, q, c), rounds once, as numpy's a * q + c does). The products are then
 * summed exactly as f32_linear in fp32_cpu.c sums them (8 lane-wise FMA chains over k in order, the
 * same horizontal sum), so a row's result has the same bits as f32_linear on the dequantized
 * weight, at every batch size.
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

enum { GQ_Q4_0 = 2, GQ_Q4_1 = 3, GQ_Q5_0 = 6, GQ_Q5_1 = 7, GQ_Q8_0 = 8, GQ_Q4_K = 12, GQ_Q5_K = 13, GQ_Q6_K = 14 };

const char *gq_isa(void) { return GQ_ISA; }

/* bytes per block, 0 for a type this file does not know */
int64_t gq_block_bytes(int64_t type) {
    switch (type) {
    case GQ_Q4_0: return 18;
    case GQ_Q4_1: return 20;
    case GQ_Q5_0: return 22;
    case GQ_Q5_1: return 24;
    case GQ_Q8_0: return 34;
    case GQ_Q4_K: return 144;
    case GQ_Q5_K: return 176;
    case GQ_Q6_K: return 210;
    default: return 0;
    }
}

/* 32-value sub-blocks per block: 8 in a k-quant super-block of 256 values, else 1 */
static inline int64_t subs_per_block(int64_t type) { return type >= GQ_Q4_K ? 8 : 1; }

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

/* Q4_K / Q5_K: sub-block j's 6-bit scale and min from the 12 packed bytes s */
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* The per-sub-block constants of a value w = a * q + c (q the stored integer, as a float): every
 * type's value is one fma of exact products, so it rounds once, as the gguf package's numpy does.
 * Q6_K has two scales per sub-block (one per 16 values): a2 is the second half's. */
struct sub_consts { float a, a2, c; };

static inline __attribute__((always_inline)) struct sub_consts sub_consts(const uint8_t *b, int type, int j) {
    struct sub_consts k = {0, 0, 0};
    if (type == GQ_Q6_K) {
        const float d = half_to_float(b + 208);
        k.a = d * (float)(int8_t)b[192 + 2 * j];
        k.a2 = d * (float)(int8_t)b[193 + 2 * j];
        k.c = -32.0f; /* applied to q before the scale: (q - 32) * a, exact */
        return k;
    }
    if (type == GQ_Q4_K || type == GQ_Q5_K) {
        int sc, mn;
        k_scale_min(b + 4, j, &sc, &mn);
        k.a = half_to_float(b) * (float)sc;
        k.c = -(half_to_float(b + 2) * (float)mn);
        return k;
    }
    k.a = half_to_float(b);
    if (type == GQ_Q4_1 || type == GQ_Q5_1) k.c = half_to_float(b + 2);
    else if (type == GQ_Q4_0) k.c = -8.0f * k.a; /* fma(d, q, -8d) = d (q - 8) exactly */
    else if (type == GQ_Q5_0) k.c = -16.0f * k.a;
    return k;
}

/* k-quants: sub_consts of all 8 sub-blocks of super-block b, the two fp16 scales converted once */
static inline __attribute__((always_inline)) void super_consts(const uint8_t *b, int type, struct sub_consts k[8]) {
    if (type == GQ_Q6_K) {
        const float d = half_to_float(b + 208);
        for (int j = 0; j < 8; j++) {
            k[j].a = d * (float)(int8_t)b[192 + 2 * j];
            k[j].a2 = d * (float)(int8_t)b[193 + 2 * j];
            k[j].c = -32.0f;
        }
        return;
    }
    const float d = half_to_float(b), dmin = half_to_float(b + 2);
    for (int j = 0; j < 8; j++) {
        int sc, mn;
        k_scale_min(b + 4, j, &sc, &mn);
        k[j].a = d * (float)sc;
        k[j].a2 = 0;
        k[j].c = -(dmin * (float)mn);
    }
}

/* the stored integer of value i (0..31) of sub-block j (scalar; Q8_0 and Q6_K signed before c) */
static inline int sub_q(const uint8_t *b, int type, int j, int i) {
    switch (type) {
    case GQ_Q8_0: return (int8_t)b[2 + i];
    case GQ_Q4_0: return i < 16 ? b[2 + i] & 15 : b[2 + i - 16] >> 4;
    case GQ_Q4_1: return i < 16 ? b[4 + i] & 15 : b[4 + i - 16] >> 4;
    case GQ_Q5_0:
    case GQ_Q5_1: {
        const int at = type == GQ_Q5_0 ? 2 : 4;
        const int lo = i < 16 ? b[at + 4 + i] & 15 : b[at + 4 + i - 16] >> 4;
        return lo | (((b[at + i / 8] >> (i % 8)) & 1) << 4);
    }
    case GQ_Q4_K: return (b[16 + 32 * (j / 2) + i] >> (4 * (j % 2))) & 15;
    case GQ_Q5_K: return ((b[48 + 32 * (j / 2) + i] >> (4 * (j % 2))) & 15) | (((b[16 + i] >> j) & 1) << 4);
    default: { /* Q6_K: value 128 h + 32 s + i of the super-block, j = 4 h + s */
        const int h = j / 4, s = j % 4;
        const int lo = (b[64 * h + 32 * (s % 2) + i] >> (4 * (s / 2))) & 15;
        return lo | (((b[128 + 32 * h + i] >> (2 * s)) & 3) << 4);
    }
    }
}

/* sub-block j of block b: 32 values, scalar (the reference for the vector path, and the generic build) */
static void dequant_sub(const uint8_t *b, int type, int j, float *out) {
    const struct sub_consts k = sub_consts(b, type, j);
    for (int i = 0; i < 32; i++) {
        const int q = sub_q(b, type, j, i);
        if (type == GQ_Q8_0) out[i] = k.a * (float)q;
        else if (type == GQ_Q6_K) out[i] = (i < 16 ? k.a : k.a2) * (float)(q - 32);
        else out[i] = k.a * (float)q + k.c; /* an exact product: the sum rounds once, as an fma would */
    }
}

#ifdef GQ_AVX2
/* 8 bytes at p widened to int32 lanes */
static inline __m256i widen8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

/* 16 bytes at p as two vectors of int32 lanes: byte l in the low 8 bits of lane l of lo (bytes 0-7)
 * and of hi (bytes 8-15); the bits above are not cleared (the table lookup reads only the low 4).
 * One broadcast load into both 128-bit lanes and two vpshufb, so nothing widens on the shuffle
 * port alone (vpmovzxbd). */
static inline __attribute__((always_inline)) void spread16(const uint8_t *p, __m256i *lo, __m256i *hi) {
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    const __m256i lo8 = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                         4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    /* bytes 8-15: -1 + 8 = 7 keeps bit 7 clear, a real byte, harmless above bit 3 */
    *lo = _mm256_shuffle_epi8(bytes, lo8);
    *hi = _mm256_shuffle_epi8(bytes, _mm256_add_epi8(lo8, _mm256_set1_epi8(8)));
}

/* Q4_0 / Q4_1 nibbles as 4 vectors whose lanes' low 4 bits are values 0-7, 8-15, 16-23, 24-31: the
 * low nibbles of the 16 bytes, then the same lanes shifted right by 4 */
static inline __attribute__((always_inline)) void nibbles4(const uint8_t *qs, __m256i q[4]) {
    spread16(qs, &q[0], &q[1]);
    q[2] = _mm256_srli_epi32(q[0], 4);
    q[3] = _mm256_srli_epi32(q[1], 4);
}

/* Q4_K: value i of a sub-block is the low (shift 0) or high (shift 4) nibble of byte i of 32 */
static inline __attribute__((always_inline)) void nibbles4_k(const uint8_t *qs, int shift, __m256i q[4]) {
    spread16(qs, &q[0], &q[1]);
    spread16(qs + 16, &q[2], &q[3]);
    if (shift)
        for (int i = 0; i < 4; i++) q[i] = _mm256_srli_epi32(q[i], 4);
}

/* 4-bit values w = fma(a, q, c) from q's low 4 bits: with AVX-512VL a lookup in the 16 possible values
 * (each the same fma), else a conversion and the fma */
static inline __attribute__((always_inline)) void lookup4(__m256 a, __m256 c, const __m256i q[4], __m256 w[4]) {
#ifdef __AVX512VL__
    const __m256 lo = _mm256_fmadd_ps(a, _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), c);
    const __m256 hi = _mm256_fmadd_ps(a, _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), c);
    for (int i = 0; i < 4; i++) w[i] = _mm256_permutex2var_ps(lo, q[i], hi);
#else
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_and_si256(q[i], _mm256_set1_epi32(15))), c);
#endif
}

/* Q4_0 / Q4_1: the block's scale a and offset c broadcast, from one 4-byte load and one conversion
 * (for Q4_0 the upper half of the load is nibbles, unused) */
static inline __attribute__((always_inline)) void q4_consts(const uint8_t *b, int type, __m256 *a, __m256 *c) {
#ifdef __AVX512FP16__ /* one conversion from a broadcast load each */
    __asm__("vcvtph2psx %1%{1to8%}, %0" : "=v"(*a) : "m"(*(const uint16_t *)b));
    if (type == GQ_Q4_1) __asm__("vcvtph2psx %1%{1to8%}, %0" : "=v"(*c) : "m"(*(const uint16_t *)(b + 2)));
    else *c = *a;
#else
    int32_t hdr;
    memcpy(&hdr, b, 4);
    const __m256 dm = _mm256_cvtph_ps(_mm_set1_epi32(hdr)); /* d, m, d, m, ... */
    *a = _mm256_moveldup_ps(dm);
    *c = _mm256_movehdup_ps(dm);
#endif
}

/* the other types' sub-block j of block b as 4 vectors, given its constants k */
static inline __attribute__((always_inline)) void dequant8x4_k(const uint8_t *b, int type, int j, struct sub_consts k,
                                                                __m256 w[4]) {
    const __m256i m4 = _mm256_set1_epi32(15);
    const __m256 a = _mm256_set1_ps(k.a), c = _mm256_set1_ps(k.c);
    if (type == GQ_Q8_0) {
        for (int i = 0; i < 4; i++)
            w[i] = _mm256_mul_ps(a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                        _mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i)))));
        return;
    }
    __m256i q[4];
    if (type == GQ_Q5_0 || type == GQ_Q5_1) {
        const uint8_t *qs = b + (type == GQ_Q5_0 ? 6 : 8);
        const __m256i b0 = widen8(qs), b1 = widen8(qs + 8); /* low nibbles: values 0-15, high: 16-31 */
        q[0] = b0, q[1] = b1, q[2] = _mm256_srli_epi32(b0, 4), q[3] = _mm256_srli_epi32(b1, 4);
        uint32_t qh;
        memcpy(&qh, b + (type == GQ_Q5_0 ? 2 : 4), 4);
        const __m256i h = _mm256_set1_epi32((int)qh), one = _mm256_set1_epi32(1);
        for (int i = 0; i < 4; i++) {
            const __m256i bit = _mm256_and_si256(
                _mm256_srlv_epi32(h, _mm256_setr_epi32(8 * i, 8 * i + 1, 8 * i + 2, 8 * i + 3, 8 * i + 4, 8 * i + 5,
                                                       8 * i + 6, 8 * i + 7)), one);
            q[i] = _mm256_or_si256(_mm256_and_si256(q[i], m4), _mm256_slli_epi32(bit, 4));
        }
    } else if (type == GQ_Q4_K) {
        nibbles4_k(b + 16 + 32 * (j / 2), 4 * (j % 2), q);
        lookup4(a, c, q, w);
        return;
    } else if (type == GQ_Q5_K) {
        const uint8_t *qs = b + 48 + 32 * (j / 2);
        const int shift = 4 * (j % 2);
        for (int i = 0; i < 4; i++) q[i] = _mm256_and_si256(_mm256_srli_epi32(widen8(qs + 8 * i), shift), m4);
        for (int i = 0; i < 4; i++) {
            const __m256i bit = _mm256_and_si256(_mm256_srli_epi32(widen8(b + 16 + 8 * i), j), _mm256_set1_epi32(1));
            q[i] = _mm256_or_si256(q[i], _mm256_slli_epi32(bit, 4));
        }
    } else { /* Q6_K */
        const int h = j / 4, s = j % 4;
        const uint8_t *ql = b + 64 * h + 32 * (s % 2), *qh = b + 128 + 32 * h;
        const __m256 a2 = _mm256_set1_ps(k.a2);
        for (int i = 0; i < 4; i++) {
            const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(widen8(ql + 8 * i), 4 * (s / 2)), m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(widen8(qh + 8 * i), 2 * s), _mm256_set1_epi32(3));
            const __m256i v = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
            w[i] = _mm256_mul_ps(i < 2 ? a : a2, _mm256_cvtepi32_ps(v));
        }
        return;
    }
    for (int i = 0; i < 4; i++) w[i] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(q[i]), c);
}

/* sub-block j of block b as 4 vectors (values 0-7, 8-15, 16-23, 24-31), same bits as dequant_sub */
static inline __attribute__((always_inline)) void dequant8x4(const uint8_t *b, int type, int j, __m256 w[4]) {
    if (type == GQ_Q4_0 || type == GQ_Q4_1) {
        __m256 a, c;
        __m256i q[4];
        q4_consts(b, type, &a, &c);
        nibbles4(b + (type == GQ_Q4_0 ? 2 : 4), q);
        if (type == GQ_Q4_1) {
            lookup4(a, c, q, w);
            return;
        }
#ifdef __AVX512VL__ /* Q4_0: d (q - 8) is exact, so a product gives the fma's bits (numpy multiplies too) */
        const __m256 i0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 lo = _mm256_mul_ps(a, _mm256_sub_ps(i0, _mm256_set1_ps(8))), hi = _mm256_mul_ps(a, i0);
        for (int i = 0; i < 4; i++) w[i] = _mm256_permutex2var_ps(lo, q[i], hi);
#else
        lookup4(a, _mm256_mul_ps(a, _mm256_set1_ps(-8.0f)), q, w);
#endif
        return;
    }
    dequant8x4_k(b, type, j, sub_consts(b, type, j), w);
}

#define F32_AVX2 1
#include "fp32_simd.h" /* hsum8: f32_linear's horizontal sum, so both kernels sum in one order */
#endif

/* CALL(T) with T a constant per case: each case is its own specialized (always inlined) loop */
#define GQ_DISPATCH(type, CALL)                                                                        \
    switch (type) {                                                                                    \
    case GQ_Q4_0: CALL(GQ_Q4_0); break;                                                                \
    case GQ_Q4_1: CALL(GQ_Q4_1); break;                                                                \
    case GQ_Q5_0: CALL(GQ_Q5_0); break;                                                                \
    case GQ_Q5_1: CALL(GQ_Q5_1); break;                                                                \
    case GQ_Q4_K: CALL(GQ_Q4_K); break;                                                                \
    case GQ_Q5_K: CALL(GQ_Q5_K); break;                                                                \
    case GQ_Q6_K: CALL(GQ_Q6_K); break;                                                                \
    default: CALL(GQ_Q8_0); break;                                                                     \
    }

/* dequantize rows [0, rows) of a weight into out [rows, K] (row stride ldo floats); with paired
 * (AVX2 builds only, a constant after inlining) into the row-pair layout of the AVX-512 batched
 * tiles instead: [rows / 2][K / 8][2][8], 8 values of a row then the same 8 of the next */
static inline __attribute__((always_inline)) void dequant_rows(const uint8_t *w, int64_t type, int64_t rows,
                                                                int64_t K, int64_t ldw, float *out, int64_t ldo,
                                                                const int paired) {
    const int64_t bb = gq_block_bytes(type), spb = subs_per_block(type);
    for (int64_t r = 0; r < rows; r++) {
        float *row = paired ? out + r / 2 * 2 * K + r % 2 * 8 : out + r * ldo;
        for (int64_t c = 0; c < K / (32 * spb); c++) {
            const uint8_t *blk = w + r * ldw + c * bb;
#ifdef GQ_AVX2
            /* vector i of the row (values 8i..8i+7) goes to row + vs * i */
            const int64_t vs = paired ? 16 : 8, i0 = 4 * spb * c;
            __m256 v[4];
            for (int64_t l = 0; l < bb; l += 64) /* the next tile */
                _mm_prefetch((const char *)(blk + rows * ldw + l), _MM_HINT_T0);
            if (spb == 1) {
                dequant8x4(blk, (int)type, 0, v);
                for (int s = 0; s < 4; s++) _mm256_storeu_ps(row + vs * (i0 + s), v[s]);
            } else { /* a k-quant super-block: its constants converted once */
                struct sub_consts k[8];
                super_consts(blk, (int)type, k);
                for (int j = 0; j < 8; j++) {
                    dequant8x4_k(blk, (int)type, j, k[j], v);
                    for (int s = 0; s < 4; s++) _mm256_storeu_ps(row + vs * (i0 + 4 * j + s), v[s]);
                }
            }
#else
            (void)paired;
            for (int j = 0; j < spb; j++) dequant_sub(blk, (int)type, j, row + 32 * spb * c + 32 * j);
#endif
        }
    }
}

/* the whole weight (or any rows of it) as fp32: out [N, K] contiguous */
void gq_dequant(const uint8_t *w, int64_t type, int64_t N, int64_t K, int64_t ldw, float *out) {
    const int64_t chunk = 64;
#pragma omp parallel for schedule(static) if (N * K > 65536)
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
        const int64_t rows = N - r0 < chunk ? N - r0 : chunk;
#define GQ_SLAB(T) dequant_rows(w + r0 * ldw, T, rows, K, ldw, out + r0 * K, K, 0)
        GQ_DISPATCH(type, GQ_SLAB);
    }
}

/* rows ids[0..n) of a weight (an embedding lookup): out [n, K] contiguous */
void gq_dequant_rows(const uint8_t *w, int64_t type, const int64_t *ids, int64_t n, int64_t K, int64_t ldw,
                     float *out) {
#pragma omp parallel for schedule(static) if (n * K > 65536)
    for (int64_t i = 0; i < n; i++) dequant_rows(w + ids[i] * ldw, type, 1, K, ldw, out + i * K, K, 0);
}

#define NB1 8 /* weight rows per tile at M = 1 */
#define TN 12 /* weight rows dequantized per tile at M > 1 */
#define RB 2 /* x rows per microtile at M > 1 */
#define NB 6 /* weight rows per microtile at M > 1 */

#ifdef GQ_AVX2
/* row_tile for the k-quants: super-block by super-block, each row's 8 sub-block constants converted
 * once (not once per sub-block); every row still sums its products in k order */
static inline __attribute__((always_inline)) void row_tile_k(const float *x, const uint8_t *w, int64_t ldw,
                                                              int type, int C, int64_t K, __m256 acc[NB1]) {
    const int64_t bb = gq_block_bytes(type);
    for (int64_t sb = 0; sb < K / 256; sb++)
        for (int j = 0; j < NB1; j++) {
            if (j >= C) break;
            const uint8_t *blk = w + j * ldw + sb * bb;
            for (int64_t l = 0; l < bb; l += 64) _mm_prefetch((const char *)(blk + NB1 * ldw + l), _MM_HINT_T0);
            struct sub_consts k[8];
            super_consts(blk, type, k);
            for (int s = 0; s < 8; s++) {
                __m256 wv[4];
                dequant8x4_k(blk, type, s, k[s], wv);
                for (int i = 0; i < 4; i++)
                    acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 256 * sb + 32 * s + 8 * i), wv[i], acc[j]);
            }
        }
}
#endif

/* M == 1: C <= NB1 rows of w, each block dequantized in registers and used once (always inlined
 * with a constant type: one specialized loop per type, no branch on the type inside it) */
static inline __attribute__((always_inline)) void row_tile(const float *x, const uint8_t *w, int64_t ldw,
                                                            int type, int C, int64_t K, float *y,
                                                            const float *bias) {
    const int64_t bb = gq_block_bytes(type), nc = K / 32;
#ifdef GQ_AVX2
    __m256 acc[NB1];
    for (int j = 0; j < NB1; j++) acc[j] = _mm256_setzero_ps();
    if (type >= GQ_Q4_K) {
        row_tile_k(x, w, ldw, type, C, K, acc);
    } else {
        for (int64_t c = 0; c < nc; c++) {
            __m256 xv[4];
            for (int s = 0; s < 4; s++) xv[s] = _mm256_loadu_ps(x + 32 * c + 8 * s);
            const uint8_t *blk = w + c * bb;
            for (int j = 0; j < NB1; j++) {
                if (j >= C) break;
                /* the same block of the next tile's row: hardware prefetch alone does not keep 8
                 * interleaved streams ahead of the arithmetic (5 of 11 GB/s from DRAM without this) */
                _mm_prefetch((const char *)(blk + (j + NB1) * ldw), _MM_HINT_T0);
                __m256 wv[4];
                dequant8x4(blk + j * ldw, type, 0, wv);
                for (int s = 0; s < 4; s++) acc[j] = _mm256_fmadd_ps(xv[s], wv[s], acc[j]);
            }
        }
    }
    for (int j = 0; j < C; j++) {
        const float s = hsum8(acc[j]);
        y[j] = bias ? s + bias[j] : s;
    }
#else
    const int64_t spb = subs_per_block(type);
    for (int j = 0; j < C; j++) {
        float lane[8] = {0}, v[32];
        for (int64_t c = 0; c < nc; c++) {
            dequant_sub(w + j * ldw + c / spb * bb, type, (int)(c % spb), v);
            for (int i = 0; i < 32; i++) lane[i & 7] += x[32 * c + i] * v[i];
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

#if defined(GQ_AVX2) && defined(__AVX512F__)
/* AVX-512 at M > 1: the tile's rows dequantized in pairs, 8 values of one row then the same 8 of the
 * next ([pair][k / 8][2][8]), so one 16-lane vector holds both rows' 8 lanes and x[k..k+8) is loaded
 * into both halves. Each half then runs f32_linear's 8 lane-wise chains over k for its row, as the
 * 8-lane micro_tile does: the same bits at twice the width. */
#define ZR 4 /* x rows per microtile */
#define ZP 3 /* row pairs per microtile (6 weight rows) */

static inline __attribute__((always_inline)) void dequant_pairs(const uint8_t *w, int type, int rows, int64_t K,
                                                                 int64_t ldw, float *out) {
    dequant_rows(w, type, rows, K, ldw, out, 0, 1);
    if (rows % 2) /* the last pair's second row: zeros (its sums are dropped) */
        for (int64_t k8 = 0; k8 < K / 8; k8++) memset(out + (int64_t)(rows / 2) * 2 * K + k8 * 16 + 8, 0, 32);
}

static inline __attribute__((always_inline)) void micro_tile_z(const float *x, int64_t ldx, int R, const float *wp,
                                                                int P, int C, int64_t K, float *y, int64_t ldy,
                                                                const float *bias) {
    __m512 acc[ZR][ZP];
    for (int r = 0; r < ZR; r++)
        for (int p = 0; p < ZP; p++) acc[r][p] = _mm512_setzero_ps();
    for (int64_t k8 = 0; k8 < K / 8; k8++) {
        __m512 wv[ZP];
        for (int p = 0; p < P; p++) wv[p] = _mm512_loadu_ps(wp + p * 2 * K + k8 * 16);
        for (int r = 0; r < R; r++) {
            const __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + r * ldx + 8 * k8));
            for (int p = 0; p < P; p++) acc[r][p] = _mm512_fmadd_ps(xv, wv[p], acc[r][p]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < C; j++) {
            const __m512 a = acc[r][j / 2];
            const __m256 half = j % 2 ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))
                                      : _mm512_castps512_ps256(a);
            const float s = hsum8(half);
            y[r * ldy + j] = bias ? s + bias[j] : s;
        }
}

/* the x rows over one dequantized tile of row pairs (rows weight rows, C <= 2 ZP per microtile) */
static inline __attribute__((always_inline)) void pair_tiles(const float *x, int64_t M, int64_t ldx, const float *wb,
                                                              int rows, int64_t K, float *y, int64_t ldy,
                                                              const float *bias) {
    for (int64_t m0 = 0; m0 < M; m0 += ZR) {
        const int R = M - m0 >= ZR ? ZR : (int)(M - m0);
        for (int j0 = 0; j0 < rows; j0 += 2 * ZP) {
            const int C = rows - j0 < 2 * ZP ? rows - j0 : 2 * ZP, P = (C + 1) / 2;
            const float *bt = bias ? bias + j0 : NULL, *xt = x + m0 * ldx, *wt = wb + (int64_t)j0 * K;
            float *yt = y + m0 * ldy + j0;
            if (R == ZR && P == ZP) /* constant R and P: the loops unroll, acc stays in registers */
                micro_tile_z(xt, ldx, ZR, wt, ZP, C, K, yt, ldy, bt);
            else if (R == ZR)
                micro_tile_z(xt, ldx, ZR, wt, P, C, K, yt, ldy, bt);
            else
                micro_tile_z(xt, ldx, R, wt, P, C, K, yt, ldy, bt);
        }
    }
}
#define GQ_PAIRED 1
#endif
#ifndef GQ_PAIRED
#define GQ_PAIRED 0
#endif

/* the x rows over one dequantized tile (rows weight rows, row stride K), 2 x 6 microtiles */
static inline __attribute__((always_inline)) void plain_tiles(const float *x, int64_t M, int64_t ldx, const float *wb,
                                                               int rows, int64_t K, float *y, int64_t ldy,
                                                               const float *bias) {
    for (int64_t m0 = 0; m0 < M; m0 += RB) {
        const int R = M - m0 >= RB ? RB : (int)(M - m0);
        for (int j0 = 0; j0 < rows; j0 += NB) {
            const int C = rows - j0 < NB ? rows - j0 : NB;
            const float *bt = bias ? bias + j0 : NULL, *xt = x + m0 * ldx, *wt = wb + j0 * K;
            float *yt = y + m0 * ldy + j0;
            if (R == RB && C == NB) /* constant R and C: the loops unroll, acc stays in registers */
                micro_tile(xt, ldx, RB, wt, NB, K, yt, ldy, bt);
            else if (R == RB)
                micro_tile(xt, ldx, RB, wt, C, K, yt, ldy, bt);
            else
                micro_tile(xt, ldx, 1, wt, C, K, yt, ldy, bt);
        }
    }
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
/* a full tile with a constant row count: its loops unroll and the 8 accumulators stay in registers */
#define GQ_ROW_TILE(T)                                                                                 \
    do {                                                                                               \
        if (C == NB1) row_tile(x, wt, ldw, T, NB1, K, y + n0, bt);                                     \
        else row_tile(x, wt, ldw, T, C, K, y + n0, bt);                                                \
    } while (0)
            GQ_DISPATCH(type, GQ_ROW_TILE);
        }
        return;
    }
    /* M > 1: tiles of TN weight rows dequantized once into a per-thread buffer that every x row passes
     * over; on AVX-512 from 8 rows as row pairs (below, 4-row microtiles run too few chains, and the
     * 8-lane ones are faster: the same bits either way) */
    const int64_t tiles = (N + TN - 1) / TN;
#pragma omp parallel
    {
        float *wb = aligned_alloc(64, (size_t)(TN * K * sizeof(float) + 63) & ~(size_t)63);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * TN;
            const int rows = (int)(N - n0 < TN ? N - n0 : TN);
            const float *bt = bias ? bias + n0 : NULL;
#if GQ_PAIRED
            if (M >= 8) {
#define GQ_PAIRS(T) dequant_pairs(w + n0 * ldw, T, rows, K, ldw, wb)
                GQ_DISPATCH(type, GQ_PAIRS);
                pair_tiles(x, M, ldx, wb, rows, K, y + n0, ldy, bt);
                continue;
            }
#endif
#define GQ_TILE_ROWS(T) dequant_rows(w + n0 * ldw, T, rows, K, ldw, wb, K, 0)
            GQ_DISPATCH(type, GQ_TILE_ROWS);
            plain_tiles(x, M, ldx, wb, rows, K, y + n0, ldy, bt);
        }
        free(wb);
    }
}

/* gq_linear with its arguments as one int64 array, for kernel plans (engine/kernels/cpu/plan.py) */
void gq_linear_a(const int64_t *a) {
    gq_linear((const float *)(intptr_t)a[0], a[1], a[2], a[3], (const uint8_t *)(intptr_t)a[4], a[5], a[6], a[7],
              (const float *)(intptr_t)a[8], (float *)(intptr_t)a[9], a[10]);
}
