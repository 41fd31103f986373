"""Input images and request values reach A1111 as the client sent them: any format Pillow opens,
with or without a data: prefix, at any size up to the decompression-bomb guard; the operator's
caps and the opt-in resize are settings, and a resize shows in the job."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image

from a1111_proxy.app import create_app
from a1111_proxy.jobs import JobRepository
from tests.fakes.a1111 import FakeA1111
from tests.integration.test_worker import a1111 as a1111_backend
from tests.integration.test_worker import make_worker
from tests.servers import ASYNC, serve


def encoded(image: Image.Image, fmt: str = "PNG", **options: Any) -> str:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return base64.b64encode(out.getvalue()).decode()


def big_png(size: tuple[int, int] = (4096, 4096)) -> str:
    """A real PNG of `size`, cheap to make: one colour but for a square."""
    image = Image.new("RGB", size, (20, 120, 200))
    image.paste((250, 250, 0), (10, 10, 70, 70))
    return encoded(image)


def png_header_only(width: int, height: int) -> str:
    """A PNG whose header claims `width` x `height` and whose pixel data is a few junk bytes: it
    can only be measured, never decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"junk") + chunk(b"IEND", b"")
    raw = b"\x89PNG\r\n\x1a\n" + chunks
    return base64.b64encode(raw).decode()


def stored_payload(sqlite_url: str) -> dict[str, Any]:
    """The body the worker will send to A1111, as stored."""
    db = sqlite3.connect(sqlite_url.split("///", 1)[1])
    try:
        [body] = db.execute("SELECT body FROM job_payloads ORDER BY job_seq DESC").fetchone()
    finally:
        db.close()
    return json.loads(body)  # type: ignore[no-any-return]


@pytest.fixture
def api(make_api: Any) -> httpx.Client:
    return make_api()  # type: ignore[no-any-return]


# --- formats and prefixes ------------------------------------------------------------------


def _animated_gif() -> str:
    frames = [Image.new("P", (40, 30), i) for i in (3, 9)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    return base64.b64encode(out.getvalue()).decode()


FORMATS = {
    "WEBP": lambda: encoded(Image.new("RGB", (40, 30), (1, 2, 3)), "WEBP"),
    "JPEG": lambda: encoded(Image.new("RGB", (40, 30), (1, 2, 3)), "JPEG"),
    "BMP": lambda: encoded(Image.new("RGB", (40, 30), (1, 2, 3)), "BMP"),
    "TIFF": lambda: encoded(Image.new("RGB", (40, 30), (1, 2, 3)), "TIFF"),
    "GIF (two frames)": _animated_gif,
    "PNG with alpha": lambda: encoded(Image.new("RGBA", (40, 30), (1, 2, 3, 4))),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_pillow_opens_is_accepted_and_stored_exactly_as_sent(
    api: httpx.Client, sqlite_url: str, fmt: str
) -> None:
    image = FORMATS[fmt]()
    response = api.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [image]})
    assert response.status_code == 202, response.text
    assert stored_payload(sqlite_url)["init_images"] == [image]


def test_base64_with_line_breaks_is_accepted_as_a1111_accepts_it(
    api: httpx.Client, sqlite_url: str
) -> None:
    flat = encoded(Image.new("RGB", (64, 64), (9, 9, 9)))
    wrapped = "\n".join(flat[i : i + 76] for i in range(0, len(flat), 76))  # MIME-style
    response = api.post("/sdapi/v1/img2img", json={"init_images": [wrapped]})
    assert response.status_code == 202, response.text
    assert stored_payload(sqlite_url)["init_images"] == [wrapped]


def test_a_data_uri_that_a1111_would_not_read_is_a_422_saying_what_it_reads(
    api: httpx.Client,
) -> None:
    image = encoded(Image.new("RGB", (8, 8)))
    response = api.post(
        "/sdapi/v1/img2img", json={"init_images": [f"data:application/octet-stream;base64,{image}"]}
    )
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", "init_images", 0]
    assert "data:image/<type>;base64,<data>" in issue["msg"]


# --- size: the guard, and no resize unless asked -------------------------------------------


def test_a_header_claiming_more_pixels_than_the_guard_is_refused_without_decoding(
    api: httpx.Client,
) -> None:
    response = api.post(
        "/sdapi/v1/img2img", json={"init_images": [png_header_only(100_000, 100_000)]}
    )
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    # The size came from the header: the junk pixel data was never decoded (it would not decode).
    assert issue["loc"] == ["body", "init_images", 0] and "100000x100000" in issue["msg"]
    assert "A1111_PROXY_IMAGE_MAX_PIXELS" in issue["msg"]


