// One job: live progress and preview while it waits or runs, then every image full size with
// its infotext and a download link; its parameters, timings, attempts and error; its webhook
// deliveries (each attempt, send again); cancel, run again, and the request as curl or Python.

import { blobUrl, call, follow, session, showImage } from "./api.js";
import {
  announce, between, chip, copyButton, duration, errorBox, every, facts, fill, h, keepingState, local,
  progress, section, toast,
} from "./dom.js";
import { modelName } from "./models.js";
import { curl, hasOmittedImages, python } from "./snippets.js";

const TERMINAL = new Set(["completed", "error", "canceled"]);
const HOOKS_MS = 2000;

export function render(root, { params: [id] }) {
  const path = `/sdapi/v1/jobs/${encodeURIComponent(id)}`;
  const stop = new AbortController();
  const bar = progress(`Progress of job ${id}`);
  const preview = h("img", { class: "preview", alt: "Live preview", hidden: true });
  const hooks = h("div", { class: "hooks" });
  let job = null;
  let hooksTimer = null;
  let watched = false; // followed live: its progress stays shown once it ends

  root.append(h("h1", { tabindex: "-1" }, "Job ", h("code", {}, id)), h("p", { class: "muted" }, "Loading…"));

  function show(next) {
    const ended = job && !TERMINAL.has(job.status) && TERMINAL.has(next.status);
    job = next;
    keepingState(root, () => fill(root, page(job, { bar, preview, hooks, act, watched })));
    if (ended) announce(`Job ${job.status}`);
    if (job.webhook && !hooksTimer) hooksTimer = every(HOOKS_MS, loadHooks);
  }

  let shownHooks = "";
  let settled = 0; // polls in a row that found the job ended and no delivery under way
  async function loadHooks() {
    const { deliveries } = await call(`${path}/webhooks`, { signal: stop.signal });
    const seen = JSON.stringify(deliveries);
    if (seen !== shownHooks) {
      shownHooks = seen;
      keepingState(hooks, () => hooks.replaceChildren(deliveryList(deliveries, redeliver)));
    }
    const busy = deliveries.some((d) => d.status === "pending" || d.status === "sending");
    settled = !busy && TERMINAL.has(job.status) ? settled + 1 : 0;
    // Settled: nothing more will come (a minute on, a job that ended sent all it will send).
    if (settled && (deliveries.length || settled * HOOKS_MS > 60000)) {
      hooksTimer.stop();
      hooksTimer = "stopped";
    }
  }

  async function redeliver(delivery) {
    try {
      await call(`${path}/webhooks/redeliver`, { method: "POST", body: { delivery_id: delivery.id } });
      toast(`Sending ${delivery.type} again`);
    } catch (error) {
      toast(error.message, "error");
    }
    if (hooksTimer === "stopped") hooksTimer = every(HOOKS_MS, loadHooks);
    else hooksTimer.now();
  }

  async function act(what) {
    try {
      if (what === "cancel") {
        show({ ...job, ...(await call(`${path}/cancel`, { method: "POST" })) });
        toast(job.status === "canceled" ? "Canceled" : "Asked the backend to stop");
      } else if (what === "again") {
        const body = { ...job.request, ...(job.priority ? { priority: job.priority } : {}) };
        const made = await call(`/sdapi/v1/${job.type}`, { method: "POST", body, headers: { Prefer: "respond-async" } });
        location.hash = `#/jobs/${encodeURIComponent(made.id)}`;
      }
    } catch (error) {
      toast(error.message, "error");
    }
  }

  function onEvent(name, data) {
    if (name === "progress") {
      bar.set(data.progress, [data.steps && `step ${data.step} of ${data.steps}`, data.eta && `about ${duration(data.eta)} left`].filter(Boolean).join(" · "));
      if (data.preview) {
        preview.src = data.preview;
        preview.hidden = false;
      }
      return true;
    }
    if (name === "status") {
      show({ ...job, ...data, result: job.result });
      return true;
    }
    if (TERMINAL.has(name)) {
      if (name === "completed") bar.set(1);
      show(data);
      return false;
    }
    return true;
  }

  call(path, { signal: stop.signal }).then((found) => {
    bar.set(found.progress);
    show(found);
    if (!TERMINAL.has(found.status)) {
      watched = true;
      follow(`${path}/events`, onEvent, stop.signal).catch((error) => toast(error.message, "error"));
    }
  }).catch((error) => {
    if (stop.signal.aborted) return;
    root.replaceChildren(h("h1", { tabindex: "-1" }, "Job ", h("code", {}, id)), errorBox(error));
  });

  return () => {
    stop.abort();
    if (hooksTimer && hooksTimer !== "stopped") hooksTimer.stop();
  };
}

