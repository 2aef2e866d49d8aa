/* Fused fake-quantize kernels behind qviz/_fused.pyx: one pass over a float32 tensor where the plain
 * PyTorch formulation takes five to ten (clamp, compare, divide, add, floor, multiply, select), each a
 * full read and write of the tensor. QAT runs these on every activation and weight of every step.
 *
 * Every kernel computes exactly what the scheme's PyTorch code in qviz/engine/quantizers.py computes,
 * operation for operation in float32, so results agree bit for bit with it (the tests check this on
 * every code path). Sums are accumulated in double in a fixed order of eight partial sums, so they do
 * not depend on the code path either, and no sum of float32 values can overflow.
 *
 * Code paths: the same loops compiled for baseline x86-64 (or any other CPU), for AVX2 and for
 * AVX-512F with target attributes (never -march=native), chosen at run time by the caller. The file is
 * compiled with -ffp-contract=off: a fused multiply-add on one path would round differently.
 */
#ifndef QVIZ_FUSED_H
#define QVIZ_FUSED_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define QVIZ_FUSED_X86 1
#define QVIZ_TARGET_AVX2 __attribute__((target("avx2")))
#define QVIZ_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx2")))
#else
#define QVIZ_FUSED_X86 0
#define QVIZ_TARGET_AVX2
#define QVIZ_TARGET_AVX512
#endif

enum { QVIZ_FUSED_PORTABLE = 0, QVIZ_FUSED_AVX2 = 1, QVIZ_FUSED_AVX512 = 2 };

static int qviz_fused_path_supported(int path) {
#if QVIZ_FUSED_X86
    __builtin_cpu_init();
    switch (path) {
    case QVIZ_FUSED_PORTABLE: return 1;
    case QVIZ_FUSED_AVX2: return __builtin_cpu_supports("avx2");
    case QVIZ_FUSED_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx2");
    }
    return 0;
#else
    return path == QVIZ_FUSED_PORTABLE;
#endif
}

/* State bits a forward pass leaves for its backward pass. */
#define QVIZ_PASS 1u  /* the STE passes the gradient to x here */
#define QVIZ_ABOVE 2u /* x >= alpha: PACT's gradient goes to alpha here */

/* STEs, as quantizers.STES orders them. */
enum { QVIZ_STE_IDENTITY = 0, QVIZ_STE_CLIPPED = 1, QVIZ_STE_SATURATED = 2 };

/* ------------------------------------------------------------------------------------------------ */
/* Bodies: always inlined into one entry point per code path, with the variant (STE, state or not) a
 * constant there, so that every loop is straight-line code the compiler vectorizes. Selections are
 * written so that NaN propagates as torch.clamp propagates it, never as undefined behaviour.         */

#define QVIZ_INLINE static inline __attribute__((always_inline))

/* relu / pact: c = clamp(x, 0, a); q = floor(c / step + 0.5) * step (Relu.quantize, _PACT.forward).
 * With a state: bit PASS where the STE passes (clipped: 0 <= x <= a, i.e. c == x; saturated: |x| <= 1;
 * identity: everywhere), bit ABOVE where x >= a.                                                        */
QVIZ_INLINE void qviz_clip_round_body(const float *restrict x, float *restrict q, uint8_t *restrict state,
                                      size_t n, float alpha, float step, int ste) {
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        float c = v < 0.0f ? 0.0f : v;
        c = c > alpha ? alpha : c;
        q[i] = floorf(c / step + 0.5f) * step;
        if (state) {
            int pass = ste == QVIZ_STE_IDENTITY ? 1 : ste == QVIZ_STE_CLIPPED ? c == v : fabsf(v) <= 1.0f;
            state[i] = (uint8_t)(pass | (v >= alpha) << 1);
        }
    }
}

/* Reductions keep eight double partial sums, lane j taking elements i + j, written with GCC/Clang vector
 * types so that every code path vectorizes them, adds in the same order, and selects without branches
 * (a branch on a random mask would mispredict on every other element).                               */
typedef float qviz_f4 __attribute__((vector_size(16)));
typedef int32_t qviz_i4 __attribute__((vector_size(16)));
typedef double qviz_d4 __attribute__((vector_size(32)));

