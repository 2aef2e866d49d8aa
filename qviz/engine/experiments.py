"""The paper recipes: the semicircle experiments of 002 §3-5 and the digits experiments of 001 and 002 Fig. 8.

- `float_model` / `digits_float_model`: float networks trained once, then loaded from the on-disk cache
  (state dicts, read with torch.load(weights_only=True); damaged entries are retrained).
- `post_training_quantize`: quantize a float model's weights and calibrate activation ranges, no
  retraining (004 §3.1).
- `retrain_quantized`: quantization-aware retraining from the float model (002 eqs. 2-4, 004 eqs. 16-17)
  with the options of 002 App. B (cyclic learning rate), 002 eq. 8 (L_Lip), 004 eqs. 22-31 (batch-norm
  folding, correction, freezing), 000 §2.3.3 (DoReFa gradients) and 004 §4 (stochastic weights).
- `run_experiment` / `digits_experiment`: one experiment, settings in, one result row out; the sweeps and
  the explorers use them. `check_experiment` checks settings without training.

Every quantized network here comes from `quantize_model`, the path any user's model takes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qviz import _checks
from qviz.engine import _cache
from qviz.engine.data import digits, semicircles
from qviz.engine.evaluate import accuracy, decision_map, heldout_accuracy, roughness, semicircle_evaluation
from qviz.engine.layers import LinearBN
from qviz.engine.metrics import sqnr_db
from qviz.engine.nets import BLOCKS, FCDNN, INPUT_SCALE, MLP, SmallResNet, fcdnn_overrides
from qviz.engine.quantize import quantize_model, weight_pairs
from qviz.engine.quantizers import QuantSpec
from qviz.engine.train import (
    FLOAT_SCHEDULE,
    QAT_SCHEDULE,
    Callback,
    Schedule,
    check_cancel,
    fit,
    train,
)

# 2: the networks became plain models quantized by quantize_model (their state dicts changed)
CACHE_VERSION = 2


def train_float(model: FCDNN | None = None, X: torch.Tensor | None = None, y: torch.Tensor | None = None,
                schedule: Schedule = FLOAT_SCHEDULE, **kw) -> FCDNN:
    """Train a float model (default: FCDNN(128, 4)) on the semicircles (default: semicircles(seed=0))."""
    model = FCDNN() if model is None else model
    if X is None:
        X, y = semicircles(kw.get("seed", 0))
    train(model, X, y, schedule, **kw)
    return model


def quantized_fcdnn(float_model: FCDNN, w_spec: QuantSpec | None, a_spec: QuantSpec | None, *,
                    quantize_shortcut: bool = False, shortcut_spec: QuantSpec | None = None,
                    overrides: dict | None = None, bn_fold: str | None = None, stochastic: bool = False) -> FCDNN:
    """`quantize_model` of an FCDNN with 002's settings: weights of every layer, activations after every
    hidden ReLU, residual sums when quantize_shortcut (QRA), layer-index overrides as FCDNN takes them, and
    another batch-norm folding mode for its LinearBN layers."""
    if not isinstance(float_model, FCDNN):
        raise TypeError(f"float_model must be an FCDNN, got {type(float_model).__name__}")
    index_overrides = FCDNN._check_overrides(float_model, overrides)
    names = fcdnn_overrides(float_model.depth, float_model.residual, quantize_shortcut, shortcut_spec or a_spec,
                            index_overrides)
    model = quantize_model(float_model, w_spec, a_spec, overrides=names, stochastic=stochastic)
    if bn_fold is not None:
        for m in model.modules():
            if isinstance(m, LinearBN):
                m.fold = _checks.choice("bn_fold", bn_fold, ("none", "naive", "corrected"))
        model.bn_fold = bn_fold
    model.w_spec, model.a_spec, model.stochastic = w_spec, a_spec, stochastic
    model.quantize_shortcut, model.shortcut_spec, model.overrides = quantize_shortcut, shortcut_spec or a_spec, \
        index_overrides
    return model


def post_training_quantize(float_model: FCDNN, w_spec: QuantSpec | None, a_spec: QuantSpec | None,
                           X: torch.Tensor | None = None, **changes) -> FCDNN:
    """Quantize `float_model` without retraining: weights as they are, activation ranges calibrated on
    X (default: 4,096 training points), as in 004 §3.1."""
    model = quantized_fcdnn(float_model, w_spec, a_spec, **changes)
    if a_spec is None and not changes.get("quantize_shortcut"):
        return model.eval()  # weights only: nothing to calibrate
    calibration = semicircles(0)[0][::5][:4096] if X is None else X
    return model.calibrate(calibration).eval()


METHODS = ("ptq", "qat", "qat_clr", "qat_lip", "qat_clr_lip")


def prepare_qat(float_model: FCDNN, w_spec: QuantSpec | None, a_spec: QuantSpec | None, *,
                X: torch.Tensor | None = None, stochastic: bool = False, **changes) -> FCDNN:
    """A quantized twin of `float_model` ready for QAT: shadow weights copied, activation ranges calibrated."""
    model = quantized_fcdnn(float_model, w_spec, a_spec, stochastic=stochastic, **changes)
    X = semicircles(0)[0] if X is None else X
    return model.calibrate(X[::5][:4096])


def retrain_quantized(float_model: FCDNN, w_spec: QuantSpec | None, a_spec: QuantSpec | None, *,
                      X: torch.Tensor | None = None, y: torch.Tensor | None = None,
                      schedule: Schedule = QAT_SCHEDULE, clr: bool = False, lip_weight: float = 0.0,
                      grad_bits: int | None = None, stochastic: bool = False, seed: int = 0,
                      freeze_bn_step: int | None = None, callback: Callback | None = None, callback_every: int = 50,
                      map_every: int = 0, map_resolution: int = 64, cancel: threading.Event | None = None,
                      **changes) -> FCDNN:
    """Quantization-aware retraining from `float_model` (002 eqs. 2-4, 004 eqs. 16-17).

    The float weights become the shadow weights; the forward pass uses their quantized values and the
    STE carries gradients back. clr: after the schedule's warm-up use the cyclic learning rate of 002
    App. B with a period of a quarter of the steps (the rate cycles between lr and lr/100). Other options
    as in `train_iter`; callbacks get the correct-answer accuracy on a map_resolution² grid and, every
    map_every steps, the decision map; `changes` are quantized_fcdnn's settings (quantize_shortcut,
    overrides, bn_fold, ...).
    """
    if X is None:
        X, y = semicircles(seed)
    model = prepare_qat(float_model, w_spec, a_spec, X=X, stochastic=stochastic, **changes)
    train(model, X, y, schedule, seed=seed, clr_period=qat_clr_period(schedule) if clr else None,
          lip_weight=lip_weight, grad_bits=grad_bits, freeze_bn_step=freeze_bn_step, callback=callback,
          callback_every=callback_every, evaluate=semicircle_evaluation(map_every, map_resolution), cancel=cancel)
    return model


def qat_clr_period(schedule: Schedule) -> int:
    """The CLR period QAT uses: a quarter of the steps, so the rate cycles four times (002 App. B)."""
    return max(8, schedule.steps // 4)


# --------------------------------------------------------------------------------------------------
# Float-model cache


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where trained float models live: `path`, else $QVIZ_CACHE_DIR, else the user cache directory
    ($XDG_CACHE_HOME/qviz or ~/.cache/qviz)."""
    return _cache.folder(path)


