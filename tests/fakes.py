"""Fake pipelines for failure modes only (SDFLEET_BACKEND=tests.fakes:<factory>); success is always real."""

from __future__ import annotations

from worker.pipelines import OptimumPipeline


class RaisingPipeline:
    """The real tiny pipeline, except that a prompt containing FAIL raises inside generation."""

    def __init__(self, settings):
        self._real = OptimumPipeline(settings.model, settings.device)
        self.backend, self.precision = "fake-raising", self._real.precision

    def generate(self, request, on_step=None):
        if "FAIL" in request.prompt:
            raise RuntimeError("injected failure: the pipeline raised")
        return self._real.generate(request, on_step)


def raising(settings):
    return RaisingPipeline(settings)
