// The REST API, as any client calls it: same routes, same JSON, the key as a Bearer header.
// The key lives in sessionStorage (this tab only, gone when it closes) and never in a URL.

const KEY = "promptserve.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status; // 0: the service could not be reached
    this.code = code;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** Call the API; resolves with the parsed JSON (or text with {text: true}), throws ApiError
 *  carrying the service's own {code, message} for any non-2xx answer. */
export async function api(path, { method = "GET", json, form, signal, text = false } = {}) {
  const init = { method, signal, cache: "no-store", headers: headers() };
  if (json !== undefined) {
    init.headers = headers({ "Content-Type": "application/json" });
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets multipart/form-data with its boundary
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "unreachable", `the service did not answer (${err.message})`);
  }
  const body = await res.text();
  if (res.ok && text) return body;
  let data = null;
  try {
    data = body ? JSON.parse(body) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const err = data && data.error;
    if (err && typeof err.message === "string") throw new ApiError(res.status, err.code, err.message);
    throw new ApiError(res.status, `http_${res.status}`, body.slice(0, 500) || res.statusText);
  }
  return data;
}

/** GET that also resolves (instead of throwing) for 503: /readyz explains itself in its body. */
export async function getAllowing503(path) {
  const res = await fetch(path, { cache: "no-store", headers: headers() });
  const data = await res.json().catch(() => null);
  return { status: res.status, data };
}

/** GET a file that needs the key (an <img src> cannot send one): resolves with its Blob. */
export async function getBlob(path) {
  const res = await fetch(path, { headers: headers() });
  if (!res.ok) throw new ApiError(res.status, `http_${res.status}`, `${path}: ${res.statusText}`);
  return res.blob();
}

/** Read a File/Blob as a data: URI, which /v1/classify accepts as an image. */
export function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
