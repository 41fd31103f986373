"""LoRA tags, ControlNet units and the weight-free preprocessors, as plain functions (numpy and
scipy only; no torch, no models)."""

from __future__ import annotations

import subprocess
import sys

import pytest

np = pytest.importorskip("numpy", reason="the preprocessors need the engine extra (numpy)")
pytest.importorskip("scipy", reason="the preprocessors need the engine extra (scipy)")

from PIL import Image, ImageDraw  # noqa: E402

from a1111_proxy.engine import preprocessors  # noqa: E402
from a1111_proxy.engine.controlnet import (  # noqa: E402
    IP_ADAPTER_MODULES,
    MODULES,
    ControlNetCatalog,
    parse_units,
)
from a1111_proxy.engine.errors import InvalidParams  # noqa: E402
from a1111_proxy.engine.lora import LoraUse, parse_uses, strip_tags  # noqa: E402
from a1111_proxy.engine.params import Params, problems  # noqa: E402


def square(size: int = 64, low: int = 40, high: int = 200) -> np.ndarray:
    image = np.full((size, size, 3), low, dtype=np.uint8)
    image[16:48, 16:48] = high
    return image


def test_canny_marks_a_squares_outline_and_nothing_inside_or_outside() -> None:
    edges = preprocessors.canny(square(), 100, 200)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    gray = edges[..., 0]
    assert gray[20:44, 20:44].max() == 0 and gray[:12].max() == 0 and gray[52:].max() == 0
    for row in (24, 32, 40):  # the left and right sides, each a line one or two pixels wide
        lit = np.flatnonzero(gray[row])
        assert 1 <= len(lit[lit < 32]) <= 2 and 1 <= len(lit[lit >= 32]) <= 2
        assert abs(lit[0] - 16) <= 1 and abs(lit[-1] - 47) <= 1


def test_canny_thresholds_decide_which_edges_count() -> None:
    faint = square(low=100, high=130)  # an L1 Sobel step of about 4 x 30 = 120
    assert preprocessors.canny(faint, 50, 100).max() == 255
    assert preprocessors.canny(faint, 150, 250).max() == 0


def sketch() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 50, 50), outline="black", width=3)
    return image


def test_scribble_preprocessors_turn_black_lines_on_white_into_white_lines_on_black() -> None:
    drawn = np.asarray(sketch())
    line = drawn[..., 0] < 128
    for name, a in (("invert", -1), ("threshold", 127), ("scribble_xdog", 32)):
        out = preprocessors.PREPROCESSORS[name](drawn, a, -1)[..., 0]
        if name == "threshold":
            out = 255 - out  # threshold keeps what is bright: the paper
        assert out[line].mean() > 200 and out[~line].mean() < 40, name


def test_lineart_standard_finds_the_lines_without_weights() -> None:
    out = preprocessors.lineart_standard(np.asarray(sketch()), -1, -1)[..., 0]
    line = np.asarray(sketch())[..., 0] < 128
    assert out[line].mean() > 100 and out[~line].mean() < 20


def test_detected_maps_fit_the_generation_size_by_the_units_resize_mode() -> None:
    wide = Image.new("RGB", (128, 64), "white")
    assert preprocessors.fit(wide, 0, 64, 64).size == (64, 64)
    assert preprocessors.fit(wide, 1, 64, 64).size == (64, 64)
    filled = preprocessors.fit(wide, 2, 64, 64)
    assert filled.size == (64, 64) and filled.getpixel((32, 5)) == (255, 255, 255)
    assert preprocessors.pixel_perfect_resolution(wide, 1, 64, 64) == 64
    assert preprocessors.pixel_perfect_resolution(wide, 2, 64, 64) == 32
    edges = Image.fromarray(preprocessors.canny(square(), 100, 200))
    assert set(np.unique(np.asarray(preprocessors.fit(edges, 0, 96, 96)))) <= {0, 255}


def test_lora_tags_take_a1111s_forms_and_leave_the_prompt_text() -> None:
    prompt = "a cat <lora:style:0.7>, <lora:sub/te:0.5:1.5> <LoRA:x> <lyco:y:unet=0.2:te=0.1>"
    assert parse_uses(prompt) == (
        LoraUse("style", 0.7, 0.7),
        LoraUse("sub/te", 0.5, 1.5),
        LoraUse("x", 1.0, 1.0),
        LoraUse("y", 0.1, 0.2),
    )
    assert strip_tags(prompt) == "a cat ,   "
    with pytest.raises(InvalidParams, match=r"<lora:bad:heavy>.*'heavy' is not a number"):
        parse_uses("<lora:bad:heavy>")


def test_hypernetworks_are_refused_but_lora_and_disabled_networks_are_not() -> None:
    assert problems("txt2img", {"prompt": "a <hypernet:h:1>"})[0].startswith(
        "extra networks such as '<hypernet:h:1>'"
    )
    assert problems("txt2img", {"prompt": "a <lora:l:1>"}) == []
    p = Params.from_payload("txt2img", {"prompt": "<lora:l:1>", "disable_extra_networks": True})
    assert p.loras == ()


def unit(**fields: object) -> dict[str, object]:
    return {"enabled": True, "module": "canny", "model": "m", "image": "aGk=", **fields}


