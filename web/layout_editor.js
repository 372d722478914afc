// Canvas box editor on Layout from Boxes (MS_LayoutFromBoxes), for the classic LiteGraph canvas of
// comfyui-frontend-package 1.27 (ComfyUI v0.3.64). The `boxes` text widget stays the single source of truth:
// every edit rewrites it (boxes.js), typing in it redraws the canvas, so API-format workflows see no change.
// The editor is a DOM widget that is never serialized (widget.serialize = false): workflows, copy/paste and
// undo/redo carry only the text.
//
// Later: a frontend with the core BOUNDING_BOXES widget (io.BoundingBoxes.Input, Nodes 2.0 / Vue node mode)
// could replace this file: declare that input on the node, keep parse_boxes' {x, y, width, height} reader for it,
// and map box order to subject order as here.

import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { clampBox, formatBoxes, parseBoxes, snap } from "./boxes.js";

const NODE_TYPE = "MS_LayoutFromBoxes";
const UI_KEY = "multisubject_canvas"; // nodes/layout.py EDITOR_UI_KEY: background + subject thumbnails
const PALETTE = (await (await fetch(new URL("./palette.json", import.meta.url))).json()).subjects;
const SNAP = 8; // canvas pixels; hold Shift for free movement
const FILL_ALPHA = 0.45; // as Preview Layout (attention/preview.py)
const EMPTY = "#1f1f1f"; // Preview Layout's empty canvas grey (0.12)
const HANDLE = 5; // half a resize handle, CSS pixels
const DELETE = 16; // the delete control's side, CSS pixels
const STATUS = 18; // height of the status line under the canvas, CSS pixels

class BoxEditor {
  constructor(node) {
    this.node = node;
    this.selected = -1;
    this.drag = null;
    this.pictures = { background: null, thumbnails: [] };
    this.drawn = "";
    this.units = this.w("units")?.value;
    this.canvas = document.createElement("canvas");
    this.canvas.tabIndex = 0;
    this.canvas.className = "multisubject-layout-editor";
    this.canvas.style.cssText = "width:100%;height:100%;display:block;outline:none;touch-action:none;cursor:crosshair";
    const widget = node.addDOMWidget("layout_editor", "multisubject_layout_editor", this.canvas, {
      serialize: false,
      getMinHeight: () => 200,
    });
    widget.serialize = false;
    this.widget = widget;
    for (const name of ["boxes", "units", "width", "height"]) this.chain(name);
    this.canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.canvas.addEventListener("keydown", (e) => this.onKeyDown(e));
    new ResizeObserver(() => this.redraw()).observe(this.canvas);
  }

  w(name) {
    return this.node.widgets?.find((w) => w.name === name);
  }

  chain(name) {
    const widget = this.w(name);
    if (!widget) return;
    const callback = widget.callback;
    widget.callback = (value, ...rest) => {
      const result = callback?.call(widget, value, ...rest);
      if (name === "units" && this.units !== value) this.convertUnits(this.units, value);
      if (name === "width" || name === "height") this.clampAll();
      this.redraw();
      return result;
    };
  }

  // state derived from the widgets

  get size() {
    return [Number(this.w("width")?.value) || 1, Number(this.w("height")?.value) || 1];
  }

  read(units = this.w("units")?.value) {
    const [width, height] = this.size;
    return parseBoxes(String(this.w("boxes")?.value ?? ""), units, width, height);
  }

  write(boxes, comments) {
    const [width, height] = this.size;
    const text = formatBoxes(boxes, comments, this.w("units")?.value, width, height);
    const widget = this.w("boxes");
    if (widget.value !== text) {
      widget.value = text;
      this.node.setDirtyCanvas(true, true);
    }
    this.redraw();
  }

  linked() {
    return this.node.inputs?.some((input) => input.widget?.name === "boxes" && input.link != null);
  }

  /** Subject labels up the chain of Subject nodes wired into `subjects`; null when unknown. */
  subjects() {
    const labels = [];
    let node = this.node;
    for (let hops = 0; hops < 1000; hops++) {
      const slot = node.inputs?.findIndex((input) => input.name === "subjects" && input.link != null) ?? -1;
      if (slot < 0) break;
      node = node.getInputNode(slot);
      if (node?.type !== "MS_Subject") {
        const count = this.pictures.thumbnails.length; // another node makes the subjects: trust the last run
        return count ? Array(count).fill("") : null;
      }
      labels.unshift(String(node.widgets?.find((w) => w.name === "label")?.value ?? ""));
    }
    return node === this.node ? null : labels;
  }

