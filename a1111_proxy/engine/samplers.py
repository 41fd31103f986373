"""A1111 sampler and schedule names, and the diffusers scheduler each one maps to.

Plain data, no torch: the API checks names with it at submit time. A1111 >= 1.9 splits
"DPM++ 2M Karras" into sampler "DPM++ 2M" and schedule "Karras"; "Automatic" means the
sampler's own default schedule, not the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from a1111_proxy.engine.errors import UnknownSampler


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: str  # a diffusers scheduler class, or one of the engine's (schedulers.py)
    default_schedule: str  # what "Automatic" means for this sampler
    kwargs: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    # Schedules whose sigma flags this class accepts; others run only with their default.
    sigma_schedules: bool = True
    # A1111's "brownian_noise": step noise from a Brownian tree seeded with the image seeds.
    brownian: bool = False
    # Steps through any list of sigmas: runs every schedule of sigmas.py (A1111's k-diffusion
    # samplers but Heun and DPM++ SDE, whose diffusers classes interleave sigmas themselves).
    stepwise: bool = False
    # A1111's option: the schedule for steps + 1, less its next-to-last sigma.
    discard_next_to_last_sigma: bool = False
    # A1111's "uses_ensd": ancestral samplers, whose infotext carries ENSD when eta is not 0.
    uses_ensd: bool = False
    # A1111's timesteps samplers (DDIM, PLMS, UniPC) pick no schedule of their own.
    timesteps: bool = False
    # The option a request without `eta` takes it from, where the sampler's function has an
    # eta: "eta_ancestral" (k-diffusion's, default 1) or "eta_ddim" (DDIM's, default 0).
    eta_option: str | None = None

    @property
    def eta_default(self) -> float:
        """A1111's eta_default: an eta other than it is written in the infotext."""
        return 0.0 if self.eta_option == "eta_ddim" else 1.0

    @property
    def eta_label(self) -> str:
        """A1111's eta_infotext_field."""
        return "Eta DDIM" if self.eta_option == "eta_ddim" else "Eta"

    # DPM adaptive: its steps follow the model, sized over every image of the batch together,
    # so a job's images would change in a batch with other jobs (it always runs alone), and no
    # step count is known ahead (ControlNet's guidance start/end cannot be placed).
    adaptive: bool = False

    @property
    def names_its_schedule(self) -> bool:
        """Whether A1111 gives this sampler a schedule of its own (options' `scheduler`), which
        "Automatic" resolves to and the infotext names: the Karras / Exponential defaults."""
        return self.default_schedule in SIGMA_SCHEDULES and not self.timesteps


