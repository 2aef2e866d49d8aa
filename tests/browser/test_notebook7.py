"""The explorers in Notebook 7 (`python -m notebook`), in headless Chromium, offline: run the notebook
from its menu, drag a slider with the mouse (arrow keys do not move sliders there), click a chart, and
the charts redraw with no console error and no request leaving 127.0.0.1."""

import re

import pytest
from harness import (
    Browser,
    JupyterLab,
    mark_box,
    marks,
    model_explorer_ready,
    pick_layer,
    run_all_cells,
    shoot,
    wait_for_fewer_bits,
    wait_until,
    write_notebook,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CELLS = ["import qviz\nq = qviz.QuantizerExplorer(bits=2)\nq",
         "from qviz.engine.sweep import SweepResult\n"
         "rows = [{'width': w, 'w_bits': b, 'acc_quant': 0.5 + w / 1000 + b / 20, 'status': 'ok'}\n"
         "        for w in (64, 128) for b in (1, 2, 4)]\n"
         "s = qviz.SweepExplorer(SweepResult(rows, [{'width': r['width'], 'w_bits': r['w_bits']} for r in rows]))\ns"]
# A practitioner's own network: an MLP on the digits, trained for a few epochs in the notebook
MODEL_CELLS = ["import torch\nfrom torch import nn\nimport qviz\nfrom qviz.engine import fit\n"
               "from qviz.engine.data import digits\n"
               "class MLP(nn.Module):\n"
               "    def __init__(self):\n"
               "        super().__init__()\n"
               "        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 10)\n"
               "    def forward(self, x):\n"
               "        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))\n"
               "X, y, X_test, y_test = digits(0)\ntorch.manual_seed(0)\nnet = fit(MLP(), X, y, epochs=5)\n"
               "m = qviz.ModelExplorer(net, (X_test, y_test))\nm"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebook7")
    write_notebook(root / "explorers.ipynb", CELLS)
    write_notebook(root / "model.ipynb", MODEL_CELLS)
    write_notebook(root / "plain.ipynb", ["print('no widgets here')"])
    with JupyterLab(root, env={"QVIZ_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}, app="notebook") as nb:
        yield nb


def _kernel_idle(server) -> bool:
    kernels = server.kernels()
    return bool(kernels) and all(k["execution_state"] == "idle" for k in kernels)


def _run_all(page, server) -> None:
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    wait_until(page, lambda: _kernel_idle(server), "an idle kernel")  # Notebook 7 has no "| Idle" status bar
    run_all_cells(page)


def _drag_to_end(page, slider) -> None:
    _drag_to(page, slider, 1.0, beyond=20)


def _drag_to(page, slider, fraction: float, beyond: float = 0.0) -> None:
    """Drag the slider's handle with the mouse to `fraction` of its track (plus `beyond` pixels)."""
    track = slider.locator(".noUi-base").first.bounding_box()
    handle = slider.locator(".noUi-handle").first.bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * fraction + beyond, handle["y"] + handle["height"] / 2, steps=8)
    page.mouse.up()


def _front_end_errors(browser, server) -> set[str]:
    """What Notebook 7 logs by itself on a notebook without widgets (7.6.5 with JupyterLab 4.6 reports a
    settings schema it cannot read): those are not qviz's."""
    page = browser.new_page()
    page.goto(f"{server.base}/notebooks/plain.ipynb?token={server.token}", timeout=120_000)
    _run_all(page, server)
    page.wait_for_timeout(2000)
    page.close()
    return {e.split("\n", 1)[0] for e in browser.console_errors}


def test_explorers_run_and_follow_the_mouse_in_notebook_7(server):
    with Browser() as browser:
        its_own = _front_end_errors(browser, server)
        page = browser.new_page()
        page.goto(f"{server.base}/notebooks/explorers.ipynb?token={server.token}", timeout=120_000)
        _run_all(page, server)
        quantizer, sweep = page.locator(".qviz-explorer").nth(0), page.locator(".qviz-explorer").nth(1)
        wait_until(page, lambda: marks(page, "levels") == 4, "4 levels at 2 bits")
        bits = quantizer.locator(".widget-slider", has=page.locator("label", has_text=re.compile("^bits$")))
        _drag_to_end(page, bits)
        wait_until(page, lambda: marks(page, "levels") == 256, "256 levels after dragging bits to 8")
        assert quantizer.locator(".widget-readout").first.inner_text().strip() == "8"
        # a click on a heat-map cell shows that run (the chart reports clicks back to the kernel)
        wait_until(page, lambda: marks(page, "cells") == 6, "2 x 3 heat-map cells")
        sweep.locator(".qviz-chart svg g[class*='cells'] path").nth(3).click()  # width 128, 2-bit weights
        wait_until(page, lambda: sweep.get_by_text("width=128, w_bits=2").count() > 0,
                   "the clicked run below the chart")
        shoot(quantizer, "notebook7")
        page.close()
    assert browser.blocked == [], browser.blocked
    assert [e for e in browser.console_errors if e.split("\n", 1)[0] not in its_own] == [], browser.console_errors


def test_model_explorer_follows_a_dropdown_and_a_dragged_slider_in_notebook_7(server):
    """A practitioner's network in Notebook 7: pick a layer in the menu, drag its weight bits to 1 bit
    with the mouse, and its weight-SQNR bar shrinks and the Pareto chart's mark moves to fewer bytes."""
    with Browser() as browser:
        its_own = _front_end_errors(browser, server)
        page = browser.new_page()
        page.goto(f"{server.base}/notebooks/model.ipynb?token={server.token}", timeout=120_000)
        _run_all(page, server)
        explorer = model_explorer_ready(page, 3)
        before = mark_box(page, "weight_sqnr", 1), mark_box(page, "current", 0)
        pick_layer(page, explorer, "fc2")
        bits = explorer.locator(".widget-slider", has=page.locator("label", has_text="its weight bits"))
        _drag_to(page, bits, 2 / 8)  # global, float, 1, 2, 3, 4, 5, 6, 8: the third stop is 1 bit
        wait_until(page, lambda: bits.locator(".widget-readout").first.inner_text().strip() == "1",
                   "the slider at 1 bit")
        wait_for_fewer_bits(page, 1, 0.5, "fc2", before)
        shoot(explorer, "notebook7-model")
        page.close()
    assert browser.blocked == [], browser.blocked
    assert [e for e in browser.console_errors if e.split("\n", 1)[0] not in its_own] == [], browser.console_errors
