// Classify: images (dropped, picked, or the configured examples) against one or several
// checkpoints (pinned versions allowed: that is how two versions are compared), or ad-hoc class
// names. One POST /v1/classify answers every column at once, on the same images.

import { api, dataUrl, getBlob } from "./api.js";
import { scoreBars } from "./charts.js";
import { chip, clear, debounce, errorBox, field, h, uid } from "./dom.js";

const MAX_IMAGES = 16;
const MAX_TARGETS = 4;
const TYPES = ["image/png", "image/jpeg", "image/webp"];

// Kept while the tab lives, so a trip to another screen does not lose the images.
const state = {
  images: [], // {id, name, src, data, truth}
  mode: "checkpoints",
  targets: [{ name: "", version: "" }], // version "": whatever is live
  classnames: "",
  templates: "a photo of a {}.",
  baseline: false, // also zero-shot on the first checkpoint's class names: what the prompt adds
  topK: 3,
  answer: null, // {images, results, seconds} or {error}
  primed: false,
};
let examples = null;
// The drawing functions of the Classify screen on display (null while another screen shows):
// what finishes late (the first visit's priming) redraws the screen a person sees now.
let view = null;

/** Open Classify on these checkpoint references side by side (e.g. two versions of one), keeping
 *  the images already chosen. targets: [{name, version}] with version "" for the live one. */
export function compare(targets) {
  state.mode = "checkpoints";
  state.targets = targets.slice(0, MAX_TARGETS).map((t) => ({ name: t.name, version: String(t.version || "") }));
  state.baseline = false;
  state.answer = null;
}

// The examples need the key like any data, so each is fetched once with it and shown from a
// blob: URL (which the page's CSP allows).
async function loadExamples() {
  if (examples === null) {
    try {
      const list = (await api("/ui/examples.json")).examples;
      examples = await Promise.all(list.map(async (ex) => {
        const blob = await getBlob(ex.url);
        return { ...ex, src: URL.createObjectURL(blob), data: await dataUrl(blob) };
      }));
    } catch {
      examples = [];
    }
  }
  return examples;
}

function addExample(ex) {
  if (state.images.length >= MAX_IMAGES || state.images.some((i) => i.example === ex.file)) return;
  state.images.push({ id: uid("img"), name: ex.file, src: ex.src, data: ex.data, truth: ex.label, example: ex.file });
}

async function addFiles(files, onError) {
  for (const file of files) {
    if (state.images.length >= MAX_IMAGES) {
      onError(`at most ${MAX_IMAGES} images at a time in the console`);
      break;
    }
    if (!TYPES.includes(file.type)) {
      onError(`${file.name}: not a PNG, JPEG or WebP image`);
      continue;
    }
    state.images.push({ id: uid("img"), name: file.name, src: URL.createObjectURL(file), data: await dataUrl(file), truth: null });
  }
}

function refOf(t) {
  return t.version ? `${t.name}@${t.version}` : t.name;
}

// The baseline column: plain zero-shot (ad-hoc class names, the service's default templates) on
// the class names of the first checkpoint, as pinned. Two requests, the same images.
async function baselineResult() {
  const t = state.targets.find((x) => x.name.trim());
  if (state.mode !== "checkpoints" || !state.baseline || !t) return null;
  const name = encodeURIComponent(t.name);
  const classnames = t.version
    ? (await api(`/v1/checkpoints/${name}/versions/${t.version}`)).manifest.classnames
    : (await api(`/v1/checkpoints/${name}`)).classnames;
  const body = { images: state.images.map((i) => i.data), top_k: state.topK, classnames };
  const answer = await api("/v1/classify", { method: "POST", json: body });
  return { ...answer.results[0], baseline: refOf(t) };
}

function requestBody() {
  const body = { images: state.images.map((i) => i.data), top_k: state.topK };
  if (state.mode === "adhoc") {
    body.classnames = state.classnames.split("\n").map((x) => x.trim()).filter(Boolean);
    const templates = state.templates.split("\n").map((x) => x.trim()).filter(Boolean);
    if (templates.length) body.templates = templates;
    return body;
  }
  const refs = state.targets.filter((t) => t.name.trim()).map(refOf);
  if (refs.length === 1) body.checkpoint = refs[0];
  else body.checkpoints = refs;
  return body;
}

