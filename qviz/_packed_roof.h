/* What the hardware can do, measured with the kernels' own instructions (included by _packed_kernels.h).
 *
 * qviz_roof runs a path's inner operation on operands held in registers, with as many independent
 * accumulators as the kernels' largest tile, so neither memory nor a dependency chain limits it: the
 * instruction roof a kernel is compared with. Kinds:
 *   POP: XOR + popcount + add (bit-MACs)  DOT: byte dot product, vpdpbusd or vpmaddubsw (MACs)
 *   FMA: float multiply-add (MACs)
 * qviz_read_words streams a buffer (the memory roof of a GEMV). Both return a checksum so that the
 * compiler cannot drop the work; *macs receives the operations done.
 */
#ifndef QVIZ_PACKED_ROOF_H
#define QVIZ_PACKED_ROOF_H

#include <stdatomic.h>

enum { QVIZ_ROOF_POP = 0, QVIZ_ROOF_DOT = 1, QVIZ_ROOF_FMA = 2 };

#if defined(__GNUC__)
#define QVIZ_KEEP(x, c) __asm__ volatile("" : "+" c(x))
#else
#define QVIZ_KEEP(x, c) (void)0
#endif
/* Accumulators that start equal and take the same updates are one value to the compiler: GCC kept a
 * single FMA chain of twelve and 16 of 24 dot products, and the roof counted the rest (1.5x too high).
 * Passing each through an empty asm once makes them distinct. */
