"""Every explorer in real JupyterLab, in headless Chromium, offline: keys and mouse move the sliders and the
charts redraw to the right content. No console errors; no request leaves 127.0.0.1. Screenshots of each
explorer are kept in test-artifacts/screenshots/."""

import re
import time

import pytest
from harness import (
    ARTIFACTS,
    Browser,
    JupyterLab,
    image_href,
    mark_box,
    marks,
    open_and_run,
    wait_until,
    write_notebook,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NOTEBOOKS = {
    "quantizer": ["import qviz\nq = qviz.QuantizerExplorer(bits=2)\nq"],
    "weights": ["import qviz\nfrom qviz.engine import Schedule, float_model\n"
                "model = float_model(32, 3, batchnorm=True, schedule=Schedule(steps=300, batch_size=512))\n"
                "w = qviz.WeightExplorer(model)\nw"],
    "decision": ["import qviz\nd = qviz.DecisionMapExplorer(width=64, depth=4, resolution=100)\nd"],
    "kernels": ["import qviz\nk = qviz.KernelReadout()\nk.out_features.value, k.in_features.value = 1024, 1024\n"
                "k.budget.value = 0.1\nk.wait()\nk"],
    # 256-6 is in no other test: its float model trains for half a minute, which the next cell must not wait for
    "training": ["import qviz\nd = qviz.DecisionMapExplorer(width=256, depth=6, resolution=60)\nd",
                 "print('next cell ran while the float model trained:', d.float_model is None)"],
    "model": ["import torch\nfrom torch import nn\nimport qviz\nfrom qviz.engine import fit\n"
              "from qviz.engine.data import digits\n"
              "class CNN(nn.Module):\n"
              "    def __init__(self):\n"
              "        super().__init__()\n"
              "        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)\n"
              "        self.fc1, self.fc2 = nn.Linear(16 * 16, 32), nn.Linear(32, 10)\n"
              "    def forward(self, x):\n"
              "        h = torch.relu(self.conv1(x.reshape(-1, 1, 8, 8)))\n"
              "        h = torch.max_pool2d(torch.relu(self.conv2(h)), 2)\n"
              "        return self.fc2(torch.relu(self.fc1(h.flatten(1))))\n"
              "X, y, X_test, y_test = digits(0)\ntorch.manual_seed(0)\nnet = fit(CNN(), X, y, epochs=10)\n"
              "m = qviz.ModelExplorer(net, (X_test, y_test))\nm"],
    "sweep": ["import qviz\nfrom qviz.engine.sweep import grid, run_sweep\n"
              "result = run_sweep(grid(width=[64, 128], w_bits=[1, 2, None], depth=4, method='ptq', resolution=64),\n"
              "                   'semicircles', executor='serial', progress=False)\n"
              "s = qviz.SweepExplorer(result)\ns"],
}
SHOTS = ARTIFACTS / "screenshots"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    for name, cells in NOTEBOOKS.items():
        write_notebook(root / f"{name}.ipynb", cells)
    cache = tmp_path_factory.mktemp("cache")
    with JupyterLab(root, env={"QVIZ_CACHE_DIR": str(cache)}) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b
    # the whole module: nothing but 127.0.0.1 was asked for, and the console stayed clean
    assert b.blocked == [], f"requests outside 127.0.0.1: {b.blocked[:5]}"
    assert b.console_errors == [], f"browser console errors: {b.console_errors[:5]}"


def _open(browser, lab, name):
    page = browser.new_page()
    open_and_run(page, lab, f"{name}.ipynb", f"test-{name}-{int(time.time())}")
    no = page.get_by_role("button", name="No", exact=True)
    if no.count():
        no.first.click()  # JupyterLab's "get notified about news?" prompt
    page.wait_for_selector(".qviz-chart svg", timeout=120_000)
    return page


def _slider(page, label):
    return page.locator(".qviz-explorer .widget-slider", has=page.locator("label", has_text=re.compile(f"^{label}$")))


def _press(page, label, key, times=1):
    handle = _slider(page, label).locator(".noUi-handle").first
    handle.focus()
    for _ in range(times):
        handle.press(key)


def _choose(page, label, option_prefix):
    """Pick the option whose text starts with `option_prefix` in the dropdown labelled `label`."""
    select = page.locator(".qviz-explorer .widget-dropdown", has=page.locator("label", has_text=re.compile(
        f"^{label}$"))).locator("select").first
    texts = select.locator("option").all_inner_texts()
    select.select_option(label=next(t for t in texts if t.startswith(option_prefix)))


def _settledmark_box(page, locator):
    box = locator.bounding_box()
    for _ in range(50):
        page.wait_for_timeout(100)
        now = locator.bounding_box()
        if now == box:
            return now
        box = now
    raise AssertionError("the element kept moving for 5 s")


def _wait_for(page, predicate, timeout=60.0, what="", state=None):
    return wait_until(page, predicate, what, timeout, state)


def _quantizer_state(page):
    readout = _slider(page, "bits").locator(".widget-readout").first.inner_text()
    titles = page.locator(".qviz-chart svg text", has_text="levels").all_text_contents()
    return f"bits slider at {readout!r}, {marks(page, 'levels')} level marks, titles {titles}"


def _shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.mouse.move(1, 1)
    # a tooltip opened by a click outlives the redrawn mark it belonged to: keep it out of the picture
    page.add_style_tag(content="#vg-tooltip-element{visibility:hidden !important}")
    explorer = page.locator(".qviz-explorer").first
    explorer.scroll_into_view_if_needed()
    box, viewport = explorer.bounding_box(), page.viewport_size
    if box and box["y"] + box["height"] + 40 > viewport["height"]:  # the notebook panel clips a tall explorer
        page.set_viewport_size({"width": viewport["width"], "height": int(box["y"] + box["height"] + 80)})
    page.wait_for_timeout(300)
    explorer.screenshot(path=str(SHOTS / f"{name}.png"))


def test_quantizer_staircase_has_2_to_the_bits_levels(lab, browser):
    page = _open(browser, lab, "quantizer")
    _wait_for(page, lambda: marks(page, "levels") == 4, what="4 levels at 2 bits")
    assert marks(page, "staircase") == 1
    _press(page, "bits", "ArrowRight")  # keyboard: 2 -> 3 bits
    _wait_for(page, lambda: marks(page, "levels") == 8, what="8 levels at 3 bits")
    title = page.locator(".qviz-chart svg text", has_text="3 bits: 8 levels")
    assert title.count() == 1
    # mouse: drag the bits handle to the right end of its track (8 bits). The key press animates the
    # handle to its new place; grabbing it mid-animation would miss it, so wait until it stands still.
    track = _slider(page, "bits").locator(".noUi-base").first.bounding_box()
    handle = _settledmark_box(page, _slider(page, "bits").locator(".noUi-handle").first)
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] + 20, handle["y"] + handle["height"] / 2, steps=8)
    page.mouse.up()
    _wait_for(page, lambda: marks(page, "levels") == 256, what="256 levels at 8 bits",
              state=lambda: _quantizer_state(page))
    _choose(page, "scheme", "ternary")
    _wait_for(page, lambda: marks(page, "levels") == 3, what="3 ternary levels")
    _shot(page, "quantizer")
    # a burst of key presses ends on the last value
    _choose(page, "scheme", "affine")
    _press(page, "bits", "ArrowLeft", times=30)  # down to 1 bit, many presses past the end
    _wait_for(page, lambda: marks(page, "levels") == 2, what="2 levels after a burst of keys")
    page.close()


