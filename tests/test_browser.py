"""ComfyUI's real web frontend, served by the real server, in headless Chromium (Debian's, via playwright).

The T-LoRA nodes are found in the node search, a T-LoRA Schedule node draws its rank curve, and
editing alpha in the UI redraws it; the example workflows load in the frontend and turn into the
prompts they are meant to be. Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import re

import pytest

from devkit import browser, workflows as wfs
from devkit.host import ROOT, pack_module

pytestmark = [pytest.mark.server, pytest.mark.browser]

ARTIFACTS = ROOT / "test-artifacts"

why_not = browser.available()
if why_not:
    pytest.skip(f"browser tests need {why_not}", allow_module_level=True)

# screen coordinates of a widget of the first node (its middle), from LiteGraph's canvas transform
WIDGET_XY = """(name) => {
    const n = app.graph._nodes[0], w = n.widgets.find(x => x.name === name);
    const r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
    return [r.left + (n.pos[0] + n.size[0] / 2 + ds.offset[0]) * ds.scale,
            r.top + (n.pos[1] + w.y + 10 + ds.offset[1]) * ds.scale];
}"""
# the curve's y (canvas pixels) at a fraction of its width: the topmost pixel of the line colour
CURVE_Y = """(frac) => {
    const c = document.querySelector('canvas.tlora-curve'), ctx = c.getContext('2d');
    const dpr = window.devicePixelRatio || 1, x = Math.round((30 + (c.clientWidth - 40) * frac) * dpr);
    const px = ctx.getImageData(x, 0, 1, c.height).data;
    for (let y = 0; y < c.height; y++) {
        const [r, g, b] = [px[4 * y], px[4 * y + 1], px[4 * y + 2]];
        if (Math.abs(r - 90) < 20 && Math.abs(g - 170) < 20 && b > 230) return y / dpr;
    }
    return null;
}"""


@pytest.fixture(scope="module")
def page(comfy_server):
    with browser.open_comfy(comfy_server.url) as page:
        yield page


def open_number_editor(page, widget: str):
    """Double-click a number widget the way a user does; returns its text editor."""
    editor = page.locator("input.value")
    for _ in range(3):  # the canvas may still be settling right after a node is added
        x, y = page.evaluate(WIDGET_XY, widget)
        page.mouse.move(x, y)
        page.wait_for_timeout(200)
        page.mouse.dblclick(x, y)
        try:
            editor.wait_for(timeout=3000)
            return editor
        except Exception:
            print("editor did not open, retrying")
            page.mouse.click(300, 800)  # click the empty canvas, try again
    page.screenshot(path=str(ARTIFACTS / "browser_failure.png"))
    raise AssertionError(f"double-clicking {widget} opened no editor")


def search_nodes(page, text: str):
    """Open the node search the way a user does (double-click the empty canvas) and type ``text``
    once its input has focus (keys typed before that are lost on a slow machine); the options."""
    options = page.get_by_role("option").filter(has_text=re.compile(re.escape(text)))
    for _ in range(3):
        page.mouse.dblclick(700, 450)
        try:
            page.wait_for_function("document.activeElement && document.activeElement.tagName === 'INPUT'",
                                   timeout=10000)
            page.keyboard.type(text)
            options.first.wait_for(timeout=15000)
            return options
        except Exception:
            print("node search did not open or found nothing, retrying")
            page.keyboard.press("Escape")
            page.mouse.click(300, 800)
    page.screenshot(path=str(ARTIFACTS / "browser_failure.png"))
    raise AssertionError(f"the node search found no {text!r} node")


def curve_state(page) -> dict:
    return page.evaluate("""() => { const c = document.querySelector('canvas.tlora-curve');
        return c && {ranks: JSON.parse(c.dataset.ranks || '[]'), draws: +c.dataset.drawCount,
                     png: c.toDataURL(), shown: c.getBoundingClientRect().height > 50}; }""")


def test_find_add_and_edit_the_schedule_node(page):
    core = pack_module("tlora_core.schedule")
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")

    # node search: double-click the empty canvas, type, see all three nodes
    options = search_nodes(page, "T-LoRA")
    texts = [t.split("\n")[0].strip() for t in options.all_inner_texts()]
    assert {"T-LoRA Loader", "T-LoRA Schedule", "T-LoRA Schedule Preview"} <= set(texts), texts
    page.get_by_role("option").filter(has_text=re.compile(r"^T-LoRA\s+Schedule\s*loaders")).first.click()
    assert page.evaluate("app.graph._nodes.map(n => n.type)") == ["TLoraSchedule"]

    # the curve is drawn, with the trainers' ranks (max_rank 0 draws a nominal rank 64)
    page.wait_for_function("document.querySelector('canvas.tlora-curve')?.dataset.ranks")
    before = curve_state(page)
    assert before["shown"]
    nominal = core.Schedule(max_rank=64, min_rank=1, alpha=1.0)
    assert before["ranks"] == [r for _, r in core.rank_table(nominal)] == [64, 48, 32, 16, 1]
    y_mid_before = page.evaluate(CURVE_Y, 0.5)

    # change alpha as a user does: double-click the widget, type, Enter
    editor = open_number_editor(page, "alpha")
    editor.fill("3")
    editor.press("Enter")
    page.wait_for_function("app.graph._nodes[0].widgets.find(w => w.name === 'alpha').value === 3")
    page.wait_for_function(f"+document.querySelector('canvas.tlora-curve').dataset.drawCount > {before['draws']}")
    after = curve_state(page)
    steep = core.Schedule(max_rank=64, min_rank=1, alpha=3.0)
    assert after["ranks"] == [r for _, r in core.rank_table(steep)] != before["ranks"]
    assert after["png"] != before["png"]
    # at mid-sampling the curve dropped from rank 32 to rank 8: its line is lower in the pixels
    y_mid_after = page.evaluate(CURVE_Y, 0.5)
    assert y_mid_before is not None and y_mid_after is not None and y_mid_after > y_mid_before + 10

    # the value reaches the prompt the frontend queues
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    (node,) = prompt.values()
    assert node["class_type"] == "TLoraSchedule" and node["inputs"]["alpha"] == 3
    assert "rank_curve" not in node["inputs"]  # the drawing is not a value

    box = page.evaluate("""() => { const n = app.graph._nodes[0], r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
        return {x: r.left + (n.pos[0] + ds.offset[0]) * ds.scale - 20, y: r.top + (n.pos[1] - 40 + ds.offset[1]) * ds.scale,
                width: (n.size[0] + 40) * ds.scale, height: (n.size[1] + 60) * ds.scale}; }""")
    page.screenshot(path=str(ARTIFACTS / "browser_tlora_schedule.png"), clip=box)
    page.screenshot(path=str(ARTIFACTS / "browser_full.png"))
    assert not [m for m in page.console if "pageerror" in m or "tlora" in m.lower() and m.startswith("error")]


@pytest.mark.parametrize("name", ["sdxl_tlora_txt2img", "flux_tlora_txt2img", "tlora_vs_plain_lora"])
def test_examples_load_in_the_frontend(page, comfy_server, name):
    wf = json.loads((wfs.EXAMPLES / f"{name}.json").read_text())
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, false); }", wf)
    loaded = page.evaluate("() => app.graph._nodes.map(n => [n.id, n.type, !!LiteGraph.registered_node_types[n.type]])")
    assert len(loaded) == len(wf["nodes"]) and all(ok for _, _, ok in loaded), loaded
    assert page.evaluate("() => app.graph.links.size ?? Object.keys(app.graph.links).length") == len(wf["links"])

    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    # the frontend reads every widget value as the workflow means it (the validator's reading)
    object_info = comfy_server.get("/object_info")
    for node in wf["nodes"]:
        if node["type"] in wfs.VIRTUAL or node["mode"] == wfs.MODE_BYPASS:
            assert str(node["id"]) not in prompt
            continue
        slots = wfs.widget_slots(object_info[node["type"]])
        meant = {s[0]: v for s, v in zip(slots, node["widgets_values"]) if not s[0].endswith(":control")}
        got = prompt[str(node["id"])]["inputs"]
        assert {k: got.get(k) for k in meant} == meant, node["type"]
    loaders = [n for n in prompt.values() if n["class_type"] == "TLoraLoader"]
    assert len(loaders) == 1
    inputs = loaders[0]["inputs"]
    assert inputs["lora_name"].endswith("_tlora.safetensors") and inputs["strength_model"] == 1.0
    assert isinstance(inputs["model"], list)  # linked
    if name == "flux_tlora_txt2img":
        # the bypassed schedule is left out: the loader runs on the file's own settings
        assert "schedule" not in inputs and not any(n["class_type"] == "TLoraSchedule" for n in prompt.values())
    previews = [n for n in prompt.values() if n["class_type"] == "TLoraSchedulePreview"]
    if previews:
        assert previews[0]["inputs"]["sampler_name"] == "euler" and previews[0]["inputs"]["denoise"] == 1.0
    page.screenshot(path=str(ARTIFACTS / f"browser_{name}.png"))


def test_curve_in_the_nodes_2_0_renderer(page, comfy_server):
    """The frontend's experimental Vue node renderer ("Nodes 2.0") shows and redraws the curve too."""
    core = pack_module("tlora_core.schedule")
    browser.set_setting(comfy_server.url, "Comfy.VueNodes.Enabled", True)
    try:
        page.reload()
        page.wait_for_function("window.app && window.app.graph && window.app.canvas")
        page.evaluate("""() => { app.graph.clear(); const n = LiteGraph.createNode('TLoraSchedule');
                                 n.pos = [300, 200]; app.graph.add(n); app.canvas.setDirty(true, true); }""")
        page.wait_for_function("document.querySelector('canvas.tlora-curve')?.dataset.ranks")
        field = page.locator('input[aria-label="alpha"]')
        field.click()
        page.keyboard.press("Control+a")
        page.keyboard.type("3")
        page.mouse.click(900, 750)
        want = [r for _, r in core.rank_table(core.Schedule(max_rank=64, min_rank=1, alpha=3.0))]
        try:
            page.wait_for_function(f"document.querySelector('canvas.tlora-curve').dataset.ranks === '{json.dumps(want, separators=(',', ':'))}'",
                                   timeout=10000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "browser_failure.png"))
            raise AssertionError(page.evaluate("[app.graph._nodes[0].widgets.find(w => w.name === 'alpha').value, document.querySelector('canvas.tlora-curve').dataset.ranks]"))
        page.screenshot(path=str(ARTIFACTS / "browser_nodes_2_0.png"))
    finally:
        browser.set_setting(comfy_server.url, "Comfy.VueNodes.Enabled", False)
        page.reload()
        page.wait_for_function("window.app && window.app.graph && window.app.canvas")


