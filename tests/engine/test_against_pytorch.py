"""`affine` and `symmetric` agree with PyTorch's own fake-quant ops, forward values and gradient masks."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qviz.engine import QuantSpec, fake_quantize, minmax, quant_params


@st.composite
def tensors(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 0.5, -2.0, 10.0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * magnitude + offset * magnitude
    return x


@st.composite
def uniform_specs(draw, x):
    scheme = draw(st.sampled_from(["affine", "symmetric"]))
    signed = draw(st.booleans())
    bits = draw(st.integers(2, 8))
    narrow = draw(st.booleans())
    granularity = draw(st.sampled_from(["tensor", "channel"]))
    axis = draw(st.integers(-x.dim(), x.dim() - 1))
    return QuantSpec(scheme=scheme, bits=bits, signed=signed, narrow=narrow, granularity=granularity, axis=axis)


def _torch_reference(x, spec):
    lo, hi = minmax(x, spec.granularity, spec.axis)
    p = quant_params(lo, hi, spec.bits, symmetric=spec.scheme == "symmetric", signed=spec.signed,
                     narrow=spec.narrow)
    if spec.granularity == "tensor":
        return torch.fake_quantize_per_tensor_affine(x, float(p.scale), int(p.zero_point), p.qmin, p.qmax)
    axis = spec.axis % x.dim()
    return torch.fake_quantize_per_channel_affine(
        x, p.scale.reshape(-1), p.zero_point.reshape(-1).to(torch.int32), axis, p.qmin, p.qmax)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_forward_and_gradient_mask_match_pytorch(data):
    x = data.draw(tensors())
    spec = data.draw(uniform_specs(x))
    ours_in = x.clone().requires_grad_(True)
    theirs_in = x.clone().requires_grad_(True)
    ours = fake_quantize(ours_in, spec)
    theirs = _torch_reference(theirs_in, spec)
    assert torch.equal(ours.detach(), theirs.detach())
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ours.backward(upstream)
    theirs.backward(upstream)
    assert torch.equal(ours_in.grad, theirs_in.grad)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fixed_range_matches_pytorch_including_saturation(data):
    """With a fixed clip range narrower than the data, values saturate and the mask drops them, as in PyTorch."""
    x = data.draw(tensors()) * 3
    bits = data.draw(st.integers(2, 8))
    lo = data.draw(st.floats(-2.0, -0.1))
    hi = data.draw(st.floats(0.1, 2.0))
    spec = QuantSpec(scheme="affine", bits=bits, clip=(lo, hi))
    p = quant_params(lo, hi, bits)
    theirs_in = x.clone().requires_grad_(True)
    theirs = torch.fake_quantize_per_tensor_affine(theirs_in, float(p.scale), int(p.zero_point), p.qmin, p.qmax)
    ours_in = x.clone().requires_grad_(True)
    ours = fake_quantize(ours_in, spec)
    assert torch.equal(ours.detach(), theirs.detach())
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.equal(ours_in.grad, theirs_in.grad)
