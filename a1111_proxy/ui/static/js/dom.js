// Building the page: elements from plain data (text is always text, never HTML), and the
// small pieces every page uses: status chips, progress, times, messages.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "value" || key === "checked" || key === "selected") {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  el.append(...flat(children));
  return el;
}

// Replaces el's children (nested arrays flattened; null, undefined and false left out).
export function fill(el, ...children) {
  el.replaceChildren(...flat(children));
  return el;
}

function flat(children) {
  return children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : String(c)));
}

let ids = 0;
export const uid = (prefix = "id") => `${prefix}-${++ids}`;

// A labelled form control: <label for=...>text</label> + the control (+ a hint it describes).
export function field(label, control, hint) {
  control.id ||= uid("f");
  const parts = [h("label", { for: control.id }, label), control];
  if (hint) {
    const hintEl = h("small", { id: uid("hint"), class: "hint" }, hint);
    control.setAttribute("aria-describedby", hintEl.id);
    parts.push(hintEl);
  }
  return h("div", { class: "field" }, parts);
}

export function select(name, options, selected) {
  return h("select", { name },
    options.map(([value, text]) => h("option", { value, selected: value === selected }, text)));
}

export function chip(status) {
  return h("span", { class: `chip chip-${status}` }, status);
}

export function section(title, ...children) {
  const id = uid("s");
  return h("section", { "aria-labelledby": id }, h("h2", { id }, title), children);
}

// A definition list from [term, value] pairs; pairs whose value is empty are left out.
export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs
    .filter(([, value]) => value !== null && value !== undefined && value !== "" && value !== false)
    .map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

export function progress(label) {
  const bar = h("progress", { max: 100, value: 0, "aria-label": label });
  const text = h("span", { class: "progress-text" }, "0%");
  const el = h("div", { class: "progress" }, bar, text);
  return {
    el,
    set(fraction, detail = "") {
      const percent = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
      bar.value = percent;
      text.textContent = detail ? `${percent}% · ${detail}` : `${percent}%`;
    },
  };
}

// --- times ---------------------------------------------------------------------------------

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
  const s = Math.max(0, seconds);
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

const seconds = (iso) => (iso ? Date.parse(iso) / 1000 : null);

export function between(from, to) {
  const a = seconds(from);
  const b = seconds(to);
  return a !== null && b !== null ? duration(b - a) : "";
}

// A <time> showing how long ago, the exact local time as its tooltip.
export function ago(iso) {
  if (!iso) return "";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  const text = s < 45 ? "just now" : s < 5400 ? `${Math.round(s / 60)} min ago`
    : s < 129600 ? `${Math.round(s / 3600)} h ago` : `${Math.round(s / 86400)} d ago`;
  return h("time", { datetime: iso, title: stamp(iso) }, text);
}

// "2026-11-30 15:34" in local time, without Intl (whose first use costs a list's paint).
function stamp(iso) {
  const d = new Date(iso);
  const two = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}`;
}

export const local = (iso) => (iso ? new Date(iso).toLocaleString() : "");

export function bytes(n) {
  if (typeof n !== "number") return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// --- messages ------------------------------------------------------------------------------

// Said to screen readers (a polite live region), not shown.
export function announce(text) {
  const live = document.getElementById("live");
  live.textContent = "";
  setTimeout(() => { live.textContent = text; }, 50);
}

// Shown for a few seconds and said to screen readers.
export function toast(text, kind = "info") {
  const box = document.getElementById("toasts");
  const el = h("p", { class: `toast toast-${kind}` }, text);
  box.append(el);
  setTimeout(() => el.remove(), kind === "error" ? 8000 : 4000);
}

export function errorBox(error) {
  return h("div", { class: "error-box", role: "alert" }, error.message || String(error));
}

// A button that copies what `text()` returns, saying so.
export function copyButton(label, text) {
  return h("button", {
    type: "button",
    class: "secondary small",
    async onclick() {
      try {
        await navigator.clipboard.writeText(text());
        toast(`${label}: copied`);
      } catch {
        toast("The browser did not allow copying: select the text and copy it", "error");
      }
    },
  }, label);
}

// Rebuilds inside `root` with `rebuild`, keeping which <details> were open and which control
// had the focus (by their data-key), so a live update does not close or unfocus anything.
export function keepingState(root, rebuild) {
  const open = new Set([...root.querySelectorAll("details[open][data-key]")].map((d) => d.dataset.key));
  const focused = root.contains(document.activeElement) ? document.activeElement.dataset.key : null;
  rebuild();
  for (const details of root.querySelectorAll("details[data-key]")) details.open = open.has(details.dataset.key);
  if (focused) root.querySelector(`[data-key="${CSS.escape(focused)}"]`)?.focus();
}

export function debounce(fn, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// Runs `tick` now and every `ms` while the page is visible, until the returned stop is called.
export function every(ms, tick) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    timer = null;
    if (stopped) return;
    if (!document.hidden) {
      try { await tick(); } catch (e) { console.warn(e); }
    }
    if (!stopped) timer = setTimeout(run, ms);
  };
  const wake = () => { if (!document.hidden && timer !== null) { clearTimeout(timer); run(); } };
  document.addEventListener("visibilitychange", wake);
  run();
  return {
    now: wake,
    stop() { stopped = true; clearTimeout(timer); document.removeEventListener("visibilitychange", wake); },
  };
}
