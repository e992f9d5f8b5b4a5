"""A fake pipeline for failure modes only (SDFLEET_BACKEND=tests.fakes:faulty). It is the real tiny
OpenVINO pipeline, with faults a prompt asks for:
  FAIL      raise inside generation
  KILL      SIGKILL this process (what the kernel OOM killer does) before generating
  ALLOC=N   allocate (and touch) N MB more at every denoising step, held until the image is done
"""

from __future__ import annotations

import os
import re
import signal

import numpy as np

from worker.pipelines import OptimumPipeline, PipelineBase


class FaultyPipeline(PipelineBase):
    def __init__(self, settings):
        self._real = OptimumPipeline(settings.model, settings.device, levers=settings.levers)
        self.backend, self.precision = "fake-faulty", self._real.precision

    def generate(self, request, on_step=None):
        if "FAIL" in request.prompt:
            raise RuntimeError("injected failure: the pipeline raised")
        if "KILL" in request.prompt:
            os.kill(os.getpid(), signal.SIGKILL)
        alloc = re.search(r"ALLOC=(\d+)", request.prompt)
        if not alloc:
            return self._real.generate(request, on_step)
        held, mb = [], int(alloc.group(1))

        def allocating_step(step, total):
            held.append(np.ones(mb << 17))  # 8-byte floats: mb MiB, touched
            if on_step:
                on_step(step, total)

        return self._real.generate(request, allocating_step)


def faulty(settings):
    return FaultyPipeline(settings)


def slow_loading(settings):
    """The real tiny pipeline, loaded 6 s slower: long enough to watch a worker while its pool child reloads."""
    import time

    time.sleep(6)
    return OptimumPipeline(settings.model, settings.device, levers=settings.levers)