def test_controlnet_units_are_read_as_the_extension_reads_them() -> None:
    units = parse_units(
        {
            "controlNET": {
                "args": [
                    unit(),
                    {
                        "enabled": False,
                        "module": "depth_midas",
                    },  # disabled: ignored, even unsupported
                    unit(
                        module="invert (from white bg & black line)",
                        input_image="aGk=",
                        image=None,
                        control_mode="ControlNet is more important",
                        resize_mode="Just Resize",
                        guidance=0.5,
                        weight="0.5",
                    ),
                    unit(control_mode=1, resize_mode=2, module="SCRIBBLE_XDOG", threshold_a=40),
                ]
            }
        }
    )
    assert [u.index for u in units] == [0, 2, 3]
    first, second, third = units
    assert (first.module.name, first.resize_mode, first.control_mode) == ("canny", 1, 0)
    assert first.slider(0) == 100 and first.slider(1) == 200 and first.resolution() == 512
    assert (second.module.name, second.control_mode, second.resize_mode) == ("invert", 2, 0)
    assert second.image == "aGk=" and second.guidance_end == 0.5 and second.weight == 0.5
    assert (third.module.name, third.control_mode, third.resize_mode) == ("scribble_xdog", 1, 2)
    assert third.slider(0) == 40
    assert parse_units({"ControlNet": {"args": []}}) == () and parse_units(None) == ()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"module": "depth_midas"}, r"module 'depth_midas' is not available.*canny.*'none'"),
        ({"model": "None"}, r"args\[0\].model: the unit is enabled but has no model"),
        ({"control_mode": "Loud"}, r"args\[0\].control_mode 'Loud' is not one of 'Balanced'"),
        ({"resize_mode": "Stretch"}, r"args\[0\].resize_mode 'Stretch'"),
        ({"weight": "heavy"}, r"args\[0\].weight must be a number"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, r"0 <= start <= end <= 1"),
    ],
)
def test_a_bad_unit_is_refused_naming_the_field_and_what_to_send(
    fields: dict[str, object], message: str
) -> None:
    body = {"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": [unit(**fields)]}}}
    [found] = problems("txt2img", body)
    assert found.startswith("alwayson_scripts.ControlNet") or "module" in found
    with pytest.raises(InvalidParams, match=message):
        Params.from_payload("txt2img", body)


def test_the_module_list_names_only_preprocessors_the_engine_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    answer = ControlNetCatalog(tmp_path).module_list()
    assert answer["module_list"] == [m.name for m in MODULES] + list(IP_ADAPTER_MODULES)
    assert set(m.name for m in MODULES) == set(preprocessors.PREPROCESSORS)
    assert answer["module_detail"]["canny"]["sliders"][1]["name"] == "Canny Low Threshold"
    assert ControlNetCatalog(tmp_path).version() == {"version": 2}


def test_ip_adapter_units_are_image_prompts_with_all_their_images() -> None:
    ip = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15"}
    scribble = unit()
    body = {
        "prompt": "x",
        "alwayson_scripts": {
            "controlnet": {"args": [scribble, {**ip, "image": ["AAAA", {"image": "BBBB"}]}]}
        },
    }
    params = Params.from_payload("txt2img", body)
    assert [u.index for u in params.controlnet_units] == [0]
    (prompt,) = params.image_prompts
    assert prompt.index == 1 and prompt.images == ("AAAA", "BBBB") and prompt.encoder == "ViT-H"
    assert prompt.active(0, 4) and prompt.active(3, 4)
    late = {**ip, "guidance_start": 0.5, "guidance_end": 0}
    [found] = problems("txt2img", {"alwayson_scripts": {"controlnet": {"args": [late]}}})
    assert "guidance_start and guidance_end must satisfy" in found
    face = {**ip, "module": "ip-adapter_face_id"}
    [found] = problems("txt2img", {"alwayson_scripts": {"controlnet": {"args": [face]}}})
    assert "ip-adapter_face_id" in found and "ip-adapter_clip_sdxl" in found


def test_checking_lora_and_controlnet_requests_needs_neither_torch_nor_numpy() -> None:
    code = (
        "import sys, a1111_proxy.engine.params as p; "
        "unit = {'enabled': True, 'module': 'canny', 'model': 'm', 'image': 'aGk='}; "
        "assert p.problems('txt2img', {'prompt': 'a <lora:x:1>', "
        "'alwayson_scripts': {'ControlNet': {'args': [unit]}}}) == []; "
        "heavy = {'torch', 'diffusers', 'numpy', 'scipy'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_controlnet_with_dpm_adaptive_is_refused_naming_the_samplers_that_run_it() -> None:
    scripts = {"controlnet": {"args": [unit()]}}
    found = problems(
        "txt2img", {"prompt": "a", "sampler_name": "DPM adaptive", "alwayson_scripts": scripts}
    )
    assert found and "DPM adaptive" in found[0] and "DPM fast" in found[0]
    hires = {"enable_hr": True, "hr_sampler_name": "DPM adaptive", "alwayson_scripts": scripts}
    assert problems("txt2img", {"prompt": "a", **hires})
    assert (
        problems(
            "txt2img", {"prompt": "a", "sampler_name": "DPM fast", "alwayson_scripts": scripts}
        )
        == []
    )