def float_model(width: int = 128, depth: int = 4, residual: bool = False, batchnorm: bool = False, seed: int = 0, *,
                schedule: Schedule = FLOAT_SCHEDULE, data: dict | None = None,
                cache: str | os.PathLike | None = None, use_cache: bool = True,
                callback: Callback | None = None, cancel: threading.Event | None = None) -> FCDNN:
    """A float FCDNN trained on the semicircles, from the on-disk cache when it was trained before.

    Keyed by (width, depth, residual, batchnorm, seed, data settings, schedule); the file holds only a
    state dict and is read with torch.load(weights_only=True).
    """
    data = dict(data or {})
    settings = {"width": width, "depth": depth, "residual": residual, "batchnorm": batchnorm, "seed": seed,
                "data": data, "schedule": dataclasses.asdict(schedule), "input_scale": INPUT_SCALE,
                "version": CACHE_VERSION}
    path = cache_dir(cache) / "float" / f"{_cache.key(settings)}.pt"

    def fit_semicircles(model: FCDNN) -> None:
        X, y = semicircles(seed, **data)
        train(model, X, y, schedule, seed=seed, callback=callback, cancel=cancel,
              evaluate=semicircle_evaluation() if callback is not None else None)

    return _trained_once(path, lambda: FCDNN(width, depth, residual, batchnorm=batchnorm), fit_semicircles, seed,
                         use_cache)


