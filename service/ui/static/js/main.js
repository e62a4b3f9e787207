// The console's shell: the key and the role it grants, the hash router, toasts.
// Each screen is a module exporting render(root, ctx, arg) that may return a cleanup function.

import { api, ApiError, getKey, setKey } from "./api.js";
import { h } from "./dom.js";
import * as checkpoints from "./checkpoints.js";
import * as classify from "./classify.js";
import * as service from "./service.js";
import * as training from "./training.js";

const SCREENS = { classify, checkpoints, training, service };
const TITLES = { classify: "Classify", checkpoints: "Checkpoints", training: "Training", service: "Service" };

// What the key may do, from GET /v1/whoami. role: "admin" | "read" | null (no usable key).
const session = { role: null, auth: true, error: null };
let cleanup = null;

const main = document.getElementById("main");
const badge = document.getElementById("auth-badge");
const toggle = document.getElementById("auth-toggle");
const panel = document.getElementById("auth-panel");
const note = document.getElementById("auth-note");
const keyInput = document.getElementById("api-key");

export function toast(message) {
  const box = document.getElementById("toasts");
  const el = h("div", { class: "toast" }, message);
  box.append(el);
  setTimeout(() => el.remove(), 4000);
}

function openPanel(open) {
  panel.hidden = !open;
  toggle.setAttribute("aria-expanded", String(open));
  if (open) keyInput.focus();
}

function showAuth() {
  let text;
  let kind;
  if (!session.auth) {
    text = "Auth off · loopback";
    kind = "open";
    note.textContent =
      "This service has no API keys: it listens on loopback only and every caller is an admin.";
  } else if (session.role === "admin") {
    text = "Admin key";
    kind = "admin";
    note.textContent = "Signed in with an admin key: every action is available.";
  } else if (session.role === "read") {
    text = "Read-only key";
    kind = "read";
    note.textContent = "A read key: you can look and classify; changes need an admin key.";
  } else {
    text = getKey() ? "Key refused" : "No key";
    kind = "none";
    note.textContent = session.error ? `That key was refused: ${session.error}.` : "This service needs an API key.";
  }
  badge.textContent = text;
  toggle.dataset.role = kind;
  document.body.dataset.role = session.role || "none";
}

async function learnRole() {
  try {
    const me = await api("/v1/whoami");
    Object.assign(session, { role: me.role, auth: me.auth, error: null });
  } catch (err) {
    const known = err instanceof ApiError && (err.status === 401 || err.status === 403);
    // With no key at all the API's "missing API key" is no news: say what to do instead.
    const message = !getKey() && known ? null : err.message;
    Object.assign(session, { role: null, auth: true, error: message });
  }
  showAuth();
}

function context() {
  return {
    role: session.role,
    auth: session.auth,
    isAdmin: session.role === "admin",
    canRead: session.role !== null,
    toast,
    go: (hash) => {
      if (location.hash === hash) route();
      else location.hash = hash;
    },
  };
}

function parseHash() {
  const [, name = "classify", ...rest] = location.hash.replace(/^#/, "").split("/");
  const screen = SCREENS[name] ? name : "classify";
  const arg = rest.length ? decodeURIComponent(rest.join("/")) : null;
  return { screen, arg };
}

function route() {
  const { screen, arg } = parseHash();
  if (typeof cleanup === "function") cleanup();
  cleanup = null;
  for (const link of document.querySelectorAll(".tabs a")) {
    if (link.dataset.tab === screen) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${TITLES[screen]} · promptserve`;
  main.replaceChildren();
  if (!session.role && session.auth) {
    // Every screen reads the API, and with auth on nothing answers without a key.
    main.append(
      h(
        "div",
        { class: "notice warn", role: "alert" },
        h("strong", {}, "An API key is needed. "),
        session.error ? `The service refused the one given: ${session.error}. ` : "",
        "Enter a read key (look and classify) or an admin key (also upload, activate, delete and train) with the key button at the top right.",
      ),
    );
    return;
  }
  cleanup = SCREENS[screen].render(main, context(), arg);
}

toggle.addEventListener("click", () => openPanel(panel.hidden));
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && !panel.hidden) {
    openPanel(false);
    toggle.focus();
  }
});
panel.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  setKey(keyInput.value.trim());
  keyInput.value = "";
  await learnRole();
  if (session.role) openPanel(false);
  toast(session.role ? `Signed in with ${session.role === "admin" ? "an admin" : "a read"} key` : "That key was refused");
  route();
});
document.getElementById("forget-key").addEventListener("click", async () => {
  setKey("");
  await learnRole();
  route();
});
window.addEventListener("hashchange", route);

await learnRole();
if (session.auth && !session.role) openPanel(true);
route();
// The shell knows the key's role and has drawn the first screen (tests wait on this, not time).
document.body.dataset.ready = "true";
