"""Headless chromium through Playwright: screenshots, and proof that a page draws with no network.

Playwright (`pip install "mechmem[browser]"`) drives the system's chromium (`executable_path`):
nothing is downloaded, `playwright install` is never run. Every request of the browser context
passes a route handler: file:// and data: URLs load, anything else is recorded and aborted (web
sockets too), and what slips past routing meets a dead proxy. A page that needs the network thus
both shows it (its views fail to draw) and names what it asked for.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_SCHEMES = ("file:", "data:")  # all a self-contained page may load
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, a request that reaches it fails
INSTALL_HINT = "install it (`apt-get install chromium`) or set MECHMEM_CHROMIUM to its path"


def find_chromium() -> str:
    """The chromium binary ($MECHMEM_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH)."""
    for name in (os.environ.get("MECHMEM_CHROMIUM"), *CHROMIUM_NAMES):
        if name and (found := shutil.which(name)):
            return found
    raise FileNotFoundError(f"no chromium found: {INSTALL_HINT}")


def browser_missing() -> str | None:
    """Why no page can be checked here (no chromium, or no Playwright), or None when one can."""
    try:
        find_chromium()
    except FileNotFoundError as err:
        return str(err)
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed: pip install 'mechmem[browser]' (or playwright)"
    return None


class Browser:
    """One headless chromium with one browser context whose requests are all routed (see the module)."""

    def __init__(self, *, window: tuple[int, int] = (1280, 2000), timeout: float = 60):
        from playwright.sync_api import sync_playwright

        self.requests: list[str] = []  # every URL the context asked for, pages included
        self.offsite: list[str] = []  # those that would have left the machine (aborted)
        executable = find_chromium()
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=executable, headless=True, args=list(CHROMIUM_ARGS), proxy={"server": DEAD_PROXY},
                timeout=timeout * 1000)
            self.context = self._browser.new_context(viewport={"width": window[0], "height": window[1]},
                                                     service_workers="block")
        except Exception:
            self._playwright.stop()
            raise
        self.context.set_default_timeout(timeout * 1000)
        self.context.route("**/*", self._route)
        self.context.route_web_socket("**/*", self._socket)

    def _route(self, route) -> None:
        url = route.request.url
        self.requests.append(url)
        if url.startswith(LOCAL_SCHEMES):
            route.continue_()
        else:
            self.offsite.append(url)
            route.abort("internetdisconnected")

    def _socket(self, socket) -> None:  # never connected to its server
        self.requests.append(socket.url)
        self.offsite.append(socket.url)
        socket.close()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._browser.close()
        finally:
            self._playwright.stop()

    def open(self, page: str | os.PathLike):
        """A new tab showing a page from disk, once its load event fired (a Playwright `Page`)."""
        path = Path(page).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no page at {path}")
        tab = self.context.new_page()
        tab.goto(path.as_uri(), wait_until="load")
        return tab


# The views' report: per circuitsvis container, its canvases and how many of their pixels carry
# colour (drawn attention cells; the masked triangle is grey, the background white).
_VIEWS_REPORT_JS = """
(() => {
  const coloured = (canvas) => {
    const ctx = canvas.width && canvas.height ? canvas.getContext("2d") : null;
    if (!ctx) return 0;
    const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4)
      if (d[i + 3] > 0 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 40) n++;
    return n;
  };
  return [...document.querySelectorAll(".cv-view")].map((el) => ({
    id: el.id, kind: el.dataset.kind, rendered: el.dataset.rendered || "",
    canvases: el.querySelectorAll("canvas").length,
    coloured: [...el.querySelectorAll("canvas")].reduce((n, c) => n + coloured(c), 0),
  }));
})()"""

# Scroll to each view as a reader would (views draw on sight) and wait until it has drawn; then
# until every view has painted and two looks 300 ms apart agree, or the time is up.
_DRAW_ALL_JS = """async (waitMs) => {
  const t0 = performance.now();
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  for (const el of document.querySelectorAll(".cv-view")) {
    // again and again: views above it that draw meanwhile grow and push it out of sight
    while (!el.dataset.rendered && performance.now() - t0 < waitMs) {
      el.scrollIntoView();
      await sleep(100);
    }
  }
  let before = "";
  for (;;) {
    const views = %s;
    const now = JSON.stringify(views);
    const painted = views.every((v) => v.rendered === "error" || (v.canvases > 0 && v.coloured > 0));
    if ((painted && now === before) || performance.now() - t0 > waitMs) return views;
    before = now;
    await sleep(300);
  }
}""" % _VIEWS_REPORT_JS.strip()  # noqa: UP031  (% keeps the JavaScript's braces single)


@dataclass
class PageCheck:
    """What a page did in a browser with no network."""

    views: list[dict]  # per circuitsvis view: id, kind, rendered ("1" / "error" / ""), canvases, coloured pixels
    requests: list[str] = field(default_factory=list)  # every URL the page requested, itself included
    offsite: list[str] = field(default_factory=list)  # those that would leave the machine (all aborted)

    @property
    def drawn(self) -> bool:
        return bool(self.views) and all(v["rendered"] == "1" and v["coloured"] > 0 for v in self.views)


def check_page(page: str | os.PathLike, *, screenshot: str | os.PathLike | None = None, full_page: bool = False,
               window: tuple[int, int] = (1280, 2000), wait_s: float = 20) -> PageCheck:
    """Open a page offline in headless chromium, wait (up to `wait_s`) until its attention views have
    drawn, and report them with every request it made; optionally save a PNG screenshot."""
    with Browser(window=window, timeout=wait_s + 60) as browser:
        tab = browser.open(page)
        views = tab.evaluate(_DRAW_ALL_JS, int(wait_s * 1000))
        if screenshot is not None:
            tab.evaluate("async () => { window.scrollTo(0, 0); await new Promise((r) => setTimeout(r, 1500)); }")
            tab.screenshot(path=str(screenshot), full_page=full_page, type="png")
        requests, offsite = list(browser.requests), list(browser.offsite)
    return PageCheck(views, requests, sorted(set(offsite)))