QVIZ_INLINE qviz_f4 qviz_load4(const float *p) {
    qviz_f4 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

QVIZ_INLINE qviz_f4 qviz_select4(qviz_f4 v, qviz_i4 mask) { return (qviz_f4)((qviz_i4)v & mask); }

QVIZ_INLINE double qviz_total8(const double part[8]) {
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

QVIZ_INLINE void qviz_store8(double part[8], qviz_d4 lo, qviz_d4 hi) {
    for (int j = 0; j < 4; j++) {
        part[j] = lo[j];
        part[4 + j] = hi[j];
    }
}

/* grad_x = grad * PASS (a product, as PyTorch's grad * mask: NaN stays NaN); returns the sum of grad
 * where ABOVE (PACT's dq/dα).                                                                         */
QVIZ_INLINE double qviz_clip_backward_body(const float *restrict grad, const uint8_t *restrict state,
                                           float *restrict grad_x, size_t n) {
    qviz_d4 lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0};
    size_t i = 0;
    for (; n - i >= 8; i += 8) {
        const uint8_t *s = state + i;
        qviz_i4 a = {s[0], s[1], s[2], s[3]}, b = {s[4], s[5], s[6], s[7]};
        qviz_f4 ga = qviz_load4(grad + i), gb = qviz_load4(grad + i + 4);
        qviz_f4 pa = ga * __builtin_convertvector(a & QVIZ_PASS, qviz_f4);
        qviz_f4 pb = gb * __builtin_convertvector(b & QVIZ_PASS, qviz_f4);
        __builtin_memcpy(grad_x + i, &pa, sizeof pa);
        __builtin_memcpy(grad_x + i + 4, &pb, sizeof pb);
        lo += __builtin_convertvector(qviz_select4(ga, (a & QVIZ_ABOVE) != 0), qviz_d4);
        hi += __builtin_convertvector(qviz_select4(gb, (b & QVIZ_ABOVE) != 0), qviz_d4);
    }
    double part[8];
    qviz_store8(part, lo, hi);
    for (; i < n; i++) {
        grad_x[i] = grad[i] * (float)(state[i] & QVIZ_PASS);
        part[i % 8] += (state[i] & QVIZ_ABOVE) ? (double)grad[i] : 0.0;
    }
    return qviz_total8(part);
}

/* Uniform affine/symmetric (the _Uniform scheme): code = round_half_even(x * inv_scale) + zero_point;
 * mask = qmin <= code <= qmax (the clipped STE); q = (clamp(code, qmin, qmax) - zero_point) * scale.   */
QVIZ_INLINE void qviz_uniform_body(const float *restrict x, float *restrict q, uint8_t *restrict mask, size_t n,
                                   float inv_scale, float zero_point, float qmin, float qmax, float scale) {
    for (size_t i = 0; i < n; i++) {
        float code = nearbyintf(x[i] * inv_scale) + zero_point;
        if (mask) mask[i] = (uint8_t)(code >= qmin && code <= qmax);
        float c = code < qmin ? qmin : code;
        c = c > qmax ? qmax : c;
        q[i] = (c - zero_point) * scale;
    }
}

/* sum |x| and max |x|: ternary's Δ = 0.7 E|w|. A NaN makes the sum NaN (the caller checks it). */
QVIZ_INLINE double qviz_abs_stats_body(const float *restrict x, size_t n, float *max_abs) {
    const qviz_i4 magnitude = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
    qviz_d4 lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0};
    qviz_i4 top_lo = {0, 0, 0, 0}, top_hi = {0, 0, 0, 0};  /* |x| as bits: their integer order is their order */
    size_t i = 0;
    for (; n - i >= 8; i += 8) {
        qviz_i4 a = (qviz_i4)qviz_load4(x + i) & magnitude, b = (qviz_i4)qviz_load4(x + i + 4) & magnitude;
        lo += __builtin_convertvector((qviz_f4)a, qviz_d4);
        hi += __builtin_convertvector((qviz_f4)b, qviz_d4);
        qviz_i4 ma = a > top_lo, mb = b > top_hi;
        top_lo = (a & ma) | (top_lo & ~ma);
        top_hi = (b & mb) | (top_hi & ~mb);
    }
    double part[8];
    qviz_store8(part, lo, hi);
    float m = 0.0f;
    for (int j = 0; j < 4; j++) {
        qviz_f4 tl = (qviz_f4)top_lo, th = (qviz_f4)top_hi;
        m = tl[j] > m ? tl[j] : m;
        m = th[j] > m ? th[j] : m;
    }
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        part[i % 8] += (double)a;
        m = a > m ? a : m;
    }
    *max_abs = m;
    return qviz_total8(part);
}

/* The kept |w| of a ternary quantizer: the sum and count of |x| > delta. */
QVIZ_INLINE double qviz_kept_body(const float *restrict x, size_t n, float delta, int64_t *count) {
    const qviz_i4 magnitude = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
    const qviz_f4 one = {1, 1, 1, 1};
    qviz_d4 lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0}, c_lo = {0, 0, 0, 0}, c_hi = {0, 0, 0, 0};
    size_t i = 0;
    for (; n - i >= 8; i += 8) {
        qviz_f4 a = (qviz_f4)((qviz_i4)qviz_load4(x + i) & magnitude);
        qviz_f4 b = (qviz_f4)((qviz_i4)qviz_load4(x + i + 4) & magnitude);
        qviz_i4 ka = a > delta, kb = b > delta;
        lo += __builtin_convertvector(qviz_select4(a, ka), qviz_d4);
        hi += __builtin_convertvector(qviz_select4(b, kb), qviz_d4);
        c_lo += __builtin_convertvector(qviz_select4(one, ka), qviz_d4);
        c_hi += __builtin_convertvector(qviz_select4(one, kb), qviz_d4);
    }
    double part[8];
    qviz_store8(part, lo, hi);
    double kept = (c_lo[0] + c_lo[1] + c_lo[2] + c_lo[3]) + (c_hi[0] + c_hi[1] + c_hi[2] + c_hi[3]);
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        part[i % 8] += a > delta ? (double)a : 0.0;
        kept += a > delta;
    }
    *count = (int64_t)kept;
    return qviz_total8(part);
}

