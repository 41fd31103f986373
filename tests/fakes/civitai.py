"""Civitai as tests see it: a by-hash answer shaped like the real one (ENGINE.md §6), a respx
router to serve it through a client's `transport=`, a sleep that only records, and `FakeCivitai`,
a real HTTP server for model downloads (versions by id, hash and model; files with Range; a
dropped connection, a corrupted file and a held answer on demand)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import struct
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import respx
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

CIVITAI = "https://civitai.test"


def version(version_id: int, name: str, kind: str = "Checkpoint", **extra: Any) -> dict[str, Any]:
    """A model version as `GET /api/v1/model-versions/by-hash/{hash}` answers it."""
    return {
        "id": version_id,
        "modelId": version_id + 1000,
        "name": "v1.0",
        "description": None,
        "baseModel": "SD 1.5",
        "baseModelType": "Standard",
        "status": "Published",
        "nsfwLevel": 1,
        "trainedWords": ["detailed"] if kind == "LORA" else [],
        "stats": {"downloadCount": 10, "thumbsUpCount": 2, "thumbsDownCount": 0},
        "model": {"name": name, "type": kind, "nsfw": False, "poi": False},
        "files": [
            {
                "id": 1,
                "name": f"{name}.safetensors",
                "type": "Model",
                "sizeKB": 1.0,
                "hashes": {"AutoV2": "ABCDEF0123", "SHA256": "ABCDEF0123" + "0" * 54},
                "downloadUrl": f"{CIVITAI}/api/download/models/{version_id}",
                "primary": True,
            }
        ],
        "images": [
            {
                "url": f"https://image.test/{version_id}.jpeg",
                "nsfwLevel": 1,
                "width": 512,
                "height": 768,
                "hash": "U00000",
                "meta": {"prompt": "a cat"},
            }
        ],
        "downloadUrl": f"{CIVITAI}/api/download/models/{version_id}",
        **extra,
    }


def by_hash(router: respx.Router, hash_: str) -> respx.Route:
    return router.get(f"{CIVITAI}/api/v1/model-versions/by-hash/{hash_}")


def transport(router: respx.Router) -> httpx.AsyncBaseTransport:
    return httpx.MockTransport(router.async_handler)


class RecordedSleep:
    """Stands in for asyncio.sleep: records each wait and moves a fake clock on instead."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.now = 1000.0

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def safetensors_bytes(data: bytes, metadata: dict[str, str] | None = None) -> bytes:
    """A minimal .safetensors file: 8-byte little-endian header length, JSON header, data."""
    header = json.dumps(
        {
            "__metadata__": metadata or {},
            "weight": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]},
        }
    ).encode()
    return struct.pack("<Q", len(header)) + header + data


# --- a real Civitai on loopback: model versions, downloads with Range, and its misbehaviours ----


@dataclass
class Listed:
    """A model version the fake serves, and its one file."""

    version_id: int
    model_id: int
    name: str
    kind: str  # Civitai's model type: Checkpoint, LORA, Controlnet, VAE, TextualInversion
    data: bytes
    file_name: str
    pickle: bool = False
    gated: bool = False  # downloads need the token
    images: bool = True

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class FileRequest:
    path: str
    range: str | None
    authorization: str | None