def test_an_image_over_pillows_own_bomb_limit_but_within_the_guard_is_accepted(
    make_api: Any, sqlite_url: str
) -> None:
    api = make_api(request_max_pixels=16384 * 16384)  # the request's budget is 4096 x 4096 x 4
    out = io.BytesIO()
    Image.new("1", (16384, 12000)).save(out, format="PNG")  # 197 MP: Pillow refuses > 179 MP
    image = base64.b64encode(out.getvalue()).decode()
    response = api.post("/sdapi/v1/img2img", json={"init_images": [image]})
    assert response.status_code == 202, response.text
    assert stored_payload(sqlite_url)["init_images"] == [image]


def test_the_guard_is_a_setting(make_api: Any) -> None:
    api = make_api(image_max_pixels=64 * 64)
    assert (
        api.post(
            "/sdapi/v1/img2img", json={"init_images": [encoded(Image.new("RGB", (64, 64)))]}
        ).status_code
        == 202
    )
    assert (
        api.post(
            "/sdapi/v1/img2img", json={"init_images": [encoded(Image.new("RGB", (65, 64)))]}
        ).status_code
        == 422
    )


def test_with_the_opt_in_resize_the_image_is_resized_and_the_job_shows_it(
    make_api: Any, sqlite_url: str
) -> None:
    api = make_api(image_max_side=2048)
    small = encoded(Image.new("RGB", (512, 512)))
    response = api.post(
        "/sdapi/v1/img2img",
        json={
            "init_images": [
                small,
                "data:image/jpeg;base64,"
                + encoded(Image.new("RGB", (3000, 1000), (10, 200, 10)), "JPEG"),
            ]
        },
    )
    assert response.status_code == 202, response.text
    resized = [{"loc": ["init_images", 1], "from": [3000, 1000], "to": [2048, 683]}]
    job = api.get(response.headers["location"]).json()
    assert job["input_images_resized"] == resized
    assert api.get("/sdapi/v1/jobs").json()["jobs"][0]["input_images_resized"] == resized
    assert set(job["request"]) == {"init_images"}  # the record is not part of the request
    sent_small, sent_big = stored_payload(sqlite_url)["init_images"]
    assert sent_small == small  # under the limit: untouched
    assert sent_big.startswith("data:image/png;base64,")  # re-encoded, so the prefix says PNG
    image = Image.open(io.BytesIO(base64.b64decode(sent_big.split(",", 1)[1])))
    assert image.size == (2048, 683)


def test_without_the_opt_in_a_job_shows_no_resize(api: httpx.Client) -> None:
    response = api.post("/sdapi/v1/img2img", json={"init_images": [big_png((3000, 1000))]})
    assert response.status_code == 202
    assert api.get(response.headers["location"]).json()["input_images_resized"] == []


# --- one request's pixel budget, and the pool the work runs on ------------------------------


def test_images_together_over_the_requests_pixel_budget_are_refused_naming_the_one_over(
    api: httpx.Client,
) -> None:
    """The default budget, 4 x 4096 x 4096 pixels: four such images pass, a fifth is refused."""
    four = [png_header_only(4096, 4096) for _ in range(4)]
    assert api.post("/sdapi/v1/img2img", json={"init_images": four}).status_code == 202
    response = api.post(
        "/sdapi/v1/img2img", json={"init_images": four, "mask": png_header_only(64, 64)}
    )
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", "mask"]
    assert "with mask (64x64) this request's images come to 67112960 pixels" in issue["msg"]
    assert "67108864" in issue["msg"] and "A1111_PROXY_REQUEST_MAX_PIXELS" in issue["msg"]


def test_a_request_over_its_budget_is_refused_before_any_image_is_decoded(make_api: Any) -> None:
    """Header-only images cannot be decoded: had the resize started, it would say so."""
    api = make_api(request_max_pixels=4 * 1000 * 1000, image_max_side=512)
    images = [png_header_only(1000, 1000) for _ in range(6)]
    response = api.post("/sdapi/v1/img2img", json={"init_images": images})
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", "init_images", 4]
    assert issue["msg"].startswith("with init_images[4] (1000x1000) this request's images come")
    raised = make_api(request_max_pixels=6 * 1000 * 1000)
    assert raised.post("/sdapi/v1/img2img", json={"init_images": images}).status_code == 202


