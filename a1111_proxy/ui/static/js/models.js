// Models: checkpoints and LoRAs as the backends list them, with what Civitai says of each
// (name, base model, trigger words, preview) and their hashes; a refresh button for admins.

import { ApiError, call, send, session } from "./api.js";
import { copyButton, errorBox, facts, field, h, section, toast } from "./dom.js";

const REFRESH_WAIT_MS = 20000;

let cached = null;
let cachedAt = 0;

// The catalogue's checkpoints and LoRAs (fetched at most every 30 s).
export function loadModels({ fresh = false } = {}) {
  if (fresh || !cached || Date.now() - cachedAt > 30000) {
    cachedAt = Date.now();
    cached = Promise.all([call("/sdapi/v1/sd-models"), call("/sdapi/v1/loras")])
      .then(([checkpoints, loras]) => ({ checkpoints, loras }));
    cached.catch(() => { cached = null; });
  }
  return cached;
}

// "sdxl/juggernaut_v9.safetensors [c9e3e68f89]" -> "sdxl/juggernaut_v9"
export function modelName(title) {
  return String(title).replace(/ \[[0-9a-f]{8,10}\]$/i, "").replace(/\.(safetensors|ckpt|pt)$/i, "");
}

// The first preview Civitai has of a model (blurred beyond its lowest NSFW level).
export function civitaiPreview(civitai, size = 160) {
  const image = civitai && Array.isArray(civitai.images) ? civitai.images[0] : null;
  if (!image || !image.url) return h("span", { class: "model-thumb empty", "aria-hidden": "true" });
  return h("img", {
    class: `model-thumb${image.nsfw_level > 1 ? " nsfw" : ""}`, src: image.url, alt: "", width: size,
    loading: "lazy", referrerpolicy: "no-referrer", onerror: (event) => event.target.classList.add("broken"),
  });
}

export function render(root) {
  const list = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const filter = h("input", { type: "search", placeholder: "name, base model, trigger word" });
  const refresh = h("button", { type: "button", hidden: true, onclick: () => rescan() }, "Refresh models");
  root.append(
    h("div", { class: "title-row" }, h("h1", { tabindex: "-1" }, "Models"), refresh),
    h("form", { class: "filters", role: "search", onsubmit: (e) => e.preventDefault(), oninput: () => narrow() },
      field("Filter models", filter)),
    list);
  session.ready.then(() => { refresh.hidden = session.role !== "admin"; });

  function narrow() {
    const words = filter.value.trim().toLowerCase();
    for (const card of list.querySelectorAll(".model")) {
      card.hidden = Boolean(words) && !card.dataset.text.includes(words);
    }
  }

  async function show(fresh) {
    try {
      const { checkpoints, loras } = await loadModels({ fresh });
      list.replaceChildren(
        section(`Checkpoints (${checkpoints.length})`, cards(checkpoints, checkpoint)),
        section(`LoRAs (${loras.length})`, cards(loras, lora)));
      narrow();
    } catch (error) {
      list.replaceChildren(errorBox(error));
    }
  }

  // Admins: ask the workers to rescan, then show the lists once a worker has fetched them again.
  async function rescan() {
    refresh.disabled = true;
    const asked = Date.now();
    try {
      await call("/sdapi/v1/refresh-checkpoints", { method: "POST" });
      await call("/sdapi/v1/refresh-loras", { method: "POST" });
      toast("Asked the workers to rescan their models");
      while (Date.now() - asked < REFRESH_WAIT_MS) {
        await new Promise((resolve) => setTimeout(resolve, 1000));
        const { headers } = await send("/sdapi/v1/sd-models?civitai=false");
        if (Number(headers.get("Age")) * 1000 <= Date.now() - asked) break;
      }
      await show(true);
    } catch (error) {
      toast(error instanceof ApiError && error.status === 403 ? "Only an admin can refresh models" : error.message, "error");
    } finally {
      refresh.disabled = false;
    }
  }

  show(false);
}

function cards(entries, describe) {
  if (!entries.length) return h("p", { class: "muted" }, "None listed.");
  return h("ul", { class: "models" }, entries.map((entry) => {
    const card = describe(entry);
    card.dataset.text = card.textContent.toLowerCase();
    return card;
  }));
}

function checkpoint(entry) {
  return model(entry.title, entry.civitai, [
    ["File", entry.filename],
    ["Hash", entry.hash && h("code", {}, entry.hash)],
    ["SHA256", entry.sha256 && hash(entry.sha256)],
  ]);
}

function lora(entry) {
  const meta = entry.metadata || {};
  return model(entry.name, entry.civitai, [
    ["Alias", entry.alias !== entry.name ? entry.alias : null],
    ["File", entry.path],
    ["Hash", meta.sshs_model_hash && hash(meta.sshs_model_hash)],
    ["Base model (file)", meta.ss_base_model_version || meta.ss_sd_model_name],
  ]);
}

function model(name, civitai, own) {
  const c = civitai || {};
  return h("li", { class: "card model" },
    civitaiPreview(civitai),
    h("div", {},
      h("h3", {}, modelName(name)),
      facts([
        ["Civitai", c.model_name && (c.page_url
          ? h("a", { href: c.page_url, rel: "noreferrer", target: "_blank" }, `${c.model_name} · ${c.version_name || ""}`)
          : `${c.model_name} · ${c.version_name || ""}`)],
        ["Base model", c.base_model],
        ["Type", c.type],
        ["Trigger words", c.trained_words && c.trained_words.length ? h("span", { class: "words" }, c.trained_words.map((w) => h("code", {}, w))) : null],
        ...own,
      ])));
}

function hash(value) {
  return h("span", {}, h("code", { title: value }, `${value.slice(0, 12)}…`), " ", copyButton("Copy hash", () => value));
}
