/* Bit-packed low-bit kernels behind qviz/_packed.pyx.
 *
 * Layout: codes of b bits (b in 1, 2, 4, 8) packed along K into little-endian uint64 words, code j of
 * a row at word j / (64 / b), bit offset (j % (64 / b)) * b; rows padded with zero bits to whole words.
 * Zero padding never changes a result: XOR and AND of two zero bits is zero (qviz.packed refuses
 * matrices whose padding bits are not zero).
 *
 * This file: CPU features, activation packing (signs, uniform quantization), the row kernels that 8-bit
 * codes and per-channel codebooks still use, and the packed-index convolution. The GEMM-shaped panel
 * kernels are in _packed_panels.h, the thread pool in _packed_pool.h, the roof loops in _packed_roof.h.
 *
 * Code paths are compiled per function with target attributes (never -march=native) and chosen at
 * run time from the CPU's features: "portable" (plain C, any CPU), "popcnt" (x86 hardware popcount),
 * "avx2" (AVX2 + FMA, nibble-table popcount), "avx2vnni" (the same with AVX-VNNI's 256-bit vpdpbusd for 2-
 * and 4-bit codes: Intel cores from Alder Lake and E-core Xeons, which have no AVX-512), "avx512" (AVX-512
 * F/BW + VPOPCNTDQ), "avx512vnni" (the same with VNNI). qviz.packed checks every argument before a call,
 * so these functions trust their inputs.
 */
#ifndef QVIZ_PACKED_KERNELS_H
#define QVIZ_PACKED_KERNELS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* dladdr (qviz_openmp_library); Python.h defines it first in the extension */
#endif
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define QVIZ_X86 1
#include <immintrin.h>
#else
#define QVIZ_X86 0
#endif

#if QVIZ_HAVE_OPENMP
#include <omp.h>
#endif
#if QVIZ_HAVE_OPENMP && (defined(__unix__) || defined(__APPLE__))
#include <dlfcn.h>
#endif

/* GCC 12's partial redundancy elimination makes some accumulator loops store every accumulator to the
 * stack on each iteration (seen in the assembly): the tile functions and roof loops turn it off. */
#if defined(__GNUC__) && !defined(__clang__)
#define QVIZ_NO_PRE __attribute__((optimize("no-tree-pre")))
#else
#define QVIZ_NO_PRE
#endif

/* Ordered so that `path >= X` means "has at least X's instructions"; avx2vnni is an AVX2 path in everything
 * but the dot products of 2- and 4-bit codes (qviz_avx2_class). */
enum { QVIZ_PORTABLE = 0, QVIZ_POPCNT = 1, QVIZ_AVX2 = 2, QVIZ_AVX2VNNI = 3, QVIZ_AVX512 = 4, QVIZ_AVX512VNNI = 5,
       QVIZ_N_PATHS = 6 };

static inline int qviz_avx2_class(int path) { return path == QVIZ_AVX2 || path == QVIZ_AVX2VNNI; }

/* AVX-VNNI's target name, intrinsics and CPU test came with GCC 11 and Clang 12: an older compiler builds
 * every other path, and avx2vnni is then never supported (QVIZ_NO_AVXVNNI forces that, for the test). */
#if QVIZ_X86 && !defined(QVIZ_NO_AVXVNNI) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define QVIZ_HAVE_AVXVNNI 1
#else
#define QVIZ_HAVE_AVXVNNI 0
#endif

/* What the reduction over words computes for one pair of rows. */
enum { QVIZ_XOR_POPCOUNT = 0, QVIZ_AND_POPCOUNT = 1, QVIZ_AND_FIELDS2 = 2, QVIZ_AND_FIELDS4 = 3,
       QVIZ_AND_FIELDS8 = 4, QVIZ_N_OPS = 5 };

static int qviz_path_supported(int path) {
#if QVIZ_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    switch (path) {
    case QVIZ_PORTABLE: return 1;
    case QVIZ_POPCNT: return __builtin_cpu_supports("popcnt");
    case QVIZ_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    case QVIZ_AVX2VNNI:
#if QVIZ_HAVE_AVXVNNI
        return qviz_path_supported(QVIZ_AVX2) && __builtin_cpu_supports("avxvnni");
#else
        return 0;
#endif
    case QVIZ_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    case QVIZ_AVX512VNNI:
        return qviz_path_supported(QVIZ_AVX512) && __builtin_cpu_supports("avx512vnni");
    }
    return 0;
#else
    return path == QVIZ_PORTABLE;
#endif
}

static int qviz_openmp_enabled(void) { return QVIZ_HAVE_OPENMP; }

/* The file of the OpenMP runtime qviz's OpenMP calls reach ("" if none or unknown): several can be mapped
 * (scikit-learn brings its own libgomp), and only the one the loader bound to qviz matters. */
static const char *qviz_openmp_library(void) {
#if QVIZ_HAVE_OPENMP && (defined(__unix__) || defined(__APPLE__))
    Dl_info info;
    if (dladdr((void *)&omp_get_num_threads, &info) && info.dli_fname) return info.dli_fname;
#endif
    return "";
}

/* 1 if no float of p[0 .. n) is NaN or infinite (its exponent bits are not all ones). Branch-free, so
 * the compiler vectorises it; the kernels' wrappers run it on inputs and results. */
static int qviz_all_finite(const float *p, size_t n) {
    const uint32_t *u = (const uint32_t *)p; /* built with -fno-strict-aliasing */
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (u[i] & 0x7F800000u) == 0x7F800000u;
    return !bad;
}


/* ------------------------------------------------------------------------------------------------ */
/* Scalar word reductions. "fieldsB" sums the B-bit unsigned fields of a word: for B = 2 that is     */
/* popcount(v & 0x55..) + 2 popcount(v & 0xAA..), and so on.                                          */

#define QVIZ_M1 0x5555555555555555ULL
#define QVIZ_M2 0x3333333333333333ULL
#define QVIZ_M4 0x0F0F0F0F0F0F0F0FULL

static inline uint64_t qviz_swar_popcount(uint64_t x) {
    x = x - ((x >> 1) & QVIZ_M1);
    x = (x & QVIZ_M2) + ((x >> 2) & QVIZ_M2);
    x = (x + (x >> 4)) & QVIZ_M4;
    return (x * 0x0101010101010101ULL) >> 56;
}

/* Field sums by halving: adding neighbouring fields doubles their width without overflow. */
static inline uint64_t qviz_fields2_portable(uint64_t v) {
    v = (v & QVIZ_M2) + ((v >> 2) & QVIZ_M2);
    v = (v & QVIZ_M4) + ((v >> 4) & QVIZ_M4);
    return (v * 0x0101010101010101ULL) >> 56;
}
static inline uint64_t qviz_fields4_portable(uint64_t v) {
    v = (v & QVIZ_M4) + ((v >> 4) & QVIZ_M4);   /* bytes of at most 30 */
    return (v * 0x0101010101010101ULL) >> 56;    /* 8 x 30 = 240 fits the top byte */
}
static inline uint64_t qviz_fields8_portable(uint64_t v) {
    v = (v & 0x00FF00FF00FF00FFULL) + ((v >> 8) & 0x00FF00FF00FF00FFULL);
    v = (v & 0x0000FFFF0000FFFFULL) + ((v >> 16) & 0x0000FFFF0000FFFFULL);
    return (v & 0xFFFFFFFFULL) + (v >> 32);
}

static inline uint64_t qviz_word_op(int op, uint64_t a, uint64_t b) {
    switch (op) {
    case QVIZ_XOR_POPCOUNT: return qviz_swar_popcount(a ^ b);
    case QVIZ_AND_POPCOUNT: return qviz_swar_popcount(a & b);
    case QVIZ_AND_FIELDS2: return qviz_fields2_portable(a & b);
    case QVIZ_AND_FIELDS4: return qviz_fields4_portable(a & b);
    default: return qviz_fields8_portable(a & b);
    }
}

/* A tile: S[i * lds + j] = sum over w < W of f(A[i * W + w], B[j * W + w]), i < mr, j < nr. */
typedef void (*qviz_tile_fn)(const uint64_t *A, const uint64_t *B, size_t W, int mr, int nr, int64_t *S,
                             size_t lds);

#define QVIZ_MR 4 /* the largest tile: S buffers hold QVIZ_MR x QVIZ_NR */
#define QVIZ_NR 2
/* The tile shape of the row kernels (rows of A x rows of B): the best of 1x1 ... 4x2 measured on AVX2. */
static const int qviz_tile_mr = 4, qviz_tile_nr = 2;

#define QVIZ_DEFINE_PORTABLE_TILE(OP)                                                                 \
    static void qviz_tile_portable_##OP(const uint64_t *A, const uint64_t *B, size_t W, int mr, int nr, \
                                        int64_t *S, size_t lds) {                                       \
        for (int i = 0; i < mr; i++)                                                                     \
            for (int j = 0; j < nr; j++) {                                                               \
                uint64_t s = 0;                                                                          \
                const uint64_t *a = A + i * W, *b = B + j * W;                                           \
                for (size_t w = 0; w < W; w++) s += qviz_word_op(OP, a[w], b[w]);                        \
                S[i * lds + j] = (int64_t)s;                                                             \
            }                                                                                            \
    }
QVIZ_DEFINE_PORTABLE_TILE(0)
QVIZ_DEFINE_PORTABLE_TILE(1)
QVIZ_DEFINE_PORTABLE_TILE(2)
QVIZ_DEFINE_PORTABLE_TILE(3)
QVIZ_DEFINE_PORTABLE_TILE(4)

#if QVIZ_X86 && defined(__GNUC__)
/* ------------------------------------------------------------------------------------------------ */
/* Hardware popcount (x86 POPCNT): the field sums become masked popcounts.                            */

#define QVIZ_POPCNT_FN __attribute__((target("popcnt")))

