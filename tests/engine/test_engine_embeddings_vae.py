"""Textual-inversion embeddings and `sd_vae` on the bundled engine, against A1111 v1.10's own
formulas (textual_inversion.py, sd_hijack.py's EmbeddingsWithFixes, sd_hijack_clip.py, sd_vae.py),
on tiny random-weight models on the CPU, offline."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from a1111_proxy.app import create_app  # noqa: E402
from a1111_proxy.backends import BackendRejected  # noqa: E402
from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.catalogue import CatalogueStore  # noqa: E402
from a1111_proxy.db.engine import Database  # noqa: E402
from a1111_proxy.engine import conditioning, embeddings, text  # noqa: E402
from a1111_proxy.hashes import hash_file  # noqa: E402
from tests.fakes import tiny_sd  # noqa: E402
from tests.servers import ASYNC, serve  # noqa: E402
from worker.catalogue import CatalogueKeeper  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

from tests.engine.conftest import cpu_backend  # noqa: E402
from tests.engine.results import infotext, pixels  # noqa: E402

pytestmark = [pytest.mark.engine]
SMALL = {"steps": 3, "width": 64, "height": 64, "seed": 7, "prompt": "a cat"}
SD15 = {"sd_model_checkpoint": "tiny15"}
XL = {"sd_model_checkpoint": "xl"}

# The test embeddings (the tiny models' encoders are 32 wide, SDXL's second one 64).
STYLE = torch.Generator().manual_seed(11)
VECTORS = {
    "tistyle": torch.randn(3, 32, generator=STYLE),  # A1111's .pt, SD1.5
    "tineg": torch.randn(2, 32, generator=STYLE),  # emb_params .safetensors, SD1.5
    "clip_l": torch.randn(2, 32, generator=STYLE),  # tixl: SDXL's pair
    "clip_g": torch.randn(2, 64, generator=STYLE),
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModels) -> Path:
    """MODELS_DIR with the tiny SD1.5 (also as auto15, beside a VAE named after it) and SDXL,
    embeddings in each format, a broken one, and VAE files (one that does not fit)."""
    root = tmp_path_factory.mktemp("ti-vae")
    models = root / "models"
    sd15 = tiny_models.sd15(root / "configs" / "sd15")
    tiny_models.write_single_file(sd15, models / "Stable-diffusion" / "tiny15.safetensors")
    shutil.copyfile(
        models / "Stable-diffusion" / "tiny15.safetensors",
        models / "Stable-diffusion" / "auto15.safetensors",
    )
    xl = tiny_models.sdxl(root / "configs" / "sdxl")
    tiny_models.write_single_file(xl, models / "Stable-diffusion" / "xl.safetensors")
    folder = models / "embeddings"
    (folder / "negatives").mkdir(parents=True)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": VECTORS["tistyle"]},
            "name": "tistyle",
            "step": 500,
            "sd_checkpoint": "abcdef0123",
            "sd_checkpoint_name": "tiny15",
        },
        folder / "tistyle.pt",
    )
    save_file({"emb_params": VECTORS["tineg"]}, str(folder / "negatives" / "tineg.safetensors"))
    save_file({k: VECTORS[k] for k in ("clip_l", "clip_g")}, str(folder / "tixl.safetensors"))
    (folder / "broken.pt").write_bytes(b"not an embedding")
    torch.manual_seed(5)
    tiny_sd.write_single_file_vae(tiny_sd.vae(), models / "VAE" / "other.safetensors")
    torch.manual_seed(6)
    tiny_sd.write_single_file_vae(tiny_sd.vae(), models / "VAE" / "auto15-vae.safetensors")
    save_file(
        {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(models / "VAE" / "bad.safetensors")
    )
    return root


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module-wide, so that one backend (models loaded once) serves every test


@pytest.fixture(scope="module")
async def backend(models_dir: Path) -> AsyncIterator[DiffusersBackend]:
    made = cpu_backend(models_dir, ("sd15", "sdxl"), preview_steps=0)
    yield made
    await made.aclose()


def differ(a: dict[str, Any], b: dict[str, Any]) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


async def run(backend: DiffusersBackend, settings: dict[str, Any], **body: Any) -> dict[str, Any]:
    return await backend.generate("txt2img", {**SMALL, **body, "override_settings": settings})


# --- A1111's reference: EmbeddingsWithFixes ------------------------------------------------


def with_vectors(encoder: Any, tokenizer: Any, pieces: list[Any]) -> tuple[Any, list[int]]:
    """A1111's placement, computed another way: a copy of the encoder whose vocabulary has one
    new token per embedding vector, and the token ids of `pieces` (text, or vectors) as one
    77-token chunk with those new tokens where the vectors go."""
    copied = copy.deepcopy(encoder)
    size = copied.get_input_embeddings().weight.shape[0]
    ids = [tokenizer.bos_token_id]
    for piece in pieces:
        if isinstance(piece, str):
            ids += tokenizer(piece, add_special_tokens=False).input_ids
            continue
        copied.resize_token_embeddings(size + piece.shape[0])
        with torch.no_grad():
            copied.get_input_embeddings().weight[size:] = piece
        ids += list(range(size, size + piece.shape[0]))
        size += piece.shape[0]
    return copied, ids + [tokenizer.eos_token_id] * (77 - len(ids))


@torch.no_grad()
def reference_sd15(pipe: Any, pieces: list[Any]) -> Any:
    encoder, ids = with_vectors(pipe.text_encoder, pipe.tokenizer, pieces)
    return encoder(torch.tensor([ids])).last_hidden_state


@torch.no_grad()
def reference_sdxl(pipe: Any, pieces: list[Any]) -> tuple[Any, Any]:
    """Both encoders' penultimate layer side by side (sd_models_xl), each with its own part
    of the SDXL embedding (clip_l, clip_g), and the second one's pooled output."""
    first = [p if isinstance(p, str) else p["clip_l"] for p in pieces]
    second = [p if isinstance(p, str) else p["clip_g"] for p in pieces]
    encoder_l, ids = with_vectors(pipe.text_encoder, pipe.tokenizer, first)
    encoder_g, ids_g = with_vectors(pipe.text_encoder_2, pipe.tokenizer_2, second)
    out_l = encoder_l(torch.tensor([ids]), output_hidden_states=True)
    out_g = encoder_g(torch.tensor([ids_g]), output_hidden_states=True)
    return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1), out_g.text_embeds


