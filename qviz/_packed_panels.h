/* Panel kernels: the GEMM-shaped inner loops behind qviz.packed, included by _packed_kernels.h.
 *
 * Why panels: a row-by-row dot product of packed rows ends every output with a horizontal reduction
 * and reloads both operands for every pair. Here the weights B [N, K] are laid out in panels of 16
 * rows ("columns" of the output): panel p holds, for every 32-bit word k of a packed row, the word k of
 * rows 16p .. 16p + 15 side by side, so one 512-bit load brings the same slice of K for 16 outputs,
 * one 32-bit lane per output. A 32-bit word of an activation row is broadcast to all lanes and one
 * vector instruction does 16 outputs' worth of work: an outer product, no reduction across lanes.
 * A tile of MR activation rows x NP panels keeps MR * NP accumulators in registers.
 *
 * The panel layout is a transpose of the row layout's 32-bit words, so one layout serves every code
 * width: 1-bit signs (XOR / AND + popcount), 2- and 4-bit codes (byte dot products after splitting
 * each byte into its fields) and codebook decoding (a register-resident table indexed by the code).
 *
 * Ops (enum qviz_panel_op):
 *   XOR: S = popcount(a XOR w)              binary sign matmul, out = K - 2 S (003 §3.2)
 *   AND: S = popcount(a AND w)              hybrid / 1-bit codes, out = popcount(a) - 2 S (003 Fig. 4.5)
 *   DOT2, DOT4: S = sum_k a_k w_k           unsigned 2- and 4-bit codes
 * Every path computes the same integers; qviz.packed self-checks each path against "portable".
 */
#ifndef QVIZ_PACKED_PANELS_H
#define QVIZ_PACKED_PANELS_H

#define QVIZ_PANEL 16   /* weight rows per panel: one per 32-bit lane of a 512-bit register */
#define QVIZ_TILE_MR 8  /* activation rows per tile, at most (AVX-512: 6, AVX2 popcount: 8) */
#define QVIZ_TILE_NP 4  /* panels per tile, at most */
#define QVIZ_TILE_LD (QVIZ_TILE_NP * QVIZ_PANEL)

enum { QVIZ_P_XOR = 0, QVIZ_P_AND = 1, QVIZ_P_DOT2 = 2, QVIZ_P_DOT4 = 3, QVIZ_P_N_OPS = 4 };

/* 32-bit word k of a packed row, independent of the host's byte order. */
static inline uint32_t qviz_word32(const uint64_t *row, size_t k) {
    return (uint32_t)(row[k >> 1] >> (32 * (k & 1)));
}

/* dst[(p * K32 + k) * 16 + j] = word k of row 16 p + j (zero for rows past N). */
static void qviz_make_panels(const uint64_t *B, size_t N, size_t W64, size_t K32, uint32_t *dst) {
    const size_t P = (N + QVIZ_PANEL - 1) / QVIZ_PANEL;
    for (size_t p = 0; p < P; p++)
        for (size_t j = 0; j < QVIZ_PANEL; j++) {
            const size_t n = p * QVIZ_PANEL + j;
            uint32_t *d = dst + p * K32 * QVIZ_PANEL + j;
            if (n < N)
                for (size_t k = 0; k < K32; k++) d[k * QVIZ_PANEL] = qviz_word32(B + n * W64, k);
            else
                for (size_t k = 0; k < K32; k++) d[k * QVIZ_PANEL] = 0;
        }
}

/* The inverse, for kernels that need rows (per-channel codebooks, 8-bit codes): W64 words per row. */
static void qviz_panels_to_rows(const uint32_t *src, size_t N, size_t K32, uint64_t *B, size_t W64) {
    for (size_t n = 0; n < N; n++) {
        const uint32_t *s = src + (n / QVIZ_PANEL) * K32 * QVIZ_PANEL + n % QVIZ_PANEL;
        for (size_t w = 0; w < W64; w++) {
            const uint64_t lo = 2 * w < K32 ? s[2 * w * QVIZ_PANEL] : 0;
            const uint64_t hi = 2 * w + 1 < K32 ? s[(2 * w + 1) * QVIZ_PANEL] : 0;
            B[n * W64 + w] = lo | hi << 32;
        }
    }
}

/* Set bits per row: popcount(a) of the hybrid epilogue, from the words themselves (never trusted input). */
#define QVIZ_DEFINE_ROW_POPCOUNTS(NAME, ATTR, POP)                                                      \
    static ATTR void NAME(const uint64_t *A, size_t M, size_t W64, int64_t *out) {                      \
        for (size_t m = 0; m < M; m++) {                                                                \
            int64_t s = 0;                                                                              \
            for (size_t w = 0; w < W64; w++) s += (int64_t)POP(A[m * W64 + w]);                         \
            out[m] = s;                                                                                 \
        }                                                                                               \
    }
QVIZ_DEFINE_ROW_POPCOUNTS(qviz_row_popcounts_portable, , qviz_swar_popcount)
#if QVIZ_X86 && defined(__GNUC__)
QVIZ_DEFINE_ROW_POPCOUNTS(qviz_row_popcounts_hw, QVIZ_POPCNT_FN, __builtin_popcountll)
#endif
static void qviz_row_popcounts(const uint64_t *A, size_t M, size_t W64, int64_t *out) {
#if QVIZ_X86 && defined(__GNUC__)
    if (qviz_path_supported(QVIZ_POPCNT)) {
        qviz_row_popcounts_hw(A, M, W64, out);
        return;
    }
#endif
    qviz_row_popcounts_portable(A, M, W64, out);
}

/* How an activation row is laid out for a path's kernel: S 32-bit slots per word k.
 * S = 1: the word itself. Otherwise the word split into S byte-field groups, slot g holding bits
 * [g * F, g * F + F) of every byte (F = 8 / S): the nibbles of a 4-bit code word, the 2-bit fields of a
 * 2-bit one; the AVX2 popcount splits 1-bit words into nibbles too, for its 16-entry table. */
static int qviz_panel_slots(int path, int op) {
    if (op == QVIZ_P_DOT2) return path >= QVIZ_AVX2 ? 4 : 1;
    if (op == QVIZ_P_DOT4) return path >= QVIZ_AVX2 ? 2 : 1;
    return qviz_avx2_class(path) ? 2 : 1;
}

static void qviz_split_rows(const uint64_t *A, size_t M, size_t W64, size_t K32, int S, uint32_t *dst) {
    const int F = 8 / S;
    const uint32_t mask = S == 1 ? 0xFFFFFFFFu : S == 2 ? 0x0F0F0F0Fu : S == 4 ? 0x03030303u : 0x01010101u;
    for (size_t m = 0; m < M; m++)
        for (size_t k = 0; k < K32; k++) {
            const uint32_t a = qviz_word32(A + m * W64, k);
            for (int g = 0; g < S; g++) dst[(m * K32 + k) * (size_t)S + (size_t)g] = (a >> (g * F)) & mask;
        }
}

/* A tile: out[i * ldo + q * 16 + j] = mul * S + add[i] for j < cols - 16 q, where S sums over k < K32
 * for activation row i (A + i * lda) and weight row 16 q + j of the panels at B (panel q at B + q * ldb).
 * The epilogue is applied in registers: a separate pass over a tile buffer costs as much as the loop
 * itself when K is short. int32 arithmetic wraps; callers keep every true result inside int32. */
typedef void (*qviz_panel_fn)(const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb, size_t K32, int mr,
                              int np, int32_t *out, size_t ldo, int cols, int32_t mul, const int32_t *add, const char *pf, size_t pfn);
#define QVIZ_PANEL_ARGS A, lda, B, ldb, K32, out, ldo, cols, mul, add, pf, pfn

/* ------------------------------------------------------------------------------------------------ */
/* Portable: plain C over the 16 lanes; the reference every other path is checked against.            */

static inline uint32_t qviz_dot_fields(uint32_t a, uint32_t b, int bits) {
    const uint32_t mask = (1u << bits) - 1;
    uint32_t s = 0;
    for (int f = 0; f < 32; f += bits) s += ((a >> f) & mask) * ((b >> f) & mask);
    return s;
}

#define QVIZ_DEFINE_SCALAR_PANEL(NAME, ATTR, POP)                                                        \
    static ATTR void NAME##_body(int op, const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb,  \
                                 size_t K32, int mr, int np, int32_t *out, size_t ldo, int cols,         \
                                 int32_t mul, const int32_t *add, const char *pf, size_t pfn) {                                     \
        for (int i = 0; i < mr; i++)                                                                     \
            for (int q = 0; q < np; q++)                                                                 \
                for (int j = 0; j < QVIZ_PANEL && q * QVIZ_PANEL + j < cols; j++) {                     \
                    uint32_t s = 0;                                                                      \
                    const uint32_t *a = A + (size_t)i * lda, *b = B + (size_t)q * ldb + j;               \
                    for (size_t k = 0; k < K32; k++) {                                                   \
                        const uint32_t x = a[k], y = b[k * QVIZ_PANEL];                                  \
                        s += op == QVIZ_P_XOR ? (uint32_t)POP(x ^ y)                                     \
                           : op == QVIZ_P_AND ? (uint32_t)POP(x & y)                                     \
                                              : qviz_dot_fields(x, y, op == QVIZ_P_DOT2 ? 2 : 4);        \
                    }                                                                                    \
                    out[(size_t)i * ldo + (size_t)(q * QVIZ_PANEL + j)] =                                \
                        (int32_t)((uint32_t)mul * s + (uint32_t)add[i]);                                 \
                }                                                                                        \
    }                                                                                                    \
    static void NAME##_xor(const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb, size_t K32, int mr, \
                           int np, int32_t *out, size_t ldo, int cols, int32_t mul, const int32_t *add, const char *pf, size_t pfn) { \
        NAME##_body(QVIZ_P_XOR, A, lda, B, ldb, K32, mr, np, out, ldo, cols, mul, add, pf, pfn);                \
    } \
    static void NAME##_and(const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb, size_t K32, int mr, \
                           int np, int32_t *out, size_t ldo, int cols, int32_t mul, const int32_t *add, const char *pf, size_t pfn) { \
        NAME##_body(QVIZ_P_AND, A, lda, B, ldb, K32, mr, np, out, ldo, cols, mul, add, pf, pfn);                \
    } \
    static void NAME##_dot2(const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb, size_t K32, int mr, \
                           int np, int32_t *out, size_t ldo, int cols, int32_t mul, const int32_t *add, const char *pf, size_t pfn) { \
        NAME##_body(QVIZ_P_DOT2, A, lda, B, ldb, K32, mr, np, out, ldo, cols, mul, add, pf, pfn);                \
    } \
    static void NAME##_dot4(const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb, size_t K32, int mr, \
                           int np, int32_t *out, size_t ldo, int cols, int32_t mul, const int32_t *add, const char *pf, size_t pfn) { \
        NAME##_body(QVIZ_P_DOT4, A, lda, B, ldb, K32, mr, np, out, ldo, cols, mul, add, pf, pfn);                \
    }

static inline uint32_t qviz_swar_popcount32(uint32_t x) { return (uint32_t)qviz_swar_popcount(x); }
QVIZ_DEFINE_SCALAR_PANEL(qviz_panel_portable, , qviz_swar_popcount32)

#if QVIZ_X86 && defined(__GNUC__)
QVIZ_DEFINE_SCALAR_PANEL(qviz_panel_popcnt, QVIZ_POPCNT_FN, __builtin_popcount)

/* Instantiate BODY(MODE, MR, NP, ...) for every tile edge, so MR and NP are compile-time constants
 * and the accumulators live in registers. */
/* Every tile edge (MR x NP) is its own function, so MR and NP are compile-time constants, the
 * accumulators live in registers, and the register allocator sees one loop at a time (with all 24
 * inlined into one switch, GCC 12 left the hot loop 1.7x slower). */
#define QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, MR, NP)                                                    \
    static __attribute__((noinline)) ATTR QVIZ_NO_PRE void NAME##_##MR##x##NP(QVIZ_BODY_PARAMS) {        \
        BODY(MODE, MR, NP, QVIZ_PANEL_ARGS);                                                            \
    }
#define QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, MR)                                                    \
    QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, MR, 1) QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, MR, 2)             \
    QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, MR, 3) QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, MR, 4)
#define QVIZ_T(NAME, MR, NP)                                                                            \
    case ((MR)-1) * QVIZ_TILE_NP + (NP)-1: NAME##_##MR##x##NP(QVIZ_PANEL_ARGS); break;
#define QVIZ_T_NP(NAME, MR) QVIZ_T(NAME, MR, 1) QVIZ_T(NAME, MR, 2) QVIZ_T(NAME, MR, 3) QVIZ_T(NAME, MR, 4)
/* NAME(...) dispatching to NAME_MRxNP for MR <= ROWS (4 or 6), NP <= 4 */
#define QVIZ_PANEL_FN4(NAME, ATTR, BODY, MODE)                                                          \
    QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 1) QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 2)             \
    QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 3) QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 4)             \
    static void NAME(const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb, size_t K32, int mr, int np, \
                     int32_t *out, size_t ldo, int cols, int32_t mul, const int32_t *add, const char *pf, size_t pfn) {             \
        switch ((mr - 1) * QVIZ_TILE_NP + np - 1) {                                                     \
            QVIZ_T_NP(NAME, 1) QVIZ_T_NP(NAME, 2) QVIZ_T_NP(NAME, 3) QVIZ_T_NP(NAME, 4)                  \
        default: break;                                                                                 \
        }                                                                                               \
    }
#define QVIZ_PANEL_FN6(NAME, ATTR, BODY, MODE)                                                          \
    QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 1) QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 2)             \
    QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 3) QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 4)             \
    QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 5) QVIZ_TILE_FNS_NP(NAME, ATTR, BODY, MODE, 6)             \
    static void NAME(const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb, size_t K32, int mr, int np, \
                     int32_t *out, size_t ldo, int cols, int32_t mul, const int32_t *add, const char *pf, size_t pfn) {             \
        switch ((mr - 1) * QVIZ_TILE_NP + np - 1) {                                                     \
            QVIZ_T_NP(NAME, 1) QVIZ_T_NP(NAME, 2) QVIZ_T_NP(NAME, 3) QVIZ_T_NP(NAME, 4)                  \
            QVIZ_T_NP(NAME, 5) QVIZ_T_NP(NAME, 6)                                                       \
        default: break;                                                                                 \
        }                                                                                               \
    }
/* One panel, up to 6 rows (AVX-VNNI dot products) or 8 (AVX2 popcount, AVX2 dot products): NAME_1x1 ..
 * NAME_Rx1 and NAME dispatching to them by mr. */
#define QVIZ_PANEL_SIGNATURE(NAME)                                                                      \
    static void NAME(const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb, size_t K32, int mr, int np, \
                     int32_t *out, size_t ldo, int cols, int32_t mul, const int32_t *add, const char *pf, size_t pfn)
#define QVIZ_ROWS_CASE(NAME, R) case R: NAME##_##R##x1(QVIZ_PANEL_ARGS); break;
#define QVIZ_TILE_FNS_ROWS6(NAME, ATTR, BODY, MODE)                                                     \
    QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, 1, 1) QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, 2, 1)               \
    QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, 3, 1) QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, 4, 1)               \
    QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, 5, 1) QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, 6, 1)
#define QVIZ_ROWS_CASES5(NAME)                                                                          \
    QVIZ_ROWS_CASE(NAME, 1) QVIZ_ROWS_CASE(NAME, 2) QVIZ_ROWS_CASE(NAME, 3) QVIZ_ROWS_CASE(NAME, 4)     \
    QVIZ_ROWS_CASE(NAME, 5)
#define QVIZ_PANEL_FN_R6(NAME, ATTR, BODY, MODE)                                                        \
    QVIZ_TILE_FNS_ROWS6(NAME, ATTR, BODY, MODE)                                                         \
    QVIZ_PANEL_SIGNATURE(NAME) {                                                                        \
        (void)np;                                                                                       \
        switch (mr) {                                                                                   \
            QVIZ_ROWS_CASES5(NAME)                                                                      \
        default: NAME##_6x1(QVIZ_PANEL_ARGS); break;                                                    \
        }                                                                                               \
    }
#define QVIZ_PANEL_FN_R8(NAME, ATTR, BODY, MODE)                                                        \
    QVIZ_TILE_FNS_ROWS6(NAME, ATTR, BODY, MODE)                                                         \
    QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, 7, 1) QVIZ_TILE_FN(NAME, ATTR, BODY, MODE, 8, 1)               \
    QVIZ_PANEL_SIGNATURE(NAME) {                                                                        \
        (void)np;                                                                                       \
        switch (mr) {                                                                                   \
            QVIZ_ROWS_CASES5(NAME) QVIZ_ROWS_CASE(NAME, 6) QVIZ_ROWS_CASE(NAME, 7)                      \
        default: NAME##_8x1(QVIZ_PANEL_ARGS); break;                                                    \
        }                                                                                               \
    }
