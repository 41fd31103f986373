// New job: a form for txt2img and img2img (prompt, model, sampler and schedule, size, steps,
// CFG, seed, batch, hires fix, LoRAs, the init image by drag and drop). Submitted as an async
// job, then shown live on its own page. `#/new?from=<id>` starts from that job's request.

import { call } from "./api.js";
import { announce, errorBox, field, fill, h, select, uid } from "./dom.js";
import { civitaiPreview, loadModels, modelName } from "./models.js";

// The body keys this form sets; the others of a job it starts from are sent as they were.
const NUMBERS = {
  width: [512, 8, 16384, 8], height: [512, 8, 16384, 8], steps: [20, 1, 500, 1],
  cfg_scale: [7, 1, 30, 0.5], seed: [-1, -1, 4294967295, 1], batch_size: [1, 1, 64, 1],
  n_iter: [1, 1, 100, 1], hr_scale: [2, 1, 4, 0.05], hr_second_pass_steps: [0, 0, 500, 1],
  denoising_strength: [0.7, 0, 1, 0.05], priority: [0, -1000, 1000, 1],
};
const TEXTS = ["prompt", "negative_prompt", "sampler_name", "scheduler", "hr_upscaler", "webhook_url"];
const HIRES = ["hr_scale", "hr_second_pass_steps", "hr_upscaler"];

export function render(root, { query }) {
  const c = controls();
  const message = h("div", { "aria-live": "assertive" });
  let init = null; // the img2img input image, as a data: URL
  let base = {}; // the request this form started from

  const kind = h("fieldset", { class: "kind" }, h("legend", {}, "Kind"),
    ["txt2img", "img2img"].map((value) => h("label", {},
      h("input", { type: "radio", name: "kind", value, checked: value === "txt2img" }), ` ${value}`)));
  const kindOf = () => kind.querySelector("input:checked").value;

  const drop = dropZone((dataUrl, image) => {
    init = dataUrl;
    if (image) {
      c.width.value = Math.max(8, Math.round(image.naturalWidth / 8) * 8);
      c.height.value = Math.max(8, Math.round(image.naturalHeight / 8) * 8);
    }
  });
  const hires = h("fieldset", { class: "grid" }, h("legend", {}, "Hires fix"),
    field("Upscaler", c.hr_upscaler), field("Scale", c.hr_scale),
    field("Hires steps", c.hr_second_pass_steps, "0: as many as the first pass"));
  const denoising = field("Denoising strength", c.denoising_strength);
  const modelInfo = h("div", { class: "model-info", "aria-live": "polite" });
  const loras = loraPicker(c.prompt);

  function sync() {
    const img2img = kindOf() === "img2img";
    drop.el.hidden = !img2img;
    hires.hidden = img2img || !c.enable_hr.checked;
    c.enable_hr.closest("label").hidden = img2img;
    denoising.hidden = !img2img && !c.enable_hr.checked;
  }

  const form = h("form", {
    class: "new-job",
    onchange: sync,
    async onsubmit(event) {
      event.preventDefault();
      message.replaceChildren();
      const type = kindOf();
      if (type === "img2img" && !init) {
        message.replaceChildren(errorBox(new Error("img2img needs an init image: drop one, or choose a file.")));
        drop.input.focus();
        return;
      }
      const submit = form.querySelector("button[type=submit]");
      submit.disabled = true;
      try {
        const job = await call(`/sdapi/v1/${type}`, {
          method: "POST", body: body(type, c, base, init), headers: { Prefer: "respond-async" },
        });
        announce("Submitted");
        location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
      } catch (error) {
        message.replaceChildren(errorBox(error));
        submit.disabled = false;
      }
    },
  },
  kind, drop.el,
  field("Prompt", c.prompt), field("Negative prompt", c.negative_prompt),
  loras.el,
  h("div", { class: "model-row" }, field("Model", c.model), modelInfo),
  h("div", { class: "grid" },
    field("Sampler", c.sampler_name), field("Schedule type", c.scheduler),
    field("Width", c.width), field("Height", c.height),
    field("Steps", c.steps), field("CFG scale", c.cfg_scale),
    h("div", { class: "field" }, h("label", { for: c.seed.id }, "Seed"),
      h("div", { class: "inline" }, c.seed, h("button", {
        type: "button", class: "secondary",
        onclick: () => { c.seed.value = Math.floor(Math.random() * 4294967295); announce(`Seed ${c.seed.value}`); },
      }, "Random")),
      h("small", { class: "hint", id: `${c.seed.id}-hint` }, "-1: a new one each run")),
    field("Batch size", c.batch_size), field("Batch count", c.n_iter)),
  h("label", { class: "check" }, c.enable_hr, "Hires fix"), hires, denoising,
  h("details", {}, h("summary", {}, "More"), h("div", { class: "grid" },
    field("Priority", c.priority, "higher runs first"),
    field("Webhook URL", c.webhook_url, "POSTed to when the job ends"))),
  h("div", { class: "actions" }, h("button", { type: "submit" }, "Generate")),
  message);
  c.seed.setAttribute("aria-describedby", `${c.seed.id}-hint`);
  c.model.addEventListener("change", () => describeModel());
  root.append(h("h1", { tabindex: "-1" }, "New job"), form);
  sync();

  let checkpoints = [];
  function describeModel() {
    const entry = checkpoints.find((m) => m.title === c.model.value);
    const civitai = entry && entry.civitai;
    fill(modelInfo, ...(entry ? [civitaiPreview(civitai, 96), h("p", {},
      civitai ? `${civitai.model_name} · ${civitai.version_name || ""} (${civitai.base_model || "base model unknown"})` : modelName(entry.title),
      civitai && civitai.trained_words && civitai.trained_words.length ? h("small", { class: "hint" }, ` Trigger words: ${civitai.trained_words.join(", ")}`) : null)] : []));
  }

  const catalogue = Promise.all([
    addOptions(c.sampler_name, "/sdapi/v1/samplers", (s) => [s.name, s.name]),
    addOptions(c.scheduler, "/sdapi/v1/schedulers", (s) => [s.name, s.label || s.name]),
    addOptions(c.hr_upscaler, "/sdapi/v1/latent-upscale-modes", (m) => [m.name, m.name]),
    addOptions(c.hr_upscaler, "/sdapi/v1/upscalers", (u) => [u.name, u.name]),
    loadModels().then((found) => {
      checkpoints = found.checkpoints;
      for (const m of checkpoints) c.model.append(h("option", { value: m.title }, modelName(m.title)));
      loras.fill(found.loras);
    }).catch(() => {}),
  ]);

  const from = query.get("from");
  if (from) {
    Promise.all([call(`/sdapi/v1/jobs/${encodeURIComponent(from)}`), catalogue]).then(([job]) => {
      base = job.request;
      fillFrom(c, kind, job);
      sync();
      describeModel();
      if (job.type === "img2img") message.replaceChildren(h("p", { class: "note" }, "Add the init image again: input images are not stored."));
    }).catch((error) => message.replaceChildren(errorBox(error)));
  }
  return null;
}