  convertUnits(from, to) {
    const parsed = this.read(from);
    if (!parsed.error && to) this.write(parsed.boxes, parsed.comments); // written in the new units
  }

  clampAll() {
    const parsed = this.read();
    if (parsed.error) return;
    const [width, height] = this.size;
    const clamped = parsed.boxes.map((b) => clampBox(b, width, height, 1));
    if (clamped.some((b, i) => b.x0 !== parsed.boxes[i].x0 || b.y0 !== parsed.boxes[i].y0 || b.x1 !== parsed.boxes[i].x1 || b.y1 !== parsed.boxes[i].y1)) {
      this.write(clamped, parsed.comments);
    }
  }

  // geometry: the canvas keeps the node's width x height aspect inside the widget

  view() {
    const [width, height] = this.size;
    const cw = this.canvas.clientWidth;
    const ch = Math.max(this.canvas.clientHeight - STATUS, 1);
    const scale = Math.min((cw - 8) / width, (ch - 8) / height);
    return { x: (cw - width * scale) / 2, y: (ch - height * scale) / 2, scale };
  }

  toCanvas(e) {
    const rect = this.canvas.getBoundingClientRect();
    const zoom = rect.width / (this.canvas.clientWidth || 1);
    const v = this.view();
    return { x: ((e.clientX - rect.left) / zoom - v.x) / v.scale, y: ((e.clientY - rect.top) / zoom - v.y) / v.scale };
  }

  hit(p, boxes) {
    const v = this.view();
    const slack = HANDLE / v.scale;
    const box = boxes[this.selected];
    if (box) {
      const d = DELETE / v.scale;
      if (p.x >= box.x1 - d && p.x <= box.x1 && p.y >= box.y0 && p.y <= box.y0 + d) return { kind: "delete" };
      let edges = "";
      if (Math.abs(p.y - box.y0) <= slack) edges += "n";
      if (Math.abs(p.y - box.y1) <= slack) edges += "s";
      if (Math.abs(p.x - box.x0) <= slack) edges += "w";
      if (Math.abs(p.x - box.x1) <= slack) edges += "e";
      const inside = p.x >= box.x0 - slack && p.x <= box.x1 + slack && p.y >= box.y0 - slack && p.y <= box.y1 + slack;
      if (edges && inside) return { kind: "resize", index: this.selected, edges };
    }
    for (let i = boxes.length - 1; i >= 0; i--) {
      const b = boxes[i];
      if (p.x >= b.x0 && p.x <= b.x1 && p.y >= b.y0 && p.y <= b.y1) return { kind: "move", index: i };
    }
    return { kind: "add" };
  }

  // mouse and keys

  onPointerDown(e) {
    if (e.button !== 0) {
      if (e.button === 1) app.canvas.processMouseDown(e); // middle drag pans the graph, as over text widgets
      return;
    }
    this.canvas.focus();
    app.canvas.selectNode?.(this.node);
    const parsed = this.read();
    if (parsed.error || this.linked()) return;
    const p = this.toCanvas(e);
    const target = this.hit(p, parsed.boxes);
    if (target.kind === "delete") {
      this.remove(parsed);
      return;
    }
    if (target.kind === "move" || target.kind === "resize") this.selected = target.index;
    this.drag = { ...target, start: p, parsed, box: parsed.boxes[target.index] };
    this.canvas.setPointerCapture(e.pointerId);
    e.preventDefault();
    this.redraw();
  }

