"""The bundled diffusers engine: A1111 semantics on diffusers.

Only the modules that say so import torch or diffusers (`text`, `noise`, `schedulers`,
`previews`, `models`, `pipeline`, `adapters`, `control`) or numpy (`preprocessors`); the rest
(request parsing, sampler names, infotext, images, the checkpoint, LoRA and ControlNet
catalogues and units) are plain Python, so the API can validate requests without torch.
"""
