"""ControlNet units as the A1111 extension (Mikubill/sd-webui-controlnet) takes them, its
preprocessor names, and the ControlNet models in MODELS_DIR/ControlNet (plain Python, no torch).

A unit is one dict of `alwayson_scripts.ControlNet.args` (the script title matched
case-insensitively). Only enabled units count. The preprocessors here need no weights; the ones
that do (depth, openpose, ...) are refused by name with the list of those that work.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from a1111_proxy.engine import folders
from a1111_proxy.engine.errors import InvalidParams

CONTROLNET_DIR = "ControlNet"
API_VERSION = 2  # what the extension's /controlnet/version answers
IP_ADAPTER_PREFIX = "ip-adapter"  # units with these modules are image prompts
# The extension's IP-Adapter preprocessors (old and new names) -> the CLIP vision encoder each
# runs; the unit's model must be made for that encoder (engine/ip_adapter.py checks its widths).
IP_ADAPTER_MODULES = {
    "ip-adapter_clip_sd15": "ViT-H",
    "ip-adapter_clip_h": "ViT-H",
    "ip-adapter_clip_sdxl_plus_vith": "ViT-H",
    "ip-adapter_clip_sdxl": "ViT-bigG",
    "ip-adapter_clip_g": "ViT-bigG",
    "ip-adapter_clip_bigg": "ViT-bigG",
}
PICKLED = (".pth", ".pt", ".ckpt", ".bin")
RESIZE_MODES = {  # the extension's names and old aliases -> A1111's resize mode numbers
    "just resize": 0,
    "crop and resize": 1,
    "resize and fill": 2,
    "inner fit (scale to fit)": 1,
    "scale to fit (inner fit)": 1,
    "outer fit (shrink to fit)": 2,
    "envelope (outer fit)": 2,
}
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESOLUTION: dict[str, Any] = {
    "name": "Preprocessor Resolution",
    "value": 512,
    "min": 64,
    "max": 2048,
}


@dataclass(frozen=True)
class Module:
    name: str  # the extension's internal name
    label: str  # its UI name (module_list?alias_names=true); also accepted in units
    sliders: tuple[dict[str, Any], ...] = ()  # threshold_a, threshold_b after the resolution
    resolution: bool = True

    @property
    def detail(self) -> dict[str, Any]:
        sliders = [RESOLUTION, *self.sliders] if self.resolution else list(self.sliders)
        return {"model_free": False, "sliders": sliders}


MODULES = (
    Module("none", "none", resolution=False),
    Module(
        "canny",
        "canny",
        (
            {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
            {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255},
        ),
    ),
    Module("invert", "invert (from white bg & black line)", resolution=False),
    Module(
        "scribble_xdog",
        "scribble_xdog",
        ({"name": "XDoG Threshold", "value": 32, "min": 1, "max": 64},),
    ),
    Module(
        "threshold",
        "threshold",
        ({"name": "Binarization Threshold", "value": 127, "min": 0, "max": 255},),
    ),
    Module("lineart_standard", "lineart_standard (from white bg & black line)"),
    Module(
        "blur_gaussian",
        "blur_gaussian",
        ({"name": "Sigma", "value": 9.0, "min": 0.01, "max": 64.0},),
    ),
    Module(
        "tile_resample",
        "tile_resample",
        ({"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0},),
        resolution=False,
    ),
)
_MODULE_NAMES = {key.lower(): m for m in MODULES for key in (m.name, m.label)}
_MODULE_NAMES["scribble_threshold"] = _MODULE_NAMES["threshold"]


def find_module(name: str) -> Module:
    found = _MODULE_NAMES.get((name or "none").strip().lower())
    if found is None:
        raise InvalidParams(
            f"ControlNet module {name!r} is not available on the diffusers engine (it ships no "
            "preprocessor weights, so depth, openpose, hed and the like are missing); use one of "
            f"{', '.join(m.name for m in MODULES)}, or preprocess the image yourself and send "
            "it with module 'none'"
        )
    return found


@dataclass(frozen=True)
class ControlUnit:
    """One enabled unit, checked, with the extension's defaults filled in."""

    index: int  # position in args (the infotext's "ControlNet N")
    module: Module
    model: str
    weight: float = 1.0
    image: str | None = None  # base64; None: img2img's init image
    resize_mode: int = 1  # 0 just resize, 1 crop and resize, 2 resize and fill
    processor_res: int = -1  # -1: the module's default
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: int = 0  # index into CONTROL_MODES
    save_detected_map: bool = True

    def slider(self, which: int) -> float:
        """threshold_a (0) or threshold_b (1), or the module's default when out of range."""
        value = (self.threshold_a, self.threshold_b)[which]
        if which >= len(self.module.sliders):
            return value
        spec = self.module.sliders[which]
        return float(value) if spec["min"] <= value <= spec["max"] else float(spec["value"])

    def resolution(self) -> int:
        return self.processor_res if 64 <= self.processor_res <= 2048 else RESOLUTION["value"]

    def infotext(self) -> str:
        """What the extension writes as `ControlNet N` in the infotext."""
        fields = {
            "Module": self.module.name,
            "Model": self.model,
            "Weight": self.weight,
            "Resize Mode": ("Just Resize", "Crop and Resize", "Resize and Fill")[self.resize_mode],
            "Processor Res": self.processor_res,
            "Threshold A": self.threshold_a,
            "Threshold B": self.threshold_b,
            "Guidance Start": self.guidance_start,
            "Guidance End": self.guidance_end,
            "Pixel Perfect": self.pixel_perfect,
            "Control Mode": CONTROL_MODES[self.control_mode],
        }
        return ", ".join(f"{key}: {value}" for key, value in fields.items() if value != -1)