static inline QVIZ_POPCNT_FN uint64_t qviz_word_op_popcnt(int op, uint64_t a, uint64_t b) {
    uint64_t v = op == QVIZ_XOR_POPCOUNT ? a ^ b : a & b;
    switch (op) {
    case QVIZ_XOR_POPCOUNT:
    case QVIZ_AND_POPCOUNT: return (uint64_t)__builtin_popcountll(v);
    case QVIZ_AND_FIELDS2: return __builtin_popcountll(v & QVIZ_M1) + 2 * (uint64_t)__builtin_popcountll(v & ~QVIZ_M1);
    case QVIZ_AND_FIELDS4:
        return __builtin_popcountll(v & 0x1111111111111111ULL) + 2 * (uint64_t)__builtin_popcountll(v & 0x2222222222222222ULL) +
               4 * (uint64_t)__builtin_popcountll(v & 0x4444444444444444ULL) + 8 * (uint64_t)__builtin_popcountll(v & 0x8888888888888888ULL);
    default: return qviz_fields8_portable(v);
    }
}

#define QVIZ_DEFINE_POPCNT_TILE(OP)                                                                   \
    static QVIZ_POPCNT_FN void qviz_tile_popcnt_##OP(const uint64_t *A, const uint64_t *B, size_t W, int mr, \
                                                      int nr, int64_t *S, size_t lds) {                  \
        for (int i = 0; i < mr; i++)                                                                     \
            for (int j = 0; j < nr; j++) {                                                               \
                uint64_t s = 0;                                                                          \
                const uint64_t *a = A + i * W, *b = B + j * W;                                           \
                for (size_t w = 0; w < W; w++) s += qviz_word_op_popcnt(OP, a[w], b[w]);                 \
                S[i * lds + j] = (int64_t)s;                                                             \
            }                                                                                            \
    }
QVIZ_DEFINE_POPCNT_TILE(0)
QVIZ_DEFINE_POPCNT_TILE(1)
QVIZ_DEFINE_POPCNT_TILE(2)
QVIZ_DEFINE_POPCNT_TILE(3)
QVIZ_DEFINE_POPCNT_TILE(4)

/* ------------------------------------------------------------------------------------------------ */
/* AVX2: per-byte counts from a 16-entry nibble table (vpshufb), summed in byte lanes for a few      */
/* iterations and widened with vpsadbw before a byte can overflow.                                    */

#define QVIZ_AVX2_FN __attribute__((target("avx2,fma,popcnt")))

/* Per-byte value of f(v) for 256 bits. The nibble table gives the popcount (or the 2-bit field sum)
 * of each nibble; 4-bit fields are the nibbles themselves; 8-bit fields are the bytes. */
static inline QVIZ_AVX2_FN __m256i qviz_avx2_bytes(int op, __m256i v, __m256i table, __m256i low) {
    if (op == QVIZ_AND_FIELDS4) return _mm256_add_epi8(_mm256_and_si256(v, low), _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
    __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low));
    __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
    return _mm256_add_epi8(lo, hi);
}

/* How many iterations byte lanes can accumulate: max per byte per iteration is 8 (popcount),
 * 12 (2-bit fields: 6 per nibble), 30 (4-bit fields). */
static inline int qviz_avx2_flush_every(int op) {
    return op == QVIZ_AND_FIELDS2 ? 21 : op == QVIZ_AND_FIELDS4 ? 8 : 31;
}

static inline QVIZ_AVX2_FN __m256i qviz_avx2_combine(int op, __m256i a, __m256i b) {
    return op == QVIZ_XOR_POPCOUNT ? _mm256_xor_si256(a, b) : _mm256_and_si256(a, b);
}

static inline QVIZ_AVX2_FN int64_t qviz_avx2_hsum(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* MR (1-4) rows of A against NR (1-2) rows of B, both known at compile time after inlining, so the
 * byte accumulators live in registers and each B vector is loaded once per MR pair-ops. */
static inline __attribute__((always_inline)) QVIZ_AVX2_FN void
qviz_avx2_tile_body(const int OP, const int MR, const int NR, const uint64_t *A, const uint64_t *B, size_t W,
                    int64_t *S, size_t lds) {
    const __m256i table = OP == QVIZ_AND_FIELDS2
        ? _mm256_setr_epi8(0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5, 3, 4, 5, 6, 0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5, 3, 4, 5, 6)
        : _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    const int every = qviz_avx2_flush_every(OP);
    const size_t V = W / 4;
    __m256i q[4][2];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) q[i][j] = zero;
    size_t v = 0;
    while (v < V) {
        const size_t end = v + (size_t)every < V ? v + (size_t)every : V;
        __m256i c[4][2];
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) c[i][j] = zero;
        for (; v < end; v++) {
            __m256i y[2];
            for (int j = 0; j < NR; j++) y[j] = _mm256_loadu_si256((const __m256i *)(B + j * W + 4 * v));
            for (int i = 0; i < MR; i++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(A + i * W + 4 * v));
                for (int j = 0; j < NR; j++) {
                    const __m256i z = qviz_avx2_combine(OP, x, y[j]);
                    if (OP == QVIZ_AND_FIELDS8) /* bytes are the fields: widen at once */
                        q[i][j] = _mm256_add_epi64(q[i][j], _mm256_sad_epu8(z, zero));
                    else
                        c[i][j] = _mm256_add_epi8(c[i][j], qviz_avx2_bytes(OP, z, table, low));
                }
            }
        }
        if (OP != QVIZ_AND_FIELDS8)
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) q[i][j] = _mm256_add_epi64(q[i][j], _mm256_sad_epu8(c[i][j], zero));
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            int64_t s = qviz_avx2_hsum(q[i][j]);
            for (size_t w = 4 * V; w < W; w++) s += (int64_t)qviz_word_op_popcnt(OP, A[i * W + w], B[j * W + w]);
            S[i * lds + j] = s;
        }
}

#define QVIZ_DEFINE_AVX2_TILE(OP)                                                                     \
    static QVIZ_AVX2_FN void qviz_tile_avx2_##OP(const uint64_t *A, const uint64_t *B, size_t W, int mr, \
                                                  int nr, int64_t *S, size_t lds) {                      \
        switch (mr * 2 + nr - 3) {                                                                      \
        case 0: qviz_avx2_tile_body(OP, 1, 1, A, B, W, S, lds); break;                                  \
        case 1: qviz_avx2_tile_body(OP, 1, 2, A, B, W, S, lds); break;                                  \
        case 2: qviz_avx2_tile_body(OP, 2, 1, A, B, W, S, lds); break;                                  \
        case 3: qviz_avx2_tile_body(OP, 2, 2, A, B, W, S, lds); break;                                  \
        case 4: qviz_avx2_tile_body(OP, 3, 1, A, B, W, S, lds); break;                                  \
        case 5: qviz_avx2_tile_body(OP, 3, 2, A, B, W, S, lds); break;                                  \
        case 6: qviz_avx2_tile_body(OP, 4, 1, A, B, W, S, lds); break;                                  \
        default: qviz_avx2_tile_body(OP, 4, 2, A, B, W, S, lds); break;                                 \
        }                                                                                               \
    }
QVIZ_DEFINE_AVX2_TILE(0)
QVIZ_DEFINE_AVX2_TILE(1)
QVIZ_DEFINE_AVX2_TILE(2)
QVIZ_DEFINE_AVX2_TILE(3)
QVIZ_DEFINE_AVX2_TILE(4)

/* ------------------------------------------------------------------------------------------------ */
/* AVX-512 VPOPCNTDQ: a 64-bit popcount per lane; field sums by masked popcounts or vpsadbw.          */

#define QVIZ_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vpopcntdq,avx2,fma,popcnt")))

static inline QVIZ_AVX512_FN __m512i qviz_avx512_lanes(int op, __m512i v) {
    switch (op) {
    case QVIZ_XOR_POPCOUNT:
    case QVIZ_AND_POPCOUNT: return _mm512_popcnt_epi64(v);
    case QVIZ_AND_FIELDS2: {
        __m512i m1 = _mm512_set1_epi64((long long)QVIZ_M1);
        return _mm512_add_epi64(_mm512_popcnt_epi64(_mm512_and_si512(v, m1)),
                                _mm512_slli_epi64(_mm512_popcnt_epi64(_mm512_andnot_si512(m1, v)), 1));
    }
    case QVIZ_AND_FIELDS4: {
        __m512i low = _mm512_set1_epi8(0x0F);
        __m512i bytes = _mm512_add_epi8(_mm512_and_si512(v, low), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
        return _mm512_sad_epu8(bytes, _mm512_setzero_si512());
    }
    default: return _mm512_sad_epu8(v, _mm512_setzero_si512());
    }
}

#define QVIZ_DEFINE_AVX512_TILE(OP)                                                                   \
    static QVIZ_AVX512_FN void qviz_tile_avx512_##OP(const uint64_t *A, const uint64_t *B, size_t W, int mr, \
                                                      int nr, int64_t *S, size_t lds) {                  \
        const size_t V = W / 8;                                                                         \
        for (int i = 0; i < mr; i++)                                                                    \
            for (int j = 0; j < nr; j++) {                                                              \
                const uint64_t *a = A + i * W, *b = B + j * W;                                          \
                __m512i acc = _mm512_setzero_si512();                                                   \
                for (size_t v = 0; v < V; v++) {                                                        \
                    __m512i x = _mm512_loadu_si512((const void *)(a + 8 * v));                          \
                    __m512i y = _mm512_loadu_si512((const void *)(b + 8 * v));                          \
                    __m512i z = OP == QVIZ_XOR_POPCOUNT ? _mm512_xor_si512(x, y) : _mm512_and_si512(x, y); \
                    acc = _mm512_add_epi64(acc, qviz_avx512_lanes(OP, z));                              \
                }                                                                                       \
                int64_t s = _mm512_reduce_add_epi64(acc);                                               \
                for (size_t w = 8 * V; w < W; w++) s += (int64_t)qviz_word_op_popcnt(OP, a[w], b[w]);  \
                S[i * lds + j] = s;                                                                     \
            }                                                                                           \
    }
