"""The bundled diffusers engine: A1111 semantics on diffusers.

Only the modules that say so import torch or diffusers (`text`, `noise`, `schedulers`,
`previews`, `models`, `pipeline`); the rest (request parsing, sampler names, infotext, images,
the checkpoint catalogue) are plain Python, so the API can validate requests without torch.
"""
