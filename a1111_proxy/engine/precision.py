"""A1111's precision rules on diffusers models (torch).

A1111 runs the UNet in half precision but keeps the sampler's state in fp32: the latents, the
noise and the guidance sums between steps. Diffusers' pipelines instead carry the latents in the
UNet's dtype. Hooks on the UNet (and a ControlNet) make it take fp32 latents, run in its own dtype
and hand fp32 back, so the pipelines' latents stay fp32 from the first step to the decode.

A half-precision VAE can overflow into NaNs (SDXL's, some SD1.5 ones). As A1111 does
("A tensor with all NaNs was produced in VAE"), the decode is then run again in fp32 and the VAE
stays in fp32 from then on (A1111's `--no-half-vae`, chosen for it); the warning is logged once,
when it happens.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger("a1111_proxy.engine")
_HOOKED = "_a1111_proxy_fp32_latents"
FELL_BACK = "_a1111_proxy_vae_fell_back"  # set on a VAE that decode() moved to fp32


def keep_latents_fp32(model: Any, *, fp32_output: bool = True) -> None:
    """Hooks on a UNet (fp32_output) or a ControlNet (its outputs feed the UNet as they are):
    the `sample` it is given is cast to its own dtype, and a UNet's prediction back to fp32.
    Installed once per module; harmless on an fp32 model."""
    module = getattr(model, "_orig_mod", model)  # under torch.compile
    if getattr(module, _HOOKED, False):
        return
    module.register_forward_pre_hook(_sample_to_model_dtype, with_kwargs=True)
    if fp32_output:
        module.register_forward_hook(_prediction_to_fp32)
    setattr(module, _HOOKED, True)


def _model_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _sample_to_model_dtype(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    dtype = _model_dtype(module)
    if args and torch.is_tensor(args[0]):
        args = (args[0].to(dtype), *args[1:])
    elif torch.is_tensor(kwargs.get("sample")):
        kwargs = {**kwargs, "sample": kwargs["sample"].to(dtype)}
    return args, kwargs


def _prediction_to_fp32(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, tuple):
        return (output[0].float(), *output[1:])
    if torch.is_tensor(getattr(output, "sample", None)):
        output.sample = output.sample.float()
    return output


def match_vae_input(vae: Any) -> None:
    """The VAE's encode takes images of any float dtype (pipelines cast them to the UNet's,
    which an fp32 VAE would refuse). Patched on this instance, once."""
    if getattr(vae, _HOOKED, False):
        return
    encode = vae.encode

    @functools.wraps(encode)
    def encode_in_vae_dtype(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return encode(x.to(vae.dtype), *args, **kwargs)

    vae.encode = encode_in_vae_dtype
    setattr(vae, _HOOKED, True)


def fell_back(vae: Any) -> bool:
    """Whether decode() moved this VAE to fp32."""
    return bool(getattr(vae, FELL_BACK, False))


def upcast_sdxl_vae(vae: Any) -> bool:
    """Diffusers' own hint (`force_upcast`, false in the fp16-fixed VAEs) that an SDXL VAE
    overflows in half precision: run it in fp32 from the start, as A1111 users do with
    --no-half-vae, rather than decode every first image twice."""
    if vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        return False
    vae.to(dtype=torch.float32)
    return True


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """`vae.decode` of already scaled latents, in the VAE's dtype; when a half-precision decode
    gives NaNs (any image with one), the VAE moves to fp32 for good and decodes again."""
    decoded: torch.Tensor = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
    if vae.dtype == torch.float32 or not has_nans(decoded):
        return decoded
    log.warning(
        "the VAE made NaNs in %s; it now runs in float32 (as A1111's automatic fallback, or "
        "--no-half-vae): a little slower and more memory for every later decode",
        str(vae.dtype).removeprefix("torch."),
    )
    vae.to(dtype=torch.float32)
    setattr(vae, FELL_BACK, True)
    fp32: torch.Tensor = vae.decode(latents.to(vae.device, torch.float32), return_dict=False)[0]
    return fp32


def has_nans(decoded: torch.Tensor) -> bool:
    return bool(torch.isnan(decoded).any().item())
