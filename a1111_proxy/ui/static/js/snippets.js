// A job's request as something to paste: a curl command, or a Python call with the webuiapi
// package (what A1111 scripts use). The token is never written into them: they read it from
// the A1111_PROXY_TOKEN environment variable.

// webuiapi's own keyword arguments for txt2img and img2img (webuiapi 0.9.17); other keys of a
// request cannot be passed to it and are listed in a comment.
const COMMON = [
  "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
  "seed_resize_from_w", "sampler_name", "scheduler", "batch_size", "n_iter", "steps", "cfg_scale",
  "width", "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid", "eta",
  "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings", "override_settings_restore_afterwards",
  "script_args", "script_name", "send_images", "save_images", "alwayson_scripts", "sampler_index",
];
const KWARGS = {
  txt2img: new Set([...COMMON, "enable_hr", "denoising_strength", "firstphase_width", "firstphase_height",
    "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
    "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"]),
  img2img: new Set([...COMMON, "resize_mode", "denoising_strength", "image_cfg_scale", "mask_blur",
    "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    "initial_noise_multiplier", "include_init_images"]),
};
const OMITTED = /^<image: \d+ characters omitted>$/;

export function hasOmittedImages(value) {
  if (typeof value === "string") return OMITTED.test(value);
  if (Array.isArray(value)) return value.some(hasOmittedImages);
  if (value && typeof value === "object") return Object.values(value).some(hasOmittedImages);
  return false;
}

const quote = (text) => `'${text.replaceAll("'", "'\\''")}'`;

export function curl(job, origin = location.origin) {
  const body = JSON.stringify(job.request, null, 2);
  const lines = [
    `curl -s -X POST ${origin}/sdapi/v1/${job.type}`,
    "  -H 'Content-Type: application/json'",
    "  -H \"Authorization: Bearer $A1111_PROXY_TOKEN\"",
    "  -H 'Prefer: respond-async'",
    `  -d ${quote(body)}`,
  ];
  const note = hasOmittedImages(job.request)
    ? "# The input images were not stored: put base64 images where the body says <image: ...>.\n" : "";
  return note + lines.join(" \\\n");
}

export function python(job, origin = location.origin) {
  const known = KWARGS[job.type];
  if (!known) return `# webuiapi has no call for ${job.type} jobs: use the curl command.`;
  const args = [];
  const others = [];
  for (const [key, value] of Object.entries(job.request)) {
    if (job.type === "img2img" && ["init_images", "mask"].includes(key)) continue;
    if (known.has(key)) args.push(`    ${key}=${py(value, 4)},`);
    else others.push(`    # ${key}=${JSON.stringify(value)}`);
  }
  if (job.type === "img2img") {
    args.unshift("    images=[Image.open(\"init.png\")],  # the input images were not stored");
    if (job.request.mask) args.push("    mask_image=Image.open(\"mask.png\"),");
  }
  return [
    "import os",
    "",
    "import webuiapi",
    ...(job.type === "img2img" ? ["from PIL import Image"] : []),
    "",
    `api = webuiapi.WebUIApi(baseurl=${py(`${origin}/sdapi/v1`)})`,
    "if os.environ.get(\"A1111_PROXY_TOKEN\"):",
    "    api.set_auth(\"token\", os.environ[\"A1111_PROXY_TOKEN\"])",
    `result = api.${job.type}(`,
    ...args,
    ...(others.length ? ["    # not webuiapi arguments, so not sent:", ...others] : []),
    ")",
    "for n, image in enumerate(result.images):",
    "    image.save(f\"image-{n}.png\")",
  ].join("\n");
}

// A JSON value as a Python literal.
function py(value, indent = 0) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return Number.isFinite(value) ? String(value) : "None";
  if (typeof value === "string") return JSON.stringify(value);
  const pad = " ".repeat(indent + 4);
  const end = " ".repeat(indent);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => `${pad}${py(v, indent + 4)},`).join("\n")}\n${end}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([k, v]) => `${pad}${JSON.stringify(k)}: ${py(v, indent + 4)},`).join("\n")}\n${end}}`;
}
