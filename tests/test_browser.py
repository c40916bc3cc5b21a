"""ComfyUI's real web frontend, served by the real server, in headless Chromium (Debian's, via playwright).

The T-LoRA nodes are found in the node search, a T-LoRA Schedule node draws its rank curve, and
editing alpha or boundary_timestep in the UI redraws it (in the classic canvas and in the Vue node
renderer); the example workflows load in the frontend, turn into the prompts they are meant to be,
and are listed with their thumbnails in the template browser. Screenshots go to test-artifacts/
(git-ignored).

The same tests run on the frontends of both hosts (1.32 with ComfyUI 0.3.75, 1.45 with 0.28): they
find things as a user does (labels, roles, visible text, the focused editor) and read the graph
through ``window.app``, not through one frontend's DOM structure.
"""

from __future__ import annotations

import json
import random

import pytest

from devkit import browser, workflows as wfs
from devkit.host import ROOT, pack_module

pytestmark = [pytest.mark.server, pytest.mark.browser]

ARTIFACTS = ROOT / "test-artifacts"
NAMES = sorted(wfs.BUILDERS)

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
# resolves once the node's place and size have stayed the same for a few frames (drawn, laid out)
SETTLED_JS = """() => new Promise(done => {
    const n = app.graph._nodes[0];
    let last = '', same = 0, frames = 0;
    const tick = () => {
        const now = JSON.stringify([n.pos, n.size, n.widgets.map(w => w.y), app.canvas.ds.offset, app.canvas.ds.scale]);
        same = now === last ? same + 1 : 0; last = now;
        if (same >= 5 || ++frames > 120) done(); else requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
})"""
# the first node's curve canvas (its DOM widget), in either renderer
CURVE = "app.graph._nodes[0].widgets.find(w => w.name === 'rank_curve').element.querySelector('canvas.tlora-curve')"
# the curve's y (canvas pixels) at a fraction of its width: the topmost pixel of the line colour
CURVE_Y = """(frac) => {
    const c = %s, ctx = c.getContext('2d');
    const dpr = window.devicePixelRatio || 1, x = Math.round((30 + (c.clientWidth - 40) * frac) * dpr);
    const px = ctx.getImageData(x, 0, 1, c.height).data;
    for (let y = 0; y < c.height; y++) {
        const [r, g, b] = [px[4 * y], px[4 * y + 1], px[4 * y + 2]];
        if (Math.abs(r - 90) < 20 && Math.abs(g - 170) < 20 && b > 230) return y / dpr;
    }
    return null;
}""" % CURVE


@pytest.fixture(scope="module")
def page(comfy_server):
    with browser.open_comfy(comfy_server.url) as page:
        yield page


def widget_value(page, name: str):
    return page.evaluate("(name) => app.graph._nodes[0].widgets.find(w => w.name === name).value", name)


def curve_state(page) -> dict:
    return page.evaluate("""() => { const c = %s;
        return c && {ranks: JSON.parse(c.dataset.ranks || '[]'), params: JSON.parse(c.dataset.params || '{}'),
                     draws: +c.dataset.drawCount, png: c.toDataURL(), shown: c.getBoundingClientRect().height > 50}; }"""
                         % CURVE)


def wait_for_ranks(page, ranks: list[int], timeout: int = 10000) -> None:
    want = json.dumps(ranks, separators=(",", ":"))
    try:
        page.wait_for_function(f"{CURVE}.dataset.ranks === '{want}'", timeout=timeout)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "browser_failure.png"))
        raise AssertionError(f"curve shows {curve_state(page)['ranks']}, want {ranks}")


def ranks_of(core, **settings) -> list[int]:
    return [r for _, r in core.rank_table(core.Schedule(max_rank=64, min_rank=1, **settings))]


def edit_canvas_number(page, widget: str, text: str) -> None:
    """Change a number widget of the canvas renderer the way a user does: click the middle of it, and
    type into the editor that opens (the focused field showing the widget's value), then Enter."""
    current = widget_value(page, widget)
    for _ in range(3):  # the canvas may still be settling right after a node is added
        page.evaluate(SETTLED_JS)
        x, y = page.evaluate(WIDGET_XY, widget)
        page.mouse.move(x, y)
        page.wait_for_timeout(200)
        page.mouse.click(x, y)
        try:
            page.wait_for_function("(v) => { const e = document.activeElement;"
                                   " return e && e.tagName === 'INPUT' && parseFloat(e.value) === v; }",
                                   arg=current, timeout=3000)
            break
        except Exception:
            print(f"editor for {widget} did not open, retrying")
            page.keyboard.press("Escape")
            page.mouse.click(300, 800)  # click the empty canvas, try again
    else:
        page.screenshot(path=str(ARTIFACTS / "browser_failure.png"))
        raise AssertionError(f"clicking {widget} opened no editor")
    page.keyboard.press("Control+a")
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    page.wait_for_function("([name, v]) => app.graph._nodes[0].widgets.find(w => w.name === name).value === v",
                           arg=[widget, float(text)])


