"""Real A1111 clients against a default deployment (issue 13): each section replays, in order, the
requests one real integration sends (paths, methods, headers, bodies) and asserts what that client
reads from each answer, not only the status.

Everything is real: `a1111-proxy serve` and `worker` processes over one SQLite file, in front of
the fake A1111 (a real HTTP server on loopback). `webuiapi` is driven as it is. The other clients
cannot run here (Node servers, a large FastAPI app, a Gradio extension), so they are mirrored
request by request from the source file cited at the top of each section. Requests with headers
that h11 (under httpx) refuses to send, such as `Authorization: Basic ` with nothing after it,
go out through the standard library's http.client, which puts the exact bytes on the wire as
Node and aiohttp do.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import webuiapi
from PIL import Image

from tests.fakes.a1111 import LATENT_UPSCALE_MODES, FakeA1111
from tests.processes.conftest import serving
from tests.servers import free_port, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.slow


VAE = {
    "model_name": "vae-ft-mse-840000-ema-pruned.safetensors",
    "filename": "/models/VAE/vae-ft-mse-840000-ema-pruned.safetensors",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- the shared harness -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeA1111]:
    fake = FakeA1111(service_time=0.05)
    fake.catalogue["sd-vae"] = [VAE]
    with serving(fake):
        yield fake


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fake: FakeA1111) -> Iterator[Stack]:
    """A default deployment: only the A1111 address is configured."""
    made = Stack(tmp_path_factory.mktemp("clients"), [fake.url])  # type: ignore[attr-defined]
    try:
        api = made.start_api()
        made.start_worker()
        wait_catalogue(api)
        yield made
    finally:
        made.close()


@pytest.fixture
def api(stack: Stack) -> httpx.Client:
    """Our own look at the proxy (job views), not part of any client's sequence."""
    assert stack.api is not None
    return stack.api


@pytest.fixture
def slow_generations(fake: FakeA1111) -> Iterator[FakeA1111]:
    """Generations take a minute unless interrupted, so a test can watch one run."""
    fake.service_time = 60.0
    try:
        yield fake
    finally:
        fake.service_time = 0.05


@pytest.fixture
def restore_model(api: httpx.Client, fake: FakeA1111) -> Iterator[None]:
    yield
    api.post("/sdapi/v1/options", json={"sd_model_checkpoint": fake.models[0]["title"]})


def wait_catalogue(api: httpx.Client) -> None:
    # /controlnet/model_list is among the last entries the worker fetches.
    wait_for(
        lambda: api.get("/controlnet/model_list").status_code == 200,
        timeout=30,
        what="the worker's first catalogue",
    )


def wire(
    method: str, url: str, headers: dict[str, str], body: bytes | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (http.client refuses only CR/LF in values)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        found = {name.lower(): value for name, value in response.getheaders()}
    finally:
        conn.close()
    encoding = found.get("content-encoding", "")
    if encoding == "gzip":
        data = gzip.decompress(data)
    elif encoding == "deflate":
        data = zlib.decompress(data)
    return response.status, found, data


def png_from_base64(text: str) -> Image.Image:
    raw = base64.b64decode(text, validate=True)
    assert raw.startswith(PNG_MAGIC), "A1111 answers raw base64 of a PNG file, no data: prefix"
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def picture(
    size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 30, 30)
) -> Image.Image:
    return Image.new("RGB", size, color)


def job_of(api: httpx.Client, headers: dict[str, str]) -> dict[str, Any]:
    return api.get(f"/sdapi/v1/jobs/{headers['x-job-id']}").json()


# --- 1. webuiapi 0.9.17, the real library (site-packages/webuiapi/webuiapi.py) -----------------


@pytest.fixture
def client(stack: Stack) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{stack.base}/sdapi/v1")