def _trained_once(path: Path, build: Callable[[], torch.nn.Module], fit_model: Callable[[torch.nn.Module], None],
                  seed: int, use_cache: bool = True) -> torch.nn.Module:
    """build() loaded from the state dict at `path` (torch.load(weights_only=True)) when it was trained
    before; otherwise built from `seed`, trained by fit_model and saved there. A cached file that cannot be
    read, does not fit the architecture or holds NaN/Inf is reported in a warning and retrained."""

    def load(p: Path) -> torch.nn.Module:
        model = build()
        model.load_state_dict(torch.load(p, weights_only=True))
        bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise ValueError(f"{len(bad)} tensors hold NaN or Inf (first: {bad[0]})")
        return model.eval()

    if use_cache:
        model = _cache.read(path, load, "float model")
        if model is not None:
            return model
    torch.manual_seed(seed)
    model = build()
    fit_model(model)
    if use_cache:
        _cache.write_with(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# One experiment


def weight_spec(bits: int | None, scheme: str = "auto", granularity: str = "tensor") -> QuantSpec | None:
    """The weight quantizer for `bits` (None: float). scheme="auto": xnor for 1 bit, ternary (TWN) for
    2 bits (002 eq. 1's 3 levels with an L2-fitted step, as 002's [18]), symmetric narrow for more."""
    if bits is None:
        return None
    if scheme == "auto":
        scheme = {1: "xnor", 2: "ternary"}.get(bits, "symmetric")
    kw = {"narrow": True} if scheme == "symmetric" else {}
    return QuantSpec(scheme, bits=bits, granularity=granularity, **kw)


def activation_spec(bits: int | None, scheme: str = "pact") -> QuantSpec | None:
    """The activation quantizer for `bits` (None: float); PACT by default, as in 002."""
    return None if bits is None else QuantSpec(scheme, bits=bits)


# What run_experiment passes on to retraining (002 §5, 004 §3.2, §4) and to FCDNN.
EXPERIMENT_OPTIONS = ("lip_weight", "grad_bits", "stochastic", "freeze_bn_step", "callback_every", "map_every",
                      "map_resolution", "overrides", "bn_fold")


def check_experiment(width: int = 128, depth: int = 4, residual: bool = False, w_bits: int | None = 2,
                     a_bits: int | None = None, method: str = "qat", seed: int = 0, *, w_scheme: str = "auto",
                     a_scheme: str = "pact", batchnorm: bool = False, quantize_shortcut: bool = False,
                     qat_schedule: Schedule = QAT_SCHEDULE, float_schedule: Schedule = FLOAT_SCHEDULE,
                     resolution: int = 200, cache: str | os.PathLike | None = None, with_maps: bool = False,
                     callback: Callback | None = None, cancel: threading.Event | None = None,
                     **options) -> tuple[QuantSpec | None, QuantSpec | None]:
    """Check every argument of `run_experiment` without training anything; returns (w_spec, a_spec).

    Raises TypeError / ValueError naming the argument, as run_experiment would after minutes of work.
    Sweeps call it for every setting before they start.
    """
    for name, value in (("residual", residual), ("batchnorm", batchnorm), ("quantize_shortcut", quantize_shortcut),
                        ("with_maps", with_maps)):
        _checks.boolean(name, value)
    _checks.choice("method", method, METHODS)
    _checks.integer("seed", seed, 0, 2**63 - 1)
    _checks.integer("resolution", resolution, 2, 4096)
    for name, schedule in (("qat_schedule", qat_schedule), ("float_schedule", float_schedule)):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"{name} must be a Schedule, got {type(schedule).__name__}")
    _cache.folder(cache)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    check_cancel(cancel)
    unknown = sorted(set(options) - set(EXPERIMENT_OPTIONS))
    if unknown:
        raise TypeError(f"run_experiment got unknown options {unknown}; allowed: {', '.join(EXPERIMENT_OPTIONS)}")
    w_spec = _spec_for("w_bits", w_bits, "w_scheme", w_scheme, weight_spec)
    a_spec = _spec_for("a_bits", a_bits, "a_scheme", a_scheme, activation_spec)
    _check_options(options, w_spec)
    structure = {k: options[k] for k in ("overrides", "bn_fold") if k in options}
    FCDNN(width, depth, residual, w_spec, a_spec, batchnorm, quantize_shortcut=quantize_shortcut, **structure)
    return w_spec, a_spec