export function render(root, ctx) {
  const datalist = h("datalist", { id: uid("ckpts") });
  const imagesBox = h("div");
  const examplesBox = h("div");
  const targetsBox = h("div");
  const resultsBox = h("div", { "aria-live": "polite" });
  const message = h("div", { role: "status" });
  const go = h("button", { class: "primary", type: "submit" }, "Classify");

  const fail = (text) => ctx.toast(text);

  const searchNames = debounce(async (q) => {
    try {
      const page = await api(`/v1/checkpoints?limit=20&q=${encodeURIComponent(q)}`);
      clear(datalist, page.checkpoints.map((c) => h("option", { value: c.name }, c.method ? `${c.method}, v${c.version}` : "")));
    } catch {
      /* suggestions only: the request itself reports a bad name */
    }
  }, 200);

  function drawImages() {
    const input = h("input", { type: "file", class: "sr-only", multiple: true, accept: TYPES.join(","), "aria-label": "Choose images" });
    input.addEventListener("change", async () => {
      await addFiles(input.files, fail);
      drawImages();
    });
    const drop = h(
      "label",
      { class: "drop" },
      input,
      h("span", {}, "Drop images here or ", h("strong", {}, "choose files")),
      h("span", { class: "hint" }, `PNG, JPEG or WebP · up to ${MAX_IMAGES}`),
    );
    drop.addEventListener("dragover", (ev) => {
      ev.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", async (ev) => {
      ev.preventDefault();
      drop.classList.remove("over");
      await addFiles(ev.dataTransfer.files, fail);
      drawImages();
    });
    const thumbs = state.images.map((img) =>
      h(
        "div",
        { class: "thumb" },
        h("img", { src: img.src, alt: img.truth ? `${img.name} (${img.truth})` : img.name }),
        h("div", { class: "cap", title: img.name }, img.truth || img.name),
        h("button", {
          class: "remove", type: "button", "aria-label": `Remove ${img.name}`,
          onClick: () => {
            state.images = state.images.filter((x) => x.id !== img.id);
            drawImages();
          },
        }, "✕"),
      ),
    );
    clear(
      imagesBox,
      drop,
      thumbs.length
        ? h(
            "div",
            { class: "stack" },
            h("div", { class: "card-head" }, h("span", { class: "muted small" }, `${thumbs.length} image${thumbs.length > 1 ? "s" : ""}`),
              h("button", { type: "button", class: "link", onClick: () => { state.images = []; drawImages(); } }, "Clear all")),
            h("div", { class: "thumbs" }, thumbs),
          )
        : null,
    );
    go.disabled = !state.images.length;
    drawExamples();
  }

  async function drawExamples() {
    const list = await loadExamples();
    if (!list.length) return clear(examplesBox);
    // Grouped as the folder's labels.json groups them (the demo: by domain), so one domain's
    // images can be tried against the checkpoint trained for it.
    const groups = new Map();
    for (const ex of list) {
      const key = ex.group || "";
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(ex);
    }
    const addAll = (items) => { for (const ex of items) addExample(ex); drawImages(); };
    clear(
      examplesBox,
      h("div", { class: "card-head" }, h("h3", {}, "Examples"),
        h("button", { type: "button", class: "link", onClick: () => addAll(list) }, "Add all")),
      [...groups.entries()].map(([group, items]) => h("div", { class: "example-group" },
        group ? h("div", { class: "card-head" }, h("span", { class: "small muted" }, group),
          h("button", { type: "button", class: "link small", "aria-label": `Add all ${group} examples`, onClick: () => addAll(items) }, `Add ${items.length}`)) : null,
        h("div", { class: "thumbs" }, items.map((ex) => {
          const chosen = state.images.some((i) => i.example === ex.file);
          return h("button", {
            type: "button", class: "thumb", "aria-pressed": String(chosen),
            "aria-label": `Add example ${ex.file}${ex.label ? `, true label ${ex.label}` : ""}`,
            onClick: () => { addExample(ex); drawImages(); },
          }, h("img", { src: ex.src, alt: "" }), h("div", { class: "cap" }, ex.label || ex.file));
        })))),
    );
  }

  async function versionOptions(select, target) {
    clear(select, h("option", { value: "" }, "live"));
    const name = target.name;
    select.dataset.name = name;
    if (!name) return;
    try {
      const { versions } = await api(`/v1/checkpoints/${encodeURIComponent(name)}/versions`);
      // Typed on meanwhile: an older answer must not replace the versions of the newer name.
      if (select.dataset.name !== name) return;
      const live = versions.find((v) => v.active);
      clear(
        select,
        h("option", { value: "" }, live ? `live (v${live.version})` : "live"),
        versions.slice().reverse().map((v) => h("option", { value: String(v.version), selected: String(v.version) === target.version }, `v${v.version}${v.active ? " · live" : ""}`)),
      );
    } catch {
      /* unknown name: the classify request will say so */
    }
  }

  function drawTargets() {
    if (state.mode === "adhoc") {
      const names = h("textarea", { rows: 4, placeholder: "red circle\nblue square", value: state.classnames, onInput: (e) => { state.classnames = e.target.value; } });
      const templates = h("textarea", { rows: 2, value: state.templates, onInput: (e) => { state.templates = e.target.value; } });
      clear(targetsBox, field("Class names, one per line", names), field("Templates, one per line", templates, "{} marks where the class name goes; the scores average over templates."));
      return;
    }
    const rows = state.targets.map((t, i) => {
      const name = h("input", { type: "text", list: datalist.id, value: t.name, autocomplete: "off", placeholder: "search checkpoints", spellcheck: "false" });
      const version = h("select", {});
      name.addEventListener("input", () => { t.name = name.value.trim(); searchNames(t.name); });
      name.addEventListener("change", () => { t.name = name.value.trim(); t.version = ""; versionOptions(version, t); });
      version.addEventListener("change", () => { t.version = version.value; });
      versionOptions(version, t);
      return h(
        "div",
        { class: "target-row" },
        field(i === 0 ? "Checkpoint" : `Compare with`, name),
        field("Version", version),
        h("div", { class: "field" }, state.targets.length > 1
          ? h("button", { type: "button", class: "small", "aria-label": `Remove ${t.name || "this checkpoint"}`, onClick: () => { state.targets.splice(i, 1); drawTargets(); } }, "✕")
          : h("span")),
      );
    });
    const baseline = h("input", { type: "checkbox", checked: state.baseline, onChange: (e) => { state.baseline = e.target.checked; } });
    clear(
      targetsBox,
      rows,
      h("label", { class: "check" }, baseline, "Zero-shot beside it: the same class names, no prompt"),
      state.targets.length < MAX_TARGETS
        ? h("button", { type: "button", class: "small wrap", onClick: () => { state.targets.push({ name: state.targets[0].name, version: "" }); drawTargets(); } }, "+ Compare with another checkpoint or version")
        : null,
    );
  }

  // One column per checkpoint, aligned from image to image (CSSOM, which the CSP allows).
  function answersGrid(n, children) {
    const grid = h("div", { class: "answers" }, children);
    grid.style.setProperty("--cols", String(n));
    return grid;
  }

  function drawAnswer() {
    const a = state.answer;
    if (!a) {
      return clear(resultsBox, h("p", { class: "empty" }, "Add images and press Classify: each image appears here with its top answers as bars, one column per checkpoint."));
    }
    if (a.error) return clear(resultsBox, errorBox(a.error));
    const labelled = a.images.filter((img) => img.truth).length;
    const summary = h("div", { class: "summary" }, a.results.map((r) => {
      const name = r.checkpoint ? `${r.checkpoint} v${r.version}` : "zero-shot";
      if (!labelled) return chip(`${name} · ${r.method}`);
      const right = a.images.filter((img, i) => img.truth && r.predictions[i][0]?.label === img.truth).length;
      return chip(`${name}: ${right} / ${labelled} right`, right * 2 > labelled ? "ok" : "bad");
    }), h("span", { class: "muted small" }, `answered in ${(a.seconds * 1000).toFixed(0)} ms`));
    const rows = a.images.map((img, i) =>
      h(
        "article",
        { class: "result", "aria-label": `Results for ${img.name}` },
        h("figure", {}, h("img", { src: img.src, alt: img.name }),
          h("figcaption", {}, img.name, img.truth ? h("div", { class: "truth" }, `true label: ${img.truth}`) : null)),
        answersGrid(a.results.length, a.results.map((r) => {
          const top = r.predictions[i][0];
          const verdict = img.truth && top ? (top.label === img.truth ? h("span", { class: "verdict right" }, "✓ right") : h("span", { class: "verdict wrong" }, "✗ wrong")) : null;
          return h("section", { class: "answer" },
            h("h3", {}, r.checkpoint || "zero-shot", r.version ? chip(`v${r.version}`) : null, r.baseline ? h("span", { class: "muted small", title: `the class names of ${r.baseline}, no prompt` }, "no prompt") : h("span", { class: "muted small" }, r.method), verdict),
            scoreBars(r.predictions[i], img.truth));
        })),
      ),
    );
    clear(resultsBox, summary, rows);
  }

  async function submit(ev) {
    ev.preventDefault();
    if (!state.images.length) return;
    go.disabled = true;
    clear(message, h("span", { class: "muted" }, "Classifying…"));
    const images = state.images.slice();
    const start = performance.now();
    try {
      const [answer, zero] = await Promise.all([api("/v1/classify", { method: "POST", json: requestBody() }), baselineResult()]);
      state.answer = { images, results: zero ? [...answer.results, zero] : answer.results, seconds: (performance.now() - start) / 1000 };
    } catch (err) {
      state.answer = { error: err };
    }
    clear(message);
    go.disabled = false;
    drawAnswer();
  }

  const modeName = uid("mode");
  const modes = h("div", { class: "seg", role: "radiogroup", "aria-label": "Classify with" }, [
    ["checkpoints", "Checkpoints"],
    ["adhoc", "Ad-hoc classes"],
  ].map(([value, label]) =>
    h("label", {}, h("input", { type: "radio", name: modeName, value, checked: state.mode === value, onChange: () => { state.mode = value; drawTargets(); } }), h("span", {}, label)),
  ));
  const topK = h("input", { type: "number", min: 1, max: 20, value: String(state.topK), onInput: (e) => { state.topK = Math.max(1, Math.min(20, Number(e.target.value) || 3)); } });
  topK.style.width = "5rem";

  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Classify"), h("p", {}, "What does a checkpoint say about my image? Compare checkpoints or versions side by side.")),
    h(
      "div",
      { class: "grid side" },
      h(
        "div",
        { class: "grid" },
        h("section", { class: "card stack", "aria-labelledby": "img-h" }, h("h2", { id: "img-h" }, "Images"), imagesBox, examplesBox),
        h(
          "form",
          { class: "card stack", "aria-labelledby": "with-h", onSubmit: submit },
          h("h2", { id: "with-h" }, "Classify with"),
          modes,
          targetsBox,
          datalist,
          h("div", { class: "form-foot" }, field("Top k", topK), go),
          message,
        ),
      ),
      h("section", { class: "card", "aria-labelledby": "res-h" }, h("h2", { id: "res-h" }, "Results"), resultsBox),
    ),
  );
  drawImages();
  drawTargets();
  drawAnswer();
  searchNames("");
  const mine = { drawImages, drawTargets };
  view = mine;
  prime();
  return () => {
    if (view === mine) view = null;
  };
}

// The first visit opens ready to try: the first group of examples loaded (the demo: one domain),
// a checkpoint chosen (one whose name mentions that group, found by the server's search, else the
// first), and with true labels at hand, zero-shot beside it: what the prompt is worth, at a glance.
async function prime() {
  if (state.primed) return;
  state.primed = true;
  const list = await loadExamples();
  const group = list.length ? list[0].group : null;
  const chosen = group ? list.filter((ex) => ex.group === group) : list;
  const first = (q) => api(`/v1/checkpoints?limit=1${q ? `&q=${encodeURIComponent(q)}` : ""}`).then((p) => p.checkpoints[0] || null, () => null);
  const ckpt = (group && (await first(group))) || (await first(""));
  if (!state.images.length) {
    for (const ex of chosen.slice(0, MAX_IMAGES)) addExample(ex);
    view?.drawImages();
  }
  if (!state.targets[0].name && ckpt) {
    state.targets[0].name = ckpt.name;
    state.baseline = chosen.some((ex) => ex.label);
    view?.drawTargets();
  }
}
