"""A job's checkpoint on this worker: what an attempt starts from (a checkpoint another attempt wrote, on any
host: resumed when its runtime is this worker's, else started again, and the record says which), and the
checkpoints it writes as it denoises (at most every SDFLEET_CHECKPOINT_INTERVAL_S, and at once when the
worker leaves). A checkpoint is progress, never a result: one that cannot be written or read is logged and
the job goes on (or starts again); it never fails a job."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from shared import checkpoints, jobstore
from shared.jobs import ResumeRecord
from shared.retry import retrying
from worker.pipelines import Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Start:
    """Where an attempt starts: the finished images it keeps, and the image `image` to go on from `state`."""

    images: list[jobstore.GeneratedImage]
    image: int = 0
    state: bytes | None = None
    step: int = 0


def runtime_of(model: str, pipeline: Pipeline) -> str:
    runtime = getattr(pipeline, "runtime", None) or f"{pipeline.backend}/{pipeline.precision}"
    return f"{model}|{runtime}"


class Keeper:
    def __init__(self, sessions, attempt: jobstore.Attempt, model: str, pipeline: Pipeline, host: str,
                 interval_s: float):
        self.sessions, self.attempt, self.host, self.interval_s = sessions, attempt, host, interval_s
        self.runtime = runtime_of(model, pipeline)
        self.resumable = bool(getattr(pipeline, "resumable", False))
        self._last = time.monotonic()
        self._pending: ResumeRecord | None = None  # said once the pipeline has gone on from the state
        self.writes: list[tuple[int, float]] = []  # (bytes, seconds) of each checkpoint written

    # -- starting --------------------------------------------------------------------------------------

    def start(self) -> Start:
        def read():
            with self.sessions() as session:
                return checkpoints.load(session, self.attempt.job_id)

        try:
            cp = retrying(read, patience_s=10)
        except Exception:
            log.exception("job %s: its checkpoint could not be read; starting from step 0", self.attempt.job_id)
            return Start([])
        if cp is None:
            return Start([])
        params = self.attempt.parameters
        record = dict(attempt=self.attempt.number, worker_host=self.host, image=cp.image, steps=cp.steps,
                      checkpoint_host=cp.host)
        if cp.runtime != self.runtime:
            self._note(ResumeRecord(**record, resumed=False, step=0, images_kept=0,
                                    note=f"started again on {self.host}: the checkpoint (written on {cp.host}) is of "
                                         f"another runtime ({cp.runtime}; this worker runs {self.runtime})"))
            return Start([])
        images = [i for i in cp.images if i.index < params.num_images]
        state = cp.state if cp.step and cp.state and self.resumable and cp.image < params.num_images else None
        where = f"step {cp.step} of {cp.steps}" if state else "step 0"
        if params.num_images > 1:
            where += f" of image {cp.image + 1} of {params.num_images}, {len(images)} finished image(s) kept,"
        why = "" if state or not cp.step else " (this backend cannot resume within an image)"
        record = ResumeRecord(**record, resumed=bool(state or images), step=cp.step if state else 0,
                              images_kept=len(images),
                              note=f"resumed from {where} on {self.host} (checkpoint written on {cp.host}){why}")
        if state:
            self._pending = record  # said when the pipeline has taken the state (it may refuse it)
        else:
            self._note(record)
        return Start(images, cp.image, state, (cp.step or 0) if state else 0)

    def taken(self) -> None:
        """The pipeline went on from the state: the record says so."""
        if self._pending is not None:
            record, self._pending = self._pending, None
            self._note(record)

    def refused(self, image: int, why: str) -> None:
        """The pipeline could not go on from the state (corrupt, another version or model): the image
        starts again from step 0, and the record says why."""
        log.warning("job %s: the checkpoint of image %d is not usable (%s): starting it again from step 0",
                    self.attempt.job_id, image, why)
        pending, self._pending = self._pending, None
        self._note(ResumeRecord(
            attempt=self.attempt.number, worker_host=self.host, resumed=False, image=image, step=0,
            steps=pending.steps if pending else None, images_kept=pending.images_kept if pending else 0,
            checkpoint_host=pending.checkpoint_host if pending else None,
            note=f"started image {image + 1} again on {self.host}: its checkpoint is not usable ({why})"))

    def _note(self, record: ResumeRecord) -> None:
        log.info("job %s: %s", self.attempt.job_id, record.note)

        def write():
            with self.sessions.begin() as session:
                jobstore.note_resume(session, self.attempt, record)

        try:
            retrying(write, patience_s=10)
        except Exception:
            log.exception("job %s: how it started was not recorded", self.attempt.job_id)

    # -- writing ---------------------------------------------------------------------------------------

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval_s

    def save_step(self, image: int, step: int, steps: int, snapshot) -> bool:
        """The state after `step` of image `image`, if the pipeline gives one (never after the last step)."""
        self._last = time.monotonic()
        state = snapshot() if snapshot is not None else None
        if state is None:
            return False
        return self._write(lambda s: checkpoints.save_step(s, self.attempt.job_id, self.attempt.number,
                                                           self.runtime, self.host, image, step, steps, state),
                           len(state))

    def save_image(self, image: jobstore.GeneratedImage) -> bool:
        self._last = time.monotonic()
        return self._write(lambda s: checkpoints.save_image(s, self.attempt.job_id, self.attempt.number,
                                                            self.runtime, self.host, image), len(image.png))

    def _write(self, save, size: int) -> bool:
        t0 = time.perf_counter()

        def write():
            with self.sessions.begin() as session:
                return save(session)

        try:
            ok = retrying(write, patience_s=5)
        except Exception:
            log.warning("job %s: checkpoint not written", self.attempt.job_id, exc_info=True)
            return False
        self.writes.append((size, time.perf_counter() - t0))
        return ok
