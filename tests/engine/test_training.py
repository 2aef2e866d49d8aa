"""Training: float, PTQ, QAT with every scheme, CLR, L_Lip, BN folding, cancellation, the cache, experiments."""

import math
import threading
import time

import numpy as np
import pytest
import torch

from qviz.engine import (
    FCDNN,
    SCHEMES,
    QuantSpec,
    Schedule,
    TrainingCancelled,
    clr_factor,
    cyclic_lr_factors,
    decision_map,
    decision_map_stages,
    float_model,
    heldout_accuracy,
    lipschitz_penalty,
    post_training_quantize,
    retrain_quantized,
    roughness,
    run_experiment,
    semicircle_evaluation,
    semicircles,
    train,
)
from qviz.engine.quantize import float_weight

TINY = Schedule(steps=12, lr=3e-3, batch_size=128)


@pytest.fixture(scope="module")
def data():
    X, y = semicircles(seed=0)
    return X[::10], y[::10]


@pytest.fixture(scope="module")
def small_float(data):
    torch.manual_seed(0)
    model = FCDNN(16, 3)
    train(model, *data, Schedule(steps=60, lr=1e-2, batch_size=256))
    return model


def test_cyclic_lr_factor_sequence_of_002_appendix_b():
    s = math.sqrt(0.1)
    assert cyclic_lr_factors() == pytest.approx([1.0, s, 0.1, 0.1 * s, 0.01, 0.1 * s, 0.1, s])
    period = 80  # the factor changes every 10 steps, 8 times per cycle
    seen = [clr_factor(step, period) for step in range(0, 160, 10)]
    assert seen == pytest.approx(cyclic_lr_factors() * 2)
    assert clr_factor(9, period) == 1.0 and clr_factor(10, period) == pytest.approx(s)


def test_lipschitz_penalty_equals_eq_8_on_a_small_model():
    torch.manual_seed(0)
    model = FCDNN(3, 3)
    expected = 0.0
    for w in model.linear_weights():
        wt = w.detach().numpy().astype(np.float64).T  # 002's W_l is [in, out]
        expected += 0.5 * ((wt.T @ wt - np.eye(wt.shape[1])) ** 2).sum()
    assert float(lipschitz_penalty(model).detach()) == pytest.approx(expected, rel=1e-5)


def test_float_training_learns(data):
    torch.manual_seed(0)
    model = FCDNN(64, 4)
    before = heldout_accuracy(model, data[0])
    result = train(model, *data, Schedule(steps=400, lr=1e-2, batch_size=256))
    assert result["steps"] == 400 and math.isfinite(result["loss"])
    assert heldout_accuracy(model, data[0]) > before + 0.1


WEIGHT_SCHEMES = [n for n, s in SCHEMES.items() if s.kind == "weights"]
ACTIVATION_SCHEMES = [n for n, s in SCHEMES.items() if s.kind == "activations"]


def _spec(name):
    bits = 2 if name in ("ternary", "symmetric", "affine", "stochastic", "dorefa", "ceil", "relu", "pact",
                         "dorefa_act", "ceil_act") else 1
    return QuantSpec(name, bits=bits)


@pytest.mark.parametrize("name", WEIGHT_SCHEMES)
def test_ptq_and_qat_run_for_every_weight_scheme(name, small_float, data):
    ptq = post_training_quantize(small_float, _spec(name), None)
    qat = retrain_quantized(small_float, _spec(name), None, X=data[0], y=data[1], schedule=TINY)
    for model in (ptq, qat):
        dm = decision_map(model, resolution=16)
        assert dm["probs"].shape == (16, 16) and np.isfinite(dm["probs"]).all()
    # QAT moved the float shadow weights; PTQ kept them
    assert torch.equal(float_weight(ptq.layers[1]), small_float.layers[1].weight)
    assert not torch.equal(float_weight(qat.layers[1]), small_float.layers[1].weight)


@pytest.mark.parametrize("name", ACTIVATION_SCHEMES)
def test_ptq_and_qat_run_for_every_activation_scheme(name, small_float, data):
    ptq = post_training_quantize(small_float, None, _spec(name))
    qat = retrain_quantized(small_float, None, _spec(name), X=data[0], y=data[1], schedule=TINY)
    for model in (ptq, qat):
        h = model.hidden_states(data[0][:256])[0]
        assert torch.unique(h).numel() <= 4
        assert np.isfinite(decision_map(model, resolution=16)["probs"]).all()


def test_qat_improves_on_ptq_at_two_bits():
    X, y = semicircles(seed=0)
    torch.manual_seed(0)
    base = FCDNN(64, 4)
    train(base, X, y, Schedule(steps=500, lr=5e-3, batch_size=512))
    held_out = semicircles(seed=7)[0][::5]
    w, a = QuantSpec("ternary", bits=2), QuantSpec("pact", bits=2)
    ptq = heldout_accuracy(post_training_quantize(base, w, a), held_out)
    qat = heldout_accuracy(retrain_quantized(base, w, a, X=X, y=y, schedule=Schedule(steps=200, batch_size=512)),
                           held_out)
    assert qat > ptq + 0.03