#define QVIZ_KEEP_ROW(i, reg)                                                                           \
    QVIZ_KEEP(c##i##_0, reg); QVIZ_KEEP(c##i##_1, reg); QVIZ_KEEP(c##i##_2, reg); QVIZ_KEEP(c##i##_3, reg);

static int64_t qviz_roof_scalar(int popcnt_hw, int kind, long iters, double *macs) {
    uint64_t a0 = 0x9E3779B97F4A7C15ULL, a1 = 0xBF58476D1CE4E5B9ULL, b0 = 0x94D049BB133111EBULL,
             b1 = 0x2545F4914F6CDD1DULL;
    uint64_t s[8] = {0};
    for (long it = 0; it < iters; it++) {
        QVIZ_KEEP(a0, "r");
        QVIZ_KEEP(a1, "r");
        QVIZ_KEEP(b0, "r");
        QVIZ_KEEP(b1, "r");
        if (kind == QVIZ_ROOF_POP) {
#if QVIZ_X86 && defined(__GNUC__)
            if (popcnt_hw) {
                s[0] += (uint64_t)__builtin_popcountll(a0 ^ b0);
                s[1] += (uint64_t)__builtin_popcountll(a0 ^ b1);
                s[2] += (uint64_t)__builtin_popcountll(a1 ^ b0);
                s[3] += (uint64_t)__builtin_popcountll(a1 ^ b1);
                continue;
            }
#endif
            (void)popcnt_hw;
            s[0] += qviz_swar_popcount(a0 ^ b0);
            s[1] += qviz_swar_popcount(a0 ^ b1);
            s[2] += qviz_swar_popcount(a1 ^ b0);
            s[3] += qviz_swar_popcount(a1 ^ b1);
        } else {
            s[0] += (a0 & 255) * (b0 & 255);
            s[1] += (a0 & 255) * (b1 & 255);
            s[2] += (a1 & 255) * (b0 & 255);
            s[3] += (a1 & 255) * (b1 & 255);
        }
    }
    *macs = (double)iters * 4 * (kind == QVIZ_ROOF_POP ? 64 : 1);
    return (int64_t)(s[0] + s[1] + s[2] + s[3]);
}

#if QVIZ_X86 && defined(__GNUC__)
static QVIZ_POPCNT_FN int64_t qviz_roof_popcnt(int kind, long iters, double *macs) {
    return qviz_roof_scalar(1, kind, iters, macs);
}

/* 2 rows x 2 vectors. A popcount pair is what qviz_p256_pop spends: XOR of the low and of the high
 * nibbles (split once per operand, outside the pair), two lookups, two adds. */
QVIZ_INLINE QVIZ_AVX2_FN int64_t qviz_roof_avx2_body(const int kind, long iters, double *macs) {
    const __m256i T = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
    __m256i xl0 = _mm256_set1_epi8(3), xl1 = _mm256_set1_epi8(5), xh0 = _mm256_set1_epi8(6), xh1 = _mm256_set1_epi8(9);
    __m256i yl0 = _mm256_set1_epi8(10), yl1 = _mm256_set1_epi8(12), yh0 = _mm256_set1_epi8(1), yh1 = _mm256_set1_epi8(2);
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00;
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0, f4 = f0, f5 = f0, f6 = f0, f7 = f0, f8 = f0, f9 = f0;
    const __m256 fa = _mm256_set1_ps(1e-3f), fb = _mm256_set1_ps(0.5f);
    QVIZ_KEEP(c00, "x"); QVIZ_KEEP(c01, "x"); QVIZ_KEEP(c10, "x"); QVIZ_KEEP(c11, "x");
    QVIZ_KEEP(f0, "x"); QVIZ_KEEP(f1, "x"); QVIZ_KEEP(f2, "x"); QVIZ_KEEP(f3, "x"); QVIZ_KEEP(f4, "x");
    QVIZ_KEEP(f5, "x"); QVIZ_KEEP(f6, "x"); QVIZ_KEEP(f7, "x"); QVIZ_KEEP(f8, "x"); QVIZ_KEEP(f9, "x");
#define QVIZ_POP2(c, xl, xh, yl, yh)                                                                    \
    c = _mm256_add_epi8(_mm256_add_epi8(c, _mm256_shuffle_epi8(T, _mm256_xor_si256(xl, yl))),           \
                        _mm256_shuffle_epi8(T, _mm256_xor_si256(xh, yh)))
#define QVIZ_MADD2(c, x, y) c = _mm256_add_epi16(c, _mm256_maddubs_epi16(x, y))
    for (long it = 0; it < iters; it++) {
        if (kind != QVIZ_ROOF_FMA) { /* the FMA loop leaves them out: 16 ymm registers hold 10 chains + 2 */
            QVIZ_KEEP(xl0, "x");
            QVIZ_KEEP(xl1, "x");
            QVIZ_KEEP(xh0, "x");
            QVIZ_KEEP(xh1, "x");
            QVIZ_KEEP(yl0, "x");
            QVIZ_KEEP(yl1, "x");
            QVIZ_KEEP(yh0, "x");
            QVIZ_KEEP(yh1, "x");
        }
        if (kind == QVIZ_ROOF_POP) {
            QVIZ_POP2(c00, xl0, xh0, yl0, yh0);
            QVIZ_POP2(c01, xl0, xh0, yl1, yh1);
            QVIZ_POP2(c10, xl1, xh1, yl0, yh0);
            QVIZ_POP2(c11, xl1, xh1, yl1, yh1);
        } else if (kind == QVIZ_ROOF_DOT) {
            QVIZ_MADD2(c00, xl0, yl0);
            QVIZ_MADD2(c01, xl0, yl1);
            QVIZ_MADD2(c10, xl1, yl0);
            QVIZ_MADD2(c11, xl1, yl1);
            QVIZ_MADD2(c00, xh0, yh0);
            QVIZ_MADD2(c01, xh0, yh1);
            QVIZ_MADD2(c10, xh1, yh0);
            QVIZ_MADD2(c11, xh1, yh1);
        } else {
            f0 = _mm256_fmadd_ps(fa, f0, fb); f1 = _mm256_fmadd_ps(fa, f1, fb); f2 = _mm256_fmadd_ps(fa, f2, fb);
            f3 = _mm256_fmadd_ps(fa, f3, fb); f4 = _mm256_fmadd_ps(fa, f4, fb); f5 = _mm256_fmadd_ps(fa, f5, fb);
            f6 = _mm256_fmadd_ps(fa, f6, fb); f7 = _mm256_fmadd_ps(fa, f7, fb); f8 = _mm256_fmadd_ps(fa, f8, fb);
            f9 = _mm256_fmadd_ps(fa, f9, fb);
        }
    }
#undef QVIZ_POP2
#undef QVIZ_MADD2
    const __m256i z = _mm256_setzero_si256();
    const __m256i s = _mm256_add_epi64(_mm256_add_epi64(_mm256_sad_epu8(c00, z), _mm256_sad_epu8(c01, z)),
                                       _mm256_add_epi64(_mm256_sad_epu8(c10, z), _mm256_sad_epu8(c11, z)));
    const __m256 fs = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(f0, f1), _mm256_add_ps(f2, f3)),
                                    _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(f4, f5), _mm256_add_ps(f6, f7)), _mm256_add_ps(f8, f9)));
    *macs = (double)iters * (kind == QVIZ_ROOF_POP ? 4 * 256 : kind == QVIZ_ROOF_DOT ? 8 * 32 : 10 * 8);
    return qviz_avx2_hsum(s) + (int64_t)_mm256_cvtss_f32(fs);
}