#define QVIZ_BODY_PARAMS                                                                                \
    const uint32_t *A, size_t lda, const uint32_t *B, size_t ldb, size_t K32, int32_t *out, size_t ldo, int cols, \
        int32_t mul, const int32_t *add, const char *pf, size_t pfn

/* Software prefetch of the next block of panels (pf, pfn cache lines; NULL for none): spread over the
 * K32 steps of the tile, npf lines a step. Weights that come from DRAM (a 2 MiB layer after another
 * layer flushed the caches) are otherwise fetched when the first row tile of a block asks for them, at
 * a rate one core's DRAM bandwidth cannot give; this way the fetch overlaps every tile of the block. */
#define QVIZ_PREFETCH_PER_K(K32) (pf && MR > 1 ? (pfn + (K32)-1) / (K32) : 0)
#define QVIZ_PREFETCH_NEXT(k)                                                                           \
    for (size_t l = (k) * npf, e = l + npf < pfn ? l + npf : pfn; l < e; l++)                           \
        _mm_prefetch(pf + l * 64, _MM_HINT_T0)

/* How far ahead (in steps of K) a GEMV tile prefetches its own panels. Measured with weights from DRAM
 * (4096 x 4096, one thread): popcount 16 steps (1 KiB a panel) was best, codebook 32 (16 -> 21 GB/s,
 * 32 -> 27 GB/s at 4 bits; farther ahead was slower). Streaming while computing stayed near 20-27 GB/s
 * on this machine whatever the distance and with 2 MiB pages, against 50 GB/s for a pure read. */
#define QVIZ_GEMV_AHEAD 16
#define QVIZ_GEMV_AHEAD_LUT 32
/* A GEMV tile (MR == 1) reads its NPANELS panels (panel q at B + q * ldb, K32 words of 16 lanes) once:
 * it fetches each AHEAD steps of K ahead (at most K32), and over its last steps the same lines of the
 * next block of panels, which a GEMV tile gets as pf (pfn lines, contiguous panels of the same ldb; NULL
 * when it is the last). Without the second part each block began with AHEAD lines of every panel after
 * its first coming from DRAM on demand (4096 x 4096 2-bit codebook GEMV from DRAM, 2 threads: 0.21 ->
 * 0.17 ms). */
#define QVIZ_GEMV_FETCH(k, AHEAD, NPANELS)                                                              \
    if (MR == 1) {                                                                                      \
        const size_t kp_ = (k) + ((size_t)(AHEAD) < K32 ? (size_t)(AHEAD) : K32);                       \
        for (int q_ = 0; q_ < (NPANELS); q_++) {                                                        \
            if (kp_ < K32)                                                                              \
                _mm_prefetch((const char *)(B + (size_t)q_ * ldb + kp_ * QVIZ_PANEL), _MM_HINT_T0);     \
            else if (((size_t)q_ * ldb + (kp_ - K32) * QVIZ_PANEL) * 4 < pfn * 64)                      \
                _mm_prefetch(pf + ((size_t)q_ * ldb + (kp_ - K32) * QVIZ_PANEL) * 4, _MM_HINT_T0);       \
        }                                                                                               \
    }
#define QVIZ_INLINE static inline __attribute__((always_inline))
#define QVIZ_VNNI_FN __attribute__((target("avx512f,avx512bw,avx512vpopcntdq,avx512vnni,avx2,fma,popcnt")))

QVIZ_INLINE QVIZ_AVX2_FN void qviz_store256(int32_t *o, int n, __m256i acc, int32_t mul, int32_t add) {
    if (n <= 0) return;
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i v = _mm256_add_epi32(_mm256_mullo_epi32(acc, _mm256_set1_epi32(mul)), _mm256_set1_epi32(add));
    _mm256_maskstore_epi32(o, keep, v);
}

/* The epilogue in registers: out[i, q * 16 + j] = mul * c_i_q + add[i], plain full-width stores; the
 * kernels' usual factors (-2 binary, 2 hybrid, 1 dot products) as shifts, since vpmulld takes 2 uops on
 * one port (24 of them were ~4% of a tile with K = 1024). The
 * tile functions are only handed whole tiles (the task gives a partial one a scratch tile and copies
 * what is valid), so neither a mask nor a call sits in the kernel function (either made GCC 12 keep the
 * accumulators on the stack, measured 1.8x slower), and nothing makes a round trip through memory. */
