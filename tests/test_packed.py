"""The Cython kernels, through their Python face."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qviz._packed as compiled
from qviz import packed


def test_the_kernels_are_the_compiled_extension():
    assert compiled.__file__.endswith((".so", ".pyd"))


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 5), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip_and_exact_word_count(bits, n, k, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(n, k), dtype=np.uint8)
    p = packed.pack(codes, bits)
    assert p.words.shape == (n, -(-k * bits // 64))
    assert p.nbytes == n * -(-k * bits // 64) * 8
    assert np.array_equal(packed.unpack(p), codes)
    # padding bits are zero
    used = k * bits - (p.words.shape[1] - 1) * 64
    if used < 64:
        assert (p.words[:, -1] >> np.uint64(used) == 0).all()


@settings(max_examples=300, deadline=None)
@given(a=hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
       bits=st.one_of(st.integers(-2, 10), st.none()))
def test_garbage_to_pack_raises_only_type_or_value_errors(a, bits):
    try:
        p = packed.pack(a, bits)
    except (TypeError, ValueError):
        return
    assert np.array_equal(packed.unpack(p), a)


def test_pack_messages():
    with pytest.raises(ValueError, match="bits=3"):
        packed.pack(np.zeros((2, 2), np.uint8), 3)
    with pytest.raises(ValueError, match="< 2\\*\\*bits = 4"):
        packed.pack(np.full((2, 2), 4, np.uint8), 2)
    with pytest.raises(TypeError, match="uint8"):
        packed.pack(np.zeros((2, 2), np.int32), 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        packed.pack(np.zeros((4, 4), np.uint8)[:, ::2], 2)
    with pytest.raises(ValueError, match="empty"):
        packed.pack(np.zeros((0, 4), np.uint8), 2)
