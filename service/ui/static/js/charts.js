// Small SVG and HTML charts: score bars, line charts for training curves, distributions.
// Hand-written because each is a few dozen lines; a charting library would be most of the page.

import { h, s } from "./dom.js";

/** Top-k predictions as labelled bars; `truth` (optional) marks the right label. */
export function scoreBars(predictions, truth) {
  return h(
    "ol",
    { class: "bars" },
    predictions.map((p, i) => {
      const fill = h("div", { class: "bar-fill" });
      fill.style.width = `${Math.max(0, Math.min(1, p.score)) * 100}%`;
      const match = truth && p.label === truth;
      return h(
        "li",
        { class: `bar-row${i === 0 ? " top" : ""}${match ? " match" : ""}` },
        h(
          "div",
          {},
          h("div", { class: "bar-label" }, h("span", { title: p.label }, p.label),
            match ? h("span", { class: "true-mark", title: "the true label" }, h("span", { "aria-hidden": "true" }, "✓"), h("span", { class: "sr-only" }, "true label")) : null),
          h("div", { class: "bar-track", role: "presentation" }, fill),
        ),
        h("span", { class: "bar-score" }, `${(100 * p.score).toFixed(1)}%`),
      );
    }),
  );
}

function niceTicks(min, max, count = 4) {
  if (!(max > min)) return [min];
  const step0 = (max - min) / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= step0) || step0;
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(+v.toFixed(10));
  return ticks;
}

/** A line chart of [{x, y}] points. opts: title, xLabel, yMin, yMax, format(y), series class. */
export function lineChart(points, opts = {}) {
  const W = 420;
  const H = 200;
  const pad = { l: 46, r: 12, t: 26, b: 32 };
  const xs = points.map((p) => p.x);
  const ys = points.map((p) => p.y);
  const xMin = Math.min(...xs, 0);
  const xMax = Math.max(...xs, 1);
  let yMin = opts.yMin ?? Math.min(...ys);
  let yMax = opts.yMax ?? Math.max(...ys);
  if (!Number.isFinite(yMin) || !Number.isFinite(yMax)) [yMin, yMax] = [0, 1];
  if (yMax === yMin) [yMin, yMax] = [yMin - 0.5, yMax + 0.5];
  const fmt = opts.format || ((v) => String(+v.toFixed(3)));
  const X = (x) => pad.l + ((x - xMin) / (xMax - xMin || 1)) * (W - pad.l - pad.r);
  const Y = (y) => H - pad.b - ((y - yMin) / (yMax - yMin)) * (H - pad.t - pad.b);
  const last = points[points.length - 1];
  const label = opts.title
    ? `${opts.title}: ${points.length} points${last ? `, latest ${fmt(last.y)} at ${opts.xLabel || "x"} ${last.x}` : ""}`
    : "chart";
  const svg = s(
    "svg",
    { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label },
    s("title", {}, label),
    opts.title ? s("text", { x: pad.l, y: 15, class: "title" }, opts.title) : null,
    niceTicks(yMin, yMax).map((t) => [
      s("line", { x1: pad.l, x2: W - pad.r, y1: Y(t), y2: Y(t), class: "grid-line" }),
      s("text", { x: pad.l - 6, y: Y(t) + 4, "text-anchor": "end" }, fmt(t)),
    ]),
    niceTicks(xMin, xMax, 5).map((t) =>
      s("text", { x: X(t), y: H - pad.b + 16, "text-anchor": "middle" }, String(t)),
    ),
    s("line", { x1: pad.l, x2: W - pad.r, y1: H - pad.b, y2: H - pad.b, class: "axis" }),
    opts.xLabel ? s("text", { x: W - pad.r, y: H - 4, "text-anchor": "end" }, opts.xLabel) : null,
  );
  if (points.length) {
    const cls = opts.series || "s0";
    svg.append(
      s("polyline", {
        class: `line ${cls}`,
        fill: "none",
        points: points.map((p) => `${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join(" "),
      }),
      s("circle", { class: cls, cx: X(last.x), cy: Y(last.y), r: 3.5 }),
    );
  } else {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for the first step…"));
  }
  return svg;
}

/** A distribution as horizontal bars: rows of {label, count}. */
export function distribution(rows, { caption } = {}) {
  const peak = Math.max(1, ...rows.map((r) => r.count));
  const table = h(
    "div",
    { class: "dist", role: "table", "aria-label": caption || "distribution" },
    rows.map((r) => {
      const bar = h("div");
      bar.style.width = `${(100 * r.count) / peak}%`;
      return h(
        "div",
        { class: "dist-row", role: "row" },
        h("span", { role: "rowheader" }, r.label),
        h("div", { class: "meter", role: "presentation" }, bar),
        h("span", { class: "n", role: "cell" }, r.count.toLocaleString("en-US")),
      );
    }),
  );
  // the label column as wide as the longest label (error codes run long), within reason
  const longest = Math.max(4, ...rows.map((r) => String(r.label).length));
  table.style.setProperty("--label", `${Math.min(longest, 26) + 1}ch`);
  return table;
}

/** A filled meter for used / budget. */
export function meter(used, budget) {
  const bar = h("div");
  bar.style.width = `${budget ? Math.min(100, (100 * used) / budget) : 0}%`;
  return h("div", { class: "meter", role: "meter", "aria-valuemin": 0, "aria-valuemax": budget, "aria-valuenow": used }, bar);
}