class TestWebuiapi:
    def test_txt2img_gives_webuiapi_pil_images_parsed_info_and_parameters(
        self, client: webuiapi.WebUIApi
    ) -> None:
        result = client.txt2img(prompt="a lighthouse", seed=1234, steps=5, batch_size=2)
        assert [image.size for image in result.images] == [(8, 8), (8, 8)]
        assert result.info["seed"] == 1234 and result.info["all_seeds"] == [1234, 1235]
        assert result.parameters["prompt"] == "a lighthouse"

    def test_img2img_with_a_mask_reaches_a1111_byte_for_byte_and_answers_its_images(
        self, client: webuiapi.WebUIApi, fake: FakeA1111
    ) -> None:
        # Larger than 2048 px on a side: A1111 takes any size, so nothing may shrink it.
        init = picture((3000, 1000), (10, 200, 10))
        mask = Image.new("L", (3000, 1000), 255)
        result = client.img2img(
            images=[init],
            mask_image=mask,
            prompt="paint",
            inpainting_fill=1,
            denoising_strength=0.5,
            steps=4,
        )
        assert len(result.images) == 1 and result.info["seed"] > 0
        sent = fake.generation_requests()[-1].body
        assert sent["init_images"] == [webuiapi.b64_img(init)]
        assert sent["mask"] == webuiapi.b64_img(mask) and sent["denoising_strength"] == 0.5

    def test_get_progress_and_interrupt_act_on_the_txt2img_the_script_waits_for(
        self, stack: Stack, client: webuiapi.WebUIApi, slow_generations: FakeA1111
    ) -> None:
        generator = webuiapi.WebUIApi(baseurl=f"{stack.base}/sdapi/v1")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(generator.txt2img, prompt="a slow castle", steps=40)
            busy = wait_for(
                lambda: (
                    (p := client.get_progress())["progress"] > 0.01 and p["current_image"] and p
                ),
                timeout=30,
                what="a preview",
            )
            assert busy["state"]["job"] == "scripts_txt2img" and busy["state"]["job_count"] == 1
            assert png_from_base64(busy["current_image"]).size == (4, 4)
            assert client.interrupt() == {}
            result = waiting.result(timeout=60)
        # A1111 answers an interrupted generation with 200 and what it has: the image it was on.
        assert len(result.images) == 1 and result.info["all_seeds"]
        assert result.parameters["steps"] == 40
        idle = client.get_progress()
        assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
        client.util_wait_for_ready(check_interval=0.1)

    def test_util_set_model_switches_the_checkpoint_the_next_txt2img_uses(
        self, client: webuiapi.WebUIApi, fake: FakeA1111, restore_model: None
    ) -> None:
        sdxl = fake.models[1]["title"]
        client.util_set_model("juggernautxl")  # webuiapi picks the closest title itself
        assert client.util_get_current_model() == sdxl
        assert client.txt2img(prompt="after the switch", steps=3).info["sd_model_name"] == sdxl

    def test_get_loras_lists_the_backends_loras(self, client: webuiapi.WebUIApi) -> None:
        [lora] = client.get_loras()
        assert lora["name"] == "add_detail" and lora["alias"] == "add_detail"
        assert lora["path"] == "/models/Lora/add_detail.safetensors"

    def test_png_info_reads_the_infotext_of_an_image_it_generated(
        self, client: webuiapi.WebUIApi
    ) -> None:
        image = client.txt2img(prompt="a fox", seed=77, steps=6).image
        info = client.png_info(image)
        assert info.info.startswith("a fox\nSteps: 6, Seed: 77")
        assert info.parameters["Prompt"] == "a fox" and info.parameters["Seed"] == "77"

    def test_a_controlnet_unit_reaches_a1111_as_webuiapi_built_it(
        self, client: webuiapi.WebUIApi, fake: FakeA1111
    ) -> None:
        assert client.has_controlnet  # read from /scripts when the client was made
        unit = webuiapi.ControlNetUnit(
            image=picture(), module="canny", model="control_v11p_sd15_canny [d14c016b]", weight=0.8
        )
        result = client.txt2img(prompt="a house", steps=3, controlnet_units=[unit])
        assert len(result.images) == 1
        [arg] = fake.generation_requests()[-1].body["alwayson_scripts"]["ControlNet"]["args"]
        assert arg == unit.to_dict()


# --- 2. open-webui's AUTOMATIC1111 image engine -------------------------------------------------
# Replayed from open-webui/open-webui backend/open_webui/routers/images.py (commit 02530d50):
# verify_url, get_models, set_image_model, get_image_model and image_generations. It uses aiohttp
# and sends `authorization: get_automatic1111_api_auth(config)` on every call: '' when the admin
# left AUTOMATIC1111_API_AUTH unset (None), `Basic ` with nothing after it when it is '' (the
# config default, open_webui/config.py).


