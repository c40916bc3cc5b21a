"""ComfyUI's web frontend in headless Chromium: Debian's system browser driven by playwright.

Nothing is downloaded: playwright is only the driver, the browser is ``/usr/bin/chromium`` (or
``$CHROMIUM``). Each session gets a fresh profile directory.

Works with the frontends of the hosts the pack is tested on (1.32 with ComfyUI 0.3.75, 1.45 with
0.28). The helpers here and the browser tests find things as a user does, by labels, roles and
visible text; they read the graph through ``window.app``, the frontend's API for extensions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import urllib.request

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# The frontend's first-run dialogs (template browser, tours) and its missing-model/node dialogs (the
# examples name model files this server does not have) would cover the canvas.
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                  "Comfy.Workflow.ShowMissingNodesWarning": False}
# Ready: the graph exists and the start-up workflow is restored. Frontend 1.45 restores it after
# ``app.graph`` exists, behind a page-wide busy mask (PrimeVue BlockUI) that swallows clicks.
READY_JS = ("() => !!(window.app && window.app.graph && window.app.canvas && document.querySelector('#graph-canvas')) "
            "&& window.app.vueAppReady !== false && !document.querySelector('.p-blockui-mask') "
            "&& (window.app.extensionManager?.workflow === undefined || !!window.app.extensionManager.workflow.activeWorkflow)")


def chromium_path() -> str | None:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


def available() -> str | None:
    """Why the browser cannot be used here, or None when it can."""
    if chromium_path() is None:
        return "no system Chromium (apt-get install chromium, or set $CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None


def set_setting(server_url: str, key: str, value) -> None:
    """A frontend setting, stored by the server (read by the page when it loads)."""
    req = urllib.request.Request(f"{server_url}/settings/{key}", data=json.dumps(value).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()


def quiet_first_run(server_url: str) -> None:
    for key, value in QUIET_SETTINGS.items():
        set_setting(server_url, key, value)


@contextlib.contextmanager
def open_comfy(server_url: str, viewport=None, timeout_ms: int = 60000):
    """A page with ComfyUI's frontend loaded and its graph ready; ``page.console`` collects messages."""
    from playwright.sync_api import sync_playwright

    quiet_first_run(server_url)
    profile = tempfile.mkdtemp(prefix="tlora-chromium-")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
                viewport=viewport or {"width": 1400, "height": 900})
            try:
                page = ctx.new_page()
                page.set_default_timeout(timeout_ms)
                page.console = []
                page.on("console", lambda m: page.console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: page.console.append(f"pageerror: {e}"))
                page.goto(server_url)
                wait_ready(page)
                yield page
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def wait_ready(page) -> None:
    """Wait until the frontend has started and restored its workflow (after a load or reload)."""
    page.wait_for_function(READY_JS)


def set_ui_setting(page, key: str, value) -> None:
    """Change a setting in the running page, as its settings dialog does (applied at once, and stored)."""
    page.evaluate("async ([k, v]) => { await app.extensionManager.setting.set(k, v); }", [key, value])


def new_graph(page) -> None:
    """An empty graph on the canvas."""
    page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")
    page.wait_for_function("app.graph._nodes.length === 0")
