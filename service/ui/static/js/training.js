// Training: submit a job (dataset, method, recipe), watch its progress and live loss and
// accuracy curves (GET /v1/jobs/{id} carries a bounded history), cancel it, open what it published.
// The API has no job listing, so the jobs this tab submitted or opened are remembered here.

import { api } from "./api.js";
import { lineChart } from "./charts.js";
import { chip, clear, errorBox, field, h, metric, pct, when } from "./dom.js";

// The dataset kinds this form can describe (an upload carries its images in the job itself).
const KINDS = { proving_ground: "Proving ground", image_folder: "Image folder", coop_split: "CoOp split" };
const RECENT = "promptserve.jobs";
const ENDED = ["finished", "failed", "cancelled"];

const form = {
  name: "my-checkpoint", method: "vpt", kind: "proving_ground", domain: "", root: "", split_file: "", shots: 16,
  recipe: '{"epochs": 10, "optimizer": "adamw", "lr": 0.03, "warmup_epochs": 0}', method_config: "{}", activate: true,
};
let options = null; // GET /v1/training/options: what the service can train

async function loadOptions() {
  if (options === null) options = await api("/v1/training/options");
  return options;
}

// A method's config for the proving ground's small backbone, while the field still holds a
// suggestion (never over what the user typed).
function suggestedConfig(method) {
  const config = (options && options.proving_ground.method_config[method]) || {};
  return JSON.stringify(config);
}

function recent() {
  try {
    return JSON.parse(sessionStorage.getItem(RECENT) || "[]");
  } catch {
    return [];
  }
}

function remember(job) {
  const jobs = recent().filter((j) => j.id !== job.id);
  jobs.unshift({ id: job.id, name: job.name || "", method: job.method || "" });
  sessionStorage.setItem(RECENT, JSON.stringify(jobs.slice(0, 20)));
}

function parseJson(text, label) {
  try {
    const value = JSON.parse(text || "{}");
    if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("not an object");
    return value;
  } catch (err) {
    throw Object.assign(new Error(`${label} must be a JSON object: ${err.message}`), { code: "invalid_json" });
  }
}

function submitForm(ctx, out, opts) {
  if (!form.domain) form.domain = opts.proving_ground.domains.find((d) => d !== "source") || opts.proving_ground.domains[0];
  const kinds = Object.fromEntries(Object.entries(KINDS).filter(([k]) => opts.datasets.includes(k)));
  const input = (key, props = {}) => h("input", { value: String(form[key]), ...props, onInput: (e) => { form[key] = e.target.value; } });
  const select = (key, options, onChange) => h("select", { onChange: (e) => { form[key] = e.target.value; if (onChange) onChange(); } },
    Object.entries(options).map(([value, label]) => h("option", { value, selected: form[key] === value }, label)));
  const datasetBox = h("div");
  const drawDataset = () => {
    if (form.kind === "proving_ground") {
      clear(datasetBox, field("Domain", select("domain", Object.fromEntries(opts.proving_ground.domains.map((d) => [d, d]))), "Generated images of coloured shapes under this camera shift: what the prompt adapts to."));
    } else {
      clear(datasetBox, field("Root folder", input("root"), "A folder on the server (or the worker) that trains."), form.kind === "coop_split" ? field("Split file", input("split_file")) : null);
    }
  };
  drawDataset();
  const recipe = h("textarea", { rows: 3, value: form.recipe, onInput: (e) => { form.recipe = e.target.value; } });
  const config = h("textarea", { rows: 1, class: "short", value: form.method_config, onInput: (e) => { form.method_config = e.target.value; } });
  const onMethod = (previous) => {
    if (form.method_config.trim() === suggestedConfig(previous) || form.method_config.trim() === "{}") {
      form.method_config = suggestedConfig(form.method);
      config.value = form.method_config;
    }
  };
  let lastMethod = form.method;
  const activate = h("input", { type: "checkbox", checked: form.activate, onChange: (e) => { form.activate = e.target.checked; } });
  const send = h("button", { type: "submit", class: "primary" }, "Start training");
  const el = h(
    "form",
    { class: "card stack", "aria-labelledby": "train-h" },
    h("h2", { id: "train-h" }, "New training job"),
    h("div", { class: "inline" }, field("Checkpoint name", input("name", { required: true, spellcheck: "false" })), field("Method", select("method", Object.fromEntries(opts.methods.map((m) => [m, m])), () => { onMethod(lastMethod); lastMethod = form.method; }))),
    h("div", { class: "inline" }, field("Dataset", select("kind", kinds, drawDataset)), field("Shots per class", input("shots", { type: "number", min: 1, max: 10000 }))),
    datasetBox,
    field("Recipe overrides (JSON)", recipe, "Over the method's published recipe: epochs, lr, batch_size, optimizer…"),
    field("Method config (JSON)", config),
    h("label", { class: "check" }, activate, "Make the result live when it finishes"),
    send,
    out,
  );
  el.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let spec;
    try {
      const dataset = { kind: form.kind };
      if (form.kind === "proving_ground") dataset.domain = form.domain;
      else dataset.root = form.root;
      if (form.kind === "coop_split") dataset.split_file = form.split_file;
      spec = {
        name: form.name.trim(), method: form.method, dataset, shots: Number(form.shots) || null,
        recipe: parseJson(form.recipe, "Recipe"), method_config: parseJson(form.method_config, "Method config"), activate: form.activate,
      };
    } catch (err) {
      return clear(out, errorBox(err));
    }
    send.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: spec });
      remember({ ...job, name: spec.name, method: spec.method });
      ctx.go(`#/training/${job.id}`);
    } catch (err) {
      clear(out, errorBox(err));
    }
    send.disabled = false;
  });
  return el;
}