#define QVIZ_OUT512(i, q, c)                                                                            \
    _mm512_storeu_si512((void *)(out + (size_t)(i) * ldo + (q) * QVIZ_PANEL),                            \
                        mul == -2 ? _mm512_sub_epi32(addv##i, _mm512_slli_epi32(c, 1))                   \
                        : mul == 2 ? _mm512_add_epi32(_mm512_slli_epi32(c, 1), addv##i)                  \
                        : mul == 1 ? _mm512_add_epi32(c, addv##i)                                        \
                                   : _mm512_add_epi32(_mm512_mullo_epi32(c, mulv), addv##i));
#define QVIZ_ADDV(i, unused) const __m512i addv##i = _mm512_set1_epi32(MR > i ? add[i] : 0);
#define QVIZ_EPILOGUE512(STORE_ROW)                                                                     \
    {                                                                                                   \
        const __m512i mulv = _mm512_set1_epi32(mul);                                                    \
        QVIZ_ROWS(QVIZ_ADDV, 0)                                                                         \
        QVIZ_ROWS(STORE_ROW, QVIZ_OUT512)                                                               \
        (void)cols;                                                                                     \
    }

/* ------------------------------------------------------------------------------------------------ */
/* AVX-512 VPOPCNTDQ: XOR / AND, popcount per 32-bit lane, add: 3 instructions per 512 bit-MACs.      */
/* The accumulators are named variables, not an array: GCC keeps an array of 24 vectors on the stack  */
/* (a load and a store per update, measured 40% slower), named ones in registers. Tiles smaller than  */
/* 6 x 4 drop the unused ones at compile time (MR and NP are constants in every instantiation).       */

#define QVIZ_TILE_DECL(T, ZERO)                                                                         \
    T c0_0 = ZERO, c0_1 = ZERO, c0_2 = ZERO, c0_3 = ZERO, c1_0 = ZERO, c1_1 = ZERO, c1_2 = ZERO, c1_3 = ZERO, \
      c2_0 = ZERO, c2_1 = ZERO, c2_2 = ZERO, c2_3 = ZERO, c3_0 = ZERO, c3_1 = ZERO, c3_2 = ZERO, c3_3 = ZERO, \
      c4_0 = ZERO, c4_1 = ZERO, c4_2 = ZERO, c4_3 = ZERO, c5_0 = ZERO, c5_1 = ZERO, c5_2 = ZERO, c5_3 = ZERO
/* row i of the tile: c_i_q = UPD(c_i_q, a, v_q) for the NP weight vectors v0..v3 */
#define QVIZ_ROW_UPD(i, UPD, a)                                                                         \
    if (MR > i) {                                                                                       \
        if (NP > 0) c##i##_0 = UPD(c##i##_0, a, v0);                                                    \
        if (NP > 1) c##i##_1 = UPD(c##i##_1, a, v1);                                                    \
        if (NP > 2) c##i##_2 = UPD(c##i##_2, a, v2);                                                    \
        if (NP > 3) c##i##_3 = UPD(c##i##_3, a, v3);                                                    \
    }
#define QVIZ_ROW_STORE(i, STORE)                                                                        \
    if (MR > i) {                                                                                       \
        if (NP > 0) STORE(i, 0, c##i##_0);                                                              \
        if (NP > 1) STORE(i, 1, c##i##_1);                                                              \
        if (NP > 2) STORE(i, 2, c##i##_2);                                                              \
        if (NP > 3) STORE(i, 3, c##i##_3);                                                              \
    }
#define QVIZ_ROWS(X, ...) X(0, __VA_ARGS__) X(1, __VA_ARGS__) X(2, __VA_ARGS__) X(3, __VA_ARGS__) X(4, __VA_ARGS__) \
    X(5, __VA_ARGS__)
#define QVIZ_LOAD512(q) (NP > q ? _mm512_loadu_si512((const void *)(B + q * ldb + k * QVIZ_PANEL)) : _mm512_setzero_si512())

#define QVIZ_XOR_UPD(c, a, v) _mm512_add_epi32(c, _mm512_popcnt_epi32(_mm512_xor_si512(a, v)))
#define QVIZ_AND_UPD(c, a, v) _mm512_add_epi32(c, _mm512_popcnt_epi32(_mm512_and_si512(a, v)))
#define QVIZ_POP_ROW(i, UPD)                                                                            \
    if (MR > i) {                                                                                       \
        const __m512i a##i = _mm512_set1_epi32((int)A[i * lda + k]);                                    \
        QVIZ_ROW_UPD(i, UPD, a##i)                                                                      \
    }

QVIZ_INLINE QVIZ_AVX512_FN void qviz_p512_pop(const int AND, const int MR, const int NP, QVIZ_BODY_PARAMS) {
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    QVIZ_TILE_DECL(__m512i, _mm512_setzero_si512());
    for (size_t k = 0; k < K32; k++) {
        QVIZ_PREFETCH_NEXT(k);
        const __m512i v0 = QVIZ_LOAD512(0), v1 = QVIZ_LOAD512(1), v2 = QVIZ_LOAD512(2), v3 = QVIZ_LOAD512(3);
        QVIZ_GEMV_FETCH(k, QVIZ_GEMV_AHEAD, NP)
        if (AND) {
            QVIZ_ROWS(QVIZ_POP_ROW, QVIZ_AND_UPD)
        } else {
            QVIZ_ROWS(QVIZ_POP_ROW, QVIZ_XOR_UPD)
        }
    }
    QVIZ_EPILOGUE512(QVIZ_ROW_STORE)
}

/* Byte dot products of b-bit codes. A holds each word split into G = 8 / BITS field groups; the same
 * split of a weight vector is two instructions, shared by the MR rows. Byte t of group g holds code
 * t G + g of the word on both sides, so the 4-byte sums of vpdpbusd / vpmaddubsw add up whole words. */
#define QVIZ_GROUP512(v, g) _mm512_and_si512(_mm512_srli_epi32(v, (g) * BITS), mask)
#define QVIZ_VNNI_UPD(c, a, v) _mm512_dpbusd_epi32(c, a, v)
#define QVIZ_MADD_UPD(c, a, v) _mm512_add_epi16(c, _mm512_maddubs_epi16(a, v))
#define QVIZ_DOT_ROW(i, UPD)                                                                            \
    if (MR > i) {                                                                                       \
        const __m512i a##i = _mm512_set1_epi32((int)A[i * lda + k * (size_t)G + (size_t)g]);            \
        QVIZ_ROW_UPD(i, UPD, a##i)                                                                      \
    }

QVIZ_INLINE QVIZ_VNNI_FN void qviz_p512_vnni(const int BITS, const int MR, const int NP, QVIZ_BODY_PARAMS) {
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    const int G = 8 / BITS;
    const __m512i mask = _mm512_set1_epi8(BITS == 4 ? 0x0F : 0x03);
    QVIZ_TILE_DECL(__m512i, _mm512_setzero_si512());
    for (size_t k = 0; k < K32; k++) {
        QVIZ_PREFETCH_NEXT(k);
        QVIZ_GEMV_FETCH(k, QVIZ_GEMV_AHEAD, NP)
        for (int g = 0; g < G; g++) {
            /* the weight vectors are loaded again for each group (the shift takes the load as its operand):
             * with no raw copies held, 6 rows x 4 panels of accumulators fit the registers */
            const __m512i v0 = QVIZ_GROUP512(QVIZ_LOAD512(0), g), v1 = QVIZ_GROUP512(QVIZ_LOAD512(1), g),
                          v2 = QVIZ_GROUP512(QVIZ_LOAD512(2), g), v3 = QVIZ_GROUP512(QVIZ_LOAD512(3), g);
            QVIZ_ROWS(QVIZ_DOT_ROW, QVIZ_VNNI_UPD)
        }
    }
    QVIZ_EPILOGUE512(QVIZ_ROW_STORE)
}

/* The same from weights split beforehand (qviz_split_block512): field group g of word k of panel q is
 * the vector at B + q * ldb + (k G + g) * 16, so the loop is loads and dot products only. A block of
 * weights is split once and then serves every row tile (the split was 17% of the VNNI loop). */
QVIZ_INLINE QVIZ_VNNI_FN void qviz_p512_vnni_split(const int BITS, const int MR, const int NP, QVIZ_BODY_PARAMS) {
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    const int G = 8 / BITS;
    QVIZ_TILE_DECL(__m512i, _mm512_setzero_si512());
    for (size_t k = 0; k < K32; k++) {
        QVIZ_PREFETCH_NEXT(k);
        for (int g = 0; g < G; g++) {
            const size_t at = (k * (size_t)G + (size_t)g) * QVIZ_PANEL;
#define QVIZ_LOAD_SPLIT(q) (NP > q ? _mm512_loadu_si512((const void *)(B + q * ldb + at)) : _mm512_setzero_si512())
            const __m512i v0 = QVIZ_LOAD_SPLIT(0), v1 = QVIZ_LOAD_SPLIT(1), v2 = QVIZ_LOAD_SPLIT(2),
                          v3 = QVIZ_LOAD_SPLIT(3);
#undef QVIZ_LOAD_SPLIT
            QVIZ_ROWS(QVIZ_DOT_ROW, QVIZ_VNNI_UPD)
        }
    }
    QVIZ_EPILOGUE512(QVIZ_ROW_STORE)
}

/* np panels of K32 words at B (panel q at B + q * ldb) into their field groups at dst, as
 * qviz_p512_vnni_split reads them: dst + q * K32 * G * 16 + (k G + g) * 16. */
static QVIZ_AVX512_FN void qviz_split_block512(const uint32_t *B, size_t ldb, size_t K32, int np, int bits,
                                               uint32_t *dst) {
    const int G = 8 / bits;
    const __m512i mask = _mm512_set1_epi8(bits == 4 ? 0x0F : 0x03);
    for (int q = 0; q < np; q++)
        for (size_t k = 0; k < K32; k++) {
            const __m512i w = _mm512_loadu_si512((const void *)(B + (size_t)q * ldb + k * QVIZ_PANEL));
            uint32_t *o = dst + ((size_t)q * K32 + k) * (size_t)G * QVIZ_PANEL;
            for (int g = 0; g < G; g++)
                _mm512_storeu_si512((void *)(o + (size_t)g * QVIZ_PANEL),
                                    _mm512_and_si512(_mm512_srli_epi32(w, (unsigned)(g * bits)), mask));
        }
}

/* Without VNNI: vpmaddubsw sums byte pairs into 16-bit lanes (at most 2 x 15 x 15 = 450 per group);
 * 16-bit sums are widened every 32 words, before they could pass 32767 (32 x 2 x 450 = 28800). */
#define QVIZ_WIDEN_ROW(i, unused)                                                                       \
    if (MR > i) {                                                                                       \
        if (NP > 0) { w##i##_0 = _mm512_add_epi32(w##i##_0, _mm512_madd_epi16(c##i##_0, ones)); c##i##_0 = zero; } \
        if (NP > 1) { w##i##_1 = _mm512_add_epi32(w##i##_1, _mm512_madd_epi16(c##i##_1, ones)); c##i##_1 = zero; } \
        if (NP > 2) { w##i##_2 = _mm512_add_epi32(w##i##_2, _mm512_madd_epi16(c##i##_2, ones)); c##i##_2 = zero; } \
        if (NP > 3) { w##i##_3 = _mm512_add_epi32(w##i##_3, _mm512_madd_epi16(c##i##_3, ones)); c##i##_3 = zero; } \
    }
#define QVIZ_WSTORE_ROW(i, STORE)                                                                       \
    if (MR > i) {                                                                                       \
        if (NP > 0) STORE(i, 0, w##i##_0)                                                               \
        if (NP > 1) STORE(i, 1, w##i##_1)                                                               \
        if (NP > 2) STORE(i, 2, w##i##_2)                                                               \
        if (NP > 3) STORE(i, 3, w##i##_3)                                                               \
    }

QVIZ_INLINE QVIZ_AVX512_FN void qviz_p512_dot(const int BITS, const int MR, const int NP, QVIZ_BODY_PARAMS) {
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    const int G = 8 / BITS;
    const __m512i mask = _mm512_set1_epi8(BITS == 4 ? 0x0F : 0x03), ones = _mm512_set1_epi16(1);
    const __m512i zero = _mm512_setzero_si512();
    QVIZ_TILE_DECL(__m512i, zero);
    __m512i w0_0 = zero, w0_1 = zero, w0_2 = zero, w0_3 = zero, w1_0 = zero, w1_1 = zero, w1_2 = zero, w1_3 = zero,
            w2_0 = zero, w2_1 = zero, w2_2 = zero, w2_3 = zero, w3_0 = zero, w3_1 = zero, w3_2 = zero, w3_3 = zero,
            w4_0 = zero, w4_1 = zero, w4_2 = zero, w4_3 = zero, w5_0 = zero, w5_1 = zero, w5_2 = zero, w5_3 = zero;
    for (size_t k0 = 0; k0 < K32; k0 += 32) {
        const size_t k1 = k0 + 32 < K32 ? k0 + 32 : K32;
        for (size_t k = k0; k < k1; k++) {
            QVIZ_PREFETCH_NEXT(k);
            QVIZ_GEMV_FETCH(k, QVIZ_GEMV_AHEAD, NP)
            const __m512i u0 = QVIZ_LOAD512(0), u1 = QVIZ_LOAD512(1), u2 = QVIZ_LOAD512(2), u3 = QVIZ_LOAD512(3);
            for (int g = 0; g < G; g++) {
                const __m512i v0 = QVIZ_GROUP512(u0, g), v1 = QVIZ_GROUP512(u1, g), v2 = QVIZ_GROUP512(u2, g),
                              v3 = QVIZ_GROUP512(u3, g);
                QVIZ_ROWS(QVIZ_DOT_ROW, QVIZ_MADD_UPD)
            }
        }
        QVIZ_ROWS(QVIZ_WIDEN_ROW, 0)
    }
    QVIZ_EPILOGUE512(QVIZ_WSTORE_ROW)
}

QVIZ_PANEL_FN6(qviz_panel_avx512_xor, QVIZ_AVX512_FN, qviz_p512_pop, 0)
QVIZ_PANEL_FN6(qviz_panel_avx512_and, QVIZ_AVX512_FN, qviz_p512_pop, 1)
QVIZ_PANEL_FN4(qviz_panel_avx512_dot2, QVIZ_AVX512_FN, qviz_p512_dot, 2)
QVIZ_PANEL_FN4(qviz_panel_avx512_dot4, QVIZ_AVX512_FN, qviz_p512_dot, 4)
QVIZ_PANEL_FN6(qviz_panel_vnni_dot2, QVIZ_VNNI_FN, qviz_p512_vnni, 2)
QVIZ_PANEL_FN6(qviz_panel_vnni_dot4, QVIZ_VNNI_FN, qviz_p512_vnni, 4)
QVIZ_PANEL_FN6(qviz_panel_vnni_split_dot2, QVIZ_VNNI_FN, qviz_p512_vnni_split, 2)
QVIZ_PANEL_FN6(qviz_panel_vnni_split_dot4, QVIZ_VNNI_FN, qviz_p512_vnni_split, 4)

/* ------------------------------------------------------------------------------------------------ */
/* AVX2: no vector popcount. Per-byte counts come from a 16-entry nibble table (vpshufb); A arrives    */
/* split into low and high nibbles and a weight vector is split once for the MR rows, since            */
/* (a XOR b) AND 0x0F = (a AND 0x0F) XOR (b AND 0x0F): 6 instructions per 256 bit-MACs. Byte counts    */
/* (at most 8 per word) are widened every 31 words, before a byte could pass 255. One panel = 2 ymm.  */

/* From 3 rows on, one half panel (8 lanes) at a time: the weight split is 3 instructions shared by up to 8 rows, and the
 * 8 byte accumulators, the table, the mask, the split weights and two broadcasts fit the 16 registers
 * (with both halves at once, 4 rows already spilled an accumulator every step). The 32-bit sums live
 * in memory: they are touched every 31 steps. */
#define QVIZ_POP256_ROW(i)                                                                              \
    if (MR > i) {                                                                                       \
        const __m256i al = _mm256_set1_epi32((int)A[i * lda + 2 * k]);                                 \
        const __m256i ah = _mm256_set1_epi32((int)A[i * lda + 2 * k + 1]);                             \
        c##i = _mm256_add_epi8(c##i, _mm256_add_epi8(_mm256_shuffle_epi8(T, QVIZ_OP256(al, l)),         \
                                                     _mm256_shuffle_epi8(T, QVIZ_OP256(ah, h))));       \
    }
#define QVIZ_WIDEN256(i)                                                                                \
    if (MR > i) wide[i] = _mm256_add_epi32(wide[i], _mm256_madd_epi16(_mm256_maddubs_epi16(c##i, ones8), ones16));

/* One or two rows (a GEMV): both halves in one pass, so the weights stream through once. */
QVIZ_INLINE QVIZ_AVX2_FN void qviz_p256_pop_both(const int AND, const int MR, QVIZ_BODY_PARAMS) {
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    const __m256i T = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0F), ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    __m256i wide[2][2];
    for (int i = 0; i < MR; i++) wide[i][0] = wide[i][1] = _mm256_setzero_si256();
    for (size_t k0 = 0; k0 < K32; k0 += 31) {
        const size_t k1 = k0 + 31 < K32 ? k0 + 31 : K32;
        __m256i c[2][2];
        for (int i = 0; i < MR; i++) c[i][0] = c[i][1] = _mm256_setzero_si256();
        for (size_t k = k0; k < k1; k++) {
            QVIZ_PREFETCH_NEXT(k);
            QVIZ_GEMV_FETCH(k, QVIZ_GEMV_AHEAD, 1)
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL));
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL + 8));
            const __m256i l0 = _mm256_and_si256(b0, low), h0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
            const __m256i l1 = _mm256_and_si256(b1, low), h1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
            for (int i = 0; i < MR; i++) {
                const __m256i al = _mm256_set1_epi32((int)A[i * lda + 2 * k]);
                const __m256i ah = _mm256_set1_epi32((int)A[i * lda + 2 * k + 1]);
#define QVIZ_OP256(x, y) (AND ? _mm256_and_si256(x, y) : _mm256_xor_si256(x, y))
                c[i][0] = _mm256_add_epi8(c[i][0], _mm256_add_epi8(_mm256_shuffle_epi8(T, QVIZ_OP256(al, l0)),
                                                                   _mm256_shuffle_epi8(T, QVIZ_OP256(ah, h0))));
                c[i][1] = _mm256_add_epi8(c[i][1], _mm256_add_epi8(_mm256_shuffle_epi8(T, QVIZ_OP256(al, l1)),
                                                                   _mm256_shuffle_epi8(T, QVIZ_OP256(ah, h1))));
#undef QVIZ_OP256
            }
        }
        for (int i = 0; i < MR; i++)
            for (int v = 0; v < 2; v++)
                wide[i][v] = _mm256_add_epi32(wide[i][v], _mm256_madd_epi16(_mm256_maddubs_epi16(c[i][v], ones8), ones16));
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 2; v++) qviz_store256(out + i * ldo + v * 8, cols - v * 8, wide[i][v], mul, add[i]);
}

QVIZ_INLINE QVIZ_AVX2_FN void qviz_p256_pop(const int AND, const int MR, const int NP, QVIZ_BODY_PARAMS) {
    if (MR <= 2) {
        qviz_p256_pop_both(AND, MR <= 2 ? MR : 2, QVIZ_PANEL_ARGS);
        return;
    }
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    (void)NP;
    (void)ldb;
    const __m256i T = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0F), ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
#define QVIZ_OP256(x, y) (AND ? _mm256_and_si256(x, y) : _mm256_xor_si256(x, y))
    for (int v = 0; v < 2; v++) {
        __m256i wide[QVIZ_TILE_MR];
        for (int i = 0; i < MR; i++) wide[i] = _mm256_setzero_si256();
        for (size_t k0 = 0; k0 < K32; k0 += 31) {
            const size_t k1 = k0 + 31 < K32 ? k0 + 31 : K32;
            __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
            for (size_t k = k0; k < k1; k++) {
                if (v == 0) QVIZ_PREFETCH_NEXT(k);
                const __m256i b = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL + 8 * v));
                const __m256i l = _mm256_and_si256(b, low), h = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
                QVIZ_POP256_ROW(0) QVIZ_POP256_ROW(1) QVIZ_POP256_ROW(2) QVIZ_POP256_ROW(3)
                QVIZ_POP256_ROW(4) QVIZ_POP256_ROW(5) QVIZ_POP256_ROW(6) QVIZ_POP256_ROW(7)
            }
            QVIZ_WIDEN256(0) QVIZ_WIDEN256(1) QVIZ_WIDEN256(2) QVIZ_WIDEN256(3)
            QVIZ_WIDEN256(4) QVIZ_WIDEN256(5) QVIZ_WIDEN256(6) QVIZ_WIDEN256(7)
        }
        for (int i = 0; i < MR; i++) qviz_store256(out + i * ldo + v * 8, cols - v * 8, wide[i], mul, add[i]);
    }
#undef QVIZ_OP256
}

/* Half a panel at a time, as qviz_p256_pop, with up to 4 rows (measured: 77% of the roof at 2 bits, 6 or 8
 * rows 56-65%, both halves at once 65%). 16-bit sums are widened before they
 * could pass 32767: per step at most G pairs of products, 2 x 3 x 3 (2-bit) or 2 x 15 x 15 (4-bit). */
#define QVIZ_DOT256_ROW(i)                                                                              \
    if (MR > i) c##i = _mm256_add_epi16(c##i, _mm256_maddubs_epi16(_mm256_set1_epi32((int)A[i * lda + k * (size_t)G + (size_t)g]), wg));
#define QVIZ_WIDEN256D(i) if (MR > i) wide[i] = _mm256_add_epi32(wide[i], _mm256_madd_epi16(c##i, ones));

/* One or two rows (a GEMV): both halves in one pass, so the weights stream through once. */
QVIZ_INLINE QVIZ_AVX2_FN void qviz_p256_dot_both(const int BITS, const int MR, QVIZ_BODY_PARAMS) {
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    const int G = 8 / BITS;
    const size_t every = BITS == 4 ? 32 : 448;
    const __m256i mask = _mm256_set1_epi8(BITS == 4 ? 0x0F : 0x03), ones = _mm256_set1_epi16(1);
    __m256i wide[2][2];
    for (int i = 0; i < MR; i++) wide[i][0] = wide[i][1] = _mm256_setzero_si256();
    for (size_t k0 = 0; k0 < K32; k0 += every) {
        const size_t k1 = k0 + every < K32 ? k0 + every : K32;
        __m256i acc[2][2];
        for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        for (size_t k = k0; k < k1; k++) {
            QVIZ_PREFETCH_NEXT(k);
            QVIZ_GEMV_FETCH(k, QVIZ_GEMV_AHEAD, 1)
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL));
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL + 8));
            for (int g = 0; g < G; g++) {
                const __m256i g0 = _mm256_and_si256(_mm256_srli_epi32(b0, g * BITS), mask);
                const __m256i g1 = _mm256_and_si256(_mm256_srli_epi32(b1, g * BITS), mask);
                for (int i = 0; i < MR; i++) {
                    const __m256i a = _mm256_set1_epi32((int)A[i * lda + k * (size_t)G + (size_t)g]);
                    acc[i][0] = _mm256_add_epi16(acc[i][0], _mm256_maddubs_epi16(a, g0));
                    acc[i][1] = _mm256_add_epi16(acc[i][1], _mm256_maddubs_epi16(a, g1));
                }
            }
        }
        for (int i = 0; i < MR; i++)
            for (int v = 0; v < 2; v++) wide[i][v] = _mm256_add_epi32(wide[i][v], _mm256_madd_epi16(acc[i][v], ones));
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 2; v++) qviz_store256(out + i * ldo + v * 8, cols - v * 8, wide[i][v], mul, add[i]);
}

QVIZ_INLINE QVIZ_AVX2_FN void qviz_p256_dot(const int BITS, const int MR, const int NP, QVIZ_BODY_PARAMS) {
    if (MR <= 2) {
        qviz_p256_dot_both(BITS, MR <= 2 ? MR : 2, QVIZ_PANEL_ARGS);
        return;
    }
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    (void)NP;
    (void)ldb;
    const int G = 8 / BITS;
    const size_t every = BITS == 4 ? 32 : 448; /* 32 x 2 x 450 = 28800; 448 x 4 x 18 = 32256 */
    const __m256i mask = _mm256_set1_epi8(BITS == 4 ? 0x0F : 0x03), ones = _mm256_set1_epi16(1);
    for (int v = 0; v < 2; v++) {
        __m256i wide[QVIZ_TILE_MR];
        for (int i = 0; i < MR; i++) wide[i] = _mm256_setzero_si256();
        for (size_t k0 = 0; k0 < K32; k0 += every) {
            const size_t k1 = k0 + every < K32 ? k0 + every : K32;
            __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
            for (size_t k = k0; k < k1; k++) {
                if (v == 0) QVIZ_PREFETCH_NEXT(k);
                const __m256i b = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL + 8 * v));
                for (int g = 0; g < G; g++) {
                    const __m256i wg = _mm256_and_si256(_mm256_srli_epi32(b, g * BITS), mask);
                    QVIZ_DOT256_ROW(0) QVIZ_DOT256_ROW(1) QVIZ_DOT256_ROW(2) QVIZ_DOT256_ROW(3)
                    QVIZ_DOT256_ROW(4) QVIZ_DOT256_ROW(5) QVIZ_DOT256_ROW(6) QVIZ_DOT256_ROW(7)
                }
            }
            QVIZ_WIDEN256D(0) QVIZ_WIDEN256D(1) QVIZ_WIDEN256D(2) QVIZ_WIDEN256D(3)
            QVIZ_WIDEN256D(4) QVIZ_WIDEN256D(5) QVIZ_WIDEN256D(6) QVIZ_WIDEN256D(7)
        }
        for (int i = 0; i < MR; i++) qviz_store256(out + i * ldo + v * 8, cols - v * 8, wide[i], mul, add[i]);
    }
}

#if QVIZ_HAVE_AVXVNNI
/* AVX-VNNI (256-bit vpdpbusd): four byte products summed into each 32-bit lane in one instruction, so
 * there are no 16-bit sums to widen, and a tile holds both halves of its panel: up to 6 rows x 2 halves
 * = 12 accumulators, plus the two split halves of the weight vector and a broadcast; the mask and the
 * shifts' temporaries take the 16th register and a spill or two. Measured on 2 threads (256x2048x2048):
 * 2-bit codes 6 rows (5 rows, 10 chains, just what vpdpbusd's latency of 5 cycles at 2 a cycle needs, ran
 * 12% slower), 4-bit codes 5 rows (6 rows 12% slower, 4 rows 14%: with two field groups a step, the
 * 6-row loop spilled more). */
#define QVIZ_AVX2VNNI_FN __attribute__((target("avx2,fma,popcnt,avxvnni")))
#define QVIZ_VNNI256_ROW(i)                                                                             \
    if (MR > i) {                                                                                       \
        const __m256i a##i = _mm256_set1_epi32((int)A[i * lda + k * (size_t)G + (size_t)g]);           \
        c##i##_0 = _mm256_dpbusd_avx_epi32(c##i##_0, a##i, w0);                                          \
        c##i##_1 = _mm256_dpbusd_avx_epi32(c##i##_1, a##i, w1);                                          \
    }
#define QVIZ_VNNI256_STORE(i)                                                                   \
    if (MR > i) {                                                                                       \
        qviz_store256(out + i * ldo, cols, c##i##_0, mul, add[i]);                                      \
        qviz_store256(out + i * ldo + 8, cols - 8, c##i##_1, mul, add[i]);                              \
    }

/* One or two rows (a GEMV): the field groups go to separate accumulators too, else two or four chains
 * would wait on vpdpbusd's latency. */
QVIZ_INLINE QVIZ_AVX2VNNI_FN void qviz_p256_vnni_few(const int BITS, const int MR, QVIZ_BODY_PARAMS) {
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    const int G = 8 / BITS, S = MR == 1 ? G : 2; /* accumulator sets: group g adds to set g % S */
    const __m256i mask = _mm256_set1_epi8(BITS == 4 ? 0x0F : 0x03);
    __m256i acc[2][2][4];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 2; v++)
            for (int t = 0; t < S; t++) acc[i][v][t] = _mm256_setzero_si256();
    for (size_t k = 0; k < K32; k++) {
        QVIZ_PREFETCH_NEXT(k);
        QVIZ_GEMV_FETCH(k, QVIZ_GEMV_AHEAD, 1)
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL));
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL + 8));
        for (int g = 0; g < G; g++) {
            const __m256i w0 = _mm256_and_si256(_mm256_srli_epi32(b0, g * BITS), mask);
            const __m256i w1 = _mm256_and_si256(_mm256_srli_epi32(b1, g * BITS), mask);
            for (int i = 0; i < MR; i++) {
                const __m256i a = _mm256_set1_epi32((int)A[i * lda + k * (size_t)G + (size_t)g]);
                acc[i][0][g % S] = _mm256_dpbusd_avx_epi32(acc[i][0][g % S], a, w0);
                acc[i][1][g % S] = _mm256_dpbusd_avx_epi32(acc[i][1][g % S], a, w1);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 2; v++) {
            __m256i sum = acc[i][v][0];
            for (int t = 1; t < S; t++) sum = _mm256_add_epi32(sum, acc[i][v][t]);
            qviz_store256(out + i * ldo + v * 8, cols - v * 8, sum, mul, add[i]);
        }
}

QVIZ_INLINE QVIZ_AVX2VNNI_FN void qviz_p256_vnni(const int BITS, const int MR, const int NP, QVIZ_BODY_PARAMS) {
    if (MR <= 2) {
        qviz_p256_vnni_few(BITS, MR <= 2 ? MR : 2, QVIZ_PANEL_ARGS);
        return;
    }
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    (void)NP;
    (void)ldb;
    const int G = 8 / BITS;
    const __m256i mask = _mm256_set1_epi8(BITS == 4 ? 0x0F : 0x03);
    __m256i c0_0 = _mm256_setzero_si256(), c0_1 = c0_0, c1_0 = c0_0, c1_1 = c0_0, c2_0 = c0_0, c2_1 = c0_0,
            c3_0 = c0_0, c3_1 = c0_0, c4_0 = c0_0, c4_1 = c0_0, c5_0 = c0_0, c5_1 = c0_0;
    for (size_t k = 0; k < K32; k++) {
        QVIZ_PREFETCH_NEXT(k);
        for (int g = 0; g < G; g++) {
            const __m256i w0 = _mm256_and_si256(
                _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL)), g * BITS), mask);
            const __m256i w1 = _mm256_and_si256(
                _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL + 8)), g * BITS), mask);
            QVIZ_VNNI256_ROW(0) QVIZ_VNNI256_ROW(1) QVIZ_VNNI256_ROW(2) QVIZ_VNNI256_ROW(3) QVIZ_VNNI256_ROW(4)
            QVIZ_VNNI256_ROW(5)
        }
    }
    QVIZ_VNNI256_STORE(0) QVIZ_VNNI256_STORE(1) QVIZ_VNNI256_STORE(2) QVIZ_VNNI256_STORE(3) QVIZ_VNNI256_STORE(4)
    QVIZ_VNNI256_STORE(5)
}

