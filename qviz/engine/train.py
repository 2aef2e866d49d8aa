"""The one training loop: float training, quantization-aware retraining (QAT) and the digits models.

Cross-entropy, Adam with a linear warm-up and cosine decay (`Schedule`), minibatches drawn at random or in
shuffled epochs. Options from the papers: the cyclic learning rate of 002 App. B, the Lipschitz
regulariser L_Lip of 002 eq. 8, DoReFa gradient quantization (000 §2.3.3) and freezing batch-norm
statistics (004 eqs. 28-31). QAT is this same loop on a model from `quantize_model`: its float shadow
weights learn through straight-through gradients (002 eqs. 2-4, 004 eqs. 16-17).

`train_iter` yields progress (step, loss and whatever an `evaluate` callable adds); a `threading.Event`
cancels training from another thread between two steps.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from qviz import _checks
from qviz.engine.layers import LinearBN
from qviz.engine.quantize import float_weight
from qviz.engine.quantizers import quantize_gradients_of

SAMPLINGS = ("random", "epochs")


class TrainingCancelled(Exception):
    """Raised inside a training call when its cancel event was set."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long and how fast to train: Adam, linear warm-up over `warmup` of the steps, cosine decay."""

    steps: int = 1500
    lr: float = 3e-3
    batch_size: int = 1024
    warmup: float = 0.05

    def __post_init__(self):
        object.__setattr__(self, "steps", _checks.integer("steps", self.steps, 1, 10**7))
        object.__setattr__(self, "lr", _checks.real("lr", self.lr, 0.0, 10.0, lo_open=True))
        object.__setattr__(self, "batch_size", _checks.integer("batch_size", self.batch_size, 1, 10**7))
        object.__setattr__(self, "warmup", _checks.real("warmup", self.warmup, 0.0, 1.0))

    def factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1.0, self.warmup * self.steps))
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / self.steps))


FLOAT_SCHEDULE = Schedule()
# QAT to its plateau, chosen by measurement (benchmarks/experiments.py, W2/A2 from the float 128-4, mean
# over three seeds of the 200x200 grid accuracy): 1000 steps were still climbing (seed 0: 0.749 -> 0.802
# at 4x); 4000 steps at lr 3e-3 reach 0.807, within 0.3 points of 16,000 steps (0.810), in about 10 s on
# 2 cores. A higher rate settles lower (lr 1e-2: 0.74 for 1000 and 4000 steps), a lower one is still
# climbing after 4000 steps (lr 1e-3: 0.799 -> 0.825), a batch of 4096 costs 4x per step for the same level.
QAT_SCHEDULE = Schedule(steps=4000, lr=3e-3)


def cyclic_lr_factors() -> list[float]:
    """The 8-step learning-rate factor sequence of one CLR cycle (002 App. B, Fig. 11)."""
    s = math.sqrt(0.1)
    return [1.0, s, 0.1, 0.1 * s, 0.01, 0.1 * s, 0.1, s]


