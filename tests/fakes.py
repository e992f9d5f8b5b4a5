"""A fake pipeline for failure modes only (SDFLEET_BACKEND=tests.fakes:faulty). It is the real tiny
OpenVINO pipeline, with faults a prompt asks for:
  FAIL      raise inside generation
  KILL      SIGKILL this process (what the kernel OOM killer does) before generating
  ALLOC=N   allocate (and touch) N MB more at every denoising step, held until the image is done
  SLOW=MS   sleep MS milliseconds at every denoising step (a slower host: time to act mid-job)
  KILL_AT=K SIGKILL this process right after step K (its checkpoint, if due, written), once per job (a
            mark under the cache folder remembers it: the next attempt runs through)
The fault words are taken out of the prompt the real pipeline sees: a job's image equals that of the same
prompt without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import time

import numpy as np

from worker.pipelines import OptimumPipeline, PipelineBase


FAULT_WORDS = re.compile(r"\b(FAIL|KILL|ALLOC=\d+|SLOW=\d+|KILL_AT=\d+)\b\s*")


class FaultyPipeline(PipelineBase):
    resumable = True

    def __init__(self, settings):
        self._real = OptimumPipeline(settings.model, settings.device, levers=settings.levers)
        self.backend, self.precision = "fake-faulty", self._real.precision
        self._marks = settings.cache_dir / "fault-marks" / settings.served_model_name.replace("/", "--")

    def generate(self, request, on_step=None):
        prompt = request.prompt
        if re.search(r"\bFAIL\b", prompt):
            raise RuntimeError("injected failure: the pipeline raised")
        if re.search(r"\bKILL\b", prompt):
            os.kill(os.getpid(), signal.SIGKILL)
        alloc = re.search(r"ALLOC=(\d+)", prompt)
        slow = re.search(r"SLOW=(\d+)", prompt)
        kill_at = re.search(r"KILL_AT=(\d+)", prompt)
        held, mb = [], int(alloc.group(1)) if alloc else 0
        mark = self._marks / hashlib.sha256(f"{prompt}|{request.seed}".encode()).hexdigest()
        kill_step = int(kill_at.group(1)) if kill_at and not mark.exists() else None

        def faulty_step(step, total):
            if mb:
                held.append(np.ones(mb << 17))  # 8-byte floats: mb MiB, touched
            if slow:
                time.sleep(int(slow.group(1)) / 1000)
            if on_step:
                on_step(step, total)
            if step == kill_step:
                mark.parent.mkdir(parents=True, exist_ok=True)
                mark.touch()
                os.kill(os.getpid(), signal.SIGKILL)

        return self._real.generate(dataclasses.replace(request, prompt=FAULT_WORDS.sub("", prompt).strip()),
                                   faulty_step)

    def snapshot(self):
        return self._real.snapshot()

    def preview(self):
        return self._real.preview()


def faulty(settings):
    return FaultyPipeline(settings)


def slow_loading(settings):
    """The real tiny pipeline, loaded 6 s slower: long enough to watch a worker while its pool child reloads."""
    import time

    time.sleep(6)
    return OptimumPipeline(settings.model, settings.device, levers=settings.levers)