QVIZ_DEFINE_AVX512_TILE(0)
QVIZ_DEFINE_AVX512_TILE(1)
QVIZ_DEFINE_AVX512_TILE(2)
QVIZ_DEFINE_AVX512_TILE(3)
QVIZ_DEFINE_AVX512_TILE(4)
#endif /* QVIZ_X86 */

static qviz_tile_fn qviz_tile_for(int path, int op) {
    static const qviz_tile_fn portable[QVIZ_N_OPS] = {qviz_tile_portable_0, qviz_tile_portable_1,
                                                      qviz_tile_portable_2, qviz_tile_portable_3,
                                                      qviz_tile_portable_4};
#if QVIZ_X86 && defined(__GNUC__)
    static const qviz_tile_fn popcnt[QVIZ_N_OPS] = {qviz_tile_popcnt_0, qviz_tile_popcnt_1, qviz_tile_popcnt_2,
                                                    qviz_tile_popcnt_3, qviz_tile_popcnt_4};
    static const qviz_tile_fn avx2[QVIZ_N_OPS] = {qviz_tile_avx2_0, qviz_tile_avx2_1, qviz_tile_avx2_2,
                                                  qviz_tile_avx2_3, qviz_tile_avx2_4};
    static const qviz_tile_fn avx512[QVIZ_N_OPS] = {qviz_tile_avx512_0, qviz_tile_avx512_1, qviz_tile_avx512_2,
                                                    qviz_tile_avx512_3, qviz_tile_avx512_4};
    if (path == QVIZ_POPCNT) return popcnt[op];
    if (qviz_avx2_class(path)) return avx2[op];
    if (path >= QVIZ_AVX512) return avx512[op];
#endif
    return portable[op];
}

/* ------------------------------------------------------------------------------------------------ */
/* Pair reductions over whole matrices: S[m, n] = sum_w f(A[m, w], B[n, w]) with an epilogue.        */
/* Threads split the weight rows (B), so a GEMV (M = 1) is parallel too.                              */

#define QVIZ_NB 64 /* weight rows per thread block: 64 rows x 512 B (K = 4096, 1 bit) stay in L2 */

static int qviz_threads(int threads) { return threads < 1 ? 1 : threads; }

#include "_packed_pool.h"

/* Sum over the bit planes of A: out[m, n] = sum_i 2^i fields(planes[m, i] AND B[n]), where planes[m, i]
 * holds, in every b-bit field, all ones where bit i of the activation code is set (bit-serial matmul). */
static void qviz_bitserial_matmul(int path, int bits, const uint64_t *planes, size_t M, const uint64_t *B, size_t N,
                                  size_t W, int32_t *out, int threads) {
    const int op = bits == 1 ? QVIZ_AND_POPCOUNT : bits == 2 ? QVIZ_AND_FIELDS2 : bits == 4 ? QVIZ_AND_FIELDS4
                                                                                           : QVIZ_AND_FIELDS8;
    qviz_tile_fn tile = qviz_tile_for(path, op);
    const size_t R = M * (size_t)bits; /* plane rows: row r is plane r % bits of activation row r / bits */
    const int log_bits = bits == 1 ? 0 : bits == 2 ? 1 : bits == 4 ? 2 : 3;
    const long n_blocks = (long)((N + QVIZ_NB - 1) / QVIZ_NB);
    (void)threads;
#if QVIZ_HAVE_OPENMP
#pragma omp parallel for num_threads(qviz_threads(threads)) schedule(dynamic, 1) if ((double)M * N * W > 1e6)
#endif
    for (long blk = 0; blk < n_blocks; blk++) {
        int64_t S[QVIZ_MR * QVIZ_NR];
        const size_t n0 = (size_t)blk * QVIZ_NB, n_end = n0 + QVIZ_NB < N ? n0 + QVIZ_NB : N;
        for (size_t m = 0; m < M; m++) memset(out + m * N + n0, 0, (n_end - n0) * sizeof(int32_t));
        const size_t MR = (size_t)qviz_tile_mr, NR = (size_t)qviz_tile_nr;
        for (size_t r = 0; r < R; r += MR) {
            const int mr = (int)(R - r < MR ? R - r : MR);
            for (size_t n = n0; n < n_end; n += NR) {
                const int nr = (int)(n_end - n < NR ? n_end - n : NR);
                tile(planes + r * W, B + n * W, W, mr, nr, S, QVIZ_NR);
                for (int i = 0; i < mr; i++) {
                    const size_t row = r + (size_t)i; /* bits is a power of two: shift and mask, no division */
                    int32_t *o = out + (row >> log_bits) * N + n;
                    const int plane = (int)(row & (size_t)(bits - 1));
                    for (int j = 0; j < nr; j++) o[j] += (int32_t)(S[i * QVIZ_NR + j] << plane);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Packing activations. Both return 1 if x held NaN (the words are then not meaningful).            */

/* Packers of one comparison: bit j of row r is CMP(x[r, j], t); NaN is reported, not packed. "below"
 * (x < t) with t = 0 packs signs (bit 1 = -1, zero included in +1); "at_least" (x >= t) packs 1-bit
 * uniform codes once their threshold is moved onto x (qviz_exact_threshold). One instantiation per
 * comparison keeps the predicate an immediate. AVX-512: one compare into a mask register per 16 floats,
 * four masks make a word, and one unordered compare of two vectors finds NaN in either (compares into
 * masks issue on one port, which the matmul kernels need too: the packers run inside them); whole words
 * first, with no branch, then the last word of a row, which loads only the lanes that exist (masked lanes
 * read nothing and compare false). */
#define QVIZ_BELOW(v, t) ((v) < (t))
#define QVIZ_AT_LEAST(v, t) ((v) >= (t))
/* bits [from, k1) of the word that starts at k0, one float at a time (the scalar packers, the tails) */
#define QVIZ_PACK_ONE_BY_ONE(CMP, from)                                                                \
    for (size_t kk = (from); kk < k1; kk++) {                                                          \
        nan_seen |= row[kk] != row[kk];                                                                \
        word |= (uint64_t)CMP(row[kk], t) << (kk - k0);                                                \
    }
#define QVIZ_DEFINE_PACK_SCALAR(NAME, CMP)                                                             \
    static int qviz_pack_##NAME(const float *x, size_t M, size_t K, float t, uint64_t *out, size_t W) { \
        int nan_seen = 0;                                                                              \
        for (size_t r = 0; r < M; r++) {                                                               \
            const float *row = x + r * K;                                                              \
            for (size_t w = 0; w < W; w++) {                                                           \
                uint64_t word = 0;                                                                     \
                size_t k0 = w * 64, k1 = k0 + 64 < K ? k0 + 64 : K;                                    \
                QVIZ_PACK_ONE_BY_ONE(CMP, k0)                                                          \
                out[r * W + w] = word;                                                                 \
            }                                                                                          \
        }                                                                                              \
        return nan_seen;                                                                               \
    }
QVIZ_DEFINE_PACK_SCALAR(below, QVIZ_BELOW)
QVIZ_DEFINE_PACK_SCALAR(at_least, QVIZ_AT_LEAST)

#if QVIZ_X86 && defined(__GNUC__)
#define QVIZ_DEFINE_PACK_SIMD(NAME, CMP, IMM)                                                          \
    static QVIZ_AVX2_FN int qviz_pack_##NAME##_avx2(const float *x, size_t M, size_t K, float t, uint64_t *out, \
                                                    size_t W) {                                         \
        const __m256 vt = _mm256_set1_ps(t);                                                           \
        int nan_seen = 0;                                                                              \
        for (size_t r = 0; r < M; r++) {                                                               \
            const float *row = x + r * K;                                                              \
            for (size_t w = 0; w < W; w++) {                                                           \
                uint64_t word = 0;                                                                     \
                size_t k0 = w * 64, k1 = k0 + 64 < K ? k0 + 64 : K, k = k0;                            \
                for (; k + 8 <= k1; k += 8) {                                                          \
                    __m256 v = _mm256_loadu_ps(row + k);                                               \
                    word |= (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(v, vt, IMM)) << (k - k0);       \
                    nan_seen |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));                 \
                }                                                                                      \
                QVIZ_PACK_ONE_BY_ONE(CMP, k)                                                           \
                out[r * W + w] = word;                                                                 \
            }                                                                                          \
        }                                                                                              \
        return nan_seen != 0;                                                                          \
    }                                                                                                  \
    static QVIZ_AVX512_FN int qviz_pack_##NAME##_avx512(const float *x, size_t M, size_t K, float t,   \
                                                        uint64_t *out, size_t W) {                      \
        const __m512 vt = _mm512_set1_ps(t);                                                           \
        __mmask16 nan = 0;                                                                             \
        for (size_t r = 0; r < M; r++) {                                                               \
            const float *row = x + r * K;                                                              \
            size_t w = 0;                                                                              \
            for (; w < W && (w + 1) * 64 <= K; w++) {                                                  \
                const float *v = row + w * 64;                                                         \
                const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16),                     \
                             v2 = _mm512_loadu_ps(v + 32), v3 = _mm512_loadu_ps(v + 48);                \
                const uint64_t m0 = _cvtmask16_u32(_mm512_cmp_ps_mask(v0, vt, IMM)),                   \
                               m1 = _cvtmask16_u32(_mm512_cmp_ps_mask(v1, vt, IMM)),                   \
                               m2 = _cvtmask16_u32(_mm512_cmp_ps_mask(v2, vt, IMM)),                   \
                               m3 = _cvtmask16_u32(_mm512_cmp_ps_mask(v3, vt, IMM));                   \
                out[r * W + w] = (m0 | m1 << 16) | (m2 << 32 | m3 << 48);                              \
                nan = _kor_mask16(nan, _kor_mask16(_mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q),            \
                                                   _mm512_cmp_ps_mask(v2, v3, _CMP_UNORD_Q)));          \
            }                                                                                          \
            for (; w < W; w++) {                                                                       \
                const size_t k0 = w * 64, n = K - k0 < 64 ? K - k0 : 64;                               \
                uint64_t word = 0;                                                                     \
                for (size_t g = 0; g < 4 && 16 * g < n; g++) {                                         \
                    const size_t left = n - 16 * g;                                                    \
                    const __mmask16 lanes = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); \
                    const __m512 v = _mm512_maskz_loadu_ps(lanes, row + k0 + 16 * g);                  \
                    word |= (uint64_t)_mm512_mask_cmp_ps_mask(lanes, v, vt, IMM) << (16 * g);          \
                    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);                                     \
                }                                                                                      \
                out[r * W + w] = word;                                                                 \
            }                                                                                          \
        }                                                                                              \
        return nan != 0;                                                                               \
    }
