"""Both backends (optimum-intel, openvino-genai) on the tiny SD and SDXL models, in this process: one loader
for every architecture, one image per call, and the seed alone decides the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from worker.pipelines import GenaiPipeline, ImageRequest, OptimumPipeline

BACKENDS = {"optimum": OptimumPipeline, "genai": GenaiPipeline}


@pytest.fixture(scope="module", params=[(b, a) for b in BACKENDS for a in ("sd", "sdxl")],
                ids=lambda p: "-".join(p))
def pipeline(request, tiny_model, tiny_sdxl_model):
    backend, arch = request.param
    return BACKENDS[backend](str(tiny_model if arch == "sd" else tiny_sdxl_model))


def test_generates_the_requested_size_deterministically(pipeline):
    req = ImageRequest("a cat on the moon", "blurry", width=96, height=64, steps=2, guidance_scale=7.5, seed=7)
    steps = []
    a = pipeline.generate(req, on_step=lambda i, n: steps.append((i, n)))
    b = pipeline.generate(req)
    c = pipeline.generate(ImageRequest(**{**req.__dict__, "seed": 8}))
    assert a.size == (96, 64)
    assert steps == [(1, 2), (2, 2)]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_guidance_1_and_other_sizes_work_on_one_loaded_pipeline(pipeline):
    for w, h, g in [(64, 64, 1.0), (128, 256, 0.0), (256, 128, 12.0)]:
        assert pipeline.generate(ImageRequest("a tree", None, w, h, 1, g, 0)).size == (w, h)


def test_precision_is_reported(pipeline):
    assert pipeline.precision in ("bf16", "f32", "f16")


def test_an_exception_in_the_step_callback_stops_generation_and_propagates(pipeline):
    seen = []

    def stop_at_2(step, total):
        seen.append(step)
        if step == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipeline.generate(ImageRequest("a tree", None, 64, 64, 5, 1.0, 0), stop_at_2)
    assert seen == [1, 2]  # the guard and cancel rely on this: nothing runs past the raising step


def _init(width: int, height: int):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, 0 * x + 90], axis=-1).astype(np.uint8))


def test_image_to_image_and_inpainting_on_the_same_loaded_pipeline(pipeline):
    from PIL import Image

    assert {"img2img", "inpaint", "upscale"} <= set(pipeline.tasks)
    init = _init(96, 64)
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (24, 16, 72, 48))
    common = dict(prompt="a cat", negative_prompt=None, width=96, height=64, steps=6, guidance_scale=7.5, seed=3)
    t2i = pipeline.generate(ImageRequest(**common))
    steps = []
    i2i = pipeline.generate(ImageRequest(**common, image=init, strength=0.5), lambda s, t: steps.append((s, t)))
    inpainted = pipeline.generate(ImageRequest(**common, image=init, mask=mask, strength=1.0))
    assert t2i.size == i2i.size == inpainted.size == (96, 64)
    assert steps == [(1, 3), (2, 3), (3, 3)]  # int(6 x 0.5) steps, and the progress says so
    a, b, c, given = (np.asarray(x, dtype=np.int16) for x in (t2i, i2i, inpainted, init))
    assert np.abs(a - b).mean() > 5 and np.abs(b - c).mean() > 5
    kept = np.asarray(mask) < 128
    assert np.array_equal(c[kept], given[kept]) and np.abs(c[~kept] - given[~kept]).mean() > 5
    # the same request twice: the same pixels; strength 0: the input itself
    assert np.array_equal(np.asarray(pipeline.generate(ImageRequest(**common, image=init, strength=0.5))), b)
    assert pipeline.generate(ImageRequest(**common, image=init, strength=0.0)) is init
