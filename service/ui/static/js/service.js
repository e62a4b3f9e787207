// Service: is it ready, which runtime and why, what is in memory, and is it keeping up. The
// traffic figures are parsed from GET /metrics, the same text Prometheus scrapes.

import { api, getAllowing503 } from "./api.js";
import { distribution, lineChart, meter } from "./charts.js";
import { bytes, chip, clear, errorBox, h, ms, num } from "./dom.js";
import { difference, histogram, parse, perBucket, quantile, total } from "./prom.js";

const EVERY_MS = 2000;
const RATE_POINTS = 60; // two minutes of the request rate, one point a poll
const SHOWN = new Set(["status", "store", "resident", "device_bytes", "host_bytes"]);

function readiness(status, body) {
  if (!body) return h("p", { class: "muted" }, "No answer from /readyz.");
  const state = status === 200 ? (body.store === "degraded" ? "degraded" : "ready") : body.status || "not ready";
  const extra = Object.entries(body).filter(([k]) => !SHOWN.has(k) && !["backbone", "pretrained", "device", "fingerprint", "runtime", "runtime_reason"].includes(k));
  return h(
    "div",
    { class: "stack" },
    h("p", {}, chip(state, state === "ready" ? "ready" : state === "degraded" ? "degraded" : "starting"), " ",
      h("span", { class: "muted small" }, `GET /readyz answered ${status}`)),
    h("dl", { class: "kv" },
      h("dt", {}, "Backbone"), h("dd", {}, `${body.backbone || "–"}`, body.pretrained ? h("span", { class: "muted" }, ` (${body.pretrained})`) : null),
      h("dt", {}, "Device"), h("dd", {}, body.device || "–"),
      h("dt", {}, "Runtime"), h("dd", { class: "runtime" }, h("strong", {}, body.runtime || "–")),
      h("dt", {}, "Why"), h("dd", { class: "runtime-reason" }, body.runtime_reason || "–"),
      h("dt", {}, "Store"), h("dd", {}, body.store ? chip(body.store, body.store === "ok" ? "ok" : "bad") : "–"),
      h("dt", {}, "Fingerprint"), h("dd", { class: "mono small" }, body.fingerprint ? body.fingerprint.replace(/^sha256:/, "").slice(0, 16) : "–"),
      extra.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { class: "small" }, typeof v === "object" ? JSON.stringify(v) : String(v))])),
  );
}

function memory(res) {
  const tier = (name, used, budget) => h("div", {}, h("div", { class: "bar-label" }, h("span", {}, name), h("span", { class: "muted small" }, `${bytes(used)} of ${bytes(budget)}`)), meter(used, budget));
  return h(
    "div",
    { class: "stack" },
    tier(`Device (${res.device})`, res.device_bytes, res.device_budget_bytes),
    tier("Host memory", res.host_bytes, res.host_budget_bytes),
    res.residents.length
      ? h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, "Checkpoint"), h("th", {}, "Method"), h("th", {}, "Where"), h("th", { class: "num" }, "Size"))),
          h("tbody", {}, res.residents.map((r) => h("tr", {},
            h("td", {}, h("a", { href: `#/checkpoints/${encodeURIComponent(r.name)}` }, r.name), ` v${r.version}`, res.serving[r.name] === r.version ? chip("serving", "live") : null),
            h("td", {}, r.method), h("td", {}, r.tier), h("td", { class: "num" }, bytes(r.bytes)))))))
      : h("p", { class: "muted small" }, "Nothing resident yet: checkpoints load on their first request."),
  );
}

function stat(label, value, cls) {
  return h("div", { class: `stat ${cls || ""}` }, h("span", { class: "value" }, value), h("span", { class: "label" }, label));
}

