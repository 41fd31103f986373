// Jobs: newest first, with thumbnails and status chips, filters (status, type, model, prompt
// text) kept in the address, endless scroll on the listing's cursor, live while on screen.

import { call, showImage } from "./api.js";
import { ago, between, chip, debounce, every, field, h, select } from "./dom.js";
import { modelName, loadModels } from "./models.js";

const STATUSES = ["queued", "processing", "completed", "error", "canceled"];
const TYPES = ["txt2img", "img2img"];
const FILTERS = ["status", "type", "model", "prompt"];
const PAGE = 50;
const REFRESH_MS = 5000;

export function render(root, { query }) {
  const filters = Object.fromEntries(FILTERS.map((name) => [name, query.get(name) || ""]));
  const list = h("ul", { class: "job-list", "aria-label": "Jobs, newest first" });
  const note = h("p", { class: "muted", "aria-live": "polite" });
  const more = h("button", { type: "button", class: "secondary more", onclick: () => load() },
    "Load more");
  const rows = new Map(); // job id -> its <li>
  let cursor = null;
  let loading = false;
  let done = false;
  let generation = 0; // a change of filters makes answers to older requests stale
  let painted = false;

  const { form, listModels } = filterForm(filters, () => {
    history.replaceState(null, "", `#/jobs${search(filters) ? `?${search(filters)}` : ""}`);
    generation += 1;
    rows.clear();
    list.replaceChildren();
    cursor = null;
    done = false;
    loading = false;
    load();
  });
  root.append(
    h("div", { class: "title-row" }, h("h1", { tabindex: "-1" }, "Jobs"),
      h("a", { class: "button", href: "#/new" }, "New job")),
    form, note, list, more);

  async function load() {
    if (loading || done) return;
    loading = true;
    more.disabled = true;
    const asked = generation;
    try {
      const page = await call(`/sdapi/v1/jobs?${search(filters, { limit: PAGE, cursor })}`);
      if (asked !== generation) return;
      list.append(...page.jobs.filter((job) => !rows.has(job.id)).map((job) => remember(job)));
      cursor = page.next_cursor;
      done = !cursor;
      note.textContent = rows.size ? `${rows.size} job${rows.size === 1 ? "" : "s"} shown${done ? "" : ", more below"}`
        : done ? "No jobs match." : "Looking further back…";
      if (!painted) {
        painted = true;
        requestAnimationFrame(() => {
          performance.mark("jobs-painted");
          window.dispatchEvent(new Event("jobs-painted"));
        });
        listModels(); // after the first paint: the list does not wait for the catalogue
      }
    } catch (error) {
      note.textContent = error.message;
      done = true;
    } finally {
      if (asked === generation) {
        loading = false;
        more.disabled = false;
        more.hidden = done;
      }
    }
    if (asked === generation && !done && nearBottom(more)) load();
  }

  function remember(job) {
    const li = row(job, rows.size === 0);
    rows.set(job.id, li);
    return li;
  }

  // Live: jobs submitted since, and jobs whose status or progress changed, on the first page.
  async function refresh() {
    if (loading) return;
    const asked = generation;
    const page = await call(`/sdapi/v1/jobs?${search(filters, { limit: PAGE })}`);
    if (asked !== generation) return;
    const fresh = [];
    for (const job of page.jobs) {
      const shown = rows.get(job.id);
      if (!shown) {
        if (!rows.size || fresh.length === page.jobs.indexOf(job)) fresh.push(job);
        continue;
      }
      if (shown.dataset.state !== state(job)) {
        const li = row(job);
        shown.replaceWith(li);
        rows.set(job.id, li);
      }
    }
    list.prepend(...fresh.map((job) => remember(job)));
  }

  const scroll = new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting)) load();
  }, { rootMargin: "400px" });
  scroll.observe(more);
  load();
  const live = every(REFRESH_MS, () => (painted ? refresh() : null));
  return () => { scroll.disconnect(); live.stop(); generation += 1; };
}

function search(filters, extra = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries({ ...filters, ...extra })) {
    if (value !== "" && value !== null && value !== undefined) params.set(name, value);
  }
  return params.toString();
}

function nearBottom(el) {
  return !el.hidden && el.getBoundingClientRect().top < window.innerHeight + 400;
}

function filterForm(filters, changed) {
  const status = select("status", [["", "any status"], ...STATUSES.map((s) => [s, s])], filters.status);
  const type = select("type", [["", "any type"], ...TYPES.map((t) => [t, t])], filters.type);
  const model = select("model", [["", "any model"]], filters.model);
  if (filters.model) model.append(h("option", { value: filters.model, selected: true }, modelName(filters.model)));
  const prompt = h("input", { type: "search", name: "prompt", value: filters.prompt, placeholder: "words in the prompt" });
  const update = () => {
    Object.assign(filters, { status: status.value, type: type.value, model: model.value, prompt: prompt.value.trim() });
    changed();
  };
  const typed = debounce(update, 300);
  const listModels = () => loadModels().then(({ checkpoints }) => {
    for (const entry of checkpoints) {
      if (entry.title === filters.model) continue;
      model.append(h("option", { value: entry.title }, modelName(entry.title)));
    }
  }).catch(() => {}); // no catalogue yet: the filter still takes a model from the address
  const form = h("form", {
    class: "filters",
    role: "search",
    "aria-label": "Filter jobs",
    onsubmit: (event) => { event.preventDefault(); update(); },
    onchange: (event) => { if (event.target !== prompt) update(); },
    oninput: (event) => { if (event.target === prompt) typed(); },
  },
  field("Status", status), field("Type", type), field("Model", model), field("Prompt contains", prompt));
  return { form, listModels };
}

const state = (job) => `${job.status}:${Math.round(job.progress * 100)}`;

function row(job, timed = false) {
  const prompt = typeof job.request.prompt === "string" && job.request.prompt.trim();
  const model = job.request.override_settings && job.request.override_settings.sd_model_checkpoint;
  const meta = [
    job.type,
    model && modelName(model),
    ago(job.created_at),
    job.completed_at && `ran ${between(job.started_at || job.created_at, job.completed_at)}`,
    job.owner && `by ${job.owner}`,
  ].filter(Boolean);
  return h("li", { class: "job-row", "data-id": job.id, "data-state": state(job) },
    h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "job-link" },
      thumbnail(job),
      h("span", { class: "job-main" },
        h("span", { class: "job-prompt", elementtiming: timed ? "job-list" : null },
          prompt || `${job.type} job ${job.id.slice(0, 8)}`),
        h("span", { class: "job-meta" }, meta.flatMap((part, i) => (i ? [" · ", part] : [part])))),
      h("span", { class: "job-status" }, chip(job.status),
        job.status === "processing" ? h("span", { class: "muted" }, `${Math.round(job.progress * 100)}%`) : null)));
}

function thumbnail(job) {
  if (!job.image_urls.length) return h("span", { class: "thumb empty", "aria-hidden": "true" }, job.type.slice(0, 3));
  const img = h("img", { class: "thumb", alt: "", width: 64, height: 64, decoding: "async" });
  showImage(img, `/sdapi/v1/jobs/${encodeURIComponent(job.id)}/images/0?size=128`);
  return img;
}