/* The same from weights split beforehand (qviz_split_block): loads and dot products only, as
 * qviz_p512_vnni_split. */
QVIZ_INLINE QVIZ_AVX2VNNI_FN void qviz_p256_vnni_split(const int BITS, const int MR, const int NP, QVIZ_BODY_PARAMS) {
    const size_t npf = QVIZ_PREFETCH_PER_K(K32);
    (void)NP;
    (void)ldb;
    const int G = 8 / BITS;
    __m256i c0_0 = _mm256_setzero_si256(), c0_1 = c0_0, c1_0 = c0_0, c1_1 = c0_0, c2_0 = c0_0, c2_1 = c0_0,
            c3_0 = c0_0, c3_1 = c0_0, c4_0 = c0_0, c4_1 = c0_0, c5_0 = c0_0, c5_1 = c0_0;
    for (size_t k = 0; k < K32; k++) {
        QVIZ_PREFETCH_NEXT(k);
        for (int g = 0; g < G; g++) {
            const uint32_t *at = B + (k * (size_t)G + (size_t)g) * QVIZ_PANEL;
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)at);
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(at + 8));
            QVIZ_VNNI256_ROW(0) QVIZ_VNNI256_ROW(1) QVIZ_VNNI256_ROW(2) QVIZ_VNNI256_ROW(3) QVIZ_VNNI256_ROW(4)
            QVIZ_VNNI256_ROW(5)
        }
    }
    QVIZ_VNNI256_STORE(0) QVIZ_VNNI256_STORE(1) QVIZ_VNNI256_STORE(2) QVIZ_VNNI256_STORE(3) QVIZ_VNNI256_STORE(4)
    QVIZ_VNNI256_STORE(5)
}

#endif /* QVIZ_HAVE_AVXVNNI */

/* qviz_split_block512 with 256-bit vectors: the same layout, for the AVX2 paths. */
static QVIZ_AVX2_FN void qviz_split_block256(const uint32_t *B, size_t ldb, size_t K32, int np, int bits,
                                             uint32_t *dst) {
    const int G = 8 / bits;
    const __m256i mask = _mm256_set1_epi8(bits == 4 ? 0x0F : 0x03);
    for (int q = 0; q < np; q++)
        for (size_t k = 0; k < K32; k++) {
            const uint32_t *w = B + (size_t)q * ldb + k * QVIZ_PANEL;
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)w), w1 = _mm256_loadu_si256((const __m256i *)(w + 8));
            uint32_t *o = dst + ((size_t)q * K32 + k) * (size_t)G * QVIZ_PANEL;
            for (int g = 0; g < G; g++) {
                _mm256_storeu_si256((__m256i *)(o + (size_t)g * QVIZ_PANEL),
                                    _mm256_and_si256(_mm256_srli_epi32(w0, g * bits), mask));
                _mm256_storeu_si256((__m256i *)(o + (size_t)g * QVIZ_PANEL + 8),
                                    _mm256_and_si256(_mm256_srli_epi32(w1, g * bits), mask));
            }
        }
}

QVIZ_PANEL_FN_R8(qviz_panel_avx2_xor, QVIZ_AVX2_FN, qviz_p256_pop, 0)
QVIZ_PANEL_FN_R8(qviz_panel_avx2_and, QVIZ_AVX2_FN, qviz_p256_pop, 1)
QVIZ_PANEL_FN_R8(qviz_panel_avx2_dot2, QVIZ_AVX2_FN, qviz_p256_dot, 2)
QVIZ_PANEL_FN_R8(qviz_panel_avx2_dot4, QVIZ_AVX2_FN, qviz_p256_dot, 4)
#if QVIZ_HAVE_AVXVNNI
QVIZ_PANEL_FN_R6(qviz_panel_avx2vnni_dot2, QVIZ_AVX2VNNI_FN, qviz_p256_vnni, 2)
QVIZ_PANEL_FN_R6(qviz_panel_avx2vnni_dot4, QVIZ_AVX2VNNI_FN, qviz_p256_vnni, 4)
QVIZ_PANEL_FN_R6(qviz_panel_avx2vnni_split_dot2, QVIZ_AVX2VNNI_FN, qviz_p256_vnni_split, 2)
QVIZ_PANEL_FN_R6(qviz_panel_avx2vnni_split_dot4, QVIZ_AVX2VNNI_FN, qviz_p256_vnni_split, 4)
#endif
#endif /* QVIZ_X86 */

#ifndef QVIZ_AVX2_DOT_MR
#define QVIZ_AVX2_DOT_MR 4
#endif
#ifndef QVIZ_AVX2_POP_MR
#define QVIZ_AVX2_POP_MR 8
#endif
#define QVIZ_AVX2VNNI_MR 6  /* 2-bit codes; 4-bit: QVIZ_AVX2VNNI_MR4 (qviz_p256_vnni) */
#define QVIZ_AVX2VNNI_MR4 5
/* The kernel for (path, op) and its largest tile (rows x panels). */
static qviz_panel_fn qviz_panel_for(int path, int op, int *mr, int *np) {
    *mr = 4;
    *np = 1;
    static const qviz_panel_fn portable[QVIZ_P_N_OPS] = {qviz_panel_portable_xor, qviz_panel_portable_and,
                                                         qviz_panel_portable_dot2, qviz_panel_portable_dot4};
#if QVIZ_X86 && defined(__GNUC__)
    static const qviz_panel_fn popcnt[QVIZ_P_N_OPS] = {qviz_panel_popcnt_xor, qviz_panel_popcnt_and,
                                                       qviz_panel_popcnt_dot2, qviz_panel_popcnt_dot4};
    static const qviz_panel_fn avx2[QVIZ_P_N_OPS] = {qviz_panel_avx2_xor, qviz_panel_avx2_and, qviz_panel_avx2_dot2,
                                                     qviz_panel_avx2_dot4};
    static const qviz_panel_fn avx512[QVIZ_P_N_OPS] = {qviz_panel_avx512_xor, qviz_panel_avx512_and,
                                                       qviz_panel_avx512_dot2, qviz_panel_avx512_dot4};
    static const qviz_panel_fn vnni[QVIZ_P_N_OPS] = {qviz_panel_avx512_xor, qviz_panel_avx512_and,
                                                     qviz_panel_vnni_dot2, qviz_panel_vnni_dot4};
    if (path >= QVIZ_AVX512) {
        /* 6 x 4 tile: 24 accumulators + 4 weight vectors + 1 broadcast fit the 32 registers (VNNI dot
         * products too, as they load the weights once per field group; 4 x 4 kept the raw vectors and
         * ran 8-12% slower on a Xeon). vpmaddubsw's 16-bit sums take more registers: 4 x 4. */
        *mr = op == QVIZ_P_XOR || op == QVIZ_P_AND || path == QVIZ_AVX512VNNI ? 6 : 4;
        *np = QVIZ_TILE_NP;
    }
    if (path == QVIZ_AVX512VNNI) return vnni[op];
    if (path == QVIZ_AVX512) return avx512[op];
#if QVIZ_HAVE_AVXVNNI
    if (path == QVIZ_AVX2VNNI && (op == QVIZ_P_DOT2 || op == QVIZ_P_DOT4)) {
        *mr = op == QVIZ_P_DOT2 ? QVIZ_AVX2VNNI_MR : QVIZ_AVX2VNNI_MR4;
        return op == QVIZ_P_DOT2 ? qviz_panel_avx2vnni_dot2 : qviz_panel_avx2vnni_dot4;
    }
#endif
    if (qviz_avx2_class(path)) {
        *mr = op == QVIZ_P_XOR || op == QVIZ_P_AND ? QVIZ_AVX2_POP_MR : QVIZ_AVX2_DOT_MR;
        return avx2[op];
    }
    if (path == QVIZ_POPCNT) return popcnt[op];
#endif
    return portable[op];
}

/* The VNNI dot products from weights split beforehand, block by block, when at least QVIZ_SPLIT_MIN_MB
 * row tiles share each block (at 16 rows, 3 tiles, splitting was slower than the shifts it saved). */
#define QVIZ_SPLIT_MIN_MB 8
#define QVIZ_SPLIT_MAX (2u << 20)
static int qviz_dot_bits(int op) { return op == QVIZ_P_DOT2 ? 2 : 4; }
/* uint32 words of one panel's split copy: K32 words x 8 / bits field groups x 16 lanes */
static size_t qviz_split_ldb(size_t K32, int bits) { return K32 * (size_t)(8 / bits) * QVIZ_PANEL; }
static qviz_panel_fn qviz_split_panel_for(int path, int op, size_t MB, size_t K32) {
#if QVIZ_X86 && defined(__GNUC__)
    /* a block's split copy is worth making while it stays in L2: up to 2 MiB (AVX-512: 4 panels, K up to 32768
     * codes; AVX2: one panel, 4x as long) */
    if (path == QVIZ_AVX512VNNI && MB >= QVIZ_SPLIT_MIN_MB &&
        QVIZ_TILE_NP * qviz_split_ldb(K32, qviz_dot_bits(op)) * sizeof(uint32_t) <= QVIZ_SPLIT_MAX) {
        if (op == QVIZ_P_DOT2) return qviz_panel_vnni_split_dot2;
        if (op == QVIZ_P_DOT4) return qviz_panel_vnni_split_dot4;
    }
#if QVIZ_HAVE_AVXVNNI
    if (path == QVIZ_AVX2VNNI && MB >= QVIZ_SPLIT_MIN_MB &&
        qviz_split_ldb(K32, qviz_dot_bits(op)) * sizeof(uint32_t) <= QVIZ_SPLIT_MAX) {
        if (op == QVIZ_P_DOT2) return qviz_panel_avx2vnni_split_dot2;
        if (op == QVIZ_P_DOT4) return qviz_panel_avx2vnni_split_dot4;
    }
#endif
#endif
    (void)path, (void)op, (void)MB, (void)K32;
    return NULL;
}

/* Below about 50 us of work one thread is faster than waking another: a sleeping worker took ~100 us
 * to join on the shared 2-core machine (a futex wake-up across virtual CPUs, a busy neighbour), and the
 * caller then waits for the task it took. Units: word pairs of a popcount (~80 G/s on one AVX-512
 * core; byte dot products cost ~8x more per word pair), codes of a codebook GEMV (~70 G/s). */
#define QVIZ_PARALLEL_MIN (1L << 22)
/* A short GEMV still streams its weights: 1 MiB of them takes one core ~20 us from L3, and in a loop two
 * threads each keep their half in L2 (4096 x 4096 binary, warm: 37 us on one thread, 15 us on two). */
#define QVIZ_PARALLEL_BYTES (1L << 20)
static int qviz_team(double work, double weight_bytes, int threads) {
    return work < (double)QVIZ_PARALLEL_MIN && weight_bytes < (double)QVIZ_PARALLEL_BYTES ? 1 : threads;
}

/* Tasks for n blocks shared by `team` threads: four per thread, so that a thread slowed by a neighbour
 * leaves little for the others to wait on. */
static size_t qviz_task_count(size_t n, int team) {
    const size_t tasks = team <= 1 ? 1 : 4 * (size_t)team;
    return tasks < n ? tasks : n;
}

/* Lines of the block of up to NP panels (K32 lines each) that starts at panel p1 of P; 0 past the last:
 * the pfn of a tile that fetches the next block. */
static inline size_t qviz_block_lines(size_t p1, size_t P, size_t NP, size_t K32) {
    return p1 < P ? (P - p1 < NP ? P - p1 : NP) * K32 : 0;
}

/* Blocks [*first, *last) of task t of `tasks` over n blocks: consecutive, sizes within one of each other. */
static void qviz_task_range(size_t n, size_t tasks, long t, size_t *first, size_t *last) {
    *first = (size_t)t * n / tasks;
    *last = ((size_t)t + 1) * n / tasks;
}

/* np panels into their field groups with the path's own vectors (the result is the same on both). */
static void qviz_split_block(int path, const uint32_t *B, size_t ldb, size_t K32, int np, int bits, uint32_t *dst) {
#if QVIZ_X86 && defined(__GNUC__)
    if (path >= QVIZ_AVX512)
        qviz_split_block512(B, ldb, K32, np, bits, dst);
    else
        qviz_split_block256(B, ldb, K32, np, bits, dst);
#else
    (void)path, (void)B, (void)ldb, (void)K32, (void)np, (void)bits, (void)dst;
#endif
}

typedef struct {
    qviz_panel_fn fn;
    qviz_panel_fn split_fn; /* non-NULL: each block of weights is split into field groups first (bits) */
    int path, MR, NP, bits;
    const uint32_t *A, *Bp;
    size_t M, N, K32, lda, ldb, P, MB, NB, tasks;
    int64_t mul, offset;
    const int64_t *offset_m;
    int32_t *out;
} qviz_panel_job;

/* The tile of panel block nb and row block r. With `fetch`, row block r fetches its share of the next
 * panel block, whole steps of K32 lines, shared by the row blocks of more than one row (a one-row kernel
 * reads pf as a GEMV does, QVIZ_GEMV_FETCH). A single row block gets the whole next block whatever task
 * it falls in: a thread's tasks are consecutive blocks, so it is mostly the block the thread runs next
 * (the last of a home range fetches the other thread's first). */
