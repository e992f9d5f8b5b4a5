"""A BENCH backend, never a default: a stand-in pipeline for fleet benchmarks (bench/fleet.py) that takes a
set time per denoising step and holds a set amount of memory per pixel while it runs, so that a hundred
workers (real Celery processes with the real task code, heartbeats, routing and checkpoints) fit on one
machine. It makes no image worth looking at (a flat colour of the seed) and loads no model.

    SDFLEET_BACKEND=bench.standin:factory
    SDFLEET_BENCH_STEP_S          seconds per step at 512x512, scaled by the pixels (default 0.2)
    SDFLEET_BENCH_BYTES_PER_PIXEL bytes held per image pixel while the image denoises (default 8)

It resumes like the optimum backend: its snapshot is the step reached, and a resumed run skips the steps done.
"""

from __future__ import annotations

import json
import os
import time

from PIL import Image

from worker.pipelines import CheckpointError, ImageRequest, OnStep, PipelineBase


class StandInPipeline(PipelineBase):
    backend = "bench-standin"
    precision = "none"
    resumable = True

    def __init__(self, step_s: float, bytes_per_pixel: int):
        self.step_s, self.bytes_per_pixel = step_s, bytes_per_pixel
        self._step: int | None = None

    def snapshot(self) -> bytes | None:
        return json.dumps({"step": self._step}).encode() if self._step is not None else None

    def generate(self, request: ImageRequest, on_step: OnStep | None = None) -> Image.Image:
        start = 0
        if request.resume is not None:
            try:
                start = int(json.loads(request.resume)["step"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"unreadable ({exc})") from None
        pixels = request.width * request.height
        held = bytearray(self.bytes_per_pixel * pixels)  # zero pages: touched below, one byte per page
        for i in range(0, len(held), 4096):
            held[i] = 1
        per_step = self.step_s * pixels / (512 * 512) * (2 if request.guidance_scale > 1 else 1)
        for step in range(start + 1, request.steps + 1):
            time.sleep(per_step)
            self._step = step if step < request.steps else None
            try:
                if on_step is not None:
                    on_step(step, request.steps)
            finally:
                self._step = None
        del held
        return Image.new("RGB", (request.width, request.height), (request.seed % 256, 80, 160))


def factory(settings) -> StandInPipeline:
    return StandInPipeline(float(os.environ.get("SDFLEET_BENCH_STEP_S", "0.2")),
                           int(os.environ.get("SDFLEET_BENCH_BYTES_PER_PIXEL", "8")))
