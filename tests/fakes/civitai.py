"""Civitai as tests see it: a by-hash answer shaped like the real one (ENGINE.md §6), a respx
router to serve it through a client's `transport=`, and a sleep that only records."""

from __future__ import annotations

import json
import struct
from typing import Any

import httpx
import respx

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