def edit_labelled_number(page, label: str, text: str) -> None:
    """Change a number field of the Vue node renderer the way a user does: click the field labelled
    ``label``, select its text, type, Enter."""
    page.get_by_label(label, exact=True).click()
    page.wait_for_function("document.activeElement && document.activeElement.tagName === 'INPUT'")
    page.keyboard.press("Control+a")
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    page.wait_for_function("([name, v]) => app.graph._nodes[0].widgets.find(w => w.name === name).value === v",
                           arg=[label, float(text)])


def search_nodes(page, text: str):
    """Open the node search the way a user does (double-click the empty canvas) and type ``text``
    once its input has focus (keys typed before that are lost on a slow machine); the options."""
    options = page.get_by_role("option").filter(has_text=text)
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


def test_find_add_and_edit_the_schedule_node(page):
    core = pack_module("tlora_core.schedule")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.new_graph(page)

    # node search: double-click the empty canvas, type, see the nodes by their titles (the first line
    # of an option; the frontends show category, pack badge and description after it)
    options = search_nodes(page, "T-LoRA")
    titles = [t.split("\n")[0].strip() for t in options.all_inner_texts()]
    assert {"T-LoRA Loader", "T-LoRA Schedule", "T-LoRA Schedule Preview"} <= set(titles), titles
    page.get_by_role("option").filter(has=page.get_by_text("T-LoRA Schedule", exact=True)).first.click()
    page.wait_for_function("app.graph._nodes.length === 1")
    # frontend 1.45 hangs the new node on the pointer until a click places it (1.32 places it at once,
    # further right): a click on the empty canvas, as a user does
    page.mouse.move(500, 300, steps=5)  # the node follows the pointer ...
    page.wait_for_timeout(100)
    page.mouse.click(500, 300)  # ... and is put down
    assert page.evaluate("app.graph._nodes.map(n => n.type)") == ["TLoraSchedule"]

    # the curve is drawn, with the trainers' ranks (max_rank 0 draws a nominal rank 64)
    page.wait_for_function(f"{CURVE}?.dataset.ranks")
    before = curve_state(page)
    assert before["shown"]
    assert before["ranks"] == ranks_of(core, alpha=1.0) == [64, 48, 32, 16, 1]
    y_mid_before = page.evaluate(CURVE_Y, 0.5)

    # change alpha as a user does: double-click the widget, type, Enter
    edit_canvas_number(page, "alpha", "3")
    wait_for_ranks(page, ranks_of(core, alpha=3.0))
    after = curve_state(page)
    assert after["draws"] > before["draws"] and after["ranks"] != before["ranks"]
    assert after["png"] != before["png"]
    # at mid-sampling the curve dropped from rank 32 to rank 8: its line is lower in the pixels
    y_mid_after = page.evaluate(CURVE_Y, 0.5)
    assert y_mid_before is not None and y_mid_after is not None and y_mid_after > y_mid_before + 10

    # boundary_timestep redraws it too: every rank is on up to t = 500
    edit_canvas_number(page, "boundary_timestep", "500")
    want = ranks_of(core, alpha=3.0, boundary_timestep=500.0)
    wait_for_ranks(page, want)
    assert want[:3] == [64, 64, 64] and curve_state(page)["params"]["boundary"] == 500

    # the values reach the prompt the frontend queues
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    (node,) = prompt.values()
    assert node["class_type"] == "TLoraSchedule"
    assert node["inputs"]["alpha"] == 3 and node["inputs"]["boundary_timestep"] == 500
    assert node["inputs"]["truncate_t"] == "as in the file" and node["inputs"]["timestep_offset"] == 0
    assert "rank_curve" not in node["inputs"]  # the drawing is not a value

    box = page.evaluate("""() => { const n = app.graph._nodes[0], r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
        return {x: r.left + (n.pos[0] + ds.offset[0]) * ds.scale - 20, y: r.top + (n.pos[1] - 40 + ds.offset[1]) * ds.scale,
                width: (n.size[0] + 40) * ds.scale, height: (n.size[1] + 60) * ds.scale}; }""")
    page.screenshot(path=str(ARTIFACTS / "browser_tlora_schedule.png"), clip=box)
    page.screenshot(path=str(ARTIFACTS / "browser_full.png"))
    assert not [m for m in page.console if "pageerror" in m or "tlora" in m.lower() and m.startswith("error")]


