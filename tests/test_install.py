"""A plain `pip install` of a clone (no extras) brings every explorer; the engine and the kernels alone
load no widget library."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXPLORERS = textwrap.dedent("""
    import sys, torch
    import qviz.engine, qviz.packed
    assert not {"ipywidgets", "altair", "anywidget"} & set(sys.modules), "the engine loaded widget libraries"
    import qviz
    from qviz.engine import FCDNN
    from qviz.engine.sweep import SweepResult
    q = qviz.QuantizerExplorer(background=False)
    assert q.data["curve"]["levels"].size == 4
    w = qviz.WeightExplorer(FCDNN(16, 3), background=False)
    assert w.data["report"]["sqnr_db"] > 0
    k = qviz.KernelReadout(background=False)
    k.out_features.value = k.in_features.value = 256
    k.budget.value = 0.05
    assert k.data["latency"]["qviz_s"] > 0
    rows = [{"width": 64, "w_bits": b, "acc_quant": 0.9, "status": "ok"} for b in (1, 2)]
    s = qviz.SweepExplorer(SweepResult(rows, [{"width": 64, "w_bits": b} for b in (1, 2)]), background=False)
    d = qviz.DecisionMapExplorer(width=16, depth=2)  # trains in the background; constructing is the check
    b = qviz.Dashboard(FCDNN(16, 3))
    for e in (q, w, k, s, d, b):
        e.close()
    print("every explorer constructed")
""")


def _run(args, env, cwd, timeout=1500):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_a_plain_install_of_the_clone_constructs_every_explorer(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "QVIZ_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    # the CPU build first (pinned as ./dev pins it): the plain install must then bring everything else
    _run([python, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), "torch"], env, tmp_path)
    _run([python, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(ROOT)], env, tmp_path)
    installed = _run([python, "-m", "pip", "list", "--format=freeze"], env, tmp_path).lower()
    assert not any(line.startswith("jupyterlab==") for line in installed.splitlines())  # no extras came along
    out = _run([python, "-c", EXPLORERS], env, tmp_path, timeout=600)
    assert "every explorer constructed" in out


def test_the_engine_and_the_kernels_load_no_widget_library():
    code = ("import sys, qviz, qviz.engine, qviz.packed; "
            "print(sorted({'ipywidgets', 'altair', 'anywidget', 'vl_convert'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
