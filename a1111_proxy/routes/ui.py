"""The web UI: `/ui/` serves one HTML page, which loads its ES modules, CSS and icon from
`/ui/assets/<version>/` (a1111_proxy/ui/static; no build step, no CDN: it works air-gapped).

The page needs no token (nor do its assets): its script asks for one and sends it on every API
call. The HTML is revalidated on each load (`no-cache` with an ETag); the assets sit under a
version made from their contents, so they are cached for a year and a new release is fetched at
once. The files are read once and served from memory. `/` and `/ui` redirect to `/ui/`.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

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
ASSET_HEADERS = {
    "Cache-Control": "public, max-age=31536000, immutable",
    "X-Content-Type-Options": "nosniff",
}


MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def assets() -> dict[str, Asset]:
    """Every static file by its path under the folder, read once: served from memory, with no
    file system call or thread per request (the first paint waits on a dozen of them)."""
    found = {}
    for path in sorted(p for p in STATIC.rglob("*") if p.is_file()):
        body = path.read_bytes()
        media_type = MEDIA_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        found[path.relative_to(STATIC).as_posix()] = Asset(
            body, media_type or "application/octet-stream", etag
        )
    return found


@cache
def version() -> str:
    """A digest of every static file's path and contents: it changes with any of them."""
    digest = hashlib.sha256()
    for name, asset in assets().items():
        digest.update(name.encode() + b"\0" + asset.etag.encode())
    return digest.hexdigest()[:12]


@cache
def page() -> tuple[bytes, str]:
    """The page with its assets' version filled in, and its ETag."""
    body = assets()[PAGE].body.replace(b"{{version}}", version().encode())
    return body, f'"{hashlib.sha256(body).hexdigest()[:16]}"'


async def ui(request: Request) -> Response:
    body, etag = page()
    return _answer(request, body, "text/html; charset=utf-8", etag, PAGE_HEADERS)


async def asset(request: Request) -> Response:
    """`/ui/assets/<version>/<path>`: any version is answered with the files of this one (a page
    of the previous release still gets its files, newer)."""
    found = assets().get(request.path_params["path"])
    if found is None or request.path_params["path"] == PAGE:
        return Response("Not Found", status_code=404, media_type="text/plain")
    return _answer(request, found.body, found.media_type, found.etag, ASSET_HEADERS)


def _answer(
    request: Request, body: bytes, media_type: str, etag: str, headers: dict[str, str]
) -> Response:
    headers = {**headers, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


async def to_ui(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)