  onPointerMove(e) {
    if ((e.buttons & 4) === 4) app.canvas.processMouseMove(e);
    const drag = this.drag;
    if (!drag) {
      const parsed = this.read();
      if (!parsed.error) {
        const kind = this.hit(this.toCanvas(e), parsed.boxes);
        const cursors = { delete: "pointer", move: "move", add: "crosshair" };
        this.canvas.style.cursor = cursors[kind.kind] ?? `${kind.edges}-resize`.replace("nsew", "move");
      }
      return;
    }
    const [width, height] = this.size;
    const step = e.shiftKey ? 1 : SNAP;
    const p = this.toCanvas(e);
    const { boxes, comments } = drag.parsed;
    if (drag.kind === "move") {
      const moved = { ...drag.box, x0: snap(drag.box.x0 + p.x - drag.start.x, step), y0: snap(drag.box.y0 + p.y - drag.start.y, step) };
      moved.x1 = moved.x0 + drag.box.x1 - drag.box.x0;
      moved.y1 = moved.y0 + drag.box.y1 - drag.box.y0;
      this.write(boxes.map((b, i) => (i === drag.index ? clampBox(moved, width, height, 1) : b)), comments);
    } else if (drag.kind === "resize") {
      const b = { ...drag.box };
      const x = Math.min(Math.max(snap(p.x, step), 0), width);
      const y = Math.min(Math.max(snap(p.y, step), 0), height);
      if (drag.edges.includes("w")) b.x0 = Math.min(x, b.x1 - step);
      if (drag.edges.includes("e")) b.x1 = Math.max(x, b.x0 + step);
      if (drag.edges.includes("n")) b.y0 = Math.min(y, b.y1 - step);
      if (drag.edges.includes("s")) b.y1 = Math.max(y, b.y0 + step);
      this.write(boxes.map((old, i) => (i === drag.index ? b : old)), comments);
    } else {
      const a = { x: snap(drag.start.x, step), y: snap(drag.start.y, step) };
      const c = { x: snap(p.x, step), y: snap(p.y, step) };
      const clip = (v, size) => Math.min(Math.max(v, 0), size);
      drag.adding = {
        x0: clip(Math.min(a.x, c.x), width), y0: clip(Math.min(a.y, c.y), height),
        x1: clip(Math.max(a.x, c.x), width), y1: clip(Math.max(a.y, c.y), height), label: "",
      };
      this.redraw();
    }
  }

  onPointerUp(e) {
    if (e.button === 1) app.canvas.processMouseUp(e);
    const drag = this.drag;
    this.drag = null;
    if (!drag) return;
    const added = drag.adding;
    if (drag.kind === "add") {
      if (added && added.x1 - added.x0 >= SNAP && added.y1 - added.y0 >= SNAP) {
        this.selected = drag.parsed.boxes.length;
        this.write([...drag.parsed.boxes, added], drag.parsed.comments);
      } else {
        this.selected = -1; // a click on empty space only deselects
      }
    }
    this.redraw();
  }

  onKeyDown(e) {
    const parsed = this.read();
    const box = parsed.boxes?.[this.selected];
    if (!box || parsed.error || this.linked()) return;
    const step = e.shiftKey ? 1 : SNAP;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (e.key === "Delete" || e.key === "Backspace") {
      this.remove(parsed);
    } else if (moves[e.key]) {
      const [dx, dy] = moves[e.key];
      const [width, height] = this.size;
      const [x0, y0] = [snap(box.x0 + dx, step), snap(box.y0 + dy, step)]; // back on the grid, no drift from rounding
      const moved = clampBox({ ...box, x0, y0, x1: x0 + box.x1 - box.x0, y1: y0 + box.y1 - box.y0 }, width, height, 1);
      this.write(parsed.boxes.map((b, i) => (i === this.selected ? moved : b)), parsed.comments);
    } else if (e.key === "Escape") {
      this.selected = -1;
      this.redraw();
    } else {
      return; // Ctrl+Z, Ctrl+C, ... stay with ComfyUI
    }
    e.preventDefault();
    e.stopPropagation(); // keep Delete from deleting the node
  }

  remove(parsed) {
    const boxes = parsed.boxes.filter((_, i) => i !== this.selected);
    this.selected = -1;
    this.write(boxes, parsed.comments);
  }

  // pictures from the last run

  showPictures(refs) {
    if (!refs) return;
    const load = (ref) => {
      if (!ref) return null;
      const img = new Image();
      img.onload = () => this.redraw();
      img.src = api.apiURL(`/view?${new URLSearchParams(ref)}`);
      return img;
    };
    this.pictures = { background: load(refs.background), thumbnails: (refs.thumbnails ?? []).map(load) };
    this.redraw();
  }

  // drawing

  redrawIfChanged() {
    const key = ["boxes", "units", "width", "height"].map((n) => this.w(n)?.value).join("|");
    if (key !== this.drawn) this.redraw();
  }