QVIZ_DEFINE_PACK_SIMD(below, QVIZ_BELOW, _CMP_LT_OQ)
QVIZ_DEFINE_PACK_SIMD(at_least, QVIZ_AT_LEAST, _CMP_GE_OQ)
#endif

/* Bit j of row r is 1 where x[r, j] < 0 (sign -1), 0 otherwise (+1, zero included). */
static int qviz_pack_signs(const float *x, size_t M, size_t K, uint64_t *out, size_t W) {
    return qviz_pack_below(x, M, K, 0.0f, out, W);
}
#if QVIZ_X86 && defined(__GNUC__)
static QVIZ_AVX2_FN int qviz_pack_signs_avx2(const float *x, size_t M, size_t K, uint64_t *out, size_t W) {
    return qviz_pack_below_avx2(x, M, K, 0.0f, out, W);
}
static QVIZ_AVX512_FN int qviz_pack_signs_avx512(const float *x, size_t M, size_t K, uint64_t *out, size_t W) {
    return qviz_pack_below_avx512(x, M, K, 0.0f, out, W);
}
#endif

/* 1-bit uniform codes are a threshold: code = clamp(round_half_even(x * inv_scale) + z, 0, 1) is 1 exactly
 * where x * inv_scale > 0.5 (z = 0: 0.5 rounds to 0) or x * inv_scale >= -0.5 (z = 1: -0.5 rounds to -0).
 * The product is the same float32 product the b-bit packers round, so the codes are the same. */
static int qviz_pack_thresh(const float *x, size_t M, size_t K, float inv, float thr, int ge, uint64_t *out,
                            size_t W) {
    int nan_seen = 0;
    for (size_t r = 0; r < M; r++)
        for (size_t w = 0; w < W; w++) {
            uint64_t word = 0;
            const size_t k0 = w * 64, k1 = k0 + 64 < K ? k0 + 64 : K;
            for (size_t k = k0; k < k1; k++) {
                const float c = x[r * K + k] * inv;
                nan_seen |= c != c;
                word |= (uint64_t)(ge ? c >= thr : c > thr) << (k - k0);
            }
            out[r * W + w] = word;
        }
    return nan_seen;
}

#if QVIZ_X86 && defined(__GNUC__)
static QVIZ_AVX2_FN int qviz_pack_thresh_avx2(const float *x, size_t M, size_t K, float inv, float thr, int ge,
                                               uint64_t *out, size_t W) {
    const __m256 vi = _mm256_set1_ps(inv), vt = _mm256_set1_ps(thr);
    int nan_seen = 0;
    for (size_t r = 0; r < M; r++) {
        const float *row = x + r * K;
        for (size_t w = 0; w < W; w++) {
            uint64_t word = 0;
            const size_t k0 = w * 64, k1 = k0 + 64 < K ? k0 + 64 : K;
            size_t k = k0;
            for (; k + 8 <= k1; k += 8) {
                const __m256 c = _mm256_mul_ps(_mm256_loadu_ps(row + k), vi);
                const __m256 hit = ge ? _mm256_cmp_ps(c, vt, _CMP_GE_OQ) : _mm256_cmp_ps(c, vt, _CMP_GT_OQ);
                word |= (uint64_t)_mm256_movemask_ps(hit) << (k - k0);
                nan_seen |= _mm256_movemask_ps(_mm256_cmp_ps(c, c, _CMP_UNORD_Q));
            }
            for (; k < k1; k++) {
                const float c = row[k] * inv;
                nan_seen |= c != c;
                word |= (uint64_t)(ge ? c >= thr : c > thr) << (k - k0);
            }
            out[r * W + w] = word;
        }
    }
    return nan_seen != 0;
}

static QVIZ_AVX512_FN int qviz_pack_thresh_avx512(const float *x, size_t M, size_t K, float inv, float thr, int ge,
                                                   uint64_t *out, size_t W) {
    const __m512 vi = _mm512_set1_ps(inv), vt = _mm512_set1_ps(thr);
    __mmask16 nan = 0;
    for (size_t r = 0; r < M; r++) {
        const float *row = x + r * K;
        for (size_t w = 0; w < W; w++) {
            const size_t k0 = w * 64, n = K - k0 < 64 ? K - k0 : 64;
            uint64_t word = 0;
            for (size_t g = 0; g < 4 && 16 * g < n; g++) {
                const size_t left = n - 16 * g;
                const __mmask16 lanes = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                const __m512 c = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, row + k0 + 16 * g), vi);
                const __mmask16 hit = ge ? _mm512_mask_cmp_ps_mask(lanes, c, vt, _CMP_GE_OQ)
                                         : _mm512_mask_cmp_ps_mask(lanes, c, vt, _CMP_GT_OQ);
                word |= (uint64_t)hit << (16 * g);
                nan |= _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q);
            }
            out[r * W + w] = word;
        }
    }
    return nan != 0;
}
#endif

/* The threshold of a 1-bit code moved onto x: t such that x >= t exactly where x * inv (float32) > thr
 * (>= thr when ge), so the packer compares x and skips the multiply. x * inv rounds monotonically for
 * inv > 0, so the codes form one half-line and its first float is found by stepping from thr / inv.
 * 0 (keep multiplying) unless inv and t are normal floats: a flush-to-zero mode would treat subnormal x
 * alike in x * inv, not in x >= t. */
static int qviz_code_is_1(float v, float inv, float thr, int ge) {
    volatile float c = v * inv; /* rounded to float as the packers' product is, even where floats have excess
                                   precision (x87) */
    return ge ? c >= thr : c > thr;
}

static int qviz_exact_threshold(float inv, float thr, int ge, float *t) {
    if (!(inv >= FLT_MIN && inv <= FLT_MAX)) return 0;
#define QVIZ_CODE_IS_1(v) qviz_code_is_1(v, inv, thr, ge)
    float c = thr / inv;
    for (int step = 0; step < 64 && isfinite(c); step++) {
        if (!QVIZ_CODE_IS_1(c)) {
            c = nextafterf(c, INFINITY);
            continue;
        }
        const float below = nextafterf(c, -INFINITY);
        if (QVIZ_CODE_IS_1(below)) {
            c = below;
            continue;
        }
        if (!(fabsf(c) >= FLT_MIN && fabsf(c) <= FLT_MAX)) return 0;
        *t = c;
        return 1;
    }
#undef QVIZ_CODE_IS_1
    return 0;
}

/* Activations as the fused matmuls receive them: float rows to sign-binarize (SIGNS) or to quantize to
 * b-bit codes (UNIFORM, the affine quantizer of qviz_pack_uniform). */
enum { QVIZ_ACT_SIGNS = 0, QVIZ_ACT_UNIFORM = 1 };
typedef struct {
    int mode, bits;
    const float *x;
    size_t K, W64;
    float inv_scale, zero_point;
    float t;   /* 1-bit codes with exact = 1: x >= t (qviz_act_find_threshold, once per call) */
    int exact; /* 0: 1-bit codes multiply by 1 / scale and compare */
} qviz_act;

static void qviz_act_find_threshold(qviz_act *a) {
    const int ge = a->zero_point >= 1.0f;
    a->exact = a->mode == QVIZ_ACT_UNIFORM && a->bits == 1 &&
               qviz_exact_threshold(a->inv_scale, ge ? -0.5f : 0.5f, ge, &a->t);
}

static int qviz_pack_uniform_rows(int path, const float *x, size_t M, size_t K, int bits, float inv_scale,
                                  float zero_point, uint64_t *out, size_t W, int64_t *row_sums);
static void qviz_row_popcounts(const uint64_t *A, size_t M, size_t W64, int64_t *out);

/* Rows [r0, r0 + rows) of the activations packed into dst (rows x W64 words); 1 if they held NaN. */
static int qviz_pack_act(int path, const qviz_act *a, size_t r0, size_t rows, uint64_t *dst, int64_t *sums) {
    const float *x = a->x + r0 * a->K;
    if (a->mode == QVIZ_ACT_UNIFORM && a->bits == 1) {
        if (a->exact) {
#if QVIZ_X86 && defined(__GNUC__)
            if (path >= QVIZ_AVX512) return qviz_pack_at_least_avx512(x, rows, a->K, a->t, dst, a->W64);
            if (path >= QVIZ_AVX2) return qviz_pack_at_least_avx2(x, rows, a->K, a->t, dst, a->W64);
#endif
            return qviz_pack_at_least(x, rows, a->K, a->t, dst, a->W64);
        }
        const float thr = a->zero_point >= 1.0f ? -0.5f : 0.5f;
        const int ge = a->zero_point >= 1.0f;
#if QVIZ_X86 && defined(__GNUC__)
        if (path >= QVIZ_AVX512) return qviz_pack_thresh_avx512(x, rows, a->K, a->inv_scale, thr, ge, dst, a->W64);
        if (path >= QVIZ_AVX2) return qviz_pack_thresh_avx2(x, rows, a->K, a->inv_scale, thr, ge, dst, a->W64);
#endif
        return qviz_pack_thresh(x, rows, a->K, a->inv_scale, thr, ge, dst, a->W64);
    }
    if (a->mode == QVIZ_ACT_UNIFORM)
        return qviz_pack_uniform_rows(path, x, rows, a->K, a->bits, a->inv_scale, a->zero_point, dst, a->W64, sums);
#if QVIZ_X86 && defined(__GNUC__)
    if (path >= QVIZ_AVX512) return qviz_pack_signs_avx512(x, rows, a->K, dst, a->W64);
    if (path >= QVIZ_AVX2) return qviz_pack_signs_avx2(x, rows, a->K, dst, a->W64);
#endif
    return qviz_pack_signs(x, rows, a->K, dst, a->W64);
}

