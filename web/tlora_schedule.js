// T-LoRA Schedule node: draws the rank curve (active rank against noise level) live, as its
// widgets change. Plain ES module, no build step; served by ComfyUI from WEB_DIRECTORY.
import { app } from "../../scripts/app.js";

const NODE_ID = "TLoraSchedule";
const NOMINAL_RANK = 64; // drawn when max_rank is 0 (= the file's rank, unknown here)
const TABLE_T = [0, 250, 500, 750, 999];

// The trainers' formula (tlora_core/schedule.py, rank_at_progress / rank_at_timestep).
export function rankAtProgress(u, R, rMin, alpha) {
  u = Math.min(Math.max(u, 0), 1);
  return Math.min(R, Math.floor(Math.pow(u, alpha) * (R - rMin)) + rMin);
}

export function rankAtTimestep(t, p) {
  t += p.offset;
  if (p.truncate) t = Math.trunc(t); // LyCORIS / SimpleTuner / kohya truncate t before the formula
  return rankAtProgress((p.T - t) / (p.T - p.boundary), p.R, p.rMin, p.alpha);
}

function readParams(node) {
  const get = (name, fallback) => {
    const w = node.widgets?.find((x) => x.name === name);
    return w === undefined || w.value === undefined || w.value === null ? fallback : w.value;
  };
  const maxRank = Math.max(0, Math.round(Number(get("max_rank", 0))));
  const rMin = Math.max(0, Math.round(Number(get("min_rank", 1))));
  return {
    fileRank: maxRank === 0,
    R: maxRank === 0 ? Math.max(NOMINAL_RANK, rMin) : maxRank,
    rMin,
    alpha: Number(get("alpha", 1.0)),
    mode: String(get("mode", "timestep")),
    T: Math.max(0.001, Number(get("max_timestep", 1000))),
    boundary: Math.max(0, Number(get("boundary_timestep", 0))),
    offset: Number(get("timestep_offset", 0)),
    truncate: String(get("truncate_t", "as in the file")) !== "none", // "as in the file": drawn as most files do
  };
}

function signature(p) {
  return JSON.stringify(p);
}

function problem(p) {
  if (!(p.alpha > 0) || !Number.isFinite(p.alpha)) return "alpha must be > 0";
  if (p.rMin > p.R) return `min_rank ${p.rMin} is above max_rank ${p.R}`;
  if (!(p.boundary < p.T)) return `boundary_timestep ${p.boundary} is not below max_timestep ${p.T}`;
  return null;
}

