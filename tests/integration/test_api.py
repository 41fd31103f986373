"""The HTTP API, served by a real uvicorn on loopback over a real SQLite file."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from a1111_proxy.app import create_app
from a1111_proxy.db.engine import Database
from a1111_proxy.jobs import JobRepository
from tests.claims import claim_next
from tests.servers import ASYNC, serve


def _noise_png() -> str:
    import io
    import os

    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (48, 48), os.urandom(48 * 48 * 3)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


PNG = _noise_png()  # a real image, large enough to be left out of stored requests


@pytest.fixture
def api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(max_body_bytes=200_000)


@pytest.fixture
def secured(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_tokens="s3cret,other-token")


def test_submitting_txt2img_answers_202_with_the_queued_job_and_its_location(
    api: httpx.Client,
) -> None:
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 20})
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and job["type"] == "txt2img" and job["progress"] == 0
    assert response.headers["location"] == f"/sdapi/v1/jobs/{job['id']}"
    assert job["created_at"].endswith("Z") and job["request"] == {"prompt": "a cat", "steps": 20}
    assert api.get(response.headers["location"]).json()["id"] == job["id"]


def test_reading_a_running_job_asks_its_worker_for_progress_and_progress_with_image_for_previews(
    api: httpx.Client, sqlite_url: str
) -> None:
    jobs = [api.post("/sdapi/v1/txt2img", json={"prompt": f"cat {n}"}).json() for n in range(4)]

    async def run(look: Callable[[], object]) -> tuple[bool, bool]:
        """The next job runs (the only one running) while `look` is done; then it ends."""
        db = Database(sqlite_url)
        try:
            repo = JobRepository(db)
            claim = await claim_next(repo, "a-worker", "http://slot")
            assert claim is not None
            look()
            asked = await repo.requests(claim)
            await repo.finish(claim, "canceled", None)
            return asked.progress_wanted, asked.preview_wanted
        finally:
            await db.dispose()

    assert asyncio.run(run(lambda: None)) == (False, False)  # nobody looks
    second = f"/sdapi/v1/jobs/{jobs[1]['id']}"
    assert asyncio.run(run(lambda: api.get(second))) == (True, False)
    # A1111's /progress asks for previews unless told to skip the image.
    skip = {"skip_current_image": "true"}
    assert asyncio.run(run(lambda: api.get("/sdapi/v1/progress", params=skip))) == (True, False)
    assert asyncio.run(run(lambda: api.get("/sdapi/v1/progress"))) == (True, True)


def test_a1111_bodies_are_parsed_leniently_and_unknown_keys_are_kept(api: httpx.Client) -> None:
    body = {
        "prompt": 123,
        "seed": "42",
        "width": 512.7,
        "enable_hr": "yes",
        "sampler_index": "Euler a",
        "cfg_scale": "5",
        "some_extension_option": {"x": 1},
        "styles": None,
    }
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["request"] == body  # stored and passed on as the client sent it


def test_proxy_fields_are_taken_out_of_the_a1111_body_and_the_secret_never_shown(
    api: httpx.Client,
) -> None:
    response = api.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "cat",
            "priority": 7,
            "webhook_url": "https://example.com/hook",
            "webhook_secret": "whsec_c2VjcmV0",
            "webhook_events": ["started", "completed"],
        },
    )
    job = response.json()
    assert job["priority"] == 7 and job["request"] == {"prompt": "cat"}
    assert job["webhook"] == {"url": "https://example.com/hook", "events": ["started", "completed"]}
    assert "whsec_c2VjcmV0" not in response.text
    assert "whsec_c2VjcmV0" not in api.get(f"/sdapi/v1/jobs/{job['id']}").text
    assert "whsec_c2VjcmV0" not in api.get("/sdapi/v1/jobs").text


def test_invalid_fields_get_a_422_naming_each_field_and_reason(api: httpx.Client) -> None:
    response = api.post(
        "/sdapi/v1/txt2img",
        json={
            "steps": "many",
            "sampler_index": None,
            "webhook_url": "ftp://x",
            "priority": 1000,
            "webhook_events": ["sometimes"],
        },
    )
    assert response.status_code == 422
    locs = {tuple(err["loc"]): err for err in response.json()["detail"]}
    assert set(locs) >= {
        ("body", "steps"),
        ("body", "sampler_index"),
        ("body", "webhook_url"),
        ("body", "priority"),
        ("body", "webhook_events", 0),
    }
    assert all(err["msg"] and err["type"] for err in locs.values())
    assert api.get("/sdapi/v1/jobs").json()["jobs"] == []  # nothing stored


def test_img2img_without_images_is_a_422(api: httpx.Client) -> None:
    response = api.post("/sdapi/v1/img2img", json={"prompt": "cat"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "init_images"]


def test_img2img_input_images_are_never_shown_in_the_stored_request(api: httpx.Client) -> None:
    response = api.post(
        "/sdapi/v1/img2img",
        json={"prompt": "cat", "init_images": [PNG], "mask": "data:image/png;base64," + PNG},
    )
    assert response.status_code == 202
    request = response.json()["request"]
    assert request["init_images"][0].startswith("<image: ") and PNG not in response.text
    assert request["mask"].startswith("<image: ")
    assert PNG not in api.get("/sdapi/v1/jobs").text


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_a_body_that_is_not_a_json_object_is_a_422(api: httpx.Client, raw: bytes) -> None:
    response = api.post(
        "/sdapi/v1/txt2img", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]


def test_a_body_over_the_limit_is_a_413_in_a1111s_error_shape(api: httpx.Client) -> None:
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x" * 300_000})
    assert response.status_code == 413
    body = response.json()
    assert set(body) >= {"error", "detail", "body", "errors"}
    assert "A1111_PROXY_MAX_BODY_BYTES" in body["detail"]


def test_a_streamed_body_over_the_limit_is_also_a_413(api: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}'

    response = api.post(
        "/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_unknown_jobs_routes_and_methods_answer_404_and_405(api: httpx.Client) -> None:
    missing = api.get("/sdapi/v1/jobs/0f6b0c9a-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    assert (
        missing.json()["error"] == "HTTPException"
        and "GET /sdapi/v1/jobs" in missing.json()["detail"]
    )
    assert api.post("/sdapi/v1/jobs/nope/cancel").status_code == 404
    unknown = api.get("/sdapi/v1/nothing-here")
    assert (
        unknown.status_code == 404 and "does not offer GET /sdapi/v1/nothing-here" in unknown.text
    )
    outside = api.get("/not-the-api")
    assert outside.status_code == 404 and outside.json()["detail"] == "Not Found"
    wrong = api.get("/sdapi/v1/txt2img")
    assert wrong.status_code == 405 and wrong.json()["detail"] == "Method Not Allowed"
    strange = api.get("/sdapi/v1/sd-models/%0Aname")
    assert strange.status_code == 404 and strange.json()["code"] == "not_found"


def test_an_idempotency_key_replays_the_same_job_and_refuses_a_different_body(
    api: httpx.Client,
) -> None:
    headers = {"Idempotency-Key": '"5f0c1d2e-key"'}
    first = api.post("/sdapi/v1/txt2img", json={"prompt": "cat"}, headers=headers)
    again = api.post("/sdapi/v1/txt2img", json={"prompt": "cat"}, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = api.post("/sdapi/v1/txt2img", json={"prompt": "dog"}, headers=headers)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert len(api.get("/sdapi/v1/jobs").json()["jobs"]) == 1
    too_long = api.post("/sdapi/v1/txt2img", json={}, headers={"Idempotency-Key": "k" * 300})
    assert too_long.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


def test_listing_is_newest_first_filtered_and_paged_by_cursor(api: httpx.Client) -> None:
    ids = [api.post("/sdapi/v1/txt2img", json={"prompt": f"p{i}"}).json()["id"] for i in range(5)]
    img = api.post("/sdapi/v1/img2img", json={"init_images": [PNG]}).json()["id"]
    api.post(f"/sdapi/v1/jobs/{ids[0]}/cancel")

    page = api.get("/sdapi/v1/jobs", params={"limit": 3}).json()
    assert [j["id"] for j in page["jobs"]] == [img, ids[4], ids[3]]
    rest = api.get("/sdapi/v1/jobs", params={"limit": 3, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[2], ids[1], ids[0]]
    assert api.get("/sdapi/v1/jobs", params={"type": "img2img"}).json()["jobs"][0]["id"] == img
    canceled = api.get("/sdapi/v1/jobs", params={"status": "canceled"}).json()["jobs"]
    assert [j["id"] for j in canceled] == [ids[0]]
    bad = api.get("/sdapi/v1/jobs", params={"status": "done", "limit": "lots"})
    assert bad.status_code == 422
    assert {tuple(e["loc"]) for e in bad.json()["detail"]} == {("query", "status")}


def test_canceling_a_queued_job_ends_it_at_once(api: httpx.Client) -> None:
    job = api.post("/sdapi/v1/txt2img", json={"prompt": "cat"}).json()
    canceled = api.post(f"/sdapi/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert canceled.json()["completed_at"] is not None
    again = api.post(f"/sdapi/v1/jobs/{job['id']}/cancel")
    assert again.json()["status"] == "canceled"


def test_an_image_of_an_unfinished_job_is_a_404_that_says_why(api: httpx.Client) -> None:
    job = api.post("/sdapi/v1/txt2img", json={"prompt": "cat"}).json()
    response = api.get(f"/sdapi/v1/jobs/{job['id']}/images/0")
    assert response.status_code == 404 and "queued" in response.json()["detail"]


def test_tokens_are_required_as_bearer_or_as_a_basic_password(secured: httpx.Client) -> None:
    missing = secured.get("/sdapi/v1/jobs")
    assert missing.status_code == 401
    assert missing.json() == {
        "error": "HTTPException",
        "detail": "Not authenticated",
        "body": "",
        "errors": "",
        "code": "not_authenticated",
    }
    wrong = secured.get("/sdapi/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "Incorrect username or password"
    assert (
        secured.get("/sdapi/v1/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    )
    assert secured.get("/sdapi/v1/jobs", auth=("anyone", "other-token")).status_code == 200
    assert secured.get("/sdapi/v1/jobs", auth=("anyone", "bad")).status_code == 401
    garbled = secured.get("/sdapi/v1/jobs", headers={"Authorization": "Basic !!!"})
    assert garbled.status_code == 401
    posted = secured.post("/sdapi/v1/txt2img", json={"prompt": "cat"})
    assert posted.status_code == 401


def test_health_ready_and_docs_paths_need_no_token(secured: httpx.Client) -> None:
    assert secured.get("/ready").json()["ready"] is True
    health = secured.get("/health")
    assert health.status_code == 503  # no worker is running
    assert "a1111-proxy worker" in health.json()["problems"][0]
    assert health.json()["database"] == "ok"


def test_ready_is_503_until_the_database_is_migrated(tmp_path, settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(database_url=f"sqlite+aiosqlite:///{tmp_path}/empty.db")
    with serve(create_app(settings)) as url:
        response = httpx.get(f"{url}/ready")
    assert response.status_code == 503 and "a1111-proxy migrate" in response.json()["reason"]


def test_jobs_json_is_valid_json_everywhere(api: httpx.Client) -> None:
    job = api.post("/sdapi/v1/txt2img", json={"prompt": "ünïcödé 猫 🐈"}).json()
    fetched = api.get(f"/sdapi/v1/jobs/{job['id']}")
    assert json.loads(fetched.content)["request"]["prompt"] == "ünïcödé 猫 🐈"


def _png(size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB") -> str:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, size, 128).save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode()


def test_real_images_are_accepted_as_raw_base64_or_data_uris(api: httpx.Client) -> None:
    body = {
        "init_images": [_png((64, 48)), "data:image/jpeg;base64," + _png((32, 32), "JPEG")],
        "mask": "data:image/webp;base64," + _png((64, 48), "WEBP"),
    }
    assert api.post("/sdapi/v1/img2img", json=body).status_code == 202


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        ("bm90IGFuIGltYWdl", "not an image"),
        ("%%% not base64 %%%", "not valid base64"),
        ("data:text/plain;base64,aGk=", "data:image/<type>;base64,<data>"),
        ("https://example.com/cat.png", "image URLs are not accepted"),
    ],
)
def test_bad_input_images_get_a_422_naming_the_image_and_the_reason(
    api: httpx.Client, image: str, reason: str
) -> None:
    response = api.post("/sdapi/v1/img2img", json={"init_images": [_png((8, 8)), image]})
    assert response.status_code == 422
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", "init_images", 1] and reason in issue["msg"]


def test_a_decompression_bomb_is_refused_before_it_is_decoded(
    sqlite_url: str,
    settings_for,  # type: ignore[no-untyped-def]
) -> None:
    bomb = _png((8000, 6000), "PNG", "1")  # 48 MP that compress to a few kB
    settings = settings_for(database_url=sqlite_url, image_max_pixels=40_000_000)
    with serve(create_app(settings)) as url:
        response = httpx.post(f"{url}/sdapi/v1/img2img", json={"init_images": [bomb]})
    assert response.status_code == 422 and "pixels" in response.json()["detail"][0]["msg"]


def test_controlnet_unit_images_are_checked_too(api: httpx.Client) -> None:
    unit = {"enabled": True, "module": "canny", "image": {"image": "AAAA", "mask": None}}
    response = api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": [unit]}}},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == [
        "body",
        "alwayson_scripts",
        "ControlNet",
        "args",
        0,
        "image",
        "image",
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 4),
        ("height", 100_000),
        ("steps", 0),
        ("batch_size", 1000),
        ("denoising_strength", -0.5),
    ],
)
def test_out_of_range_values_get_a_422_naming_the_field(
    api: httpx.Client, field: str, value: object
) -> None:
    response = api.post("/sdapi/v1/txt2img", json={field: value})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]


def _image_server(png: bytes) -> object:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def picture(request: object) -> Response:
        return Response(png, media_type="image/png")

    return Starlette(routes=[Route("/cat.png", picture)])


@pytest.mark.parametrize("allow_private", [True, False])
def test_image_urls_when_allowed_are_fetched_through_the_ssrf_guard(
    sqlite_url: str,
    settings_for,
    allow_private: bool,  # type: ignore[no-untyped-def]
) -> None:
    import io
    import sqlite3

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (3000, 1500), (0, 90, 200)).save(out, format="PNG")
    settings = settings_for(
        database_url=sqlite_url, image_urls=True, webhook_allow_private=allow_private
    )
    with serve(_image_server(out.getvalue())) as images, serve(create_app(settings)) as url:  # type: ignore[arg-type]
        response = httpx.post(
            f"{url}/sdapi/v1/img2img", json={"init_images": [f"{images}/cat.png"]}, headers=ASYNC
        )
    if not allow_private:  # loopback is off limits, as for webhooks
        assert response.status_code == 422
        assert "may not reach" in response.json()["detail"][0]["msg"]
        return
    assert response.status_code == 202
    db = sqlite3.connect(sqlite_url.split("///", 1)[1])
    [body] = db.execute("SELECT body FROM job_payloads").fetchone()
    sent = json.loads(body)["init_images"][0]
    assert base64.b64decode(sent) == out.getvalue()  # fetched, and not resized


@pytest.mark.parametrize(
    ("raw", "loc", "words"),
    [
        ('{"prompt": "x", "eta": NaN}', ["body", "eta"], "NaN and Infinity"),
        (
            '{"prompt": "x", "override_settings": {"CLIP_stop": Infinity}}',
            ["body", "override_settings", "CLIP_stop"],
            "NaN and Infinity",
        ),
        ('{"prompt": "x", "my_key": -Infinity}', ["body", "my_key"], "NaN and Infinity"),
        ('{"prompt": "x", "styles": ["\\ud800"]}', ["body", "styles", 0], "lone surrogate"),
        ('{"prompt": "x", "\\udfff": 1}', ["body", "\\udfff"], "lone surrogate"),
    ],
)
def test_a_body_that_could_not_be_shown_again_is_refused_naming_the_field_and_nothing_is_stored(
    api: httpx.Client, raw: str, loc: list[object], words: str
) -> None:
    response = api.post(
        "/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == loc and words in problem["msg"]
    listed = api.get("/sdapi/v1/jobs")
    assert listed.status_code == 200 and listed.json()["jobs"] == []


@pytest.mark.parametrize("depth", [100, 400, 5000])
def test_a_deeply_nested_body_gets_a_422_not_a_500(api: httpx.Client, depth: int) -> None:
    raw = '{"prompt": "x", "alwayson_scripts": ' + "[" * depth + "]" * depth + "}"
    response = api.post(
        "/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "nested" in response.json()["detail"][0]["msg"]
    assert api.get("/sdapi/v1/jobs").status_code == 200


def test_ordinary_unicode_and_numbers_are_taken_as_sent(api: httpx.Client) -> None:
    body = {"prompt": "café 🐱 \u00e9", "eta": 0.5, "styles": ["a", "b"]}
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 202
    assert api.get(f"/sdapi/v1/jobs/{response.json()['id']}").json()["request"]["prompt"] == (
        "café 🐱 é"
    )


@pytest.mark.anyio
async def test_an_image_index_past_what_a_job_has_is_a_404_however_large(
    make_api: Callable[..., httpx.Client], sqlite_url: str
) -> None:
    from a1111_proxy.backends.fake import FakeBackend
    from a1111_proxy.db.engine import Database
    from a1111_proxy.jobs import JobRepository
    from tests.integration.test_worker import make_worker

    api = make_api()
    job_id = api.post("/sdapi/v1/txt2img", json={"prompt": "cat", "batch_size": 2}).json()["id"]
    db = Database(sqlite_url)
    try:
        worker = make_worker(JobRepository(db), [FakeBackend("f", service_time=0.01)], sqlite_url)
        await worker.run_until_empty()
    finally:
        await db.dispose()
    assert api.get(f"/sdapi/v1/jobs/{job_id}/images/1").status_code == 200
    for n in (2, 2**31, 2**63, 2**64 + 5):
        response = api.get(f"/sdapi/v1/jobs/{job_id}/images/{n}")
        assert response.status_code == 404, n
        assert "2 image(s)" in response.json()["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "http://0177.0.0.1/hook",
        "http://256.0.0.1/hook",
        "http://a..b/hook",
        "http://" + "a" * 64 + ".example.com/hook",
    ],
)
def test_a_webhook_url_the_sender_could_not_use_is_refused_at_submit(
    api: httpx.Client, url: str
) -> None:
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "webhook_url": url})
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "webhook_url"]
    assert api.get("/sdapi/v1/jobs").json()["jobs"] == []
