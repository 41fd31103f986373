"""The engine's plain-Python half: request parsing, sampler names, seeds, infotext, the
checkpoint catalogue, prompt syntax. None of this needs torch (the API's 422 for what the engine
cannot run is in tests/integration/test_engine_api.py)."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from a1111_proxy.engine.catalog import Catalog, architecture
from a1111_proxy.engine.errors import InvalidParams, UnknownSampler
from a1111_proxy.engine.infotext import Generation, ModelInfo
from a1111_proxy.engine.params import Params
from a1111_proxy.engine.prompts import Found, chunks, parse_attention
from a1111_proxy.engine.samplers import resolve


def params(kind: str = "txt2img", **body: object) -> Params:
    return Params.from_payload(kind, {"prompt": "a cat", **body}, rng=random.Random(0))


def test_sampler_names_resolve_like_a1111_with_suffixes_aliases_and_automatic() -> None:
    assert resolve("DPM++ 2M Karras").schedule == "karras"
    assert resolve("DPM++ 2M Karras").schedule_label == "Karras"  # A1111 names the default
    assert resolve("DPM++ 2M", "Exponential").schedule_label == "Exponential"
    assert resolve("k_euler_a").sampler.name == "Euler a"
    assert resolve("Euler", "sgm uniform").schedule == "sgm_uniform"
    assert resolve(None).sampler.name == "Euler"


def test_an_unknown_sampler_is_refused_with_the_valid_names() -> None:
    with pytest.raises(UnknownSampler, match=r"unknown sampler 'Nope'.*DPM\+\+ 2M.*Euler a"):
        resolve("Nope")
    with pytest.raises(UnknownSampler, match="no diffusers equivalent"):
        resolve("DDIM CFG++")
    with pytest.raises(UnknownSampler, match="unknown schedule type 'Karras Exp'"):
        resolve("Euler", "Karras Exp")


def test_a_timestep_sampler_refuses_a_sigma_schedule() -> None:
    with pytest.raises(UnknownSampler, match="'PLMS' cannot use the 'Karras' schedule"):
        resolve("PLMS", "karras")


def test_seeds_are_seed_plus_index_unless_a_variation_strength_is_set() -> None:
    p = params(seed=100, batch_size=2, n_iter=3)
    assert p.all_seeds() == [100, 101, 102, 103, 104, 105]
    v = params(seed=100, subseed=7, subseed_strength=0.3, batch_size=2)
    assert v.all_seeds() == [100, 100] and v.all_subseeds() == [7, 8]


def test_a_random_seed_is_fixed_once_per_job() -> None:
    p = params(seed=-1)
    assert 0 <= p.seed < 4294967294 and p.all_seeds() == [p.seed]


def test_width_and_height_must_be_multiples_of_8_and_the_message_says_what_to_use() -> None:
    with pytest.raises(
        InvalidParams, match=r"width must be a multiple of 8.*got 500.*try 496 or 504"
    ):
        params(width=500)
    with pytest.raises(InvalidParams, match="height"):
        params(height=60)


def test_unsupported_features_are_refused_by_name() -> None:
    for field, value in [
        ("restore_faces", True),
        ("script_name", "x/y/z plot"),
    ]:
        with pytest.raises(InvalidParams, match=field):
            params(**{field: value})
    with pytest.raises(InvalidParams, match="hypernet"):
        params(prompt="a cat <hypernet:foo:0.7>")
    with pytest.raises(InvalidParams, match="ADetailer"):
        params(alwayson_scripts={"ADetailer": {"args": [True]}})
    params(alwayson_scripts={"ControlNet": {"args": []}})  # what webuiapi sends: fine


def test_the_body_webuiapi_sends_is_accepted() -> None:
    body = {
        "enable_hr": False,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "hr_checkpoint_name": None,
        "hr_sampler_name": None,
        "hr_scheduler": None,
        "hr_prompt": "",
        "hr_negative_prompt": "",
        "denoising_strength": 0.7,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "prompt": "a cat",
        "styles": [],
        "seed": 1234,
        "subseed": -1,
        "subseed_strength": 0.0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 20,
        "cfg_scale": 7.0,
        "width": 512,
        "height": 512,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "sampler_name": "Euler a",
        "scheduler": "automatic",
        "sampler_index": "Euler a",
        "script_name": None,
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {"ControlNet": {"args": []}},
    }
    p = Params.from_payload("txt2img", body)
    assert p.sampler.sampler.name == "Euler a" and p.seed_resize_from_w == -1 and p.eta == 1.0
    i2i = Params.from_payload(
        "img2img",
        {
            "prompt": "x",
            "init_images": ["aGk="],
            "mask": "aGk=",
            "mask_blur": None,
            "mask_blur_x": None,
            "inpainting_fill": 0,
            "inpaint_full_res": True,
        },
    )
    assert (i2i.mask_blur_x, i2i.mask_blur_y, i2i.inpainting_fill) == (4, 4, 0)


def test_override_settings_choose_checkpoint_clip_skip_and_rng() -> None:
    p = params(
        override_settings={
            "sd_model_checkpoint": "m [abc]",
            "CLIP_stop_at_last_layers": 2,
            "randn_source": "CPU",
            "eta_noise_seed_delta": 31337,
        }
    )
    assert (p.checkpoint, p.clip_skip, p.randn_source, p.eta_noise_seed_delta) == (
        "m [abc]",
        2,
        "CPU",
        31337,
    )
    assert params(override_settings={"randn_source": "NV"}).randn_source == "NV"
    with pytest.raises(InvalidParams, match=r"randn_source 'XPU'.*'NV'"):
        params(override_settings={"randn_source": "XPU"})


def test_parameters_echo_the_request_with_a1111_defaults_in_order() -> None:
    p = params(seed="42", steps=20.0, unknown_field=1)
    echoed = p.parameters
    assert list(echoed)[:5] == ["prompt", "negative_prompt", "styles", "seed", "subseed"]
    assert echoed["seed"] == 42 and echoed["steps"] == 20 and echoed["sampler_index"] == "Euler"
    assert echoed["denoising_strength"] is None and "unknown_field" not in echoed
    i2i = params("img2img", init_images=["aGk="], mask="aGk=")
    assert i2i.parameters["init_images"] is None and i2i.parameters["mask"] is None
    assert "enable_hr" not in i2i.parameters and i2i.parameters["denoising_strength"] == 0.75


def test_img2img_refuses_image_urls_and_out_of_range_strength() -> None:
    with pytest.raises(InvalidParams, match="does not fetch image URLs"):
        params("img2img", init_images=["https://example.com/a.png"])
    with pytest.raises(InvalidParams, match="denoising_strength"):
        params("img2img", init_images=["aGk="], denoising_strength=1.5)


def test_infotext_matches_a1111s_format() -> None:
    p = params(
        negative_prompt="blurry, low",
        seed=1234,
        steps=20,
        sampler_name="Euler a",
        override_settings={"CLIP_stop_at_last_layers": 2},
    )
    gen = Generation(p, ModelInfo("v1-5-pruned", "6ce0161689"), [1234], [99])
    assert gen.infotext(0) == (
        "a cat\nNegative prompt: blurry, low\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 1234, "
        "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned, Clip skip: 2, "
        "Version: a1111-proxy-0.1.0"
    )
    gen.extra["Lora hashes"] = "a: 1, b: 2"
    assert 'Lora hashes: "a: 1, b: 2"' in gen.infotext(0)
    info = json.loads(gen.info(1))
    assert list(info)[:8] == [
        "prompt",
        "all_prompts",
        "negative_prompt",
        "all_negative_prompts",
        "seed",
        "all_seeds",
        "subseed",
        "all_subseeds",
    ]
    assert info["infotexts"] == [gen.infotext(0)] and info["sd_model_hash"] == "6ce0161689"


def test_infotext_omits_an_empty_negative_prompt() -> None:
    gen = Generation(params(seed=1), ModelInfo("m", None), [1], [2])
    assert gen.infotext(0).split("\n")[1].startswith("Steps: 50, Sampler: Euler, ")
    assert "Model hash" not in gen.infotext(0)


def test_prompt_attention_follows_a1111s_doctests() -> None:
    parsed = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [
        ("a ", 1.0),
        ("house", 1.573),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641),
        (".", 1.1),
    ]
    assert [(t, round(w, 4)) for t, w in parsed] == expected
    assert parse_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1), ("b", 1.0)]


def test_chunks_are_75_tokens_with_break_and_comma_backtrack() -> None:
    parsed = [("x", 1.0), ("BREAK", -1), ("y", 2.0)]
    out = chunks(parsed, [[5, 6], [], [7]], bos=1, eos=2, comma=None)
    assert len(out) == 2 and len(out[0].ids) == 77 and out[0].ids[:4] == [1, 5, 6, 2]
    assert out[1].weights[:3] == [1.0, 2.0, 1.0]
    tokens = [10] * 70 + [3] + [11] * 10  # a comma at 70, then 10 words: they move on together
    out = chunks([("long", 1.0)], [tokens], bos=1, eos=2, comma=3)
    assert out[0].ids[1:73] == [10] * 70 + [3] + [2] and out[1].ids[1:11] == [11] * 10


def find_emb(tokens: Sequence[int], position: int) -> Found | None:
    """An embedding named by the tokens 8, 9, with 3 vectors."""
    return Found("emb", 2, 3) if list(tokens[position : position + 2]) == [8, 9] else None


def test_an_embedding_takes_as_many_positions_as_vectors_all_in_one_chunk() -> None:
    parsed = [("x", 1.0), ("y", 1.3)]
    out = chunks(parsed, [[5] * 72, [8, 9, 6]], bos=1, eos=2, comma=None, find=find_emb)
    assert out[0].ids[73:76] == [0, 0, 0] and out[0].weights[73:76] == [1.3] * 3  # fits: 75
    assert out[0].fixes == ((72, "emb"),) and out[1].ids[:3] == [1, 6, 2]
    out = chunks(parsed, [[5] * 73, [8, 9, 6]], bos=1, eos=2, comma=None, find=find_emb)
    assert out[0].ids[73:] == [5, 2, 2, 2] and out[0].fixes == ()  # 2 places left: it moves on
    assert out[1].ids[:6] == [1, 0, 0, 0, 6, 2] and out[1].fixes == ((0, "emb"),)


def test_a_comma_backtrack_moves_an_embeddings_positions_but_not_its_vectors_as_in_a1111() -> None:
    # sd_hijack_clip.tokenize_line moves the tokens after the last comma to the next chunk and
    # leaves chunk.fixes where they were: the vectors land on the first chunk's padding.
    tokens = [5] * 60 + [3, 8, 9] + [5] * 11 + [7]
    out = chunks([("x", 1.0)], [tokens], bos=1, eos=2, comma=3, find=find_emb)
    assert out[0].ids[1:63] == [5] * 60 + [3, 2] and out[0].fixes == ((61, "emb"),)
    assert out[1].ids[1:16] == [0, 0, 0, *[5] * 11, 7] and out[1].fixes == ()


def write_safetensors_header(path: Path, tensors: dict[str, list[int]]) -> None:
    header = {
        k: {"dtype": "F16", "shape": shape, "data_offsets": [0, 0]} for k, shape in tensors.items()
    }
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_the_catalog_finds_checkpoints_by_a1111s_aliases(tmp_path: Path) -> None:
    root = tmp_path / "Stable-diffusion"
    write_safetensors_header(root / "sub" / "dream.safetensors", {})
    write_safetensors_header(root / "base.safetensors", {})
    (root / "folder").mkdir()
    (root / "folder" / "model_index.json").write_text("{}")
    catalog = Catalog(tmp_path)
    assert [c.name for c in catalog.checkpoints] == [
        "base.safetensors",
        "folder",
        "sub/dream.safetensors",
    ]
    dream = catalog.find("sub_dream")
    assert catalog.find("sub/dream.safetensors [0123456789]") == dream == catalog.find("dream")
    sha = catalog.sha256(dream)
    assert sha is not None and catalog.find(sha[:10]) == dream
    assert catalog.find(None).name == "base.safetensors"
    with pytest.raises(
        InvalidParams, match=r"no checkpoint named 'nope'.*available: base.safetensors"
    ):
        catalog.find("nope")


def test_the_architecture_comes_from_the_weights(tmp_path: Path) -> None:
    root = tmp_path / "Stable-diffusion"
    te1 = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    write_safetensors_header(root / "a.safetensors", {te1: [77, 768], unet_in: [320, 4, 3, 3]})
    write_safetensors_header(root / "b.safetensors", {te1: [77, 768], unet_in: [320, 9, 3, 3]})
    write_safetensors_header(
        root / "c.safetensors",
        {"conditioner.embedders.1.model.positional_embedding": [77, 1280], unet_in: [320, 4, 3, 3]},
    )
    write_safetensors_header(
        root / "d.safetensors", {"cond_stage_model.model.token_embedding.weight": [1]}
    )
    found = {c.name: c for c in Catalog(tmp_path).checkpoints}
    assert architecture(found["a.safetensors"]) == "sd15"
    assert architecture(found["b.safetensors"]) == "sd15_inpaint"
    assert architecture(found["c.safetensors"]) == "sdxl"
    with pytest.raises(InvalidParams, match=r"Stable Diffusion 2\.x"):
        architecture(found["d.safetensors"])


def test_a_pickled_checkpoint_is_refused_without_being_opened(tmp_path: Path) -> None:
    path = tmp_path / "Stable-diffusion" / "old.ckpt"
    path.parent.mkdir()
    path.write_bytes(b"\x80\x04not really a pickle")
    path.chmod(0)  # unreadable: proves nothing opens it
    try:
        [checkpoint] = Catalog(tmp_path).checkpoints
        with pytest.raises(
            InvalidParams, match=r"old.ckpt is a pickled checkpoint.*never unpickles"
        ):
            architecture(checkpoint)
    finally:
        path.chmod(0o644)


def test_the_api_and_the_request_checks_never_import_torch() -> None:
    code = (
        "import sys, a1111_proxy.app, a1111_proxy.engine.params as p, a1111_proxy.engine.catalog; "
        "assert p.problems('txt2img', {'width': 500}); "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cpu_offload_is_chosen_only_when_the_free_gpu_memory_cannot_hold_model_and_work() -> None:
    pytest.importorskip("torch", reason="the engine's model loader needs the engine extra")
    from a1111_proxy.engine.models import vram_is_short

    gib = 2**30
    assert not vram_is_short(5 * gib, 24 * gib)  # SDXL fp16 on a 24 GB card
    assert vram_is_short(5 * gib, 7 * gib)  # ... on an 8 GB card with 7 free
    assert vram_is_short(2 * gib, 3 * gib)  # SD1.5 needs at least 2 GiB of room besides


def test_the_cpu_offload_setting_takes_auto_or_a_boolean_in_any_usual_spelling() -> None:
    from a1111_proxy.settings import Settings

    for given, meant in (("auto", "auto"), ("True", "true"), ("0", "false"), ("no", "false")):
        assert Settings(_env_file=None, engine_cpu_offload=given).engine_cpu_offload == meant
    with pytest.raises(ValueError, match="engine_cpu_offload"):
        Settings(_env_file=None, engine_cpu_offload="sometimes")
