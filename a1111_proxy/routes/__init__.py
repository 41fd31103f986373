"""Every route of the API, in one list."""

from __future__ import annotations

from starlette.routing import Mount, Route

from a1111_proxy.catalogue import ENTRIES
from a1111_proxy.routes import (
    a1111,
    docs,
    downloads,
    events,
    health,
    images,
    jobs,
    models,
    queue,
    ui,
    webhooks,
)

# The catalogue entries answered as the worker stored them; the others have routes of their own.
OWN_ROUTES = frozenset({"sd-models", "loras", "memory", "options"})
CATALOGUE = tuple(
    name for name in ENTRIES if name not in OWN_ROUTES and not name.startswith("controlnet-")
)
QUEUED = ("interrogate", "extra-single-image", "extra-batch-images")
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

ROUTES = [
    Route("/sdapi/v1/txt2img", jobs.txt2img, methods=["POST"]),
    Route("/sdapi/v1/img2img", jobs.img2img, methods=["POST"]),
    Route("/sdapi/v1/jobs", jobs.list_jobs, methods=["GET"]),
    Route("/sdapi/v1/jobs/{job_id}", jobs.get_job, methods=["GET"]),
    Route("/sdapi/v1/jobs/{job_id}/cancel", jobs.cancel_job, methods=["POST"]),
    Route("/sdapi/v1/jobs/{job_id}/images/{n:int}", images.get_image, methods=["GET"]),
    Route("/sdapi/v1/jobs/{job_id}/events", events.job_events, methods=["GET"]),
    Route("/sdapi/v1/queue", queue.queue, methods=["GET"]),
    Route("/sdapi/v1/jobs/{job_id}/webhooks", webhooks.list_deliveries, methods=["GET"]),
    Route("/sdapi/v1/jobs/{job_id}/webhooks/redeliver", webhooks.redeliver, methods=["POST"]),
    Route("/sdapi/v1/progress", a1111.progress, methods=["GET"]),
    Route("/sdapi/v1/interrupt", a1111.interrupt, methods=["POST"]),
    Route("/sdapi/v1/skip", a1111.skip, methods=["POST"]),
    Route("/sdapi/v1/options", a1111.get_options, methods=["GET"]),
    Route("/sdapi/v1/options", a1111.set_options, methods=["POST"]),
    Route("/sdapi/v1/sd-models", models.list_sd_models, methods=["GET"]),
    Route("/sdapi/v1/sd-models/{name:path}", models.get_sd_model, methods=["GET"]),
    Route("/sdapi/v1/loras", models.list_loras, methods=["GET"]),
    Route("/sdapi/v1/loras/{name:path}", models.get_lora, methods=["GET"]),
    Route(downloads.PATH, downloads.add_download, methods=["POST"]),
    Route(downloads.PATH, downloads.list_downloads, methods=["GET"]),
    Route(f"{downloads.PATH}/{{download_id}}", downloads.get_download, methods=["GET"]),
    Route(f"{downloads.PATH}/{{download_id}}/cancel", downloads.cancel_download, methods=["POST"]),
    Route(f"{downloads.PATH}/{{download_id}}/events", downloads.download_events, methods=["GET"]),
    *(Route(f"/sdapi/v1/{name}", a1111.catalogue_entry, methods=["GET"]) for name in CATALOGUE),
    Route("/sdapi/v1/refresh-checkpoints", a1111.refresh_checkpoints, methods=["POST"]),
    Route("/sdapi/v1/refresh-loras", a1111.refresh_loras, methods=["POST"]),
    Route("/sdapi/v1/refresh-vae", a1111.refresh_vae, methods=["POST"]),
    Route("/sdapi/v1/refresh-embeddings", a1111.refresh_embeddings, methods=["POST"]),
    Route("/sdapi/v1/memory", a1111.memory, methods=["GET"]),
    Route("/sdapi/v1/unload-checkpoint", a1111.unload_checkpoint, methods=["POST"]),
    Route("/sdapi/v1/reload-checkpoint", a1111.reload_checkpoint, methods=["POST"]),
    Route("/sdapi/v1/png-info", a1111.png_info, methods=["POST"]),
    *(Route(f"/sdapi/v1/{kind}", a1111.queued_route(kind), methods=["POST"]) for kind in QUEUED),
    Route("/controlnet/detect", a1111.queued_route("controlnet-detect"), methods=["POST"]),
    Route("/controlnet/version", a1111.controlnet_entry, methods=["GET"]),
    Route("/controlnet/model_list", a1111.controlnet_entry, methods=["GET"]),
    Route("/controlnet/module_list", a1111.controlnet_entry, methods=["GET"]),
    Route("/health", health.health, methods=["GET"]),
    Route("/ready", health.ready, methods=["GET"]),
    Route("/metrics", health.metrics, methods=["GET"]),
    Route("/openapi.json", docs.openapi_json, methods=["GET"]),
    Route("/doc", docs.doc, methods=["GET"]),
    Mount("/doc/static", app=docs.swagger_assets(), name="doc-static"),
    Route("/", ui.to_ui, methods=["GET"]),
    Route("/ui", ui.to_ui, methods=["GET"]),
    Route("/ui/", ui.ui, methods=["GET"]),
    Route("/ui/assets/{version}/{path:path}", ui.asset, methods=["GET"]),
    # Last: whatever else is asked of A1111's API gets a clear 404 (or 405).
    Route("/sdapi/v1/{rest:path}", a1111.unsupported, methods=ANY_METHOD),
    Route("/controlnet/{rest:path}", a1111.unsupported, methods=ANY_METHOD),
]
