# cython: language_level=3
"""Cython wrappers of the bit-packed kernels ([Kütükcü 2020, Ch. 5], generalised; C in _packed_*.h).

Codes of 1, 2, 4 or 8 bits are packed along the reduction axis K into little-endian uint64 words: code j
of a row sits in word j // (64 / bits) at bit offset (j % (64 / bits)) * bits. Rows are padded with zero
bits to a whole word, ceil(K * bits / 64) words per row; weights may also come as panels
(_packed_panels.h). These functions are called only through qviz.packed, which validates every
argument's type, shape and layout and allocates (or checks) every output; here the only allocations
are scratch buffers (activation rows laid out for a kernel, decoded filters), the only exception is
MemoryError when one cannot be had, and the float kernels return a status: their wrappers check the
values of x and the codebook (NaN, Inf) before they compute and the result (float32 overflow) after.
"""

from libc.stdint cimport uint8_t, uint64_t


def pack_codes(const uint8_t[:, ::1] codes, int bits, uint64_t[:, ::1] out):
    """Pack `codes` [N, K] (each < 2**bits) into `out` [N, ceil(K*bits/64)], zero padding included."""
    cdef Py_ssize_t n_rows = codes.shape[0], k = codes.shape[1], n_words = out.shape[1]
    cdef Py_ssize_t r, j, w
    cdef int per_word = 64 // bits
    cdef uint64_t word
    with nogil:
        for r in range(n_rows):
            for w in range(n_words):
                word = 0
                for j in range(per_word):
                    if w * per_word + j < k:
                        word |= (<uint64_t> codes[r, w * per_word + j]) << (j * bits)
                out[r, w] = word


