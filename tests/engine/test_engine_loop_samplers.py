"""DPM fast, DPM adaptive (engine/dpm_solver.py) and Restart (engine/restart.py), run through
engine/sampling_loop.py, against k-diffusion's DPMSolver (sample_dpm_fast, sample_dpm_adaptive)
and A1111 v1.10's restart_sampler (modules/sd_samplers_extra.py), written out here as they are,
on a toy model; then through the engine on the tiny random-weight SD1.5 on the CPU."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from a1111_proxy.backends.diffusers import DiffusersBackend  # noqa: E402
from a1111_proxy.engine import compat, conditioning, samplers, schedulers  # noqa: E402
from a1111_proxy.engine import sigmas as engine_sigmas  # noqa: E402
from tests.engine.results import pixels  # noqa: E402

pytestmark = [pytest.mark.engine]
SEEDS = [11, 12]
SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def trained() -> Any:
    """CompVisDenoiser's sigmas (model_wrap.sigmas), ascending."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Any:
    """k-diffusion's get_sigmas_karras."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def model(x: Any, sigma: Any) -> Any:
    """A toy CompVisDenoiser: eps from the c_in-scaled input, denoised = x - sigma * eps."""
    return x - sigma * (0.3 * x / (sigma**2 + 1) ** 0.5 + 0.1)


def get_ancestral_step(sigma_from: Any, sigma_to: Any, eta: float = 1.0) -> Any:
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


class PIDStepSizeController:
    """k-diffusion's, as it is."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float, eps: float = 1e-8) -> None:  # fmt: skip
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: Any) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


