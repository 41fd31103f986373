"""What a download's source resolves to (a `Plan`: where the file comes from, where it goes, what
to check it against), and what is refused before a byte is fetched.

A Civitai source is resolved with Civitai's model-version JSON: the file asked for (else the
primary one), its kind (given, else from Civitai's type), its SHA256 and size. A direct URL
keeps the kind and SHA256 given. Either way the file's name is made safe and must be a model
file; a pickle is refused unless DOWNLOAD_ALLOW_PICKLE.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import httpx

from a1111_proxy.civitai import (
    CivitaiClient,
    CivitaiError,
    CivitaiUnavailable,
    civitai_type,
    kind_of,
    parse_source,
    version_file,
)
from a1111_proxy.downloads import DownloadRecord, Plan
from a1111_proxy.model_layout import (
    KIND_FOLDERS,
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    is_model_file,
    is_pickle,
    relative,
    safe_file_name,
)
from worker.transfer import Refused, TryLater

CIVITAI_REST_SECONDS = 60.0  # Civitai down or rate-limiting: the download waits this long


async def plan_for(record: DownloadRecord, civitai: CivitaiClient, *, allow_pickle: bool) -> Plan:
    """Raises Refused (the download fails) or TryLater (Civitai is unavailable)."""
    try:
        source = parse_source(record.source, civitai.url)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    if source.kind == "url":
        return direct_plan(record, allow_pickle=allow_pickle)
    try:
        version = await civitai.model_version(source)
    except CivitaiUnavailable as exc:
        delay = max(CIVITAI_REST_SECONDS, exc.retry_after or 0)
        raise TryLater(f"Civitai is unavailable: {exc}", delay) from None
    except CivitaiError as exc:
        raise Refused(f"Civitai gave no usable answer: {exc}") from None
    if version is None:
        raise Refused(f"Civitai has no model version for {record.source!r}")
    return civitai_plan(version, record.kind, record.file, allow_pickle=allow_pickle)


def civitai_plan(
    version: dict[str, Any], kind: str | None, wanted: str | None, *, allow_pickle: bool
) -> Plan:
    try:
        file = version_file(version, wanted)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    kind = kind or kind_of(version, file)
    if kind is None:
        raise Refused(
            f"Civitai says this model is a {civitai_type(version)}, which a1111-proxy does "
            f"not place by itself; give `kind` (one of {', '.join(KIND_FOLDERS)})"
        )
    name = checked_name(safe_file_name(file.name), pickle=file.pickle, allow_pickle=allow_pickle)
    if not file.url:
        raise Refused(f"Civitai gives no download URL for {file.name!r}")
    return Plan(kind, file.url, relative(kind, name), file.sha256, file.size, version)


def direct_plan(record: DownloadRecord, *, allow_pickle: bool) -> Plan:
    if record.kind is None:
        raise Refused("a direct URL needs `kind`")
    given = record.file or unquote(httpx.URL(record.source).path.rsplit("/", 1)[-1])
    name = checked_name(safe_file_name(given), pickle=False, allow_pickle=allow_pickle)
    return Plan(record.kind, record.source, relative(record.kind, name), record.sha256, None, None)


def checked_name(name: str, *, pickle: bool, allow_pickle: bool) -> str:
    """`name` when a model file that may be fetched; Refused otherwise."""
    if not name or not is_model_file(name):
        raise Refused(
            f"{name or 'the file'!r} is not a model file a1111-proxy downloads (it takes "
            f"{', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)}); give `file` to pick another"
        )
    if (pickle or is_pickle(name)) and not allow_pickle:
        raise Refused(
            f"{name!r} is a pickle, which can run code when it is loaded; a1111-proxy "
            "downloads .safetensors files only, unless A1111_PROXY_DOWNLOAD_ALLOW_PICKLE=true"
        )
    return name