static QVIZ_AVX2_FN QVIZ_NO_PRE int64_t qviz_roof_avx2(int kind, long iters, double *macs) {
    if (kind == QVIZ_ROOF_POP) return qviz_roof_avx2_body(QVIZ_ROOF_POP, iters, macs);
    if (kind == QVIZ_ROOF_DOT) return qviz_roof_avx2_body(QVIZ_ROOF_DOT, iters, macs);
    return qviz_roof_avx2_body(QVIZ_ROOF_FMA, iters, macs);
}

#if QVIZ_HAVE_AVXVNNI
/* AVX-VNNI's dot roof: 5 rows x 2 vectors, 10 vpdpbusd chains (rows 3 and 4 reuse the operands of rows 0
 * and 1), enough for its latency with every operand in a register; popcounts and FMAs are AVX2's. */
QVIZ_INLINE QVIZ_AVX2VNNI_FN int64_t qviz_roof_avx2vnni_dot(long iters, double *macs) {
    __m256i x0 = _mm256_set1_epi32(0x01234567), x1 = _mm256_set1_epi32(0x11111111), x2 = _mm256_set1_epi32(3);
    __m256i v0 = _mm256_set1_epi32(0x7654321), v1 = _mm256_set1_epi32(0x0A0A0A0A);
    __m256i c0_0 = _mm256_setzero_si256(), c0_1 = c0_0, c1_0 = c0_0, c1_1 = c0_0, c2_0 = c0_0, c2_1 = c0_0,
            c3_0 = c0_0, c3_1 = c0_0, c4_0 = c0_0, c4_1 = c0_0;
    QVIZ_KEEP(c0_0, "x"); QVIZ_KEEP(c0_1, "x"); QVIZ_KEEP(c1_0, "x"); QVIZ_KEEP(c1_1, "x"); QVIZ_KEEP(c2_0, "x");
    QVIZ_KEEP(c2_1, "x"); QVIZ_KEEP(c3_0, "x"); QVIZ_KEEP(c3_1, "x"); QVIZ_KEEP(c4_0, "x"); QVIZ_KEEP(c4_1, "x");
#define QVIZ_DP2(i, x)                                                                                  \
    c##i##_0 = _mm256_dpbusd_avx_epi32(c##i##_0, x, v0);                                                \
    c##i##_1 = _mm256_dpbusd_avx_epi32(c##i##_1, x, v1);
    for (long it = 0; it < iters; it++) {
        QVIZ_KEEP(x0, "x"); QVIZ_KEEP(x1, "x"); QVIZ_KEEP(x2, "x"); QVIZ_KEEP(v0, "x"); QVIZ_KEEP(v1, "x");
        QVIZ_DP2(0, x0) QVIZ_DP2(1, x1) QVIZ_DP2(2, x2) QVIZ_DP2(3, x0) QVIZ_DP2(4, x1)
    }
#undef QVIZ_DP2
    const __m256i s = _mm256_add_epi32(
        _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0_0, c0_1), _mm256_add_epi32(c1_0, c1_1)),
                         _mm256_add_epi32(_mm256_add_epi32(c2_0, c2_1), _mm256_add_epi32(c3_0, c3_1))),
        _mm256_add_epi32(c4_0, c4_1));
    *macs = (double)iters * 10 * 32;
    return qviz_avx2_hsum(s); /* a checksum that keeps the work: the 32-bit sums read as 64-bit lanes do */
}