def unpack_codes(const uint64_t[:, ::1] words, int bits, uint8_t[:, ::1] out):
    """Inverse of pack_codes: `out` [N, K] receives the codes."""
    cdef Py_ssize_t n_rows = out.shape[0], k = out.shape[1]
    cdef Py_ssize_t r, j
    cdef int per_word = 64 // bits
    cdef uint64_t mask = (<uint64_t> 1 << bits) - 1 if bits < 64 else <uint64_t> 0xFFFFFFFFFFFFFFFF
    with nogil:
        for r in range(n_rows):
            for j in range(k):
                out[r, j] = <uint8_t> ((words[r, j // per_word] >> ((j % per_word) * bits)) & mask)


from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.stdlib cimport free, malloc

cdef extern from "_packed_kernels.h" nogil:
    int QVIZ_PORTABLE, QVIZ_POPCNT, QVIZ_AVX2, QVIZ_AVX512, QVIZ_N_PATHS
    int qviz_path_supported(int path)
    int qviz_openmp_enabled()
    const char *qviz_openmp_library()
    int qviz_all_finite(const float *p, size_t n)
    void qviz_bitserial_matmul(int path, int bits, const uint64_t *planes, size_t M, const uint64_t *B, size_t N,
                               size_t W, int32_t *out, int threads)
    void qviz_expand_planes(const uint64_t *codes, size_t M, size_t W, int bits, uint64_t *planes)
    int qviz_pack_signs_best(int path, const float *x, size_t M, size_t K, uint64_t *out, size_t W, int threads)
    int qviz_pack_uniform(int path, const float *x, size_t M, size_t K, int bits, float inv_scale,
                          float zero_point, uint64_t *out, size_t W, int64_t *row_sums, int threads)
    void qviz_lut_matmul(int path, const float *x, size_t M, size_t K, const uint64_t *Wc, size_t N, size_t W,
                         int bits, const float *cb, size_t cb_stride, float *out, int threads)
    int qviz_lut_conv2d(int path, const float *x, size_t B, size_t C, size_t H, size_t Wd, const uint32_t *Bp,
                        size_t CO, size_t K32, int bits, const float *cb, size_t cb_stride, size_t kh, size_t kw,
                        size_t pad, float *out, size_t Ho, size_t Wo, int threads)
    int QVIZ_PANEL, QVIZ_P_XOR, QVIZ_P_AND, QVIZ_P_DOT2, QVIZ_P_DOT4
    void qviz_make_panels(const uint64_t *B, size_t N, size_t W64, size_t K32, uint32_t *dst)
    void qviz_panels_to_rows(const uint32_t *src, size_t N, size_t K32, uint64_t *B, size_t W64)
    void qviz_row_popcounts(const uint64_t *A, size_t M, size_t W64, int64_t *out)
    int qviz_panel_slots(int path, int op)
    void qviz_split_rows(const uint64_t *A, size_t M, size_t W64, size_t K32, int S, uint32_t *dst)
    int qviz_panel_matmul_rows(int path, int op, const uint64_t *A64, size_t M, size_t W64, const uint32_t *Bp,
                               size_t N, size_t K32, int64_t mul, int popcount_offset, int64_t offset, int32_t *out,
                               int threads)
    ctypedef struct qviz_act:
        int mode, bits
        const float *x
        size_t K, W64
        float inv_scale, zero_point
    int QVIZ_ACT_SIGNS, QVIZ_ACT_UNIFORM
    int qviz_panel_matmul_act(int path, int op, const qviz_act *act, size_t M, const uint32_t *Bp, size_t N,
                              size_t K32, int64_t mul, int popcount_offset, int64_t offset, int32_t *out,
                              int threads)
    int QVIZ_ROOF_POP, QVIZ_ROOF_DOT, QVIZ_ROOF_FMA, QVIZ_HAVE_POOL
    void qviz_set_threading(int openmp)
    int qviz_threading()
    int64_t qviz_roof(int path, int kind, long iters, double *macs)
    int64_t qviz_read_words(const uint64_t *buf, size_t words, int threads, long passes)
    int qviz_panel_lut(int path, const float *X, size_t M, size_t K, const uint32_t *Bp, size_t N, size_t K32,
                       int bits, const float *codebook, size_t cb_stride, float *out, int threads)
    int qviz_panel_lut_ok(int path, size_t M, size_t N, size_t K, int bits, size_t cb_stride)

PATHS = ("portable", "popcnt", "avx2", "avx2vnni", "avx512", "avx512vnni")
assert len(PATHS) == QVIZ_N_PATHS, "PATHS must name every path of _packed_kernels.h's enum, in its order"
PANEL = QVIZ_PANEL
ROOF_KINDS = {"pop": QVIZ_ROOF_POP, "dot": QVIZ_ROOF_DOT, "fma": QVIZ_ROOF_FMA}
OPS = {"xor": QVIZ_P_XOR, "and": QVIZ_P_AND, "dot2": QVIZ_P_DOT2, "dot4": QVIZ_P_DOT4}


def supported_paths():
    """The code paths this CPU can run, slowest first."""
    return tuple(name for i, name in enumerate(PATHS) if qviz_path_supported(i))


def openmp_enabled():
    return bool(qviz_openmp_enabled())


def openmp_library():
    """The file of the OpenMP runtime the kernels' OpenMP calls reach ("" if none or unknown)."""
    return qviz_openmp_library().decode("utf-8", "replace")


def bitserial_matmul(const uint64_t[:, ::1] a, const uint64_t[:, ::1] w, int bits, int32_t[:, ::1] out,
                     int path, int threads):
    """out = sum_k a_k w_k over unsigned b-bit codes, summed over the bit planes of a."""
    cdef size_t m = a.shape[0], n_words = a.shape[1]
    cdef uint64_t *planes = <uint64_t *> malloc(m * bits * n_words * sizeof(uint64_t))
    if planes == NULL:
        raise MemoryError("no memory for the activation bit planes")
    try:
        with nogil:
            qviz_expand_planes(&a[0, 0], m, n_words, bits, planes)
            qviz_bitserial_matmul(path, bits, planes, m, &w[0, 0], w.shape[0], n_words, &out[0, 0], threads)
    finally:
        free(planes)


def pack_signs(const float[:, ::1] x, uint64_t[:, ::1] out, int path, int threads=1):
    """Sign bits of x (1 where x < 0); returns True if x held NaN."""
    cdef int nan_seen
    with nogil:
        nan_seen = qviz_pack_signs_best(path, &x[0, 0], x.shape[0], x.shape[1], &out[0, 0], out.shape[1], threads)
    return bool(nan_seen)


def pack_uniform(const float[:, ::1] x, int bits, float inv_scale, float zero_point, uint64_t[:, ::1] out,
                 int64_t[::1] row_sums, int path, int threads):
    """Quantize x to b-bit codes and pack them; row_sums receives each row's sum of codes. True if NaN."""
    cdef int nan_seen
    with nogil:
        nan_seen = qviz_pack_uniform(path, &x[0, 0], x.shape[0], x.shape[1], bits, inv_scale, zero_point,
                                     &out[0, 0], out.shape[1], &row_sums[0], threads)
    return bool(nan_seen)


cdef int _float_status(const float *x, size_t nx, const float *cb, size_t ncb) noexcept nogil:
    """0, or 1 if x holds NaN / Inf, 2 if the codebook does (checked before a float kernel runs)."""
    if not qviz_all_finite(x, nx):
        return 1
    if not qviz_all_finite(cb, ncb):
        return 2
    return 0


def lut_matmul(const float[:, ::1] x, const uint64_t[:, ::1] w, int bits, const float[:, ::1] codebook,
               float[:, ::1] out, int path, int threads):
    """out = x @ codebook[w].T; codebook has one row (per layer) or one per weight row.

    Returns 0, or 1 / 2 if x / the codebook held NaN or Inf (nothing computed), 3 if the result did."""
    cdef size_t stride = 0 if codebook.shape[0] == 1 else codebook.shape[1]
    cdef int status
    with nogil:
        status = _float_status(&x[0, 0], x.shape[0] * x.shape[1], &codebook[0, 0],
                               codebook.shape[0] * codebook.shape[1])
        if status == 0:
            qviz_lut_matmul(path, &x[0, 0], x.shape[0], x.shape[1], &w[0, 0], w.shape[0], w.shape[1], bits,
                            &codebook[0, 0], stride, &out[0, 0], threads)
            if not qviz_all_finite(&out[0, 0], out.shape[0] * out.shape[1]):
                status = 3
    return status


cdef int _lut_conv2d(const float[:, :, :, ::1] x, const uint32_t[:, :, ::1] w, Py_ssize_t co, int bits,
                     const float *cb, size_t cb_n, size_t stride, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t pad,
                     float[:, :, :, ::1] out, int path, int threads) except -2:
    """cb: cb_n floats, one codebook (stride 0) or one per output channel (stride 2**bits)."""
    cdef int status
    with nogil:
        status = _float_status(&x[0, 0, 0, 0], x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3], cb, cb_n)
        if status == 0:
            if qviz_lut_conv2d(path, &x[0, 0, 0, 0], x.shape[0], x.shape[1], x.shape[2], x.shape[3], &w[0, 0, 0],
                               co, w.shape[1], bits, cb, stride, kh, kw, pad, &out[0, 0, 0, 0],
                               out.shape[2], out.shape[3], threads):
                status = -1
            elif not qviz_all_finite(&out[0, 0, 0, 0], out.shape[0] * out.shape[1] * out.shape[2] * out.shape[3]):
                status = 3
    if status < 0:
        raise MemoryError("no memory for the decoded filters")
    return status


def lut_conv2d(const float[:, :, :, ::1] x, const uint32_t[:, :, ::1] w, Py_ssize_t co, int bits,
               const float[:, ::1] codebook, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t pad, float[:, :, :, ::1] out,
               int path, int threads):
    """Direct convolution with packed-index filters (003 Figs. 5.1, 5.2), stride 1, zero padding pad; w in panels.

    Returns 0, or 1 / 2 if x / the codebook held NaN or Inf (nothing computed), 3 if the result did."""
    return _lut_conv2d(x, w, co, bits, &codebook[0, 0], codebook.shape[0] * codebook.shape[1],
                       0 if codebook.shape[0] == 1 else codebook.shape[1], kh, kw, pad, out, path, threads)


cdef object _fast_types = None  # (numpy.ndarray, PreparedMatrix, float32 dtype, numpy.empty), set by qviz.packed


def set_fast_types(ndarray, prepared, float32, empty):
    """The types the fast call paths recognise (qviz.packed hands them over at import)."""
    global _fast_types
    _fast_types = (ndarray, prepared, float32, empty)


def conv2d_fast(object x, object w, object codebook, object kernel, object padding, int threads, int path):
    """lut_conv2d for the common case, checked here at C speed; None when anything is unusual.

    Accepted only: w a PreparedMatrix with int bits in (1, 2, 4, 8), a tuple shape of two ints in
    [1, 2^40] and uint32 panels of exactly the shape that shape needs with zero padding bits; x a
    C-contiguous 4-D float32 numpy array with no empty dimension; codebook a C-contiguous float32 numpy
    array of shape (2**bits,) or (N, 2**bits); kernel a tuple of two ints in [1, 64]; padding an int in
    [0, max(kernel) - 1]; a geometry with at least one output pixel. These are the conditions of
    qviz.packed's full checks; everything else returns None and goes through them (and their messages).
    Returns (status, result) as lut_conv2d's wrapper does.
    """
    if _fast_types is None:
        return None
    ndarray, prepared, float32, empty = _fast_types
    if type(w) is not prepared or type(x) is not ndarray or type(codebook) is not ndarray:
        return None
    bits, shape = w.bits, w.shape
    if type(bits) is not int or type(shape) is not tuple or len(shape) != 2 or type(kernel) is not tuple \
            or len(kernel) != 2 or type(padding) is not int:
        return None
    n, k = shape
    kh, kw = kernel
    if type(n) is not int or type(k) is not int or type(kh) is not int or type(kw) is not int:
        return None
    if bits not in (1, 2, 4, 8) or not (0 < n <= 2**40 and 0 < k <= 2**40 and 1 <= kh <= 64 and 1 <= kw <= 64) \
            or not (0 <= padding < max(kh, kw)):
        return None
    cdef int b = bits
    cdef Py_ssize_t e = 1 << b, k32 = (k * b + 31) // 32
    if x.dtype != float32 or codebook.dtype != float32 or type(w.panels) is not ndarray:
        return None
    cdef const float[:, :, :, ::1] xv
    cdef const uint32_t[:, :, ::1] pv
    cdef const float[::1] c1
    cdef const float[:, ::1] c2
    cdef const float *cb
    cdef size_t cb_n, stride
    try:  # dtype (native byte order), dimensions and C-contiguity, or a refusal
        xv = x
        pv = w.panels
        if codebook.ndim == 1:
            c1 = codebook
            cb, cb_n, stride = &c1[0], c1.shape[0], 0
            if c1.shape[0] != e:
                return None
        else:
            c2 = codebook
            cb, cb_n, stride = &c2[0, 0], c2.shape[0] * c2.shape[1], e
            if c2.shape[0] != n or c2.shape[1] != e:
                return None
    except (ValueError, TypeError, BufferError):
        return None
    if pv.shape[0] != (n + QVIZ_PANEL - 1) // QVIZ_PANEL or pv.shape[1] != k32 or pv.shape[2] != QVIZ_PANEL:
        return None
    if xv.shape[0] == 0 or xv.shape[1] == 0 or xv.shape[2] == 0 or xv.shape[3] == 0:
        return None
    cdef Py_ssize_t ho = xv.shape[2] + 2 * padding - kh + 1, wo = xv.shape[3] + 2 * padding - kw + 1
    if k != xv.shape[1] * kh * kw or ho < 1 or wo < 1:
        return None
    if (k * b) % 32 and _panels_padding_clear(pv, k * b - 32 * (k32 - 1)) >= 0:
        return None
    out = empty((xv.shape[0], n, ho, wo), float32)
    cdef float[:, :, :, ::1] ov = out
    return _lut_conv2d(xv, pv, n, b, cb, cb_n, stride, kh, kw, padding, ov, path, threads), out


# ------------------------------------------------------------------------------------------------
# Panels (qviz/_packed_panels.h): weights as 16-row panels of 32-bit words


def make_panels(const uint64_t[:, ::1] words, Py_ssize_t k32, uint32_t[:, :, ::1] out):
    """out [ceil(N/16), k32, 16] = the 32-bit words of `words` [N, W] transposed in panels of 16 rows."""
    with nogil:
        qviz_make_panels(&words[0, 0], words.shape[0], words.shape[1], k32, &out[0, 0, 0])


def panels_to_rows(const uint32_t[:, :, ::1] panels, uint64_t[:, ::1] out):
    """The row layout `out` [N, W] back from panels."""
    with nogil:
        qviz_panels_to_rows(&panels[0, 0, 0], out.shape[0], panels.shape[1], &out[0, 0], out.shape[1])


def row_popcounts(const uint64_t[:, ::1] a, int64_t[::1] out):
    with nogil:
        qviz_row_popcounts(&a[0, 0], a.shape[0], a.shape[1], &out[0])


def panel_matmul(const uint64_t[:, ::1] a, Py_ssize_t k32, const uint32_t[:, :, ::1] panels, Py_ssize_t n, int op,
                 long long mul, bint popcount_offset, long long offset, int32_t[:, ::1] out, int path, int threads):
    """out = mul * S + offset (+ popcount of each row of a) with S the `op` reduction of a's rows and the panels."""
    cdef int failed
    with nogil:
        failed = qviz_panel_matmul_rows(path, op, &a[0, 0], a.shape[0], a.shape[1], &panels[0, 0, 0], n, k32, mul,
                                        popcount_offset, offset, &out[0, 0], threads)
    if failed:
        raise MemoryError("no memory for the activation rows")


def fused_matmul(const float[:, ::1] x, bint signs, int bits, float inv_scale, float zero_point,
                 const uint32_t[:, :, ::1] panels, Py_ssize_t n, int op, long long mul, bint popcount_offset,
                 long long offset, int32_t[:, ::1] out, int path, int threads):
    """panel_matmul with the activations given as floats, packed inside the call: their signs (signs=True)
    or their b-bit affine codes (inv_scale, zero_point as in pack_uniform). Returns True if x held NaN."""
    cdef qviz_act act
    cdef int status
    act.mode = QVIZ_ACT_SIGNS if signs else QVIZ_ACT_UNIFORM
    act.bits = bits
    act.x = &x[0, 0]
    act.K = x.shape[1]
    act.W64 = (x.shape[1] * bits + 63) // 64
    act.inv_scale = inv_scale
    act.zero_point = zero_point
    with nogil:
        status = qviz_panel_matmul_act(path, op, &act, x.shape[0], &panels[0, 0, 0], n, panels.shape[1], mul,
                                       popcount_offset, offset, &out[0, 0], threads)
    if status < 0:
        raise MemoryError("no memory for the activation rows")
    return status == 1


def panel_lut_ok(int path, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int bits, Py_ssize_t stride):
    """Whether panel_lut takes this call (else the row kernels of lut_matmul)."""
    return bool(qviz_panel_lut_ok(path, m, n, k, bits, stride))


def panel_lut(const float[:, ::1] x, const uint32_t[:, :, ::1] panels, Py_ssize_t n, int bits,
              const float[::1] codebook, Py_ssize_t stride, float[:, ::1] out, int path, int threads):
    """out = x @ codebook[w].T with w in panels: one codebook of 2**bits entries (stride 0) or one per
    weight row (codebook flat, stride 2**bits); as panel_lut_ok allows.

    Returns 0, or 1 / 2 if x / the codebook held NaN or Inf (nothing computed), 3 if the result did."""
    cdef int status, failed = 0
    with nogil:
        status = _float_status(&x[0, 0], x.shape[0] * x.shape[1], &codebook[0], codebook.shape[0])
        if status == 0:
            failed = qviz_panel_lut(path, &x[0, 0], x.shape[0], x.shape[1], &panels[0, 0, 0], n, panels.shape[1],
                                    bits, &codebook[0], stride, &out[0, 0], threads)
            if failed == 0 and not qviz_all_finite(&out[0, 0], out.shape[0] * out.shape[1]):
                status = 3
    if failed:
        raise MemoryError("no memory for a decoded block of weights")
    return status


def pool_enabled():
    """Whether the panel kernels run on the thread pool (POSIX threads), otherwise on the caller alone."""
    return bool(QVIZ_HAVE_POOL)


def set_threading(bint openmp):
    """Run parallel regions on the OpenMP team (True) or on the thread pool (False)."""
    qviz_set_threading(openmp)


def threading_openmp():
    """Whether parallel regions run on the OpenMP team (in this process: a forked child uses the pool)."""
    return bool(qviz_threading())


def roof(int path, int kind, long iters):
    """Run `iters` iterations of the register-resident roof loop; returns (checksum, operations done)."""
    cdef double macs = 0
    cdef int64_t check
    with nogil:
        check = qviz_roof(path, kind, iters, &macs)
    return check, macs


def read_words(const uint64_t[::1] buf, int threads, long passes=1):
    """Sum of the words of buf, `passes` times over, read on up to `threads` threads (a bandwidth probe)."""
    cdef int64_t s
    with nogil:
        s = qviz_read_words(&buf[0], buf.shape[0], threads, passes)
    return s


def padding_clear(const uint64_t[:, ::1] words, Py_ssize_t used):
    """-1 if every bit at or after `used` in the last word of each row is zero, else the first bad row."""
    cdef Py_ssize_t r, last = words.shape[1] - 1
    cdef uint64_t mask
    if used >= 64:
        return -1
    mask = ~((<uint64_t> 1 << used) - 1)
    with nogil:
        for r in range(words.shape[0]):
            if words[r, last] & mask:
                break
        else:
            r = -1
    return r


cdef Py_ssize_t _panels_padding_clear(const uint32_t[:, :, ::1] panels, Py_ssize_t used) noexcept:
    cdef Py_ssize_t p, j, last = panels.shape[1] - 1, bad = -1
    cdef uint32_t mask
    if used >= 32:
        return -1
    mask = ~((<uint32_t> 1 << used) - 1)
    with nogil:
        for p in range(panels.shape[0]):
            for j in range(panels.shape[2]):
                if panels[p, last, j] & mask:
                    bad = p
                    break
            if bad >= 0:
                break
    return bad


def panels_padding_clear(const uint32_t[:, :, ::1] panels, Py_ssize_t used):
    """-1 if the bits at or after `used` of every last panel word are zero, else the first bad panel."""
    return _panels_padding_clear(panels, used)


def code_sums(const uint64_t[:, ::1] words, int bits, Py_ssize_t k, int64_t[::1] out):
    """out[r] = sum of the k codes of row r."""
    cdef Py_ssize_t r, j
    cdef int per_word = 64 // bits
    cdef uint64_t mask = (<uint64_t> 1 << bits) - 1 if bits < 64 else <uint64_t> 0xFFFFFFFFFFFFFFFF
    cdef int64_t s
    with nogil:
        for r in range(words.shape[0]):
            s = 0
            for j in range(k):
                s += <int64_t> ((words[r, j // per_word] >> ((j % per_word) * bits)) & mask)
            out[r] = s
