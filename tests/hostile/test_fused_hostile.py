"""Hostile inputs for the fused fake-quantize kernels' Python face (qviz.engine.fused).

Every call runs in the guard's child process (a crash there is counted, not fatal). Tensors the kernels
cannot read (another dtype, a view with strides, another device, sparse) must get a clear error naming
the argument; scalars of any value (inf and NaN included) must compute without crashing; finite inputs
must give what the PyTorch formulation gives.
"""

from __future__ import annotations

import hostile
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qviz.engine import fused

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
TARGET = "qviz.engine.fused:"


def _tensors() -> dict[str, object]:
    base = torch.linspace(-3, 3, 61)
    return {
        "float32": base,
        "float32 2-d": base[:60].reshape(6, 10),
        "0-d": torch.tensor(0.75),
        "one": torch.tensor([2.5]),
        "requires_grad": base.clone().requires_grad_(True),
        "float64": base.double(),
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "int64": torch.arange(10),
        "bool": torch.ones(5, dtype=torch.bool),
        "strided view": base[::2],
        "transposed": base[:60].reshape(6, 10).t(),
        "expanded": torch.tensor([1.0]).expand(8),
        "sparse": base.to_sparse(),
        "meta": torch.empty(5, device="meta"),
        "numpy": base.numpy(),
        "list": [0.5, 1.5],
        "none": None,
        "nan and inf": torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5]),
        "huge": torch.tensor([3.0e38, -3.0e38, 1e-45, -0.0]),
    }


READABLE = {"float32", "float32 2-d", "0-d", "one", "requires_grad", "nan and inf", "huge"}
SCALARS = [0.5, 1, 0.0, -1.0, float("inf"), float("nan"), 1e-45, 3e38, np.float32(0.25), np.int64(2)]
BAD_SCALARS = ["0.5", None, True, [1.0], torch.tensor(1.0)]


def _clip_round_ref(x, alpha, step):
    c = torch.minimum(x.float().clamp(min=0), torch.tensor(alpha, dtype=torch.float32))
    return torch.floor(c / torch.tensor(step, dtype=torch.float32) + 0.5) * torch.tensor(step, dtype=torch.float32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(torch.nan_to_num(a, posinf=1e39, neginf=-1e39),
                                              torch.nan_to_num(b, posinf=1e39, neginf=-1e39)) and torch.equal(
        a.isnan(), b.isnan())


@pytest.mark.parametrize("name", list(_tensors()))
@pytest.mark.parametrize("fn", ["clip_round", "uniform", "abs_stats", "kept", "ternary"])
def test_every_kind_of_tensor(guard, fn, name):
    x = _tensors()[name]
    args = {"clip_round": (1.5, 0.5, "clipped"), "uniform": (2.0, 0.0, -4.0, 3.0, 0.5, True),
            "abs_stats": (), "kept": (0.5,), "ternary": (0.5, 0.7)}[fn]
    out = guard.call(TARGET + fn, x, *args)
    if name not in READABLE:
        hostile.expect_clear_error(out, "x ")
        return
    xd = x.detach().float()
    if fn == "clip_round":
        hostile.expect_answer(out, lambda v: _same(v[0], _clip_round_ref(xd, 1.5, 0.5)) and v[1].shape == x.shape, fn)
    elif fn == "uniform":
        code = torch.round(xd * 2.0)
        want = code.clamp(-4, 3) * 0.5
        hostile.expect_answer(out, lambda v: _same(v[0], want) and torch.equal(
            v[1].bool(), (code >= -4) & (code <= 3)), fn)
    elif fn == "abs_stats":
        total = float(xd.double().abs().sum())
        hostile.expect_answer(out, lambda v: (np.isnan(total) and np.isnan(v[0])) or v[0] == pytest.approx(total), fn)
    elif fn == "kept":
        a = xd.double().abs()
        hostile.expect_answer(out, lambda v: v[1] == int((xd.abs() > 0.5).sum()) and v[0] == pytest.approx(
            float(a[xd.abs() > 0.5].sum())), fn)
    else:
        want = torch.where(xd > 0.5, 0.7, torch.where(xd < -0.5, -0.7, 0.0)).float()
        hostile.expect_answer(out, lambda v: _same(v, want), fn)


@settings(max_examples=150, **SETTINGS)
@given(alpha=st.sampled_from(SCALARS), step=st.sampled_from(SCALARS),
       ste=st.sampled_from([None, "identity", "clipped", "saturated"]))
def test_clip_round_scalars_of_any_value(guard, alpha, step, ste):
    x = torch.linspace(-2, 2, 37)
    out = guard.call(TARGET + "clip_round", x, alpha, step, ste)
    if np.isfinite(float(alpha)) and np.isfinite(float(step)) and float(step) > 0 and float(alpha) >= 0:
        hostile.expect_answer(out, lambda v: _same(v[0], _clip_round_ref(x, float(alpha), float(step))),
                              "clip_round")
    else:  # a meaningless clip or step: any numbers, but numbers of the right shape and no crash
        hostile.expect_answer(out, lambda v: v[0].shape == x.shape, "clip_round")


@settings(max_examples=120, **SETTINGS)
@given(scale=st.sampled_from(SCALARS), zero=st.sampled_from(SCALARS), lo=st.sampled_from(SCALARS),
       hi=st.sampled_from(SCALARS))
def test_uniform_scalars_of_any_value(guard, scale, zero, lo, hi):
    x = torch.linspace(-2, 2, 37)
    out = guard.call(TARGET + "uniform", x, 1.0 / float(scale) if float(scale) else float("inf"), zero, lo, hi,
                     scale, True)
    hostile.expect_answer(out, lambda v: v[0].shape == x.shape and v[1].shape == x.shape, "uniform")


@pytest.mark.parametrize("bad", BAD_SCALARS, ids=repr)
@pytest.mark.parametrize("which", ["alpha", "step"])
def test_scalars_that_are_not_numbers(guard, bad, which):
    args = {"alpha": 1.0, "step": 0.5}
    args[which] = bad
    hostile.expect_clear_error(guard.call(TARGET + "clip_round", torch.ones(4), args["alpha"], args["step"]), which)


UNREADABLE_STATES = [torch.zeros(3, dtype=torch.uint8), torch.zeros(4), torch.zeros(8, dtype=torch.uint8)[::2], None,
                     np.zeros(4, np.uint8)]


@pytest.mark.parametrize("state", UNREADABLE_STATES)
def test_masked_backward_refuses_a_state_it_cannot_read(guard, state):
    hostile.expect_clear_error(guard.call(TARGET + "masked_backward", torch.ones(4), state), "state")


def test_masked_backward_takes_any_gradient_layout(guard):
    _, state = fused.clip_round(torch.linspace(-1, 2, 12), 1.0, 0.25, "clipped")
    for grad in (torch.ones(12).double(), torch.ones(24)[::2], torch.ones(1).expand(12), torch.ones(3, 4)):
        out = guard.call(TARGET + "masked_backward", grad, state)
        want = (state & fused.PASS).float().reshape(grad.shape)
        hostile.expect_answer(out, lambda v, want=want: torch.equal(v[0], want), "masked_backward")