static QVIZ_AVX2VNNI_FN QVIZ_NO_PRE int64_t qviz_roof_avx2vnni(int kind, long iters, double *macs) {
    if (kind == QVIZ_ROOF_DOT) return qviz_roof_avx2vnni_dot(iters, macs);
    if (kind == QVIZ_ROOF_POP) return qviz_roof_avx2_body(QVIZ_ROOF_POP, iters, macs);
    return qviz_roof_avx2_body(QVIZ_ROOF_FMA, iters, macs);
}
#endif

/* A 5 x 4 popcount tile as in qviz_p512_pop, 6 x 4 or 4 x 4 dot products, 12 FMA chains; named accumulators
 * (an array would live on the stack, see qviz_p512_pop). */
#define QVIZ_ROOF_POP_UPD(c, a, v) _mm512_add_epi32(c, _mm512_popcnt_epi32(_mm512_xor_si512(a, v)))
#define QVIZ_ROOF_ROW(i, UPD) QVIZ_ROW_UPD(i, UPD, QVIZ_ROOF_X5_##i)
#define QVIZ_ROOF_X5_0 x0
#define QVIZ_ROOF_X5_1 x1
#define QVIZ_ROOF_X5_2 x2
#define QVIZ_ROOF_X5_3 x3
#define QVIZ_ROOF_X5_4 x4
#define QVIZ_ROOF_X5_5 x4 /* unused: the popcount roof has 5 rows */
/* the VNNI dot roof: 24 vpdpbusd chains (its latency needs many) over 4 row operands, so that 24
 * accumulators and 8 operands fit the 32 registers; rows 4 and 5 reuse rows 0 and 1, which is why the
 * accumulators must be distinct to the compiler (QVIZ_KEEP_ROW). vpmaddubsw + add: 4 x 4 (a shared
 * operand pair would be one vpmaddubsw for two rows; the add's chain is short) */
