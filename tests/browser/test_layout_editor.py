"""The canvas box editor on Layout from Boxes, driven with a real mouse and keyboard in Chromium.

One ComfyUI server and one browser page for the module; each test loads the shipped layout_preview workflow
afresh. Boxes are checked three ways: the `boxes` text (parsed by the pack's own parse_boxes), the API prompt
from ``app.graphToPrompt()``, and the pixels of the editor on screen.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from multisubject.attention.layout import parse_boxes
from multisubject.attention.preview import EMPTY_BACKGROUND, FILL_ALPHA, region_colour
from multisubject.comfyui_locator import PACK_DIR, find_comfyui
from multisubject.headless import ComfyServer

WORKFLOW = json.loads((PACK_DIR / "workflows" / "layout_preview.json").read_text())
WIDTH, HEIGHT = 768, 512  # the layout_preview canvas
SCREENSHOT = PACK_DIR / "docs" / "layout_editor.png"
# Chromium flags for a machine without network: no GPU, no first-run, no background or component traffic
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]

# helpers run in the page; `node()` is the Layout from Boxes node, `ed()` its editor
JS = """
window.msTest = {
  app: () => window.comfyAPI.app.app,
  node: () => window.comfyAPI.app.app.graph.nodes.find((n) => n.type === "MS_LayoutFromBoxes"),
  ed: () => msTest.node().boxEditor,
  // client (page) coordinates of canvas pixel (x, y)
  at: (x, y) => {
    const ed = msTest.ed(), r = ed.canvas.getBoundingClientRect(), zoom = r.width / ed.canvas.clientWidth, v = ed.view();
    return [r.left + (v.x + x * v.scale) * zoom, r.top + (v.y + y * v.scale) * zoom];
  },
  nodeRect: () => {  // the node on screen, title bar included
    const app = msTest.app(), node = msTest.node(), ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    return {x: r.left + (node.pos[0] + ds.offset[0]) * ds.scale - 6, y: r.top + (node.pos[1] - title + ds.offset[1]) * ds.scale - 6,
            width: node.size[0] * ds.scale + 12, height: (node.size[1] + title) * ds.scale + 12};
  },
  show: () => {  // the node big, at the top-left of the screen, zoom 1
    const app = msTest.app(), node = msTest.node();
    node.size = [520, 700];
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [-node.pos[0] + 120, -node.pos[1] + 80];
    app.canvas.setDirty(true, true);
  },
};
"""


def _console_error_matters(kind: str, text: str, url: str) -> bool:
    """ComfyUI's own probes for files that do not exist and calls to the internet (unreachable here) are not ours."""
    if kind != "error":
        return False
    if text.startswith("Failed to load resource"):
        return "/extensions/multisubject/" in url or "/view?" in url
    return True


@pytest.fixture(scope="module")
def server():
    base_dir = Path(tempfile.mkdtemp(prefix="multisubject-browser-comfy-"))
    srv = ComfyServer(find_comfyui(), base_dir).start()
    srv.post("/settings/Comfy.TutorialCompleted", True)  # no template browser over the canvas on first start
    yield srv
    srv.stop()
    shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser_page(server, chromium):
    errors = []  # (kind, text, where) that count as errors
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="multisubject-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900}, device_scale_factor=1,
        )
        page = context.new_page()
        page.on("console", lambda m: _console_error_matters(m.type, m.text, m.location.get("url", ""))
                and errors.append(("console", m.text, m.location.get("url", ""))))
        page.goto(server.url)
        page.wait_for_function(
            "() => window.comfyAPI?.app?.app?.vueAppReady && window.LiteGraph?.registered_node_types?.MS_LayoutFromBoxes",
            timeout=120_000,
        )
        page.evaluate(JS)
        # uncaught exceptions count from here on: the frontend's own startup has one in a core settings watcher
        page.on("pageerror", lambda e: errors.append(("pageerror", str(e), e.stack or "")))
        yield page, errors
        context.close()


@pytest.fixture
def page(browser_page):
    page, _ = browser_page
    page.evaluate("wf => msTest.app().loadGraphData(wf)", WORKFLOW)
    page.wait_for_function("() => msTest.node()?.boxEditor")
    page.evaluate("msTest.show()")
    page.wait_for_timeout(300)  # one frame for the DOM widget to take its place
    return page


