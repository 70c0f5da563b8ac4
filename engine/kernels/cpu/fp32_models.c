/* fp32 CPU kernels that some model families need on the decode hot path, beside fp32_cpu.c's (its
 * own shared object, so each file stays small; kernel plans call both by address):
 * per-head RMSNorm (the q/k norms of Qwen3 and Gemma 3) and GeLU-and-mul (Gemma's GeGLU).
 * Built and loaded by engine/kernels/cpu/ops.py like fp32_cpu.c. */
#include <math.h>
#include <stdint.h>

/* x: T tokens (token stride ldx) of H heads of D contiguous floats -> out [T, H, D] contiguous; each
 * head normalised exactly as f32_rms_norm normalises a row (sum of squares in double). */
void f32_rms_norm_heads(const float *x, int64_t ldx, int64_t T, int64_t H, int64_t D, const float *w, double eps,
                        float *out) {
#pragma omp parallel for schedule(static) if (T * H > 256)
    for (int64_t r = 0; r < T * H; r++) {
        const float *xr = x + (r / H) * ldx + (r % H) * D;
        double ss = 0.0;
        for (int64_t i = 0; i < D; i++) ss += (double)xr[i] * xr[i];
        const float inv = (float)(1.0 / sqrt(ss / (double)D + eps));
        float *o = out + r * D;
        for (int64_t i = 0; i < D; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* gelu(gate) * up for x [M, 2I] (gate then up) -> out [M, I]; tanh approximation when tanh_approx
 * (gelu_pytorch_tanh), else the erf form. */
void f32_gelu_and_mul(const float *x, int64_t M, int64_t I, int64_t tanh_approx, float *out) {
    const float k = 0.7978845608028654f, c = 0.044715f, r2 = 0.7071067811865476f; /* sqrt(2/pi), sqrt(1/2) */
#pragma omp parallel for schedule(static) if (M * I > 65536)
    for (int64_t m = 0; m < M; m++) {
        const float *g = x + m * 2 * I, *u = g + I;
        float *o = out + m * I;
        for (int64_t i = 0; i < I; i++) {
            const float v = g[i];
            const float t = tanh_approx ? tanhf(k * (v + c * v * v * v)) : erff(v * r2);
            o[i] = 0.5f * v * (1.f + t) * u[i];
        }
    }
}

/* plan twins (arguments as one int64 array; a double by its bits), as in fp32_cpu.c */
#define P(i, T) ((T)(intptr_t)a[i])
static inline double bits_f64(int64_t v) {
    union { int64_t i; double d; } u = {v};
    return u.d;
}
void f32_rms_norm_heads_a(const int64_t *a) {
    f32_rms_norm_heads(P(0, const float *), a[1], a[2], a[3], a[4], P(5, const float *), bits_f64(a[6]),
                       P(7, float *));
}
void f32_gelu_and_mul_a(const int64_t *a) { f32_gelu_and_mul(P(0, const float *), a[1], a[2], a[3], P(4, float *)); }
