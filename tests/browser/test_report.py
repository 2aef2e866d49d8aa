"""An HTML report made by `jupyter nbconvert --execute --to html` shows every qviz chart with no kernel and no
network; a view saved with explorer.save("view.html") renders on its own."""

import shutil
import subprocess
import sys

import pytest
from harness import Browser

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from harness import ROOT

    work = tmp_path_factory.mktemp("report")
    shutil.copy(ROOT / "notebooks" / "06_reports.ipynb", work / "report.ipynb")
    env_cache = tmp_path_factory.mktemp("cache")
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--execute", "--to", "html", "report.ipynb"],
                   cwd=work, check=True, env={**__import__("os").environ, "QVIZ_CACHE_DIR": str(env_cache)},
                   capture_output=True, timeout=600)
    return work


def test_every_explorer_saved_every_format(report):
    magic = {".png": b"\x89PNG", ".svg": b"<svg", ".pdf": b"%PDF", ".html": b"<!DOCTYPE html>"}
    for name in ("quantizer", "weights", "decision", "kernels"):
        for suffix, head in magic.items():
            data = (report / "figures" / f"{name}{suffix}").read_bytes()
            assert data.lstrip()[:len(head)].lower() == head.lower() and len(data) > 2000, (name, suffix)


def test_every_chart_of_the_report_renders_offline(report):
    with Browser() as browser:
        page = browser.new_page()
        page.goto((report / "report.html").as_uri())
        page.wait_for_load_state("load")
        snapshots = page.evaluate("""() => [...document.querySelectorAll('.qviz-snapshot img')].map(img => ({
            width: img.naturalWidth, visible: getComputedStyle(img.closest('.qviz-snapshot')).display !== 'none'}))""")
        assert len(snapshots) == 2  # the quantizer explorer and the kernel readout
        assert all(s["width"] > 300 and s["visible"] for s in snapshots)
        # the saved PNG shown with IPython.display.Image
        images = page.evaluate("() => [...document.querySelectorAll('img')].map(i => i.naturalWidth)")
        assert len([w for w in images if w > 300]) >= 3
        # the saved HTML view in its iframe draws the staircase with Vega, inlined in the file
        frame = next(f for f in page.frames if f.url.endswith("quantizer.html"))
        frame.wait_for_selector("svg g.mark-line", timeout=20_000)
        assert frame.locator("svg g.mark-rule").count() > 0
        page.screenshot(path=str(report / "report.png"), full_page=True)
    outside = [u for u in browser.blocked if not u.startswith(("https://cdnjs.cloudflare.com", "https://unpkg.com",
                                                               "https://cdn.jsdelivr.net"))]
    assert outside == []  # only nbconvert's own template asked the network for anything (and got nothing)
