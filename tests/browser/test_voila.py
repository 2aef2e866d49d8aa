"""The explorers as a Voila app: the notebook rendered as a page with live widgets and no code, served by
the Voila extension of the same Jupyter server, offline, in headless Chromium."""

import re

import pytest
from harness import ARTIFACTS, Browser, JupyterLab, mark_box, marks, wait_until, write_notebook
from test_notebook7 import MODEL_CELLS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("voila")
    write_notebook(root / "app.ipynb", ["import qviz\nq = qviz.QuantizerExplorer(scheme='affine', bits=2)\nq"])
    write_notebook(root / "plain.ipynb", ["print('no widgets here')"])
    write_notebook(root / "model.ipynb", MODEL_CELLS)
    with JupyterLab(root, env={"QVIZ_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}) as lab:
        yield lab


def _voila_errors(browser, server) -> set[str]:
    """What Voila logs by itself on a page without widgets: with Notebook 7 installed beside it, Voila
    also loads Notebook's federated extension and logs "The getter for the shared module is not a
    function". Those are not qviz's."""
    page = browser.new_page()
    page.goto(f"{server.base}/voila/render/plain.ipynb?token={server.token}", timeout=240_000)
    page.get_by_text("no widgets here").first.wait_for(timeout=120_000)
    page.wait_for_timeout(2000)
    page.close()
    return {_first_line(e) for e in browser.console_errors}


def _first_line(message: str) -> str:
    return message.split("\n", 1)[0]


def test_quantizer_explorer_runs_live_in_voila(server):
    with Browser() as browser:
        its_own = _voila_errors(browser, server)
        page = browser.new_page()
        page.goto(f"{server.base}/voila/render/app.ipynb?token={server.token}", timeout=240_000)
        wait_until(page, lambda: marks(page, "levels") == 4, "4 levels at 2 bits")
        assert page.locator("text=import qviz").count() == 0  # an app: outputs only, no code
        handle = page.locator(".qviz-explorer .widget-slider", has=page.locator(
            "label", has_text=re.compile("^bits$"))).locator(".noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")  # the kernel behind the page answers: 3 bits
        wait_until(page, lambda: marks(page, "levels") == 8, "8 levels at 3 bits")
        shots = ARTIFACTS / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        page.locator(".qviz-explorer").first.screenshot(path=str(shots / "voila.png"))
        page.close()
    # Voila's own page template asks CDNs for Font Awesome and MathJax; offline those fail and the app
    # works without them (as above). Nothing else may leave 127.0.0.1, and nothing else may log an error.
    theirs = re.compile(r"fontawesome|mathjax")
    assert [u for u in browser.blocked if not theirs.search(u)] == [], browser.blocked
    assert [e for e in browser.console_errors if not _failed_load(e) and _first_line(e) not in its_own] == [], \
        browser.console_errors


def test_model_explorer_runs_live_in_voila(server):
    """A practitioner's network as an app: pick a layer, step its weight bits down with the keyboard, and
    the page's kernel redraws its weight-SQNR bar and moves the Pareto mark."""
    with Browser() as browser:
        its_own = _voila_errors(browser, server)
        page = browser.new_page()
        page.goto(f"{server.base}/voila/render/model.ipynb?token={server.token}", timeout=240_000)
        wait_until(page, lambda: marks(page, "weight_sqnr") == 3, "one weight-SQNR bar per layer", 240)
        wait_until(page, lambda: marks(page, "greedy") > 0 and marks(page, "current") == 1,
                   "the Pareto chart with the current mark", 180)
        assert page.locator("text=import torch").count() == 0
        bar, mark = mark_box(page, "weight_sqnr", 2), mark_box(page, "current", 0)
        explorer = page.locator(".qviz-explorer").first
        explorer.locator(".widget-dropdown", has=page.locator("label", has_text=re.compile("^layer$"))).locator(
            "select").first.select_option("fc3")
        handle = explorer.locator(".widget-slider", has=page.locator("label", has_text="its weight bits")).locator(
            ".noUi-handle").first
        handle.focus()
        for _ in range(3):  # global -> float -> 1 -> 2 bits
            handle.press("ArrowRight")
        wait_until(page, lambda: (mark_box(page, "weight_sqnr", 2) or bar)["width"] < bar["width"] * 0.6,
                   "fc3's weight SQNR bar shrinking at 2 bits", 60)
        wait_until(page, lambda: (mark_box(page, "current", 0) or mark)["x"] < mark["x"] - 2,
                   "the Pareto mark moving to fewer bytes", 60)
        shots = ARTIFACTS / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        explorer.screenshot(path=str(shots / "voila-model.png"))
        page.close()
    theirs = re.compile(r"fontawesome|mathjax")
    assert [u for u in browser.blocked if not theirs.search(u)] == [], browser.blocked
    assert [e for e in browser.console_errors if not _failed_load(e) and _first_line(e) not in its_own] == [], \
        browser.console_errors


def _failed_load(message: str) -> bool:
    return "net::ERR_FAILED" in message  # what an aborted (blocked) request logs; a local 404 still fails
