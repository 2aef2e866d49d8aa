"""Every notebook runs top to bottom headless, without errors, within its time budget."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
BUDGET_S = 180  # each notebook: under 3 minutes on 2 cores with default settings


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """One empty model cache for the whole run, as on a fresh machine: the tour trains, later notebooks reuse."""
    return tmp_path_factory.mktemp("qviz-cache")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_within_budget(path, tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setenv("QVIZ_CACHE_DIR", str(fresh_cache))  # the kernel inherits the environment
    nb = nbformat.read(path, as_version=4)
    work = tmp_path / "work"  # notebooks that write files (06_reports) write them here
    work.mkdir()
    client = NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
