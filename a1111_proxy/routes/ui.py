"""The web UI: `/ui/` serves one HTML page, which loads its ES modules, CSS and icon from
`/ui/assets/<version>/` (a1111_proxy/ui/static; no build step, no CDN: it works air-gapped).

The page needs no token (nor do its assets): its script asks for one and sends it on every API
call. The HTML is revalidated on each load (`no-cache` with an ETag); the assets sit under a
version made from their contents, so they are cached for a year and a new release is fetched at
once. `/` and `/ui` redirect to `/ui/`.
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent.parent / "ui" / "static"
PAGE = "index.html"
# The page: scripts, styles and API calls from this origin only; images also from data: and
# blob: URLs (live previews, images fetched with the token) and https (Civitai's previews).
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob: https:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
ASSET_CACHE = "public, max-age=31536000, immutable"


@cache
def version() -> str:
    """A digest of every static file's path and contents: it changes with any of them."""
    digest = hashlib.sha256()
    for path in sorted(p for p in STATIC.rglob("*") if p.is_file()):
        digest.update(path.relative_to(STATIC).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@cache
def page() -> tuple[bytes, str]:
    """The page with its assets' version filled in, and its ETag."""
    body = (STATIC / PAGE).read_text(encoding="utf-8").replace("{{version}}", version()).encode()
    return body, f'"{hashlib.sha256(body).hexdigest()[:16]}"'


async def ui(request: Request) -> Response:
    body, etag = page()
    headers = {**PAGE_HEADERS, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)


async def to_ui(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)


class Assets(StaticFiles):
    """The page's assets, cached for a year: their URL changes with their contents."""

    def __init__(self) -> None:
        super().__init__(directory=STATIC)

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = ASSET_CACHE
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response