def _spec_for(bits_name: str, bits, scheme_name: str, scheme, make) -> QuantSpec | None:
    """make(bits, scheme), with errors that name run_experiment's arguments (w_bits, not bits)."""
    if bits is not None:
        _checks.integer(bits_name, bits)
    if not isinstance(scheme, str):
        raise TypeError(f"{scheme_name} must be a scheme name (str), got {type(scheme).__name__}")
    try:
        return make(bits, scheme)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{bits_name}={bits!r} with {scheme_name}={scheme!r}: {err}") from None


def _check_options(options: dict, w_spec: QuantSpec | None) -> None:
    if "lip_weight" in options:
        _checks.real("lip_weight", options["lip_weight"], 0.0)
    if options.get("grad_bits") is not None:
        _checks.integer("grad_bits", options["grad_bits"], 1, 16)
    if "stochastic" in options and _checks.boolean("stochastic", options["stochastic"]) and w_spec is not None:
        from qviz.engine.quantizers import SCHEMES

        _checks.choice("w_scheme (with stochastic=True)", w_spec.scheme,
                       [n for n, s in SCHEMES.items() if s.stochastic_twin])
    if options.get("freeze_bn_step") is not None:
        _checks.integer("freeze_bn_step", options["freeze_bn_step"], 0)
    for name, lo in (("callback_every", 1), ("map_every", 0), ("map_resolution", 2)):
        if name in options:
            _checks.integer(name, options[name], lo, 4096 if name == "map_resolution" else None)