function draw(canvas, p) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = Math.max(120, canvas.clientWidth || 240);
  const cssH = Math.max(90, canvas.clientHeight || 150);
  if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  ctx.fillStyle = "#1f2126";
  ctx.fillRect(0, 0, cssW, cssH);

  const pad = { l: 30, r: 10, t: 16, b: 30 };
  const W = cssW - pad.l - pad.r;
  const H = cssH - pad.t - pad.b;
  ctx.font = "10px sans-serif";

  const err = problem(p);
  if (err) {
    ctx.fillStyle = "#ff8080";
    ctx.fillText(err, pad.l, pad.t + H / 2);
    canvas.dataset.ranks = "[]";
    canvas.dataset.error = err;
    return;
  }
  delete canvas.dataset.error;

  // grid and axes
  ctx.strokeStyle = "#3a3d45";
  ctx.lineWidth = 1;
  for (let k = 0; k <= 4; k++) {
    const y = pad.t + (H * k) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.l, y);
    ctx.lineTo(pad.l + W, y);
    ctx.stroke();
  }
  ctx.fillStyle = "#9a9ca5";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  ctx.fillText(String(p.R), pad.l - 4, pad.t);
  ctx.fillText(String(p.rMin), pad.l - 4, pad.t + H * (1 - p.rMin / p.R));
  ctx.textBaseline = "top";
  const stepMode = p.mode === "step_index";
  ctx.textAlign = "left";
  ctx.fillText(stepMode ? "first step" : `t=${p.T} (noise)`, pad.l, pad.t + H + 3);
  ctx.textAlign = "right";
  ctx.fillText(stepMode ? "last step" : "t=0 (clean)", pad.l + W, pad.t + H + 3);
  ctx.textAlign = "center";
  ctx.fillText(stepMode ? "sampling steps \u2192" : "noise level \u2192 sampling order", pad.l + W / 2, pad.t + H + 15);

  // the curve: x runs in sampling order (noise on the left, clean on the right)
  const points = [];
  const n = Math.max(2, Math.round(W));
  for (let i = 0; i <= n; i++) {
    const frac = i / n; // progress u
    const r = stepMode ? rankAtProgress(frac, p.R, p.rMin, p.alpha) : rankAtTimestep(p.T * (1 - frac), p);
    points.push([pad.l + W * frac, pad.t + H * (1 - r / p.R), r]);
  }
  ctx.strokeStyle = "#5aaaff";
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach(([x, y], i) => {
    if (i === 0) ctx.moveTo(x, y);
    else {
      ctx.lineTo(x, points[i - 1][1]);
      ctx.lineTo(x, y);
    }
  });
  ctx.stroke();
  ctx.fillStyle = "rgba(90,170,255,0.15)";
  ctx.lineTo(pad.l + W, pad.t + H);
  ctx.lineTo(pad.l, pad.t + H);
  ctx.fill();

  ctx.fillStyle = "#d8dae0";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  const rankText = p.fileRank ? `R = file's rank (${p.R} shown)` : `R = ${p.R}`;
  ctx.fillText(`${rankText}, min ${p.rMin}, alpha ${+p.alpha.toFixed(3)}`, pad.l + 4, 2);

  const ranks = TABLE_T.map((t) => (stepMode ? rankAtProgress(1 - t / 1000, p.R, p.rMin, p.alpha) : rankAtTimestep(t * p.T / 1000, p)));
  canvas.dataset.ranks = JSON.stringify(ranks);
  canvas.dataset.params = JSON.stringify(p);
  canvas.dataset.curve = JSON.stringify(points.map((q) => q[2]));
  canvas.title = TABLE_T.map((t, i) => `t=${+(t * p.T / 1000).toPrecision(4)}: ${ranks[i]}`).join("   ");
}

function attachCurve(node) {
  const box = document.createElement("div");
  box.className = "tlora-curve-box";
  box.style.cssText = "width:100%;height:100%;min-height:140px;display:flex;";
  const canvas = document.createElement("canvas");
  canvas.className = "tlora-curve";
  canvas.style.cssText = "width:100%;height:100%;border-radius:4px;display:block;";
  box.appendChild(canvas);

  const widget = node.addDOMWidget("rank_curve", "tlora_curve", box, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => 150,
    getValue: () => undefined,
    setValue: () => {},
  });
  widget.serialize = false; // not a value: keep widgets_values and the prompt unchanged

  let last = "";
  let drawCount = 0;
  const redraw = (force = false) => {
    const p = readParams(node);
    const sig = signature(p) + `|${canvas.clientWidth}x${canvas.clientHeight}`;
    if (!force && sig === last) return;
    last = sig;
    draw(canvas, p);
    canvas.dataset.drawCount = String(++drawCount);
  };
  node.tloraRedraw = redraw;

  for (const w of node.widgets ?? []) {
    if (w === widget) continue;
    const cb = w.callback;
    w.callback = function (...args) {
      const r = cb?.apply(this, args);
      redraw();
      return r;
    };
  }
  // values can also change without a callback (workflow load, undo, another extension)
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (...args) {
    const r = onDrawForeground?.apply(this, args);
    redraw();
    return r;
  };
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => redraw()).observe(canvas);
  requestAnimationFrame(() => redraw(true));

  const [w, h] = node.size;
  node.setSize([Math.max(w, 300), Math.max(h, node.computeSize()[1])]);
}

app.registerExtension({
  name: "tlora.ScheduleCurve",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = onNodeCreated?.apply(this, args);
      attachCurve(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const r = onConfigure?.apply(this, args);
      this.tloraRedraw?.(true);
      return r;
    };
  },
});
