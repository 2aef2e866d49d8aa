"""Real JupyterLab on 127.0.0.1 driven by headless system Chromium through Playwright.

Shared by tests/browser and benchmarks/browser.py. Every request the page makes to anything but
127.0.0.1 is aborted and recorded; console errors are recorded too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import nbformat

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path, sources: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


class JupyterLab:
    """A JupyterLab server in its own process, serving `root` on 127.0.0.1 with a token (app="notebook":
    Notebook 7, started as `python -m notebook`)."""

    def __init__(self, root: Path, env: dict | None = None, app: str = "lab"):
        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.app = app
        self.log = root / f"{app}.log"

    def __enter__(self) -> JupyterLab:
        start = [sys.executable, "-m", "notebook" if self.app == "notebook" else "jupyterlab"]
        args = [*start, "--no-browser", "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}"]
        if self.app == "lab":
            args += ["--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-root")  # CI machines and containers run as root
        self.proc = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.app} exited early; see {self.log}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=2)
                return self
            time.sleep(0.3)
        raise RuntimeError(f"{self.app} did not start within 120 s; see {self.log}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, notebook: str, workspace: str) -> str:
        return f"{self.base}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={self.token}"

    def kernels(self, attempts: int = 50) -> list[dict]:
        """The running kernels (`/api/kernels`). jupyter_server lists a kernel a moment before it gives the
        kernel its `last_activity`, and answers 500 to a listing in that window; ask again."""
        for attempt in range(attempts):
            try:
                return json.loads(urllib.request.urlopen(f"{self.base}/api/kernels?token={self.token}",
                                                         timeout=10).read())
            except urllib.error.HTTPError as error:
                if error.code < 500 or attempt == attempts - 1:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def shut_down_kernels(self) -> None:
        for kernel in self.kernels():
            request = urllib.request.Request(f"{self.base}/api/kernels/{kernel['id']}?token={self.token}",
                                             method="DELETE")
            with contextlib.suppress(urllib.error.HTTPError):  # it may have gone by itself meanwhile
                urllib.request.urlopen(request, timeout=30)


class Browser:
    """Headless Chromium (the system's, never a downloaded one) with the network outside 127.0.0.1 cut."""

    def __init__(self):
        self.blocked: list[str] = []
        self.console_errors: list[str] = []

    def __enter__(self) -> Browser:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        self.context = self.browser.new_context(viewport={"width": 1500, "height": 1100})
        self.context.route("**/*", self._route)
        return self

    def _route(self, route) -> None:
        url = urlparse(route.request.url)
        if url.scheme in ("file", "data", "blob") or url.hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def new_page(self):
        page = self.context.new_page()
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console_errors.append(f"page error: {e}"))
        return page

    def __exit__(self, *exc) -> None:
        self.context.close()
        self.browser.close()
        self._pw.stop()


def open_and_run(page, lab: JupyterLab, notebook: str, workspace: str, timeout_ms: int = 240_000) -> None:
    """Open `notebook` in a fresh workspace, run all cells and wait until the kernel is idle."""
    page.goto(lab.url(notebook, workspace), timeout=120_000)
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    # the kernel, not just the page, must be ready: the status bar says "Python 3 (ipykernel) | Idle"
    page.get_by_text(re.compile(r"\| Idle$")).first.wait_for(timeout=120_000)
    run_all_cells(page, timeout_ms)


def run_all_cells(page, timeout_ms: int = 240_000) -> None:
    """Run > Run All Cells from the menu bar (JupyterLab and Notebook 7 share it), and wait until every
    cell has run."""
    started = ("() => [...document.querySelectorAll('.jp-InputArea-prompt')]"
               ".some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))")
    for _ in range(3):  # a click that lands while the page is still settling is lost: try again
        page.locator(".jp-NotebookPanel").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
        try:
            page.wait_for_function(started, timeout=15_000)
            break
        except Exception:
            page.keyboard.press("Escape")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-InputArea-prompt')].every(p => !p.textContent.includes('*'))"
        " && [...document.querySelectorAll('.jp-InputArea-prompt')].some(p => /\\[\\d+\\]/.test(p.textContent))",
        timeout=timeout_ms)


