"""Tiny random-weight Stable Diffusion models, built offline, for the engine tests.

Shapes follow real SD1.5 and SDXL (a 4-block VAE, so images are 8x their latents) at a tiny
width. `write_single_file` saves an SD1.5-layout pipeline as an A1111-style single-file
checkpoint (LDM key names), so the tests exercise `from_single_file` as real checkpoints do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
)


def tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer (514 tokens, no merges): one token per character."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in _byte_codes()]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _byte_codes() -> list[int]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return codes


def text_config(vocab: int, projection: int | None = None, hidden: int = 32) -> CLIPTextConfig:
    extra = {"hidden_act": "gelu", "projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab,
        max_position_embeddings=77,
        **extra,
    )


def text_encoder(cls: type, config: CLIPTextConfig) -> torch.nn.Module:
    model = cls(config)
    with torch.no_grad():  # a non-zero final LayerNorm bias, as trained CLIPs have
        final = getattr(model, "text_model", model).final_layer_norm
        final.bias.normal_(0, 0.5)
    return model


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )


def taesd(folder: Path, seed: int = 0) -> None:
    """A random-weight TAESD (AutoencoderTiny) saved as a diffusers folder: like the real one,
    it decodes a latent to 8x its size."""
    torch.manual_seed(seed)
    from diffusers import AutoencoderTiny

    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).save_pretrained(folder)


def sd15(folder: Path, *, inpaint: bool = False, seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5's layout (attention in the first blocks, none in the last), tiny."""
    torch.manual_seed(seed)
    tok = tokenizer(folder.parent / "_tokenizer")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae(),
        text_encoder=text_encoder(CLIPTextModel, text_config(len(tok))),
        tokenizer=tok,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def sdxl(folder: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tok = tokenizer(folder.parent / "_tokenizer")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the 32-wide pooled text
        cross_attention_dim=96,  # the two encoders' widths side by side: 32 + 64
    )
    # Different widths, as in real SDXL (768 and 1280): single-file loading tells them apart so.
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae(),
        text_encoder=text_encoder(CLIPTextModel, text_config(len(tok), projection=32)),
        tokenizer=tok,
        text_encoder_2=text_encoder(
            CLIPTextModelWithProjection, text_config(len(tok), projection=32, hidden=64)
        ),
        tokenizer_2=tok,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def write_single_file(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, path: Path
) -> None:
    """An A1111-style checkpoint: one safetensors file with LDM (original SD) key names; for
    SDXL the second text encoder in OpenCLIP's names, as in Stability's files."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in _unet_to_ldm(pipe.unet).items():
        tensors["model.diffusion_model." + key] = value
    for key, value in _vae_to_ldm(pipe.vae).items():
        tensors["first_stage_model." + key] = value
    xl = getattr(pipe, "text_encoder_2", None) is not None
    prefix = "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer."
    for key, value in pipe.text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key
        tensors[prefix + name] = value
    if xl:
        for key, value in _clip_to_open_clip(pipe.text_encoder_2).items():
            tensors["conditioner.embedders.1.model." + key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


_OPEN_CLIP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _clip_to_open_clip(model: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    out = {_OPEN_CLIP[k]: v for k, v in state.items() if k in _OPEN_CLIP}
    out["text_projection"] = state["text_projection.weight"].T
    for i in range(model.config.num_hidden_layers):
        layer = f"text_model.encoder.layers.{i}."
        block = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            parts = [state[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts)
            for old, new in _OPEN_CLIP_LAYER.items():
                out[f"{block}{new}.{kind}"] = state[f"{layer}{old}.{kind}"]
    return out


_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    per = unet.config.layers_per_block + 1
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks", "mid_block"):
            out[_unet_block_key(parts, per, unet)] = value
        else:
            head = ".".join(parts[:-1])
            out[f"{_UNET_FIXED.get(head, head)}.{parts[-1]}"] = value
    return out


def _unet_block_key(parts: list[str], per: int, unet: UNet2DConditionModel) -> str:
    def resnet(rest: list[str]) -> str:
        return ".".join([_RESNET.get(rest[0], rest[0]), *rest[1:]])

    if parts[0] == "mid_block":
        index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        rest = resnet(parts[3:]) if parts[1] == "resnets" else ".".join(parts[3:])
        return f"middle_block.{index}.{rest}"
    block, kind = int(parts[1]), parts[2]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per}.0.op.{parts[-1]}"
        layer = 1 + block * per + int(parts[3])
        sub = "0" if kind == "resnets" else "1"
        rest = resnet(parts[4:]) if kind == "resnets" else ".".join(parts[4:])
        return f"input_blocks.{layer}.{sub}.{rest}"
    if kind == "upsamplers":
        has_attention = "CrossAttn" in unet.config.up_block_types[block]
        return f"output_blocks.{block * per + per - 1}.{2 if has_attention else 1}.conv.{parts[-1]}"
    layer = block * per + int(parts[3])
    sub = "0" if kind == "resnets" else "1"
    rest = resnet(parts[4:]) if kind == "resnets" else ".".join(parts[4:])
    return f"output_blocks.{layer}.{sub}.{rest}"


def write_single_file_vae(model: AutoencoderKL, path: Path) -> None:
    """A VAE as A1111 users have it in models/VAE: its state dict alone, in LDM key names
    (`encoder.down.0.block.0...`, no prefix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _vae_to_ldm(model).items()}, str(path))