SAMPLERS: tuple[Sampler, ...] = (
    Sampler(
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        "karras",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        ("k_dpmpp_2m",),
        stepwise=True,
    ),
    Sampler(
        "DPM++ SDE",
        "SDEScheduler",  # engine/eta.py's: diffusers' with A1111's eta
        "karras",
        {},
        ("k_dpmpp_sde",),
        brownian=True,
        eta_option="eta_ancestral",
    ),
    Sampler(
        "DPM++ 2M SDE",
        "SDEMultistepScheduler",  # engine/eta.py's, as the two below
        "exponential",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        ("k_dpmpp_2m_sde",),
        brownian=True,
        stepwise=True,
        eta_option="eta_ancestral",
    ),
    Sampler(
        "DPM++ 2M SDE Heun",
        "SDEMultistepScheduler",
        "exponential",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
        ("k_dpmpp_2m_sde_heun",),
        brownian=True,
        stepwise=True,
        eta_option="eta_ancestral",
    ),
    # diffusers has no DPM++ 2S a: engine/two_stage.py's, as DPM2 and DPM2 a.
    Sampler(
        "DPM++ 2S a",
        "DPMPP2SAncestralScheduler",
        "karras",
        {},
        ("k_dpmpp_2s_a",),
        stepwise=True,
        uses_ensd=True,
        eta_option="eta_ancestral",
    ),
    # k-diffusion's 3M SDE: its second step is phi_2's ("heun"), and it takes order 3 up to the
    # step before sigma 0 however few the steps (no lower_order_final).
    Sampler(
        "DPM++ 3M SDE",
        "SDEMultistepScheduler",
        "exponential",
        {
            "algorithm_type": "sde-dpmsolver++",
            "solver_order": 3,
            "solver_type": "heun",
            "lower_order_final": False,
        },
        ("k_dpmpp_3m_sde",),
        brownian=True,
        stepwise=True,
        discard_next_to_last_sigma=True,
        eta_option="eta_ancestral",
    ),
    Sampler(
        "Euler a",
        "EulerAncestralScheduler",  # engine/eta.py's: diffusers' with A1111's eta
        "uniform",
        {},
        ("k_euler_a", "k_euler_ancestral"),
        sigma_schedules=False,
        stepwise=True,
        uses_ensd=True,
        eta_option="eta_ancestral",
    ),
    Sampler("Euler", "EulerDiscreteScheduler", "uniform", {}, ("k_euler",), stepwise=True),
    Sampler("LMS", "LMSDiscreteScheduler", "uniform", {}, ("k_lms",), stepwise=True),
    Sampler("Heun", "HeunDiscreteScheduler", "uniform", {}, ("k_heun",)),
    Sampler(
        "DPM2",
        "DPM2Scheduler",
        "karras",
        {},
        ("k_dpm_2",),
        stepwise=True,
        discard_next_to_last_sigma=True,
    ),
    Sampler(
        "DPM2 a",
        "DPM2AncestralScheduler",
        "karras",
        {},
        ("k_dpm_2_a",),
        stepwise=True,
        uses_ensd=True,
        discard_next_to_last_sigma=True,
        eta_option="eta_ancestral",
    ),
    Sampler(
        "DDIM",
        "A1111DDIMScheduler",
        "ddim",
        {"set_alpha_to_one": False},
        ("ddim",),
        sigma_schedules=False,
        timesteps=True,
        eta_option="eta_ddim",
    ),
    Sampler(
        "PLMS",
        "A1111PLMSScheduler",
        "ddim",
        {"set_alpha_to_one": False},
        ("plms",),
        sigma_schedules=False,
        timesteps=True,
    ),
    # A1111's defaults: uni_pc_order 3, variant "bh1". A1111's UniPC ends at t = 1/N, the
    # smallest trained sigma; diffusers' bh1 stepping on to sigma 0 divides by zero (NaN).
    Sampler(
        "UniPC",
        "UniPCMultistepScheduler",
        "uniform",
        {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
        ("unipc",),
        timesteps=True,
    ),
    Sampler("LCM", "LCMScheduler", "uniform", {}, ("k_lcm", "lcm"), sigma_schedules=False),
    # k-diffusion's DPM-Solver loops and A1111's Restart: engine/dpm_solver.py, restart.py.
    Sampler(
        "DPM fast",
        "DPMFastScheduler",
        "uniform",
        {},
        ("k_dpm_fast",),
        stepwise=True,
        uses_ensd=True,
        eta_option="eta_ancestral",
    ),
    Sampler(
        "DPM adaptive",
        "DPMAdaptiveScheduler",
        "uniform",
        {},
        ("k_dpm_ad",),
        stepwise=True,
        uses_ensd=True,
        eta_option="eta_ancestral",
        adaptive=True,
    ),
    Sampler("Restart", "RestartScheduler", "karras", {}, ("restart",), stepwise=True),
)

# A1111 schedule name -> label; the ones diffusers can follow.
SCHEDULES: dict[str, str] = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "beta": "Beta",
    "polyexponential": "Polyexponential",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
}
SCHEDULE_ALIASES = {"sgmuniform": "sgm_uniform"}
UNSUPPORTED_SAMPLERS = ("DDIM CFG++",)
SIGMA_SCHEDULES = frozenset({"karras", "exponential", "beta"})
# Made by sigmas.py: for the stepwise samplers only.
FORMULA_SCHEDULES = frozenset({"polyexponential", "kl_optimal", "align_your_steps"})