static void qviz_panel_tile(const qviz_panel_job *j, size_t nb, size_t r, int fetch, const uint32_t *split) {
    int32_t add[QVIZ_TILE_MR];
    const size_t m = r * (size_t)j->MR, p0 = nb * (size_t)j->NP, n0 = p0 * QVIZ_PANEL;
    const int np = (int)(j->P - p0 < (size_t)j->NP ? j->P - p0 : (size_t)j->NP);
    const int mr = (int)(j->M - m < (size_t)j->MR ? j->M - m : (size_t)j->MR);
    const int cols = (int)(j->N - n0 < (size_t)np * QVIZ_PANEL ? j->N - n0 : (size_t)np * QVIZ_PANEL);
    for (int i = 0; i < mr; i++) add[i] = (int32_t)(j->offset + (j->offset_m ? j->offset_m[m + (size_t)i] : 0));
    const char *pf = NULL;
    size_t pfn = 0;
    const size_t p1 = p0 + (size_t)j->NP, lines = qviz_block_lines(p1, j->P, (size_t)j->NP, j->K32);
    if (j->MB == 1 && lines && !split) {
        pf = (const char *)(j->Bp + p1 * j->ldb);
        pfn = lines;
    } else if (fetch && lines && j->MB > 1 && mr > 1) {
        const size_t fetchers = j->MB - (j->M % (size_t)j->MR == 1); /* a last block of one row fetches none */
        const size_t steps = (lines + j->K32 * fetchers - 1) / (j->K32 * fetchers), first = r * steps * j->K32;
        if (first < lines) {
            pf = (const char *)(j->Bp + p1 * j->ldb) + first * 64;
            pfn = lines - first < steps * j->K32 ? lines - first : steps * j->K32;
        }
    }
    /* the kernels write whole tiles: a partial one goes to a scratch tile, and its valid part is copied */
    int32_t scratch[QVIZ_TILE_MR * QVIZ_TILE_LD];
    const int whole = cols == np * QVIZ_PANEL;
    int32_t *o = whole ? j->out + m * j->N + n0 : scratch;
    const qviz_panel_fn fn = split ? j->split_fn : j->fn;
    fn(j->A + m * j->lda, j->lda, split ? split : j->Bp + p0 * j->ldb,
       split ? qviz_split_ldb(j->K32, j->bits) : j->ldb, j->K32, mr, np, o, whole ? j->N : QVIZ_TILE_LD,
       np * QVIZ_PANEL, (int32_t)j->mul, add, pf, pfn);
    if (!whole)
        for (int i = 0; i < mr; i++)
            memcpy(j->out + (m + (size_t)i) * j->N + n0, scratch + i * QVIZ_TILE_LD, (size_t)cols * sizeof(int32_t));
}

/* Task t: consecutive panel blocks, each against every row block. The rows pass over a block of
 * weights while it sits in L1/L2, and a thread reads only its own tasks' weights and fetches only
 * blocks it will use (but for a single row block, qviz_panel_tile): with one tile per task, handed out
 * in turn, both cores had read every block (16x4096x4096 binary on 2 threads: 70% of the roof, against
 * 85% on one; 76-79% with these tasks). */
static void qviz_panel_task(void *arg, long t) {
    const qviz_panel_job *j = (const qviz_panel_job *)arg;
    size_t first, last;
    qviz_task_range(j->NB, j->tasks, t, &first, &last);
    /* one block's field groups: NP panels x K32 words x G vectors of 64 bytes (no memory: split nothing) */
    uint32_t *split = j->split_fn ? (uint32_t *)aligned_alloc(64, (size_t)j->NP * qviz_split_ldb(j->K32, j->bits) *
                                                                   sizeof(uint32_t))
                                  : NULL;
    for (size_t nb = first; nb < last; nb++) {
        if (split) {
            const size_t p0 = nb * (size_t)j->NP;
            const int np = (int)(j->P - p0 < (size_t)j->NP ? j->P - p0 : (size_t)j->NP);
            qviz_split_block(j->path, j->Bp + p0 * j->ldb, j->ldb, j->K32, np, j->bits, split);
        }
        for (size_t r = 0; r < j->MB; r++) qviz_panel_tile(j, nb, r, nb + 1 < last, split);
    }
    free(split);
}

/* out[m, n] = mul * S[m, n] + offset + offset_m[m] (offset_m may be NULL), S from `op` over the panels.
 * A: activation rows already laid out by qviz_split_rows (lda = K32 * slots). Callers guarantee that
 * every result and offset fits int32. */
static void qviz_panel_matmul(int path, int op, const uint32_t *A, size_t M, size_t lda, const uint32_t *Bp,
                              size_t N, size_t K32, int64_t mul, const int64_t *offset_m, int64_t offset,
                              int32_t *out, int threads) {
    qviz_panel_job j;
    j.fn = qviz_panel_for(path, op, &j.MR, &j.NP);
    j.path = path, j.A = A, j.Bp = Bp, j.M = M, j.N = N, j.K32 = K32, j.lda = lda, j.ldb = K32 * QVIZ_PANEL;
    j.P = (N + QVIZ_PANEL - 1) / QVIZ_PANEL;
    j.MB = (M + (size_t)j.MR - 1) / (size_t)j.MR;
    j.bits = qviz_dot_bits(op);
    j.split_fn = qviz_split_panel_for(path, op, j.MB, K32);
    j.mul = mul, j.offset = offset, j.offset_m = offset_m, j.out = out;
    j.NB = (j.P + (size_t)j.NP - 1) / (size_t)j.NP;
    const double work = (double)M * (double)N * (double)K32 * (op == QVIZ_P_DOT2 || op == QVIZ_P_DOT4 ? 8 : 1);
    const int team = qviz_team(work, (double)j.P * (double)j.ldb * 4.0, threads);
    j.tasks = qviz_task_count(j.NB, team);
    qviz_parallel(qviz_panel_task, &j, (long)j.tasks, team);
}

/* The same from activation rows as qviz.packed holds them (W64 uint64 words a row): rows are split for
 * the path's kernel, or read in place when its kernel takes whole 32-bit words and the host is
 * little-endian (word k of a row is then the k-th uint32 of the row). With popcount_offset, popcount(a)
 * of each row is added (the hybrid epilogue), counted here from the words. Returns -1 if no memory. */
static int qviz_panel_matmul_rows(int path, int op, const uint64_t *A64, size_t M, size_t W64, const uint32_t *Bp,
                                  size_t N, size_t K32, int64_t mul, int popcount_offset, int64_t offset,
                                  int32_t *out, int threads) {
    const int slots = qviz_panel_slots(path, op);
    const uint32_t *A = NULL;
    uint32_t *rows = NULL;
    size_t lda = K32 * (size_t)slots;
    int64_t *ones = NULL, ones_stack[64];
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (slots == 1) A = (const uint32_t *)A64, lda = 2 * W64;
#endif
    if (!A) {
        rows = (uint32_t *)malloc(M * lda * sizeof(uint32_t) + 4);
        if (!rows) return -1;
        qviz_split_rows(A64, M, W64, K32, slots, rows);
        A = rows;
    }
    if (popcount_offset) {
        ones = M <= 64 ? ones_stack : (int64_t *)malloc(M * sizeof(int64_t));
        if (!ones) {
            free(rows);
            return -1;
        }
        qviz_row_popcounts(A64, M, W64, ones);
    }
    qviz_panel_matmul(path, op, A, M, lda, Bp, N, K32, mul, ones, offset, out, threads);
    if (ones != ones_stack) free(ones);
    free(rows);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Fused: float activations packed inside the matmul. When the weights fit in L2, each task takes one  */
/* row tile: it packs its rows (signs or b-bit codes) into a small buffer and runs them against every  */
/* panel block, while the tiles prefetch the next row tile's floats, so reading x overlaps the         */
/* popcounts instead of preceding them (a separate pass over 4 MiB of x cost as much as 15% of a      */
/* 1024^3 binary matmul). Larger weights keep the panel-block order: x is packed first, on the pool.   */

#if QVIZ_X86 && defined(__GNUC__)
/* 16 bytes of split codes: one word of 2-bit codes or two of 4-bit; only the first 8 (one 4-bit word)
 * when the row's word count is odd and this is its last word. */
static inline void qviz_store_split_bytes(uint32_t *out, __m128i bytes, int whole) {
    if (whole)
        _mm_storeu_si128((__m128i *)out, bytes);
    else
        _mm_storel_epi64((__m128i *)out, bytes);
}

/* Float rows quantized straight into the split layout of the byte dot products (qviz_split_rows of the
 * packed words, without packing first): 16 codes at a time as qviz_pack_uniform computes them (scale,
 * round half to even, zero point, clamp; NaN flagged, and sent to 0 by vmaxps as there), narrowed to
 * bytes and shuffled so that group g of word k holds codes t G + g, t = 0..3. Codes past K are 0, as
 * the padding bits of packed rows. Returns 1 if the rows held NaN. */
static QVIZ_AVX512_FN int qviz_quantize_split512(const float *x, size_t M, size_t K, int bits, float inv_scale,
                                                 float zero_point, size_t K32, uint32_t *dst) {
    const int G = 8 / bits, per_word = 32 / bits;
    const __m512 inv = _mm512_set1_ps(inv_scale), zp = _mm512_set1_ps(zero_point);
    const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps((float)((1 << bits) - 1));
    const __m128i order = bits == 2 ? _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
                                    : _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    __mmask16 nan = 0;
    for (size_t r = 0; r < M; r++) {
        const float *row = x + r * K;
        uint32_t *out = dst + r * K32 * (size_t)G;
        for (size_t k = 0, word = 0; word < K32; k += 16, word += (size_t)(16 / per_word)) {
            const size_t left = K > k ? K - k : 0;
            const __mmask16 lanes = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, row + k), inv);
            nan |= _mm512_mask_cmp_ps_mask(lanes, v, v, _CMP_UNORD_Q);
            const __m512 c = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
            const __m512i codes = _mm512_maskz_cvttps_epi32(lanes, _mm512_min_ps(_mm512_max_ps(c, lo), hi));
            const __m128i bytes = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(codes), order);
            qviz_store_split_bytes(out + word * (size_t)G, bytes, word + 1 < K32 || per_word == 16);
        }
    }
    return nan != 0;
}

/* The AVX2 twin of qviz_quantize_split512: 8 codes a vector, two vectors narrowed to 16 bytes (packs
 * and packus work within 128-bit lanes, so codes come out as 0-3, 8-11, 4-7, 12-15 and the one shuffle
 * into field groups takes that order into account). */
static QVIZ_AVX2_FN int qviz_quantize_split256(const float *x, size_t M, size_t K, int bits, float inv_scale,
                                               float zero_point, size_t K32, uint32_t *dst) {
    const int G = 8 / bits, per_word = 32 / bits;
    const __m256 inv = _mm256_set1_ps(inv_scale), zp = _mm256_set1_ps(zero_point);
    const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps((float)((1 << bits) - 1));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m128i order = bits == 2 ? _mm_setr_epi8(0, 8, 4, 12, 1, 9, 5, 13, 2, 10, 6, 14, 3, 11, 7, 15)
                                    : _mm_setr_epi8(0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15);
    int nan = 0;
    for (size_t r = 0; r < M; r++) {
        const float *row = x + r * K;
        uint32_t *out = dst + r * K32 * (size_t)G;
        for (size_t k = 0, word = 0; word < K32; k += 16, word += (size_t)(16 / per_word)) {
            __m256i half[2];
            for (int h = 0; h < 2; h++) {
                const size_t at = k + 8 * (size_t)h, left = K > at ? K - at : 0;
                const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(left >= 8 ? 8 : (int)left), lane);
                const __m256 v = _mm256_mul_ps(_mm256_maskload_ps(row + (left ? at : 0), valid), inv);
                nan |= _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_castsi256_ps(valid)));
                const __m256 c = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
                half[h] = _mm256_and_si256(_mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(c, lo), hi)), valid);
            }
            const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(half[0], half[1]), _mm256_setzero_si256());
            const __m128i bytes = _mm_shuffle_epi8(
                _mm_unpacklo_epi64(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)), order);
            qviz_store_split_bytes(out + word * (size_t)G, bytes, word + 1 < K32 || per_word == 16);
        }
    }
    return nan != 0;
}

/* Float rows into split rows on the best path that has a direct route (AVX2 or AVX-512). */
static int qviz_quantize_split(int path, const float *x, size_t M, size_t K, int bits, float inv_scale,
                               float zero_point, size_t K32, uint32_t *dst) {
    if (path >= QVIZ_AVX512) return qviz_quantize_split512(x, M, K, bits, inv_scale, zero_point, K32, dst);
    return qviz_quantize_split256(x, M, K, bits, inv_scale, zero_point, K32, dst);
}

typedef struct {
    int path;
    const qviz_act *act;
    size_t K32, lda, M;
    uint32_t *rows;
    _Atomic int nan_seen;
} qviz_quantize_split_job;

/* Rows [t QVIZ_PACK_ROWS, ...) of the activations into split rows (qviz_quantize_split). */
static void qviz_quantize_split_task(void *arg, long t) {
    qviz_quantize_split_job *j = (qviz_quantize_split_job *)arg;
    const size_t r0 = (size_t)t * QVIZ_PACK_ROWS, rows = j->M - r0 < QVIZ_PACK_ROWS ? j->M - r0 : QVIZ_PACK_ROWS;
    const qviz_act *a = j->act;
    if (qviz_quantize_split(j->path, a->x + r0 * a->K, rows, a->K, a->bits, a->inv_scale, a->zero_point, j->K32,
                            j->rows + r0 * j->lda))
        atomic_store(&j->nan_seen, 1);
}
#endif

/* Whether b-bit codes of these activations go straight into the byte dot products' split rows
 * (qviz_quantize_split: AVX2 and AVX-512) instead of being packed into words and split again. */
static int qviz_quantizes_into_split(int path, int op, const qviz_act *act) {
#if QVIZ_X86 && defined(__GNUC__)
    return path >= QVIZ_AVX2 && act->mode == QVIZ_ACT_UNIFORM && (op == QVIZ_P_DOT2 || op == QVIZ_P_DOT4);
#else
    (void)path, (void)op, (void)act;
    return 0;
#endif
}

#define QVIZ_FUSED_L2 (512u * 1024u) /* weights up to this size stay in L2 while row tiles pass over them */

typedef struct {
    qviz_panel_fn fn;
    int path, op, MR, NP, slots, popcount_offset;
    qviz_act act;
    const uint32_t *Bp; /* the panels, or their split copy (fn and ldb to match) */
    size_t M, N, K32, ldb, P, NB;
    int64_t mul, offset;
    int32_t *out;
    _Atomic int nan_seen, failed;
} qviz_fused_job;

static void qviz_fused_task(void *arg, long t) {
    qviz_fused_job *j = (qviz_fused_job *)arg;
    const size_t m = (size_t)t * (size_t)j->MR, W64 = j->act.W64, lda = j->K32 * (size_t)j->slots;
    const int mr = (int)(j->M - m < (size_t)j->MR ? j->M - m : (size_t)j->MR);
    uint64_t words_stack[QVIZ_TILE_MR * 256];
    uint32_t rows_stack[QVIZ_TILE_MR * 1024];
    int64_t sums[QVIZ_TILE_MR];
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const int in_place = j->slots == 1; /* the kernel reads the packed words themselves */
#else
    const int in_place = 0;
#endif
    const int direct = qviz_quantizes_into_split(j->path, j->op, &j->act); /* no packed words then */
    uint64_t *words = direct ? NULL : W64 <= 256 ? words_stack : (uint64_t *)malloc((size_t)mr * W64 * sizeof(uint64_t));
    uint32_t *rows = in_place ? NULL : lda <= 1024 ? rows_stack : (uint32_t *)malloc((size_t)mr * lda * sizeof(uint32_t) + 4);
    if ((!direct && !words) || (!in_place && !rows)) {
        atomic_store(&j->failed, 1);
        if (words != words_stack) free(words);
        if (rows != rows_stack) free(rows);
        return;
    }
    const uint32_t *A = in_place ? (const uint32_t *)words : rows;
    const size_t ld = in_place ? 2 * W64 : lda;
#if QVIZ_X86 && defined(__GNUC__)
    if (direct) {
        if (qviz_quantize_split(j->path, j->act.x + m * j->act.K, (size_t)mr, j->act.K, j->act.bits,
                                j->act.inv_scale, j->act.zero_point, j->K32, rows))
            atomic_store(&j->nan_seen, 1);
    } else
#endif
    {
        if (qviz_pack_act(j->path, &j->act, m, (size_t)mr, words, sums)) atomic_store(&j->nan_seen, 1);
        if (!in_place) qviz_split_rows(words, (size_t)mr, W64, j->K32, j->slots, rows);
    }
    int32_t add[QVIZ_TILE_MR];
    for (int i = 0; i < mr; i++) {
        int64_t ones = 0;
        if (j->popcount_offset) qviz_row_popcounts(words + (size_t)i * W64, 1, W64, &ones);
        add[i] = (int32_t)(j->offset + ones);
    }
    /* the next row tile's floats, a share per panel block, fetched while this tile computes */
    const size_t m1 = m + (size_t)j->MR;
    const size_t next = m1 < j->M ? ((j->M - m1 < (size_t)j->MR ? j->M - m1 : (size_t)j->MR) * j->act.K * 4 + 63) / 64 : 0;
    const size_t share = (next + j->NB - 1) / j->NB;
    int32_t scratch[QVIZ_TILE_MR * QVIZ_TILE_LD];
    for (size_t nb = 0; nb < j->NB; nb++) {
        const size_t p0 = nb * (size_t)j->NP, n0 = p0 * QVIZ_PANEL;
        const int np = (int)(j->P - p0 < (size_t)j->NP ? j->P - p0 : (size_t)j->NP);
        const int cols = (int)(j->N - n0 < (size_t)np * QVIZ_PANEL ? j->N - n0 : (size_t)np * QVIZ_PANEL);
        const size_t first = nb * share;
        const char *pf = first < next ? (const char *)(j->act.x + m1 * j->act.K) + first * 64 : NULL;
        size_t pfn = pf ? (next - first < share ? next - first : share) : 0;
        const size_t p1 = p0 + (size_t)j->NP, lines = qviz_block_lines(p1, j->P, (size_t)j->NP, j->K32);
        if (j->M <= (size_t)j->MR && lines) { /* a single row tile: the next block, as qviz_panel_tile */
            pf = (const char *)(j->Bp + p1 * j->ldb);
            pfn = lines;
        }
        const int whole = cols == np * QVIZ_PANEL;
        int32_t *o = whole ? j->out + m * j->N + n0 : scratch;
        j->fn(A, ld, j->Bp + p0 * j->ldb, j->ldb, j->K32, mr, np, o, whole ? j->N : QVIZ_TILE_LD, np * QVIZ_PANEL,
              (int32_t)j->mul, add, pf, pfn);
        if (!whole)
            for (int i = 0; i < mr; i++)
                memcpy(j->out + (m + (size_t)i) * j->N + n0, scratch + i * QVIZ_TILE_LD, (size_t)cols * sizeof(int32_t));
    }
    if (words != words_stack) free(words);
    if (rows != rows_stack) free(rows);
}