@pytest.fixture(scope="module")
def sd15(models_dir: Path, tiny_models: TinyModels) -> Any:
    return tiny_models.sd15(models_dir / "configs" / "sd15")


@pytest.fixture(scope="module")
def xl(models_dir: Path, tiny_models: TinyModels) -> Any:
    return tiny_models.sdxl(models_dir / "configs" / "sdxl")


def test_an_embeddings_vectors_take_its_names_token_positions_as_in_a1111(
    sd15: Any, models_dir: Path
) -> None:
    words = embeddings.vocabulary(models_dir / "models", sd15, sdxl=False)
    prompt, negative = "a cat tistyle on a mat", "tineg"
    embeds = text.encode(sd15, prompt, negative, clip_skip=1, sdxl=False, vocabulary=words)
    expected = reference_sd15(sd15, ["a cat ", VECTORS["tistyle"], " on a mat"])
    torch.testing.assert_close(embeds.cond, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds.uncond, reference_sd15(sd15, [VECTORS["tineg"]]))
    as_words = text.encode(sd15, prompt, negative, clip_skip=1, sdxl=False)
    assert (as_words.cond - embeds.cond).abs().max() > 0.1


def test_an_sdxl_embedding_gives_each_encoder_its_own_vectors(xl: Any, models_dir: Path) -> None:
    words = embeddings.vocabulary(models_dir / "models", xl, sdxl=True)
    assert set(words.split.loaded) == {"tixl"} and set(words.split.skipped) == {"tineg", "tistyle"}
    embeds = text.encode(xl, "a tixl cat", "", clip_skip=1, sdxl=True, vocabulary=words)
    parts = {k: VECTORS[k] for k in ("clip_l", "clip_g")}
    expected, pooled = reference_sdxl(xl, ["a ", parts, " cat"])
    torch.testing.assert_close(embeds.cond, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds.pooled, pooled, rtol=0, atol=1e-5)
    # An SD1.5 embedding does not fit SDXL: its name stays words.
    skipped = text.encode(xl, "a tistyle cat", "", clip_skip=1, sdxl=True, vocabulary=words)
    plain = text.encode(xl, "a tistyle cat", "", clip_skip=1, sdxl=True)
    torch.testing.assert_close(skipped.cond, plain.cond, rtol=0, atol=0)