#define QVIZ_ROOF_X_0 x0
#define QVIZ_ROOF_X_1 x1
#define QVIZ_ROOF_X_2 x2
#define QVIZ_ROOF_X_3 x3
#define QVIZ_ROOF_X_4 x0
#define QVIZ_ROOF_X_5 x1
#define QVIZ_ROOF_ROW4(i, UPD) QVIZ_ROW_UPD(i, UPD, QVIZ_ROOF_X_##i)
#define QVIZ_ROOF512_BODY(NAME, ATTR, DOT, DOT_ROWS)                                                              \
    QVIZ_INLINE ATTR int64_t NAME##_body(const int kind, long iters, double *macs) {                     \
        __m512i x0 = _mm512_set1_epi32(0x01234567), x1 = _mm512_set1_epi32(0x11111111), x2 = _mm512_set1_epi32(3), \
                x3 = _mm512_set1_epi32(0x0F0F0F0F), x4 = _mm512_set1_epi32(77); \
        __m512i v0 = _mm512_set1_epi32(0x7654321), v1 = _mm512_set1_epi32(0x55555555), v2 = _mm512_set1_epi32(9), \
                v3 = _mm512_set1_epi32(0x0A0A0A0A);                                                    \
        const __m512 fa = _mm512_set1_ps(1e-3f), fb = _mm512_set1_ps(0.5f);                             \
        QVIZ_TILE_DECL(__m512i, _mm512_setzero_si512());                                                \
        __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0, f4 = f0, f5 = f0, f6 = f0, f7 = f0, f8 = f0, \
               f9 = f0, f10 = f0, f11 = f0;                                                             \
        QVIZ_ROWS(QVIZ_KEEP_ROW, "v")                                                                   \
        QVIZ_KEEP(f0, "v"); QVIZ_KEEP(f1, "v"); QVIZ_KEEP(f2, "v"); QVIZ_KEEP(f3, "v"); QVIZ_KEEP(f4, "v"); \
        QVIZ_KEEP(f5, "v"); QVIZ_KEEP(f6, "v"); QVIZ_KEEP(f7, "v"); QVIZ_KEEP(f8, "v"); QVIZ_KEEP(f9, "v"); \
        QVIZ_KEEP(f10, "v"); QVIZ_KEEP(f11, "v");                                                       \
        for (long it = 0; it < iters; it++) {                                                           \
            QVIZ_KEEP(x0, "v"); QVIZ_KEEP(x1, "v"); QVIZ_KEEP(x2, "v"); QVIZ_KEEP(x3, "v");             \
            QVIZ_KEEP(x4, "v"); QVIZ_KEEP(v0, "v"); QVIZ_KEEP(v1, "v");             \
            QVIZ_KEEP(v2, "v"); QVIZ_KEEP(v3, "v");                                                     \
            if (kind == QVIZ_ROOF_POP) { /* 5 x 4: 20 chains + 9 operands in registers, no spills */  \
                const int MR = 5, NP = 4;                                                               \
                QVIZ_ROWS(QVIZ_ROOF_ROW, QVIZ_ROOF_POP_UPD)                                             \
            } else if (kind == QVIZ_ROOF_DOT) {                                                         \
                const int MR = DOT_ROWS, NP = 4;                                                        \
                QVIZ_ROWS(QVIZ_ROOF_ROW4, DOT)                                                          \
            } else {                                                                                    \
                f0 = _mm512_fmadd_ps(fa, f0, fb); f1 = _mm512_fmadd_ps(fa, f1, fb);                     \
                f2 = _mm512_fmadd_ps(fa, f2, fb); f3 = _mm512_fmadd_ps(fa, f3, fb);                     \
                f4 = _mm512_fmadd_ps(fa, f4, fb); f5 = _mm512_fmadd_ps(fa, f5, fb);                     \
                f6 = _mm512_fmadd_ps(fa, f6, fb); f7 = _mm512_fmadd_ps(fa, f7, fb);                     \
                f8 = _mm512_fmadd_ps(fa, f8, fb); f9 = _mm512_fmadd_ps(fa, f9, fb);                     \
                f10 = _mm512_fmadd_ps(fa, f10, fb); f11 = _mm512_fmadd_ps(fa, f11, fb);                 \
            }                                                                                           \
        }                                                                                               \
        __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0_0, c0_1), _mm512_add_epi32(c0_2, c0_3)), \
                                     _mm512_add_epi32(_mm512_add_epi32(c1_0, c1_1), _mm512_add_epi32(c1_2, c1_3))); \
        s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c2_0, c2_1), _mm512_add_epi32(c2_2, c2_3))); \
        s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c3_0, c3_1), _mm512_add_epi32(c3_2, c3_3))); \
        s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c4_0, c4_1), _mm512_add_epi32(c4_2, c4_3))); \
        s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(c5_0, c5_1), _mm512_add_epi32(c5_2, c5_3))); \
        __m512 fs = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(f0, f1), _mm512_add_ps(f2, f3)),           \
                                  _mm512_add_ps(_mm512_add_ps(f4, f5), _mm512_add_ps(f6, f7)));          \
        fs = _mm512_add_ps(fs, _mm512_add_ps(_mm512_add_ps(f8, f9), _mm512_add_ps(f10, f11)));           \
        *macs = (double)iters * (kind == QVIZ_ROOF_POP ? 20 * 512 : kind == QVIZ_ROOF_DOT ? DOT_ROWS * 4 * 64 : 12 * 16); \
        return (int64_t)_mm512_reduce_add_epi32(s) + (int64_t)_mm512_reduce_add_ps(fs);                 \
    }                                                                                                   \
    /* one loop per kind: the other kinds' accumulators would otherwise take registers */               \
    static ATTR QVIZ_NO_PRE int64_t NAME(int kind, long iters, double *macs) {                          \
        if (kind == QVIZ_ROOF_POP) return NAME##_body(QVIZ_ROOF_POP, iters, macs);                      \
        if (kind == QVIZ_ROOF_DOT) return NAME##_body(QVIZ_ROOF_DOT, iters, macs);                      \
        return NAME##_body(QVIZ_ROOF_FMA, iters, macs);                                                 \
    }
#define QVIZ_MADDUBS512(c, a, v) _mm512_add_epi16(c, _mm512_maddubs_epi16(a, v))
#define QVIZ_DPBUSD512(c, a, v) _mm512_dpbusd_epi32(c, a, v)
QVIZ_ROOF512_BODY(qviz_roof_avx512, QVIZ_AVX512_FN, QVIZ_MADDUBS512, 4)
QVIZ_ROOF512_BODY(qviz_roof_vnni, QVIZ_VNNI_FN, QVIZ_DPBUSD512, 6)

