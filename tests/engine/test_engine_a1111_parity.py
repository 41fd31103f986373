"""Small A1111 v1.10 parities (issue 17 item 6), each against A1111's computation ported here."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
diffusers = pytest.importorskip(
    "diffusers", reason="the engine tests need the engine extra (diffusers)"
)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine import ddim, images, samplers, schedulers, upscale  # noqa: E402
from a1111_proxy.engine.infotext import Generation, ModelInfo  # noqa: E402
from a1111_proxy.engine.params import Params  # noqa: E402
from a1111_proxy.engine.pipeline import enter_img2img, prepare_inputs  # noqa: E402
from tests.engine.results import pixels, png_b64  # noqa: E402

if TYPE_CHECKING:
    from tests.engine.conftest import TinyModels

# SD 1.x's noise schedule, as its scheduler_config.json gives it.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def test_a_whole_picture_inpaint_overlays_with_a1111s_doubled_mask() -> None:
    picture = Image.new("RGB", (64, 64), (40, 90, 160))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    body = {
        "prompt": "a cat",
        "init_images": [png_b64(picture)],
        "mask": png_b64(mask),
        "mask_blur": 4,
        "inpaint_full_res": False,
        "width": 64,
        "height": 64,
    }
    params = Params.from_payload("img2img", body, rng=random.Random(0))
    inputs = prepare_inputs(params, Generation(params, ModelInfo("m", None), [1], [2]), 0)

    # A1111's processing.py, inpaint_full_res False: the blurred mask resized to the job's size,
    # then mask_for_overlay = clip(mask * 2, 0, 255) as uint8.
    blurred = images.prepare_mask(mask, invert=False, blur_x=4, blur_y=4)
    resized = np.array(images.resize(blurred, params.resize_mode, 64, 64))
    expected = np.clip(resized.astype(np.float32) * 2, 0, 255).astype(np.uint8)
    assert inputs.original_mask is not None
    assert np.array_equal(np.array(inputs.original_mask), expected)
    assert 0 < np.count_nonzero((resized > 0) & (resized < 128))  # the blur's half is doubled


def _kdiffusion_get_sigmas(n: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.get_sigmas(n) (A1111's Uniform, and its Normal: the linspace
    from sigma_to_t(sigma_max) = 999 to sigma_to_t(sigma_min) = 0), with t_to_sigma."""
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, n)
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
    return torch.cat([log_sigma.exp(), log_sigma.new_zeros([1])])


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE"])
@pytest.mark.parametrize("schedule", ["Uniform", "Normal"])
def test_dpmpp_multistep_samplers_on_uniform_and_normal_end_on_the_smallest_sigma_as_a1111(
    sampler: str, schedule: str
) -> None:
    resolved = samplers.resolve(sampler, schedule)
    base = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER).config
    scheduler = schedulers.make(base, resolved)
    scheduler.set_timesteps(20)

    alphas_cumprod = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER).alphas_cumprod.double()
    if resolved.sampler.discard_next_to_last_sigma:  # A1111: steps + 1, then sigmas[:-2] + [-1:]
        full = _kdiffusion_get_sigmas(21, alphas_cumprod)
        expected = torch.cat([full[:-2], full[-1:]])
        ts = torch.linspace(999, 0, 21, dtype=torch.float64)[:-1]
    else:
        expected = _kdiffusion_get_sigmas(20, alphas_cumprod)
        ts = torch.linspace(999, 0, 20, dtype=torch.float64)
    assert scheduler.sigmas.shape == expected.shape
    torch.testing.assert_close(scheduler.sigmas.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps.double(), ts, rtol=0, atol=1e-3)