def test_weight_explorer_levels_follow_bits(lab, browser):
    page = _open(browser, lab, "weights")
    _wait_for(page, lambda: marks(page, "levels") == 15, timeout=120, what="15 levels (4-bit narrow symmetric)")
    assert marks(page, "weights") > 10 and marks(page, "sqnr") > 0 and marks(page, "power") > 0
    _press(page, "bits", "ArrowRight")
    _wait_for(page, lambda: marks(page, "levels") == 31, what="31 levels at 5 bits")
    page.locator(".qviz-explorer .widget-toggle-button", has_text="per-channel").click()
    _wait_for(page, lambda: page.locator(".qviz-explorer .widget-html-content", has_text="per-channel").count() > 0,
              what="the per-channel summary")
    _shot(page, "weights")
    page.close()


def test_decision_map_changes_when_width_changes(lab, browser):
    page = _open(browser, lab, "decision")
    _wait_for(page, lambda: image_href(page, "float_map"), timeout=120, what="the float map")
    before_float, before_quant = image_href(page, "float_map"), image_href(page, "quant_map")
    assert before_float.startswith("data:image/png;base64,")
    assert marks(page, "quant_map") == 1 and marks(page, "difference") == 1
    _press(page, "width", "ArrowRight")  # 64 -> 128: another float model, another map
    _wait_for(page, lambda: image_href(page, "float_map") not in (None, before_float), timeout=120,
              what="a new float map after the width changed")
    assert image_href(page, "quant_map") != before_quant
    _wait_for(page, lambda: page.locator(".qviz-chart svg text", has_text=re.compile(r"^float: \d")).count() == 1,
              what="the float map's accuracy in its title")
    _shot(page, "decision")
    page.close()


