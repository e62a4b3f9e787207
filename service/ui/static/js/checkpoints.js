// Checkpoints: a searchable, paged list (the server filters and pages: 10,000 names stay fast),
// one checkpoint's versions with their manifests, activate / roll back as compare-and-set,
// upload, delete. Admin actions are not drawn at all for a read key.

import { api } from "./api.js";
import { compare } from "./classify.js";
import { bytes, chip, clear, debounce, errorBox, field, h, metric, num, pct, when } from "./dom.js";

const PAGE = 25;
const list = { q: "", offset: 0 };

function metricsText(metrics) {
  if (!metrics) return "–";
  const parts = Object.entries(metrics)
    .filter(([k, v]) => k.endsWith("accuracy") && typeof v === "number")
    .map(([k, v]) => `${k.replace(/_accuracy$/, "")} ${pct(v)}`);
  return parts.length ? parts.join(" · ") : "–";
}

export function render(root, ctx, selected) {
  const listBox = h("div");
  const detailBox = h("div");
  const uploadBox = h("div", { class: "upload-slot" });

  const search = h("input", { type: "search", value: list.q, placeholder: "name contains…", autocomplete: "off", spellcheck: "false" });
  search.addEventListener("input", debounce(() => {
    list.q = search.value.trim();
    list.offset = 0;
    drawList();
  }, 200));

  async function drawList() {
    let page;
    try {
      page = await api(`/v1/checkpoints?limit=${PAGE}&offset=${list.offset}&q=${encodeURIComponent(list.q)}`);
    } catch (err) {
      return clear(listBox, errorBox(err));
    }
    if (!page.total) {
      return clear(listBox, h("p", { class: "empty" }, list.q ? `No checkpoint name contains “${list.q}”.` : "No checkpoints yet. Upload one, or train one under Training."));
    }
    const rows = page.checkpoints.map((c) =>
      h(
        "tr",
        { class: c.name === selected ? "selected" : null },
        h("td", {}, h("a", { class: "rowbtn", href: `#/checkpoints/${encodeURIComponent(c.name)}`, "aria-current": c.name === selected ? "true" : null }, c.name)),
        h("td", {}, c.version ? chip(`v${c.version}`, "live") : chip("none")),
        h("td", {}, c.method || "–"),
        h("td", { class: "num" }, num(c.classes)),
      ),
    );
    const last = Math.min(page.offset + page.checkpoints.length, page.total);
    clear(
      listBox,
      h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Live"), h("th", {}, "Method"), h("th", { class: "num" }, "Classes"))), h("tbody", {}, rows))),
      h(
        "div",
        { class: "pager" },
        h("button", { type: "button", class: "small", disabled: page.offset === 0, onClick: () => { list.offset = Math.max(0, list.offset - PAGE); drawList(); } }, "← Previous"),
        h("span", { class: "muted small", "aria-live": "polite" }, `${num(page.offset + 1)}–${num(last)} of ${num(page.total)}`),
        h("button", { type: "button", class: "small", disabled: last >= page.total, onClick: () => { list.offset += PAGE; drawList(); } }, "Next →"),
      ),
    );
  }

  function drawUpload() {
    if (!ctx.isAdmin) return clear(uploadBox, h("p", { class: "notice small" }, "You are using a read key: uploading, activating, rolling back and deleting need an admin key."));
    const file = h("input", { type: "file", accept: ".safetensors", required: true });
    const activate = h("input", { type: "checkbox", checked: true });
    const out = h("div", { "aria-live": "polite" });
    const send = h("button", { type: "submit", class: "primary" }, "Upload");
    const form = h(
      "form",
      { class: "card stack", "aria-labelledby": "up-h" },
      h("h2", { id: "up-h" }, "Upload a checkpoint"),
      field("Checkpoint file (.safetensors)", file, "Its manifest names it; the service validates everything before storing it."),
      h("label", { class: "check" }, activate, "Make it the live version"),
      send,
      out,
    );
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (!file.files.length) return;
      const body = new FormData();
      body.append("file", file.files[0]);
      body.append("activate", activate.checked ? "true" : "false");
      send.disabled = true;
      clear(out, h("span", { class: "muted" }, "Uploading…"));
      try {
        const r = await api("/v1/checkpoints", { method: "POST", form: body });
        clear(out, h("div", { class: "success" }, `Stored ${r.name} v${r.version} (${r.method})${r.active ? ", now live" : ""}. `, h("a", { href: `#/checkpoints/${encodeURIComponent(r.name)}` }, "Open it")));
        drawList();
        if (r.name === selected) drawDetail();
      } catch (err) {
        clear(out, errorBox(err)); // exactly what the API answered
      }
      send.disabled = false;
    });
    clear(uploadBox, form);
  }

  async function versionDetail(name, v, cell) {
    clear(cell, h("span", { class: "muted" }, "Reading the manifest…"));
    try {
      const d = await api(`/v1/checkpoints/${encodeURIComponent(name)}/versions/${v}`);
      const m = d.manifest;
      const classes = m.classnames || [];
      clear(
        cell,
        h(
          "div",
          { class: "grid cols-2" },
          h("dl", { class: "kv" },
            h("dt", {}, "Method"), h("dd", {}, m.method),
            h("dt", {}, "Parameters"), h("dd", {}, `${num(d.parameters)} in ${Object.keys(d.tensors).length} tensors`),
            h("dt", {}, "Classes"), h("dd", {}, `${classes.length}: ${classes.slice(0, 12).join(", ")}${classes.length > 12 ? ", …" : ""}`),
            h("dt", {}, "Templates"), h("dd", {}, m.templates && m.templates.length ? m.templates.join(" · ") : "method default"),
            h("dt", {}, "Trained from"), h("dd", {}, m.parent ? `v${m.parent}` : "–"),
            h("dt", {}, "Backbone"), h("dd", {}, `${m.backbone.model || "custom"} · ${m.backbone.fingerprint.replace(/^sha256:/, "").slice(0, 12)}`),
            h("dt", {}, "SHA-256"), h("dd", { class: "mono small" }, d.sha256.slice(0, 16) + "…"),
          ),
          h("div", { class: "stack" },
            h("h3", {}, "Evaluation"),
            Object.keys(m.metrics || {}).length
              ? h("dl", { class: "kv" }, Object.entries(m.metrics).flatMap(([k, val]) => [h("dt", {}, k), h("dd", {}, metric(k, val))]))
              : h("p", { class: "muted" }, "No evaluation recorded."),
            h("details", {}, h("summary", {}, "Full manifest and tensors"), h("pre", { class: "json" }, JSON.stringify({ ...m, tensors: d.tensors }, null, 1))),
          ),
        ),
      );
    } catch (err) {
      clear(cell, errorBox(err));
    }
  }

  async function drawDetail(notice) {
    if (!selected) {
      return clear(detailBox, h("div", { class: "card" }, h("p", { class: "empty" }, "Choose a checkpoint to see its versions, manifests and evaluation results.")));
    }
    let cp;
    try {
      cp = await api(`/v1/checkpoints/${encodeURIComponent(selected)}`);
    } catch (err) {
      return clear(detailBox, h("div", { class: "card" }, errorBox(err)));
    }
    const live = cp.version; // what this page believes is live: sent as `expected`
    const status = h("div", { "aria-live": "polite" }, notice || null);

    async function activate(version) {
      try {
        const r = await api(`/v1/checkpoints/${encodeURIComponent(selected)}/activate`, { method: "POST", json: { version, expected: live ?? 0 } });
        ctx.toast(`${r.name}: v${r.version} is live`);
        drawList();
        drawDetail(h("div", { class: "success" }, `v${r.version} is now live (was ${live ? `v${live}` : "none"}).`));
      } catch (err) {
        const again = err.status === 409 ? h("button", { type: "button", class: "small", onClick: () => drawDetail() }, "Reload the versions") : null;
        clear(status, h("div", { class: "stack" }, errorBox(err), again));
      }
    }

    function confirmDelete() {
      const dialog = h("dialog", { "aria-labelledby": "del-h" },
        h("h2", { id: "del-h" }, `Delete ${selected}?`),
        h("p", {}, `All ${cp.versions.length} version${cp.versions.length > 1 ? "s" : ""} of ${selected} will be removed from the store. Requests naming it will fail. This cannot be undone.`),
        h("form", { method: "dialog", class: "actions" },
          h("button", { value: "cancel", autofocus: true }, "Cancel"),
          h("button", { value: "delete", class: "danger solid" }, `Delete ${selected}`)),
      );
      dialog.addEventListener("close", async () => {
        dialog.remove();
        if (dialog.returnValue !== "delete") return;
        try {
          await api(`/v1/checkpoints/${encodeURIComponent(selected)}`, { method: "DELETE" });
          ctx.toast(`Deleted ${selected}`);
          ctx.go("#/checkpoints");
        } catch (err) {
          clear(status, errorBox(err));
        }
      });
      document.body.append(dialog);
      dialog.showModal();
    }

    const rows = cp.versions.slice().reverse().flatMap((v) => {
      const detailRow = h("tr", { class: "version-detail", hidden: true }, h("td", { colspan: 5 }));
      const toggle = h("button", { type: "button", class: "small", "aria-expanded": "false", onClick: () => {
        const open = detailRow.hidden;
        detailRow.hidden = !open;
        toggle.setAttribute("aria-expanded", String(open));
        if (open) versionDetail(selected, v.version, detailRow.firstChild);
      } }, "Details");
      let action = null;
      if (ctx.isAdmin && !v.active) {
        const label = live && v.version < live ? "Roll back" : "Activate";
        action = h("button", { type: "button", class: label === "Activate" ? "small primary" : "small", "aria-label": `${label} to v${v.version}`, onClick: () => activate(v.version) }, label);
      }
      // Side by side with the live version, on the same images, in Classify (a read action).
      const versus = live && !v.active ? h("button", { type: "button", class: "small", "aria-label": `Compare v${v.version} with the live v${live}`, onClick: () => {
        compare([{ name: selected, version: live }, { name: selected, version: v.version }]);
        ctx.go("#/classify");
      } }, "Compare") : null;
      return [
        h("tr", { dataset: { version: String(v.version) } },
          // the method is the checkpoint's (in the header) unless this version was trained otherwise
          h("td", {}, h("strong", {}, `v${v.version}`), " ", v.active ? chip("live", "live") : null,
            v.meta.method && v.meta.method !== cp.method ? h("span", { class: "muted small" }, ` ${v.meta.method}`) : null),
          h("td", {}, metricsText(v.meta.metrics)),
          h("td", { class: "small wide-only" }, when(v.created_at)),
          h("td", { class: "num small wide-only" }, bytes(v.size)),
          h("td", {}, h("div", { class: "actions" }, toggle, versus, action))),
        detailRow,
      ];
    });

    clear(
      detailBox,
      h(
        "section",
        { class: "card", "aria-labelledby": "cp-h" },
        h("div", { class: "card-head" },
          h("h2", { id: "cp-h" }, cp.name, " ", h("span", { class: "live-version" }, live ? chip(`live v${live}`, "live") : chip("no live version"))),
          h("div", { class: "actions" },
            h("button", { type: "button", class: "small", onClick: () => drawDetail() }, "Refresh"),
            ctx.isAdmin ? h("button", { type: "button", class: "small danger", onClick: confirmDelete }, "Delete…") : null)),
        h("p", { class: "muted small" }, `${cp.method || "unknown method"} · ${num(cp.classes)} classes · ${cp.versions.length} version${cp.versions.length > 1 ? "s" : ""}`),
        status,
        h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, "Version"), h("th", {}, "Evaluation"), h("th", { class: "wide-only" }, "Created"), h("th", { class: "num wide-only" }, "Size"), h("th", {}, ""))),
          h("tbody", {}, rows))),
        ctx.isAdmin ? h("p", { class: "hint" }, "Activating sends the version you see as live as the compare-and-set expectation: if someone changed it meanwhile, the service refuses (409) and nothing moves.") : null,
      ),
    );
  }

  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Checkpoints"), h("p", {}, "Which version is live, and what changed?")),
    h(
      "div",
      { class: "grid side" },
      h("div", { class: "grid left" },
        h("section", { class: "card stack", "aria-labelledby": "list-h" }, h("h2", { id: "list-h" }, "All checkpoints"), field("Search", search), listBox),
        uploadBox),
      detailBox,
    ),
  );
  drawList();
  drawUpload();
  drawDetail();
}