typedef struct {
    int path;
    const float *x;
    size_t M, K, W;
    uint64_t *out;
    _Atomic int nan_seen;
} qviz_signs_job;

#define QVIZ_SIGN_ROWS 32 /* rows per task */

static void qviz_signs_task(void *arg, long t) {
    qviz_signs_job *j = (qviz_signs_job *)arg;
    const size_t r0 = (size_t)t * QVIZ_SIGN_ROWS, rows = j->M - r0 < QVIZ_SIGN_ROWS ? j->M - r0 : QVIZ_SIGN_ROWS;
    const float *x = j->x + r0 * j->K;
    uint64_t *out = j->out + r0 * j->W;
    int nan;
#if QVIZ_X86 && defined(__GNUC__)
    if (j->path >= QVIZ_AVX512) nan = qviz_pack_signs_avx512(x, rows, j->K, out, j->W);
    else if (j->path >= QVIZ_AVX2) nan = qviz_pack_signs_avx2(x, rows, j->K, out, j->W);
    else
#endif
        nan = qviz_pack_signs(x, rows, j->K, out, j->W);
    if (nan) atomic_store(&j->nan_seen, 1);
}

/* Sign bits of x on up to `threads` threads (a single task below 1 MiB of floats). 1 if x held NaN. */
static int qviz_pack_signs_best(int path, const float *x, size_t M, size_t K, uint64_t *out, size_t W, int threads) {
    qviz_signs_job j;
    j.path = path, j.x = x, j.M = M, j.K = K, j.W = W, j.out = out;
    atomic_init(&j.nan_seen, 0);
    const int team = (double)M * (double)K < 262144.0 ? 1 : threads;
    qviz_parallel(qviz_signs_task, &j, (long)((M + QVIZ_SIGN_ROWS - 1) / QVIZ_SIGN_ROWS), team);
    return atomic_load(&j.nan_seen);
}

/* Uniform quantization of float activations straight into packed codes:
 * code = clamp(round_half_even(x / scale) + zero_point, 0, 2^bits - 1). row_sums[r] = sum of codes. */
static inline float qviz_round_half_even(float c) {
    /* exact for |c| < 2^22 (callers clamp first); avoids a libm call on baseline x86-64 */
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (c + magic) - magic;
}

static inline uint64_t qviz_code(float v, float inv_scale, float zero_point, float top, int *nan_seen) {
    float c = v * inv_scale;
    *nan_seen |= c != c;
    if (!(c >= -zero_point - 1.0f)) c = -zero_point - 1.0f; /* NaN lands here too */
    if (c > top - zero_point + 1.0f) c = top - zero_point + 1.0f;
    c = qviz_round_half_even(c) + zero_point;
    return (uint64_t)(c < 0.0f ? 0.0f : (c > top ? top : c));
}

static int qviz_pack_uniform_portable(const float *x, size_t M, size_t K, int bits, float inv_scale, float zero_point,
                                      uint64_t *out, size_t W, int64_t *row_sums) {
    const size_t per_word = (size_t)(64 / bits);
    const float top = (float)((1 << bits) - 1);
    int nan_seen = 0;
    for (size_t r = 0; r < M; r++) {
        const float *row = x + r * K;
        int64_t sum = 0;
        for (size_t w = 0; w < W; w++) {
            uint64_t word = 0;
            size_t k0 = w * per_word, k1 = k0 + per_word < K ? k0 + per_word : K;
            for (size_t k = k0; k < k1; k++) {
                uint64_t code = qviz_code(row[k], inv_scale, zero_point, top, &nan_seen);
                sum += (int64_t)code;
                word |= code << ((k - k0) * (size_t)bits);
            }
            out[r * W + w] = word;
        }
        row_sums[r] = sum;
    }
    return nan_seen;
}

#if QVIZ_X86 && defined(__GNUC__)
static inline QVIZ_AVX2_FN uint32_t qviz_avx2_or_lanes(__m256i v) {
    __m128i o = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    o = _mm_or_si128(o, _mm_shuffle_epi32(o, _MM_SHUFFLE(1, 0, 3, 2)));
    o = _mm_or_si128(o, _mm_shuffle_epi32(o, _MM_SHUFFLE(2, 3, 0, 1)));
    return (uint32_t)_mm_cvtsi128_si32(o);
}

/* Rows in parallel; 8 codes at a time: scale, round, clamp (vmaxps sends NaN to 0), shift each lane to
 * its bit offset and OR the lanes into one group of 8 codes. */
static QVIZ_AVX2_FN int qviz_pack_uniform_avx2(const float *x, size_t r0, size_t M, size_t K, int bits,
                                                float inv_scale, float zero_point, uint64_t *out, size_t W,
                                                int64_t *row_sums) {
    const size_t per_word = (size_t)(64 / bits);
    const float top = (float)((1 << bits) - 1);
    int nan_seen = 0;
    for (long rr = (long)r0; rr < (long)M; rr++) {
        const size_t r = (size_t)rr;
        const __m256 inv = _mm256_set1_ps(inv_scale), zp = _mm256_set1_ps(zero_point);
        const __m256 hi = _mm256_set1_ps(top), lo = _mm256_setzero_ps();
        const __m256i lane_shift = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
        const float *row = x + r * K;
        __m256i sums = _mm256_setzero_si256();
        int64_t sum = 0;
        int nan_row = 0;
        for (size_t w = 0; w < W; w++) {
            uint64_t word = 0;
            size_t k0 = w * per_word, k1 = k0 + per_word < K ? k0 + per_word : K, k = k0;
            for (; k + 8 <= k1; k += 8) {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + k), inv);
                nan_row |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
                v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
                __m256i c = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
                sums = _mm256_add_epi32(sums, c);
                if (bits == 8) {
                    __m128i b16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
                    word |= (uint64_t)_mm_cvtsi128_si64(_mm_packus_epi16(b16, b16)) << ((k - k0) * 8);
                } else {
                    word |= (uint64_t)qviz_avx2_or_lanes(_mm256_sllv_epi32(c, lane_shift)) << ((k - k0) * (size_t)bits);
                }
            }
            for (; k < k1; k++) {
                uint64_t code = qviz_code(row[k], inv_scale, zero_point, top, &nan_row);
                sum += (int64_t)code;
                word |= code << ((k - k0) * (size_t)bits);
            }
            out[r * W + w] = word;
        }
        __m256i wide = _mm256_add_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(sums)),
                                        _mm256_cvtepu32_epi64(_mm256_extracti128_si256(sums, 1)));
        row_sums[r] = sum + qviz_avx2_hsum(wide);
        nan_seen |= nan_row != 0;
    }
    return nan_seen;
}
#endif

typedef struct {
    int path, bits;
    const float *x;
    size_t M, K, W;
    float inv_scale, zero_point;
    uint64_t *out;
    int64_t *row_sums;
    _Atomic int nan_seen;
} qviz_pack_job;

#define QVIZ_PACK_ROWS 16 /* rows per task */

/* M rows of x quantized into out (W words a row) and their code sums. 1-bit codes are a threshold
 * (qviz_pack_act), counted by popcount. */
static int qviz_pack_uniform_rows(int path, const float *x, size_t M, size_t K, int bits, float inv_scale,
                                  float zero_point, uint64_t *out, size_t W, int64_t *row_sums) {
    if (bits == 1) {
        qviz_act a = {QVIZ_ACT_UNIFORM, 1, x, K, W, inv_scale, zero_point, 0.0f, 0};
        qviz_act_find_threshold(&a);
        const int nan_seen = qviz_pack_act(path, &a, 0, M, out, NULL);
        if (row_sums) qviz_row_popcounts(out, M, W, row_sums);
        return nan_seen;
    }
#if QVIZ_X86 && defined(__GNUC__)
    if (path >= QVIZ_AVX2) return qviz_pack_uniform_avx2(x, 0, M, K, bits, inv_scale, zero_point, out, W, row_sums);
#endif
    return qviz_pack_uniform_portable(x, M, K, bits, inv_scale, zero_point, out, W, row_sums);
}

static void qviz_pack_task(void *arg, long t) {
    qviz_pack_job *j = (qviz_pack_job *)arg;
    const size_t r0 = (size_t)t * QVIZ_PACK_ROWS, r1 = r0 + QVIZ_PACK_ROWS < j->M ? r0 + QVIZ_PACK_ROWS : j->M;
    if (qviz_pack_uniform_rows(j->path, j->x + r0 * j->K, r1 - r0, j->K, j->bits, j->inv_scale, j->zero_point,
                               j->out + r0 * j->W, j->W, j->row_sums + r0))
        atomic_store(&j->nan_seen, 1);
}

/* Rows in blocks on the pool; a single block (small M) stays on the caller. Returns 1 if x held NaN. */
static int qviz_pack_uniform(int path, const float *x, size_t M, size_t K, int bits, float inv_scale,
                             float zero_point, uint64_t *out, size_t W, int64_t *row_sums, int threads) {
    qviz_pack_job j;
    j.path = path, j.bits = bits, j.x = x, j.M = M, j.K = K, j.W = W, j.inv_scale = inv_scale;
    j.zero_point = zero_point, j.out = out, j.row_sums = row_sums;
    atomic_init(&j.nan_seen, 0);
    qviz_parallel(qviz_pack_task, &j, (long)((M + QVIZ_PACK_ROWS - 1) / QVIZ_PACK_ROWS), threads);
    return atomic_load(&j.nan_seen);
}

