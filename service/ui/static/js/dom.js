// Building the page from plain DOM calls: text always goes in as text (never parsed as HTML),
// so names and messages from the API cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function apply(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.setAttribute("class", value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "value" && "value" in el) el.value = value;
    else if (key === "checked" || key === "selected" || key === "disabled") el[key] = Boolean(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** h("button", {class: "primary", onClick}, "Save") */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  apply(el, props);
  append(el, children);
  return el;
}

/** The same for SVG elements. */
export function s(tag, props = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** The API's error as the API said it: status, code and message, verbatim. */
export function errorBox(err) {
  if (!err) return null;
  const status = err.status ? `${err.status}` : "";
  return h(
    "div",
    { class: "error", role: "alert" },
    status ? h("span", { class: "error-status" }, status) : null,
    err.code ? h("span", { class: "error-code" }, err.code) : null,
    h("span", { class: "error-message" }, err.message || String(err)),
  );
}

export function chip(text, kind = "") {
  return h("span", { class: `chip ${kind}`.trim() }, text);
}

let seq = 0;
export function uid(prefix = "id") {
  seq += 1;
  return `${prefix}-${seq}`;
}

export function field(label, control, hint) {
  if (!control.id) control.id = uid("f");
  return h(
    "div",
    { class: "field" },
    h("label", { for: control.id }, label),
    control,
    hint ? h("p", { class: "hint" }, hint) : null,
  );
}

// --- formatting ----------------------------------------------------------------------------

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

export function pct(x, digits = 1) {
  return x === null || x === undefined || Number.isNaN(x) ? "–" : `${(100 * x).toFixed(digits)}%`;
}

export function num(x) {
  return x === null || x === undefined ? "–" : Number(x).toLocaleString("en-US");
}

export function ms(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  if (seconds < 1) return `${+(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms`;
  return `${+seconds.toFixed(2)} s`;
}

/** A metric as people read it: accuracies as percentages, seconds as durations, other numbers
 *  to four significant digits (a loss of 2.69339719414711 is 2.693). */
export function metric(key, value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return JSON.stringify(value);
  if (typeof value !== "number") return String(value);
  if (/acc(uracy)?$|^hm$/.test(key)) return pct(value);
  if (/seconds$|_s$/.test(key)) return ms(value);
  return Number.isInteger(value) ? num(value) : String(+value.toPrecision(4));
}

export function when(value) {
  if (value === null || value === undefined) return "–";
  const d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function debounce(fn, wait = 250) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), wait);
  };
}
