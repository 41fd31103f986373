"""Existing A1111 clients against a default deployment: the real `webuiapi` client, unchanged
but for the base URL, talking to real API and worker processes in front of a fake A1111."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator

import httpx
import pytest
import webuiapi
from PIL import Image

from tests.fakes.a1111 import NEW_MODEL, FakeA1111
from tests.servers import wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fake: FakeA1111) -> Iterator[Stack]:
    made = Stack(tmp_path_factory.mktemp("compat"), [fake.url])  # type: ignore[attr-defined]
    try:
        api = made.start_api()
        made.start_worker()
        wait_for(lambda: api.get("/controlnet/model_list").status_code == 200, what="the catalogue")
        yield made
    finally:
        made.close()


@pytest.fixture
def client(stack: Stack) -> webuiapi.WebUIApi:
    assert stack.api is not None
    return webuiapi.WebUIApi(baseurl=f"{stack.base}/sdapi/v1")


def picture(color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (16, 16), color)


def test_txt2img_answers_exactly_as_a1111_and_is_also_a_job(
    client: webuiapi.WebUIApi, fake: FakeA1111, api: httpx.Client
) -> None:
    result = client.txt2img(prompt="a lighthouse", seed=1234, steps=5, batch_size=2)
    assert len(result.images) == 2 and result.image.size == (8, 8)
    assert result.info["seed"] == 1234 and result.info["all_seeds"] == [1234, 1235]
    assert result.parameters["prompt"] == "a lighthouse"
    sent = fake.generation_requests()[-1].body
    # webuiapi saw ControlNet in /scripts, so it adds a unit list; it reaches A1111 untouched.
    assert sent["alwayson_scripts"] == {"ControlNet": {"args": []}}
    job = api.get("/sdapi/v1/jobs", params={"limit": 1}).json()["jobs"][0]
    assert job["status"] == "completed" and job["request"]["prompt"] == "a lighthouse"


def test_the_job_id_travels_in_the_headers_of_a_wait_mode_answer(api: httpx.Client) -> None:
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "cat", "steps": 3})
    assert response.status_code == 200 and set(response.json()) == {"images", "parameters", "info"}
    job_id = response.headers["x-job-id"]
    assert response.headers["location"] == f"/sdapi/v1/jobs/{job_id}"
    assert api.get(response.headers["location"]).json()["status"] == "completed"


def test_img2img_with_a_mask_passes_images_and_mask_on(
    client: webuiapi.WebUIApi, fake: FakeA1111
) -> None:
    result = client.img2img(
        images=[picture()],
        mask_image=picture((255, 255, 255)),
        prompt="paint",
        denoising_strength=0.5,
        steps=4,
    )
    assert len(result.images) == 1
    sent = fake.generation_requests()[-1].body
    assert sent["init_images"][0].startswith("data:image/png;base64,")
    assert sent["mask"].startswith("data:image/png;base64,") and sent["denoising_strength"] == 0.5


def test_a_controlnet_unit_passes_through_alwayson_scripts_untouched(
    client: webuiapi.WebUIApi, fake: FakeA1111
) -> None:
    unit = webuiapi.ControlNetUnit(
        image=picture(), module="canny", model="control_v11p_sd15_canny [d14c016b]", weight=0.8
    )
    client.txt2img(prompt="a house", steps=3, controlnet_units=[unit])
    sent = fake.generation_requests()[-1].body
    [arg] = sent["alwayson_scripts"]["ControlNet"]["args"]
    assert arg == unit.to_dict()


def test_progress_is_idle_when_nothing_runs_and_wait_for_ready_returns(
    client: webuiapi.WebUIApi,
) -> None:
    progress = client.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    # It returns only once idle, else it sleeps `check_interval` and asks again: with an hour
    # between checks, returning at all means the first check already found the proxy idle.
    returned = threading.Event()
    threading.Thread(
        target=lambda: (client.util_wait_for_ready(check_interval=3600), returned.set()),
        daemon=True,
    ).start()
    assert returned.wait(timeout=30), "wait_for_ready did not return although nothing runs"


def test_progress_shows_the_running_job_and_interrupt_ends_it(
    client: webuiapi.WebUIApi, api: httpx.Client, stack: Stack, fake: FakeA1111
) -> None:
    job_id = api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "slow", "steps": 30, "fake_seconds": 30},
        headers={"Prefer": "respond-async"},
    ).json()["id"]
    stack.wait_status(job_id, "processing")
    busy = wait_for(
        lambda: (p := client.get_progress())["progress"] > 0.01 and p["current_image"] and p,
        what="progress with a preview",
    )
    assert busy["state"]["job_count"] == 1 and busy["state"]["job"] == "scripts_txt2img"
    Image.open(io.BytesIO(base64.b64decode(busy["current_image"]))).verify()
    assert client.interrupt() == {}
    job = stack.wait_status(job_id, "canceled", timeout=10)
    assert job["error"]["code"] == "canceled"


def test_skip_is_passed_to_the_running_jobs_backend(
    client: webuiapi.WebUIApi, api: httpx.Client, stack: Stack, fake: FakeA1111
) -> None:
    before = fake.skips
    job_id = api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "slow", "fake_seconds": 1.5},
        headers={"Prefer": "respond-async"},
    ).json()["id"]
    stack.wait_status(job_id, "processing")
    assert client.skip() is None
    wait_for(lambda: fake.skips == before + 1, what="the skip to reach A1111")
    stack.wait_status(job_id, "completed")


def test_models_are_listed_and_setting_one_applies_to_later_jobs_without_racing(
    client: webuiapi.WebUIApi, fake: FakeA1111
) -> None:
    titles = [m["title"] for m in client.get_sd_models()]
    assert titles[:2] == [m["title"] for m in fake.models[:2]]
    assert client.util_get_model_names() == sorted(titles)
    client.util_set_model("juggernautxl")
    sdxl = fake.models[1]["title"]
    assert client.util_get_current_model() == sdxl
    assert client.get_options()["sd_checkpoint_hash"] == fake.models[1]["sha256"]
    result = client.txt2img(prompt="after the switch", steps=3)
    assert result.info["sd_model_name"] == sdxl
    sent = fake.generation_requests()[-1].body
    assert sent["override_settings"]["sd_model_checkpoint"] == sdxl
    assert all("sd_model_checkpoint" not in posted for posted in fake.options_posted)
    client.util_set_model(fake.models[0]["title"])  # leave it as it was


def test_an_unknown_checkpoint_is_refused_with_the_known_titles(
    api: httpx.Client, fake: FakeA1111
) -> None:
    response = api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"})
    assert response.status_code == 422
    assert fake.models[0]["title"] in response.json()["detail"]


def test_other_options_reach_the_backend_between_jobs(
    client: webuiapi.WebUIApi, fake: FakeA1111
) -> None:
    assert client.set_options({"samples_format": "jpg"}) is None
    assert client.get_options()["samples_format"] == "jpg"
    wait_for(
        lambda: (
            client.txt2img(prompt="x", steps=2) and {"samples_format": "jpg"} in fake.options_posted
        ),
        timeout=15,
        what="the option to be applied before a job",
    )
    client.set_options({"samples_format": "png"})


def test_the_catalogue_is_answered_from_the_database(
    client: webuiapi.WebUIApi, fake: FakeA1111
) -> None:
    assert client.get_loras()[0]["name"] == "add_detail"
    assert [s["name"] for s in client.get_samplers()] == ["Euler a", "DPM++ 2M"]
    assert client.get_schedulers()[1]["label"] == "Karras"
    assert client.get_cmd_flags()["api_auth"] == "<redacted>"
    assert client.get_upscalers()[0]["name"] == "Lanczos"
    assert client.get_sd_vae() == []  # the backend has none listed: an empty answer, not an error
    assert client.get_scripts()["txt2img"] == ["x/y/z plot", "controlnet m2m"]


def test_refresh_checkpoints_answers_null_and_new_models_appear(
    client: webuiapi.WebUIApi,
) -> None:
    assert client.refresh_checkpoints() is None
    wait_for(
        lambda: NEW_MODEL["title"] in [m["title"] for m in client.get_sd_models()],
        timeout=15,
        what="the refreshed model list",
    )


def test_png_info_is_answered_locally(client: webuiapi.WebUIApi) -> None:
    image = client.txt2img(prompt="a fox", seed=77, steps=6).image
    info = client.png_info(image)
    assert "Seed: 77" in info.info
    assert info.parameters["Prompt"] == "a fox" and info.parameters["Seed"] == "77"
    assert info.parameters["Steps"] == "6"


def test_interrogate_extras_and_controlnet_detect_run_on_a_slot(
    client: webuiapi.WebUIApi, fake: FakeA1111, api: httpx.Client
) -> None:
    assert client.interrogate(picture()).info == "a fake caption by clip"
    upscaled = client.extra_single_image(picture(), upscaler_1="Lanczos", upscaling_resize=2)
    assert upscaled.image.size == (16, 16)
    assert api.get("/controlnet/model_list").json() == {
        "model_list": ["control_v11p_sd15_canny [d14c016b]"]
    }
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    detected = api.post(
        "/controlnet/detect",
        json={
            "controlnet_module": "canny",
            "controlnet_input_images": [base64.b64encode(buffer.getvalue()).decode()],
        },
    )
    assert detected.status_code == 200 and detected.json()["info"] == "Success"
    kinds = {j["type"] for j in api.get("/sdapi/v1/jobs", params={"limit": 20}).json()["jobs"]}
    assert {"interrogate", "extra-single-image", "controlnet-detect"} <= kinds


def test_a1111s_own_error_comes_back_with_its_status_and_body(
    api: httpx.Client, fake: FakeA1111
) -> None:
    body = {"error": "HTTPException", "detail": "Script 'nope' not found", "body": "", "errors": ""}
    fake.fail_next(1, status=422, body=body)
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "script_name": "nope"})
    assert response.status_code == 422 and response.json() == body
    assert api.get(response.headers["location"]).json()["status"] == "error"


def test_prefer_wait_n_answers_202_at_the_deadline_and_respond_async_forces_202(
    api: httpx.Client, stack: Stack
) -> None:
    # A job that runs for an hour: a 202 within the client's 30 s timeout comes from the deadline
    # asked for, not from the job's end.
    response = api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "slow", "fake_seconds": 3600},
        headers={"Prefer": "wait=0.3"},
    )
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "wait=0.3"
    assert response.json()["status"] in ("queued", "processing")
    job_id = response.json()["id"]
    assert api.post(f"/sdapi/v1/jobs/{job_id}/cancel").status_code == 200
    stack.wait_status(job_id, "canceled")
    forced = api.post(
        "/sdapi/v1/txt2img", json={"prompt": "x"}, headers={"Prefer": "respond-async"}
    )
    assert forced.status_code == 202 and forced.json()["status"] == "queued"
    stack.wait_status(forced.json()["id"], "completed")


def test_a_client_that_goes_away_does_not_cancel_its_job(stack: Stack, api: httpx.Client) -> None:
    def impatient() -> None:
        try:
            httpx.post(
                f"{stack.base}/sdapi/v1/txt2img",
                json={"prompt": "left behind", "fake_seconds": 1.0},
                timeout=0.3,
            )
        except httpx.TimeoutException:
            pass

    thread = threading.Thread(target=impatient)
    thread.start()
    thread.join()
    job = wait_for(
        lambda: [
            j
            for j in api.get("/sdapi/v1/jobs").json()["jobs"]
            if j["request"].get("prompt") == "left behind"
        ],
        what="the job",
    )[0]
    assert stack.wait_status(job["id"], "completed")["result"]["images"]


def test_an_unsupported_route_is_a_clear_404_and_never_a_500(api: httpx.Client) -> None:
    response = api.post("/sdapi/v1/train/embedding", json={})
    assert (
        response.status_code == 404
        and "does not offer POST /sdapi/v1/train/embedding" in (response.json()["detail"])
    )
    assert api.get("/sdapi/v1/txt2img").status_code == 405


def test_lenient_bodies_are_accepted_as_a1111_accepts_them(
    api: httpx.Client, fake: FakeA1111
) -> None:
    body = {
        "prompt": 123,
        "seed": "42",
        "steps": 3.0,
        "width": 512.9,
        "enable_hr": "yes",
        "sampler_index": "Euler a",
        "webhookUrl": "ignored-by-a1111",
    }
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200
    sent = fake.generation_requests()[-1].body
    sent.pop("override_settings", None)  # the default checkpoint, if one was set with /options
    assert sent == body
    assert json.loads(response.json()["info"])["seed"] == 42


def test_a_large_input_image_reaches_a1111_as_the_client_sent_it(
    client: webuiapi.WebUIApi, fake: FakeA1111
) -> None:
    client.img2img(images=[Image.new("RGB", (3000, 1000), (10, 200, 10))], prompt="big", steps=2)
    sent = fake.generation_requests()[-1].body["init_images"][0]
    image = Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1])))
    assert image.size == (3000, 1000)  # no resize unless the operator sets IMAGE_MAX_SIDE
