"""Upscaling with the model the worker already has: the image is enlarged (Lanczos) to its output size, then
refined tile by tile by image-to-image at a low strength, each tile blended into its neighbours where they
overlap. A tile's peak is that of an image-to-image job of the tile's size, whatever the output's size:
admission chose the tile so that it fits the worker's memory class (api/routes/jobs.py)."""

from __future__ import annotations

import dataclasses

from PIL import Image

from shared.jobs import tile_overlap, upscale_tiles
from worker.pipelines import blend_ramp


def upscale(pipeline, request, tile: int, on_step=None) -> Image.Image:
    """`request`: the job's image request, its `image` already enlarged to width x height. Progress counts
    the steps of every tile as one image's (tile k's step s is step k x steps + s)."""
    import numpy as np

    width, height = request.width, request.height
    tiles = upscale_tiles(width, height, tile)
    overlap = tile_overlap(tile)
    ramp = blend_ramp(tile, overlap).numpy()  # the tiled VAE decode's blend
    weights = ramp[:, None] * ramp[None, :]
    out = np.zeros((height, width, 3), dtype=np.float32)
    total = np.zeros((height, width), dtype=np.float32)
    for k, (x, y) in enumerate(tiles):
        piece = dataclasses.replace(request, width=tile, height=tile, resume=None,
                                    image=request.image.crop((x, y, x + tile, y + tile)))

        def step(done: int, steps: int, k: int = k) -> None:
            if on_step is not None:
                on_step(k * steps + done, len(tiles) * steps)

        refined = pipeline.generate(piece, step)
        if refined.size != (tile, tile):
            refined = refined.resize((tile, tile), Image.Resampling.LANCZOS)
        out[y:y + tile, x:x + tile] += np.asarray(refined.convert("RGB"), dtype=np.float32) * weights[..., None]
        total[y:y + tile, x:x + tile] += weights
    return Image.fromarray(np.clip(out / total[..., None] + 0.5, 0, 255).astype(np.uint8), "RGB")
