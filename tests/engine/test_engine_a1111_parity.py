"""Small A1111 v1.10 parities (issue 17 item 6), each against A1111's computation ported here."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("torch", reason="the engine tests need the engine extra (torch)")
pytest.importorskip("diffusers", reason="the engine tests need the engine extra (diffusers)")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from a1111_proxy.engine import images  # noqa: E402
from a1111_proxy.engine.infotext import Generation, ModelInfo  # noqa: E402
from a1111_proxy.engine.params import Params  # noqa: E402
from a1111_proxy.engine.pipeline import prepare_inputs  # noqa: E402
from tests.engine.results import png_b64  # noqa: E402


def test_a_whole_picture_inpaint_overlays_with_a1111s_doubled_mask() -> None:
    picture = Image.new("RGB", (64, 64), (40, 90, 160))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    body = {
        "prompt": "a cat",
        "init_images": [png_b64(picture)],
        "mask": png_b64(mask),
        "mask_blur": 4,
        "inpaint_full_res": False,
        "width": 64,
        "height": 64,
    }
    params = Params.from_payload("img2img", body, rng=random.Random(0))
    inputs = prepare_inputs(params, Generation(params, ModelInfo("m", None), [1], [2]), 0)

    # A1111's processing.py, inpaint_full_res False: the blurred mask resized to the job's size,
    # then mask_for_overlay = clip(mask * 2, 0, 255) as uint8.
    blurred = images.prepare_mask(mask, invert=False, blur_x=4, blur_y=4)
    resized = np.array(images.resize(blurred, params.resize_mode, 64, 64))
    expected = np.clip(resized.astype(np.float32) * 2, 0, 255).astype(np.uint8)
    assert inputs.original_mask is not None
    assert np.array_equal(np.array(inputs.original_mask), expected)
    assert 0 < np.count_nonzero((resized > 0) & (resized < 128))  # the blur's half is doubled
