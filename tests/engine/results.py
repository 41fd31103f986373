"""Reading an engine answer the way a client does: its images as pixels, its infotexts."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
from PIL import Image


def pixels(result: dict[str, Any], n: int = 0) -> np.ndarray:
    """Image n of A1111's answer, RGB, as int16 (differences do not wrap)."""
    png = Image.open(io.BytesIO(base64.b64decode(result["images"][n])))
    return np.asarray(png.convert("RGB"), dtype=np.int16)


def infotext(result: dict[str, Any], n: int = 0) -> str:
    return str(json.loads(result["info"])["infotexts"][n])


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")
