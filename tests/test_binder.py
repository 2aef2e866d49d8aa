"""The Binder environment builds into a fresh virtual environment and runs the tour there."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_binder_requirements_install_and_the_tour_runs(tmp_path):
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    # PIP_RETRIES=0: where PyTorch's CPU index is out of reach (CI without internet), fail each lookup at once
    # and take torch==2.13.0+cpu from the local wheel directory instead of retrying for minutes per package.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "QVIZ_CACHE_DIR": str(tmp_path / "cache"), "PIP_RETRIES": "0"}
    env.pop("PYTHONPATH", None)

    def run(*args, cwd=ROOT, timeout=1200):
        result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    run(str(bin_dir / "python"), "-m", "pip", "install", "-q", "-r", "binder/requirements.txt")
    torch_version = run(str(bin_dir / "python"), "-c", "import torch; print(torch.__version__)").strip()
    assert torch_version.endswith("+cpu"), f"binder installed {torch_version}, not the CPU build"
    run("bash", "binder/postBuild")
    where = run(str(bin_dir / "python"), "-c", "import qviz._packed as k; print(k.__file__)", cwd=tmp_path)
    assert str(venv) in where and where.strip().endswith(".so")  # compiled into the environment, not the repo
    out = tmp_path / "tour.ipynb"
    run(str(bin_dir / "jupyter"), "nbconvert", "--to", "notebook", "--execute", "--output", str(out),
        str(ROOT / "notebooks" / "00_tour.ipynb"), "--ExecutePreprocessor.timeout=300")
    assert out.exists()