def test_an_embedding_that_does_not_fit_the_chunk_starts_the_next_one(
    sd15: Any, models_dir: Path
) -> None:
    words = embeddings.vocabulary(models_dir / "models", sd15, sdxl=False)
    filler = "x" * 73  # 73 one-character tokens: 2 places left, tistyle has 3 vectors
    embeds = text.encode(sd15, f"{filler} tistyle", "", clip_skip=1, sdxl=False, vocabulary=words)
    assert embeds.cond.shape[1] == 2 * 77
    torch.testing.assert_close(embeds.cond[:, :77], reference_sd15(sd15, [filler]))
    second = reference_sd15(sd15, [VECTORS["tistyle"]])
    torch.testing.assert_close(embeds.cond[:, 77:], second, rtol=0, atol=1e-5)


def test_prompt_editing_places_an_embedding_in_the_steps_that_name_it(
    sd15: Any, models_dir: Path
) -> None:
    words = embeddings.vocabulary(models_dir / "models", sd15, sdxl=False)
    edited = conditioning.encode(
        sd15, "a [tistyle:dog:2]", "tineg", steps=4, clip_skip=1, sdxl=False, vocabulary=words
    )
    first = reference_sd15(sd15, ["a ", VECTORS["tistyle"]])
    torch.testing.assert_close(edited.at(0).cond, first, rtol=0, atol=1e-5)
    torch.testing.assert_close(edited.at(3).cond, reference_sd15(sd15, ["a dog"]))
    assert words.ti_hashes is not None
    assert [part.split(":")[0] for part in words.ti_hashes.split(", ")] == ["tistyle", "tineg"]


# --- jobs: TI hashes, the catalogue ---------------------------------------------------------


@pytest.mark.anyio
async def test_ti_hashes_name_the_embeddings_used_as_a1111_writes_them(
    backend: DiffusersBackend, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = models_dir / "models" / "embeddings"
    style = hash_file(folder / "tistyle.pt").sha256[:12]
    neg = hash_file(folder / "negatives" / "tineg.safetensors").sha256[:12]
    xl = hash_file(folder / "tixl.safetensors").sha256[:12]
    used = await run(backend, SD15, prompt="a tistyle cat", negative_prompt="tineg, blurry")
    plain = await run(backend, SD15, prompt="a tistyle cat", negative_prompt="blurry")
    assert differ(used, plain) > 0
    # A1111 encodes the negative first; each call puts its names before those already there.
    assert f'TI hashes: "tistyle: {style}, tineg: {neg}", Version: ' in infotext(used)
    assert "TI hashes" not in infotext(await run(backend, SD15))
    # SDXL: each of its two text encoders adds the names again, as in A1111.
    with caplog.at_level(logging.WARNING, logger="a1111_proxy.engine"):
        sdxl = await run(backend, XL, prompt="a tixl cat, tistyle")
    assert f'TI hashes: "tixl: {xl}, tixl: {xl}", Version: ' in infotext(sdxl)
    assert "the prompt names embedding tistyle, which does not fit this model" in caplog.text


@pytest.mark.anyio
async def test_the_embeddings_and_vae_lists_answer_in_a1111s_shape_through_the_api(
    backend: DiffusersBackend, models_dir: Path, sqlite_url: str, settings_for: Any
) -> None:
    await backend.reload_checkpoint("tiny15")  # A1111 lists for its current model
    db = Database(sqlite_url)
    try:
        await CatalogueKeeper(CatalogueStore(db)).fetch_all([backend])
    finally:
        await db.dispose()
    settings = settings_for(database_url=sqlite_url, backend="diffusers")
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, headers=ASYNC) as api:
        listed = api.get("/sdapi/v1/embeddings").json()
        vaes = api.get("/sdapi/v1/sd-vae").json()
    # The current model is an SD1.5, so the SDXL embedding is skipped; loaded ones sorted by name.
    assert list(listed["loaded"]) == ["tineg", "tistyle"]
    assert listed == {
        "loaded": {
            "tineg": {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": 32,
                "vectors": 2,
            },
            "tistyle": {
                "step": 500,
                "sd_checkpoint": "abcdef0123",
                "sd_checkpoint_name": "tiny15",
                "shape": 32,
                "vectors": 3,
            },
        },
        "skipped": {
            "tixl": {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": 96,
                "vectors": 2,
            }
        },
    }
    vae_dir = models_dir / "models" / "VAE"
    assert vaes == [
        {"model_name": name, "filename": str(vae_dir / name)}
        for name in ("auto15-vae.safetensors", "bad.safetensors", "other.safetensors")
    ]