def _a1111_timesteps(steps: int) -> torch.Tensor:
    """A1111's CompVisSampler.get_timesteps."""
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def _a1111_ddim(model: Any, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: Any) -> Any:
    """sd_samplers_timesteps_impl.ddim (eta 0), with the timesteps it evaluated."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    evaluated = []
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        evaluated.append(int(timesteps[index]))
        e_t = model(x, timesteps[index].item())
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = 0.0 * s_x  # eta 0
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt
    return x, evaluated


def _a1111_plms(model: Any, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: Any) -> Any:
    """sd_samplers_timesteps_impl.plms, with the timesteps it evaluated."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    old_eps: list[torch.Tensor] = []
    evaluated: list[int] = []

    def get_x_prev_and_pred_x0(e_t: torch.Tensor, index: int) -> torch.Tensor:
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev).sqrt() * e_t
        return a_prev.sqrt() * pred_x0 + dir_xt

    def ask(x: torch.Tensor, t: int) -> torch.Tensor:
        evaluated.append(t)
        return model(x, t)

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts, t_next = timesteps[index].item(), timesteps[max(index - 1, 0)].item()
        e_t = ask(x, ts)
        if len(old_eps) == 0:
            x_prev = get_x_prev_and_pred_x0(e_t, index)
            e_t_prime = (e_t + ask(x_prev, t_next)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev = get_x_prev_and_pred_x0(e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
    return x, evaluated


_A1111_LOOPS = {"DDIM": _a1111_ddim, "PLMS": _a1111_plms}


def _a1111_img2img(
    sampler: str,
    model: Any,
    x: torch.Tensor,
    noise: torch.Tensor,
    strength: float,
    steps: int,
    alphas_cumprod: Any,
    hires_steps: int | None = None,
) -> Any:
    """CompVisSampler.sample_img2img with setup_img2img_steps (hires fix passes its steps)."""
    if hires_steps is not None:
        steps, t_enc = int(hires_steps / min(strength, 0.999)), hires_steps - 1
    else:
        t_enc = int(min(strength, 0.999) * steps)
    timesteps = _a1111_timesteps(steps)
    a = alphas_cumprod[timesteps[t_enc]]
    xi = x * torch.sqrt(a) + noise * torch.sqrt(1 - a)
    return _A1111_LOOPS[sampler](model, xi, timesteps[:t_enc], alphas_cumprod)


def _model(x: torch.Tensor, t: float) -> torch.Tensor:
    return 0.3 * x + torch.cos(x * 3 + t / 100)


def _ours(
    sampler: str,
    steps: int,
    x: torch.Tensor,
    noise: torch.Tensor | None = None,
    strength: float | None = None,
) -> Any:
    """The engine's scheduler for `sampler` stepped as a pipeline steps it (img2img: entered
    at `strength`, its start noised by its add_noise), with the timesteps it evaluated."""
    scheduler = schedulers.make(
        diffusers.DDIMScheduler.from_config(SD15_SCHEDULER).config, samplers.resolve(sampler)
    )
    if strength is not None:
        scheduler.t_enc = ddim.t_enc(strength, steps)
    scheduler.set_timesteps(steps)
    if noise is not None:
        x = scheduler.add_noise(x, noise, scheduler.timesteps[:1])
    for t in scheduler.timesteps:
        x = scheduler.step(_model(x, float(t)), t, x).prev_sample
    return x, [int(t) for t in scheduler.timesteps], scheduler.alphas_cumprod


def _latents(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
@pytest.mark.parametrize("steps", [30, 7, 20, 9])
def test_ddim_and_plms_walk_a1111s_timesteps_when_steps_do_not_divide_1000(
    sampler: str, steps: int
) -> None:
    start = _latents(5)
    x, evaluated, alphas_cumprod = _ours(sampler, steps, start)
    expected, a1111_evaluated = _A1111_LOOPS[sampler](
        _model, start, _a1111_timesteps(steps), alphas_cumprod
    )
    assert evaluated == a1111_evaluated
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
@pytest.mark.parametrize(
    ("steps", "strength"),
    [(20, 0.5), (30, 0.75), (7, 0.6), (9, 1.0), (10, 0.25), (10, 0.15), (7, 0.1)],
)
def test_ddim_and_plms_img2img_noise_one_timestep_above_the_first_they_evaluate_as_a1111(
    sampler: str, steps: int, strength: float
) -> None:
    image, noise = _latents(6), _latents(7)
    x, evaluated, alphas_cumprod = _ours(sampler, steps, image, noise, strength)
    expected, a1111_evaluated = _a1111_img2img(
        sampler, _model, image, noise, strength, steps, alphas_cumprod
    )
    assert evaluated == a1111_evaluated or (not a1111_evaluated and len(evaluated) == 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_hires_fix_runs_ddim_and_plms_second_pass_as_a1111(sampler: str) -> None:
    body = {
        "prompt": "a cat",
        "sampler_name": sampler,
        "steps": 10,
        "width": 64,
        "height": 64,
        "enable_hr": True,
        "hr_scale": 2,
        "denoising_strength": 0.45,
        "hr_second_pass_steps": 7,
    }
    params = Params.from_payload("txt2img", body, rng=random.Random(0))
    assert params.hires is not None
    second = upscale.second_pass_params(params, params.hires)
    assert second is not None and second.denoising_strength is not None
    image, noise = _latents(8), _latents(9)
    x, evaluated, alphas_cumprod = _ours(
        sampler, second.steps, image, noise, second.denoising_strength
    )
    expected, a1111_evaluated = _a1111_img2img(
        sampler, _model, image, noise, 0.45, 10, alphas_cumprod, hires_steps=7
    )
    assert evaluated == a1111_evaluated
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_an_img2img_pipeline_asks_the_unet_at_a1111s_timesteps(
    sampler: str, tmp_path: Any, tiny_models: TinyModels
) -> None:
    body = {"prompt": "a cat", "sampler_name": sampler, "steps": 10, "width": 64, "height": 64}
    body |= {"init_images": [png_b64(Image.new("RGB", (64, 64), (200, 40, 40)))]}
    params = Params.from_payload("img2img", {**body, "denoising_strength": 0.5})
    source = tiny_models.sd15(tmp_path / "sd15")
    scheduler = schedulers.make(source.scheduler.config, params.sampler)
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**{**source.components, "scheduler": scheduler})
    asked: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda _, args: asked.append(int(args[1].flatten()[0]))
    )
    enter_img2img(pipe, params)
    try:
        pipe(
            prompt="a cat",
            image=Image.new("RGB", (64, 64), (200, 40, 40)),
            strength=0.5,
            num_inference_steps=10,
            guidance_scale=1.0,
            output_type="latent",
        )
    finally:
        hook.remove()
    walk = _a1111_timesteps(10).tolist()  # t_enc = 5: noised at walk[5], asked from walk[4]
    again = [walk[3]] if sampler == "PLMS" else []  # PLMS's first step asks at the next too
    assert asked == [walk[4], *again, *walk[3:0:-1]]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_ddim_on_a1111s_timesteps_runs_txt2img_and_img2img(
    sd15_backend: DiffusersBackend,
) -> None:
    body = {"prompt": "a cat", "sampler_name": "DDIM", "steps": 7, "width": 64, "height": 64}
    first = await sd15_backend.generate("txt2img", {**body, "seed": 3})
    again = await sd15_backend.generate(
        "img2img",
        {**body, "seed": 4, "init_images": [first["images"][0]], "denoising_strength": 0.5},
    )
    assert np.isfinite(pixels(first)).all() and np.isfinite(pixels(again)).all()
    assert (pixels(first) != pixels(again)).any()


def _sd15_scheduler(sampler: str, steps: int, eta: float) -> Any:
    """The engine's scheduler for `sampler` with `eta` on SD1.5's noise schedule, for `steps`."""
    scheduler = schedulers.make(
        diffusers.DDIMScheduler.from_config(SD15_SCHEDULER).config,
        samplers.resolve(sampler),
        eta_value=eta,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def _ancestral_step(sigma: Any, sigma_next: Any, eta: float) -> tuple[Any, Any]:
    """k-diffusion's get_ancestral_step."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def _eps(x: torch.Tensor) -> torch.Tensor:
    return 0.05 * x + 0.5 * torch.tanh(x)


def _k_ancestral(
    move: Callable[[torch.Tensor, torch.Tensor, Any, Any], torch.Tensor],
    x: torch.Tensor,
    sigmas: Any,
    eta: float,
    g: Any,
) -> torch.Tensor:
    """k-diffusion's ancestral sample_* loop (an eps model): each step moves x from sigma to
    sigma_down by the sampler's `move(x, denoised, sigma, sigma_down)`, then adds noise."""
    for i in range(len(sigmas) - 1):
        denoised = x - sigmas[i] * _eps(x)
        down, up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = move(x, denoised, sigmas[i], down)
        if sigmas[i + 1] > 0:  # k-diffusion draws at the last step too, after all the others
            x = x + torch.randn(x.shape, generator=g) * up
    return x


def _euler_move(x: torch.Tensor, denoised: torch.Tensor, sigma: Any, down: Any) -> torch.Tensor:
    """sample_euler_ancestral's move (and the others' where sigma_down is 0)."""
    return x + (x - denoised) / sigma * (down - sigma)


def _dpm_2_move(x: torch.Tensor, denoised: torch.Tensor, sigma: Any, down: Any) -> torch.Tensor:
    """sample_dpm_2_ancestral's move."""
    if down == 0:
        return _euler_move(x, denoised, sigma, down)
    d = (x - denoised) / sigma
    sigma_mid = sigma.log().lerp(torch.as_tensor(down).log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - (x_2 - sigma_mid * _eps(x_2))) / sigma_mid
    return x + d_2 * (down - sigma)


def _dpmpp_2s_move(x: torch.Tensor, denoised: torch.Tensor, sigma: Any, down: Any) -> torch.Tensor:
    """sample_dpmpp_2s_ancestral's move."""
    if down == 0:
        return _euler_move(x, denoised, sigma, down)
    t, t_next = -sigma.log(), -torch.as_tensor(down).log()
    h = t_next - t
    s = t + h / 2
    x_2 = ((-s).exp() / (-t).exp()) * x - (-h / 2).expm1() * denoised
    denoised_2 = x_2 - (-s).exp() * _eps(x_2)
    return ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2


_K_ANCESTRAL = {"Euler a": _euler_move, "DPM2 a": _dpm_2_move, "DPM++ 2S a": _dpmpp_2s_move}


@pytest.mark.parametrize("sampler", list(_K_ANCESTRAL))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_the_ancestral_samplers_step_with_the_eta_asked_as_k_diffusion(
    sampler: str, eta: float
) -> None:
    scheduler = _sd15_scheduler(sampler, 8, eta)
    sigmas = getattr(scheduler, "flat_sigmas", scheduler.sigmas)
    start = _latents(11) * sigmas[0]
    x = start
    ours = torch.Generator().manual_seed(3)
    for t in scheduler.timesteps:
        x = scheduler.step(_eps(x), t, x, generator=ours).prev_sample
    expected = _k_ancestral(
        _K_ANCESTRAL[sampler], start, sigmas, eta, torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


def _infotext(kind: str, body: dict[str, Any]) -> str:
    params = Params.from_payload(kind, {"prompt": "a cat", **body}, rng=random.Random(0))
    return Generation(params, ModelInfo("m", None), [1], [2]).infotext(0)


def test_eta_is_written_as_a1111_writes_it_for_the_samplers_that_take_one() -> None:
    assert "Eta: 0.5" in _infotext("txt2img", {"sampler_name": "Euler a", "eta": 0.5})
    assert "Eta" not in _infotext("txt2img", {"sampler_name": "Euler a", "eta": 1.0})
    assert "Eta" not in _infotext("txt2img", {"sampler_name": "Euler", "eta": 0.5})
    options = {"override_settings": {"eta_ancestral": 0.25}}
    assert "Eta: 0.25" in _infotext("txt2img", {"sampler_name": "DPM++ 2M SDE", **options})
    assert "Eta: 0.75" in _infotext("txt2img", {"sampler_name": "DPM2 a", "eta": 0.75, **options})
    assert "Eta DDIM: 0.3" in _infotext(
        "txt2img", {"sampler_name": "DDIM", "override_settings": {"eta_ddim": 0.3}}
    )
    assert "Eta DDIM: 1.0" in _infotext("txt2img", {"sampler_name": "DDIM", "eta": 1.0})
    assert "Eta" not in _infotext("txt2img", {"sampler_name": "DDIM"})
    assert "Eta" not in _infotext("txt2img", {"sampler_name": "PLMS", "eta": 0.5})


def test_ensd_is_written_only_when_the_ancestral_sampler_runs_with_an_eta() -> None:
    delta = {"override_settings": {"eta_noise_seed_delta": 31337}}
    assert "ENSD: 31337" in _infotext("txt2img", {"sampler_name": "Euler a", **delta})
    assert "ENSD" not in _infotext("txt2img", {"sampler_name": "Euler a", "eta": 0.0, **delta})
    zero = {"override_settings": {"eta_noise_seed_delta": 31337, "eta_ancestral": 0}}
    assert "ENSD" not in _infotext("txt2img", {"sampler_name": "Euler a", **zero})


@pytest.mark.anyio
async def test_euler_a_with_eta_0_gives_eulers_image(sd15_backend: DiffusersBackend) -> None:
    body = {"prompt": "a cat", "steps": 6, "width": 64, "height": 64, "seed": 5}
    euler = await sd15_backend.generate("txt2img", {**body, "sampler_name": "Euler"})
    still = await sd15_backend.generate("txt2img", {**body, "sampler_name": "Euler a", "eta": 0})
    noisy = await sd15_backend.generate("txt2img", {**body, "sampler_name": "Euler a"})
    a, b, c = (pixels(r).astype(np.int16) for r in (euler, still, noisy))
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - c).mean() > 5


def _k_dpmpp_sde_multistep(
    x: torch.Tensor, sigmas: Any, eta: float, noises: list[torch.Tensor], kind: str
) -> torch.Tensor:
    """k-diffusion's sample_dpmpp_2m_sde (kind "midpoint" or "heun") and sample_dpmpp_3m_sde
    (kind "3m"), an eps model taking x / sqrt(sigma^2 + 1), noises[i] as the step's noise."""
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = x - sigmas[i] * _eps(x / (sigmas[i] ** 2 + 1) ** 0.5)
        if sigmas[i + 1] == 0:
            x = denoised
            h = None
        else:
            h = -sigmas[i + 1].log() + sigmas[i].log()
            eta_h = eta * h
            h_eta = h + eta_h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if kind == "3m" and h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                if kind == "midpoint":
                    x = x + 0.5 * (-h_eta).expm1().neg() * d
                else:
                    x = x + phi_2 * d
            if eta:
                x = x + noises[i] * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@pytest.mark.parametrize(
    ("sampler", "kind"),
    [("DPM++ 2M SDE", "midpoint"), ("DPM++ 2M SDE Heun", "heun"), ("DPM++ 3M SDE", "3m")],
)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_the_multistep_sde_samplers_step_with_the_eta_asked_as_k_diffusion(
    sampler: str, kind: str, eta: float
) -> None:
    scheduler = _sd15_scheduler(sampler, 8, eta)
    sigmas = scheduler.sigmas
    noises = [_latents(20 + i) for i in range(len(sigmas))]
    start = _latents(12) * sigmas[0]
    x = start / (sigmas[0] ** 2 + 1) ** 0.5  # diffusers' multistep latents: VP form
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(_eps(x), t, x, variance_noise=noises[i]).prev_sample
    expected = _k_dpmpp_sde_multistep(start, sigmas, eta, noises, kind)
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


def _smooth_noise(sigma: Any, sigma_next: Any) -> torch.Tensor:
    """A noise sampler that two float roundings of the same sigmas agree on."""
    return torch.sin(_latents(30) * 7 + float(sigma) + 2 * float(sigma_next))


def _k_dpmpp_sde(x: torch.Tensor, sigmas: Any, eta: float) -> torch.Tensor:
    """k-diffusion's sample_dpmpp_sde (r = 1/2), an eps model taking x / sqrt(sigma^2 + 1)."""

    def denoise(x: torch.Tensor, sigma: Any) -> torch.Tensor:
        return x - sigma * _eps(x / (sigma**2 + 1) ** 0.5)

    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        s = t + (t_next - t) * 0.5
        sd, su = _ancestral_step((-t).exp(), (-s).exp(), eta)
        s_ = -torch.as_tensor(sd).log()
        x_2 = ((-s_).exp() / (-t).exp()) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + _smooth_noise((-t).exp(), (-s).exp()) * su
        denoised_2 = denoise(x_2, (-s).exp())
        sd, su = _ancestral_step((-t).exp(), (-t_next).exp(), eta)
        t_next_ = -torch.as_tensor(sd).log()
        x = ((-t_next_).exp() / (-t).exp()) * x - (t - t_next_).expm1() * denoised_2
        x = x + _smooth_noise((-t).exp(), (-t_next).exp()) * su
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_dpmpp_sde_steps_with_the_eta_asked_as_k_diffusion(eta: float) -> None:
    scheduler = _sd15_scheduler("DPM++ SDE", 6, eta)
    scheduler.noise_sampler = _smooth_noise
    sigmas = torch.cat([scheduler.sigmas[0::2], scheduler.sigmas[-1:]])
    start = _latents(13) * sigmas[0]
    x = start
    for t in scheduler.timesteps:
        x = scheduler.step(_eps(scheduler.scale_model_input(x, t)), t, x).prev_sample
    torch.testing.assert_close(x, _k_dpmpp_sde(start, sigmas, eta), rtol=1e-4, atol=1e-4)