static QVIZ_AVX2_FN int64_t qviz_read_avx2(const uint64_t *buf, size_t words) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t w = 0;
    for (; w + 16 <= words; w += 16) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(buf + w)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(buf + w + 4)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(buf + w + 8)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(buf + w + 12)));
    }
    int64_t s = qviz_avx2_hsum(_mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
    for (; w < words; w++) s += (int64_t)buf[w];
    return s;
}

/* 512 bytes a step in 8 loads: at L2 speed a 256-bit loop with 4 sums read 10 bytes a cycle, half of
 * what a GEMV of warm weights reads there, so it was no roof for one. */
static QVIZ_AVX512_FN int64_t qviz_read_avx512(const uint64_t *buf, size_t words) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t w = 0;
    for (; w + 64 <= words; w += 64) {
        s0 = _mm512_add_epi64(s0, _mm512_add_epi64(_mm512_loadu_si512((const void *)(buf + w)),
                                                   _mm512_loadu_si512((const void *)(buf + w + 8))));
        s1 = _mm512_add_epi64(s1, _mm512_add_epi64(_mm512_loadu_si512((const void *)(buf + w + 16)),
                                                   _mm512_loadu_si512((const void *)(buf + w + 24))));
        s2 = _mm512_add_epi64(s2, _mm512_add_epi64(_mm512_loadu_si512((const void *)(buf + w + 32)),
                                                   _mm512_loadu_si512((const void *)(buf + w + 40))));
        s3 = _mm512_add_epi64(s3, _mm512_add_epi64(_mm512_loadu_si512((const void *)(buf + w + 48)),
                                                   _mm512_loadu_si512((const void *)(buf + w + 56))));
    }
    int64_t s = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    for (; w < words; w++) s += (int64_t)buf[w];
    return s;
}
#endif

static int64_t qviz_roof(int path, int kind, long iters, double *macs) {
#if QVIZ_X86 && defined(__GNUC__)
    if (path == QVIZ_AVX512VNNI) return qviz_roof_vnni(kind, iters, macs);
    if (path == QVIZ_AVX512) return qviz_roof_avx512(kind, iters, macs);
#if QVIZ_HAVE_AVXVNNI
    if (path == QVIZ_AVX2VNNI) return qviz_roof_avx2vnni(kind, iters, macs);
#endif
    if (path == QVIZ_AVX2) return qviz_roof_avx2(kind, iters, macs);
    if (path == QVIZ_POPCNT) return qviz_roof_popcnt(kind, iters, macs);
#endif
    (void)path;
    return qviz_roof_scalar(0, kind, iters, macs);
}

typedef struct {
    const uint64_t *buf;
    size_t words, chunk;
    _Atomic int64_t sum;
} qviz_read_job;

static void qviz_read_task(void *arg, long t) {
    qviz_read_job *j = (qviz_read_job *)arg;
    const size_t w0 = (size_t)t * j->chunk, n = j->words - w0 < j->chunk ? j->words - w0 : j->chunk;
    int64_t s = 0;
#if QVIZ_X86 && defined(__GNUC__)
    if (qviz_path_supported(QVIZ_AVX512))
        s = qviz_read_avx512(j->buf + w0, n);
    else if (qviz_path_supported(QVIZ_AVX2))
        s = qviz_read_avx2(j->buf + w0, n);
    else
#endif
        for (size_t w = 0; w < n; w++) s += (int64_t)j->buf[w0 + w];
    atomic_fetch_add(&j->sum, s);
}

/* Sum of every word of buf, `passes` times over, read by up to `threads` threads in chunks of 64 KiB
 * (each thread the same chunks every pass, as a GEMV's tasks). Several passes a call keep the call's
 * own cost out of a cache's bandwidth. */
static int64_t qviz_read_words(const uint64_t *buf, size_t words, int threads, long passes) {
    qviz_read_job j;
    j.buf = buf, j.words = words, j.chunk = 8192;
    atomic_init(&j.sum, 0);
    for (long p = 0; p < passes; p++)
        qviz_parallel(qviz_read_task, &j, (long)((words + j.chunk - 1) / j.chunk), threads);
    return atomic_load(&j.sum);
}

#endif /* QVIZ_PACKED_ROOF_H */