def parse_units(alwayson_scripts: dict[str, Any] | None) -> tuple[ControlUnit, ...]:
    """The enabled units of `alwayson_scripts.ControlNet.args`, but for IP-Adapter units
    (engine/image_prompts.py). Raises InvalidParams."""
    return tuple(
        _unit(i, arg) for i, arg in enabled_args(alwayson_scripts) if not is_ip_adapter(arg)
    )


# What a unit may carry as its control image (and the mask the engine does not read).
IMAGE_FIELDS = frozenset({"image", "input_image", "mask", "mask_image"})


def layout(alwayson_scripts: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The enabled ControlNet units without their images: what jobs of one engine batch share
    (each job's control image is an input of its own rows). None: a job that runs alone, for
    an IP-Adapter unit (image prompts are not batched) or a malformed unit (refused when it
    runs)."""
    try:
        enabled = enabled_args(alwayson_scripts)
    except InvalidParams:
        return None
    if any(is_ip_adapter(arg) for _, arg in enabled):
        return None
    return [
        {"index": i, **{key: value for key, value in arg.items() if key not in IMAGE_FIELDS}}
        for i, arg in enabled
    ]


def enabled_args(alwayson_scripts: dict[str, Any] | None) -> list[tuple[int, dict[str, Any]]]:
    """The enabled units of `alwayson_scripts.ControlNet.args` as (index, unit dict)."""
    for title, value in (alwayson_scripts or {}).items():
        if title.lower() == "controlnet":
            args = value.get("args") if isinstance(value, dict) else value
            if args is not None and not isinstance(args, list):
                raise InvalidParams("alwayson_scripts.ControlNet.args must be a list of units")
            return [(i, arg) for i, arg in enumerate(args or []) if _enabled(i, arg)]
    return []


def is_ip_adapter(arg: dict[str, Any]) -> bool:
    """An IP-Adapter unit (an image prompt), by its module's name."""
    return str(arg.get("module") or "").strip().lower().startswith(IP_ADAPTER_PREFIX)


def _enabled(index: int, arg: Any) -> bool:
    if not isinstance(arg, dict):
        raise InvalidParams(
            f"alwayson_scripts.ControlNet.args[{index}] must be an object (a ControlNet unit)"
        )
    return bool(arg.get("enabled", False))


def _unit(index: int, arg: dict[str, Any]) -> ControlUnit:
    where = f"alwayson_scripts.ControlNet.args[{index}]"
    aliases = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram"}
    arg = {aliases.get(k, k): v for k, v in arg.items()}
    model = str(arg.get("model") or "None")
    if model.strip().lower() == "none":
        raise InvalidParams(
            f"{where}.model: the unit is enabled but has no model; name one "
            "from /controlnet/model_list"
        )
    start = number(arg, "guidance_start", 0.0, where)
    end = number(arg, "guidance_end", 1.0, where)
    if not 0.0 <= start <= end <= 1.0:
        raise InvalidParams(
            f"{where}: guidance_start and guidance_end must satisfy "
            f"0 <= start <= end <= 1 (got {start} and {end})"
        )
    return ControlUnit(
        index=index,
        module=find_module(str(arg.get("module") or "none")),
        model=model,
        weight=number(arg, "weight", 1.0, where),
        image=_image(arg.get("image"), where),
        resize_mode=_resize_mode(arg.get("resize_mode", 1), where),
        processor_res=int(number(arg, "processor_res", -1, where)),
        threshold_a=number(arg, "threshold_a", -1.0, where),
        threshold_b=number(arg, "threshold_b", -1.0, where),
        guidance_start=start,
        guidance_end=end,
        pixel_perfect=bool(arg.get("pixel_perfect", False)),
        control_mode=_control_mode(arg.get("control_mode", 0), where),
        save_detected_map=arg.get("save_detected_map") is not False,
    )


def number(arg: dict[str, Any], key: str, default: float, where: str) -> float:
    value = arg.get(key)
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidParams(f"{where}.{key} must be a number (got {value!r})") from None


def _image(value: Any, where: str) -> str | None:
    """The extension takes a string, {"image", "mask"}, [image, mask] or a list of those; the
    engine uses the first image."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("image")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidParams(f"{where}.image must be a base64 image")
    if value.startswith(("http://", "https://")):
        raise InvalidParams(
            f"{where}.image: the diffusers engine does not fetch image URLs; "
            "send base64 or a data: URI"
        )
    return value


def _resize_mode(value: Any, where: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        return 0 if number == 3 else number if number in (0, 1, 2) else _bad_resize(value, where)
    mode = RESIZE_MODES.get(str(value).strip().lower())
    return _bad_resize(value, where) if mode is None else mode


def _bad_resize(value: Any, where: str) -> int:
    raise InvalidParams(
        f"{where}.resize_mode {value!r} is not one of 'Just Resize', "
        "'Crop and Resize', 'Resize and Fill' (or 0, 1, 2)"
    )


def _control_mode(value: Any, where: str) -> int:
    if isinstance(value, int | float) and not isinstance(value, bool) and int(value) in (0, 1, 2):
        return int(value)
    if isinstance(value, str):
        if value.isdigit() and int(value) in (0, 1, 2):
            return int(value)
        for i, name in enumerate(CONTROL_MODES):
            if value.strip().lower() == name.lower():
                return i
    raise InvalidParams(
        f"{where}.control_mode {value!r} is not one of "
        f"{', '.join(repr(m) for m in CONTROL_MODES)} (or 0, 1, 2)"
    )


@dataclass(frozen=True)
class ControlNetFile:
    name: str  # file stem or folder name
    path: Path
    folder: bool  # a diffusers folder (config.json + weights), else one .safetensors file
    hash: str | None  # the extension's short hash (A1111's old 8-digit model hash)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name


class ControlNetCatalog:
    """The models under MODELS_DIR/ControlNet the engine can run: diffusers folders (config.json
    + weights) and single .safetensors files (A1111's layout or diffusers' keys). Pickled files
    (.pth, .ckpt, ...) are not listed; naming one gets a message saying what to use instead."""

    def __init__(self, models_dir: str | os.PathLike[str]) -> None:
        self.root = Path(models_dir) / CONTROLNET_DIR
        self.pickled: list[Path] = []
        self.models = self.scan()

    def scan(self) -> list[ControlNetFile]:
        found: list[ControlNetFile] = []
        self.pickled = []
        if not self.root.is_dir():
            return found
        for here, dirnames, filenames in folders.walk(self.root):
            if (here / "config.json").is_file() and here != self.root:
                found.append(ControlNetFile(here.name, here, True, _folder_hash(here)))
                dirnames.clear()
                continue
            for filename in sorted(filenames):
                path = here / filename
                if filename.lower().endswith(".safetensors"):
                    found.append(ControlNetFile(path.stem, path, False, short_hash(path)))
                elif filename.lower().endswith(PICKLED):
                    self.pickled.append(path)
        return sorted(found, key=lambda m: m.name.lower())

    def find(self, wanted: str) -> ControlNetFile:
        """By "name [hash]", name or hash, as the extension matches. Raises InvalidParams."""
        for attempt in range(2):
            if attempt:
                self.models = self.scan()
            found = self._match(wanted.strip())
            if found is not None:
                return found
        bare = wanted.split(" [", 1)[0].strip().lower()
        pickled = next((p for p in self.pickled if p.stem.lower() == bare), None)
        if pickled is not None:
            raise InvalidParams(
                f"ControlNet model {wanted!r} is a pickled file ({pickled.name}); the diffusers "
                "engine never unpickles files, since loading one can run arbitrary code. Put "
                f"the .safetensors version of the model in {self.root}"
            )
        names = [m.title for m in self.models]
        close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = ", ".join(names) if names else f"none (put models in {self.root})"
        raise InvalidParams(
            f"ControlNet model {wanted!r} not found in {self.root}{hint} Known models: {known}"
        )

    def _match(self, wanted: str) -> ControlNetFile | None:
        # As the extension: the exact title, else the name before " [hash]" (a stale hash is
        # no reason to refuse), else the hash alone.
        bare = wanted.split(" [", 1)[0].strip().lower()
        for model in self.models:
            if wanted == model.title or bare == model.name.lower():
                return model
        return next((m for m in self.models if m.hash and m.hash == wanted.lower()), None)

    def version(self) -> dict[str, Any]:
        """The extension's /controlnet/version."""
        return {"version": API_VERSION}

    def model_list(self) -> dict[str, Any]:
        """The extension's /controlnet/model_list: the models in MODELS_DIR."""
        return {"model_list": [m.title for m in self.models]}

    def module_list(self) -> dict[str, Any]:
        """The extension's /controlnet/module_list: the preprocessors the engine runs."""
        image_prompts = {name: {"model_free": False, "sliders": []} for name in IP_ADAPTER_MODULES}
        return {
            "module_list": [m.name for m in MODULES] + list(IP_ADAPTER_MODULES),
            "module_detail": {m.name: m.detail for m in MODULES} | image_prompts,
        }


def _folder_hash(folder: Path) -> str | None:
    weights = sorted(folder.glob("*.safetensors"))
    return short_hash(weights[0]) if weights else None


def short_hash(path: Path) -> str:
    """The extension's short hash: A1111's old model hash (AutoV1), the sha256 of the 64 KiB at
    1 MiB into the file; for a folder, of its weights file."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