  redraw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const cw = canvas.clientWidth;
    const ch = canvas.clientHeight;
    if (!cw || !ch) return;
    this.drawn = ["boxes", "units", "width", "height"].map((n) => this.w(n)?.value).join("|");
    this.units = this.w("units")?.value; // what the text is written in, for the next change of units
    canvas.width = Math.round(cw * ratio);
    canvas.height = Math.round(ch * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cw, ch);
    const [width, height] = this.size;
    const v = this.view();
    const X = (x) => v.x + x * v.scale;
    const Y = (y) => v.y + y * v.scale;
    ctx.fillStyle = EMPTY;
    ctx.fillRect(X(0), Y(0), width * v.scale, height * v.scale);
    const bg = this.pictures.background;
    if (bg?.complete && bg.naturalWidth) {
      // fitted inside the canvas, aspect kept (a picture of another aspect is never stretched)
      const s = Math.min((width * v.scale) / bg.naturalWidth, (height * v.scale) / bg.naturalHeight);
      const [w, h] = [bg.naturalWidth * s, bg.naturalHeight * s];
      ctx.drawImage(bg, X(width / 2) - w / 2, Y(height / 2) - h / 2, w, h);
    }
    const parsed = this.read();
    const subjects = this.subjects();
    let status = `${width}×${height} · drag to add · Shift: no snap · Del removes`;
    if (this.linked()) status = "boxes come from a link: edit them upstream";
    if (parsed.error) status = `not drawn: ${parsed.error}`;
    const boxes = parsed.error ? [] : [...parsed.boxes];
    if (this.drag?.adding) boxes.push(this.drag.adding);
    ctx.font = "12px sans-serif";
    ctx.textBaseline = "top";
    boxes.forEach((b, i) => {
      const colour = PALETTE[i % PALETTE.length];
      const extra = subjects !== null && i >= subjects.length;
      const [x, y, w, h] = [X(b.x0), Y(b.y0), (b.x1 - b.x0) * v.scale, (b.y1 - b.y0) * v.scale];
      ctx.globalAlpha = FILL_ALPHA;
      ctx.fillStyle = colour;
      ctx.fillRect(x, y, w, h);
      ctx.globalAlpha = 1;
      ctx.lineWidth = 2;
      ctx.strokeStyle = extra ? "#ff3030" : colour;
      ctx.setLineDash(extra ? [6, 4] : []);
      ctx.strokeRect(x + 1, y + 1, w - 2, h - 2);
      ctx.setLineDash([]);
      const label = `${i + 1} ${b.label || subjects?.[i] || ""}${extra ? " (no subject)" : ""}`.trim();
      const tw = ctx.measureText(label).width + 6;
      ctx.fillStyle = "#000";
      ctx.fillRect(x + 2, y + 2, tw, 16);
      ctx.fillStyle = extra ? "#ff3030" : colour;
      ctx.fillText(label, x + 5, y + 4);
      const thumb = this.pictures.thumbnails[i];
      const side = Math.min(w / 3, h - 26, 64);
      if (thumb?.complete && thumb.naturalWidth && side >= 12) {
        const s = side / Math.max(thumb.naturalWidth, thumb.naturalHeight);
        ctx.drawImage(thumb, x + 4, y + 22, thumb.naturalWidth * s, thumb.naturalHeight * s);
      }
      if (i === this.selected) this.drawSelection(ctx, x, y, w, h);
    });
    if (subjects !== null && parsed.boxes && parsed.boxes.length > subjects.length) {
      status = `${parsed.boxes.length} boxes but ${subjects.length} subjects: remove the extra boxes (dashed)`;
    }
    ctx.fillStyle = parsed.error || status.includes("subjects:") ? "#ff6060" : "#aaa";
    ctx.fillText(status, 4, ch - STATUS + 3, cw - 8);
  }

  drawSelection(ctx, x, y, w, h) {
    ctx.fillStyle = "#fff";
    for (const hx of [x, x + w / 2, x + w]) {
      for (const hy of [y, y + h / 2, y + h]) {
        if (hx !== x + w / 2 || hy !== y + h / 2) ctx.fillRect(hx - HANDLE, hy - HANDLE, 2 * HANDLE, 2 * HANDLE);
      }
    }
    ctx.fillStyle = "#c00";
    ctx.fillRect(x + w - DELETE, y, DELETE, DELETE);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(x + w - DELETE + 4, y + 4);
    ctx.lineTo(x + w - 4, y + DELETE - 4);
    ctx.moveTo(x + w - 4, y + 4);
    ctx.lineTo(x + w - DELETE + 4, y + DELETE - 4);
    ctx.stroke();
  }
}

app.registerExtension({
  name: "multisubject.LayoutEditor",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      this.boxEditor = new BoxEditor(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message, ...args) {
      const result = onExecuted?.call(this, message, ...args);
      this.boxEditor?.showPictures(message?.[UI_KEY]?.[0]);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      if (this.boxEditor) this.boxEditor.units = this.boxEditor.w("units")?.value; // loaded values skip callbacks
      this.boxEditor?.redraw();
      return result;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (...args) {
      const result = onDrawForeground?.apply(this, args);
      this.boxEditor?.redrawIfChanged(); // undo, paste, loads and other extensions set values without callbacks
      return result;
    };
  },
});
