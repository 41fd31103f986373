"""ControlNet on a job (torch, diffusers): the units' models and detected maps, the task's
pipeline rebuilt with its ControlNet (one, or several as a MultiControlNetModel), and the
extension's control modes.

Control modes, as the extension defines them: "Balanced" adds the ControlNet's residuals at the
unit's weight to both halves of the CFG batch; "My prompt is more important" scales them down
towards the UNet's input blocks (weight * 0.825^k, k counting from the middle block outwards);
"ControlNet is more important" does that and adds them to the conditional half only. A forward
hook on each ControlNet applies this, so diffusers' own guess mode is never used.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import diffusers
import torch
from PIL import Image

from a1111_proxy.engine import images, preprocessors
from a1111_proxy.engine.controlnet import ControlNetCatalog, ControlNetFile, ControlUnit
from a1111_proxy.engine.errors import InvalidParams
from a1111_proxy.engine.models import assemble
from a1111_proxy.engine.params import Params

log = logging.getLogger("a1111_proxy.engine")
MAX_MODELS = 3  # ControlNet models kept loaded
SOFT = 0.825  # the extension's per-block decay for the two non-balanced modes
_CLASSES = {
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline": "StableDiffusionXLControlNetInpaintPipeline",
}


@dataclass
class Control:
    """What the job's enabled units need at run time."""

    units: tuple[ControlUnit, ...]
    nets: list[Any]  # one ControlNetModel per unit (the same model twice: two instances)
    images: list[Image.Image]  # the control images, at the job's size
    detected: list[Image.Image] = field(default_factory=list)  # appended to `images`

    @property
    def infotext(self) -> dict[str, str]:
        return {f"ControlNet {u.index}": u.infotext() for u in self.units}