STEPWISE = tuple(s.name for s in SAMPLERS if s.stepwise)
_BY_NAME = {s.name.lower(): s for s in SAMPLERS} | {
    alias.lower(): s for s in SAMPLERS for alias in s.aliases
}


@dataclass(frozen=True)
class Resolved:
    sampler: Sampler
    schedule: str  # a key of SCHEDULES, never "automatic"
    requested: str = "automatic"  # the key asked for (a name suffix counts), before resolving

    @property
    def schedule_label(self) -> str:
        """What A1111 writes as "Schedule type": the schedule asked for; for "Automatic", the
        sampler's own (Karras for DPM++ 2M) where A1111 gives it one, else "Automatic"."""
        if self.requested != "automatic" or self.sampler.names_its_schedule:
            return SCHEDULES[self.schedule]
        return "Automatic"

    @property
    def schedule_used(self) -> str | None:
        """The schedule A1111's k-diffusion samplers record in extra_generation_params (and
        compare hires fix's with): None where no schedule function runs (Automatic without a
        schedule of the sampler's own; the timesteps samplers)."""
        if self.sampler.timesteps or self.schedule_label == "Automatic":
            return None
        return self.schedule_label


def resolve(sampler_name: str | None, schedule: str | None = None) -> Resolved:
    """A1111's sampler (and optional schedule suffix) and schedule names -> what to run.

    Raises UnknownSampler naming the valid choices.
    """
    name = (sampler_name or "Euler").strip()
    found = _schedule_key(schedule) if schedule else "automatic"
    sampler = _BY_NAME.get(name.lower())
    if sampler is None:
        name, suffix = _split_suffix(name)
        sampler = _BY_NAME.get(name.lower())
        if sampler is not None and suffix and found == "automatic":
            found = suffix
    if sampler is None:
        raise UnknownSampler(
            f"unknown sampler {sampler_name!r}; the diffusers engine runs: "
            f"{', '.join(s.name for s in SAMPLERS)} (each optionally with a schedule such as "
            f"'Karras': {', '.join(SCHEDULES.values())})"
            + (
                " - A1111's DDIM CFG++ has no diffusers equivalent"
                if name in UNSUPPORTED_SAMPLERS
                else ""
            )
        )
    requested = found
    if found == "automatic":
        found = sampler.default_schedule
    if _refuses(sampler, found):
        raise UnknownSampler(
            f"sampler {sampler.name!r} cannot use the {SCHEDULES[found]!r} schedule in diffusers; "
            "use schedule 'Automatic' (or 'Uniform', 'SGM Uniform', 'Simple') or another sampler"
            + (f" ({', '.join(STEPWISE)} run it)" if found in FORMULA_SCHEDULES else "")
        )
    return Resolved(sampler, found, requested)


def _refuses(sampler: Sampler, schedule: str) -> bool:
    if schedule == sampler.default_schedule or sampler.stepwise:
        return False
    if schedule in FORMULA_SCHEDULES:
        return True
    return schedule in SIGMA_SCHEDULES and not sampler.sigma_schedules


def _schedule_key(schedule: str) -> str:
    key = schedule.strip().lower().replace(" ", "_")
    key = SCHEDULE_ALIASES.get(key, key)
    if key in SCHEDULES:
        return key
    raise UnknownSampler(
        f"unknown schedule type {schedule!r}; the diffusers engine runs: "
        f"{', '.join(SCHEDULES.values())}"
    )


def _split_suffix(name: str) -> tuple[str, str | None]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'karras')."""
    labels = {label.lower(): key for key, label in SCHEDULES.items() if key != "automatic"}
    for label in sorted(labels, key=len, reverse=True):
        if name.lower().endswith(" " + label):
            return name[: -len(label) - 1], labels[label]
    return name, None