@pytest.mark.parametrize("options", [
    {"clr": True},
    {"lip_weight": 1e-3},
    {"grad_bits": 4},
    {"stochastic": True},
    {"quantize_shortcut": True},
    {"overrides": {0: {"w_spec": None}, -1: {"w_spec": None}}},
])
def test_training_options_run(options, data):
    torch.manual_seed(0)
    base = FCDNN(16, 4, residual=True)
    w = QuantSpec("affine", bits=2)
    model = retrain_quantized(base, w, QuantSpec("pact", bits=2), X=data[0], y=data[1], schedule=TINY, **options)
    assert np.isfinite(decision_map(model, resolution=16)["probs"]).all()


@pytest.mark.parametrize("bn_fold", ["none", "naive", "corrected"])
def test_batchnorm_folding_modes_train_and_freeze(bn_fold, data):
    torch.manual_seed(0)
    base = FCDNN(16, 3, batchnorm=True, bn_fold=bn_fold)
    train(base, *data, TINY)
    model = retrain_quantized(base, QuantSpec("symmetric", bits=4), None, X=data[0], y=data[1], schedule=TINY,
                              freeze_bn_step=6)
    if bn_fold != "none":
        assert all(bool(layer.frozen) for layer in model.layers[:-1])
    assert np.isfinite(decision_map(model, resolution=16)["probs"]).all()


def test_stochastic_training_needs_a_scheme_with_a_stochastic_twin(small_float, data):
    with pytest.raises(ValueError, match=r"stochastic=True needs a weight scheme with a stochastic twin"):
        retrain_quantized(small_float, QuantSpec("ternary", bits=2), None, X=data[0], y=data[1], schedule=TINY,
                          stochastic=True)


def test_callback_reports_progress_and_maps_on_request(data):
    seen = []
    model = FCDNN(16, 3)
    train(model, *data, Schedule(steps=20, lr=1e-2, batch_size=64), callback=seen.append, callback_every=5,
          evaluate=semicircle_evaluation(map_every=10, resolution=12))
    assert [p["step"] for p in seen] == [5, 10, 15, 20]
    assert all(set(p) >= {"step", "steps", "loss", "accuracy"} for p in seen)
    assert ["map" in p for p in seen] == [False, True, False, True]
    assert seen[1]["map"]["probs"].shape == (12, 12)


def test_cancellation_from_another_thread_stops_within_200_ms(data):
    cancel, outcome = threading.Event(), {}
    model = FCDNN(64, 4)

    def run():
        try:
            train(model, *data, Schedule(steps=1_000_000, batch_size=256), cancel=cancel)
        except TrainingCancelled as e:
            outcome["cancelled"] = (time.perf_counter(), str(e))

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.3)
    asked = time.perf_counter()
    cancel.set()
    worker.join(timeout=5)
    assert not worker.is_alive()
    stopped, message = outcome["cancelled"]
    assert stopped - asked < 0.2
    assert "cancelled at step" in message


def test_float_cache_trains_once_then_loads_from_disk(tmp_path):
    schedule = Schedule(steps=30, batch_size=128)
    start = time.perf_counter()
    first = float_model(16, 3, cache=tmp_path, schedule=schedule)
    trained = time.perf_counter() - start
    files = list((tmp_path / "float").glob("*.pt"))
    assert len(files) == 1
    state = torch.load(files[0], weights_only=True)  # a plain state dict: safe to load
    assert set(state) == set(first.state_dict())
    start = time.perf_counter()
    second = float_model(16, 3, cache=tmp_path, schedule=schedule)
    assert time.perf_counter() - start < trained
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = float_model(16, 3, cache=tmp_path, schedule=schedule, seed=1)  # another key: another file
    assert len(list((tmp_path / "float").glob("*.pt"))) == 2
    assert not torch.equal(other.layers[0].weight, first.layers[0].weight)