class ControlNets:
    """The ControlNet models of one engine, least recently used dropped first."""

    def __init__(self, models_dir: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.catalog = ControlNetCatalog(models_dir)
        self.device, self.dtype = device, dtype
        self.loaded: OrderedDict[str, Any] = OrderedDict()

    def get(self, name: str, unet: Any) -> Any:
        found = self.catalog.find(name)
        key = str(found.path)
        if key not in self.loaded:
            while len(self.loaded) >= MAX_MODELS:
                self.loaded.popitem(last=False)
            self.loaded[key] = self._load(found, unet)
        self.loaded.move_to_end(key)
        model = self.loaded[key]
        _check_fits(found, model, unet)
        return model

    def _load(self, found: ControlNetFile, unet: Any) -> Any:
        log.info("loading ControlNet %s", found.path)
        try:
            if found.folder:
                model = diffusers.ControlNetModel.from_pretrained(found.path, local_files_only=True)
            else:
                model = _from_single_file(found, unet)
        except InvalidParams:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise InvalidParams(
                f"cannot load ControlNet model {found.title}: {type(exc).__name__}: "
                f"{str(exc)[:300]}"
            ) from None
        model.to(self.device, self.dtype)
        model.eval()
        model.register_forward_hook(_apply_mode)
        return model


def _from_single_file(found: ControlNetFile, unet: Any) -> Any:
    """A single .safetensors ControlNet (A1111's LDM keys, or diffusers' keys in one file), built
    on the loaded UNet's configuration: no config download, as real ControlNets mirror it."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    state = load_file(str(found.path))
    if "difference" in state:
        raise InvalidParams(
            f"ControlNet model {found.title} is a 'difference' ControlNet (ControlNet 1.0), which "
            "the diffusers engine does not support; use the ControlNet 1.1 version"
        )
    if "controlnet_cond_embedding.conv_in.weight" not in state:
        config = {"layers_per_block": unet.config.layers_per_block}
        converted = convert_controlnet_checkpoint(state, config)
        prefix = "control_model." if any(k.startswith("control_model.") for k in state) else ""
        for new, old in (("linear_1", "0.0"), ("linear_2", "0.2")):  # SDXL's added embedding
            for kind in ("weight", "bias"):
                if f"{prefix}label_emb.{old}.{kind}" in state:
                    converted[f"add_embedding.{new}.{kind}"] = state[
                        f"{prefix}label_emb.{old}.{kind}"
                    ]
        state = {k: v for k, v in converted.items() if v is not None}
    with init_empty_weights():
        model = diffusers.ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=_embedding_channels(state),
            load_weights_from_unet=False,
            conditioning_channels=state["controlnet_cond_embedding.conv_in.weight"].shape[1],
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise InvalidParams(
            f"ControlNet model {found.title} does not fit the loaded checkpoint (made for another "
            "model family, or a 'mid'/'small' variant); pick one made for the checkpoint "
            f"({str(exc)[:200]})"
        ) from None
    return model


def _embedding_channels(state: dict[str, Any]) -> tuple[int, ...]:
    """The conditioning embedder's widths: conv_in's, then every second block's output."""
    channels = [state["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    block = 1
    while f"controlnet_cond_embedding.blocks.{block}.weight" in state:
        channels.append(state[f"controlnet_cond_embedding.blocks.{block}.weight"].shape[0])
        block += 2
    return tuple(channels)


def _check_fits(found: ControlNetFile, model: Any, unet: Any) -> None:
    if model.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise InvalidParams(
            f"ControlNet model {found.title} does not fit the loaded checkpoint (made for "
            "another model family, e.g. SD1.5 and SDXL); pick one made for the checkpoint"
        )


_engines: WeakKeyDictionary[Any, ControlNets] = WeakKeyDictionary()


def unload(models: Any) -> None:
    """Forget the ControlNet models loaded for this engine (unload-checkpoint)."""
    _engines.pop(models, None)


def prepare(models: Any, loaded: Any, params: Params) -> Control | None:
    """Load the units' models and make their control images (None: no enabled unit)."""
    if not params.controlnet_units:
        return None
    nets_of = _engines.get(models)
    if nets_of is None:
        nets_of = _engines[models] = ControlNets(
            models.config.models_dir, models.device, models.dtype
        )
    nets, seen = [], set()
    for unit in params.controlnet_units:
        net = nets_of.get(unit.model, loaded.pipe.unet)
        if id(net) in seen:  # its own instance, for its own control mode (weights shared)
            net = copy.copy(net)
        seen.add(id(net))
        net.a1111_mode = (unit.control_mode, params.cfg_scale > 1)
        nets.append(net)
    control = Control(params.controlnet_units, nets, [])
    for unit in params.controlnet_units:
        image = control_image(unit, params)
        control.images.append(image)
        if unit.save_detected_map:
            control.detected.append(image)
    return control


def control_image(unit: ControlUnit, params: Params) -> Image.Image:
    where = f"alwayson_scripts.ControlNet.args[{unit.index}].image"
    if unit.image is not None:
        source = images.decode(unit.image, where)
    elif params.kind == "img2img" and params.init_images:
        source = images.decode(params.init_images[0], "init_images[0]")
    else:
        raise InvalidParams(
            f"{where}: the ControlNet unit is enabled but has no image; send "
            "one (base64) in the unit"
        )
    source = source.convert("RGB")
    w, h = params.width, params.height
    resolution = None
    if unit.module.resolution:
        resolution = (
            preprocessors.pixel_perfect_resolution(source, unit.resize_mode, w, h)
            if unit.pixel_perfect
            else unit.resolution()
        )
    detected = preprocessors.detect(
        source, unit.module.name, resolution=resolution, a=unit.slider(0), b=unit.slider(1)
    )
    return preprocessors.fit(detected, unit.resize_mode, w, h)


def resized(control: Control, width: int, height: int) -> Control:
    """The same units and models for hires fix's second pass, the images at its size."""
    fitted = [
        preprocessors.fit(image, unit.resize_mode, width, height)
        for unit, image in zip(control.units, control.images, strict=True)
    ]
    return Control(control.units, control.nets, fitted)


def with_controlnet(pipe: Any, control: Control) -> Any:
    """The same task as `pipe`, as its ControlNet pipeline class, sharing every component."""
    cls = getattr(diffusers, _CLASSES[type(pipe).__name__])
    nets = control.nets[0] if len(control.nets) == 1 else list(control.nets)
    return assemble(cls, pipe.components, controlnet=nets)


def per_row(controls: list[Control], counts: list[int]) -> list[list[Image.Image]]:
    """A batch of jobs with the same units (engine/batch.py): each row's control images (one
    per unit), each job's for its `counts` rows, the jobs one after another."""
    return [c.images for c, count in zip(controls, counts, strict=True) for _ in range(count)]


def call_kwargs(
    control: Control, task: str, rows: list[list[Image.Image]] | None = None
) -> dict[str, Any]:
    """The pipeline's ControlNet arguments: `control`'s images for every row, or `rows`' own
    (per_row: diffusers takes one image per row, and per row one list per unit for several)."""
    single = len(control.units) == 1

    def per_unit(values: list[Any]) -> Any:
        return values[0] if single else values

    if rows is None:
        images = per_unit(control.images)
    else:
        images = [row[0] for row in rows] if single else rows
    return {
        "image" if task == "txt2img" else "control_image": images,
        "controlnet_conditioning_scale": per_unit([u.weight for u in control.units]),
        "control_guidance_start": per_unit([u.guidance_start for u in control.units]),
        "control_guidance_end": per_unit([u.guidance_end for u in control.units]),
        "guess_mode": False,
    }


def _apply_mode(module: Any, args: Any, output: Any) -> Any:
    mode, cfg = getattr(module, "a1111_mode", (0, False))
    if mode == 0 or not isinstance(output, tuple):
        return output
    down, mid = output
    residuals = [*down, mid]
    count = len(residuals)
    scaled = [r * SOFT ** float(count - 1 - i) for i, r in enumerate(residuals)]
    if mode == 2 and cfg:  # the conditional half only (diffusers: [uncond, cond])
        half = scaled[0].shape[0] // 2
        scaled = [torch.cat([torch.zeros_like(r[:half]), r[half:]]) for r in scaled]
    return scaled[:-1], scaled[-1]