/* Ternary.quantize: alpha where x > delta, -alpha where x < -delta, else 0. */
QVIZ_INLINE void qviz_ternary_body(const float *restrict x, float *restrict q, size_t n, float delta, float alpha) {
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        q[i] = v > delta ? alpha : (v < -delta ? -alpha : 0.0f);
    }
}

/* One entry point per code path; each call of a body has its variant as a constant. */
#define QVIZ_INSTANTIATE(SUFFIX, TARGET)                                                                \
    TARGET static void qviz_clip_round_##SUFFIX(const float *x, float *q, uint8_t *state, size_t n,    \
                                                float alpha, float step, int ste) {                     \
        if (!state) qviz_clip_round_body(x, q, NULL, n, alpha, step, QVIZ_STE_IDENTITY);                \
        else if (ste == QVIZ_STE_CLIPPED) qviz_clip_round_body(x, q, state, n, alpha, step, QVIZ_STE_CLIPPED); \
        else if (ste == QVIZ_STE_SATURATED)                                                             \
            qviz_clip_round_body(x, q, state, n, alpha, step, QVIZ_STE_SATURATED);                      \
        else qviz_clip_round_body(x, q, state, n, alpha, step, QVIZ_STE_IDENTITY);                      \
    }                                                                                                   \
    TARGET static double qviz_clip_backward_##SUFFIX(const float *grad, const uint8_t *state,          \
                                                     float *grad_x, size_t n) {                         \
        return qviz_clip_backward_body(grad, state, grad_x, n);                                         \
    }                                                                                                   \
    TARGET static void qviz_uniform_##SUFFIX(const float *x, float *q, uint8_t *mask, size_t n,        \
                                             float inv_scale, float zero_point, float qmin, float qmax, \
                                             float scale) {                                             \
        if (mask) qviz_uniform_body(x, q, mask, n, inv_scale, zero_point, qmin, qmax, scale);           \
        else qviz_uniform_body(x, q, NULL, n, inv_scale, zero_point, qmin, qmax, scale);                \
    }                                                                                                   \
    TARGET static double qviz_abs_stats_##SUFFIX(const float *x, size_t n, float *max_abs) {           \
        return qviz_abs_stats_body(x, n, max_abs);                                                      \
    }                                                                                                   \
    TARGET static double qviz_kept_##SUFFIX(const float *x, size_t n, float delta, int64_t *count) {   \
        return qviz_kept_body(x, n, delta, count);                                                      \
    }                                                                                                   \
    TARGET static void qviz_ternary_##SUFFIX(const float *x, float *q, size_t n, float delta,          \
                                             float alpha) {                                             \
        qviz_ternary_body(x, q, n, delta, alpha);                                                       \
    }

QVIZ_INSTANTIATE(portable, )
#if QVIZ_FUSED_X86
QVIZ_INSTANTIATE(avx2, QVIZ_TARGET_AVX2)
QVIZ_INSTANTIATE(avx512, QVIZ_TARGET_AVX512)
#define QVIZ_DISPATCH(path, name, ...)                                                                  \
    ((path) == QVIZ_FUSED_AVX512 ? name##_avx512(__VA_ARGS__)                                           \
     : (path) == QVIZ_FUSED_AVX2 ? name##_avx2(__VA_ARGS__)                                             \
                                 : name##_portable(__VA_ARGS__))
#else
#define QVIZ_DISPATCH(path, name, ...) name##_portable(__VA_ARGS__)
#endif

static void qviz_clip_round(int path, const float *x, float *q, uint8_t *state, size_t n, float alpha,
                            float step, int ste) {
    QVIZ_DISPATCH(path, qviz_clip_round, x, q, state, n, alpha, step, ste);
}

static double qviz_clip_backward(int path, const float *grad, const uint8_t *state, float *grad_x, size_t n) {
    return QVIZ_DISPATCH(path, qviz_clip_backward, grad, state, grad_x, n);
}

static void qviz_uniform(int path, const float *x, float *q, uint8_t *mask, size_t n, float inv_scale,
                         float zero_point, float qmin, float qmax, float scale) {
    QVIZ_DISPATCH(path, qviz_uniform, x, q, mask, n, inv_scale, zero_point, qmin, qmax, scale);
}

static double qviz_abs_stats(int path, const float *x, size_t n, float *max_abs) {
    return QVIZ_DISPATCH(path, qviz_abs_stats, x, n, max_abs);
}

static double qviz_kept(int path, const float *x, size_t n, float delta, int64_t *count) {
    return QVIZ_DISPATCH(path, qviz_kept, x, n, delta, count);
}

static void qviz_ternary(int path, const float *x, float *q, size_t n, float delta, float alpha) {
    QVIZ_DISPATCH(path, qviz_ternary, x, q, n, delta, alpha);
}

#endif