function jobList(ctx, current) {
  const id = h("input", { type: "text", placeholder: "job id", spellcheck: "false", autocomplete: "off" });
  const jobs = recent();
  return h(
    "section",
    { class: "card stack", "aria-labelledby": "jobs-h" },
    h("h2", { id: "jobs-h" }, "Jobs"),
    jobs.length
      ? h("ul", { class: "bars" }, jobs.map((j) => h("li", {}, h("a", { href: `#/training/${j.id}`, "aria-current": j.id === current ? "true" : null }, `${j.name || j.id.slice(0, 8)}`), h("span", { class: "muted small" }, ` ${j.method} · ${j.id.slice(0, 8)}`))))
      : h("p", { class: "muted small" }, "Jobs started from this tab appear here."),
    h("form", { class: "inline bottom", onSubmit: (ev) => { ev.preventDefault(); if (id.value.trim()) ctx.go(`#/training/${id.value.trim()}`); } },
      field("Open a job by id", id), h("div", { class: "field" }, h("button", { type: "submit" }, "Open"))),
  );
}

function progressBar(p) {
  const done = p.steps ? p.step / p.steps : p.epochs ? (p.epoch - 1) / p.epochs : 0;
  const bar = h("div");
  bar.style.width = `${Math.round(100 * Math.min(1, done))}%`;
  return h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(100 * done), "aria-label": "training progress" }, bar);
}

function jobView(ctx, jobId) {
  const box = h("section", { class: "card stack", "aria-labelledby": "job-h", "aria-live": "polite" }, h("p", { class: "muted" }, "Loading the job…"));
  let timer = null;
  let stopped = false;

  async function cancel() {
    try {
      await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" });
      ctx.toast("Cancel requested");
      poll();
    } catch (err) {
      box.append(errorBox(err));
    }
  }

  function draw(job) {
    const p = job.progress;
    const history = (job.history || []).map((row, i) => ({ x: row.step ?? i + 1, loss: row.loss, acc: row.acc }));
    const running = !ENDED.includes(job.state);
    clear(
      box,
      h("div", { class: "card-head" },
        h("h2", { id: "job-h" }, job.name || "job", " ", h("span", { class: "muted small mono" }, job.method || "")),
        h("div", { class: "actions" }, h("span", { class: "job-state" }, chip(job.state, job.state)),
          ctx.isAdmin && running ? h("button", { type: "button", class: "small danger", onClick: cancel, disabled: Boolean(job.cancel_requested) }, job.cancel_requested ? "Stopping…" : "Cancel") : null)),
      h("p", { class: "muted small mono" }, `id ${job.id} · submitted ${when(job.created_at)}`),
      p ? h("div", { class: "stack" }, progressBar(p),
        h("p", { class: "small" }, `epoch ${p.epoch} of ${p.epochs}`, p.steps ? ` · step ${p.step} of ${p.steps}` : "", ` · loss ${p.loss.toFixed(3)} · accuracy ${pct(p.acc)}`, p.eta_s != null && running ? ` · about ${Math.ceil(p.eta_s)} s left` : "")) : null,
      job.state === "queued" ? h("p", { class: "muted" }, "Waiting for a worker…") : null,
      h("div", { class: "grid cols-2" },
        lineChart(history.map((r) => ({ x: r.x, y: r.loss })), { title: "Training loss", xLabel: "step", yMin: 0 }),
        lineChart(history.map((r) => ({ x: r.x, y: r.acc })), { title: "Training accuracy", xLabel: "step", yMin: 0, yMax: 1, series: "s1", format: (v) => `${Math.round(v * 100)}%` })),
      job.error ? errorBox(job.error) : null,
      job.result ? h("div", { class: "success stack" },
        h("p", {}, `Published ${job.result.name} v${job.result.version}. `, h("a", { href: `#/checkpoints/${encodeURIComponent(job.result.name)}`, class: "open-checkpoint" }, `Open ${job.result.name} v${job.result.version}`)),
        h("dl", { class: "kv" }, Object.entries(job.result.metrics || {}).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, metric(k, v))]))) : null,
    );
  }

  async function poll() {
    clearTimeout(timer);
    try {
      const job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
      if (stopped) return;
      remember(job);
      draw(job);
      if (!ENDED.includes(job.state)) timer = setTimeout(poll, 1000);
    } catch (err) {
      if (!stopped) clear(box, errorBox(err));
    }
  }
  poll();
  return { el: box, stop: () => { stopped = true; clearTimeout(timer); } };
}

export function render(root, ctx, jobId) {
  const out = h("div", { "aria-live": "polite" });
  const view = jobId ? jobView(ctx, jobId) : null;
  const formBox = h("div");
  if (ctx.isAdmin) {
    loadOptions().then(
      (opts) => clear(formBox, submitForm(ctx, out, opts)),
      (err) => clear(formBox, h("div", { class: "card" }, errorBox(err))),
    );
  }
  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Training"), h("p", {}, "How is the training job doing?")),
    h(
      "div",
      { class: "grid side" },
      h("div", { class: "grid" }, ctx.isAdmin ? formBox : null, jobList(ctx, jobId)),
      view ? view.el : h("div", { class: "card" }, h("p", { class: "empty" }, ctx.isAdmin ? "Start a job, or open one, to watch its curves here." : "Open a job to watch its curves here. Starting jobs needs an admin key.")),
    ),
  );
  return view ? view.stop : null;
}