function controls() {
  const c = {};
  for (const [name, [value, min, max, step]] of Object.entries(NUMBERS)) {
    c[name] = h("input", { type: "number", name, value, min, max, step, inputmode: "decimal", required: true });
  }
  c.prompt = h("textarea", { name: "prompt", rows: 4 });
  c.negative_prompt = h("textarea", { name: "negative_prompt", rows: 2 });
  c.model = select("model", [["", "the backend's current model"]]);
  c.sampler_name = select("sampler_name", [["", "the backend's default"]]);
  c.scheduler = select("scheduler", [["", "automatic"]]);
  c.hr_upscaler = select("hr_upscaler", []);
  c.enable_hr = h("input", { type: "checkbox", name: "enable_hr" });
  c.webhook_url = h("input", { type: "url", name: "webhook_url" });
  for (const control of Object.values(c)) control.id = uid("f");
  return c;
}

async function addOptions(control, path, option) {
  try {
    for (const entry of await call(path)) {
      const [value, text] = option(entry);
      if (![...control.options].some((o) => o.value === value)) control.append(h("option", { value }, text));
    }
  } catch {
    // no catalogue yet: the backend's defaults apply
  }
}

function body(type, c, base, init) {
  const out = { ...base };
  for (const key of [...TEXTS, ...Object.keys(NUMBERS), "enable_hr", "init_images", "override_settings"]) delete out[key];
  if (base.override_settings) out.override_settings = { ...base.override_settings };
  for (const name of TEXTS) if (c[name].value.trim()) out[name] = c[name].value;
  for (const name of Object.keys(NUMBERS)) out[name] = Number(c[name].value);
  const hires = type === "txt2img" && c.enable_hr.checked;
  if (hires) out.enable_hr = true;
  if (!hires) for (const name of HIRES) delete out[name];
  if (!hires && type === "txt2img") delete out.denoising_strength;
  if (!out.priority) delete out.priority;
  if (type === "img2img") out.init_images = [init];
  const model = c.model.value;
  if (model) out.override_settings = { ...(out.override_settings || {}), sd_model_checkpoint: model };
  else if (out.override_settings) delete out.override_settings.sd_model_checkpoint;
  return out;
}