def run_experiment(width: int = 128, depth: int = 4, residual: bool = False, w_bits: int | None = 2,
                   a_bits: int | None = None, method: str = "qat", seed: int = 0, *, w_scheme: str = "auto",
                   a_scheme: str = "pact", batchnorm: bool = False, quantize_shortcut: bool = False,
                   qat_schedule: Schedule = QAT_SCHEDULE, float_schedule: Schedule = FLOAT_SCHEDULE,
                   resolution: int = 200, cache: str | os.PathLike | None = None, with_maps: bool = False,
                   callback: Callback | None = None, cancel: threading.Event | None = None, **options) -> dict:
    """Train (or load) the float model, quantize it with `method`, and report one result row.

    method: "ptq" (no retraining), "qat", "qat_clr" (with the cyclic learning rate), "qat_lip" (with
    L_Lip, weight options.get("lip_weight", 1e-4) as in 002 §5.4), "qat_clr_lip". The row holds the
    settings, acc_float and acc_quant (correct-answer accuracy on the resolution² grid), test_float and
    test_quant (on semicircles(seed + 1000)), sqnr_db (weights, all layers), model_bytes (quantized
    weights at w_bits, float32 otherwise), roughness of both maps, and train_seconds. with_maps adds the
    two decision maps.
    """
    # every argument is checked before any training: a typo must not cost half a minute of float training
    w_spec, a_spec = check_experiment(width, depth, residual, w_bits, a_bits, method, seed, w_scheme=w_scheme,
                                      a_scheme=a_scheme, batchnorm=batchnorm, quantize_shortcut=quantize_shortcut,
                                      qat_schedule=qat_schedule, float_schedule=float_schedule,
                                      resolution=resolution, cache=cache, with_maps=with_maps, callback=callback,
                                      cancel=cancel, **options)
    width, depth, seed, resolution = int(width), int(depth), int(seed), int(resolution)
    w_bits = None if w_bits is None else int(w_bits)
    a_bits = None if a_bits is None else int(a_bits)
    residual, batchnorm, quantize_shortcut = bool(residual), bool(batchnorm), bool(quantize_shortcut)
    start = time.perf_counter()
    base = float_model(width, depth, residual, batchnorm, seed, schedule=float_schedule, cache=cache, cancel=cancel)
    float_seconds = time.perf_counter() - start
    changes = {"quantize_shortcut": quantize_shortcut and residual}
    start = time.perf_counter()
    if method == "ptq":
        model = post_training_quantize(base, w_spec, a_spec, **changes)
    else:
        lip = options.pop("lip_weight", 1e-4) if "lip" in method else 0.0
        model = retrain_quantized(base, w_spec, a_spec, schedule=qat_schedule, clr="clr" in method, lip_weight=lip,
                                  seed=seed, callback=callback, cancel=cancel, **options, **changes)
    quant_seconds = time.perf_counter() - start
    float_map, quant_map = decision_map(base, resolution=resolution), decision_map(model, resolution=resolution)
    X_test = semicircles(seed + 1000)[0]
    row = {
        "width": width, "depth": depth, "residual": residual, "w_bits": w_bits, "a_bits": a_bits, "method": method,
        "seed": seed, "w_scheme": None if w_spec is None else w_spec.scheme,
        "a_scheme": None if a_spec is None else a_spec.scheme, "batchnorm": batchnorm,
        "quantize_shortcut": changes["quantize_shortcut"],
        "acc_float": float_map["accuracy"], "acc_quant": quant_map["accuracy"],
        "test_float": heldout_accuracy(base, X_test), "test_quant": heldout_accuracy(model, X_test),
        "roughness_float": roughness(float_map["predicted"]), "roughness_quant": roughness(quant_map["predicted"]),
        "sqnr_db": _weight_sqnr(model), "model_bytes": _model_bytes(model, w_bits),
        "float_seconds": float_seconds, "train_seconds": quant_seconds,
    }
    if with_maps:
        row["float_map"], row["quant_map"] = float_map, quant_map
    return row