def test_kernel_readout_bytes_change_with_bits(lab, browser):
    page = _open(browser, lab, "kernels")

    def summary():
        texts = page.locator(".qviz-explorer .widget-html-content").all_inner_texts()
        return next((t for t in texts if t.startswith("packed")), "")

    first = _wait_for(page, lambda: "runs" in summary() and summary(), timeout=60, what="the timed readout")
    assert "packed 524,288 B" in first  # 1024 x 1024 weights at 4 bits
    _choose(page, "bits", "2")
    _wait_for(page, lambda: "packed 262,144 B" in summary(), what="half the bytes at 2 bits")
    _wait_for(page, lambda: "runs" in summary(), what="the latency at 2 bits")
    assert marks(page, "memory") == 3 and marks(page, "latency") == 2
    _shot(page, "kernels")
    page.close()


def test_sweep_heatmap_click_shows_that_run(lab, browser):
    page = _open(browser, lab, "sweep")
    _wait_for(page, lambda: marks(page, "cells") == 6, timeout=120, what="2 x 3 heat-map cells")
    assert page.locator(".qviz-explorer", has_text="click a cell").count() == 1
    # the cell of width 128 and 2-bit weights: rows are w_bits (1, 2, float), columns width (64, 128); the
    # float models are the decision test's, from the cache
    cell = page.locator('.qviz-chart svg g[class*="cells"] path').nth(3)
    cell.click()
    _wait_for(page, lambda: page.locator(".qviz-explorer svg text", has_text=re.compile(r"^quantized: \d")).count(),
              timeout=60, what="the clicked run's decision maps")
    detail = page.locator(".qviz-explorer svg text", has_text=re.compile("width=")).first.text_content()
    assert "width=128" in detail and "w_bits=2" in detail, detail
    _shot(page, "sweep")
    page.close()


def test_the_cell_after_an_explorer_runs_while_its_float_model_trains(lab, browser):
    page = browser.new_page()
    open_and_run(page, lab, "training.ipynb", f"test-training-{int(time.time())}", timeout_ms=60_000)
    output = page.locator(".jp-OutputArea-output", has_text="next cell ran while the float model trained")
    _wait_for(page, lambda: output.count() == 1, timeout=30, what="the second cell's output")
    assert output.first.inner_text().strip().endswith("True"), output.first.inner_text()
    _wait_for(page, lambda: page.locator(".qviz-explorer", has_text="training float 256-6").count() == 1,
              timeout=30, what="the explorer's training progress")
    page.close()
    lab.shut_down_kernels()  # the 256-6 training would slow every later test


def test_model_explorer_click_a_layer_change_its_bits_and_the_views_redraw(lab, browser):
    page = _open(browser, lab, "model")
    _wait_for(page, lambda: marks(page, "weight_sqnr") == 4, timeout=120, what="one weight-SQNR bar per layer")
    _wait_for(page, lambda: marks(page, "greedy") > 0 and marks(page, "current") == 1, timeout=180,
              what="the Pareto chart with the current mark")
    _wait_for(page, lambda: marks(page, "sensitivity") == 4, timeout=120, what="every layer's sensitivity")
    bar = mark_box(page, "weight_sqnr", 2)  # fc1, the third layer
    mark = mark_box(page, "current", 0)
    page.mouse.click(bar["x"] + bar["width"] / 2, bar["y"] + bar["height"] / 2)  # click fc1's bar
    layer_menu = page.locator(".qviz-explorer .widget-dropdown", has=page.locator("label", has_text="layer"))
    _wait_for(page, lambda: layer_menu.locator("select").first.input_value() == "fc1", timeout=30,
              what="the clicked layer in the layer menu")
    _press(page, "its weight bits", "ArrowRight", times=3)  # global -> float -> 1 -> 2 bits
    _wait_for(page, lambda: (mark_box(page, "weight_sqnr", 2) or bar)["width"] < bar["width"] * 0.5, timeout=60,
              what="fc1's weight SQNR bar shrinking at 2 bits")
    _wait_for(page, lambda: (mark_box(page, "current", 0) or mark)["x"] < mark["x"] - 5, timeout=60,
              what="the Pareto mark moving to fewer bytes")
    _shot(page, "model")
    page.close()