/* All P panels split into field groups, a share of the panels per task (qviz_split_block). */
typedef struct {
    int path;
    const uint32_t *Bp;
    size_t ldb, K32, P, tasks;
    int bits;
    uint32_t *dst;
} qviz_split_job;

static void qviz_split_task(void *arg, long t) {
    const qviz_split_job *j = (const qviz_split_job *)arg;
    size_t first, last;
    qviz_task_range(j->P, j->tasks, t, &first, &last);
    if (last > first)
        qviz_split_block(j->path, j->Bp + first * j->ldb, j->ldb, j->K32, (int)(last - first), j->bits,
                         j->dst + first * qviz_split_ldb(j->K32, j->bits));
}

/* out = mul * S + offset (+ popcount of each packed row when popcount_offset), S from `op` between the
 * activations `act` (packed here) and the panels. Returns 0, 1 if the activations held NaN (out is then
 * not meaningful), or -1 if there was no memory. */
static int qviz_panel_matmul_act(int path, int op, const qviz_act *act, size_t M, const uint32_t *Bp, size_t N,
                                 size_t K32, int64_t mul, int popcount_offset, int64_t offset, int32_t *out,
                                 int threads) {
    qviz_fused_job j;
    j.fn = qviz_panel_for(path, op, &j.MR, &j.NP);
    j.path = path, j.op = op, j.slots = qviz_panel_slots(path, op), j.popcount_offset = popcount_offset;
    j.act = *act;
    qviz_act_find_threshold(&j.act); /* once here, not in every row tile */
    j.Bp = Bp, j.M = M, j.N = N, j.K32 = K32, j.ldb = K32 * QVIZ_PANEL;
    j.P = (N + QVIZ_PANEL - 1) / QVIZ_PANEL;
    j.NB = (j.P + (size_t)j.NP - 1) / (size_t)j.NP;
    j.mul = mul, j.offset = offset, j.out = out;
    atomic_init(&j.nan_seen, 0);
    atomic_init(&j.failed, 0);
    const size_t MB = (M + (size_t)j.MR - 1) / (size_t)j.MR;
    const double work = (double)M * (double)N * (double)K32 * (op == QVIZ_P_DOT2 || op == QVIZ_P_DOT4 ? 8 : 1);
    const int team = qviz_team(work, (double)j.P * (double)j.ldb * 4.0, threads);
    /* one row tile on one thread (a GEMV): the fused task too, it saves the scratch buffers of packing first */
    if ((MB > 1 && j.P * j.ldb * 4 <= QVIZ_FUSED_L2) || (MB == 1 && team == 1)) {
        /* every tile passes over all the weights here: split them all once (at most 2 MiB from 512 KiB) */
        const qviz_panel_fn split_fn = qviz_split_panel_for(path, op, MB, K32);
        const int bits = qviz_dot_bits(op);
        uint32_t *split = split_fn ? (uint32_t *)aligned_alloc(64, j.P * qviz_split_ldb(K32, bits) * sizeof(uint32_t))
                                   : NULL;
        if (split) {
            qviz_split_job sj = {path, Bp, j.ldb, K32, j.P, (size_t)team, bits, split};
            qviz_parallel(qviz_split_task, &sj, team, team);
            j.fn = split_fn, j.Bp = split, j.ldb = qviz_split_ldb(K32, bits);
        }
        qviz_parallel(qviz_fused_task, &j, (long)MB, team);
        free(split);
        return atomic_load(&j.failed) ? -1 : atomic_load(&j.nan_seen);
    }
    /* panel-block order: pack every row first (rows in parallel), then the matmul */
#if QVIZ_X86 && defined(__GNUC__)
    if (qviz_quantizes_into_split(path, op, act)) { /* as the fused tiles do */
        const size_t lda = K32 * (size_t)j.slots;
        uint32_t *rows = (uint32_t *)malloc(M * lda * sizeof(uint32_t) + 16);
        if (!rows) return -1;
        qviz_quantize_split_job q = {path, act, K32, lda, M, rows};
        atomic_init(&q.nan_seen, 0);
        const long tasks = (long)((M + QVIZ_PACK_ROWS - 1) / QVIZ_PACK_ROWS);
        qviz_parallel(qviz_quantize_split_task, &q, tasks, (double)M * (double)act->K < 262144.0 ? 1 : threads);
        qviz_panel_matmul(path, op, rows, M, lda, Bp, N, K32, mul, NULL, offset, out, threads);
        free(rows);
        return atomic_load(&q.nan_seen);
    }
#endif
    uint64_t *words = (uint64_t *)malloc(M * act->W64 * sizeof(uint64_t) + 8);
    if (!words) return -1;
    int nan_seen = 0;
    if (act->mode == QVIZ_ACT_SIGNS)
        nan_seen = qviz_pack_signs_best(path, act->x, M, act->K, words, act->W64, threads);
    else {
        int64_t *sums = (int64_t *)malloc(M * sizeof(int64_t) + 8);
        if (!sums) {
            free(words);
            return -1;
        }
        nan_seen = qviz_pack_uniform(path, act->x, M, act->K, act->bits, act->inv_scale, act->zero_point, words,
                                     act->W64, sums, threads);
        free(sums);
    }
    const int failed = qviz_panel_matmul_rows(path, op, words, M, act->W64, Bp, N, K32, mul, popcount_offset, offset,
                                              out, threads);
    free(words);
    return failed ? -1 : nan_seen;
}

/* ------------------------------------------------------------------------------------------------ */
/* Codebook (LUT) matmul over panels, one codebook per layer: out[m, n] = sum_k x[m, k] cb[code(n, k)]. */
/* The 2^bits entries sit in a register (replicated to 16 so that the bits above a code, which belong */
/* to its neighbours, select the same entry); a shift of the panel word brings code c of all 16 rows   */
/* into the low bits of their lanes, one permute decodes them, one FMA per activation row uses them.    */

/* pf, pfn: the next block of panels for a GEMV tile (QVIZ_GEMV_FETCH), else NULL, 0 */
typedef void (*qviz_lut_fn)(const float *X, size_t ldx, size_t K, const uint32_t *B, size_t ldb, size_t K32,
                            const float *table, int mr, int np, float *out, size_t ldo, int cols, const char *pf,
                            size_t pfn);
#define QVIZ_LUT_ARGS X, ldx, K, B, ldb, K32, table, out, ldo, cols, pf, pfn

static void qviz_lut_portable(const float *X, size_t ldx, size_t K, const uint32_t *B, size_t ldb, size_t K32,
                              const float *table, int mr, int np, float *out, size_t ldo, int cols, int bits) {
    const size_t per = (size_t)(32 / bits);
    for (int i = 0; i < mr; i++)
        for (int q = 0; q < np; q++)
            for (int j = 0; j < QVIZ_PANEL && q * QVIZ_PANEL + j < cols; j++) {
                float s = 0.0f;
                for (size_t k = 0; k < K32; k++) {
                    const uint32_t word = B[(size_t)q * ldb + k * QVIZ_PANEL + (size_t)j];
                    for (size_t c = 0; c < per && k * per + c < K; c++)
                        s += X[(size_t)i * ldx + k * per + c] * table[(word >> (c * (size_t)bits)) & 15u];
                }
                out[(size_t)i * ldo + (size_t)(q * QVIZ_PANEL + j)] = s;
            }
}
#define QVIZ_LUT_PORTABLE(BITS)                                                                          \
    static void qviz_lut_portable_##BITS(const float *X, size_t ldx, size_t K, const uint32_t *B, size_t ldb,  \
                                         size_t K32, const float *table, int mr, int np, float *out, size_t ldo, \
                                         int cols, const char *pf, size_t pfn) {                         \
        (void)pf, (void)pfn;                                                                            \
        qviz_lut_portable(X, ldx, K, B, ldb, K32, table, mr, np, out, ldo, cols, BITS);                  \
    }
QVIZ_LUT_PORTABLE(1)
QVIZ_LUT_PORTABLE(2)
QVIZ_LUT_PORTABLE(4)

#if QVIZ_X86 && defined(__GNUC__)
/* One panel word of codes (`codes` of them: all but in the last word of a row) for MR rows x NP panels.
 * A single row alternates two accumulator banks (c0_*, c1_*): NP chains alone would wait on the FMA
 * latency. Named accumulators, as in qviz_p512_pop. */
#define QVIZ_FMA_UPD(c, a, v) _mm512_fmadd_ps(a, v, c)
#define QVIZ_LUT_ROW(i, unused)                                                                         \
    if (MR > i) {                                                                                       \
        const __m512 xa##i = _mm512_set1_ps(x[(size_t)i * ldx + (size_t)c]);                            \
        QVIZ_ROW_UPD(i, QVIZ_FMA_UPD, xa##i)                                                            \
    }
#define QVIZ_LUT512_WORD(CODES)                                                                         \
    for (int c = 0; c < (CODES); c++) {                                                                 \
        const __m512 v0 = _mm512_permutexvar_ps(_mm512_srli_epi32(b0, c * BITS), tab);                  \
        const __m512 v1 = NP > 1 ? _mm512_permutexvar_ps(_mm512_srli_epi32(b1, c * BITS), tab) : v0;    \
        const __m512 v2 = NP > 2 ? _mm512_permutexvar_ps(_mm512_srli_epi32(b2, c * BITS), tab) : v0;    \
        const __m512 v3 = NP > 3 ? _mm512_permutexvar_ps(_mm512_srli_epi32(b3, c * BITS), tab) : v0;    \
        if (MR == 1) {                                                                                  \
            const __m512 xa = _mm512_set1_ps(x[c]);                                                     \
            if (c & 1) {                                                                                \
                c1_0 = _mm512_fmadd_ps(xa, v0, c1_0);                                                   \
                if (NP > 1) c1_1 = _mm512_fmadd_ps(xa, v1, c1_1);                                       \
                if (NP > 2) c1_2 = _mm512_fmadd_ps(xa, v2, c1_2);                                       \
                if (NP > 3) c1_3 = _mm512_fmadd_ps(xa, v3, c1_3);                                       \
            } else {                                                                                    \
                c0_0 = _mm512_fmadd_ps(xa, v0, c0_0);                                                   \
                if (NP > 1) c0_1 = _mm512_fmadd_ps(xa, v1, c0_1);                                       \
                if (NP > 2) c0_2 = _mm512_fmadd_ps(xa, v2, c0_2);                                       \
                if (NP > 3) c0_3 = _mm512_fmadd_ps(xa, v3, c0_3);                                       \
            }                                                                                           \
        } else {                                                                                        \
            QVIZ_ROWS(QVIZ_LUT_ROW, 0)                                                                  \
        }                                                                                               \
    }
#define QVIZ_LUT_LOAD(q, k) (NP > q ? _mm512_loadu_si512((const void *)(B + q * ldb + (k) * QVIZ_PANEL)) : _mm512_setzero_si512())
#define QVIZ_FSTORE512(i, q, c) _mm512_storeu_ps(C + i * QVIZ_TILE_LD + q * QVIZ_PANEL, c);

/* out[i, j] = C[i, j] for j < cols, out of line: a masked store or a call inside the kernel function
 * makes GCC 12 keep every accumulator in a stack slot during the hot loop (measured 1.8x slower). */
static __attribute__((noinline)) QVIZ_AVX512_FN void qviz_lut_epilogue512(const float *C, int mr, int np, float *out,
                                                                         size_t ldo, int cols) {
    for (int i = 0; i < mr; i++)
        for (int q = 0; q < np; q++) {
            const int n = cols - q * QVIZ_PANEL;
            if (n <= 0) break;
            _mm512_mask_storeu_ps(out + (size_t)i * ldo + (size_t)(q * QVIZ_PANEL),
                                  n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1),
                                  _mm512_loadu_ps(C + i * QVIZ_TILE_LD + q * QVIZ_PANEL));
        }
}

QVIZ_INLINE QVIZ_AVX512_FN void qviz_lut512(const int BITS, const int MR, const int NP, const float *X, size_t ldx,
                                            size_t K, const uint32_t *B, size_t ldb, size_t K32, const float *table,
                                            float *out, size_t ldo, int cols, const char *pf, size_t pfn) {
    float C[QVIZ_TILE_MR * QVIZ_TILE_LD] __attribute__((aligned(64)));
    const int PER = 32 / BITS;
    const __m512 tab = _mm512_loadu_ps(table);
    QVIZ_TILE_DECL(__m512, _mm512_setzero_ps());
    const size_t full = K / (size_t)PER;
    for (size_t k = 0; k < full; k++) {
        const __m512i b0 = QVIZ_LUT_LOAD(0, k), b1 = QVIZ_LUT_LOAD(1, k), b2 = QVIZ_LUT_LOAD(2, k),
                      b3 = QVIZ_LUT_LOAD(3, k);
        QVIZ_GEMV_FETCH(k, QVIZ_GEMV_AHEAD_LUT, NP)
        const float *x = X + k * (size_t)PER;
        QVIZ_LUT512_WORD(PER)
    }
    if (full < K32) {
        const __m512i b0 = QVIZ_LUT_LOAD(0, full), b1 = QVIZ_LUT_LOAD(1, full), b2 = QVIZ_LUT_LOAD(2, full),
                      b3 = QVIZ_LUT_LOAD(3, full);
        const float *x = X + full * (size_t)PER;
        const int codes = (int)(K - full * (size_t)PER);
        QVIZ_LUT512_WORD(codes)
    }
    if (MR == 1) {
        c0_0 = _mm512_add_ps(c0_0, c1_0), c0_1 = _mm512_add_ps(c0_1, c1_1);
        c0_2 = _mm512_add_ps(c0_2, c1_2), c0_3 = _mm512_add_ps(c0_3, c1_3);
    }
    QVIZ_ROWS(QVIZ_ROW_STORE, QVIZ_FSTORE512)
    qviz_lut_epilogue512(C, MR, NP, out, ldo, cols);
}

/* AVX2: 16 entries in two registers; vpermps looks up the low 3 bits, bit 3 (moved to the sign bit)
 * picks the register. Codes of 1 and 2 bits use one register (entries replicated). */
