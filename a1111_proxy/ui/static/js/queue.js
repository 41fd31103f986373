// The queue: counts, what runs on each backend (live progress and preview over each job's event
// stream), and what waits, in the order workers take it, with its estimated start.

import { call, follow } from "./api.js";
import { ago, chip, duration, every, fill, h, keepingState, progress, section, toast } from "./dom.js";

const REFRESH_MS = 2000;
const TERMINAL = new Set(["completed", "error", "canceled"]);

export function render(root) {
  const counts = h("div", { class: "counts", "aria-live": "polite" });
  const running = h("div", { class: "slots" });
  const waiting = h("div", {});
  const streams = new Map(); // running job id -> { card, stop }
  root.append(
    h("div", { class: "title-row" }, h("h1", { tabindex: "-1" }, "Queue"),
      h("a", { class: "button", href: "#/new" }, "New job")),
    counts,
    section("Running", running),
    section("Waiting", waiting));

  const shown = {}; // what each part shows now, so that an unchanged part is left alone
  function update(el, name, value, build) {
    const key = JSON.stringify(value);
    if (shown[name] === key) return;
    shown[name] = key;
    keepingState(el, () => fill(el, build()));
  }

  async function refresh() {
    const view = await call("/sdapi/v1/queue?limit=200");
    const { queued, running: jobs, ...numbers } = view;
    update(counts, "counts", numbers, () => summary(view));
    showRunning(jobs);
    update(waiting, "waiting", [queued, view.queued_total], () => waitingTable(view, cancel));
  }

  function showRunning(jobs) {
    const now = new Set(jobs.map((job) => job.id));
    for (const [id, stream] of streams) {
      if (!now.has(id)) {
        stream.stop.abort();
        stream.card.remove();
        streams.delete(id);
      }
    }
    for (const job of jobs) {
      if (!streams.has(job.id)) streams.set(job.id, watch(job));
    }
    const cards = jobs.map((job) => streams.get(job.id).card);
    running.replaceChildren(...(cards.length ? cards : [h("p", { class: "muted" }, "Nothing is running.")]));
  }

  // A running job's card, kept up to date by its event stream until it ends.
  function watch(job) {
    const stop = new AbortController();
    const bar = progress(`Progress of job ${job.id}`);
    const preview = h("img", { class: "preview", alt: `Live preview of job ${job.id}`, hidden: true });
    bar.set(job.progress);
    const prompt = h("p", { class: "job-prompt" });
    const card = h("article", { class: "card slot", "data-id": job.id },
      h("div", { class: "slot-preview" }, preview),
      h("div", { class: "slot-main" },
        h("h3", {}, job.backend || "a backend"),
        prompt,
        h("p", { class: "job-meta" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, `${job.type} ${job.id.slice(0, 8)}`),
          " · started ", ago(job.started_at), job.priority ? ` · priority ${job.priority}` : ""),
        bar.el,
        h("button", { type: "button", class: "secondary small", onclick: () => cancel(job.id) }, "Cancel")));
    follow(`/sdapi/v1/jobs/${encodeURIComponent(job.id)}/events`, (name, data) => {
      if (name === "status" && typeof data.request?.prompt === "string") prompt.textContent = data.request.prompt;
      if (name === "progress") {
        bar.set(data.progress, [data.steps && `step ${data.step} of ${data.steps}`, data.eta && `${duration(data.eta)} left`].filter(Boolean).join(" · "));
        if (data.preview) {
          preview.src = data.preview;
          preview.hidden = false;
        }
      }
      if (TERMINAL.has(name)) {
        bar.set(1, name);
        live.now();
        return false;
      }
      return true;
    }, stop.signal).catch(() => {});
    return { card, stop };
  }

  async function cancel(id) {
    try {
      const job = await call(`/sdapi/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      toast(job.status === "canceled" ? `Canceled job ${id.slice(0, 8)}` : `Asked job ${id.slice(0, 8)} to stop`);
    } catch (error) {
      toast(error.message, "error");
    }
    live.now();
  }

  const live = every(REFRESH_MS, refresh);
  return () => {
    live.stop();
    for (const stream of streams.values()) stream.stop.abort();
  };
}

function summary(view) {
  const c = view.counts;
  const items = [
    ["queued", c.queued], ["processing", c.processing], ["completed", c.completed || 0],
    ["error", c.error || 0], ["canceled", c.canceled || 0],
  ];
  return [
    h("ul", { class: "count-list", "aria-label": "Jobs by status" },
      items.map(([status, n]) => h("li", {}, chip(status), " ", h("strong", {}, String(n))))),
    h("p", { class: "muted" },
      `${view.queued_total} waiting in all · ${view.slots} slot${view.slots === 1 ? "" : "s"}`,
      view.mean_run_seconds !== null ? ` · a job runs ${duration(view.mean_run_seconds)} on average` : "",
      view.estimated_wait_seconds !== null ? ` · a job submitted now starts in about ${duration(view.estimated_wait_seconds)}` : ""),
  ];
}

function waitingTable(view, cancel) {
  if (!view.queued.length) {
    return h("p", { class: "muted" }, view.queued_total ? "None of the waiting jobs is yours." : "Nothing waits.");
  }
  return h("div", { class: "table-wrap" },
    h("table", { class: "queue" },
      h("caption", { class: "visually-hidden" }, "Waiting jobs in the order they will run"),
      h("thead", {}, h("tr", {}, ["#", "job", "priority", "waiting since", "starts in", ""].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, view.queued.map((job) => h("tr", { "data-id": job.id },
        h("td", {}, String(job.position)),
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, `${job.type} ${job.id.slice(0, 8)}`),
          job.retry_at ? h("span", { class: "muted" }, " (retrying)") : null),
        h("td", {}, String(job.priority)),
        h("td", {}, ago(job.created_at)),
        h("td", {}, job.estimated_start_seconds === null ? "unknown yet" : `about ${duration(job.estimated_start_seconds)}`),
        h("td", {}, h("button", {
          type: "button", class: "secondary small", "data-key": `cancel-${job.id}`,
          "aria-label": `Cancel job ${job.id.slice(0, 8)}`,
          onclick: () => cancel(job.id),
        }, "Cancel")))))));
}
