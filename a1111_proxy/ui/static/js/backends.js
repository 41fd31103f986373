// Backends: each worker and each of its backend slots (state, running job, last error, jobs
// done, loaded checkpoint, and whatever else the worker reports of it, such as an engine's
// device), from /health's admin detail; a tenant sees the summary /health gives anyone.

import { ApiError, call, session } from "./api.js";
import { bytes, chip, duration, every, facts, fill, h, keepingState, local, section } from "./dom.js";
import { modelName } from "./models.js";

const REFRESH_MS = 3000;
const KNOWN = new Set(["backend", "state", "job_id", "last_error", "down_since", "jobs_done", "checkpoint", "checkpoint_version"]);

export function render(root) {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  root.append(h("h1", { tabindex: "-1" }, "Backends"), body);
  let shown = "";

  async function refresh() {
    await session.ready;
    let health;
    try {
      health = await call("/health");
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 503) throw error;
      health = error.body;
    }
    const memory = Array.isArray(health.workers) ? await call("/sdapi/v1/memory").catch(() => null) : null;
    const key = JSON.stringify([health, memory]);
    if (key === shown) return;
    shown = key;
    keepingState(body, () => fill(body, Array.isArray(health.workers) ? detail(health, memory) : summary(health)));
  }

  const live = every(REFRESH_MS, refresh);
  return () => live.stop();
}

function status(health) {
  return [
    h("p", {}, "Status: ", chip(health.status === "ok" ? "ok" : "unhealthy"), ` · database ${health.database}`),
    health.problems.length ? h("ul", { class: "error-box" }, health.problems.map((p) => h("li", {}, p))) : null,
  ];
}

function summary(health) {
  return [
    ...status(health),
    facts([
      ["Workers", String(health.workers)],
      ["Backend slots", `${health.backends.total} (${health.backends.down} down)`],
    ]),
    h("p", { class: "muted" }, "An admin token shows each worker and backend, with their errors."),
  ];
}

function detail(health, memory) {
  return [
    ...status(health),
    memory ? section("Memory (first backend)", facts([
      ["RAM", memory.ram && memory.ram.total ? `${bytes(memory.ram.used)} of ${bytes(memory.ram.total)}` : null],
      ["GPU", memory.cuda && memory.cuda.system ? `${bytes(memory.cuda.system.used)} of ${bytes(memory.cuda.system.total)}` : null],
    ])) : null,
    health.workers.length ? null : h("p", { class: "muted" }, "No worker is alive: start one with `a1111-proxy worker`."),
    ...health.workers.map((worker) => section(`Worker ${worker.id}`,
      h("p", { class: "muted" }, `last heartbeat ${duration(worker.heartbeat_age_seconds)} ago`),
      h("ul", { class: "backends" }, worker.slots.map(slot)))),
  ];
}

function slot(s) {
  const extra = Object.entries(s).filter(([key, value]) => !KNOWN.has(key) && value !== null && value !== undefined);
  return h("li", { class: "card" },
    h("div", { class: "title-row" }, h("h3", {}, s.backend), chip(s.state)),
    facts([
      ["Running", s.job_id && h("a", { href: `#/jobs/${encodeURIComponent(s.job_id)}` }, s.job_id)],
      ["Jobs done", String(s.jobs_done ?? 0)],
      ["Checkpoint", s.checkpoint && modelName(s.checkpoint)],
      ["Down since", s.down_since && local(new Date(s.down_since * 1000).toISOString())],
      ["Last error", s.last_error && h("span", { class: "error-text" }, s.last_error)],
      ...extra.map(([key, value]) => [key.replaceAll("_", " "), typeof value === "object" ? JSON.stringify(value) : String(value)]),
    ]));
}