@pytest.mark.parametrize("name", NAMES)
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
        meant = {k: v for k, v in wfs.widget_values(node, object_info[node["type"]]).items() if ":" not in k}
        got = prompt[str(node["id"])]["inputs"]
        assert {k: got.get(k) for k in meant} == meant, node["type"]
    loaders = [n for n in prompt.values() if n["class_type"] == "TLoraLoader"]
    assert len(loaders) == 1
    inputs = loaders[0]["inputs"]
    assert inputs["lora_name"].endswith("_tlora.safetensors") and inputs["strength_model"] == 1.0
    assert inputs["allow_partial"] is False
    assert isinstance(inputs["model"], list)  # linked
    if any(n["type"] == "TLoraSchedule" for n in wf["nodes"]):
        # the bypassed schedule is left out: the loader runs on the file's own settings
        assert "schedule" not in inputs and not any(n["class_type"] == "TLoraSchedule" for n in prompt.values())
    previews = [n for n in prompt.values() if n["class_type"] == "TLoraSchedulePreview"]
    if previews:
        assert previews[0]["inputs"]["denoise"] == 1.0
    page.screenshot(path=str(ARTIFACTS / f"browser_{name}.png"))


def test_curve_in_the_nodes_2_0_renderer(page):
    """The frontend's Vue node renderer ("Nodes 2.0") shows and redraws the curve too."""
    core = pack_module("tlora_core.schedule")
    browser.set_ui_setting(page, "Comfy.VueNodes.Enabled", True)  # as the settings dialog does
    try:
        page.evaluate("""() => { app.graph.clear(); const n = LiteGraph.createNode('TLoraSchedule');
                                 n.pos = [300, 200]; app.graph.add(n); app.canvas.setDirty(true, true); }""")
        page.wait_for_function(f"{CURVE}?.dataset.ranks")
        edit_labelled_number(page, "alpha", "3")
        wait_for_ranks(page, ranks_of(core, alpha=3.0))
        draws = curve_state(page)["draws"]
        edit_labelled_number(page, "boundary_timestep", "500")
        wait_for_ranks(page, ranks_of(core, alpha=3.0, boundary_timestep=500.0))
        state = curve_state(page)
        assert state["shown"] and state["draws"] > draws and state["params"]["boundary"] == 500
        page.screenshot(path=str(ARTIFACTS / "browser_nodes_2_0.png"))
    finally:
        browser.set_ui_setting(page, "Comfy.VueNodes.Enabled", False)
        browser.new_graph(page)


def test_examples_are_in_the_template_browser(page):
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.get_by_text("ComfyUI-TLoRA", exact=True).first.click()
    for name in NAMES:
        page.get_by_text(name, exact=True).first.wait_for()
        # its thumbnail, the frontend's rendering of it, is shown (scrolled to, as a user would)
        thumb = page.get_by_role("img", name=name, exact=True).first
        thumb.scroll_into_view_if_needed()
        page.wait_for_function("(img) => img.complete && img.naturalWidth >= 400", arg=thumb.element_handle())
    page.screenshot(path=str(ARTIFACTS / "browser_templates.png"))
    page.get_by_text("wan_tlora_txt2video", exact=True).first.click()  # opening one loads it
    page.wait_for_function("['TLoraLoader', 'UNETLoader', 'EmptyHunyuanLatentVideo'].every("
                           "t => app.graph._nodes.some(n => n.type === t))")
    page.keyboard.press("Escape")


def test_widget_formula_is_the_trainers(page):
    """The widget's JavaScript rank formula agrees with tlora_core.schedule on many settings, boundary,
    offset and truncation included."""
    core = pack_module("tlora_core.schedule")
    rng = random.Random(0)
    cases = []
    for _ in range(400):
        R = rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
        T = rng.choice([1000.0, 1000.0, 500.0, 1.0])
        cases.append({"R": R, "rMin": rng.randint(0, R), "alpha": rng.choice([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 7.5]),
                      "T": T, "t": rng.uniform(0, T), "boundary": rng.choice([0.0, 0.0, 0.875 * T]),
                      "offset": rng.choice([0.0, 0.0, 1.0, -0.5]), "truncate": rng.choice([True, False])})
    got = page.evaluate("""async (cases) => {
        const m = await import('/extensions/ComfyUI-TLoRA/tlora_schedule.js');
        return cases.map(c => m.rankAtTimestep(c.t, c)); }""", cases)
    want = [core.rank_at_timestep(c["t"], core.Schedule(
        max_rank=c["R"], min_rank=c["rMin"], alpha=c["alpha"], max_timestep=c["T"], boundary_timestep=c["boundary"],
        timestep_offset=c["offset"], truncate_timestep=c["truncate"])) for c in cases]
    assert got == want