def test_examples_are_in_the_template_browser(page):
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.get_by_text("ComfyUI-TLoRA", exact=True).first.click()
    for name in ("sdxl_tlora_txt2img", "flux_tlora_txt2img", "tlora_vs_plain_lora"):
        page.get_by_text(name, exact=True).first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "browser_templates.png"))
    page.get_by_text("flux_tlora_txt2img", exact=True).first.click()  # opening one loads it
    page.wait_for_function("app.graph._nodes.some(n => n.type === 'TLoraLoader') && "
                           "app.graph._nodes.some(n => n.type === 'UNETLoader')")
    page.keyboard.press("Escape")


def test_widget_formula_is_the_trainers(page):
    """The widget's JavaScript rank formula agrees with tlora_core.schedule on many settings."""
    import random

    core = pack_module("tlora_core.schedule")
    rng = random.Random(0)
    cases = []
    for _ in range(400):
        R = rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
        cases.append({"R": R, "rMin": rng.randint(0, R), "alpha": rng.choice([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 7.5]),
                      "T": rng.choice([1000, 1000, 500]), "t": rng.uniform(0, 1000)})
    got = page.evaluate("""async (cases) => {
        const m = await import('/extensions/ComfyUI-TLoRA/tlora_schedule.js');
        return cases.map(c => m.rankAtTimestep(c.t, c)); }""", cases)
    want = [core.rank_at_timestep(c["t"], core.Schedule(max_rank=c["R"], min_rank=c["rMin"], alpha=c["alpha"],
                                                        max_timestep=c["T"])) for c in cases]
    assert got == want
