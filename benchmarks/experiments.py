"""How fast the semicircle experiments answer: float training, PTQ maps, QAT, and the cost of a QAT step.

Prints, on this machine's threads (2 here):
1. time to train float 128-4 and 256-4 to their plateau (correct-answer accuracy on the 200x200 grid
   within 0.5 points of a run 4x as long) — goal <= 30 s for 128-4;
2. time for QAT at W2/A2 to reach its plateau from the cached float 128-4 (mean over three seeds within
   0.5 points of the mean of runs 4x as long) — goal <= 15 s;
3. time from a changed bit width to the preview and to the finished PTQ decision map of a cached 256-8 on
   a 200x200 grid (medians over changes) — goals: preview <= 100 ms, finished <= 1.5x the float map;
4. one QAT step (W2/A2) relative to one float step, measured interleaved — goal <= 1.3x.
Run: .venv/bin/python benchmarks/experiments.py
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_medians, table

from qviz import _checks
from qviz.engine import (
    Schedule,
    activation_spec,
    decision_map,
    decision_map_stages,
    float_model,
    post_training_quantize,
    quantized_fcdnn,
    retrain_quantized,
    semicircles,
    weight_spec,
)
from qviz.engine.train import FLOAT_SCHEDULE, QAT_SCHEDULE

PLATEAU = 0.005  # 0.5 accuracy points
SEEDS = (0, 1, 2)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def float_plateau(width: int, depth: int, cache: Path) -> list[str]:
    """The default schedule, then twice as long if that is not yet a plateau."""
    for steps in (FLOAT_SCHEDULE.steps, 2 * FLOAT_SCHEDULE.steps):
        schedule = Schedule(steps=steps, lr=FLOAT_SCHEDULE.lr, batch_size=FLOAT_SCHEDULE.batch_size)
        model, seconds = _timed(lambda s=schedule: float_model(width, depth, schedule=s, cache=cache))
        longer = Schedule(steps=4 * steps, lr=schedule.lr, batch_size=schedule.batch_size)
        ref = float_model(width, depth, schedule=longer, cache=cache)
        acc, acc_ref = decision_map(model)["accuracy"], decision_map(ref)["accuracy"]
        if acc >= acc_ref - PLATEAU:
            break
    return [f"float {width}-{depth}", f"{steps} steps", f"{seconds:.1f} s", f"{acc:.4f}", f"{acc_ref:.4f}",
            "yes" if acc >= acc_ref - PLATEAU else "no", "<= 30 s" if width == 128 else ""]


def qat_plateau(cache: Path) -> list[str]:
    """QAT W2/A2 of the cached float 128-4 with the default schedule and with one 4x as long, over three
    seeds (data sample and batch order): one run's accuracy moves by a few points from seed to seed, more
    than the 0.5-point plateau criterion, so the criterion is judged on the mean."""
    base = float_model(128, 4, cache=cache)
    w, a = weight_spec(2), activation_spec(2)
    longer = Schedule(steps=4 * QAT_SCHEDULE.steps, lr=QAT_SCHEDULE.lr, batch_size=QAT_SCHEDULE.batch_size)
    accs, refs, seconds = [], [], []
    for seed in SEEDS:
        model, t = _timed(lambda seed=seed: retrain_quantized(base, w, a, schedule=QAT_SCHEDULE, seed=seed))
        seconds.append(t)
        accs.append(decision_map(model)["accuracy"])
        refs.append(decision_map(retrain_quantized(base, w, a, schedule=longer, seed=seed))["accuracy"])
    acc, acc_ref = statistics.mean(accs), statistics.mean(refs)
    each = " / ".join(f"{x:.3f}" for x in accs)
    each_ref = " / ".join(f"{x:.3f}" for x in refs)
    return [f"QAT W2/A2 128-4 (from cache), seeds {each}", f"{QAT_SCHEDULE.steps} steps",
            f"{statistics.median(seconds):.1f} s", f"{acc:.4f}", f"{acc_ref:.4f} ({each_ref})",
            "yes" if acc >= acc_ref - PLATEAU else "no", "<= 15 s"]


def ptq_map_latency(cache: Path) -> tuple[float, float, float]:
    """A weight-bits change on a cached 256-8: PTQ, then the preview and the finished map of
    decision_map_stages (what the explorer shows), and the float model's map timed after each change."""
    base = float_model(256, 8, cache=cache)
    first, finished, floor = [], [], []
    for bits in (2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5, 6, 7, 8):
        start = time.perf_counter()
        stages = decision_map_stages(post_training_quantize(base, weight_spec(bits), None), resolution=200)
        next(stages)
        first.append(time.perf_counter() - start)
        list(stages)
        finished.append(time.perf_counter() - start)
        start = time.perf_counter()
        decision_map(base, resolution=200)
        floor.append(time.perf_counter() - start)
    return statistics.median(first), statistics.median(finished), statistics.median(floor)


def step_cost(cache: Path) -> tuple[float, float]:
    base = float_model(128, 4, cache=cache)
    X, y = semicircles(0)
    models = {"float": copy.deepcopy(base),
              "qat": quantized_fcdnn(base, weight_spec(2), activation_spec(2)).calibrate(X[:4096])}
    t = interleaved_medians(training_steps(models, X, y), rounds=200, warmup=10)
    return t["float"], t["qat"]


def training_steps(models: dict, X: torch.Tensor, y: torch.Tensor) -> dict:
    """One Adam step on a random batch of QAT_SCHEDULE's size, per model, as callables to time."""
    g = torch.Generator().manual_seed(0)
    steps = {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)

        def step(model=model, opt=opt):
            idx = torch.randint(0, len(X), (QAT_SCHEDULE.batch_size,), generator=g)
            with _checks.no_finite_checks():
                loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        steps[name] = step
    return steps


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)  # a fresh cache: the first call to float_model really trains
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        rows = [float_plateau(128, 4, cache), float_plateau(256, 4, cache), qat_plateau(cache)]
        print(table(rows, ["run", "length", "time", "grid acc", "4x longer", "plateau", "goal"]))
        first, finished, float_map = ptq_map_latency(cache)
        print(f"\nbit width change -> PTQ decision map, cached 256-8, 200x200 grid, medians: "
              f"preview {first * 1e3:.0f} ms (goal <= 100 ms), finished {finished * 1e3:.0f} ms = "
              f"{finished / float_map:.2f}x the float model's map ({float_map * 1e3:.0f} ms, timed after each "
              "change; goal <= 1.5x)")
        float_step, qat_step = step_cost(cache)
        print(f"one training step, batch {QAT_SCHEDULE.batch_size}, 128-4: float {float_step * 1e3:.2f} ms, "
              f"QAT W2/A2 {qat_step * 1e3:.2f} ms, ratio {qat_step / float_step:.2f}x (goal <= 1.3x)")


if __name__ == "__main__":
    main()
