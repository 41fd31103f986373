"""Image prompts on a job (torch, diffusers, transformers): IP-Adapter models from
MODELS_DIR/ControlNet, CLIP vision encoders from MODELS_DIR/clip_vision, and the cross-attention
that adds the image prompt to the text prompt.

An IP-Adapter file is A1111's single-file layout: `image_proj.*` (the projection of the CLIP
image embedding to tokens: a linear layer for the plain models, a resampler over the encoder's
penultimate hidden states for the "plus" ones) and `ip_adapter.<n>.to_k_ip/to_v_ip.weight` for
the UNet's n-th attention layer (n odd: the cross-attention layers, in the UNet's order). The
projection is converted with diffusers' own converter. An encoder is a single .safetensors file
of CLIPVisionModelWithProjection (its configuration read from the tensors' shapes) or a folder
with config.json (an `image_encoder` folder); the one whose width fits the model is used.

Each cross-attention layer adds, per unit, weight x attention(query, to_k_ip(tokens),
to_v_ip(tokens)) to the text attention (before the output projection, as IP-Adapter does): the
image's tokens for the conditional half of the batch, the tokens of "no image" (zero
embeddings; for plus models a black image's features) for the unconditional half. A unit's step
range sets its weight to 0 outside the range, through the step callback.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from PIL import Image

from a1111_proxy.engine import folders, images
from a1111_proxy.engine.attention import SkipPadding
from a1111_proxy.engine.controlnet import ControlNetCatalog
from a1111_proxy.engine.errors import InvalidParams
from a1111_proxy.engine.image_prompts import ImagePromptUnit
from a1111_proxy.engine.params import Params

log = logging.getLogger("a1111_proxy.engine")
CLIP_VISION_DIR = "clip_vision"
MAX_LOADED = 2  # IP-Adapter models and encoders kept loaded (each)
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
_SOURCES = {"ViT-H": "models/image_encoder", "ViT-bigG": "sdxl_models/image_encoder"}


@dataclass
class Adapter:
    """One loaded IP-Adapter model."""

    title: str
    projection: torch.nn.Module
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # to_k_ip, to_v_ip per cross-attention
    plus: bool  # takes the encoder's penultimate hidden states, not its image embedding
    width: int  # the encoder width it takes (projection dim, or hidden size for plus)


@dataclass
class Encoder:
    path: Path
    model: Any  # CLIPVisionModelWithProjection
    size: int  # input image side


@dataclass
class Prompt:
    """One unit, ready to run: its averaged tokens and its model's attention weights."""

    unit: ImagePromptUnit
    tokens: torch.Tensor  # (2, T, D): no image, the image(s)
    layers: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ImagePrompts:
    prompts: list[Prompt]

    @property
    def infotext(self) -> dict[str, str]:
        return {f"ControlNet {p.unit.index}": p.unit.infotext() for p in self.prompts}