function fillFrom(c, kind, job) {
  const r = job.request;
  kind.querySelector(`input[value="${job.type}"]`).checked = true;
  for (const name of [...TEXTS, ...Object.keys(NUMBERS)]) {
    if (r[name] === undefined || r[name] === null) continue;
    if (c[name].tagName === "SELECT" && ![...c[name].options].some((o) => o.value === String(r[name]))) {
      c[name].append(h("option", { value: String(r[name]) }, String(r[name])));
    }
    c[name].value = String(r[name]);
  }
  if (job.priority) c.priority.value = job.priority;
  c.enable_hr.checked = Boolean(r.enable_hr);
  const model = r.override_settings && r.override_settings.sd_model_checkpoint;
  if (model) {
    if (![...c.model.options].some((o) => o.value === model)) c.model.append(h("option", { value: model }, modelName(model)));
    c.model.value = model;
  }
}

// The init image: dropped on the zone, or chosen with its file input (keyboard users).
function dropZone(chosen) {
  const input = h("input", { type: "file", accept: "image/*", name: "init_image" });
  const preview = h("img", { class: "init-preview", alt: "The init image", hidden: true });
  const el = h("div", {
    class: "drop",
    ondragover(event) { event.preventDefault(); el.classList.add("over"); },
    ondragleave() { el.classList.remove("over"); },
    ondrop(event) {
      event.preventDefault();
      el.classList.remove("over");
      const file = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/"));
      if (file) read(file);
    },
  }, h("p", {}, "Drop the init image here, or choose it:"), field("Init image", input), preview);
  input.addEventListener("change", () => { if (input.files[0]) read(input.files[0]); });

  function read(file) {
    const reader = new FileReader();
    reader.onload = () => {
      preview.onload = () => chosen(reader.result, preview);
      preview.src = reader.result;
      preview.hidden = false;
      chosen(reader.result, null);
      announce(`Init image ${file.name}`);
    };
    reader.readAsDataURL(file);
  }
  return { el, input };
}

// Pick a LoRA and a weight; Insert puts <lora:name:weight> into the prompt at the cursor, and its
// trigger words (from Civitai) are a click away.
function loraPicker(prompt) {
  const choice = select("lora", [["", "choose a LoRA"]]);
  const weight = h("input", { type: "number", name: "lora_weight", value: 0.8, min: -5, max: 5, step: 0.05 });
  const words = h("div", { class: "words", "aria-live": "polite" });
  let entries = [];
  const insert = (text) => {
    const { selectionStart: a, selectionEnd: b, value } = prompt;
    const before = value.slice(0, a);
    const gap = before && !/\s$/.test(before) ? " " : "";
    prompt.value = `${before}${gap}${text}${value.slice(b)}`;
    prompt.focus();
    prompt.selectionStart = prompt.selectionEnd = a + gap.length + text.length;
    announce(`Inserted ${text}`);
  };
  choice.addEventListener("change", () => {
    const entry = entries.find((e) => e.name === choice.value);
    const trained = (entry && entry.civitai && entry.civitai.trained_words) || [];
    words.replaceChildren(...trained.map((word) => h("button", { type: "button", class: "secondary small", onclick: () => insert(word) }, `+ ${word}`)));
  });
  const el = h("fieldset", { class: "grid lora", hidden: true }, h("legend", {}, "LoRA"),
    field("LoRA", choice), field("Weight", weight),
    h("div", { class: "field" }, h("button", {
      type: "button", class: "secondary",
      onclick: () => { if (choice.value) insert(`<lora:${choice.value}:${Number(weight.value)}>`); else choice.focus(); },
    }, "Insert into prompt")),
    words);
  return {
    el,
    fill(found) {
      entries = found;
      el.hidden = !found.length;
      for (const entry of found) choice.append(h("option", { value: entry.name }, entry.alias || entry.name));
    },
  };
}