_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_to_ldm(model: AutoencoderKL) -> dict[str, torch.Tensor]:
    blocks = len(model.config.down_block_types)
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
            index = int(parts[2]) if parts[1] == "down_blocks" else blocks - 1 - int(parts[2])
            side = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] in ("downsamplers", "upsamplers"):
                name = f"{parts[0]}.{side}.{index}.{side}sample.conv.{parts[-1]}"
            else:
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                name = f"{parts[0]}.{side}.{index}.block.{parts[4]}.{rest}"
        elif len(parts) > 2 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                name = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{rest}"
            else:
                layer = _VAE_ATTENTION[parts[4]]
                name = f"{parts[0]}.mid.attn_1.{layer}.{parts[-1]}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        else:
            head = ".".join(parts[:-1])
            head = ".".join(_VAE_FIXED.get(p, p) for p in head.split("."))
            name = f"{head}.{parts[-1]}"
        out[name] = value
    return out


def controlnet(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, folder: Path, seed: int = 1
) -> ControlNetModel:
    """A ControlNet shaped like the pipeline's UNet, its zero convolutions made non-zero (a
    freshly initialised ControlNet adds nothing, which would hide every bug)."""
    torch.manual_seed(seed)
    model = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "zero_conv" in name or "controlnet_" in name or "conv_out" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def kohya_lora(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
    path: Path,
    *,
    seed: int = 1,
    unet: bool = True,
    text: bool = True,
    rank: int = 4,
) -> None:
    """A LoRA in kohya's format (`lora_unet_*`/`lora_te_*` keys with `alpha`), as A1111 users
    download them, on the UNet's attention projections and the text encoder's (out_proj
    included: diffusers cannot tell the format of a text-encoder LoRA without it)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(prefix: str, layer: torch.nn.Linear) -> None:
        down = torch.randn(rank, layer.in_features, generator=generator) * 0.5
        tensors[f"{prefix}.lora_down.weight"] = down
        tensors[f"{prefix}.lora_up.weight"] = (
            torch.randn(layer.out_features, rank, generator=generator) * 0.5
        )
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))

    if unet:
        for name, module in pipe.unet.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(
                ("to_q", "to_k", "to_v", "to_out.0")
            ):
                add("lora_unet_" + name.replace(".", "_"), module)
    encoders = [("lora_te", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders = [("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)]
    for prefix, encoder in encoders if text else []:
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(
                ("q_proj", "k_proj", "v_proj", "out_proj")
            ):
                full = name if name.startswith("text_model.") else "text_model." + name
                add(f"{prefix}_" + full.replace(".", "_"), module)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"ss_network_module": "networks.lora"},
    )


def write_single_file_controlnet(model: ControlNetModel, path: Path) -> None:
    """A ControlNet as A1111 users have it: one safetensors file with LDM key names
    (`control_model.input_blocks...`, `zero_convs`, `input_hint_block`, `middle_block_out`)."""
    tensors: dict[str, torch.Tensor] = {}
    blocks = len(model.controlnet_cond_embedding.blocks)
    for key, value in _unet_to_ldm(model).items():  # type: ignore[arg-type]
        parts = key.split(".")
        if parts[0] == "controlnet_down_blocks":
            key = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif parts[0] == "controlnet_mid_block":
            key = f"middle_block_out.0.{parts[1]}"
        elif parts[0] == "controlnet_cond_embedding":
            index = {"conv_in": 0, "conv_out": 2 * (blocks + 1)}.get(parts[1])
            index = 2 * (int(parts[2]) + 1) if index is None else index
            key = f"input_hint_block.{index}.{parts[-1]}"
        tensors["control_model." + key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
