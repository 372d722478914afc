// The `boxes` text of Layout from Boxes <-> box objects, for the canvas editor (layout_editor.js).
// Reads the forms attention/layout.py `parse_boxes` reads; the Python side stays the judge at run time (its
// errors name every form). The editor writes the plain line form in the node's units, labels and comments kept.
// Boxes here are in canvas pixels: {x0, y0, x1, y1, label}.

const NUMBER = /^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$/;

/** Parse `text` into {boxes, comments} or {error}. */
export function parseBoxes(text, units, width, height) {
  const stripped = text.trim();
  if (!stripped) return { boxes: [], comments: [] };
  const scale = units === "pixels" ? [1, 1] : [width, height];
  try {
    if (stripped[0] === "[" || stripped[0] === "{") return { boxes: parseJson(stripped, scale, width, height), comments: [] };
  } catch (e) {
    return { error: String(e.message ?? e) };
  }
  const boxes = [];
  const comments = [];
  for (const raw of stripped.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    if (line.startsWith("#")) {
      comments.push(line);
      continue;
    }
    const cut = line.lastIndexOf(":");
    const tokens = line.slice(cut + 1).split(/[,\s]+/).filter(Boolean);
    if (tokens.length !== 4 || !tokens.every((t) => NUMBER.test(t))) {
      return { error: `cannot read '${line}': write 'x0, y0, x1, y1' or 'label: x0, y0, x1, y1'` };
    }
    const [x0, y0, x1, y1] = tokens.map(Number);
    boxes.push({ x0: x0 * scale[0], y0: y0 * scale[1], x1: x1 * scale[0], y1: y1 * scale[1], label: cut < 0 ? "" : line.slice(0, cut).trim() });
  }
  return { boxes, comments };
}

function parseJson(text, scale, width, height) {
  let data = JSON.parse(text);
  if (!Array.isArray(data)) data = [data];
  if (data.length === 1 && Array.isArray(data[0]) && data[0].length && data[0].every((b) => b && typeof b === "object" && !Array.isArray(b))) data = data[0];
  return data.map((item) => {
    const label = (item && typeof item === "object" && !Array.isArray(item) && (item.label || item.text || item.desc || item.metadata?.label || item.metadata?.text || item.metadata?.desc)) || "";
    if (Array.isArray(item) || Array.isArray(item?.box)) {
      const [x0, y0, x1, y1] = Array.isArray(item) ? item : item.box;
      return { x0: x0 * scale[0], y0: y0 * scale[1], x1: x1 * scale[0], y1: y1 * scale[1], label };
    }
    if (item && "x" in item && "width" in item) return { x0: item.x, y0: item.y, x1: item.x + item.width, y1: item.y + item.height, label };
    if (Array.isArray(item?.bbox)) {
      const [ymin, xmin, ymax, xmax] = item.bbox.map((n) => n / 1000);
      return { x0: xmin * width, y0: ymin * height, x1: xmax * width, y1: ymax * height, label };
    }
    throw new Error(`unknown box ${JSON.stringify(item)}`);
  });
}

/** The line form of `boxes` (canvas pixels) in `units`, after `comments`. */
export function formatBoxes(boxes, comments, units, width, height) {
  const number = (v, size) => (units === "pixels" ? String(Math.round(v)) : trim(v / size));
  const lines = boxes.map((b) => {
    const numbers = [number(b.x0, width), number(b.y0, height), number(b.x1, width), number(b.y1, height)].join(", ");
    return b.label ? `${b.label}: ${numbers}` : numbers;
  });
  return [...comments, ...lines].join("\n");
}

function trim(v) {
  // four decimals: an 8-pixel snap on a 16384-pixel canvas is still exact to a tenth of a pixel
  const text = v.toFixed(4).replace(/0+$/, "");
  return text.endsWith(".") ? text + "00" : text.split(".")[1].length < 2 ? text + "0" : text;
}

/** `box` at least minSize wide and high, moved (never resized) to lie inside a width x height canvas. */
export function clampBox(box, width, height, minSize) {
  const w = Math.min(Math.max(box.x1 - box.x0, minSize), width);
  const h = Math.min(Math.max(box.y1 - box.y0, minSize), height);
  const x0 = Math.min(Math.max(box.x0, 0), width - w);
  const y0 = Math.min(Math.max(box.y0, 0), height - h);
  return { ...box, x0, y0, x1: x0 + w, y1: y0 + h };
}

export function snap(value, step) {
  return step > 1 ? Math.round(value / step) * step : value;
}