def quantized_weights(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(float shadow weights, weights as the quantized model uses them) for every layer, eval mode."""
    return [(w, q) for w, q in weight_pairs(model)]


def _weight_sqnr(model: torch.nn.Module) -> float:
    pairs = quantized_weights(model)
    w = torch.cat([p[0].reshape(-1) for p in pairs])
    q = torch.cat([p[1].reshape(-1) for p in pairs])
    return sqnr_db(w, q)


def _model_bytes(model: FCDNN, w_bits: int | None) -> int:
    n = sum(w.numel() for w, _ in quantized_weights(model))
    return 4 * n if w_bits is None else math.ceil(n * w_bits / 8)


# --------------------------------------------------------------------------------------------------
# The digits experiments (sweeps over 001 Fig. 5 and 002 Fig. 8 in miniature)


def digits_model(model: str = "mlp", block: str = "basic", blocks: int = 2, channels: int = 16,
                 w_spec: QuantSpec | None = None, a_spec: QuantSpec | None = None) -> torch.nn.Module:
    """LeNet-300-100 ("mlp", 001's LeNet300) or a small residual CNN ("cnn") for the 8x8 digits."""
    _checks.choice("model", model, ("mlp", "cnn"))
    if model == "mlp":
        return MLP((64, 300, 100, 10), w_spec, a_spec)
    return SmallResNet(block, blocks, channels, w_spec, a_spec)


def digits_float_model(model: str = "mlp", block: str = "basic", blocks: int = 2, channels: int = 16, seed: int = 0,
                       epochs: int = 40, cache: str | os.PathLike | None = None) -> torch.nn.Module:
    """A float digits model trained once per settings, then loaded from the on-disk cache."""
    settings = {"model": model, "block": block, "blocks": blocks, "channels": channels, "seed": seed,
                "epochs": epochs, "version": CACHE_VERSION}
    path = cache_dir(cache) / "digits" / f"{_cache.key(settings)}.pt"

    def fit_digits(net: torch.nn.Module) -> None:
        X, y, _, _ = digits(seed)
        fit(net, X, y, epochs=epochs, seed=seed)

    return _trained_once(path, lambda: digits_model(model, block, blocks, channels), fit_digits, seed)


def check_digits_experiment(model: str = "mlp", w_bits: int | None = 4, a_bits: int | None = None, *,
                            block: str = "basic", blocks: int = 2, channels: int = 16, w_scheme: str = "ceil",
                            a_scheme: str = "ceil_act", epochs: int = 15, seed: int = 0,
                            cache: str | os.PathLike | None = None) -> None:
    """Check every argument of `digits_experiment` without training (sweeps check all settings first)."""
    _checks.choice("model", model, ("mlp", "cnn"))
    _checks.choice("block", block, BLOCKS)
    _checks.integer("blocks", blocks, 1, 64)
    _checks.integer("channels", channels, 1, 1024)
    _checks.integer("epochs", epochs, 1, 100_000)
    _checks.integer("seed", seed, 0, 2**63 - 1)
    _cache.folder(cache)
    _spec_for("w_bits", w_bits, "w_scheme", w_scheme, lambda b, s: None if b is None else QuantSpec(s, bits=b))
    _spec_for("a_bits", a_bits, "a_scheme", a_scheme, lambda b, s: None if b is None else QuantSpec(s, bits=b))


def digits_experiment(model: str = "mlp", w_bits: int | None = 4, a_bits: int | None = None, *, block: str = "basic",
                      blocks: int = 2, channels: int = 16, w_scheme: str = "ceil", a_scheme: str = "ceil_act",
                      epochs: int = 15, seed: int = 0, cache: str | os.PathLike | None = None) -> dict:
    """Float model -> quantization-aware retraining at (w_bits, a_bits) -> test accuracies and more.

    The defaults follow 001: Q_b weights with a trainable α (eq. 3-4) and A_b activations (eq. 5).
    The row also holds a histogram of the quantized weights of the first quantized layer.
    """
    from qviz.engine.metrics import histogram

    check_digits_experiment(model, w_bits, a_bits, block=block, blocks=blocks, channels=channels, w_scheme=w_scheme,
                            a_scheme=a_scheme, epochs=epochs, seed=seed, cache=cache)
    start = time.perf_counter()
    base = digits_float_model(model, block, blocks, channels, seed, cache=cache)
    X, y, X_test, y_test = digits(seed)
    w_spec = None if w_bits is None else QuantSpec(w_scheme, bits=w_bits)
    a_spec = None if a_bits is None else QuantSpec(a_scheme, bits=a_bits)
    net = quantize_model(base, w_spec, a_spec, overrides=base.quantization_overrides())
    if w_spec is not None or a_spec is not None:
        fit(net, X, y, epochs=epochs, lr=1e-3, seed=seed)
    quantized = [(name, w, q) for name, w, q in weight_pairs(net, with_names=True) if not torch.equal(w, q)]
    row = {"model": model, "block": block if model == "cnn" else None, "blocks": blocks if model == "cnn" else None,
           "channels": channels if model == "cnn" else None, "w_bits": w_bits, "a_bits": a_bits,
           "w_scheme": None if w_spec is None else w_scheme, "a_scheme": None if a_spec is None else a_scheme,
           "seed": seed, "acc_float": accuracy(base, X_test, y_test), "acc_quant": accuracy(net, X_test, y_test),
           "params": sum(p.numel() for p in net.parameters()), "train_seconds": time.perf_counter() - start}
    if quantized:
        name, w, q = quantized[0]
        edges, counts = histogram(q, 40)
        row.update(sqnr_db=sqnr_db(w, q), weight_edges=edges.tolist(), weight_counts=counts.tolist(),
                   weight_layer=name)
    return row