def automatic1111_api_auth(api_auth: str | None) -> str:
    if api_auth is None:
        return ""
    return f"Basic {base64.b64encode(api_auth.encode()).decode()}"


class OpenWebUI:
    def __init__(self, base_url: str, api_auth: str | None) -> None:
        self.base = base_url
        self.headers = {"authorization": automatic1111_api_auth(api_auth)}

    def get(self, path: str) -> tuple[int, Any]:
        status, _, data = wire("GET", f"{self.base}{path}", self.headers)
        return status, json.loads(data)

    def post(self, path: str, body: Any) -> tuple[int, dict[str, str], Any]:
        headers = {**self.headers, "Content-Type": "application/json"}
        status, found, data = wire("POST", f"{self.base}{path}", headers, json.dumps(body).encode())
        return status, found, json.loads(data) if data else None

    def verify_url(self) -> bool:
        status, _ = self.get("/sdapi/v1/options")
        return status < 400  # r.raise_for_status()

    def get_models(self) -> list[dict[str, str]]:
        _, models = self.get("/sdapi/v1/sd-models")
        return [{"id": model["title"], "name": model["model_name"]} for model in models]

    def set_image_model(self, model: str) -> int | None:
        """The whole options dict goes back with the new checkpoint; None when nothing was sent."""
        _, options = self.get("/sdapi/v1/options")
        if model == options["sd_model_checkpoint"]:
            return None
        options["sd_model_checkpoint"] = model
        status, _, _ = self.post("/sdapi/v1/options", options)
        return status

    def get_image_model(self) -> str:
        _, options = self.get("/sdapi/v1/options")
        return str(options["sd_model_checkpoint"])

    def generate(
        self, prompt: str, model: str
    ) -> tuple[list[tuple[bytes, str]], str, dict[str, str]]:
        """image_generations() for an admin: (image bytes, mime) per image, and res['info']."""
        assert self.get_image_model()
        self.set_image_model(model)
        data = {"prompt": prompt, "batch_size": 1, "width": 512, "height": 512, "steps": 50}
        _, headers, res = self.post("/sdapi/v1/txt2img", data)  # no status check: r.json()
        return [self.get_image_data(image) for image in res["images"]], res["info"], headers

    @staticmethod
    def get_image_data(data: str) -> tuple[bytes, str]:
        if "," in data:
            header, encoded = data.split(",", 1)
            return base64.b64decode(encoded), header.split(";")[0].removeprefix("data:")
        return base64.b64decode(data), "image/png"


class TestOpenWebUI:
    @pytest.mark.parametrize("api_auth", [None, ""], ids=["auth-unset", "auth-empty"])
    def test_lists_models_posts_the_whole_options_back_and_generates(
        self,
        stack: Stack,
        fake: FakeA1111,
        api: httpx.Client,
        api_auth: str | None,
        restore_model: None,
    ) -> None:
        webui = OpenWebUI(stack.base, api_auth)
        assert webui.verify_url()
        models = webui.get_models()
        assert models[:2] == [{"id": m["title"], "name": m["model_name"]} for m in fake.models[:2]]
        chosen = models[1]["id"]
        assert webui.set_image_model(chosen) == 200
        assert webui.get_image_model() == chosen
        images, info, headers = webui.generate("a red fox in the snow", chosen)
        [(raw, mime)] = images
        assert mime == "image/png" and raw.startswith(PNG_MAGIC)
        assert json.loads(info)["sd_model_name"] == chosen
        assert job_of(api, headers)["request"]["width"] == 512


# --- 3. SillyTavern, "auto" source (SD WebUI) -----------------------------------------------------
# Replayed from SillyTavern/SillyTavern (commit ba6f7b7a) src/endpoints/stable-diffusion.js, the
# server side that calls A1111 with node-fetch and `Authorization: getBasicAuthHeader(auth)`
# (src/util.js: `Basic ${base64(auth)}`, so `Basic ` for the default empty auth), and the bodies
# from public/scripts/extensions/stable-diffusion/index.js (getSdRequestBody, generateAutoImage,
# defaultSettings). Each method is one of its routes and returns what it sends its browser.

