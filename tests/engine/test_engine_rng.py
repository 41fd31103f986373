"""A1111's random numbers: the "NV" source (torch's CUDA generator, computed on the CPU) and
seed resize, against A1111 v1.10's modules/rng.py and rng_philox.py (written out here)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

from a1111_proxy.engine import noise, samplers, schedulers  # noqa: E402

pytestmark = [pytest.mark.engine]
CPU = torch.device("cpu")

# torch.manual_seed(0); torch.randn((3, 4), device="cuda"), as rng_philox.py's docstring has it.
CUDA_SEED_0 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]


def test_the_nv_source_draws_what_torch_draws_on_an_nvidia_gpu() -> None:
    drawn = noise.Philox(0).randn((3, 4))
    assert drawn.dtype == torch.float32
    assert torch.allclose(drawn, torch.tensor(CUDA_SEED_0), atol=1e-6)


def test_each_nv_draw_moves_the_counter_on_and_a_seed_above_32_bits_keys_it() -> None:
    generator = noise.Philox(7)
    first, second = generator.randn((2, 3)), generator.randn((2, 3))
    assert torch.equal(first, noise.Philox(7).randn((2, 3))) and not torch.equal(first, second)
    assert not torch.equal(noise.Philox(7 + (1 << 32)).randn((2, 3)), first)


def a1111_resized(seed: int, shape: tuple[int, int, int], old: tuple[int, int, int]) -> Any:
    """ImageRNG.first() with seed_resize_from: the old size from randn(seed, noise_shape) (the
    global generator, freshly seeded), the new size from the image's own fresh generator."""
    small = torch.randn(old, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    dx, dy = (shape[2] - old[2]) // 2, (shape[1] - old[1]) // 2
    w = old[2] if dx >= 0 else old[2] + 2 * dx
    h = old[1] if dy >= 0 else old[1] + 2 * dy
    tx, ty = (0 if dx < 0 else dx), (0 if dy < 0 else dy)
    dx, dy = max(-dx, 0), max(-dy, 0)
    x[:, ty : ty + h, tx : tx + w] = small[:, dy : dy + h, dx : dx + w]
    return x


@pytest.mark.parametrize(("old_px", "new"), [((32, 32), (4, 8, 8)), ((72, 88), (4, 8, 8))])
def test_seed_resize_is_a1111s_paste_with_the_border_from_a_fresh_generator(
    old_px: tuple[int, int], new: tuple[int, int, int]
) -> None:
    made = noise.make(
        [5], [9], subseed_strength=0.0, shape=new, device=CPU, source="CPU", resize_from=old_px
    )
    old = (4, old_px[1] // 8, old_px[0] // 8)
    assert torch.equal(made.latents[0], a1111_resized(5, new, old))
    # The image's generator has made exactly one draw of the new size, as without a resize.
    plain = noise.make([5], [9], subseed_strength=0.0, shape=new, device=CPU, source="CPU")
    after = [torch.randn(new, generator=g) for g in (made.generators[0], plain.generators[0])]
    assert torch.equal(after[0], after[1])


def test_nv_initial_noise_variation_and_ensd_follow_a1111s_image_rng() -> None:
    made = noise.make(
        [5, 6], [9, 10], subseed_strength=0.3, shape=(4, 8, 8), device=CPU, source="NV", ensd=31
    )
    for i, (seed, subseed) in enumerate([(5, 9), (6, 10)]):
        low, high = noise.Philox(seed).randn((4, 8, 8)), noise.Philox(subseed).randn((4, 8, 8))
        assert torch.allclose(made.latents[i], noise.slerp(0.3, low, high))
        assert torch.equal(
            made.generators[i].randn((4, 8, 8)), noise.Philox(seed + 31).randn((4, 8, 8))
        )  # type: ignore[union-attr]


def test_euler_a_on_nv_takes_its_step_noise_from_each_images_philox_draws(sd15: Any) -> None:
    """sample_euler_ancestral with A1111's TorchHijack: each step's randn_like is
    ImageRNG.next(), one draw per image from its generator (after the initial noise)."""
    scheduler = schedulers.make(sd15.scheduler.config, samplers.resolve("Euler a"))
    scheduler.set_timesteps(4)
    made = noise.make(
        [3, 4], [0, 0], subseed_strength=0.0, shape=(4, 8, 8), device=CPU, source="NV"
    )
    tracking = schedulers.Tracking(scheduler)
    tracking.generators = made.generators
    x = made.latents * scheduler.init_noise_sigma
    reference = [noise.Philox(s) for s in (3, 4)]
    for r in reference:
        r.randn((4, 8, 8))  # the initial draw
    sigmas = scheduler.sigmas.double()
    expected = x.double()
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(0.3 * model_input + 0.1, t, x, generator=None).prev_sample
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = 0.3 * expected / (sigma**2 + 1) ** 0.5 + 0.1
        denoised = expected - sigma * eps
        sigma_up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        expected = expected + (expected - denoised) / sigma * (sigma_down - sigma)
        step_noise = torch.stack([r.randn((4, 8, 8)) for r in reference]).double()
        expected = expected + step_noise * sigma_up
    assert torch.allclose(x.double(), expected, atol=1e-4)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any) -> Any:
    return tiny_models.sd15(tmp_path_factory.mktemp("rng-15") / "tiny15")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_generation_on_the_nv_source_is_repeatable_and_says_rng_nv(
    sd15_backend: Any,
) -> None:
    import json

    body = {"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 3}
    nv = {**body, "sampler_name": "Euler a", "override_settings": {"randn_source": "NV"}}
    first, again = (
        await sd15_backend.generate("txt2img", nv),
        await sd15_backend.generate("txt2img", nv),
    )
    cpu = await sd15_backend.generate(
        "txt2img", {**nv, "override_settings": {"randn_source": "CPU"}}
    )
    assert first["images"] == again["images"] and first["images"] != cpu["images"]
    assert "RNG: NV" in json.loads(first["info"])["infotexts"][0]
