// Talking to the API: the token (kept in sessionStorage, sent on every call), JSON calls,
// Server-Sent Events read with fetch (EventSource cannot send a token), and images fetched
// with the token when there is one.

const KEY = "a1111-proxy.token";

export const session = {
  token: sessionStorage.getItem(KEY),
  role: null, // "admin" or "tenant", once known
  tokensOff: false, // the server asks for no token: every caller is an admin
};

export function signIn(token) {
  session.token = token;
  sessionStorage.setItem(KEY, token);
}

export function signOut() {
  session.token = null;
  session.role = null;
  sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    super(describe(status, body));
    this.status = status;
    this.body = body;
  }
}

function describe(status, body) {
  const detail = body && typeof body === "object" ? body.detail : null;
  if (typeof detail === "string" && detail) return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).slice(1).join(".") || "body"}: ${d.msg}`).join("; ");
  }
  return `The server answered ${status}`;
}

function authHeaders(token = session.token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// A JSON call; throws ApiError for an error answer (and tells the page about a 401).
export async function call(path, { method = "GET", body, headers = {}, signal, token } = {}) {
  const response = await send(path, { method, body, headers, signal, token });
  return response.data;
}

// The same, with the response's headers too.
export async function send(path, { method = "GET", body, headers = {}, signal, token } = {}) {
  const presented = token === undefined ? session.token : token; // null: none at all
  const init = { method, signal, headers: { ...authHeaders(presented), ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON: keep the text */ }
  if (!response.ok) {
    if (response.status === 401 && token === undefined) {
      window.dispatchEvent(new CustomEvent("unauthorized"));
    }
    throw new ApiError(response.status, data);
  }
  return { data, headers: response.headers, status: response.status };
}

// Who the token belongs to: /health shows its details (workers, backends) to an admin only.
export async function whoami() {
  let health;
  try {
    health = await call("/health");
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 503) throw error;
    health = error.body; // unhealthy: still the same shapes
  }
  session.role = Array.isArray(health && health.workers) ? "admin" : "tenant";
  return health;
}

// --- Server-Sent Events ------------------------------------------------------------------

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

// Follows `path` (an event stream), calling onEvent(name, data) for each event, reconnecting
// with Last-Event-ID as EventSource would, until onEvent returns false, the server says there
// is nothing more (204), or `signal` aborts.
export async function follow(path, onEvent, signal) {
  let lastId = null;
  let retry = 2000;
  while (!signal.aborted) {
    const headers = authHeaders();
    if (lastId) headers["Last-Event-ID"] = lastId;
    try {
      const response = await fetch(path, { headers, signal, cache: "no-store" });
      if (response.status === 204) return;
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
      for await (const event of parse(response.body)) {
        if (event.retry) retry = event.retry;
        if (event.id) lastId = event.id;
        if (event.data !== undefined && onEvent(event.event || "message", JSON.parse(event.data)) === false) {
          return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500) throw error;
    }
    await sleep(retry, signal);
  }
}

async function* parse(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = {};
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        yield event;
        event = {};
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "data") event.data = event.data === undefined ? text : `${event.data}\n${text}`;
        else if (name === "event") event.event = text;
        else if (name === "id") event.id = text;
        else if (name === "retry" && /^\d+$/.test(text)) event.retry = Number(text);
      }
    }
  }
}

// --- images --------------------------------------------------------------------------------

const blobs = new Set();
const waiting = new Map(); // img -> path, until it scrolls into view
const observer = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    observer.unobserve(entry.target);
    const path = waiting.get(entry.target);
    waiting.delete(entry.target);
    load(entry.target, path);
  }
}, { rootMargin: "300px" });

// Shows the API image at `path` in `img`: straight from its URL when no token is needed (the
// browser caches it), else fetched with the token once it comes near the screen.
export function showImage(img, path, { lazy = true } = {}) {
  if (!session.token) {
    img.loading = lazy ? "lazy" : "eager";
    img.src = path;
    return;
  }
  if (!lazy) {
    load(img, path);
    return;
  }
  waiting.set(img, path);
  observer.observe(img);
}

async function load(img, path) {
  try {
    img.src = await blobUrl(path);
  } catch {
    img.classList.add("broken");
  }
}

// The image at `path` as a blob: URL (fetched with the token); released by releaseImages.
export async function blobUrl(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw new ApiError(response.status, null);
  const url = URL.createObjectURL(await response.blob());
  blobs.add(url);
  return url;
}

// Between pages: forget the images the last one fetched.
export function releaseImages() {
  for (const url of blobs) URL.revokeObjectURL(url);
  blobs.clear();
  for (const img of waiting.keys()) observer.unobserve(img);
  waiting.clear();
}