def wait_until(page, predicate, what: str, timeout: float = 120.0, state=None):
    """Poll `predicate` every 100 ms until it returns something true (returned), else fail naming `what`
    and, when given, what `state()` says the page shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        page.wait_for_timeout(100)
    seen = f"; the page shows {state()}" if state else ""
    raise AssertionError(f"timed out waiting for {what}{seen}")


def marks(page, name: str, root: str = ".qviz-chart") -> int:
    """How many items the chart layer called `name` draws (Vega names its SVG group `<name>[_n]_marks`)."""
    return page.evaluate(
        """([root, name]) => {
            const re = new RegExp('(^|\\\\s)' + name + '(_\\\\d+)?_marks(\\\\s|$)');
            const groups = [...document.querySelectorAll(root + ' g')]
                .filter(g => re.test(g.getAttribute('class') || ''));
            const items = ':scope > path, :scope > line, :scope > image';
            return groups.reduce((n, g) => n + g.querySelectorAll(items).length, 0);
        }""", [root, name])


def mark_box(page, name: str, index: int) -> dict | None:
    """The bounding box of the index-th item the chart layer `name` draws."""
    return page.evaluate(
        """([name, index]) => {
            const re = new RegExp('(^|\\\\s)' + name + '(_\\\\d+)?_marks(\\\\s|$)');
            const g = [...document.querySelectorAll('.qviz-chart g')].find(g => re.test(g.getAttribute('class') || ''));
            const item = g && g.querySelectorAll(':scope > path')[index];
            if (!item) return null;
            const b = item.getBoundingClientRect();
            return {x: b.x, y: b.y, width: b.width, height: b.height};
        }""", [name, index])


def shoot(locator, name: str) -> None:
    """A screenshot of `locator` as test-artifacts/screenshots/<name>.png."""
    shots = ARTIFACTS / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    locator.screenshot(path=str(shots / f"{name}.png"))


def model_explorer_ready(page, layers: int, timeout: float = 180.0):
    """Wait until a ModelExplorer shows a weight-SQNR bar per layer and the Pareto chart with its mark;
    returns the explorer's locator."""
    wait_until(page, lambda: marks(page, "weight_sqnr") == layers, "one weight-SQNR bar per layer", timeout)
    wait_until(page, lambda: marks(page, "greedy") > 0 and marks(page, "current") == 1,
               "the Pareto chart with the current mark", timeout)
    return page.locator(".qviz-explorer").first


def pick_layer(page, explorer, name: str) -> None:
    explorer.locator(".widget-dropdown", has=page.locator("label", has_text=re.compile("^layer$"))).locator(
        "select").first.select_option(name)


def wait_for_fewer_bits(page, index: int, shrink: float, what: str, before: tuple) -> None:
    """After a layer's weight bits went down: its weight-SQNR bar (`index`) shrinks below `shrink` of its
    width `before`, and the Pareto chart's mark moves to fewer bytes (left)."""
    bar, mark = before
    wait_until(page, lambda: (mark_box(page, "weight_sqnr", index) or bar)["width"] < bar["width"] * shrink,
               f"{what}'s weight SQNR bar shrinking", 60)
    wait_until(page, lambda: (mark_box(page, "current", 0) or mark)["x"] < mark["x"] - 2,
               "the Pareto mark moving to fewer bytes", 60)


def image_href(page, name: str, root: str = ".qviz-chart") -> str | None:
    return page.evaluate(
        """([root, name]) => {
            const re = new RegExp('(^|\\\\s)' + name + '(_\\\\d+)?_marks(\\\\s|$)');
            const g = [...document.querySelectorAll(root + ' g')].find(g => re.test(g.getAttribute('class') || ''));
            const img = g && g.querySelector('image');
            return img ? (img.getAttribute('href') || img.getAttribute('xlink:href')) : null;
        }""", [root, name])


def status_text(page, root: str = ".qviz-explorer") -> str:
    return page.locator(f"{root} .widget-html-content").all_inner_texts()[-2] if page.locator(
        f"{root} .widget-html-content").count() >= 2 else ""
