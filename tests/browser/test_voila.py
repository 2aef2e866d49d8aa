"""The explorers as a Voila app: the notebook rendered as a page with live widgets and no code, served by
the Voila extension of the same Jupyter server, offline, in headless Chromium."""

import re

import pytest
from harness import (
    Browser,
    JupyterLab,
    mark_box,
    marks,
    model_explorer_ready,
    pick_layer,
    shoot,
    wait_for_fewer_bits,
    wait_until,
    write_notebook,
)
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
        shoot(page.locator(".qviz-explorer").first, "voila")
        page.close()
    _assert_offline_and_clean(browser, its_own)


def test_model_explorer_runs_live_in_voila(server):
    """A practitioner's network as an app: pick a layer, step its weight bits down with the keyboard, and
    the page's kernel redraws its weight-SQNR bar and moves the Pareto mark."""
    with Browser() as browser:
        its_own = _voila_errors(browser, server)
        page = browser.new_page()
        page.goto(f"{server.base}/voila/render/model.ipynb?token={server.token}", timeout=240_000)
        explorer = model_explorer_ready(page, 3, timeout=240)
        assert page.locator("text=import torch").count() == 0
        before = mark_box(page, "weight_sqnr", 2), mark_box(page, "current", 0)
        pick_layer(page, explorer, "fc3")
        handle = explorer.locator(".widget-slider", has=page.locator("label", has_text="its weight bits")).locator(
            ".noUi-handle").first
        handle.focus()
        for _ in range(3):  # global -> float -> 1 -> 2 bits
            handle.press("ArrowRight")
        wait_for_fewer_bits(page, 2, 0.6, "fc3", before)
        shoot(explorer, "voila-model")
        page.close()
    _assert_offline_and_clean(browser, its_own)


def _assert_offline_and_clean(browser, its_own: set[str]) -> None:
    """Voila's own page template asks CDNs for Font Awesome and MathJax; offline those fail and the app
    works without them. Nothing else may leave 127.0.0.1, and nothing else may log an error."""
    theirs = re.compile(r"fontawesome|mathjax")
    assert [u for u in browser.blocked if not theirs.search(u)] == [], browser.blocked
    assert [e for e in browser.console_errors if not _failed_load(e) and _first_line(e) not in its_own] == [], \
        browser.console_errors


def _failed_load(message: str) -> bool:
    return "net::ERR_FAILED" in message  # what an aborted (blocked) request logs; a local 404 still fails