class GatedCpu:
    """The API's CpuPool with a gate: work, on the pool's thread, waits until the test opens
    it. Records what ran there, and on which thread."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.ran: list[tuple[str, str]] = []

    def wrap(self, app: Any) -> Any:
        async def gated_app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                scope = {**scope, "state": {**scope["state"], "cpu": self.bind(scope["state"])}}
            await app(scope, receive, send)

        return gated_app

    def bind(self, state: dict[str, Any]) -> Any:
        gate, pool = self, state["cpu"]

        class Bound:
            async def run(self, function: Any, *args: Any) -> Any:
                def gated() -> Any:
                    gate.entered.set()
                    assert gate.opened.wait(30), "the test never opened the gate"
                    gate.ran.append((function.__name__, threading.current_thread().name))
                    return function(*args)

                return await pool.run(gated)

        return Bound()


def test_the_api_answers_while_a_requests_images_are_decoded_and_resized(
    sqlite_url: str, settings_for: Any
) -> None:
    gate = GatedCpu()
    settings = settings_for(database_url=sqlite_url, image_max_side=512)
    body = {"init_images": [big_png((2048, 2048)) for _ in range(4)]}
    with serve(gate.wrap(create_app(settings))) as url, ThreadPoolExecutor(1) as client:
        heavy = client.submit(httpx.post, f"{url}/sdapi/v1/img2img", json=body, headers=ASYNC)
        assert gate.entered.wait(30)  # its images are on the pool
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 200 and not heavy.done()
        gate.opened.set()
        response = heavy.result(timeout=60)
        info = httpx.post(f"{url}/sdapi/v1/png-info", json={"image": big_png((64, 64))})
    assert response.status_code == 202, response.text
    assert len(response.json()["input_images_resized"]) == 4
    assert info.status_code == 200
    assert [name for name, _ in gate.ran] == ["check_images", "_read_png_text"]
    assert all(thread.startswith("cpu-pool") for _, thread in gate.ran)


# --- end to end: the bytes A1111 receives ---------------------------------------------------


@pytest.fixture
def fake_backend() -> Iterator[tuple[FakeA1111, str]]:
    fake = FakeA1111(service_time=0.01)
    with serve(fake.app) as url:
        yield fake, url


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """These tests run on the SQLite file only (`repo` and the API share it)."""
    return sqlite_url


@pytest.mark.anyio
async def test_a_4096_px_png_and_a_data_uri_reach_a1111_byte_for_byte_unchanged(
    api: httpx.Client, repo: JobRepository, fake_backend: tuple[FakeA1111, str], sqlite_url: str
) -> None:
    fake, url = fake_backend
    image = big_png()
    mask = "data:image/png;base64," + big_png()
    unit = {
        "enabled": True,
        "module": "canny",
        "image": "data:image/webp;base64,"
        + encoded(Image.new("RGB", (4096, 2048), (5, 5, 5)), "WEBP"),
    }
    body = {
        "prompt": "a big one",
        "init_images": [image],
        "mask": mask,
        "alwayson_scripts": {"ControlNet": {"args": [unit]}},
    }
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 202, response.text
    await make_worker(repo, [a1111_backend(url)], sqlite_url).run_until_empty()

    [sent] = fake.generation_requests()
    assert sent.body["init_images"] == [image] and sent.body["mask"] == mask
    assert sent.body["alwayson_scripts"]["ControlNet"]["args"][0]["image"] == unit["image"]
    assert Image.open(io.BytesIO(base64.b64decode(image))).size == (4096, 4096)
    assert api.get(response.headers["location"]).json()["status"] == "completed"


# --- values: no stricter than A1111 by default; caps are settings --------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cfg_scale", -1),
        ("cfg_scale", 150),
        ("denoising_strength", 1.5),
        ("prompt", "x" * 60_000),
        ("width", 10_240),
        ("steps", 500),
        ("n_iter", 100),
        ("batch_size", 64),
    ],
)
def test_values_a1111_runs_are_accepted(api: httpx.Client, field: str, value: object) -> None:
    response = api.post("/sdapi/v1/txt2img", json={field: value})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("field", "value", "setting"),
    [
        ("steps", 501, "A1111_PROXY_MAX_STEPS"),
        ("n_iter", 101, "A1111_PROXY_MAX_N_ITER"),
        ("batch_size", 65, "A1111_PROXY_MAX_BATCH_SIZE"),
        ("width", 16392, "A1111_PROXY_MAX_WIDTH_HEIGHT"),
        ("height", 100_000, "A1111_PROXY_MAX_WIDTH_HEIGHT"),
    ],
)
def test_a_value_over_a_cap_is_a_422_naming_the_setting_to_raise(
    api: httpx.Client, field: str, value: int, setting: str
) -> None:
    response = api.post("/sdapi/v1/txt2img", json={field: value})
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", field] and setting in issue["msg"]


def test_raising_a_cap_setting_allows_a_larger_steps_value(make_api: Any) -> None:
    api = make_api(max_steps=2000)
    assert api.post("/sdapi/v1/txt2img", json={"steps": 1500}).status_code == 202
    response = api.post(
        "/sdapi/v1/img2img",
        json={"steps": "2001", "init_images": [encoded(Image.new("RGB", (8, 8)))]},
    )
    assert response.status_code == 422 and "at most 2000" in response.json()["detail"][0]["msg"]