QVIZ_INLINE QVIZ_AVX2_FN void qviz_lut256_word(const int BITS, const int MR, const int codes, const float *x,
                                               size_t ldx, __m256i b0, __m256i b1, __m256 tlo, __m256 thi,
                                               __m256 (*acc)[2]) {
    for (int c = 0; c < codes; c++) {
        const __m256i i0 = _mm256_srli_epi32(b0, c * BITS), i1 = _mm256_srli_epi32(b1, c * BITS);
        __m256 w0 = _mm256_permutevar8x32_ps(tlo, i0), w1 = _mm256_permutevar8x32_ps(tlo, i1);
        if (BITS == 4) {
            w0 = _mm256_blendv_ps(w0, _mm256_permutevar8x32_ps(thi, i0), _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
            w1 = _mm256_blendv_ps(w1, _mm256_permutevar8x32_ps(thi, i1), _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
        }
        for (int i = 0; i < MR; i++) {
            const __m256 xa = _mm256_broadcast_ss(x + (size_t)i * ldx + (size_t)c);
            const int r = MR == 1 ? (c & 1) : i;
            acc[r][0] = _mm256_fmadd_ps(xa, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xa, w1, acc[r][1]);
        }
    }
}

QVIZ_INLINE QVIZ_AVX2_FN void qviz_lut256(const int BITS, const int MR, const int NP, const float *X, size_t ldx,
                                          size_t K, const uint32_t *B, size_t ldb, size_t K32, const float *table,
                                          float *out, size_t ldo, int cols, const char *pf, size_t pfn) {
    (void)NP;
    const int PER = 32 / BITS, R = MR == 1 ? 2 : MR;
    const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
    __m256 acc[QVIZ_TILE_MR][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const size_t full = K / (size_t)PER;
    for (size_t k = 0; k < K32; k++) {
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL));
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(B + k * QVIZ_PANEL + 8));
        /* a GEMV streams its weights once and slowly (two permutes per 8 codes on one port): on a Xeon
         * the hardware prefetcher left it waiting on every line from DRAM (1.3 GB/s) without this */
        QVIZ_GEMV_FETCH(k, QVIZ_GEMV_AHEAD_LUT, 1)
        if (k < full)
            qviz_lut256_word(BITS, MR, PER, X + k * (size_t)PER, ldx, b0, b1, tlo, thi, acc);
        else
            qviz_lut256_word(BITS, MR, (int)(K - k * (size_t)PER), X + k * (size_t)PER, ldx, b0, b1, tlo, thi, acc);
    }
    if (MR == 1) {
        acc[0][0] = _mm256_add_ps(acc[0][0], acc[1][0]);
        acc[0][1] = _mm256_add_ps(acc[0][1], acc[1][1]);
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 2; v++) {
            const int n = cols - v * 8;
            if (n > 0)
                _mm256_maskstore_ps(out + i * ldo + v * 8,
                                    _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                    acc[i][v]);
        }
}

#define QVIZ_LUT_TILE_FN(BITS, MR, NP)                                                                  \
    static __attribute__((noinline)) QVIZ_AVX512_FN QVIZ_NO_PRE void qviz_lut_avx512_##BITS##_##MR##x##NP(    \
        const float *X, size_t ldx, size_t K, const uint32_t *B, size_t ldb, size_t K32, const float *table,    \
        float *out, size_t ldo, int cols, const char *pf, size_t pfn) {                                  \
        qviz_lut512(BITS, MR, NP, QVIZ_LUT_ARGS);                                                       \
    }
#define QVIZ_LUT_TILE_FNS(BITS, MR) QVIZ_LUT_TILE_FN(BITS, MR, 1) QVIZ_LUT_TILE_FN(BITS, MR, 2)          \
    QVIZ_LUT_TILE_FN(BITS, MR, 3) QVIZ_LUT_TILE_FN(BITS, MR, 4)
#define QVIZ_LT(BITS, MR, NP)                                                                           \
    case ((MR)-1) * QVIZ_TILE_NP + (NP)-1: qviz_lut_avx512_##BITS##_##MR##x##NP(QVIZ_LUT_ARGS); break;
#define QVIZ_LT_NP(BITS, MR) QVIZ_LT(BITS, MR, 1) QVIZ_LT(BITS, MR, 2) QVIZ_LT(BITS, MR, 3) QVIZ_LT(BITS, MR, 4)
#define QVIZ_LUT512_FN(BITS)                                                                            \
    QVIZ_LUT_TILE_FNS(BITS, 1) QVIZ_LUT_TILE_FNS(BITS, 2) QVIZ_LUT_TILE_FNS(BITS, 3)                      \
    QVIZ_LUT_TILE_FNS(BITS, 4) QVIZ_LUT_TILE_FNS(BITS, 5) QVIZ_LUT_TILE_FNS(BITS, 6)                      \
    static void qviz_lut_avx512_##BITS(const float *X, size_t ldx, size_t K, const uint32_t *B, size_t ldb, \
                                       size_t K32, const float *table, int mr, int np, float *out, size_t ldo, \
                                       int cols, const char *pf, size_t pfn) {                          \
        switch ((mr - 1) * QVIZ_TILE_NP + np - 1) {                                                     \
            QVIZ_LT_NP(BITS, 1) QVIZ_LT_NP(BITS, 2) QVIZ_LT_NP(BITS, 3) QVIZ_LT_NP(BITS, 4)              \
            QVIZ_LT_NP(BITS, 5) QVIZ_LT_NP(BITS, 6)                                                     \
        default: break;                                                                                 \
        }                                                                                               \
    }
QVIZ_LUT512_FN(1)
QVIZ_LUT512_FN(2)
QVIZ_LUT512_FN(4)

#define QVIZ_LUT256_FN(BITS)                                                                              \
    static QVIZ_AVX2_FN void qviz_lut_avx2_##BITS(const float *X, size_t ldx, size_t K, const uint32_t *B,    \
                                                  size_t ldb, size_t K32, const float *table, int mr, int np, \
                                                  float *out, size_t ldo, int cols, const char *pf, size_t pfn) { \
        switch (mr) {                                                                                      \
        case 1: qviz_lut256(BITS, 1, 1, QVIZ_LUT_ARGS); break;                                             \
        case 2: qviz_lut256(BITS, 2, 1, QVIZ_LUT_ARGS); break;                                             \
        case 3: qviz_lut256(BITS, 3, 1, QVIZ_LUT_ARGS); break;                                             \
        default: qviz_lut256(BITS, 4, 1, QVIZ_LUT_ARGS); break;                                            \
        }                                                                                                  \
        (void)np;                                                                                          \
    }
QVIZ_LUT256_FN(1)
QVIZ_LUT256_FN(2)
QVIZ_LUT256_FN(4)
#endif

/* ------------------------------------------------------------------------------------------------ */
/* Codebook GEMM (several activation rows): decode a block of panels once into floats, then a plain    */
/* FMA tile over it. Decoding costs a shift and a permute (a blend more on AVX2) per 16 weights; in    */
/* the GEMV kernel above each row tile pays it again, here all M rows share it, so the loop is         */
/* FMA-bound like a float GEMM. The decoded block (K x 64 floats) is read from L2.                    */

#define QVIZ_DECODED_BYTES (512 * 1024) /* larger decoded blocks fall out of L2: the panel kernel decodes in place */

#if QVIZ_X86 && defined(__GNUC__)
/* wf[k * ld + q * 16 + j] = table[code k of row 16 q + j], k < K, q < np (ld = np * 16) */
static QVIZ_AVX512_FN void qviz_lut_decode512(int bits, const uint32_t *B, size_t ldb, size_t K, int np,
                                             const float *table, float *wf) {
    const size_t per = (size_t)(32 / bits), ld = (size_t)np * QVIZ_PANEL;
    const __m512 tab = _mm512_loadu_ps(table);
    for (int q = 0; q < np; q++)
        for (size_t k = 0; k < K; k += per) {
            const __m512i b = _mm512_loadu_si512((const void *)(B + (size_t)q * ldb + (k / per) * QVIZ_PANEL));
            const size_t codes = K - k < per ? K - k : per;
            for (size_t c = 0; c < codes; c++)
                _mm512_storeu_ps(wf + (k + c) * ld + (size_t)q * QVIZ_PANEL,
                                 _mm512_permutexvar_ps(_mm512_srlv_epi32(b, _mm512_set1_epi32((int)(c * (size_t)bits))), tab));
        }
}

/* The same for codebooks that do not fit a register: one per output row (stride 2^bits floats) or one of
 * 256 entries (8-bit codes). Lane j of panel q is row n0 + 16 q + j; lanes past N (zero codes of the
 * padding rows) are not looked up and decode to 0, so the gather never reads past the codebooks. */
static QVIZ_AVX512_FN void qviz_lut_gather512(int bits, const uint32_t *B, size_t ldb, size_t K, int np,
                                             const float *cb, size_t stride, size_t n0, size_t N, float *wf) {
    const size_t per = (size_t)(32 / bits), ld = (size_t)np * QVIZ_PANEL;
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1), lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                                      10, 11, 12, 13, 14, 15);
    for (int q = 0; q < np; q++) {
        const size_t r0 = n0 + (size_t)q * QVIZ_PANEL, left = N > r0 ? N - r0 : 0;
        const __mmask16 valid = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512i base = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)r0), lane),
                                                _mm512_set1_epi32((int)stride));
        for (size_t k = 0; k < K; k += per) {
            const __m512i b = _mm512_loadu_si512((const void *)(B + (size_t)q * ldb + (k / per) * QVIZ_PANEL));
            const size_t codes = K - k < per ? K - k : per;
            for (size_t c = 0; c < codes; c++) {
                const __m512i idx = _mm512_add_epi32(base, _mm512_and_si512(
                    _mm512_srlv_epi32(b, _mm512_set1_epi32((int)(c * (size_t)bits))), mask));
                _mm512_storeu_ps(wf + (k + c) * ld + (size_t)q * QVIZ_PANEL,
                                 _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, cb, 4));
            }
        }
    }
}

static QVIZ_AVX2_FN void qviz_lut_decode256(int bits, const uint32_t *B, size_t ldb, size_t K, int np,
                                           const float *table, float *wf) {
    const size_t per = (size_t)(32 / bits), ld = (size_t)np * QVIZ_PANEL;
    const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
    for (int q = 0; q < np; q++)
        for (int v = 0; v < 2; v++)
            for (size_t k = 0; k < K; k += per) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(B + (size_t)q * ldb + (k / per) * QVIZ_PANEL + 8 * v));
                const size_t codes = K - k < per ? K - k : per;
                for (size_t c = 0; c < codes; c++) {
                    const __m256i idx = _mm256_srlv_epi32(b, _mm256_set1_epi32((int)(c * (size_t)bits)));
                    __m256 w = _mm256_permutevar8x32_ps(tlo, idx);
                    if (bits == 4)
                        w = _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(thi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                    _mm256_storeu_ps(wf + (k + c) * ld + (size_t)q * QVIZ_PANEL + 8 * v, w);
                }
            }
}

static QVIZ_AVX2_FN void qviz_lut_gather256(int bits, const uint32_t *B, size_t ldb, size_t K, int np,
                                           const float *cb, size_t stride, size_t n0, size_t N, float *wf) {
    const size_t per = (size_t)(32 / bits), ld = (size_t)np * QVIZ_PANEL;
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int q = 0; q < np; q++)
        for (int v = 0; v < 2; v++) {
            const size_t r0 = n0 + (size_t)q * QVIZ_PANEL + 8 * (size_t)v;
            const __m256i rows = _mm256_add_epi32(_mm256_set1_epi32((int)r0), lane);
            const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(N > r0 ? (N - r0 < 8 ? N - r0 : 8) : 0)), lane);
            const __m256i base = _mm256_mullo_epi32(rows, _mm256_set1_epi32((int)stride));
            for (size_t k = 0; k < K; k += per) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(B + (size_t)q * ldb + (k / per) * QVIZ_PANEL + 8 * v));
                const size_t codes = K - k < per ? K - k : per;
                for (size_t c = 0; c < codes; c++) {
                    const __m256i idx = _mm256_add_epi32(base, _mm256_and_si256(
                        _mm256_srlv_epi32(b, _mm256_set1_epi32((int)(c * (size_t)bits))), mask));
                    _mm256_storeu_ps(wf + (k + c) * ld + (size_t)q * QVIZ_PANEL + 8 * v,
                                     _mm256_mask_i32gather_ps(_mm256_setzero_ps(), cb, idx, _mm256_castsi256_ps(valid), 4));
                }
            }
        }
}

/* C[i * 64 + q * 16 + j] = sum_k X[i, k] wf[k, q * 16 + j]: 6 rows x NP panels, named accumulators */
#define QVIZ_WF_LOAD(q) (NP > q ? _mm512_loadu_ps(wf + k * ld + q * QVIZ_PANEL) : _mm512_setzero_ps())
#define QVIZ_WF_ROW(i, unused)                                                                          \
    if (MR > i) {                                                                                       \
        const __m512 xa##i = _mm512_set1_ps(X[(size_t)i * ldx + k]);                                    \
        QVIZ_ROW_UPD(i, QVIZ_FMA_UPD, xa##i)                                                            \
    }
QVIZ_INLINE QVIZ_AVX512_FN void qviz_wf512(const int MR, const int NP, const float *X, size_t ldx, size_t K,
                                           const float *wf, size_t ld, float *out, size_t ldo, int cols) {
    float C[QVIZ_TILE_MR * QVIZ_TILE_LD] __attribute__((aligned(64)));
    QVIZ_TILE_DECL(__m512, _mm512_setzero_ps());
    for (size_t k = 0; k < K; k++) {
        const __m512 v0 = QVIZ_WF_LOAD(0), v1 = QVIZ_WF_LOAD(1), v2 = QVIZ_WF_LOAD(2), v3 = QVIZ_WF_LOAD(3);
        QVIZ_ROWS(QVIZ_WF_ROW, 0)
    }
    QVIZ_ROWS(QVIZ_ROW_STORE, QVIZ_FSTORE512)
    qviz_lut_epilogue512(C, MR, NP, out, ldo, cols);
}
#define QVIZ_WF_FN(MR, NP)                                                                              \
    static __attribute__((noinline)) QVIZ_AVX512_FN QVIZ_NO_PRE void qviz_wf512_##MR##x##NP(             \
        const float *X, size_t ldx, size_t K, const float *wf, size_t ld, float *out, size_t ldo, int cols) { \
        qviz_wf512(MR, NP, X, ldx, K, wf, ld, out, ldo, cols);                                          \
    }
#define QVIZ_WF_FNS(MR) QVIZ_WF_FN(MR, 1) QVIZ_WF_FN(MR, 2) QVIZ_WF_FN(MR, 3) QVIZ_WF_FN(MR, 4)
QVIZ_WF_FNS(1) QVIZ_WF_FNS(2) QVIZ_WF_FNS(3) QVIZ_WF_FNS(4) QVIZ_WF_FNS(5) QVIZ_WF_FNS(6)
#define QVIZ_WF_CASE(MR, NP)                                                                            \
    case ((MR)-1) * QVIZ_TILE_NP + (NP)-1: qviz_wf512_##MR##x##NP(X, ldx, K, wf, ld, out, ldo, cols); break;
#define QVIZ_WF_CASES(MR) QVIZ_WF_CASE(MR, 1) QVIZ_WF_CASE(MR, 2) QVIZ_WF_CASE(MR, 3) QVIZ_WF_CASE(MR, 4)
static void qviz_wf_avx512(const float *X, size_t ldx, size_t K, const float *wf, size_t ld, int mr, int np,
                           float *out, size_t ldo, int cols) {
    switch ((mr - 1) * QVIZ_TILE_NP + np - 1) {
        QVIZ_WF_CASES(1) QVIZ_WF_CASES(2) QVIZ_WF_CASES(3) QVIZ_WF_CASES(4) QVIZ_WF_CASES(5) QVIZ_WF_CASES(6)
    default: break;
    }
}