function traffic(samples, previous, seconds, rates) {
  const lat = histogram(samples, "promptserve_request_seconds");
  const batch = histogram(samples, "promptserve_batch_images");
  const window = previous ? difference(lat, previous.lat) : null;
  const rate = window && seconds > 0 ? window.count / seconds : null;
  const errors = (samples.get("promptserve_errors_total") || []).filter((x) => x.value > 0);
  // Per route only: the service keeps no per-checkpoint label (its cardinality would be unbounded).
  const routes = (samples.get("promptserve_request_seconds_count") || [])
    .map((x) => ({ route: x.labels.route, count: x.value, sum: total(samples, "promptserve_request_seconds_sum", x.labels) }))
    .filter((r) => r.count > 0)
    .sort((a, b) => b.count - a.count);
  if (rate !== null) rates.push({ x: rates.length ? rates[rates.length - 1].x + seconds : 0, y: rate });
  if (rates.length > RATE_POINTS) rates.splice(0, rates.length - RATE_POINTS);
  return {
    lat,
    view: h(
      "div",
      { class: "stack" },
      h("div", { class: "stats" },
        stat("requests / s (last 2 s)", rate === null ? "…" : rate.toFixed(rate < 10 ? 1 : 0), "rate"),
        stat("requests served", num(lat.count), "requests"),
        stat("p50 latency", ms(quantile(0.5, lat))),
        stat("p95 latency", ms(quantile(0.95, lat))),
        stat("p99 latency", ms(quantile(0.99, lat))),
        stat("mean batch", batch.count ? (batch.sum / batch.count).toFixed(1) : "–"),
        stat("queue depth", num(total(samples, "promptserve_queue_depth"))),
        stat("errors", num(errors.reduce((a, x) => a + x.value, 0)))),
      h("div", { class: "grid cols-2" },
        h("div", {}, h("h3", {}, "Latency (since start)"), distribution(perBucket(lat, (le) => `≤ ${ms(le)}`), { caption: "request latency" })),
        h("div", {}, h("h3", {}, "Images per encoder batch"), distribution(perBucket(batch, (le) => `≤ ${le}`), { caption: "batch size" }))),
      h("div", { class: "grid cols-2" },
        h("div", {}, lineChart(rates.map((p) => ({ x: Math.round(p.x), y: p.y })), { title: "Requests / s while this page is open", xLabel: "seconds", yMin: 0, format: (v) => (v < 10 ? v.toFixed(1) : v.toFixed(0)) })),
        routes.length ? h("div", {}, h("h3", {}, "By route"), h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, "Route"), h("th", { class: "num" }, "Requests"), h("th", { class: "num" }, "Mean latency"))),
          h("tbody", {}, routes.map((r) => h("tr", {}, h("td", {}, r.route), h("td", { class: "num" }, num(r.count)), h("td", { class: "num" }, ms(r.sum / r.count)))))))) : h("div")),
      errors.length ? h("div", {}, h("h3", {}, "Errors by code"), distribution(errors.map((x) => ({ label: x.labels.code, count: x.value })), { caption: "errors" })) : null,
    ),
  };
}

export function render(root, ctx) {
  const ready = h("div", {}, h("p", { class: "muted" }, "Asking /readyz…"));
  const mem = h("div", {}, h("p", { class: "muted" }, "Asking /v1/residency…"));
  const load = h("div", {}, h("p", { class: "muted" }, "Reading /metrics…"));
  let previous = null;
  const rates = []; // {x: seconds since the first poll, y: requests / s}
  let timer = null;
  let stopped = false;

  async function tick() {
    const started = performance.now();
    const [r, m, t] = await Promise.allSettled([getAllowing503("/readyz"), api("/v1/residency"), api("/metrics", { text: true })]);
    if (stopped) return;
    clear(ready, r.status === "fulfilled" ? readiness(r.value.status, r.value.data) : errorBox(r.reason));
    clear(mem, m.status === "fulfilled" ? memory(m.value) : errorBox(m.reason));
    if (t.status === "fulfilled") {
      const now = performance.now();
      const out = traffic(parse(t.value), previous, previous ? (now - previous.at) / 1000 : 0, rates);
      previous = { at: now, lat: out.lat };
      clear(load, out.view);
    } else {
      clear(load, errorBox(t.reason));
    }
    timer = setTimeout(tick, Math.max(200, EVERY_MS - (performance.now() - started)));
  }

  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Service"), h("p", {}, "Is the server keeping up?")),
    ...(ctx.auth ? [] : [h("div", { class: "notice warn" }, h("strong", {}, "Auth is off. "), "This service has no API keys, so it only listens on loopback and every caller is an admin. Set PROMPTSERVE_API_KEYS and PROMPTSERVE_ADMIN_KEYS to serve others.")]),
    h("div", { class: "grid" }, h("div", { class: "grid cols-2" },
      h("section", { class: "card", "aria-labelledby": "ready-h" }, h("h2", { id: "ready-h" }, "Readiness and runtime"), ready),
      h("section", { class: "card", "aria-labelledby": "mem-h" }, h("h2", { id: "mem-h" }, "Resident checkpoints"), mem)),
    h("section", { class: "card", "aria-labelledby": "load-h" },
      h("div", { class: "card-head" }, h("h2", { id: "load-h" }, "Traffic"), h("span", { class: "muted small" }, "From ", h("a", { href: "/metrics" }, "/metrics"), ", read every 2 s")),
      load)),
  );
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
