"""Model downloads without sockets or a database: what a source names, which file of a version
and which folder, safe file names, and how a download is shown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from a1111_proxy.civitai import Source, kind_of, origin, parse_source, version_file
from a1111_proxy.downloads import DownloadRecord
from a1111_proxy.model_layout import (
    info_path,
    is_pickle,
    part_path,
    place,
    preview_path,
    safe_file_name,
)
from a1111_proxy.routes.downloads import render_download
from tests.fakes.civitai import version
from worker.downloader import Speed

SITE = "https://civitai.com"
SHA = "AB" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("130072", Source("version", "130072")),
        (" 130072 ", Source("version", "130072")),
        (SHA, Source("hash", SHA.lower())),
        ("https://civitai.com/models/4201", Source("model", "4201")),
        ("https://civitai.com/models/4201/realistic-vision", Source("model", "4201")),
        ("https://civitai.com/models/4201?modelVersionId=130072", Source("version", "130072")),
        (
            "https://www.civitai.com/models/4201/realistic-vision?modelVersionId=130072",
            Source("version", "130072"),
        ),
        ("https://civitai.com/api/download/models/130072", Source("version", "130072")),
        (
            "https://civitai.com/api/download/models/130072?type=Model&format=SafeTensor",
            Source("version", "130072"),
        ),
        ("https://civitai.com/api/v1/model-versions/130072", Source("version", "130072")),
        ("https://civitai.com/api/v1/models/4201", Source("model", "4201")),
        ("https://civitai.green/models/4201", Source("model", "4201")),
        ("urn:air:sd1:checkpoint:civitai:4201@130072", Source("version", "130072")),
        ("urn:air:sdxl:lora:civitai:328553@368189.safetensors", Source("version", "368189")),
        ("urn:air:sd1:checkpoint:civitai:4201", Source("model", "4201")),
        (
            "https://huggingface.co/org/repo/resolve/main/model.safetensors",
            Source("url", "https://huggingface.co/org/repo/resolve/main/model.safetensors"),
        ),
    ],
)
def test_each_source_form_names_a_version_a_model_a_hash_or_a_url(
    text: str, expected: Source
) -> None:
    assert parse_source(text, SITE) == expected


def test_urls_of_the_configured_civitai_site_are_civitai_urls_too() -> None:
    mirror = "http://10.0.0.5:8080"
    assert parse_source(f"{mirror}/models/7?modelVersionId=8", mirror) == Source("version", "8")
    assert parse_source(f"{mirror}/api/download/models/8", mirror) == Source("version", "8")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("dreamshaper", "not a source"),
        ("ABCDEF0123", "not a source"),  # a short hash: ambiguous, not taken
        ("http://example.com/model.safetensors", "must be https"),
        ("https://civitai.com/articles/12", "must name a model"),
        ("urn:air:sd1:lora:huggingface:1@2", "only Civitai's AIRs"),
        ("urn:air:nonsense", "not an AIR"),
    ],
)
def test_what_is_not_a_source_is_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_source(text, SITE)


def test_sites_are_compared_by_scheme_host_and_port() -> None:
    assert origin("https://civitai.com") == origin("https://CIVITAI.com:443/api")
    assert origin("http://civitai.com") != origin("https://civitai.com")
    assert origin("http://127.0.0.1:8000") != origin("http://127.0.0.1:8001")


# --- a version's files ---------------------------------------------------------------------------


def _with_files(*files: dict[str, Any], kind: str = "Checkpoint") -> dict[str, Any]:
    body = version(7, "m", kind)
    body["files"] = list(files)
    return body


PRIMARY = {
    "id": 1,
    "name": "m-fp16.safetensors",
    "type": "Model",
    "primary": True,
    "sizeKB": 2.5,
    "hashes": {"SHA256": SHA},
    "downloadUrl": f"{SITE}/api/download/models/7?fp=fp16",
    "metadata": {"format": "SafeTensor"},
}
OTHER = {
    "id": 2,
    "name": "m-full.ckpt",
    "type": "Model",
    "downloadUrl": f"{SITE}/api/download/models/7?fp=fp32",
    "metadata": {"format": "PickleTensor"},
}
VAE = {"id": 3, "name": "m-vae.safetensors", "type": "VAE", "downloadUrl": f"{SITE}/vae"}


def test_the_primary_file_is_the_default_and_others_are_picked_by_name_or_id() -> None:
    body = _with_files(OTHER, PRIMARY, VAE)
    primary = version_file(body, None)
    assert (primary.name, primary.url, primary.sha256, primary.size, primary.pickle) == (
        "m-fp16.safetensors",
        f"{SITE}/api/download/models/7?fp=fp16",
        SHA.lower(),
        2560,
        False,
    )
    assert version_file(body, "m-full.ckpt").pickle is True
    assert version_file(body, "3").name == "m-vae.safetensors"
    with pytest.raises(ValueError, match=r"has no file 'nope'.*'m-full\.ckpt', 'm-fp16"):
        version_file(body, "nope")
    assert version_file(_with_files(OTHER, VAE), None).name == "m-full.ckpt"  # no primary


@pytest.mark.parametrize(
    ("civitai_type", "kind"),
    [
        ("Checkpoint", "checkpoint"),
        ("LORA", "lora"),
        ("LoCon", "lora"),
        ("DoRA", "lora"),
        ("Controlnet", "controlnet"),
        ("VAE", "vae"),
        ("TextualInversion", "embedding"),
        ("Hypernetwork", None),
        ("Workflows", None),
    ],
)
def test_civitais_model_type_gives_the_kind(civitai_type: str, kind: str | None) -> None:
    body = _with_files(PRIMARY, kind=civitai_type)
    assert kind_of(body, version_file(body, None)) == kind


def test_a_versions_vae_file_is_a_vae_whatever_the_model_is() -> None:
    body = _with_files(PRIMARY, VAE)
    assert kind_of(body, version_file(body, "m-vae.safetensors")) == "vae"


# --- file names and where they go ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "safe"),
    [
        ("dreamshaper_8.safetensors", "dreamshaper_8.safetensors"),
        ("../../../etc/passwd", "passwd"),
        ("..\\..\\x.safetensors", "x.safetensors"),
        ("sub/dir/x.safetensors", "x.safetensors"),
        ("..", ""),
        (".hidden.safetensors", "hidden.safetensors"),
        ('a<b>c:d"e|f?g*h.safetensors', "a_b_c_d_e_f_g_h.safetensors"),
        ("tab\there\x00.safetensors", "tab_here_.safetensors"),
        ("trailing. . ", "trailing"),
        ("é" * 300 + ".safetensors", "é" * 94 + ".safetensors"),
    ],
)
def test_file_names_are_made_one_safe_name(given: str, safe: str) -> None:
    made = safe_file_name(given)
    assert made == safe
    assert len(made.encode()) <= 200


def test_a_name_is_placed_in_its_kinds_folder_and_nowhere_else(tmp_path: Path) -> None:
    assert place(tmp_path, "lora", "x.safetensors") == tmp_path / "Lora/x.safetensors"
    assert place(tmp_path, "embedding", "e.pt") == tmp_path / "embeddings/e.pt"
    for bad in ("../x.safetensors", "..", "", "a/b.safetensors", ".x"):
        with pytest.raises(ValueError):
            place(tmp_path, "lora", bad)


def test_a_symlink_in_the_folder_cannot_lead_a_download_outside_it(tmp_path: Path) -> None:
    (tmp_path / "Lora").mkdir()
    outside = tmp_path / "outside.safetensors"
    os.symlink(outside, tmp_path / "Lora/x.safetensors")
    with pytest.raises(ValueError, match="outside"):
        place(tmp_path, "lora", "x.safetensors")


def test_sidecars_and_the_part_file_sit_beside_the_model() -> None:
    path = Path("/m/Lora/detail.safetensors")
    assert part_path(path) == Path("/m/Lora/detail.safetensors.part")
    assert info_path(path) == Path("/m/Lora/detail.civitai.info")
    assert preview_path(path) == Path("/m/Lora/detail.preview.png")
    assert is_pickle("x.CKPT") and is_pickle("x.pt") and not is_pickle("x.safetensors")


# --- how a download is shown -------------------------------------------------------------------


def _record(**changes: Any) -> DownloadRecord:
    values: dict[str, Any] = {
        "seq": 1,
        "id": "d1",
        "source": "7",
        "kind": "lora",
        "file": None,
        "sha256": None,
        "status": "running",
        "requested_by": "root",
        "url": "u",
        "path": "Lora/m.safetensors",
        "version": None,
        "bytes_done": 250,
        "bytes_total": 1000,
        "speed": 50.0,
        "error": None,
        "attempts": 1,
        "cancel_requested_at": None,
        "created_at": 0.0,
        "started_at": 1.0,
        "completed_at": None,
        "updated_at": 2.0,
    }
    return DownloadRecord(**{**values, **changes})


def test_a_running_download_shows_progress_speed_and_eta() -> None:
    shown = render_download(_record(), SITE)
    assert (shown["progress"], shown["speed"], shown["eta"]) == (0.25, 50.0, 15.0)
    assert shown["links"]["cancel"] == "/sdapi/v1/models/downloads/d1/cancel"
    assert shown["civitai"] is None and shown["started_at"] == "1970-01-01T00:00:01Z"


def test_speed_and_eta_are_shown_only_while_it_runs_and_known() -> None:
    queued = render_download(_record(status="queued", speed=None, bytes_total=None), SITE)
    assert (queued["progress"], queued["speed"], queued["eta"]) == (None, None, None)
    done = render_download(_record(status="completed", bytes_done=1000), SITE)
    assert (done["progress"], done["speed"], done["eta"]) == (1.0, None, None)
    with_civitai = render_download(_record(version=version(7, "m", "LORA")), SITE)
    assert with_civitai["civitai"]["page_url"] == f"{SITE}/models/1007?modelVersionId=7"


def test_speed_is_bytes_per_second_over_the_last_samples() -> None:
    now = [0.0]
    speed = Speed(window=3, clock=lambda: now[0])
    assert speed.update(0) is None
    for second, done in ((1, 100), (2, 300), (3, 600)):
        now[0] = second
        last = speed.update(done)
    assert last == (600 - 100) / 2  # the window keeps the last three samples