/* Expand packed b-bit activation codes into b plane masks per row for the bit-serial kernel:
 * planes[(r * bits + i) * W + w] has every b-bit field all ones where bit i of that field's code is 1. */
static void qviz_expand_planes(const uint64_t *codes, size_t M, size_t W, int bits, uint64_t *planes) {
    uint64_t low = 0; /* the lowest bit of every field */
    for (int s = 0; s < 64; s += bits) low |= 1ULL << s;
    const uint64_t fill = bits == 64 ? ~0ULL : (1ULL << bits) - 1;
    for (size_t r = 0; r < M; r++)
        for (int i = 0; i < bits; i++)
            for (size_t w = 0; w < W; w++) {
                uint64_t b = (codes[r * W + w] >> i) & low;
                planes[(r * bits + i) * W + w] = b * fill; /* fields never carry into each other */
            }
}

/* ------------------------------------------------------------------------------------------------ */
/* Codebook (LUT) matmul: out[m, n] = sum_k x[m, k] codebook_n[code(n, k)], float accumulation.       */
/* `cb` holds 2^bits floats per codebook; cb_stride is 0 for one codebook per layer, 2^bits per row.  */

static void qviz_decode_row_portable(const uint64_t *words, size_t K, int bits, const float *cb, float *dst) {
    const size_t per_word = (size_t)(64 / bits);
    const uint64_t mask = (1ULL << bits) - 1;
    for (size_t w = 0, k = 0; k < K; w++) {
        uint64_t word = words[w];
        for (size_t j = 0; j < per_word && k < K; j++, k++, word >>= bits) dst[k] = cb[word & mask];
    }
}

static void qviz_lut_matmul_portable(const float *x, size_t M, size_t K, const uint64_t *Wc, size_t N, size_t W,
                                     int bits, const float *cb, size_t cb_stride, float *out, int threads) {
    (void)threads;
#if QVIZ_HAVE_OPENMP
#pragma omp parallel num_threads(qviz_threads(threads)) if ((double)M * N * K > 4e6)
#endif
    {
        float *row = (float *)malloc(K * sizeof(float));
        if (row) {
#if QVIZ_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
            for (long n = 0; n < (long)N; n++) {
                qviz_decode_row_portable(Wc + (size_t)n * W, K, bits, cb + (size_t)n * cb_stride, row);
                for (size_t m = 0; m < M; m++) {
                    const float *xm = x + m * K;
                    float s = 0.0f;
                    for (size_t k = 0; k < K; k++) s += xm[k] * row[k];
                    out[m * N + (size_t)n] = s;
                }
            }
            free(row);
        }
    }
}

#if QVIZ_X86 && defined(__GNUC__)
/* Decode 8 codes starting at code index k of a row (k a multiple of 8) into 8 floats. For up to 16
 * codebook entries the table lives in two registers and vpermps looks codes up; 8-bit codes gather. */
typedef struct {
    __m256 t_lo, t_hi;      /* codebook entries 0-7 and 8-15 */
    __m256i shifts, mask;   /* where each of 8 codes sits in its group, and the code mask */
    const float *cb;        /* the codebook itself, for 8-bit gathers */
    int bits;
} qviz_decoder;

static inline QVIZ_AVX2_FN qviz_decoder qviz_avx2_decoder(const float *cb, int bits) {
    qviz_decoder d;
    float t[16] = {0};
    if (bits < 8) memcpy(t, cb, sizeof(float) * (size_t)(1 << bits));
    d.t_lo = _mm256_loadu_ps(t);
    d.t_hi = _mm256_loadu_ps(t + 8);
    d.shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    d.mask = _mm256_set1_epi32((1 << bits) - 1);
    d.cb = cb;
    d.bits = bits;
    return d;
}

/* Decode a group of 8 codes, right-aligned in `group` (8 * bits bits), into 8 floats. Up to 16 codebook
 * entries live in two registers and vpermps looks codes up; 8-bit codes gather from memory. */
static inline QVIZ_AVX2_FN __m256 qviz_avx2_decode8b(uint64_t group, const qviz_decoder *d, const int bits) {
    if (bits == 8) {
        __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)group));
        return _mm256_i32gather_ps(d->cb, idx, 4);
    }
    __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(uint32_t)group), d->shifts), d->mask);
    __m256 lo = _mm256_permutevar8x32_ps(d->t_lo, idx);
    if (bits < 4) return lo;
    __m256 hi = _mm256_permutevar8x32_ps(d->t_hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))); /* bit 3 -> sign */
}

static inline QVIZ_AVX2_FN __m256 qviz_avx2_decode8(uint64_t group, const qviz_decoder *d) {
    return qviz_avx2_decode8b(group, d, d->bits);
}

/* sum_k x[k] codebook[code k] over the whole words of a row, bits known at compile time so the loop
 * over the 8-code groups of a word unrolls; returns how many codes it covered. */
static inline QVIZ_AVX2_FN size_t qviz_avx2_gemv_words(const float *x, const uint64_t *words, size_t K,
                                                        const qviz_decoder *d, const int bits, __m256 *acc) {
    const size_t per_word = (size_t)(64 / bits);
    const int groups = 8 / bits;
    __m256 a0 = acc[0], a1 = acc[1];
    size_t k = 0, w = 0;
    for (; k + per_word <= K; w++) {
        uint64_t word = words[w];
        for (int g = 0; g < groups; g++, k += 8) {
            __m256 p = _mm256_mul_ps(_mm256_loadu_ps(x + k), qviz_avx2_decode8b(word, d, bits));
            if (g & 1) a1 = _mm256_add_ps(a1, p); else a0 = _mm256_add_ps(a0, p);
            if (bits < 8) word >>= 8 * bits;
        }
    }
    acc[0] = a0;
    acc[1] = a1;
    return k;
}

static inline QVIZ_AVX2_FN float qviz_avx2_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Decode a whole row of K codes into floats (dst holds K rounded up to 8). */
static inline QVIZ_AVX2_FN void qviz_avx2_decode_row(const uint64_t *words, size_t K, const qviz_decoder *d,
                                                       float *dst) {
    const int bits = d->bits, groups = 8 / bits; /* groups of 8 codes per word */
    for (size_t w = 0, k = 0; k < K; w++) {
        uint64_t word = words[w];
        for (int g = 0; g < groups && k < K; g++, k += 8, word = bits == 8 ? 0 : word >> (8 * bits))
            _mm256_storeu_ps(dst + k, qviz_avx2_decode8(word, d));
    }
}

#define QVIZ_LUT_MR 4 /* activation rows per pass over a decoded weight row */

static QVIZ_AVX2_FN void qviz_lut_matmul_avx2(const float *x, size_t M, size_t K, const uint64_t *Wc, size_t N,
                                               size_t W, int bits, const float *cb, size_t cb_stride, float *out,
                                               int threads) {
    const size_t K8 = (K + 7) / 8 * 8, Kfull = K / 8 * 8;
    (void)threads;
#if QVIZ_HAVE_OPENMP
#pragma omp parallel num_threads(qviz_threads(threads)) if ((double)M * N * K > 4e6)
#endif
    {
        float *row = (float *)aligned_alloc(32, (K8 + 8) * sizeof(float));
#if QVIZ_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
        for (long nn = 0; nn < (long)N; nn++) {
            if (row == NULL) continue;
            const size_t n = (size_t)nn;
            const uint64_t *words = Wc + n * W;
            const qviz_decoder dec = qviz_avx2_decoder(cb + n * cb_stride, bits);
            if (M == 1) {
                /* GEMV: decode on the fly, word by word; the packed row is read once, x stays in L1. */
                __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
                size_t k;
                switch (bits) {
                case 1: k = qviz_avx2_gemv_words(x, words, K, &dec, 1, acc); break;
                case 2: k = qviz_avx2_gemv_words(x, words, K, &dec, 2, acc); break;
                case 4: k = qviz_avx2_gemv_words(x, words, K, &dec, 4, acc); break;
                default: k = qviz_avx2_gemv_words(x, words, K, &dec, 8, acc); break;
                }
                float s = qviz_avx2_hsum_ps(_mm256_add_ps(acc[0], acc[1]));
                const uint64_t mask = (1ULL << bits) - 1;
                const size_t per_word = (size_t)(64 / bits);
                for (; k < K; k++) s += x[k] * dec.cb[(words[k / per_word] >> ((k % per_word) * (size_t)bits)) & mask];
                out[n] = s;
                continue;
            }
            /* Several activation rows: decode the weight row once, reuse it for every activation row. */
            qviz_avx2_decode_row(words, K, &dec, row);
            size_t m = 0;
            for (; m + QVIZ_LUT_MR <= M; m += QVIZ_LUT_MR) {
                const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (size_t k = 0; k < Kfull; k += 8) {
                    __m256 wv = _mm256_load_ps(row + k);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), wv, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), wv, a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + k), wv, a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + k), wv, a3);
                }
                float s0 = qviz_avx2_hsum_ps(a0), s1 = qviz_avx2_hsum_ps(a1);
                float s2 = qviz_avx2_hsum_ps(a2), s3 = qviz_avx2_hsum_ps(a3);
                for (size_t k = Kfull; k < K; k++) {
                    s0 += x0[k] * row[k]; s1 += x1[k] * row[k]; s2 += x2[k] * row[k]; s3 += x3[k] * row[k];
                }
                out[m * N + n] = s0; out[(m + 1) * N + n] = s1; out[(m + 2) * N + n] = s2; out[(m + 3) * N + n] = s3;
            }
            for (; m < M; m++) {
                const float *xm = x + m * K;
                __m256 a0 = _mm256_setzero_ps();
                for (size_t k = 0; k < Kfull; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_load_ps(row + k), a0);
                float s = qviz_avx2_hsum_ps(a0);
                for (size_t k = Kfull; k < K; k++) s += xm[k] * row[k];
                out[m * N + n] = s;
            }
        }
        free(row);
    }
}
#endif