function page(job, { bar, preview, hooks, act, watched }) {
  const running = !TERMINAL.has(job.status);
  return [
    h("div", { class: "title-row" },
      h("h1", { tabindex: "-1" }, "Job ", h("code", {}, job.id)), chip(job.status)),
    actions(job, act),
    running || watched ? live(job, bar, preview) : null,
    job.error ? h("div", { class: "error-box", role: "alert" },
      h("strong", {}, job.error.code || "error"), ": ", job.error.message || "") : null,
    job.render_error ? h("div", { class: "error-box" }, job.render_error) : null,
    images(job),
    parameters(job),
    section("Timings", facts([
      ["Queued", local(job.created_at)],
      ["Started", job.started_at && `${local(job.started_at)} (waited ${between(job.created_at, job.started_at)})`],
      ["Completed", job.completed_at && `${local(job.completed_at)} (ran ${between(job.started_at || job.created_at, job.completed_at)})`],
      ["Deadline", local(job.deadline_at)],
    ])),
    section("Attempts", facts([
      ["Attempts", `${job.attempts} of at most ${job.max_attempts}`],
      ["Backend", job.backend],
      ["Owner", job.owner],
      ["Priority", String(job.priority)],
      ["Last error", job.error && `${job.error.code}: ${job.error.message}`],
    ])),
    job.webhook ? section("Webhooks", h("p", { class: "muted" }, `${job.webhook.url} (${job.webhook.events.join(", ")})`), hooks) : null,
    section("As code",
      snippet("curl", curl(job)),
      snippet("Python (webuiapi)", python(job))),
  ];
}

function actions(job, act) {
  const omitted = hasOmittedImages(job.request);
  const generation = job.type === "txt2img" || job.type === "img2img";
  const why = omitted ? h("small", { id: "again-why", class: "hint" },
    "Its input images were not stored: open it as a new job and add them.") : null;
  return h("div", { class: "actions" },
    !TERMINAL.has(job.status)
      ? h("button", { type: "button", class: "danger", "data-key": "cancel", onclick: () => act("cancel") }, "Cancel")
      : null,
    generation ? h("button", {
      type: "button", "data-key": "again", disabled: omitted, "aria-describedby": why && "again-why",
      onclick: () => act("again"),
    }, "Run again") : null,
    generation ? h("a", { class: "button secondary", href: `#/new?from=${encodeURIComponent(job.id)}` }, "Edit as new job") : null,
    why);
}

function live(job, bar, preview) {
  const where = job.status === "queued"
    ? [job.queue_position ? `Waiting: number ${job.queue_position} in the queue.` : "Waiting in the queue.",
      job.waiting_reason ? ` ${job.waiting_reason}` : ""]
    : job.status === "processing" ? [`Running on ${job.backend || "a backend"}.`]
      : [`Ended ${job.status}.`];
  return h("div", { class: "live card" }, h("p", {}, where), bar.el, preview);
}

function images(job) {
  if (!job.image_urls.length) return null;
  const info = parseInfo(job.result);
  const encoded = job.result && Array.isArray(job.result.images) && job.result.images.length === job.image_urls.length
    ? job.result.images : null;
  return section(`Images (${job.image_urls.length})`, h("div", { class: "images" }, job.image_urls.map((url, n) => {
    const name = `${job.id}-${n}.${encoded ? kind(encoded[n]) : "png"}`;
    const img = h("img", { alt: `Image ${n + 1} of job ${job.id}`, decoding: "async" });
    const link = h("a", { class: "button secondary", href: url, download: name }, `Download image ${n + 1}`);
    if (encoded) {
      img.src = link.href = `data:image/${kind(encoded[n])};base64,${encoded[n]}`;
    } else {
      showImage(img, url, { lazy: false });
      if (session.token) link.addEventListener("click", (event) => download(event, url, name), { once: true });
    }
    const text = info.infotexts && info.infotexts[n];
    return h("figure", {}, img, h("figcaption", {}, text ? h("pre", { class: "infotext" }, text) : null, link));
  })));
}