def test_the_cache_directory_is_overridable(tmp_path, monkeypatch):
    from qviz.engine.experiments import cache_dir

    monkeypatch.setenv("QVIZ_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    assert cache_dir(tmp_path / "given") == tmp_path / "given"


@pytest.mark.parametrize("resolution,stride", [(40, 2), (41, 2), (30, 3), (16, 1), (9, 4)])
def test_decision_map_stages_preview_then_the_same_map_as_decision_map(small_float, resolution, stride):
    w_spec, a_spec = QuantSpec("symmetric", bits=3, narrow=True), QuantSpec("relu", bits=3)
    model = post_training_quantize(small_float, w_spec, a_spec)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    stages = list(decision_map_stages(model, resolution=resolution, preview_stride=stride))
    whole = decision_map(model, resolution=resolution)
    done = stages[-1]
    assert "preview" not in done and len(stages) == (1 if stride == 1 else 2)
    assert np.array_equal(done["predicted"], whole["predicted"])
    assert np.allclose(done["probs"], whole["probs"], atol=1e-6)
    assert done["accuracy"] == pytest.approx(whole["accuracy"])
    assert sum(calls) == 2 * resolution**2  # the stages together evaluate each point once, decision_map once
    if stride > 1:
        preview = stages[0]
        assert preview["preview"] and preview["probs"].shape == (resolution, resolution)
        rep = np.minimum(np.arange(resolution) // stride * stride + stride // 2, resolution - 1)
        assert np.allclose(preview["probs"], whole["probs"][rep][:, rep], atol=1e-6)
        shown = np.unique(rep)
        assert len(shown) <= -(-resolution // stride)
        right = whole["predicted"][np.ix_(shown, shown)] == whole["correct"][np.ix_(shown, shown)]
        assert preview["accuracy"] == pytest.approx(right.mean())


def test_decision_map_stages_checks_its_arguments_before_the_first_map(small_float):
    with pytest.raises(ValueError, match="preview_stride"):
        decision_map_stages(small_float, resolution=10, preview_stride=11)
    with pytest.raises(ValueError, match="lo=1, hi=0"):
        decision_map_stages(small_float, lo=1.0, hi=0.0)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        decision_map_stages("net")


def test_a_model_with_non_finite_outputs_gets_a_clear_error_not_a_map(small_float):
    # maps run without the per-activation finiteness checks (a third of their time); the answers are checked
    model = post_training_quantize(small_float, QuantSpec("symmetric", bits=4), QuantSpec("relu", bits=4))
    with torch.no_grad():
        model.layers[-1].bias.fill_(float("nan"))
    for make in (lambda: decision_map(model, resolution=8), lambda: list(decision_map_stages(model, resolution=8))):
        with pytest.raises(ValueError, match="outputs hold NaN or Inf"):
            make()


def test_roughness_tells_noise_from_a_smooth_boundary():
    smooth = np.zeros((40, 40), dtype=int)
    smooth[:, 20:] = 1
    noisy = np.random.default_rng(0).integers(0, 2, (40, 40))
    assert roughness(smooth) < 0.05 < 0.4 < roughness(noisy)


def test_run_experiment_returns_a_result_row(tmp_path):
    row = run_experiment(16, 3, False, w_bits=2, a_bits=2, method="ptq", cache=tmp_path, resolution=32,
                         float_schedule=Schedule(steps=30, batch_size=128))
    assert {"acc_float", "acc_quant", "test_float", "test_quant", "sqnr_db", "model_bytes"} <= set(row)
    assert 0 <= row["acc_quant"] <= 1 and 0 <= row["acc_float"] <= 1
    assert row["model_bytes"] == math.ceil(sum(layer.weight.numel() for layer in FCDNN(16, 3).layers) * 2 / 8)
    with pytest.raises(ValueError, match="method='fast'"):
        run_experiment(method="fast", cache=tmp_path)


def test_training_arguments_are_checked(data):
    model = FCDNN(8, 2)
    with pytest.raises(TypeError, match=r"cancel must be a threading\.Event"):
        train(model, *data, TINY, cancel=True)
    with pytest.raises(ValueError, match="steps=0"):
        Schedule(steps=0)
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        train(model, *data, {"steps": 3})


class _Checkpointed(torch.nn.Module):
    """Two layers whose forward may run under activation checkpointing (torch.utils.checkpoint)."""

    def __init__(self, reentrant: bool | None):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)
        self.reentrant = reentrant

    def forward(self, x):
        def region(t):
            return self.b(torch.relu(self.a(t)))

        if self.reentrant is None:
            return region(x)
        return torch.utils.checkpoint.checkpoint(region, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_trains_a_quantized_model_as_without_it(reentrant):
    """The backward pass runs a checkpointed region again; its quantizers must neither take a second range
    step nor quantize with another range than the forward did."""
    import copy

    from qviz.engine.quantize import calibrate, quantize_model

    plain = calibrate(quantize_model(_Checkpointed(None), 4, 4), [torch.randn(8, 16)])
    checkpointed = copy.deepcopy(plain)
    checkpointed.reentrant = reentrant
    models = (plain, checkpointed)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 16, generator=generator) * 3  # beyond the calibrated range: each step moves it
        x.requires_grad_(reentrant)  # the reentrant form passes gradients only to inputs that want them
        y = torch.randn(8, 4, generator=generator)
        for model, optimizer in zip(models, optimizers, strict=True):
            model.train()
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
        for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        for optimizer in optimizers:
            optimizer.step()
    assert plain.a.input_quantizer.range() == checkpointed.a.input_quantizer.range()
    assert plain.b.input_quantizer.range() == checkpointed.b.input_quantizer.range()