def clr_factor(step: int, period: int) -> float:
    """The CLR factor at `step` for a cycle of `period` steps: the factor changes every period / 8 steps."""
    period = _checks.integer("period", period, 8)
    step = _checks.integer("step", step, 0)
    return cyclic_lr_factors()[(step * 8 // period) % 8]


def lipschitz_penalty(model: torch.nn.Module) -> torch.Tensor:
    """L_Lip = 1/2 Σ_l ||W_lᵀ W_l - I||² over every linear layer's float weights (002 eq. 8).

    002 writes W_l as [in, out]; torch stores weight = W_lᵀ [out, in], so W_lᵀ W_l = weight @ weight.T.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    total = torch.zeros(())
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear | LinearBN):
            w = _checks.float_tensor(f"the weight of {name or 'the model'}",
                                     m.weight if isinstance(m, LinearBN) else float_weight(m))
            gram = w @ w.T
            total = total.to(gram.device) + ((gram - torch.eye(gram.shape[0], device=gram.device)) ** 2).sum()
    return 0.5 * total


def check_cancel(cancel) -> threading.Event | None:
    if cancel is not None and not hasattr(cancel, "is_set"):
        raise TypeError(f"cancel must be a threading.Event (or have is_set()), got {type(cancel).__name__}")
    return cancel


Callback = Callable[[dict], None]
Evaluate = Callable[[torch.nn.Module, int, bool], dict]


def train(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, schedule: Schedule = FLOAT_SCHEDULE, *,
          callback: Callback | None = None, callback_every: int = 50, **options) -> dict:
    """Train `model` on (X, y) in place with cross-entropy, Adam and `schedule`; returns a summary dict.

    callback(progress) is called every `callback_every` steps and at the end (see `train_iter` for the
    progress dict and the other options).
    """
    start = time.perf_counter()
    every = _checks.integer("callback_every", callback_every, 1) if callback is not None else None
    last = {"loss": float("nan")}
    for progress in train_iter(model, X, y, schedule, report_every=every, **options):
        last = progress
        if callback is not None:
            callback(progress)
    return {"steps": schedule.steps, "loss": last["loss"], "seconds": time.perf_counter() - start}


def train_iter(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, schedule: Schedule = FLOAT_SCHEDULE, *,
               seed: int = 0, sampling: str = "random", clr_period: int | None = None, lip_weight: float = 0.0,
               grad_bits: int | None = None, freeze_bn_step: int | None = None, report_every: int | None = 50,
               evaluate: Evaluate | None = None, cancel: threading.Event | None = None) -> Iterator[dict]:
    """Train `model` in place, yielding progress every `report_every` steps (None: only at the end).

    sampling: "random" draws each minibatch with replacement; "epochs" shuffles the data once per epoch
    and walks through it. clr_period: after warm-up the cosine decay gives way to the cyclic factors of
    002 App. B with this period (in steps). lip_weight: add lip_weight * L_Lip (002 eq. 8). grad_bits:
    DoReFa-quantize every parameter gradient to that many bits. freeze_bn_step: freeze batch-norm
    statistics (004 eqs. 28-31) from that step on. Each progress dict holds step, steps and loss, plus
    what evaluate(model, step, last) returns (the model is in eval mode while it runs). Setting `cancel`
    (or closing the generator) stops training before the next step; a set `cancel` raises
    TrainingCancelled.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    _checks.choice("sampling", sampling, SAMPLINGS)
    cancel = check_cancel(cancel)
    lip_weight = _checks.real("lip_weight", lip_weight, 0.0)
    report_every = schedule.steps if report_every is None else _checks.integer("report_every", report_every, 1)
    if clr_period is not None:
        clr_period = _checks.integer("clr_period", clr_period, 8)
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate must be callable(model, step, last) or None, got {type(evaluate).__name__}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=schedule.lr, foreach=True)
    hooks = quantize_gradients_of(model, grad_bits, generator=generator) if grad_bits else []
    warm_steps = max(1, int(schedule.warmup * schedule.steps))
    batches = _batches(len(X), schedule.batch_size, sampling, generator)
    model.train()
    try:
        for step in range(schedule.steps):
            if cancel is not None and cancel.is_set():
                raise TrainingCancelled(f"cancelled at step {step} of {schedule.steps}")
            if freeze_bn_step is not None and step == freeze_bn_step:
                for m in model.modules():
                    if isinstance(m, LinearBN):
                        m.freeze()
            if clr_period is not None and step >= warm_steps:
                factor = clr_factor(step - warm_steps, clr_period)
            else:
                factor = schedule.factor(step)
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr * factor
            idx = next(batches)
            with _checks.no_finite_checks():  # the loss is checked instead, once per step
                loss = F.cross_entropy(model(X[idx]), y[idx])
                if lip_weight:
                    loss = loss + lip_weight * lipschitz_penalty(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training diverged at step {step}: the loss is {loss_value}; "
                                         "lower lr (allowed: any value > 0) or check the data for NaN/Inf")
            last = step == schedule.steps - 1
            if (step + 1) % report_every == 0 or last:
                progress = {"step": step + 1, "steps": schedule.steps, "loss": loss_value}
                if evaluate is not None:
                    progress.update(evaluate(model, step + 1, last))
                    model.train()
                yield progress
    finally:
        for h in hooks:
            h.remove()
        model.eval()


def _batches(n: int, batch_size: int, sampling: str, generator: torch.Generator) -> Iterator[torch.Tensor]:
    if sampling == "random":
        while True:
            yield torch.randint(0, n, (batch_size,), generator=generator)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def fit(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, *, epochs: int = 30, lr: float = 3e-3,
        batch_size: int = 128, seed: int = 0, cancel: threading.Event | None = None) -> torch.nn.Module:
    """`epochs` shuffled passes over (X, y) with cosine decay and no warm-up: the loop above, counted in
    epochs (how the digits models train). Returns the model in eval mode."""
    epochs = _checks.integer("epochs", epochs, 1, 100_000)
    batch_size = _checks.integer("batch_size", batch_size, 1, 10**7)
    steps = epochs * max(1, math.ceil(len(X) / batch_size))
    train(model, X, y, Schedule(steps=steps, lr=lr, batch_size=batch_size, warmup=0.0), sampling="epochs",
          seed=seed, cancel=cancel)
    return model.eval()