static void qviz_lut_matmul(int path, const float *x, size_t M, size_t K, const uint64_t *Wc, size_t N, size_t W,
                            int bits, const float *cb, size_t cb_stride, float *out, int threads) {
#if QVIZ_X86 && defined(__GNUC__)
    if (path >= QVIZ_AVX2) {
        qviz_lut_matmul_avx2(x, M, K, Wc, N, W, bits, cb, cb_stride, out, threads);
        return;
    }
#endif
    (void)path;
    qviz_lut_matmul_portable(x, M, K, Wc, N, W, bits, cb, cb_stride, out, threads);
}

/* ------------------------------------------------------------------------------------------------ */
/* Packed-index direct convolution (003 Figs. 5.1, 5.2), stride 1, zero padding `pad`:                 */
/* out[b, co, y, x] = sum_{ci, i, j} x[b, ci, y + i - pad, x + j - pad] codebook_co[code(co, ci, i, j)]. */
/* Each filter is decoded once per call (not once per output pixel as in Fig. 5.2), into a stack buffer */
/* when it is small (003's layer: 8 x 27 floats), so a small layer costs no allocation.                */

/* Portable: the output channels in the vector lanes (GCC vectors of 8): the filters are decoded into
 * wt[(ci, i, j)][co] (output channels padded to 8), and every output pixel sums its taps as
 * acc[co] += x[ci, y + i - pad, x + j - pad] wt[(ci, i, j)][co], one broadcast and CO / 8 FMAs per tap. */
#ifndef QVIZ_PANEL
#define QVIZ_PANEL 16
#endif
typedef float qviz_v8 __attribute__((vector_size(32), aligned(4))); /* 8 output channels (GCC/clang vectors) */

/* One output row for output channels [c0, c0 + 8 NV): NV vectors of accumulators per pixel; the tap
 * ranges are clipped to the image once per pixel instead of testing every tap. */
#define QVIZ_CONV_BODY(NV)                                                                              \
    for (size_t xo = 0; xo < Wo; xo++) {                                                                \
        qviz_v8 acc[NV];                                                                                \
        for (int v = 0; v < NV; v++) acc[v] = (qviz_v8){0};                                             \
        const long i0 = (long)pad - (long)y > 0 ? (long)pad - (long)y : 0;                             \
        const long i1 = (long)H + (long)pad - (long)y < (long)kh ? (long)H + (long)pad - (long)y : (long)kh; \
        const long j0 = (long)pad - (long)xo > 0 ? (long)pad - (long)xo : 0;                           \
        const long j1 = (long)Wd + (long)pad - (long)xo < (long)kw ? (long)Wd + (long)pad - (long)xo : (long)kw; \
        for (size_t ci = 0; ci < C; ci++)                                                               \
            for (long i = i0; i < i1; i++) {                                                            \
                const float *xr = x + (ci * H + (size_t)((long)y + i - (long)pad)) * Wd - (long)pad + (long)xo; \
                const float *wr = wt + ((ci * kh + (size_t)i) * kw) * COp + c0;                          \
                for (long j = j0; j < j1; j++) {                                                        \
                    const float xv = xr[j];                                                             \
                    const qviz_v8 *w8 = (const qviz_v8 *)(wr + (size_t)j * COp);                        \
                    for (int v = 0; v < NV; v++) acc[v] += xv * w8[v];                                  \
                }                                                                                       \
            }                                                                                           \
        for (int v = 0; v < NV; v++)                                                                    \
            for (int c = 0; c < 8 && c0 + (size_t)(8 * v + c) < CO; c++)                                \
                out[((c0 + (size_t)(8 * v + c)) * Ho + y) * Wo + xo] = acc[v][c];                       \
    }
#define QVIZ_DEFINE_CONV_ROW(NAME, ATTR)                                                                \
    static ATTR void NAME(const float *x, size_t C, size_t H, size_t Wd, const float *wt, size_t COp, size_t CO, \
                          size_t kh, size_t kw, size_t pad, size_t y, float *out, size_t Ho, size_t Wo) {  \
        for (size_t c0 = 0; c0 < COp;) {                                                                \
            const size_t left = COp - c0;                                                               \
            if (left >= 32) {                                                                           \
                QVIZ_CONV_BODY(4)                                                                       \
                c0 += 32;                                                                               \
            } else if (left >= 16) {                                                                    \
                QVIZ_CONV_BODY(2)                                                                       \
                c0 += 16;                                                                               \
            } else {                                                                                    \
                QVIZ_CONV_BODY(1)                                                                       \
                c0 += 8;                                                                                \
            }                                                                                           \
        }                                                                                               \
    }
QVIZ_DEFINE_CONV_ROW(qviz_conv_row_portable, )

/* Pixels in the vector lanes, for layers with few output channels (003's has 8): one output row is
 * cut into chunks of V pixels (16 with AVX-512, 8 with AVX2), and each tap (ci, i, j) costs one load of
 * V input pixels (masked at the image edges and the row's end: masked lanes are never read) and one FMA
 * per output channel, 8 channels at a time with the filter value broadcast from the decoded filters
 * wk[co][(ci, i, j)]. With channels in the lanes, 8 channels fill only 8 lanes and each tap costs a
 * broadcast of the input; here every lane does useful work once a row has V pixels. */
#if QVIZ_X86 && defined(__GNUC__)
#define QVIZ_PX_FMA8(FMA, SET1, xv, wr, KF)                                                              \
    a0 = FMA(SET1(wr[0]), xv, a0), a1 = FMA(SET1(wr[KF]), xv, a1), a2 = FMA(SET1(wr[2 * KF]), xv, a2),     \
    a3 = FMA(SET1(wr[3 * KF]), xv, a3), a4 = FMA(SET1(wr[4 * KF]), xv, a4), a5 = FMA(SET1(wr[5 * KF]), xv, a5), \
    a6 = FMA(SET1(wr[6 * KF]), xv, a6), a7 = FMA(SET1(wr[7 * KF]), xv, a7)

/* AVX-512: two output rows at once (16 accumulators), so each broadcast filter value serves two loads. */
#define QVIZ_PX_FMA16(wr, KF)                                                                           \
    {                                                                                                   \
        __m512 f;                                                                                       \
        f = _mm512_set1_ps(wr[0]), a0 = _mm512_fmadd_ps(f, x0, a0), b0 = _mm512_fmadd_ps(f, x1, b0);        \
        f = _mm512_set1_ps(wr[KF]), a1 = _mm512_fmadd_ps(f, x0, a1), b1 = _mm512_fmadd_ps(f, x1, b1);       \
        f = _mm512_set1_ps(wr[2 * KF]), a2 = _mm512_fmadd_ps(f, x0, a2), b2 = _mm512_fmadd_ps(f, x1, b2);   \
        f = _mm512_set1_ps(wr[3 * KF]), a3 = _mm512_fmadd_ps(f, x0, a3), b3 = _mm512_fmadd_ps(f, x1, b3);   \
        f = _mm512_set1_ps(wr[4 * KF]), a4 = _mm512_fmadd_ps(f, x0, a4), b4 = _mm512_fmadd_ps(f, x1, b4);   \
        f = _mm512_set1_ps(wr[5 * KF]), a5 = _mm512_fmadd_ps(f, x0, a5), b5 = _mm512_fmadd_ps(f, x1, b5);   \
        f = _mm512_set1_ps(wr[6 * KF]), a6 = _mm512_fmadd_ps(f, x0, a6), b6 = _mm512_fmadd_ps(f, x1, b6);   \
        f = _mm512_set1_ps(wr[7 * KF]), a7 = _mm512_fmadd_ps(f, x0, a7), b7 = _mm512_fmadd_ps(f, x1, b7);   \
    }
#define QVIZ_PX_STORE512(acc, yy, c)                                                                    \
    if (left > c) _mm512_mask_storeu_ps(out + ((c0 + c) * Ho + (yy)) * Wo + x0, st, acc);

/* rows y and y + 1 (if rows == 2): a row of taps whose input row lies outside the image loads zeros */
static QVIZ_AVX512_FN QVIZ_NO_PRE void qviz_conv_px512_rows(const float *x, size_t C, size_t H, size_t Wd,
                                                           const float *wk, size_t CO, size_t kh, size_t kw,
                                                           size_t pad, size_t y, int rows, float *out, size_t Ho,
                                                           size_t Wo) {
    const size_t KF = C * kh * kw;
    /* taps i that reach inside the image for row y or y + 1 */
    const long i0 = (long)pad > (long)y + rows - 1 ? (long)pad - (long)y - rows + 1 : 0;
    const long i1 = (long)(H + pad) - (long)y < (long)kh ? (long)(H + pad) - (long)y : (long)kh;
    __mmask16 jm[64];
    long js[64];
    for (size_t x0 = 0; x0 < Wo; x0 += 16) {
        const long lanes = Wo - x0 < 16 ? (long)(Wo - x0) : 16;
        for (size_t j = 0; j < kw; j++) { /* lanes whose input column lies inside the image */
            const long s = (long)x0 + (long)j - (long)pad, lo = s < 0 ? -s : 0;
            const long hi = (long)Wd - s < lanes ? (long)Wd - s : lanes;
            jm[j] = hi > lo ? (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1)) : 0;
            js[j] = s;
        }
        const __mmask16 st = (__mmask16)((1u << lanes) - 1);
        for (size_t c0 = 0; c0 < CO; c0 += 8) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0, b6 = a0, b7 = a0;
            for (size_t ci = 0; ci < C; ci++)
                for (long i = i0; i < i1; i++) {
                    const long r0 = (long)y + i - (long)pad, r1 = r0 + 1;
                    const __mmask16 v0 = r0 >= 0 && r0 < (long)H ? 0xFFFF : 0;
                    const __mmask16 v1 = rows > 1 && r1 >= 0 && r1 < (long)H ? 0xFFFF : 0;
                    /* rows outside the image are never dereferenced: their mask is zero */
                    const uintptr_t xr0 = (uintptr_t)(x + ci * H * Wd) + (uintptr_t)(r0 * (long)Wd * 4);
                    const float *wr = wk + c0 * KF + (ci * kh + (size_t)i) * kw;
                    for (size_t j = 0; j < kw; j++) {
                        const uintptr_t at = xr0 + (uintptr_t)(js[j] * 4);
                        const __m512 x0 = _mm512_maskz_loadu_ps(jm[j] & v0, (const void *)at);
                        const __m512 x1 = _mm512_maskz_loadu_ps(jm[j] & v1, (const void *)(at + Wd * 4));
                        QVIZ_PX_FMA16((wr + j), KF)
                    }
                }
            const size_t left = CO - c0;
            QVIZ_PX_STORE512(a0, y, 0) QVIZ_PX_STORE512(a1, y, 1) QVIZ_PX_STORE512(a2, y, 2)
            QVIZ_PX_STORE512(a3, y, 3) QVIZ_PX_STORE512(a4, y, 4) QVIZ_PX_STORE512(a5, y, 5)
            QVIZ_PX_STORE512(a6, y, 6) QVIZ_PX_STORE512(a7, y, 7)
            if (rows > 1) {
                QVIZ_PX_STORE512(b0, y + 1, 0) QVIZ_PX_STORE512(b1, y + 1, 1) QVIZ_PX_STORE512(b2, y + 1, 2)
                QVIZ_PX_STORE512(b3, y + 1, 3) QVIZ_PX_STORE512(b4, y + 1, 4) QVIZ_PX_STORE512(b5, y + 1, 5)
                QVIZ_PX_STORE512(b6, y + 1, 6) QVIZ_PX_STORE512(b7, y + 1, 7)
            }
        }
    }
}