class DPMSolver:
    """k-diffusion's DPMSolver (k_diffusion/sampling.py), over `model`, counting evaluations."""

    def __init__(self) -> None:
        self.calls = 0

    def t(self, sigma: Any) -> Any:
        return -sigma.log()

    def sigma(self, t: Any) -> Any:
        return t.neg().exp()

    def eps(self, eps_cache: dict[str, Any], key: str, x: Any, t: Any) -> Any:
        if key in eps_cache:
            return eps_cache[key], eps_cache
        self.calls += 1
        eps = (x - model(x, self.sigma(t))) / self.sigma(t)
        return eps, {key: eps, **eps_cache}

    def dpm_solver_1_step(self, x: Any, t: Any, t_next: Any, eps_cache: Any = None) -> Any:
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        x_1 = x - self.sigma(t_next) * h.expm1() * eps
        return x_1, eps_cache

    def dpm_solver_2_step(self, x: Any, t: Any, t_next: Any, r1: float = 1 / 2,
                          eps_cache: Any = None) -> Any:  # fmt: skip
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        x_2 = (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        )
        return x_2, eps_cache

    def dpm_solver_3_step(self, x: Any, t: Any, t_next: Any, r1: float = 1 / 3,
                          r2: float = 2 / 3, eps_cache: Any = None) -> Any:  # fmt: skip
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        s1 = t + r1 * h
        s2 = t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        u2 = (
            x
            - self.sigma(s2) * (r2 * h).expm1() * eps
            - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        )
        eps_r2, eps_cache = self.eps(eps_cache, "eps_r2", u2, s2)
        x_3 = (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        )
        return x_3, eps_cache

    def dpm_solver_fast(self, x: Any, t_start: Any, t_end: Any, nfe: int, eta: float,
                        noise_sampler: Callable[..., Any]) -> Any:  # fmt: skip
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
        if nfe % 3 == 0:
            orders = [3] * (m - 2) + [2, 1]
        else:
            orders = [3] * (m - 1) + [nfe % 3]
        for i in range(len(orders)):
            eps_cache: dict[str, Any] = {}
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.0
            eps, eps_cache = self.eps(eps_cache, "eps", x, t)  # noqa: RUF059  # as k-diffusion
            if orders[i] == 1:
                x, eps_cache = self.dpm_solver_1_step(x, t, t_next_, eps_cache=eps_cache)
            elif orders[i] == 2:
                x, eps_cache = self.dpm_solver_2_step(x, t, t_next_, eps_cache=eps_cache)
            else:
                x, eps_cache = self.dpm_solver_3_step(x, t, t_next_, eps_cache=eps_cache)
            x = x + su * 1.0 * noise_sampler(self.sigma(t), self.sigma(t_next))
        return x

    def dpm_solver_adaptive(self, x: Any, t_start: Any, t_end: Any, eta: float,
                            noise_sampler: Callable[..., Any]) -> Any:  # fmt: skip
        order, rtol, atol, h_init = 3, 0.05, 0.0078, 0.05
        atol, rtol = torch.tensor(atol), torch.tensor(rtol)
        s = t_start
        x_prev = x
        pid = PIDStepSizeController(h_init, 0.0, 1.0, 0.0, 1.5 if eta else order, 0.81)
        while s < t_end - 1e-5:
            eps_cache: dict[str, Any] = {}
            t = torch.minimum(t_end, s + pid.h)
            if eta:
                sd, su = get_ancestral_step(self.sigma(s), self.sigma(t), eta)
                t_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t) ** 2 - self.sigma(t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.0
            eps, eps_cache = self.eps(eps_cache, "eps", x, s)  # noqa: RUF059  # as k-diffusion
            x_low, eps_cache = self.dpm_solver_2_step(x, s, t_, r1=1 / 3, eps_cache=eps_cache)
            x_high, eps_cache = self.dpm_solver_3_step(x, s, t_, eps_cache=eps_cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose_step(error):
                x_prev = x_low
                x = x_high + su * 1.0 * noise_sampler(self.sigma(s), self.sigma(t))
                s = t
        return x


def sample_dpm(kind: str, x: Any, sigma_min: Any, sigma_max: Any, n: int, eta: float,
               noise_sampler: Callable[..., Any]) -> tuple[Any, int]:  # fmt: skip
    """sample_dpm_fast / sample_dpm_adaptive: (x, model evaluations)."""
    solver = DPMSolver()
    # torch.tensor(sigma) in k-diffusion; as_tensor: the same for A1111's img2img tensors, unwarned
    t_start = solver.t(torch.as_tensor(sigma_max, dtype=torch.float32))
    t_end = solver.t(torch.as_tensor(sigma_min, dtype=torch.float32))
    if kind == "DPM fast":
        made = solver.dpm_solver_fast(x, t_start, t_end, n, eta, noise_sampler)
    else:
        made = solver.dpm_solver_adaptive(x, t_start, t_end, eta, noise_sampler)
    return made, solver.calls


def restart_sampler(x: Any, sigmas: Any, randn_like: Callable[[Any], Any]) -> tuple[Any, int]:
    """A1111 v1.10's modules/sd_samplers_extra.py restart_sampler (s_noise 1, restart_list
    None): (x, model evaluations)."""
    calls = 0

    def heun_step(x: Any, old_sigma: Any, new_sigma: Any) -> Any:
        nonlocal calls
        denoised = model(x, old_sigma)
        calls += 1
        d = (x - denoised) / old_sigma
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            return x + d * dt
        x_2 = x + d * dt
        denoised_2 = model(x_2, new_sigma)
        calls += 1
        d_2 = (x_2 - denoised_2) / new_sigma
        d_prime = (d + d_2) / 2
        return x + d_prime * dt

    steps = sigmas.shape[0] - 1
    if steps >= 20:
        restart_steps = 9
        restart_times = 1
        if steps >= 36:
            restart_steps = steps // 4
            restart_times = 2
        sigmas = karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
        restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    else:
        restart_list = {}
    restart_list = {int(torch.argmin(abs(sigmas - k), dim=0)): v for k, v in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = karras(
                    restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item()
                )[:-1]
                while restart_times > 0:
                    restart_times -= 1
                    step_list.extend(zip(sigma_restart[:-1], sigma_restart[1:], strict=True))  # noqa: RUF007
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + randn_like(x) * 1.0 * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x, calls


def image_rng(seeds: list[int]) -> Callable[..., Any]:
    """A1111's ImageRNG.next(), what TorchHijack's randn_like gives: one draw per image."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda *_: torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators])


def engine(scheduler: Any, x: Any, seeds: list[int], img2img: bool = False) -> tuple[Any, int]:
    """The pipeline's loop over the run's scheduler (txt2img, or img2img from x as the image
    already noised by the scheduler's add_noise): (x, model evaluations)."""
    tracking = schedulers.Tracking(scheduler)
    tracking.generators = [torch.Generator().manual_seed(s) for s in seeds]
    calls = 0
    for t in scheduler.timesteps:
        eps = 0.3 * scheduler.scale_model_input(x, t) + 0.1
        x = scheduler.step(eps, t, x, generator=None).prev_sample
        calls += 1
    return x, calls


def make(name: str, steps: int, schedule: str | None = None, **kwargs: Any) -> Any:
    scheduler = schedulers.make(SD15, samplers.resolve(name, schedule), **kwargs)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive"])
@pytest.mark.parametrize(("steps", "eta"), [(9, 1.0), (10, 1.0), (8, 0.0), (4, 0.5)])
def test_dpm_fast_and_adaptive_txt2img_run_k_diffusions_loop_from_the_models_sigma_range(
    name: str, steps: int, eta: float
) -> None:
    start = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    scheduler = make(name, steps, eta_value=eta)
    made, calls = engine(scheduler, start * scheduler.init_noise_sigma, SEEDS)
    sigmas = trained()
    expected, expected_calls = sample_dpm(
        name,
        start * engine_sigmas.uniform(steps, sigmas)[0],  # A1111: x * sigmas[0]
        sigmas[0].item(),
        sigmas[-1].item(),
        steps,
        eta,
        image_rng(SEEDS),
    )
    torch.testing.assert_close(made, expected, rtol=1e-5, atol=1e-5)
    assert calls == expected_calls
    if name == "DPM fast":
        assert calls == steps == len(scheduler.timesteps)


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive"])
def test_dpm_fast_and_adaptive_img2img_run_between_sigma_scheds_first_and_next_to_last(
    name: str,
) -> None:
    steps, t_start = 10, 4  # denoising 0.6: A1111's t_enc 6, sigma_sched = sigmas[3:]
    scheduler = make(name, steps, "Karras", img2img=True)
    timesteps = scheduler.timesteps[t_start - 1 :]  # diffusers' get_timesteps
    image = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(6))
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    noised = scheduler.add_noise(image, noise, timesteps[:1])
    sigma_sched = karras(steps, trained()[0].item(), trained()[-1].item())[t_start - 1 :]
    torch.testing.assert_close(noised, image + noise * sigma_sched[0])  # A1111's xi
    made, calls = engine(scheduler, noised, SEEDS)
    expected, expected_calls = sample_dpm(
        name, noised, sigma_sched[-2], sigma_sched[0], len(sigma_sched) - 1, 1.0, image_rng(SEEDS)
    )
    torch.testing.assert_close(made, expected, rtol=1e-5, atol=1e-5)
    assert calls == expected_calls


@pytest.mark.parametrize(
    ("steps", "schedule"), [(8, None), (24, None), (40, None), (24, "Uniform")]
)
def test_restart_runs_a1111s_restart_sampler_with_fresh_noise_from_the_images_generators(
    steps: int, schedule: str | None
) -> None:
    start = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    scheduler = make("Restart", steps, schedule)
    made, calls = engine(scheduler, start * scheduler.init_noise_sigma, SEEDS)
    low, high = trained()[0].item(), trained()[-1].item()
    sigmas = (
        karras(steps, low, high) if schedule is None else engine_sigmas.uniform(steps, trained())
    )
    draw = image_rng(SEEDS)
    expected, expected_calls = restart_sampler(start * sigmas[0], sigmas, lambda x: draw())
    torch.testing.assert_close(made, expected, rtol=1e-5, atol=1e-5)
    assert calls == expected_calls == len(scheduler.timesteps)
    if steps >= 20:  # restarts: the noise made a difference
        other, _ = engine(make("Restart", steps, schedule), start * sigmas[0], [1, 2])
        assert not torch.allclose(made, other)


@pytest.mark.parametrize("name", ["DPM fast", "Restart"])
def test_with_the_nv_source_the_loops_draw_their_step_noise_from_philox(name: str) -> None:
    from a1111_proxy.engine.noise import Philox

    steps = 21  # Restart: a restart, so fresh noise
    start = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    scheduler = make(name, steps)
    tracking = schedulers.Tracking(scheduler)
    tracking.generators = [Philox(s) for s in SEEDS]
    x = start * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = 0.3 * scheduler.scale_model_input(x, t) + 0.1
        x = scheduler.step(eps, t, x, generator=None).prev_sample
    generators = [Philox(s) for s in SEEDS]

    def nv(*_: Any) -> Any:
        return torch.stack([g.randn((4, 8, 8)) for g in generators])

    low, high = trained()[0].item(), trained()[-1].item()
    if name == "DPM fast":
        x0 = start * engine_sigmas.uniform(steps, trained())[0]
        expected, _ = sample_dpm(name, x0, low, high, steps, 1.0, nv)
    else:
        sigmas = karras(steps, low, high)
        expected, _ = restart_sampler(start * sigmas[0], sigmas, nv)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_restart_schedules_prompt_editing_over_twice_the_steps_as_a_second_order_sampler() -> None:
    assert conditioning.total_steps(samplers.resolve("Restart"), 10) == 19
    assert conditioning.total_steps(samplers.resolve("DPM fast"), 10) == 10


def test_the_loop_samplers_name_a1111s_schedules_in_the_infotext() -> None:
    assert samplers.resolve("Restart").schedule_label == "Karras"
    assert samplers.resolve("DPM fast").schedule_label == "Automatic"
    assert samplers.resolve("DPM adaptive", "Exponential").schedule_label == "Exponential"


def test_dpm_adaptive_jobs_never_share_a_batch_and_dpm_fast_jobs_do() -> None:
    body = {"prompt": "a cat", "steps": 8, "width": 64, "height": 64}
    assert compat.batch_key("txt2img", {**body, "sampler_name": "DPM adaptive"}, "m") is None
    assert compat.batch_key("txt2img", {**body, "sampler_name": "DPM fast"}, "m") is not None
    assert compat.batch_key("txt2img", {**body, "sampler_name": "Restart"}, "m") is not None


def test_dpm_adaptive_reports_how_far_it_is_from_sigma_max_to_sigma_min() -> None:
    scheduler = make("DPM adaptive", 6)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5)) * 14.6
    shares = []
    for t in scheduler.timesteps:
        eps = 0.3 * scheduler.scale_model_input(x, t) + 0.1
        x = scheduler.step(eps, t, x).prev_sample
        shares.append(scheduler.share_done)
    assert len(shares) > 6  # more evaluations than steps: progress cannot count them
    assert shares == sorted(shares) and shares[0] == 0.0 and shares[-1] == pytest.approx(1.0)


def test_an_interrupted_loop_stops_handing_out_timesteps() -> None:
    scheduler = make("DPM fast", 6)
    seen = []
    x = torch.ones((1, 4, 8, 8))
    for i, t in enumerate(scheduler.timesteps):
        seen.append(t)
        if i < 2:  # then the pipeline's `if self.interrupt: continue`
            x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    assert len(seen) == 3


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive", "Restart"])
async def test_the_loop_samplers_make_the_same_image_for_a_seed_and_say_so_in_the_infotext(
    sd15_backend: DiffusersBackend, name: str
) -> None:
    body = {"prompt": "a cat", "steps": 5, "width": 64, "height": 64, "seed": 3}
    made = await sd15_backend.generate("txt2img", {**body, "sampler_name": name})
    again = await sd15_backend.generate("txt2img", {**body, "sampler_name": name})
    other = await sd15_backend.generate("txt2img", {**body, "sampler_name": name, "seed": 4})
    assert np.array_equal(pixels(made), pixels(again)) and np.isfinite(pixels(made)).all()
    assert not np.array_equal(pixels(made), pixels(other))
    infotext = json.loads(made["info"])["infotexts"][0]
    assert f"Sampler: {name}," in infotext and "Eta" not in infotext
    listed = await sd15_backend.catalogue_entry("samplers")
    assert name in [s["name"] for s in listed]
    edited = await sd15_backend.generate(
        "img2img",
        {**body, "sampler_name": name, "denoising_strength": 0.5, "init_images": made["images"]},
    )
    assert (pixels(edited) != pixels(made)).any() and np.isfinite(pixels(edited)).all()


def half_mask() -> str:
    """White on the left half (re-imagined), black on the right (kept), as a PNG."""
    image = Image.new("L", (64, 64), 0)
    image.paste(255, (0, 0, 32, 64))
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive", "Restart"])
async def test_the_loop_samplers_run_hires_fix_a_mask_and_the_noise_mask(
    sd15_backend: DiffusersBackend, name: str
) -> None:
    body = {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 3}
    body["sampler_name"] = name
    hires = {"enable_hr": True, "denoising_strength": 0.5, "hr_second_pass_steps": 2}
    upscaled = await sd15_backend.generate("txt2img", {**body, **hires, "hr_scale": 1.5})
    assert pixels(upscaled).shape[:2] == (96, 96) and np.isfinite(pixels(upscaled)).all()
    made = await sd15_backend.generate("txt2img", body)
    mask = half_mask()
    edited = await sd15_backend.generate(
        "img2img",
        {**body, "init_images": made["images"], "mask": mask, "denoising_strength": 0.75},
    )
    changed = np.abs(pixels(edited) - pixels(made)).mean(axis=(0, 2))
    assert changed[:24].mean() > changed[40:].mean()  # the kept right half stays closer
    noise_mask = {"mask": mask, "strength": 1.0, "start": 0.0, "end": 1.0}
    masked = await sd15_backend.generate("txt2img", {**body, "noise_mask": noise_mask})
    assert not np.array_equal(pixels(masked), pixels(made))


@pytest.mark.anyio
async def test_dpm_fast_takes_the_requests_eta_and_writes_it_as_a1111s_float(
    sd15_backend: DiffusersBackend,
) -> None:
    body = {"prompt": "a cat", "steps": 5, "width": 64, "height": 64, "seed": 3}
    ancestral = await sd15_backend.generate("txt2img", {**body, "sampler_name": "DPM fast"})
    plain = await sd15_backend.generate("txt2img", {**body, "sampler_name": "DPM fast", "eta": 0})
    assert not np.array_equal(pixels(ancestral), pixels(plain))
    assert "Eta: 0.0," in json.loads(plain["info"])["infotexts"][0]