def boxes_px(page) -> list[tuple[tuple[float, ...], str]]:
    """The `boxes` text as (x0, y0, x1, y1) canvas pixels + label, read by the pack's parser."""
    text = page.evaluate("msTest.node().widgets.find((w) => w.name === 'boxes').value")
    return [(tuple(round(v * s, 1) for v, s in zip(box, (WIDTH, HEIGHT) * 2)), label) for box, label in parse_boxes(text)]


def prompt_boxes(page) -> str:
    return page.evaluate("async () => (await msTest.app().graphToPrompt()).output[msTest.node().id].inputs.boxes")


def drag(page, start, end, shift=False):
    page.mouse.move(*page.evaluate("([x, y]) => msTest.at(x, y)", list(start)))
    if shift:
        page.keyboard.down("Shift")
    page.mouse.down()
    page.mouse.move(*page.evaluate("([x, y]) => msTest.at(x, y)", list(end)), steps=6)
    page.mouse.up()
    if shift:
        page.keyboard.up("Shift")


def finished_runs(server, count: int, timeout: float = 120.0) -> list[str]:
    """Status of the server's runs once ``count`` of them have finished (the editor may update before that)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = [h["status"]["status_str"] for h in server.get("/history").values() if h.get("status", {}).get("completed") is not None]
        if len(statuses) >= count or time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)


def editor_pixels(page) -> tuple[np.ndarray, callable]:
    """A screenshot of the editor and a function mapping canvas pixels to its (row, column)."""
    shot = page.locator("canvas.multisubject-layout-editor").screenshot()
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(np.float32) / 255
    origin = page.evaluate("(() => { const r = msTest.ed().canvas.getBoundingClientRect(); return [r.left, r.top]; })()")

    def where(x, y):
        cx, cy = page.evaluate("([x, y]) => msTest.at(x, y)", [x, y])
        return round(cy - origin[1]), round(cx - origin[0])

    return pixels, where


def test_the_workflow_loads_with_the_editor_drawing_each_box_in_its_subject_colour(page):
    assert boxes_px(page) == [((38.4, 102.4, 422.4, 486.4), ""), ((345.6, 25.6, 729.6, 307.2), "")]
    pixels, where = editor_pixels(page)
    bg = np.full(3, EMPTY_BACKGROUND)
    # a point inside box 1 only, one inside box 2 only, one outside both (7 / 255: 8-bit rounding of the fill)
    for (x, y), index in [((150, 400), 0), ((650, 100), 1), ((700, 450), None)]:
        expected = bg if index is None else bg * (1 - FILL_ALPHA) + np.array(region_colour(index)) * FILL_ALPHA
        assert np.abs(pixels[where(x, y)] - expected).max() < 7 / 255, (x, y, index)
    # the extra-subject marking is off: two boxes, two subjects
    assert page.evaluate("msTest.ed().subjects()") == ["a red fox", "a blue bird"]


def test_dragging_a_box_moves_it_snapped_and_the_api_prompt_follows(page):
    drag(page, (200, 300), (283, 262))  # +83, -38: snaps box 1's corner to (120, 64), size kept
    assert boxes_px(page)[0] == ((120.0, 64.0, 504.0, 448.0), "")
    assert boxes_px(page)[1] == ((345.6, 25.6, 729.6, 307.2), "")  # the other box untouched
    assert prompt_boxes(page) == page.evaluate("msTest.node().widgets[0].value")
    drag(page, (300, 300), (1000, 900))  # far outside: clamped inside the canvas
    assert boxes_px(page)[0] == ((384.0, 128.0, 768.0, 512.0), "")
    drag(page, (500, 400), (497, 390), shift=True)  # Shift: free movement, no snap (one mouse pixel ~ 1.4 here)
    (x0, y0, x1, y1), _ = boxes_px(page)[0]
    assert abs(x0 - 381) < 1.5 and abs(y0 - 118) < 1.5 and (x1 - x0, y1 - y0) == (384, 384)


def test_dragging_works_when_the_graph_canvas_is_zoomed(page):
    page.evaluate("(() => { const c = msTest.app().canvas; c.ds.scale = 0.7; c.setDirty(true, true); })()")
    page.wait_for_timeout(300)  # one frame for the DOM widget to follow the zoom
    zoom = page.evaluate("(() => { const c = msTest.ed().canvas; return c.getBoundingClientRect().width / c.clientWidth; })()")
    assert abs(zoom - 0.7) < 0.02, zoom  # the editor is drawn at the graph's zoom
    drag(page, (200, 300), (283, 262))  # the same drag as at zoom 1 lands on the same snapped place
    assert boxes_px(page)[0] == ((120.0, 64.0, 504.0, 448.0), "")
    assert prompt_boxes(page) == page.evaluate("msTest.node().widgets[0].value")


def test_resize_add_delete_and_undo(page):
    page.mouse.click(*page.evaluate("msTest.at(650, 100)"))  # select box 2 (a click does not move it)
    assert boxes_px(page)[1] == ((345.6, 25.6, 729.6, 307.2), "")
    drag(page, (729.6, 307.2), (601, 399))  # bottom-right handle, snapped to (600, 400)
    assert boxes_px(page)[1] == ((345.6, 25.6, 600.0, 400.0), "")
    drag(page, (650, 418), (750, 500))  # on empty space: a third box
    assert [b for b, _ in boxes_px(page)][2] == (648.0, 416.0, 752.0, 504.0)
    # three boxes for two subjects: the editor marks the extra one and says both counts
    status = page.evaluate("msTest.ed().subjects().length")
    assert status == 2
    pixels, where = editor_pixels(page)
    red = np.array([1.0, 48 / 255, 48 / 255])  # the dashed outline of the extra box
    edge = [pixels[where(700 + dx, 416)[0] + 1, where(700 + dx, 416)[1]] for dx in range(-20, 20)]
    assert min(np.abs(p - red).max() for p in edge) < 0.1
    page.keyboard.press("ArrowLeft")  # nudge the new (selected) box one snap step
    assert [b for b, _ in boxes_px(page)][2] == (640.0, 416.0, 744.0, 504.0)
    page.keyboard.press("Delete")  # removes the selected box, not the node
    assert len(boxes_px(page)) == 2 and page.evaluate("!!msTest.node()")
    page.mouse.click(*page.evaluate("msTest.at(150, 400)"))  # select box 1, then its delete control
    page.mouse.click(*page.evaluate("msTest.at(422.4 - 5, 102.4 + 5)"))
    assert [b for b, _ in boxes_px(page)] == [(345.6, 25.6, 600.0, 400.0)]
    page.wait_for_timeout(200)
    page.keyboard.press("Control+z")  # ComfyUI's undo brings the deleted box back
    page.wait_for_function("() => msTest.node()?.widgets[0].value.split('\\n').length === 2")
    assert len(boxes_px(page)) == 2


def test_typing_in_the_text_widget_redraws_and_labels_are_kept(page):
    page.evaluate("msTest.node().widgets.find((w) => w.name === 'boxes').inputEl.dataset.msTest = 'boxes'")
    textarea = page.locator("textarea[data-ms-test=boxes]")
    textarea.fill("")
    textarea.press_sequentially("fox: 0.5, 0.5, 0.75, 1\nbird: 0, 0, 0.25, 0.5")
    pixels, where = editor_pixels(page)
    bg = np.full(3, EMPTY_BACKGROUND)
    tint = lambda i: bg * (1 - FILL_ALPHA) + np.array(region_colour(i)) * FILL_ALPHA  # noqa: E731
    assert np.abs(pixels[where(480, 400)] - tint(0)).max() < 7 / 255
    assert np.abs(pixels[where(150, 200)] - tint(1)).max() < 7 / 255
    assert np.abs(pixels[where(150, 400)] - bg).max() < 7 / 255  # where box 1 was before
    drag(page, (480, 400), (480, 350))  # an edit keeps both labels
    assert boxes_px(page) == [((384.0, 208.0, 576.0, 464.0), "fox"), ((0.0, 0.0, 192.0, 256.0), "bird")]


def test_units_convert_and_a_smaller_canvas_clamps_the_boxes_into_it(page):
    def set_widget(name, value):  # as the widget's own arrows/menus do: new value, then its callback
        page.evaluate("([name, value]) => { const w = msTest.node().widgets.find((w) => w.name === name);"
                      " w.value = value; w.callback?.(value); }", [name, value])

    set_widget("units", "pixels")
    text = page.evaluate("msTest.node().widgets[0].value")
    assert text == "38, 102, 422, 486\n346, 26, 730, 307"  # the same boxes, now in pixels
    set_widget("width", 512)
    boxes = parse_boxes(page.evaluate("msTest.node().widgets[0].value"), units="pixels", width=512, height=512)
    assert [tuple(round(v * 512) for v in b) for b, _ in boxes] == [(38, 102, 422, 486), (128, 26, 512, 307)]


def test_save_reload_copy_paste_then_the_workflow_runs_with_thumbnails(page, server):
    drag(page, (200, 300), (283, 262))
    saved = page.evaluate("JSON.stringify(msTest.app().graph.serialize())")
    page.evaluate("wf => msTest.app().loadGraphData(JSON.parse(wf))", saved)
    page.wait_for_function("() => msTest.node()?.boxEditor")
    assert boxes_px(page)[0] == ((120.0, 64.0, 504.0, 448.0), "")
    # the editor widget adds nothing to the saved workflow: widgets_values are the node's four inputs
    assert len(next(n for n in json.loads(saved)["nodes"] if n["type"] == "MS_LayoutFromBoxes")["widgets_values"]) == 4
    copied = page.evaluate("""() => {
        const app = msTest.app(); app.canvas.copyToClipboard([msTest.node()]); app.canvas.pasteFromClipboard();
        const copies = app.graph.nodes.filter((n) => n.type === "MS_LayoutFromBoxes");
        const text = copies.map((n) => n.widgets[0].value);
        copies.filter((n) => n !== msTest.node()).forEach((n) => app.graph.remove(n));
        return {count: copies.length, same: text[0] === text[1], editor: copies.every((n) => n.boxEditor)};
    }""")
    assert copied == {"count": 2, "same": True, "editor": True}

    page.evaluate("msTest.show()")
    page.evaluate("msTest.app().queuePrompt(0, 1)")
    page.wait_for_function("() => msTest.ed().pictures.thumbnails.length === 2 && msTest.ed().pictures.thumbnails.every((t) => t.complete && t.naturalWidth)", timeout=120_000)
    assert finished_runs(server, 1) == ["success"]
    page.wait_for_timeout(300)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    if os.environ.get("MULTISUBJECT_UPDATE_SCREENSHOT"):  # the README picture; set to refresh it
        page.evaluate("msTest.app().canvas.deselectAll?.()")
        page.screenshot(path=str(SCREENSHOT), clip=page.evaluate("msTest.nodeRect()"))
    # the red thumbnail of subject 1 sits in box 1 under its label (drawn 4, 22 CSS pixels in from the corner)
    pixels, where = editor_pixels(page)
    row, col = where(120, 64)
    row, col = row + 22 + 10, col + 4 + 10
    assert np.abs(pixels[row, col] - np.array([0xD0, 0x40, 0x40]) / 255).max() < 0.05

    # a background wired in shows behind the boxes after the next run (subject 1's image, fitted, not stretched)
    page.evaluate("""() => {
        const app = msTest.app(), node = msTest.node();
        const image = app.graph.nodes.find((n) => n.title.startsWith("Subject 1 image"));
        image.connect(0, node, node.inputs.findIndex((i) => i.name === "background"));
        app.queuePrompt(0, 1);
    }""")
    page.wait_for_function("() => msTest.ed().pictures.background?.naturalWidth === 256", timeout=120_000)
    assert finished_runs(server, 2) == ["success", "success"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (PACK_DIR / "workflows").glob("*.json")))
def test_shipped_workflows_render_at_their_saved_sizes(browser_page, name):
    """The frontend grows a node that is too small for its widgets, which could break the stage layout's geometry."""
    page, _ = browser_page
    workflow = json.loads((PACK_DIR / "workflows" / f"{name}.json").read_text())
    page.evaluate("wf => msTest.app().loadGraphData(wf, true, true, null, {showMissingModelsDialog: false})", workflow)
    page.wait_for_timeout(500)
    rendered = dict(page.evaluate("msTest.app().graph.nodes.map((n) => [n.id, [n.size[0], n.size[1]]])"))
    saved = {n["id"]: n["size"] for n in workflow["nodes"]}
    grown = {i: (saved[i], size) for i, size in rendered.items() if size[0] > saved[i][0] + 1 or size[1] > saved[i][1] + 1}
    assert grown == {}


def test_no_errors_in_the_browser_console(browser_page):
    _, errors = browser_page
    assert errors == []
