# cython: language_level=3
"""Cython wrappers of the fused fake-quantize kernels (C in _fused.h).

Called only through qviz.engine.fused, which checks every tensor (float32, contiguous, on the CPU,
not empty) and allocates every output. The kernels release the GIL: explorers quantize on worker threads.
"""

from libc.stdint cimport int64_t, uint8_t

cdef extern from "_fused.h" nogil:
    int QVIZ_FUSED_PORTABLE, QVIZ_FUSED_AVX2, QVIZ_FUSED_AVX512
    int qviz_fused_path_supported(int path)
    void qviz_clip_round(int path, const float *x, float *q, uint8_t *state, size_t n, float alpha, float step,
                         int ste)
    double qviz_clip_backward(int path, const float *grad, const uint8_t *state, float *grad_x, size_t n)
    void qviz_uniform(int path, const float *x, float *q, uint8_t *mask, size_t n, float inv_scale,
                      float zero_point, float qmin, float qmax, float scale)
    double qviz_abs_stats(int path, const float *x, size_t n, float *max_abs)
    double qviz_kept(int path, const float *x, size_t n, float delta, int64_t *count)
    void qviz_ternary(int path, const float *x, float *q, size_t n, float delta, float alpha)

PATHS = ("portable", "avx2", "avx512")


def supported_paths():
    """The code paths this CPU can run, slowest first."""
    return tuple(name for i, name in enumerate(PATHS) if qviz_fused_path_supported(i))


_SUPPORTED = frozenset(i for i in range(len(PATHS)) if qviz_fused_path_supported(i))


cdef inline void _check_path(int path) except *:
    # a path this CPU lacks would execute instructions it does not have
    if path not in _SUPPORTED:
        raise ValueError(f"path={path} is not supported on this CPU; allowed: {sorted(_SUPPORTED)}")


# Arrays arrive as addresses of float32 / uint8 buffers of n elements: qviz.engine.fused checks every
# tensor (dtype, device, contiguity, length) and allocates every output before it calls these. Taking the
# address costs a fraction of what a typed memoryview of a tensor costs, and QAT calls these on every
# activation of every step.


def clip_round(int path, size_t x, size_t q, size_t state, size_t n, float alpha, float step, int ste):
    """q = floor(clamp(x, 0, alpha) / step + 0.5) * step; `state` (0: none) receives the STE bits."""
    _check_path(path)
    with nogil:
        qviz_clip_round(path, <const float *> x, <float *> q, <uint8_t *> state, n, alpha, step, ste)


def clip_backward(int path, size_t grad, size_t state, size_t grad_x, size_t n):
    """grad_x = grad where the STE passes; returns the sum of grad where x >= alpha."""
    cdef double total = 0.0
    _check_path(path)
    with nogil:
        total = qviz_clip_backward(path, <const float *> grad, <const uint8_t *> state, <float *> grad_x, n)
    return total


def uniform(int path, size_t x, size_t q, size_t mask, size_t n, float inv_scale, float zero_point, float qmin,
            float qmax, float scale):
    """q = (clamp(round(x * inv_scale) + zero_point, qmin, qmax) - zero_point) * scale; `mask` (0: none)
    receives qmin <= code <= qmax."""
    _check_path(path)
    with nogil:
        qviz_uniform(path, <const float *> x, <float *> q, <uint8_t *> mask, n, inv_scale, zero_point, qmin, qmax,
                     scale)


def abs_stats(int path, size_t x, size_t n):
    """(sum |x| in double, max |x|)."""
    cdef float top = 0.0
    cdef double total = 0.0
    _check_path(path)
    with nogil:
        total = qviz_abs_stats(path, <const float *> x, n, &top)
    return total, top


def kept(int path, size_t x, size_t n, float delta):
    """(sum of |x| over |x| > delta in double, how many)."""
    cdef int64_t count = 0
    cdef double total = 0.0
    _check_path(path)
    with nogil:
        total = qviz_kept(path, <const float *> x, n, delta, &count)
    return total, count


def ternary(int path, size_t x, size_t q, size_t n, float delta, float alpha):
    """q = alpha where x > delta, -alpha where x < -delta, else 0."""
    _check_path(path)
    with nogil:
        qviz_ternary(path, <const float *> x, <float *> q, n, delta, alpha)
