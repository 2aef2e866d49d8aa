# cython: language_level=3
"""Bit-packed low-bit kernels (papers/003_f90b6f8834304304.txt Chapter 5, generalised).

Codes of 1, 2, 4 or 8 bits are packed along the reduction axis K into little-endian uint64 words: code j
of a row sits in word j // (64 / bits) at bit offset (j % (64 / bits)) * bits. Rows are padded with zero
bits to a whole word, ceil(K * bits / 64) words per row. Kernels are called only through qviz.packed,
which validates every argument and allocates every output; they never allocate and never raise.
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