class FakeCivitai:
    """Civitai's API as downloads use it, on a real HTTP server (`serve(fake.app)`):

    - `GET /api/v1/model-versions/{id}` and `.../by-hash/{sha256}`: the version's JSON;
    - `GET /api/v1/models/{id}`: the model with its versions, newest first;
    - `GET /api/download/models/{id}`: 307 to the file (401 without the token when gated);
    - `GET /files/{id}/{name}`: the file, with `Range` (206, 416);
    - `GET /images/{id}.jpeg`: a small JPEG, the version's first image.

    Knobs, each for the next file request: `drop_next(after)` closes the connection after that
    many bytes; `corrupt_next()` serves the file with one byte changed; `hold_next(after)` sends
    that many bytes, then waits until `release()`. `file_requests` records what was asked.
    """

    def __init__(self, token: str = "") -> None:
        self.token = token
        self.versions: dict[int, Listed] = {}
        self.file_requests: list[FileRequest] = []
        self.api_requests: list[str] = []
        self._drop: list[int] = []
        self._corrupt = 0
        self._hold: list[int] = []
        self.held = threading.Event()  # set while a held answer waits
        self.released = threading.Event()
        self.storage: str | None = None  # another server's base URL: downloads redirect there
        self.routes = Starlette(
            routes=[
                Route("/api/v1/model-versions/by-hash/{sha}", self._by_hash),
                Route("/api/v1/model-versions/{vid:int}", self._version),
                Route("/api/v1/models/{mid:int}", self._model),
                Route("/api/download/models/{vid:int}", self._download),
                Route("/images/{vid:int}.jpeg", self._image),
            ]
        )

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"].startswith("/files/"):
                await self._file(scope, receive, send)
            else:
                await self.routes(scope, receive, send)

        self.app = app

    def add(self, version_id: int, name: str, data: bytes, **options: Any) -> Listed:
        listed = Listed(
            version_id=version_id,
            model_id=options.pop("model_id", version_id + 1000),
            name=name,
            kind=options.pop("kind", "Checkpoint"),
            data=data,
            file_name=options.pop("file_name", f"{name}.safetensors"),
            **options,
        )
        self.versions[version_id] = listed
        return listed

    def drop_next(self, after: int) -> None:
        self._drop.append(after)

    def corrupt_next(self) -> None:
        self._corrupt += 1

    def hold_next(self, after: int) -> None:
        self.released.clear()
        self._hold.append(after)

    def release(self) -> None:
        self.released.set()

    def version_json(self, listed: Listed, base: str) -> dict[str, Any]:
        body = version(listed.version_id, listed.name, listed.kind)
        body["modelId"] = listed.model_id
        body["files"] = [
            {
                "id": listed.version_id * 10,
                "name": listed.file_name,
                "type": "Model",
                "sizeKB": len(listed.data) / 1024,
                "metadata": {"format": "PickleTensor" if listed.pickle else "SafeTensor"},
                "hashes": {"AutoV2": listed.sha256[:10].upper(), "SHA256": listed.sha256.upper()},
                "downloadUrl": f"{base}/api/download/models/{listed.version_id}",
                "primary": True,
            }
        ]
        body["images"][0]["url"] = f"{base}/images/{listed.version_id}.jpeg"
        if not listed.images:
            body["images"] = []
        body["downloadUrl"] = f"{base}/api/download/models/{listed.version_id}"
        return body

    # --- routes ---------------------------------------------------------------------------

    def _base(self, request: Request) -> str:
        return str(request.base_url).rstrip("/")

    async def _version(self, request: Request) -> Response:
        self.api_requests.append(request.url.path)
        listed = self.versions.get(request.path_params["vid"])
        if listed is None:
            return JSONResponse({"error": "Model not found"}, status_code=404)
        return JSONResponse(self.version_json(listed, self._base(request)))

    async def _by_hash(self, request: Request) -> Response:
        self.api_requests.append(request.url.path)
        sha = request.path_params["sha"].lower()
        for listed in self.versions.values():
            if listed.sha256 == sha:
                return JSONResponse(self.version_json(listed, self._base(request)))
        return JSONResponse({"error": "Model not found"}, status_code=404)

    async def _model(self, request: Request) -> Response:
        self.api_requests.append(request.url.path)
        mid = request.path_params["mid"]
        mine = sorted(
            (v for v in self.versions.values() if v.model_id == mid),
            key=lambda v: -v.version_id,
        )
        if not mine:
            return JSONResponse({"error": "Model not found"}, status_code=404)
        base = self._base(request)
        return JSONResponse(
            {
                "id": mid,
                "name": mine[0].name,
                "type": mine[0].kind,
                "modelVersions": [self.version_json(v, base) for v in mine],
            }
        )

    async def _download(self, request: Request) -> Response:
        authorization = request.headers.get("authorization")
        self.file_requests.append(FileRequest(request.url.path, None, authorization))
        listed = self.versions.get(request.path_params["vid"])
        if listed is None:
            return JSONResponse({"error": "Model not found"}, status_code=404)
        if listed.gated and authorization != f"Bearer {self.token}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        # As Civitai: a redirect to the storage, with the file name in the path.
        where = f"/files/{listed.version_id}/{quote(listed.file_name, safe='')}"
        return RedirectResponse(f"{self.storage or ''}{where}", status_code=307)

    async def _image(self, request: Request) -> Response:
        return Response(tiny_jpeg(), media_type="image/jpeg")

    async def _file(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        self.file_requests.append(
            FileRequest(scope["path"], headers.get("range"), headers.get("authorization"))
        )
        listed = self.versions.get(int(scope["path"].split("/")[2]))
        if listed is None:
            await Response(status_code=404)(scope, receive, send)
            return
        data = listed.data
        if self._corrupt:
            self._corrupt -= 1
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = _range_start(headers.get("range"))
        if start is not None and start >= len(data):
            await Response(status_code=416, headers={"content-range": f"bytes */{len(data)}"})(
                scope, receive, send
            )
            return
        await self._send_file(send, data, start)

    async def _send_file(self, send: Send, data: bytes, start: int | None) -> None:
        body = data[start or 0 :]
        response_headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/octet-stream"),
            (b"accept-ranges", b"bytes"),
        ]
        if start is not None:
            end = len(data) - 1
            response_headers.append((b"content-range", f"bytes {start}-{end}/{len(data)}".encode()))
        status = 206 if start is not None else 200
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        drop = self._drop.pop(0) if self._drop else None
        hold = self._hold.pop(0) if self._hold else None
        cut = drop if drop is not None else hold
        if cut is not None:
            await send({"type": "http.response.body", "body": body[:cut], "more_body": True})
            if drop is not None:
                raise ConnectionDropped(f"the fake drops the connection after {cut} bytes")
            self.held.set()
            while not self.released.is_set():
                await asyncio.sleep(0.01)
            self.held.clear()
            body = body[cut:]
        await send({"type": "http.response.body", "body": body, "more_body": False})


class ConnectionDropped(Exception):
    """Raised inside the fake's answer: uvicorn then closes the connection mid-body."""


def _range_start(value: str | None) -> int | None:
    if not value or not value.startswith("bytes=") or not value.endswith("-"):
        return None
    start = value[len("bytes=") : -1]
    return int(start) if start.isdigit() else None


def tiny_jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 12), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


def model_bytes(size: int, seed: int = 1) -> bytes:
    """A .safetensors file with `size` bytes of tensor data, different for each seed."""
    block = hashlib.sha256(str(seed).encode()).digest()
    data = (block * (size // len(block) + 1))[:size]
    return safetensors_bytes(data)