# --- sd_vae ---------------------------------------------------------------------------------


def decoded_with(vae: Any, latents: Any) -> Any:
    """What the pipeline makes of latents with this VAE (diffusers' postprocess, as A1111's)."""
    with torch.no_grad():
        image = vae.decode(latents).sample
    image = ((image / 2 + 0.5).clamp(0, 1) * 255).round()
    return image[0].permute(1, 2, 0).numpy().astype(np.int16)


@pytest.mark.anyio
async def test_sd_vae_decodes_with_that_vae_and_none_puts_the_checkpoints_own_back(
    backend: DiffusersBackend, models_dir: Path
) -> None:
    pipe = backend.models.get("tiny15").pipe
    baked = pipe.vae
    seen: list[Any] = []
    hook = baked.post_quant_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        base = await run(backend, {**SD15, "sd_vae": "None"})
    finally:
        hook.remove()
    other = await run(backend, {**SD15, "sd_vae": "other.safetensors"})
    assert differ(other, base) > 10
    torch.manual_seed(5)
    reference = tiny_sd.vae()  # the weights other.safetensors was written from
    assert np.abs(pixels(other) - decoded_with(reference, seen[0])).max() <= 1
    assert np.abs(pixels(base) - decoded_with(baked, seen[0])).max() <= 1
    short = hash_file(models_dir / "models" / "VAE" / "other.safetensors").sha256[:10]
    assert f"Model: tiny15, VAE hash: {short}, VAE: other.safetensors, " in infotext(other)
    info = json.loads(other["info"])
    assert (info["sd_vae_name"], info["sd_vae_hash"]) == ("other.safetensors", short)
    again = await run(backend, {**SD15, "sd_vae": "None"})
    assert differ(again, base) == 0 and "VAE" not in infotext(again)
    assert backend.models.get("tiny15").pipe.vae is baked


@pytest.mark.anyio
async def test_automatic_takes_the_vae_named_after_the_checkpoint_else_its_own(
    backend: DiffusersBackend,
) -> None:
    own = await run(backend, {**SD15, "sd_vae": "Automatic"})
    assert "VAE" not in infotext(own)
    near = await run(backend, {"sd_model_checkpoint": "auto15", "sd_vae": "Automatic"})
    assert "VAE: auto15-vae.safetensors, " in infotext(near)
    assert differ(near, own) > 10
    as_default = await run(backend, {"sd_model_checkpoint": "auto15"})  # Automatic by default
    assert differ(as_default, near) == 0


@pytest.mark.anyio
async def test_an_unknown_sd_vae_falls_back_to_the_checkpoints_own_with_a_warning(
    backend: DiffusersBackend, caplog: pytest.LogCaptureFixture
) -> None:
    base = await run(backend, {**SD15, "sd_vae": "None"})
    with caplog.at_level(logging.WARNING, logger="a1111_proxy.engine"):
        missing = await run(backend, {**SD15, "sd_vae": "vae-ft-mse-840000-ema-pruned.ckpt"})
    assert differ(missing, base) == 0 and "VAE" not in infotext(missing)
    assert "VAE 'vae-ft-mse-840000-ema-pruned.ckpt' not found" in caplog.text
    assert "other.safetensors" in caplog.text  # the warning lists what is there


@pytest.mark.anyio
async def test_the_sd_vae_option_is_the_default_of_jobs_that_send_none(
    backend: DiffusersBackend,
) -> None:
    await backend.apply_options({"sd_vae": "other.safetensors"})
    try:
        chosen = await run(backend, SD15)
        own = await run(backend, {**SD15, "sd_vae": "None"})
    finally:
        await backend.apply_options({"sd_vae": "Automatic"})
    assert "VAE: other.safetensors" in infotext(chosen) and differ(chosen, own) > 10


@pytest.mark.anyio
async def test_a_vae_that_does_not_fit_fails_the_job_saying_so(backend: DiffusersBackend) -> None:
    with pytest.raises(BackendRejected, match=r"VAE bad.safetensors does not fit"):
        await run(backend, {**SD15, "sd_vae": "bad.safetensors"})