NODE_FETCH_HEADERS = {
    "Accept": "*/*",
    "Accept-Encoding": "gzip,deflate",
    "Connection": "close",
    "User-Agent": "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
}


class SillyTavernAuto:
    def __init__(self, url: str, auth: str = "") -> None:
        self.request_body = {"url": url, "auth": auth}  # getSdRequestBody() for sources.auto
        self.progress_polls: list[dict[str, Any]] = []
        self.last_headers: dict[str, str] = {}

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        auth = base64.b64encode(self.request_body["auth"].encode()).decode()
        headers = {**NODE_FETCH_HEADERS, "Authorization": f"Basic {auth}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        url = self.request_body["url"].rstrip("/") + path  # url.pathname = path
        status, self.last_headers, raw = wire(method, url, headers, data)
        return status, json.loads(raw) if raw else None

    def _names(self, path: str, key: str = "name") -> list[str]:
        status, data = self._call("GET", path)
        assert 200 <= status < 300, f"ST answers 500: {path} gave {status}"  # result.ok
        return [item[key] for item in data]

    def ping(self) -> int:
        status, _ = self._call("GET", "/sdapi/v1/options")
        return 200 if 200 <= status < 300 else 500

    def samplers(self) -> list[str]:
        return self._names("/sdapi/v1/samplers")

    def get_model(self) -> str:
        _, data = self._call("GET", "/sdapi/v1/options")  # no ok check here
        return str(data["sd_model_checkpoint"])

    def models(self) -> list[dict[str, str]]:
        return [
            {"value": title, "text": title} for title in self._names("/sdapi/v1/sd-models", "title")
        ]

    def upscalers(self) -> list[str]:
        with ThreadPoolExecutor(2) as pool:  # Promise.all
            upscalers = pool.submit(self._names, "/sdapi/v1/upscalers")
            latent = pool.submit(self._names, "/sdapi/v1/latent-upscale-modes")
            names = upscalers.result()
            names[1:1] = latent.result()  # 0 = None, then latent upscalers, then upscalers
        return names

    def schedulers(self) -> list[str]:
        return self._names("/sdapi/v1/schedulers")

    def vaes(self) -> list[str]:
        return self._names("/sdapi/v1/sd-vae", "model_name")

    def set_model(self, model: str) -> int:
        status, _ = self._call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": model})
        if not 200 <= status < 300:
            return 500
        for _ in range(10):  # MAX_ATTEMPTS, CHECK_INTERVAL 2000 ms
            _, state = self._call("GET", "/sdapi/v1/progress")
            self.progress_polls.append(state)
            if state["progress"] == 0.0 and state["state"]["job_count"] == 0:
                break
            time.sleep(2.0)  # await delay(CHECK_INTERVAL)
        return 200

    def generate(self, client_body: dict[str, Any]) -> tuple[int, Any]:
        """/api/sd/generate posts the browser's whole body, `url` and `auth` included."""
        status, data = self._call("POST", "/sdapi/v1/txt2img", {**self.request_body, **client_body})
        return (200, data) if 200 <= status < 300 else (500, None)


def generate_auto_image_body(prompt: str, sampler: str, scheduler: str, vae: str) -> dict[str, Any]:
    """generateAutoImage() with defaultSettings, after the user picked from the loaded lists
    (seed -1 is sent as undefined, so JSON.stringify leaves it out)."""
    return {
        "prompt": prompt,
        "negative_prompt": "lowres, bad anatomy, bad hands, text, error",
        "sampler_name": sampler,
        "scheduler": scheduler,
        "steps": 20,
        "cfg_scale": 7,
        "width": 512,
        "height": 512,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        # isValidVae ? vae : undefined, and JSON.stringify drops undefined
        "override_settings": {"CLIP_stop_at_last_layers": 1, **({"sd_vae": vae} if vae else {})},
        "override_settings_restore_afterwards": True,
        "clip_skip": 1,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
    }


class TestSillyTavern:
    def test_connects_loads_every_list_sets_the_model_and_generates(
        self, stack: Stack, fake: FakeA1111, api: httpx.Client, restore_model: None
    ) -> None:
        st = SillyTavernAuto(stack.base)
        assert st.ping() == 200  # validateAutoUrl, then loadSettingOptions
        samplers = st.samplers()
        assert samplers == ["Euler a", "DPM++ 2M"]
        assert st.get_model() == fake.models[0]["title"]
        models = st.models()
        assert models[1] == {"value": fake.models[1]["title"], "text": fake.models[1]["title"]}
        assert st.upscalers() == ["Lanczos", *LATENT_UPSCALE_MODES]
        schedulers = st.schedulers()
        assert schedulers == ["automatic", "karras"]
        assert st.vaes() == [VAE["model_name"]]

        chosen = models[1]["value"]  # onModelChange -> updateAutoRemoteModel
        assert st.set_model(chosen) == 200
        # Nothing of this caller runs: the first poll reads idle, so ST does not sit out 20 s.
        first = st.progress_polls[0]
        assert first["progress"] == 0.0 and first["state"]["job_count"] == 0
        assert st.get_model() == chosen

        status, data = st.generate(
            generate_auto_image_body(
                "a knight, castle, sunset", samplers[0], schedulers[1], VAE["model_name"]
            )
        )
        assert status == 200
        png_from_base64(data["images"][0])  # { format: 'png', data: data.images[0] }
        assert json.loads(data["info"])["sd_model_name"] == chosen
        sent = fake.generation_requests()[-1].body
        assert sent["prompt"] == "a knight, castle, sunset" and sent["sampler_name"] == "Euler a"
        assert sent["override_settings"]["sd_vae"] == VAE["model_name"]
        assert sent["url"] == stack.base and sent["auth"] == ""  # as A1111 would receive them

    def test_credentials_in_its_body_reach_a1111_but_no_job_view_listing_or_log(
        self, stack: Stack, fake: FakeA1111, api: httpx.Client
    ) -> None:
        secret = "st-user:correct-horse-5309"  # the user's --api-auth credentials
        st = SillyTavernAuto(stack.base, auth=secret)
        status, data = st.generate(generate_auto_image_body("a lantern", "Euler a", "karras", ""))
        assert status == 200 and data["images"]
        assert fake.generation_requests()[-1].body["auth"] == secret
        job_id = st.last_headers["x-job-id"]
        views = {
            "job view": api.get(f"/sdapi/v1/jobs/{job_id}").text,
            "job listing": api.get("/sdapi/v1/jobs").text,
            **{proc.log_path.name: proc.output() for proc in stack.procs},
        }
        assert api.get(f"/sdapi/v1/jobs/{job_id}").json()["request"]["prompt"] == "a lantern"
        assert [name for name, text in views.items() if "correct-horse-5309" in text] == []


# --- 4. LibreChat, the Stable Diffusion tool --------------------------------------------------
# Replayed from danny-avila/LibreChat api/app/clients/tools/structured/StableDiffusion.js (commit
# 7cacd8a4): axios.post(`${url}/sdapi/v1/txt2img`, payload) (axios accepts any 2xx), then
# `data.images[0]`, `JSON.parse(data.info)` for height, width, seed and infotexts[0], and
# `Buffer.from(image.split(',', 1)[0], 'base64')` into sharp. (Later versions drop sampler_index.)

AXIOS_HEADERS = {"Accept": "application/json, text/plain, */*", "User-Agent": "axios/1.7.9"}


class TestLibreChat:
    def test_a_1024_square_txt2img_gives_images_0_and_json_info(
        self, stack: Stack, fake: FakeA1111
    ) -> None:
        payload = {
            "prompt": "photo of a man in black clothes, half body, coastline, overcast",
            "negative_prompt": "semi-realistic, cgi, 3d, render, sketch, cartoon",
            "sampler_index": "DPM++ 2M Karras",
            "cfg_scale": 4.5,
            "steps": 22,
            "width": 1024,
            "height": 1024,
        }
        response = httpx.post(
            f"{stack.base}/sdapi/v1/txt2img", json=payload, headers=AXIOS_HEADERS, timeout=60
        )
        assert 200 <= response.status_code < 300
        image = response.json()["images"][0]
        png_from_base64(image.split(",", 1)[0])
        info = json.loads(response.json()["info"])
        assert (info["width"], info["height"]) == (1024, 1024) and isinstance(info["seed"], int)
        assert info["infotexts"][0].split("\n")[-1].startswith("Steps: 22, Seed: ")
        sent = dict(fake.generation_requests()[-1].body)
        sent.pop("override_settings", None)  # the default checkpoint, once one was set
        assert sent == payload


# --- 5. text-generation-webui, extension sd_api_pictures ---------------------------------------
# Replayed from oobabooga/text-generation-webui (commit 1dcde41d) extensions/sd_api_pictures/
# script.py with manage_VRAM on: give_VRAM_priority('set') unloads A1111's checkpoint when it is
# switched on; get_SD_pictures() reloads it ('SD'), posts txt2img, reads r['images'], unloads again
# ('LLM'). Every call is requests.post(..., json='') then raise_for_status().


class TestTextGenerationWebUI:
    def test_unload_and_reload_the_checkpoint_around_a_txt2img(self, stack: Stack) -> None:
        a1111 = httpx.Client(
            base_url=stack.base, timeout=60, headers={"User-Agent": "python-requests/2.32.3"}
        )
        with a1111:
            a1111.get("/sdapi/v1/sd-models").raise_for_status()  # SD_api_address_update
            options = a1111.get("/sdapi/v1/options").json()  # get_checkpoints
            assert options["sd_model_checkpoint"] in [
                m["title"] for m in a1111.get("/sdapi/v1/sd-models").json()
            ]
            a1111.post("/sdapi/v1/unload-checkpoint", json="").raise_for_status()  # 'set'

            a1111.post("/sdapi/v1/reload-checkpoint", json="").raise_for_status()  # 'SD'
            description = "(a cozy cabin in the woods:1)"
            payload = {
                "prompt": "(Masterpiece:1.1), detailed, intricate, colorful" + description,
                "seed": -1,
                "sampler_name": "DPM++ 2M",
                "enable_hr": False,
                "hr_scale": "1.0",
                "hr_upscaler": "ESRGAN_4x",
                "denoising_strength": 0.61,
                "steps": 32,
                "cfg_scale": 7,
                "width": 512,
                "height": 512,
                "restore_faces": False,
                "override_settings_restore_afterwards": True,
                "negative_prompt": "(worst quality, low quality:1.3)",
            }
            response = a1111.post("/sdapi/v1/txt2img", json=payload)
            response.raise_for_status()
            [img_str] = response.json()["images"]
            image = Image.open(io.BytesIO(base64.b64decode(img_str.split(",", 1)[0])))
            image.thumbnail((300, 300))
            image.save(io.BytesIO(), format="JPEG")
            a1111.post("/sdapi/v1/unload-checkpoint", json="").raise_for_status()  # 'LLM'


# --- when no backend answers ------------------------------------------------------------------


@pytest.fixture(scope="class")
def down_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A deployment whose only A1111 refuses connections, with a short BACKEND_DOWN_GRACE."""
    made = Stack(
        tmp_path_factory.mktemp("down"),
        [f"http://127.0.0.1:{free_port()}"],
        A1111_PROXY_BACKEND_DOWN_GRACE="2",
    )
    try:
        api = made.start_api()
        made.start_worker()
        # A worker that has not started yet is reported as such; this test is about the backend.
        wait_for(lambda: api.get("/health").json()["workers"], what="the worker's heartbeat")
        yield made
    finally:
        made.close()


class TestNoBackendAnswers:
    def test_a_waiting_txt2img_gets_a1111s_503_naming_the_backend_and_its_job_is_canceled(
        self, down_stack: Stack
    ) -> None:
        assert down_stack.api is not None
        backend = down_stack.env["A1111_PROXY_A1111_URLS"]
        # Without the grace the request would wait on; the client's timeout bounds the test.
        response = httpx.post(
            f"{down_stack.base}/sdapi/v1/txt2img", json={"prompt": "cat"}, timeout=30
        )  # as an A1111 client: no Prefer
        assert response.status_code == 503
        body = response.json()
        assert {"error", "detail", "body", "errors"} <= set(body)
        assert backend in body["detail"] + body["errors"]
        job = down_stack.job(response.headers["x-job-id"])
        assert job["status"] == "canceled" and job["error"]["code"] == "backend_unavailable"

    def test_an_async_job_stays_queued_while_a_waiting_one_is_refused(
        self, down_stack: Stack
    ) -> None:
        assert down_stack.api is not None
        queued = down_stack.api.post(
            "/sdapi/v1/txt2img", json={"prompt": "later"}, headers={"Prefer": "respond-async"}
        )
        assert queued.status_code == 202
        refused = httpx.post(
            f"{down_stack.base}/sdapi/v1/txt2img", json={"prompt": "now"}, timeout=30
        )  # as an A1111 client: no Prefer
        assert refused.status_code == 503
        assert down_stack.job(queued.json()["id"])["status"] == "queued"

    @pytest.mark.parametrize(
        "path",
        ["/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/samplers", "/sdapi/v1/loras"],
    )
    def test_catalogue_routes_answer_503_rather_than_empty_lists(
        self, down_stack: Stack, path: str
    ) -> None:
        assert down_stack.api is not None
        response = down_stack.api.get(path)
        assert response.status_code == 503, response.text
        assert response.json()["detail"]


# --- two API tokens -----------------------------------------------------------------------------


@pytest.fixture(scope="class")
def token_fake() -> Iterator[FakeA1111]:
    with serving(FakeA1111(service_time=0.05)) as fake:
        yield fake


@pytest.fixture(scope="class")
def token_stack(tmp_path_factory: pytest.TempPathFactory, token_fake: FakeA1111) -> Iterator[Stack]:
    made = Stack(
        tmp_path_factory.mktemp("tokens"),
        [token_fake.url],  # type: ignore[attr-defined]
        A1111_PROXY_API_TOKENS="alice:tokA,bob:tokB",
    )
    try:
        made.start_api()
        made.start_worker()
        yield made
    finally:
        made.close()


def idle(progress: dict[str, Any]) -> bool:
    return (
        progress["progress"] == 0.0
        and progress["state"]["job_count"] == 0
        and progress["current_image"] is None
    )


class TestTwoTokens:
    def test_one_token_can_neither_read_nor_interrupt_the_others_running_job(
        self, token_stack: Stack
    ) -> None:
        alice = httpx.Client(
            base_url=token_stack.base, timeout=30, headers={"Authorization": "Bearer tokA"}
        )
        bob = httpx.Client(
            base_url=token_stack.base, timeout=30, headers={"Authorization": "Bearer tokB"}
        )
        # Alice's script: webuiapi with --api-auth style credentials (any user name, her token).
        alices_script = webuiapi.WebUIApi(
            baseurl=f"{token_stack.base}/sdapi/v1", username="whoever", password="tokA"
        )
        with alice, bob:
            submitted = alice.post(
                "/sdapi/v1/txt2img",
                headers={"Prefer": "respond-async"},
                json={"prompt": "alice's", "steps": 30, "fake_seconds": 60},
            )
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            wait_for(
                lambda: (p := alices_script.get_progress())["progress"] > 0.01 and p,
                timeout=30,
                what="alice's job to run",
            )

            assert idle(bob.get("/sdapi/v1/progress").json())
            by_id = bob.get("/sdapi/v1/progress", params={"job_id": job_id})
            assert by_id.status_code == 404 or idle(by_id.json())
            assert bob.post("/sdapi/v1/interrupt").json() == {}
            targeted = bob.post("/sdapi/v1/interrupt", params={"job_id": job_id})
            assert targeted.status_code in (200, 404)

            mine = alices_script.get_progress()
            assert mine["state"]["job_count"] == 1 and not mine["state"]["interrupted"]
            job = alice.get(f"/sdapi/v1/jobs/{job_id}").json()
            assert job["status"] == "processing" and job["error"] is None

            assert alices_script.interrupt() == {}
            wait_for(
                lambda: alice.get(f"/sdapi/v1/jobs/{job_id}").json()["status"] == "canceled",
                timeout=30,
                what="alice's own interrupt to end her job",
            )
