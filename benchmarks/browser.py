"""Key press on a slider -> redrawn chart, in real JupyterLab and headless Chromium.

For each explorer, the bits slider's handle gets focus and ArrowRight / ArrowLeft presses alternate; the
time runs from the key press until the chart on the page shows the new value (the number of level
rules, or a new decision-map image), and for decision maps also until the finished map replaces its
preview. Goals (medians): staircase <= 250 ms; decision maps on a 200x200 grid <= 150 ms (128-4) and
<= 300 ms (256-8) to the first redraw. Everything is served from 127.0.0.1; the network is cut.
Run: .venv/bin/python benchmarks/browser.py [--presses N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "browser"))
sys.path.insert(0, str(Path(__file__).parent))
from _timing import table  # noqa: E402
from harness import Browser, JupyterLab, image_href, marks, open_and_run, write_notebook  # noqa: E402

CELLS = {
    "quantizer": ["import qviz\nq = qviz.QuantizerExplorer(bits=3)\nq"],
    "decision-128-4": ["import qviz\nfrom qviz.engine import float_model\nfloat_model(128, 4)\n"
                       "d = qviz.DecisionMapExplorer(width=128, depth=4, resolution=200)\nd"],
    "decision-256-8": ["import qviz\nfrom qviz.engine import float_model\nfloat_model(256, 8)\n"
                       "d = qviz.DecisionMapExplorer(width=256, depth=8, resolution=200)\nd"],
}
MAP_GOALS = {"decision-128-4": "first <= 150", "decision-256-8": "first <= 300"}


def press_and_time(page, label: str, changed, presses: int, finished=None) -> list[float] | tuple[list, list]:
    """Times from each key press to the first redraw (and, given `finished`, to the redraw after which
    finished() holds: the decision map's preview comes first, its finished map after)."""
    handle = page.locator(".qviz-explorer .widget-slider", has=page.locator("label", has_text=label)).locator(
        ".noUi-handle").first
    handle.focus()
    times, done = [], []
    for i in range(presses):
        before = changed(None)
        start = time.perf_counter()
        handle.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
        while changed(before) is None:
            page.wait_for_timeout(5)
            if time.perf_counter() - start > 30:
                raise RuntimeError("the chart did not redraw within 30 s")
        times.append(time.perf_counter() - start)
        while finished is not None and not finished(before):
            page.wait_for_timeout(5)
            if time.perf_counter() - start > 30:
                raise RuntimeError("the finished map did not come within 30 s")
        done.append(time.perf_counter() - start)
    return times if finished is None else (times, done)


def chart_text(page) -> str:
    return page.evaluate("() => [...document.querySelectorAll('.qviz-chart svg text')].map(t => t.textContent)"
                         ".join(' | ')")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presses", type=int, default=20)
    presses = parser.parse_args().presses
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, cells in CELLS.items():
            write_notebook(root / f"{name}.ipynb", cells)
        with JupyterLab(root, env={"QVIZ_CACHE_DIR": str(root / "cache")}) as lab, Browser() as browser:
            page = browser.new_page()
            open_and_run(page, lab, "quantizer.ipynb", f"bench-q-{int(time.time())}")
            page.wait_for_selector(".qviz-chart svg")

            def levels_changed(before):
                n = marks(page, "levels")
                return n if before is None or n != before else None

            q = press_and_time(page, "bits", levels_changed, presses)
            rows.append(["QuantizerExplorer", "bits", f"{statistics.median(q) * 1e3:.0f}", f"{max(q) * 1e3:.0f}"])
            rows[-1] += ["", "<= 250"]
            for name in ("decision-128-4", "decision-256-8"):
                page.close()
                page = browser.new_page()
                open_and_run(page, lab, f"{name}.ipynb", f"bench-{name}-{int(time.time())}")
                page.wait_for_selector(".qviz-chart svg")

                def map_changed(before, page=page):
                    href = image_href(page, "quant_map")
                    return href if before is None or (href and href != before) else None

                def map_finished(before, page=page):
                    # the finished map's title says "PTQ:", the preview's "PTQ preview:"
                    return "PTQ:" in chart_text(page) and map_changed(before) is not None

                first, done = press_and_time(page, "weight bits", map_changed, presses, map_finished)
                rows.append([f"DecisionMapExplorer {name[9:]} (cached, 200x200)", "weight bits",
                             f"{statistics.median(first) * 1e3:.0f}", f"{max(first) * 1e3:.0f}",
                             f"{statistics.median(done) * 1e3:.0f}", MAP_GOALS[name]])
            assert not browser.blocked, browser.blocked
    print(f"key press -> redrawn chart in headless Chromium, {presses} presses each (medians in ms)\n")
    print(table(rows, ["explorer", "slider", "first redraw", "max", "finished map", "goal"]))


if __name__ == "__main__":
    main()
