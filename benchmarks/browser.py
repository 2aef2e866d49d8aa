"""Key press on a slider -> redrawn chart, in real JupyterLab and headless Chromium (target <= 250 ms median).

For each explorer, the bits slider's handle gets focus and ArrowRight / ArrowLeft presses alternate; the
time runs from the key press until the chart on the page shows the new value (the number of level
rules, or a new decision-map image). Everything is served from 127.0.0.1; the network is cut.
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
    "decision": ["import qviz\nfrom qviz.engine import float_model\nfloat_model(128, 4)\n"
                 "d = qviz.DecisionMapExplorer(width=128, depth=4)\nd"],
}


def press_and_time(page, label: str, changed, presses: int) -> list[float]:
    handle = page.locator(".qviz-explorer .widget-slider", has=page.locator("label", has_text=label)).locator(
        ".noUi-handle").first
    handle.focus()
    times = []
    for i in range(presses):
        before = changed(None)
        start = time.perf_counter()
        handle.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
        while changed(before) is None:
            page.wait_for_timeout(5)
            if time.perf_counter() - start > 30:
                raise RuntimeError("the chart did not redraw within 30 s")
        times.append(time.perf_counter() - start)
    return times


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
            page.close()
            page = browser.new_page()
            open_and_run(page, lab, "decision.ipynb", f"bench-d-{int(time.time())}")
            page.wait_for_selector(".qviz-chart svg")

            def map_changed(before):
                href = image_href(page, "quant_map")
                return href if before is None or (href and href != before) else None

            d = press_and_time(page, "weight bits", map_changed, presses)
            rows.append(["DecisionMapExplorer 128-4 (cached)", "weight bits", f"{statistics.median(d) * 1e3:.0f}",
                         f"{max(d) * 1e3:.0f}"])
            assert not browser.blocked, browser.blocked
    print(f"key press -> redrawn chart in headless Chromium, {presses} presses each (target <= 250 ms median)\n")
    print(table(rows, ["explorer", "slider", "median ms", "max ms"]))


if __name__ == "__main__":
    main()