class Library:
    """The IP-Adapter models and CLIP vision encoders of one engine, least recently used
    dropped first."""

    def __init__(self, models_dir: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.catalog = ControlNetCatalog(models_dir)
        self.clip_root = Path(models_dir) / CLIP_VISION_DIR
        self.device, self.dtype = device, dtype
        self.adapters: OrderedDict[str, Adapter] = OrderedDict()
        self.encoders: OrderedDict[str, Encoder] = OrderedDict()

    def adapter(self, name: str, unet: Any) -> Adapter:
        found = self.catalog.find(name)
        key = str(found.path)
        if key not in self.adapters:
            _bounded(self.adapters)
            self.adapters[key] = self._load_adapter(found.title, found.path, unet)
        self.adapters.move_to_end(key)
        adapter = self.adapters[key]
        _check_fits(adapter, unet)
        return adapter

    def _load_adapter(self, title: str, path: Path, unet: Any) -> Adapter:
        from safetensors.torch import load_file

        log.info("loading IP-Adapter %s", path)
        state = load_file(str(path)) if path.is_file() else {}
        proj = {k[len("image_proj.") :]: v for k, v in state.items() if k.startswith("image_proj.")}
        attn = {k[len("ip_adapter.") :]: v for k, v in state.items() if k.startswith("ip_adapter.")}
        if not proj or not attn:
            raise InvalidParams(
                f"{title} is not an IP-Adapter model (no image_proj.* and ip_adapter.* weights); "
                "use an ip-adapter_* .safetensors file in A1111's single-file layout"
            )
        plus = "latents" in proj
        if not plus and "proj.weight" not in proj:
            raise InvalidParams(
                f"IP-Adapter {title} is a kind the diffusers engine does not run (full-face or "
                "face ID); use a plain or plus IP-Adapter"
            )
        try:
            projection = unet._convert_ip_adapter_image_proj_to_diffusers(
                proj, low_cpu_mem_usage=False
            )
        except (KeyError, RuntimeError, ValueError) as exc:
            raise InvalidParams(f"cannot load IP-Adapter {title}: {str(exc)[:300]}") from None
        projection.to(self.device, self.dtype).eval()
        count = len([k for k in attn if k.endswith(".to_k_ip.weight")])
        layers = [
            (
                attn[f"{2 * n + 1}.to_k_ip.weight"].to(self.device, self.dtype),
                attn[f"{2 * n + 1}.to_v_ip.weight"].to(self.device, self.dtype),
            )
            for n in range(count)
        ]
        width = proj["proj_in.weight"].shape[1] if plus else proj["proj.weight"].shape[1]
        return Adapter(title, projection, layers, plus, int(width))

    def encoder(self, adapter: Adapter, unit: ImagePromptUnit, where: str) -> Encoder:
        path = _find_encoder(self.clip_root, adapter, unit, where)
        key = str(path)
        if key not in self.encoders:
            _bounded(self.encoders)
            self.encoders[key] = _load_encoder(path, self.device, self.dtype)
        self.encoders.move_to_end(key)
        return self.encoders[key]


def _bounded(loaded: OrderedDict[str, Any]) -> None:
    while len(loaded) >= MAX_LOADED:
        loaded.popitem(last=False)


def _check_fits(adapter: Adapter, unet: Any) -> None:
    cross = [m for name, m in _cross_attentions(unet)]
    shapes = [(m.to_k.weight.shape[0], unet.config.cross_attention_dim) for m in cross]
    if [tuple(k.shape) for k, _ in adapter.layers] != shapes:
        raise InvalidParams(
            f"IP-Adapter {adapter.title} does not fit the loaded checkpoint (made for another "
            "model family, e.g. SD1.5 and SDXL); pick one made for the checkpoint"
        )


def _cross_attentions(unet: Any) -> list[tuple[str, Any]]:
    """The UNet's cross-attention modules in its attn_processors order (IP-Adapter's)."""
    modules = dict(unet.named_modules())
    names = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    return [(name, modules[name]) for name in names]


def _find_encoder(root: Path, adapter: Adapter, unit: ImagePromptUnit, where: str) -> Path:
    """The encoder in MODELS_DIR/clip_vision whose width fits the adapter (the module's
    encoder named in the file preferred). Raises InvalidParams saying what to put where."""
    candidates = _encoders(root)
    fits = [path for path, widths in candidates if adapter.width in widths[int(adapter.plus)]]
    hint = unit.encoder.lower().replace("vit-", "")
    fits.sort(key=lambda p: (hint not in p.name.lower(), p.name.lower()))
    if fits:
        return fits[0]
    found = ", ".join(p.name for p, _ in candidates) or "nothing"
    raise InvalidParams(
        f"{where}: IP-Adapter {adapter.title} needs a CLIP vision encoder ({unit.encoder}, "
        f"{adapter.width} wide) in {root}, and none there fits (found: {found}). Put the "
        f"encoder there as one .safetensors file (e.g. h94/IP-Adapter's "
        f"{_SOURCES[unit.encoder]}/model.safetensors, renamed), or its image_encoder folder "
        "with config.json; the engine downloads nothing"
    )


def _encoders(root: Path) -> list[tuple[Path, tuple[set[int], set[int]]]]:
    """(path, (projection widths, hidden widths)) of each encoder under root."""
    found: list[tuple[Path, tuple[set[int], set[int]]]] = []
    if not root.is_dir():
        return found
    for here, dirnames, filenames in folders.walk(root):
        if (here / "config.json").is_file():
            found.append((here, _folder_widths(here)))
            dirnames.clear()
            continue
        for name in sorted(filenames):
            if name.lower().endswith(".safetensors"):
                found.append((here / name, _file_widths(here / name)))
    return found


def _folder_widths(folder: Path) -> tuple[set[int], set[int]]:
    config = _vision_config(json.loads((folder / "config.json").read_text("utf-8")))
    return {int(config.get("projection_dim", 512))}, {int(config.get("hidden_size", 768))}


def _vision_config(config: dict[str, Any]) -> dict[str, Any]:
    vision: dict[str, Any] = config.get("vision_config") or config
    return vision


def _file_widths(path: Path) -> tuple[set[int], set[int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            if "visual_projection.weight" not in keys:
                return set(), set()
            proj, hidden = f.get_slice("visual_projection.weight").get_shape()
    except (OSError, RuntimeError, ValueError):
        return set(), set()
    return {int(proj)}, {int(hidden)}


def _load_encoder(path: Path, device: torch.device, dtype: torch.dtype) -> Encoder:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    log.info("loading CLIP vision encoder %s", path)
    model: Any
    if path.is_dir():
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
    else:
        from accelerate import init_empty_weights
        from safetensors.torch import load_file

        state = {k: v for k, v in load_file(str(path)).items() if not k.endswith("position_ids")}
        with init_empty_weights():
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**_config_from(state)))
        missing, _ = model.load_state_dict(state, strict=False, assign=True)
        if missing:
            raise InvalidParams(
                f"{path.name} in clip_vision is not a CLIP vision encoder in transformers' layout "
                f"(missing {missing[0]}, ...); use an image_encoder's model.safetensors"
            )
    model.to(device, dtype).eval()
    return Encoder(path, model, int(model.config.image_size))


def _config_from(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A CLIPVisionConfig from a state dict's shapes. The head count is not in the shapes: the
    encoders IP-Adapter uses (ViT-L, ViT-H, ViT-bigG) have 16 heads, ViT-B 12 (64 wide)."""
    hidden = state["vision_model.embeddings.class_embedding"].shape[0]
    patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 0
    while f"vision_model.encoder.layers.{layers}.mlp.fc1.weight" in state:
        layers += 1
    return {
        "hidden_size": hidden,
        "intermediate_size": state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": layers,
        "num_attention_heads": 16 if hidden >= 1024 else max(1, hidden // 64),
        "patch_size": patch,
        "image_size": patch * math.isqrt(positions - 1),
        "projection_dim": state["visual_projection.weight"].shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }


_engines: WeakKeyDictionary[Any, Library] = WeakKeyDictionary()


def unload(models: Any) -> None:
    """Forget the IP-Adapter models and encoders loaded for this engine."""
    _engines.pop(models, None)


def prepare(models: Any, loaded: Any, params: Params) -> ImagePrompts | None:
    """Load the units' models and encoders and embed their images (None: no unit)."""
    if not params.image_prompts:
        return None
    library = _engines.get(models)
    if library is None:
        library = _engines[models] = Library(models.config.models_dir, models.device, models.dtype)
    prompts = []
    for unit in params.image_prompts:
        where = f"alwayson_scripts.ControlNet.args[{unit.index}]"
        adapter = library.adapter(unit.model, loaded.pipe.unet)
        encoder = library.encoder(adapter, unit, where)
        tokens = embed(adapter, encoder, unit_images(unit, params, where))
        prompts.append(Prompt(unit, tokens, adapter.layers))
    return ImagePrompts(prompts)


def unit_images(unit: ImagePromptUnit, params: Params, where: str) -> list[Image.Image]:
    if unit.images:
        return [images.decode(image, f"{where}.image").convert("RGB") for image in unit.images]
    if params.kind == "img2img" and params.init_images:
        return [images.decode(params.init_images[0], "init_images[0]").convert("RGB")]
    raise InvalidParams(
        f"{where}.image: the IP-Adapter unit is enabled but has no image; send one (base64), "
        "or several as a list"
    )


@torch.inference_mode()
def embed(adapter: Adapter, encoder: Encoder, pictures: list[Image.Image]) -> torch.Tensor:
    """(2, T, D): the tokens of no image, and the mean of the images' tokens."""
    model = encoder.model
    pixels = torch.stack([pixel_values(p, encoder.size) for p in pictures])
    pixels = pixels.to(model.device, model.dtype)
    if adapter.plus:
        features = model(pixels, output_hidden_states=True).hidden_states[-2]
        empty = model(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
    else:
        features = model(pixels).image_embeds
        empty = torch.zeros_like(features[:1])
    cond = adapter.projection(features).mean(dim=0)
    uncond = adapter.projection(empty)[0]
    return torch.stack([uncond, cond])


def pixel_values(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP's preprocessing: the short side to `size` (bicubic), centre crop, normalise."""
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = data.reshape(size, size, 3).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@dataclass
class Steering:
    """The image prompts of one run and the step it is at (the step callback moves it)."""

    prompts: list[Prompt]
    cfg: bool  # the batch is [unconditional, conditional]
    heads: list[int]  # per cross-attention layer
    pipe: Any = None
    step: int = 0
    _kv: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def on_step_end(self, pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self.step = i + 1
        return tensors

    def added(self, attn: Any, hidden_states: torch.Tensor, layer: int) -> torch.Tensor | None:
        """What the image prompts add to this cross-attention layer's output, or None."""
        steps = getattr(self.pipe, "_num_timesteps", 0)
        active = [p for p in self.prompts if p.unit.weight and p.unit.active(self.step, steps)]
        if not active or hidden_states.ndim != 3:
            return None
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        inner = query.shape[-1]
        query = query.view(batch, -1, attn.heads, inner // attn.heads).transpose(1, 2)
        total = query.new_zeros(batch, hidden_states.shape[1], inner)
        for n, prompt in enumerate(active):
            key, value = self._keys(n, prompt, layer, batch, hidden_states)
            out = F.scaled_dot_product_attention(query, key, value)
            total = total + prompt.unit.weight * out.transpose(1, 2).reshape(batch, -1, inner)
        added: torch.Tensor = F.linear(total, attn.to_out[0].weight) / attn.rescale_output_factor
        return added

    def _keys(
        self, n: int, prompt: Prompt, layer: int, batch: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values of the prompt's tokens for this batch (computed once)."""
        cached = self._kv.get((n, layer, batch))
        if cached is not None:
            return cached
        tokens = prompt.tokens.to(like.device, like.dtype)
        half = batch // 2 if self.cfg and batch % 2 == 0 else 0
        rows = torch.cat([tokens[:1].expand(half, -1, -1), tokens[1:].expand(batch - half, -1, -1)])
        heads = self.heads[layer]
        to_k, to_v = prompt.layers[layer]
        shaped = [
            F.linear(rows, w.to(like.dtype)).view(batch, -1, heads, w.shape[0] // heads)
            for w in (to_k, to_v)
        ]
        kv = (shaped[0].transpose(1, 2), shaped[1].transpose(1, 2))
        self._kv[(n, layer, batch)] = kv
        return kv


class ImagePromptAttention:
    """Cross-attention: SkipPadding's text attention plus the image prompts' (Steering)."""

    def __init__(self, steering: Steering, layer: int) -> None:
        self.base = SkipPadding()
        self.steering, self.layer = steering, layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        out = self.base(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )
        added = self.steering.added(attn, hidden_states, self.layer)
        return out if added is None else out + added.to(out.dtype)


def install(unet: Any, found: ImagePrompts | None, *, cfg: bool, pipe: Any) -> Any:
    """Put the run's image prompts on the UNet's cross-attention layers (after
    attention.install, which puts its own processors back on the next run without them).
    Returns the step hook that moves their step, or None when there are none."""
    if found is None:
        return None
    unet = getattr(unet, "_orig_mod", unet)  # under ENGINE_COMPILE (engine/compiled.py)
    cross = _cross_attentions(unet)
    steering = Steering(found.prompts, cfg, [module.heads for _, module in cross], pipe)
    processors = dict(unet.attn_processors)
    for layer, (name, _) in enumerate(cross):
        processors[f"{name}.processor"] = ImagePromptAttention(steering, layer)
    unet.set_attn_processor(processors)
    return steering.on_step_end
