"""Checkpoints and LoRAs: A1111's `/sd-models` and `/loras` exactly as the worker last fetched them,
each entry with a `civitai` key added (last) when Civitai knows its file, and one entry by name.

Everything comes from the database: a listing never waits on a backend or on Civitai.
`?civitai=false` leaves the enrichment out (A1111's answer, byte for byte in content).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from a1111_proxy.errors import ModelNotFound
from a1111_proxy.model_info import CATALOGUE_KINDS, FileIndex, find_entry, known_names
from a1111_proxy.routes import context
from a1111_proxy.routes.context import bool_param, read_catalogue

LISTS = {"checkpoint": "GET /sdapi/v1/sd-models", "lora": "GET /sdapi/v1/loras"}


async def list_sd_models(request: Request) -> Response:
    return await _listing(request, "sd-models")


async def list_loras(request: Request) -> Response:
    return await _listing(request, "loras")


async def _listing(request: Request, name: str) -> Response:
    stored, headers = await read_catalogue(request, name)  # 503 while none was ever fetched
    entries, _ = await _entries(request, name, stored or [])
    return JSONResponse(entries, headers=headers)


async def get_sd_model(request: Request) -> Response:
    """One checkpoint by title, name, model name, file name, or hash (short or full)."""
    return JSONResponse(await _one(request, "sd-models"))


async def get_lora(request: Request) -> Response:
    """One LoRA by name or alias (or hash)."""
    return JSONResponse(await _one(request, "loras"))


async def _one(request: Request, name: str) -> dict[str, Any]:
    wanted = request.path_params["name"]
    kind = CATALOGUE_KINDS[name]
    entries, index = await _entries(request, name, await context.catalogue(request).get(name) or [])
    found = find_entry(kind, entries, wanted, index)
    if found is None:
        known = ", ".join(repr(n) for n in known_names(kind, entries)) or "none yet"
        raise ModelNotFound(f"No {kind} is called {wanted!r}. Known: {known} ({LISTS[kind]}).")
    return found


async def _entries(request: Request, name: str, entries: list[Any]) -> tuple[list[Any], FileIndex]:
    """The catalogue's `entries` for `name`, with Civitai's data unless the caller said no."""
    info = context.model_info(request)
    index = FileIndex(await info.files())
    if not _wants_civitai(request):
        return entries, index
    return await info.with_civitai(CATALOGUE_KINDS[name], entries, index), index


def _wants_civitai(request: Request) -> bool:
    return context.settings(request).civitai_enabled and bool_param(
        request, "civitai", default=True
    )