/* AVX2: 6 rows x one panel (two 256-bit halves): 12 accumulators */
QVIZ_INLINE QVIZ_AVX2_FN void qviz_wf256(const int MR, const float *X, size_t ldx, size_t K, const float *wf,
                                         size_t ld, float *out, size_t ldo, int cols) {
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0, a4 = a0, b4 = a0,
           a5 = a0, b5 = a0;
    for (size_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(wf + k * ld), w1 = _mm256_loadu_ps(wf + k * ld + 8);
#define QVIZ_WF256_ROW(i)                                                                               \
        if (MR > i) {                                                                                   \
            const __m256 xa = _mm256_broadcast_ss(X + (size_t)i * ldx + k);                             \
            a##i = _mm256_fmadd_ps(xa, w0, a##i);                                                       \
            b##i = _mm256_fmadd_ps(xa, w1, b##i);                                                       \
        }
        QVIZ_WF256_ROW(0) QVIZ_WF256_ROW(1) QVIZ_WF256_ROW(2) QVIZ_WF256_ROW(3) QVIZ_WF256_ROW(4) QVIZ_WF256_ROW(5)
#undef QVIZ_WF256_ROW
    }
    float C[6 * 16];
#define QVIZ_WF256_STORE(i)                                                                             \
    if (MR > i) {                                                                                       \
        _mm256_storeu_ps(C + 16 * i, a##i);                                                             \
        _mm256_storeu_ps(C + 16 * i + 8, b##i);                                                         \
    }
    QVIZ_WF256_STORE(0) QVIZ_WF256_STORE(1) QVIZ_WF256_STORE(2) QVIZ_WF256_STORE(3) QVIZ_WF256_STORE(4)
    QVIZ_WF256_STORE(5)
#undef QVIZ_WF256_STORE
    for (int i = 0; i < MR; i++) memcpy(out + (size_t)i * ldo, C + 16 * i, (size_t)(cols < 16 ? cols : 16) * sizeof(float));
}
#define QVIZ_WF256_FN(MR)                                                                               \
    static __attribute__((noinline)) QVIZ_AVX2_FN QVIZ_NO_PRE void qviz_wf256_##MR(                      \
        const float *X, size_t ldx, size_t K, const float *wf, size_t ld, float *out, size_t ldo, int cols) { \
        qviz_wf256(MR, X, ldx, K, wf, ld, out, ldo, cols);                                              \
    }
QVIZ_WF256_FN(1) QVIZ_WF256_FN(2) QVIZ_WF256_FN(3) QVIZ_WF256_FN(4) QVIZ_WF256_FN(5) QVIZ_WF256_FN(6)
static void qviz_wf_avx2(const float *X, size_t ldx, size_t K, const float *wf, size_t ld, int mr, int np,
                         float *out, size_t ldo, int cols) {
    (void)np;
    switch (mr) {
    case 1: qviz_wf256_1(X, ldx, K, wf, ld, out, ldo, cols); break;
    case 2: qviz_wf256_2(X, ldx, K, wf, ld, out, ldo, cols); break;
    case 3: qviz_wf256_3(X, ldx, K, wf, ld, out, ldo, cols); break;
    case 4: qviz_wf256_4(X, ldx, K, wf, ld, out, ldo, cols); break;
    case 5: qviz_wf256_5(X, ldx, K, wf, ld, out, ldo, cols); break;
    default: qviz_wf256_6(X, ldx, K, wf, ld, out, ldo, cols); break;
    }
}

typedef struct {
    int avx512, bits, NP, gather;
    const float *X, *table, *cb;
    const uint32_t *Bp;
    size_t M, N, K, K32, ldb, P, stride;
    float *out;
    _Atomic int failed;
} qviz_wf_job;

/* Task t: panel block t, every activation row. */
static void qviz_wf_task(void *arg, long t) {
    qviz_wf_job *j = (qviz_wf_job *)arg;
    const size_t p0 = (size_t)t * (size_t)j->NP, n0 = p0 * QVIZ_PANEL;
    const int np = (int)(j->P - p0 < (size_t)j->NP ? j->P - p0 : (size_t)j->NP);
    const int cols = (int)(j->N - n0 < (size_t)np * QVIZ_PANEL ? j->N - n0 : (size_t)np * QVIZ_PANEL);
    const size_t ld = (size_t)np * QVIZ_PANEL;
    /* 64-byte aligned: with malloc's 16, every vector load of the decoded block spanned two cache lines
     * (measured 10-20% of a codebook GEMM on a Xeon) */
    float *wf = (float *)aligned_alloc(64, (j->K * ld * sizeof(float) + 127) / 64 * 64);
    if (!wf) {
        atomic_store(&j->failed, 1);
        return;
    }
    if (j->gather && j->avx512)
        qviz_lut_gather512(j->bits, j->Bp + p0 * j->ldb, j->ldb, j->K, np, j->cb, j->stride, n0, j->N, wf);
    else if (j->gather)
        qviz_lut_gather256(j->bits, j->Bp + p0 * j->ldb, j->ldb, j->K, np, j->cb, j->stride, n0, j->N, wf);
    else if (j->avx512)
        qviz_lut_decode512(j->bits, j->Bp + p0 * j->ldb, j->ldb, j->K, np, j->table, wf);
    else
        qviz_lut_decode256(j->bits, j->Bp + p0 * j->ldb, j->ldb, j->K, np, j->table, wf);
    for (size_t m = 0; m < j->M; m += 6) {
        const int mr = (int)(j->M - m < 6 ? j->M - m : 6);
        if (j->avx512)
            qviz_wf_avx512(j->X + m * j->K, j->K, j->K, wf, ld, mr, np, j->out + m * j->N + n0, j->N, cols);
        else
            qviz_wf_avx2(j->X + m * j->K, j->K, j->K, wf, ld, mr, np, j->out + m * j->N + n0, j->N, cols);
    }
    free(wf);
}
#endif

static qviz_lut_fn qviz_lut_for(int path, int bits, int *mr, int *np) {
    const int b = bits == 1 ? 0 : bits == 2 ? 1 : 2;
    *mr = 4;
    *np = 1;
    static const qviz_lut_fn portable[3] = {qviz_lut_portable_1, qviz_lut_portable_2, qviz_lut_portable_4};
#if QVIZ_X86 && defined(__GNUC__)
    static const qviz_lut_fn avx2[3] = {qviz_lut_avx2_1, qviz_lut_avx2_2, qviz_lut_avx2_4};
    static const qviz_lut_fn avx512[3] = {qviz_lut_avx512_1, qviz_lut_avx512_2, qviz_lut_avx512_4};
    if (path >= QVIZ_AVX512) {
        *mr = 6; /* 6 x 4 accumulators + 4 decoded vectors + table + broadcast: 30 registers */
        *np = QVIZ_TILE_NP;
        return avx512[b];
    }
    if (qviz_avx2_class(path)) return avx2[b];
#endif
    (void)path;
    return portable[b];
}

typedef struct {
    qviz_lut_fn fn;
    int MR, NP;
    const float *X, *table;
    const uint32_t *Bp;
    size_t M, N, K, K32, ldb, P, NB, tasks;
    float *out;
} qviz_lut_job;

/* Task t: consecutive panel blocks against every row block, as qviz_panel_task (one stream of
 * weights per thread). */
static void qviz_lut_task(void *arg, long t) {
    const qviz_lut_job *j = (const qviz_lut_job *)arg;
    size_t first, last;
    qviz_task_range(j->NB, j->tasks, t, &first, &last);
    for (size_t nb = first; nb < last; nb++) {
        const size_t p0 = nb * (size_t)j->NP, n0 = p0 * QVIZ_PANEL;
        const int np = (int)(j->P - p0 < (size_t)j->NP ? j->P - p0 : (size_t)j->NP);
        const int cols = (int)(j->N - n0 < (size_t)np * QVIZ_PANEL ? j->N - n0 : (size_t)np * QVIZ_PANEL);
        /* a GEMV's tile fetches the next block (QVIZ_GEMV_FETCH), whatever task it falls in */
        const size_t p1 = p0 + (size_t)j->NP;
        const size_t pfn = j->M == 1 ? qviz_block_lines(p1, j->P, (size_t)j->NP, j->K32) : 0;
        const char *pf = pfn ? (const char *)(j->Bp + p1 * j->ldb) : NULL;
        for (size_t m = 0; m < j->M; m += (size_t)j->MR) {
            const int mr = (int)(j->M - m < (size_t)j->MR ? j->M - m : (size_t)j->MR);
            j->fn(j->X + m * j->K, j->K, j->K, j->Bp + p0 * j->ldb, j->ldb, j->K32, j->table, mr, np,
                  j->out + m * j->N + n0, j->N, cols, pf, pfn);
        }
    }
}

#if QVIZ_X86 && defined(__GNUC__)
/* GEMV with codes of 1 or 2 bits (AVX-512): 4 / bits codes side by side form a 4-bit index, and a table
 * of 16 partial sums per group of codes, T[g][i] = sum_t x[g G + t] codebook[field t of i], turns their
 * multiply-adds into one permute and one add per 16 rows: half the instructions of decoding each code
 * at 2 bits, a quarter at 1 bit. The tables (64 bytes a group, K / G groups) are built once per call. */
typedef struct {
    const float *tables;
    const uint32_t *Bp;
    size_t N, K32, ldb, P;
    float *out;
} qviz_gemv_tab_job;

static QVIZ_AVX512_FN QVIZ_NO_PRE void qviz_gemv_tab_task(void *arg, long t) {
    const qviz_gemv_tab_job *j = (const qviz_gemv_tab_job *)arg;
    const size_t p0 = (size_t)t * QVIZ_TILE_NP, n0 = p0 * QVIZ_PANEL;
    const int np = (int)(j->P - p0 < QVIZ_TILE_NP ? j->P - p0 : QVIZ_TILE_NP);
    const uint32_t *B = j->Bp + p0 * j->ldb;
    const size_t p1 = p0 + QVIZ_TILE_NP, K32 = j->K32, ldb = j->ldb;
    const size_t pfn = qviz_block_lines(p1, j->P, QVIZ_TILE_NP, K32); /* the next block (QVIZ_GEMV_FETCH) */
    const char *pf = pfn ? (const char *)(j->Bp + p1 * ldb) : NULL;
    const int MR = 1; /* a GEMV: QVIZ_GEMV_FETCH acts for one-row tiles */
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (size_t k = 0; k < K32; k++) {
        const float *T = j->tables + k * 8 * 16; /* 8 groups of 4 bits in a 32-bit word */
        QVIZ_GEMV_FETCH(k, QVIZ_GEMV_AHEAD_LUT, np)
        const __m512i w0 = _mm512_loadu_si512((const void *)(B + k * QVIZ_PANEL));
        const __m512i w1 = np > 1 ? _mm512_loadu_si512((const void *)(B + j->ldb + k * QVIZ_PANEL)) : w0;
        const __m512i w2 = np > 2 ? _mm512_loadu_si512((const void *)(B + 2 * j->ldb + k * QVIZ_PANEL)) : w0;
        const __m512i w3 = np > 3 ? _mm512_loadu_si512((const void *)(B + 3 * j->ldb + k * QVIZ_PANEL)) : w0;
        for (int g = 0; g < 8; g += 2) { /* two banks of accumulators: the adds are a dependency chain */
            const __m512 t0 = _mm512_loadu_ps(T + g * 16), t1 = _mm512_loadu_ps(T + g * 16 + 16);
            a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(_mm512_srli_epi32(w0, 4 * g), t0));
            a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(w1, 4 * g), t0));
            a2 = _mm512_add_ps(a2, _mm512_permutexvar_ps(_mm512_srli_epi32(w2, 4 * g), t0));
            a3 = _mm512_add_ps(a3, _mm512_permutexvar_ps(_mm512_srli_epi32(w3, 4 * g), t0));
            b0 = _mm512_add_ps(b0, _mm512_permutexvar_ps(_mm512_srli_epi32(w0, 4 * g + 4), t1));
            b1 = _mm512_add_ps(b1, _mm512_permutexvar_ps(_mm512_srli_epi32(w1, 4 * g + 4), t1));
            b2 = _mm512_add_ps(b2, _mm512_permutexvar_ps(_mm512_srli_epi32(w2, 4 * g + 4), t1));
            b3 = _mm512_add_ps(b3, _mm512_permutexvar_ps(_mm512_srli_epi32(w3, 4 * g + 4), t1));
        }
    }
    const __m512 s[4] = {_mm512_add_ps(a0, b0), _mm512_add_ps(a1, b1), _mm512_add_ps(a2, b2), _mm512_add_ps(a3, b3)};
    for (int q = 0; q < np; q++) {
        const size_t left = j->N - n0 - (size_t)q * QVIZ_PANEL;
        _mm512_mask_storeu_ps(j->out + n0 + (size_t)q * QVIZ_PANEL,
                              left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1), s[q]);
    }
}

/* Returns 0, or -1 if there was no memory for the tables (the caller falls back to decoding). */
static QVIZ_AVX512_FN int qviz_gemv_tab(const float *x, size_t K, const uint32_t *Bp, size_t N, size_t K32, int bits,
                                        const float *codebook, float *out, int threads) {
    const size_t groups = K32 * 8, G = (size_t)(4 / bits);
    float *tables = (float *)aligned_alloc(64, groups * 16 * sizeof(float));
    if (!tables) return -1;
    float cb[16][4]; /* cb[i][t] = codebook entry of field t of index i */
    const int mask = (1 << bits) - 1;
    for (int i = 0; i < 16; i++)
        for (size_t t = 0; t < 4; t++) cb[i][t] = t < G ? codebook[(i >> (t * (size_t)bits)) & mask] : 0.0f;
    __m512 col[4];
    for (size_t t = 0; t < 4; t++) {
        float c[16];
        for (int i = 0; i < 16; i++) c[i] = cb[i][t];
        col[t] = _mm512_loadu_ps(c);
    }
    for (size_t g = 0; g < groups; g++) { /* codes past K have x = 0 (their codes are zero padding) */
        __m512 v = _mm512_setzero_ps();
        for (size_t t = 0; t < G; t++) {
            const size_t k = g * G + t;
            if (k < K) v = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), col[t], v);
        }
        _mm512_store_ps(tables + g * 16, v);
    }
    qviz_gemv_tab_job j;
    j.tables = tables, j.Bp = Bp, j.N = N, j.K32 = K32, j.ldb = K32 * QVIZ_PANEL;
    j.P = (N + QVIZ_PANEL - 1) / QVIZ_PANEL, j.out = out;
    const int team = (double)N * (double)K < (double)QVIZ_PARALLEL_MIN ? 1 : threads;
    qviz_parallel(qviz_gemv_tab_task, &j, (long)((j.P + QVIZ_TILE_NP - 1) / QVIZ_TILE_NP), team);
    free(tables);
    return 0;
}
#endif

/* codebook: 2^bits floats (cb_stride 0), or one codebook of 2^bits floats per output row (cb_stride 2^bits).
 * One codebook of up to 16 entries: the kernels read a 16-entry table in which entry c is
 * codebook[c mod 2^bits]. Per-row codebooks and 8-bit codes decode with gathers, once per block of panels
 * (qviz_panel_lut_ok says when a call qualifies). */
static int qviz_panel_lut_ok(int path, size_t M, size_t N, size_t K, int bits, size_t cb_stride) {
    if (bits <= 4 && cb_stride == 0) return 1;
#if QVIZ_X86 && defined(__GNUC__)
    /* gathers take int32 offsets; a decoded block of at least one panel must fit the budget */
    return path >= QVIZ_AVX2 && M >= 2 && (double)(N + QVIZ_PANEL) * (double)(cb_stride + 256) < 2147483647.0 &&
           K * QVIZ_PANEL * 4 <= QVIZ_DECODED_BYTES;
#else
    (void)path, (void)M, (void)N, (void)K;
    return 0;
#endif
}

static int qviz_panel_lut(int path, const float *X, size_t M, size_t K, const uint32_t *Bp, size_t N, size_t K32,
                          int bits, const float *codebook, size_t cb_stride, float *out, int threads) {
    const int gather = bits == 8 || cb_stride != 0;
    float table[16];
    for (int c = 0; c < 16; c++) table[c] = gather ? 0.0f : codebook[c & ((1 << bits) - 1)];
    qviz_lut_job j;
    j.fn = qviz_lut_for(path, bits <= 4 ? bits : 4, &j.MR, &j.NP);
    j.X = X, j.table = table, j.Bp = Bp, j.M = M, j.N = N, j.K = K, j.K32 = K32, j.ldb = K32 * QVIZ_PANEL;
    j.P = (N + QVIZ_PANEL - 1) / QVIZ_PANEL;
    j.out = out;
    const int team = (double)M * (double)N * (double)K < (double)QVIZ_PARALLEL_MIN ? 1 : threads;
#if QVIZ_X86 && defined(__GNUC__)
    if (!gather && path >= QVIZ_AVX512 && M == 1 && bits <= 2 &&
        qviz_gemv_tab(X, K, Bp, N, K32, bits, codebook, out, threads) == 0)
        return 0;
    /* decode once when enough rows share it (or a gather must), into a block that stays within half of
     * L2 (fewer panels when K is long); measured on AVX-512: below 48 rows the in-place kernel (decode
     * per 6-row tile, no buffer) was faster */
    const size_t fit = QVIZ_DECODED_BYTES / (K * QVIZ_PANEL * 4);
    const int np = (int)(fit < (size_t)j.NP ? fit : (size_t)j.NP);
    if (path >= QVIZ_AVX2 && np >= 1 && (gather || M >= (path >= QVIZ_AVX512 ? 48u : 8u))) {
        qviz_wf_job g;
        g.avx512 = path >= QVIZ_AVX512, g.bits = bits, g.NP = np, g.gather = gather, g.X = X, g.table = table;
        g.cb = codebook, g.stride = cb_stride, g.Bp = Bp, g.M = M;
        g.N = N, g.K = K, g.K32 = K32, g.ldb = j.ldb, g.P = j.P, g.out = out;
        atomic_init(&g.failed, 0);
        qviz_parallel(qviz_wf_task, &g, (long)((j.P + (size_t)np - 1) / (size_t)np), team);
        if (!atomic_load(&g.failed)) return 0;
        if (gather) return -1; /* no memory for a decoded block, and no in-place kernel for gathers */
    }
#endif
    j.NB = (j.P + (size_t)j.NP - 1) / (size_t)j.NP;
    j.tasks = qviz_task_count(j.NB, team);
    qviz_parallel(qviz_lut_task, &j, (long)j.tasks, team);
    return 0;
}

#endif /* QVIZ_PACKED_PANELS_H */