async function download(event, url, name) {
  event.preventDefault();
  const link = event.currentTarget;
  link.href = await blobUrl(url);
  link.download = name;
  link.click();
}

const kind = (b64) => (b64.startsWith("/9j/") ? "jpeg" : b64.startsWith("UklGR") ? "webp" : "png");

function parseInfo(result) {
  try {
    return typeof result?.info === "string" ? JSON.parse(result.info) : (result?.info || {});
  } catch {
    return {};
  }
}

function parameters(job) {
  const r = job.request;
  const model = r.override_settings && r.override_settings.sd_model_checkpoint;
  const info = parseInfo(job.result);
  const size = r.width || r.height ? `${r.width || 512} × ${r.height || 512}` : null;
  return section("Parameters",
    facts([
      ["Prompt", r.prompt],
      ["Negative prompt", r.negative_prompt],
      ["Model", model ? modelName(model) : info.sd_model_name],
      ["Sampler", [r.sampler_name || r.sampler_index, r.scheduler].filter(Boolean).join(", ")],
      ["Size", size],
      ["Steps", r.steps],
      ["CFG scale", r.cfg_scale],
      ["Seed", info.all_seeds ? info.all_seeds.join(", ") : r.seed],
      ["Batch", r.batch_size || r.n_iter ? `${r.batch_size || 1} × ${r.n_iter || 1}` : null],
      ["Hires fix", r.enable_hr ? `${r.hr_upscaler || "Latent"} × ${r.hr_scale || 2}, ${r.hr_second_pass_steps || r.steps || ""} steps, denoising ${r.denoising_strength ?? 0.7}` : null],
      ["Denoising", job.type === "img2img" ? r.denoising_strength : null],
    ].map(([k, v]) => [k, v === undefined || v === null ? "" : String(v)])),
    h("details", { "data-key": "request" }, h("summary", {}, "The whole request (JSON)"), h("pre", {}, JSON.stringify(r, null, 2))));
}

function snippet(title, text) {
  return h("details", { class: "snippet", "data-key": `snippet-${title}` },
    h("summary", {}, title),
    h("pre", {}, h("code", {}, text)),
    copyButton(`Copy ${title}`, () => text));
}

function deliveryList(deliveries, redeliver) {
  if (!deliveries.length) return h("p", { class: "muted" }, "No delivery yet: one is made when the job reaches an event it asked for.");
  return h("ul", { class: "deliveries" }, deliveries.map((d) => h("li", { class: "card" },
    h("div", { class: "title-row" },
      h("strong", {}, d.type), chip(d.status),
      h("span", { class: "muted" }, `${d.attempt_count} attempt${d.attempt_count === 1 ? "" : "s"}`,
        d.last_status_code ? ` · last answer ${d.last_status_code}` : "",
        d.next_attempt_at && d.status === "pending" ? ` · next ${local(d.next_attempt_at)}` : ""),
      h("button", { type: "button", class: "secondary", "data-key": `redeliver-${d.id}`, onclick: () => redeliver(d) }, "Redeliver")),
    d.last_error ? h("p", { class: "error-text" }, d.last_error) : null,
    h("details", { "data-key": `attempts-${d.id}` },
      h("summary", {}, `Attempts of ${d.type}`),
      d.attempts.length ? h("table", {},
        h("thead", {}, h("tr", {}, ["#", "trigger", "started", "took", "answer", "error"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, d.attempts.map((a) => h("tr", {},
          h("td", {}, a.number), h("td", {}, a.trigger), h("td", {}, local(a.started_at)),
          h("td", {}, a.duration_ms === null ? "" : `${a.duration_ms} ms`),
          h("td", {}, a.status_code === null ? "" : String(a.status_code), a.response_body ? h("pre", { class: "small" }, a.response_body) : null),
          h("td", {}, a.error || ""))))) : h("p", { class: "muted" }, "No attempt yet.")))));
}
