"""LoRA and ControlNet on the bundled diffusers engine, end to end on tiny random-weight models
(a kohya-format LoRA and a diffusers ControlNet the tests build), on the CPU, offline."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")
pytest.importorskip("peft", reason="LoRA needs the engine extra (peft)")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from a1111_proxy.app import create_app  # noqa: E402
from a1111_proxy.backends import BackendRejected  # noqa: E402
from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.catalogue import CatalogueStore  # noqa: E402
from a1111_proxy.db.engine import Database  # noqa: E402
from a1111_proxy.engine import adapters, lora  # noqa: E402
from a1111_proxy.engine.config import EngineConfig  # noqa: E402
from a1111_proxy.hashes import hash_file  # noqa: E402
from tests.servers import ASYNC, serve  # noqa: E402
from worker.catalogue import CatalogueKeeper  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

from tests.engine.results import infotext, pixels  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.engine]
SMALL = {"steps": 3, "width": 64, "height": 64, "seed": 7, "prompt": "a cat"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Iterator[Path]:
    """MODELS_DIR with an SD1.5 and an SDXL checkpoint, kohya LoRAs for each (one only for the
    text encoder, one in a subfolder, one LyCORIS LoHa) and ControlNets for each (diffusers
    folders, and one as an A1111-style single file)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("networks")
    models = root / "models"
    sd15 = tiny_models.sd15(root / "configs" / "sd15")
    tiny_models.write_single_file(sd15, models / "Stable-diffusion" / "tiny15.safetensors")
    tiny_models.kohya_lora(sd15, models / "Lora" / "style.safetensors", seed=1)
    tiny_models.kohya_lora(
        sd15, models / "Lora" / "people" / "face.safetensors", seed=2, unet=False
    )
    save_file(
        {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(models / "Lora" / "loha.safetensors")
    )
    scribble = tiny_models.controlnet(sd15, models / "ControlNet" / "tiny_scribble", seed=1)
    tiny_models.write_single_file_controlnet(
        scribble, models / "ControlNet" / "a1111_scribble.safetensors"
    )
    tiny_models.controlnet(sd15, models / "ControlNet" / "tiny_canny", seed=2)
    (models / "ControlNet" / "control_v11p_sd15_canny.pth").write_bytes(b"\x80\x04pickle")
    sdxl = tiny_models.sdxl(root / "configs" / "sdxl")
    tiny_models.write_single_file(sdxl, models / "Stable-diffusion" / "xl.safetensors")
    tiny_models.kohya_lora(sdxl, models / "Lora" / "xlstyle.safetensors", seed=3)
    tiny_models.controlnet(sdxl, models / "ControlNet" / "xl_canny", seed=3)
    yield root


@pytest.fixture
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = DiffusersBackend(
        EngineConfig(
            models_dir=models_dir / "models",
            device="cpu",
            skeletons={kind: models_dir / "configs" / kind for kind in ("sd15", "sdxl")},
        )
    )
    yield made
    await made.aclose()


def differ(a: dict[str, Any], b: dict[str, Any]) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


XL = {"override_settings": {"sd_model_checkpoint": "xl"}}
SD15 = {"override_settings": {"sd_model_checkpoint": "tiny15"}}


async def test_a_lora_changes_the_image_at_weight_1_and_the_next_job_does_not_inherit_it(
    backend: DiffusersBackend,
) -> None:
    base = await backend.generate("txt2img", {**SMALL, **SD15})
    styled = await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a cat <lora:style:1>"})
    off = await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a cat <lora:style:0>"})
    after = await backend.generate("txt2img", {**SMALL, **SD15})
    assert differ(styled, base) > 20
    assert differ(off, base) <= 1 and differ(after, base) == 0


async def test_the_text_encoder_weight_reaches_the_engines_own_prompt_encoding(
    backend: DiffusersBackend,
) -> None:
    base = await backend.generate("txt2img", {**SMALL, **SD15})
    te_on = await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a cat <lora:face:1:0>"})
    te_off = await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a cat <lora:face:0:1>"})
    assert differ(te_on, base) > 10 and differ(te_off, base) <= 1


async def test_lora_hashes_are_written_in_the_infotext_as_a1111_writes_them(
    backend: DiffusersBackend, models_dir: Path
) -> None:
    result = await backend.generate(
        "txt2img", {**SMALL, **SD15, "prompt": "a cat <lora:style:0.8>, <lora:face:0.5>"}
    )
    lora = models_dir / "models" / "Lora"
    style, face = (
        hash_file(lora / p).autov3 for p in ("style.safetensors", "people/face.safetensors")
    )
    text = infotext(result)
    assert text.startswith("a cat <lora:style:0.8>, <lora:face:0.5>\n")  # the prompt as sent
    assert f'Lora hashes: "style: {style}, face: {face}", Version: ' in text
    assert "Lora hashes" not in infotext(await backend.generate("txt2img", {**SMALL, **SD15}))


async def test_loaded_loras_are_bounded_and_an_evicted_one_comes_back_the_same(
    backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters, "MAX_ADAPTERS", 1)
    styled = await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a <lora:style:1>"})
    both = await backend.generate(
        "txt2img", {**SMALL, **SD15, "prompt": "a <lora:style:1> <lora:face:1>"}
    )  # one job's own LoRAs are never evicted for each other
    await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a <lora:face:1>"})
    again = await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a <lora:style:1>"})
    pipe = backend.models.get("tiny15").pipe
    assert [len(names) for names in pipe.get_list_adapters().values()] == [1, 1]  # unet, te
    assert differ(again, styled) == 0 and differ(both, styled) > 0


def base_weights(pipe: Any) -> dict[str, Any]:
    """The UNet's and text encoder's own weights (peft's `base_layer`s), copied."""
    parts = {"unet": pipe.unet, "te": pipe.text_encoder}
    return {
        f"{part}.{name.replace('.base_layer', '')}": p.detach().clone()
        for part, model in parts.items()
        for name, p in model.named_parameters()
        if "lora_" not in name
    }


def changed(before: dict[str, Any], pipe: Any) -> set[str]:
    now = base_weights(pipe)
    return {name for name, p in before.items() if not torch.equal(p, now[name])}


async def test_a_jobs_loras_are_merged_into_the_weights_while_it_runs_and_exactly_undone_after(
    backend: DiffusersBackend, models_dir: Path
) -> None:
    fresh = await backend.generate("txt2img", {**SMALL, **SD15})
    pipe = backend.models.get("tiny15").pipe
    before = base_weights(pipe)
    uses = lora.parse_uses("<lora:style:0.7> <lora:face:1:0.5>")
    with adapters.fused(pipe, models_dir / "models", uses):
        merged = changed(before, pipe)
    assert any(n.startswith("unet.") for n in merged) and any(n.startswith("te.") for n in merged)
    assert changed(before, pipe) == set()  # bit for bit, not W + d - d
    styled = await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a <lora:style:0.7>"})
    after = await backend.generate("txt2img", {**SMALL, **SD15})
    assert differ(styled, fresh) > 10 and differ(after, fresh) == 0
    assert changed(before, pipe) == set()


async def test_an_unknown_or_unsupported_lora_fails_the_job_naming_it(
    backend: DiffusersBackend,
) -> None:
    with pytest.raises(BackendRejected, match=r"LoRA 'styel' not found.*did you mean style"):
        await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a <lora:styel:1>"})
    with pytest.raises(BackendRejected, match=r"LoRA 'loha' is a LyCORIS LoHa"):
        await backend.generate("txt2img", {**SMALL, **SD15, "prompt": "a <lora:loha:1>"})


async def test_an_sdxl_lora_applies_to_both_text_encoders_and_the_unet(
    backend: DiffusersBackend,
) -> None:
    base = await backend.generate("txt2img", {**SMALL, **XL})
    te = await backend.generate("txt2img", {**SMALL, **XL, "prompt": "a cat <lora:xlstyle:1:0>"})
    unet = await backend.generate("txt2img", {**SMALL, **XL, "prompt": "a cat <lora:xlstyle:0:1>"})
    assert differ(te, base) > 10 and differ(unet, base) > 10
    assert differ(await backend.generate("txt2img", {**SMALL, **XL}), base) == 0


def sketch_b64() -> str:
    image = Image.new("RGB", (96, 64), "white")  # not the job's size: resized by the unit
    ImageDraw.Draw(image).ellipse((20, 8, 76, 56), outline="black", width=3)
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def controlnet(*units: dict[str, Any], key: str = "ControlNet") -> dict[str, Any]:
    return {"alwayson_scripts": {key: {"args": list(units)}}}


SCRIBBLE = {
    "enabled": True,
    "module": "invert (from white bg & black line)",
    "model": "tiny_scribble",
    "image": sketch_b64(),
}


async def test_a_scribble_unit_steers_the_image_and_weight_0_gives_the_base_image(
    backend: DiffusersBackend,
) -> None:
    base = await backend.generate("txt2img", {**SMALL, **SD15})
    steered = await backend.generate("txt2img", {**SMALL, **SD15, **controlnet(SCRIBBLE)})
    off = await backend.generate(
        "txt2img", {**SMALL, **SD15, **controlnet({**SCRIBBLE, "weight": 0}, key="controlnet")}
    )
    assert differ(steered, base) > 20 and differ(off, base) <= 1
    assert 'ControlNet 0: "Module: invert, Model: tiny_scribble, Weight: 1.0' in infotext(steered)


async def test_controlnet_steers_hires_fixs_second_pass_too(
    backend: DiffusersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import ControlNetModel

    calls: list[tuple[int, ...]] = []
    forward = ControlNetModel.forward

    def counted(self: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(sample.shape[-2:]))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", counted)
    hires = {
        "enable_hr": True,
        "hr_scale": 2,
        "hr_upscaler": "Lanczos",
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.5,
    }
    result = await backend.generate("txt2img", {**SMALL, **SD15, **hires, **controlnet(SCRIBBLE)})
    assert Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).size == (128, 128)
    assert calls == [(8, 8)] * 3 + [(16, 16)] * 2  # every step of both passes, at each size


async def test_a_single_file_controlnet_in_a1111s_layout_steers_like_its_diffusers_folder(
    backend: DiffusersBackend,
) -> None:
    folder = await backend.generate("txt2img", {**SMALL, **SD15, **controlnet(SCRIBBLE)})
    title = next(
        m
        for m in (await backend.catalogue_entry("controlnet-model_list"))["model_list"]
        if m.startswith("a1111_scribble [")
    )
    single = await backend.generate(
        "txt2img", {**SMALL, **SD15, **controlnet({**SCRIBBLE, "model": title})}
    )
    assert differ(single, folder) <= 1


async def test_the_detected_map_is_appended_unless_save_detected_map_is_false(
    backend: DiffusersBackend,
) -> None:
    result = await backend.generate(
        "txt2img", {**SMALL, **SD15, "batch_size": 2, **controlnet(SCRIBBLE)}
    )
    assert len(result["images"]) == 3 and len(json.loads(result["info"])["infotexts"]) == 2
    detected = Image.open(io.BytesIO(base64.b64decode(result["images"][2])))
    assert detected.size == (64, 64) and "parameters" not in detected.text
    drawn = np.asarray(detected.convert("L"))
    assert drawn.mean() < 60 and drawn.max() > 200  # white lines on black: the sketch inverted
    quiet = await backend.generate(
        "txt2img", {**SMALL, **SD15, **controlnet({**SCRIBBLE, "save_detected_map": False})}
    )
    assert len(quiet["images"]) == 1


async def test_two_units_run_at_once_with_their_own_modules_and_control_modes(
    backend: DiffusersBackend,
) -> None:
    canny = {
        **SCRIBBLE,
        "module": "canny",
        "model": "tiny_canny",
        "threshold_a": 50,
        "threshold_b": 100,
        "control_mode": "ControlNet is more important",
    }
    one = await backend.generate("txt2img", {**SMALL, **SD15, **controlnet(SCRIBBLE)})
    both = await backend.generate("txt2img", {**SMALL, **SD15, **controlnet(SCRIBBLE, canny)})
    prompt_first = await backend.generate(
        "txt2img", {**SMALL, **SD15, **controlnet(SCRIBBLE, {**canny, "control_mode": 1})}
    )
    assert len(both["images"]) == 3 and differ(both, one) > 10 and differ(prompt_first, both) > 0
    assert 'ControlNet 1: "Module: canny, Model: tiny_canny' in infotext(both)
    assert "Control Mode: ControlNet is more important" in infotext(both)
    same_twice = await backend.generate(
        "txt2img", {**SMALL, **SD15, **controlnet(SCRIBBLE, {**SCRIBBLE, "control_mode": 2})}
    )
    assert len(same_twice["images"]) == 3


async def test_img2img_steers_with_the_init_image_when_the_unit_has_none(
    backend: DiffusersBackend,
) -> None:
    body = {**SMALL, **SD15, "init_images": [sketch_b64()], "denoising_strength": 0.9}
    plain = await backend.generate("img2img", body)
    steered = await backend.generate("img2img", {**body, **controlnet({**SCRIBBLE, "image": None})})
    assert len(steered["images"]) == 2 and differ(steered, plain) > 10


async def test_an_sdxl_checkpoint_takes_an_sdxl_controlnet_and_refuses_an_sd15_one(
    backend: DiffusersBackend,
) -> None:
    base = await backend.generate("txt2img", {**SMALL, **XL})
    unit = {**SCRIBBLE, "module": "canny", "model": "xl_canny", "threshold_a": 50}
    assert differ(await backend.generate("txt2img", {**SMALL, **XL, **controlnet(unit)}), base) > 10
    with pytest.raises(BackendRejected, match=r"tiny_scribble.*does not fit the loaded checkpoint"):
        await backend.generate("txt2img", {**SMALL, **XL, **controlnet(SCRIBBLE)})


async def test_an_unknown_controlnet_model_fails_the_job_listing_the_known_ones(
    backend: DiffusersBackend,
) -> None:
    with pytest.raises(
        BackendRejected, match=r"'tiny_scribel' not found.*tiny_canny.*tiny_scribble"
    ):
        await backend.generate(
            "txt2img", {**SMALL, **SD15, **controlnet({**SCRIBBLE, "model": "tiny_scribel"})}
        )
    with pytest.raises(
        BackendRejected, match=r"control_v11p_sd15_canny.pth\); the diffusers engine never"
    ):
        await backend.generate(
            "txt2img",
            {
                **SMALL,
                **SD15,
                **controlnet({**SCRIBBLE, "model": "control_v11p_sd15_canny [d14c016b]"}),
            },
        )
    with pytest.raises(BackendRejected, match=r"args\[0\].image: the ControlNet unit is enabled"):
        await backend.generate(
            "txt2img", {**SMALL, **SD15, **controlnet({**SCRIBBLE, "image": ""})}
        )


async def test_the_controlnet_and_lora_catalogue_routes_answer_from_the_engine(
    backend: DiffusersBackend, sqlite_url: str, settings_for: Any
) -> None:
    db = Database(sqlite_url)
    try:
        await CatalogueKeeper(CatalogueStore(db)).fetch_all([backend])
    finally:
        await db.dispose()
    settings = settings_for(database_url=sqlite_url, backend="diffusers")
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, headers=ASYNC) as api:
        models = api.get("/controlnet/model_list").json()["model_list"]
        assert [m.split(" [")[0] for m in models] == [
            "a1111_scribble",
            "tiny_canny",
            "tiny_scribble",
            "xl_canny",
        ]
        assert all(len(m.split(" [")[1]) == 9 for m in models)  # "name [8 hex digits]"
        modules = api.get("/controlnet/module_list").json()
        assert {"none", "canny", "invert", "scribble_xdog"} <= set(modules["module_list"])
        assert api.get("/controlnet/version").json() == {"version": 2}
        loras = {entry["name"] for entry in api.get("/sdapi/v1/loras").json()}
        assert {"style", "face", "xlstyle"} <= loras
        refused = api.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "x", **controlnet({**SCRIBBLE, "module": "depth_midas"})},
        )
        assert refused.status_code == 422
        assert "depth_midas" in refused.json()["detail"][0]["msg"]
        detect = {"controlnet_module": "depth_midas", "controlnet_input_images": [sketch_b64()]}
        refused = api.post("/controlnet/detect", json=detect)
        assert refused.status_code == 422 and "depth_midas" in refused.json()["detail"][0]["msg"]
        refused = api.post("/sdapi/v1/interrogate", json={"image": sketch_b64()})
        assert refused.status_code == 422
        assert "interrogate is not supported by the diffusers engine" in refused.text


async def test_controlnet_detect_runs_the_preprocessor_at_its_resolution(
    backend: DiffusersBackend,
) -> None:
    body = {
        "controlnet_module": "canny",
        "controlnet_input_images": [sketch_b64()] * 2,
        "controlnet_processor_res": 128,
        "controlnet_threshold_a": 50,
    }
    result = await backend.generate("controlnet-detect", body)
    assert result["info"] == "Success" and len(result["images"]) == 2
    edges = Image.open(io.BytesIO(base64.b64decode(result["images"][0])))
    assert edges.size == (192, 128)  # the short side at processor_res
    assert set(np.unique(np.asarray(edges))) == {0, 255}
    with pytest.raises(BackendRejected, match="controlnet_input_images must be a non-empty list"):
        await backend.generate("controlnet-detect", {"controlnet_module": "canny"})