static QVIZ_AVX2_FN QVIZ_NO_PRE void qviz_conv_px256(const float *x, size_t C, size_t H, size_t Wd, const float *wk,
                                                    size_t COp, size_t CO, size_t kh, size_t kw, size_t pad, size_t y,
                                                    float *out, size_t Ho, size_t Wo) {
    (void)COp;
    const size_t KF = C * kh * kw;
    const long i0 = (long)pad > (long)y ? (long)pad - (long)y : 0;
    const long i1 = (long)(H + pad) - (long)y < (long)kh ? (long)(H + pad) - (long)y : (long)kh;
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i jm[64];
    long js[64];
    unsigned char any[64];
    for (size_t x0 = 0; x0 < Wo; x0 += 8) {
        const long lanes = Wo - x0 < 8 ? (long)(Wo - x0) : 8;
        for (size_t j = 0; j < kw; j++) {
            const long s = (long)x0 + (long)j - (long)pad, lo = s < 0 ? -s : 0;
            const long hi = (long)Wd - s < lanes ? (long)Wd - s : lanes;
            jm[j] = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)hi), idx),
                                     _mm256_cmpgt_epi32(idx, _mm256_set1_epi32((int)lo - 1)));
            any[j] = hi > lo;
            js[j] = s;
        }
        const __m256i st = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)lanes), idx);
        for (size_t c0 = 0; c0 < CO; c0 += 8) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            for (size_t ci = 0; ci < C; ci++)
                for (long i = i0; i < i1; i++) {
                    const float *xr = x + (ci * H + (size_t)((long)y + i - (long)pad)) * Wd;
                    const float *wr = wk + c0 * KF + (ci * kh + (size_t)i) * kw;
                    for (size_t j = 0; j < kw; j++) {
                        if (!any[j]) continue;
                        const __m256 xv = _mm256_maskload_ps((const float *)((uintptr_t)xr + (uintptr_t)(js[j] * 4)), jm[j]);
                        QVIZ_PX_FMA8(_mm256_fmadd_ps, _mm256_set1_ps, xv, (wr + j), KF);
                    }
                }
            float *o = out + (c0 * Ho + y) * Wo + x0;
            const size_t plane = Ho * Wo, left = CO - c0;
            _mm256_maskstore_ps(o, st, a0);
            if (left > 1) _mm256_maskstore_ps(o + plane, st, a1);
            if (left > 2) _mm256_maskstore_ps(o + 2 * plane, st, a2);
            if (left > 3) _mm256_maskstore_ps(o + 3 * plane, st, a3);
            if (left > 4) _mm256_maskstore_ps(o + 4 * plane, st, a4);
            if (left > 5) _mm256_maskstore_ps(o + 5 * plane, st, a5);
            if (left > 6) _mm256_maskstore_ps(o + 6 * plane, st, a6);
            if (left > 7) _mm256_maskstore_ps(o + 7 * plane, st, a7);
        }
    }
}
#endif

typedef void (*qviz_conv_row_fn)(const float *x, size_t C, size_t H, size_t Wd, const float *wt, size_t COp,
                                 size_t CO, size_t kh, size_t kw, size_t pad, size_t y, float *out, size_t Ho,
                                 size_t Wo);
typedef struct {
    qviz_conv_row_fn fn;
    const float *x, *wt;
    float *out;
    size_t C, H, Wd, COp, CO, kh, kw, pad, Ho, Wo;
} qviz_conv_job;

/* AVX-512: task t is rows 2 y', 2 y' + 1 of an image */
static void qviz_conv_task2(void *arg, long t) {
    const qviz_conv_job *j = (const qviz_conv_job *)arg;
    const size_t pairs = (j->Ho + 1) / 2, b = (size_t)t / pairs, y = (size_t)t % pairs * 2;
#if QVIZ_X86 && defined(__GNUC__)
    qviz_conv_px512_rows(j->x + b * j->C * j->H * j->Wd, j->C, j->H, j->Wd, j->wt, j->CO, j->kh, j->kw, j->pad, y,
                         y + 1 < j->Ho ? 2 : 1, j->out + b * j->CO * j->Ho * j->Wo, j->Ho, j->Wo);
#else
    (void)j, (void)b, (void)y;
#endif
}

static void qviz_conv_task(void *arg, long t) {
    const qviz_conv_job *j = (const qviz_conv_job *)arg;
    const size_t b = (size_t)t / j->Ho, y = (size_t)t % j->Ho;
    j->fn(j->x + b * j->C * j->H * j->Wd, j->C, j->H, j->Wd, j->wt, j->COp, j->CO, j->kh, j->kw, j->pad, y,
          j->out + b * j->CO * j->Ho * j->Wo, j->Ho, j->Wo);
}

/* The SIMD paths run pixels in lanes (measured faster than channels in lanes at every layer tried, from
 * 003's 3 -> 8 channels on 16 x 16 to 64 -> 64 on 56 x 56 and 128 -> 256 on 7 x 7); the portable path
 * keeps channels in lanes (GCC vectors, no masked loads). */
static int qviz_conv_pixel_lanes(int path) { return QVIZ_X86 && path >= QVIZ_AVX2; }

#define QVIZ_CONV_STACK 4096 /* decoded filters of up to this many floats live on the stack */

/* Filters come as panels (qviz_make_panels of the [CO, C kh kw] codes). Returns 0, or -1 if there was no
 * memory for the decoded filters. */
static int qviz_lut_conv2d(int path, const float *x, size_t B, size_t C, size_t H, size_t Wd, const uint32_t *Bp,
                           size_t CO, size_t K32, int bits, const float *cb, size_t cb_stride, size_t kh, size_t kw,
                           size_t pad, float *out, size_t Ho, size_t Wo, int threads) {
    const size_t KF = C * kh * kw, COp = (CO + 7) / 8 * 8, per = (size_t)(32 / bits);
    const uint32_t mask = (1u << bits) - 1;
    const int lanes = qviz_conv_pixel_lanes(path);
    _Alignas(64) float stack[QVIZ_CONV_STACK]; /* vector loads never span two cache lines */
    float *wt = KF * COp <= QVIZ_CONV_STACK ? stack : (float *)aligned_alloc(64, (KF * COp * sizeof(float) + 63) / 64 * 64);
    if (!wt) return -1;
    /* pixels in lanes: wt[co][k]; channels in lanes: wt[k][co]; channels past CO are zero */
    const size_t sk = lanes ? 1 : COp, sc = lanes ? KF : 1;
    if (COp > CO) {
        if (lanes) memset(wt + CO * KF, 0, (COp - CO) * KF * sizeof(float));
        else for (size_t k = 0; k < KF; k++) memset(wt + k * COp + CO, 0, (COp - CO) * sizeof(float));
    }
    for (size_t co = 0; co < CO; co++) {
        const uint32_t *col = Bp + (co / QVIZ_PANEL) * K32 * QVIZ_PANEL + co % QVIZ_PANEL;
        const float *table = cb + co * cb_stride;
        float *dst = wt + co * sc;
        for (size_t w = 0, k = 0; k < KF; w++) {
            uint32_t word = col[w * QVIZ_PANEL];
            for (size_t c = 0; c < per && k < KF; c++, k++, word >>= bits) dst[k * sk] = table[word & mask];
        }
    }
    qviz_conv_job j;
    j.fn = qviz_conv_row_portable;
#if QVIZ_X86 && defined(__GNUC__)
    if (path >= QVIZ_AVX2) j.fn = qviz_conv_px256;
#endif
    j.x = x, j.wt = wt, j.out = out, j.C = C, j.H = H, j.Wd = Wd, j.COp = COp, j.CO = CO, j.kh = kh, j.kw = kw;
    j.pad = pad, j.Ho = Ho, j.Wo = Wo;
    const int team = (double)B * Ho * Wo * KF * COp < 4e6 ? 1 : threads;
    if (QVIZ_X86 && path >= QVIZ_AVX512)
        qviz_parallel(qviz_conv_task2, &j, (long)(B * ((Ho + 1) / 2)), team);
    else
        qviz_parallel(qviz_conv_task, &j, (long)(B * Ho), team);
    if (wt != stack) free(wt);
    return 0;
}


#include "_packed_panels.h"
#include "_packed_roof.h"

#endif /* QVIZ_PACKED_KERNELS_H */
