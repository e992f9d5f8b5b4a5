"""Resumable jobs. The pipeline, in this process: a run resumed from the snapshot of any step makes the very
image of the uninterrupted run (schedulers with and without noise per step), and a snapshot it cannot use is
refused as such. Real workers: a job interrupted at step k (its pool child SIGKILLed; its worker stopped
with SIGTERM) resumes from its checkpoint on the next attempt, on this worker or another, and its image is
bitwise that of an uninterrupted job of the same seed; the record says so. A checkpoint that cannot be used
(corrupt, another runtime) is passed over with the reason: the job starts again and succeeds."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import time

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import pool_child
from worker.pipelines import CheckpointError, ImageRequest, OptimumPipeline


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Interrupted(Exception):
    pass


def _interrupted_at(pipeline, request: ImageRequest, k: int) -> bytes:
    """Run until step k, keep the snapshot taken there, and stop (as a dead host would)."""
    kept = []

    def on_step(step, total):
        if step == k:
            kept.append(pipeline.snapshot())
            raise Interrupted()

    with pytest.raises(Interrupted):
        pipeline.generate(request, on_step)
    return kept[0]


@pytest.fixture(scope="module")
def tiny_pipelines(tiny_model):
    from tests.conftest import tiny

    return {"sd": OptimumPipeline(str(tiny_model)), "lcm": OptimumPipeline(str(tiny("lcm")))}


@pytest.mark.parametrize("scheduler,steps,guidance,k", [
    ("EulerDiscreteScheduler", 8, 7.5, 3),  # the tiny SD's own: no noise per step
    ("EulerAncestralDiscreteScheduler", 8, 7.5, 5),  # noise drawn at every step, from the generator
    ("DPMSolverMultistepScheduler", 8, 7.5, 4),  # keeps earlier steps' outputs in its state
    ("LCMScheduler", 4, 1.0, 2),  # the tiny LCM's own: noise at every step but the last
])
def test_a_resumed_run_makes_the_uninterrupted_image_bitwise(tiny_pipelines, scheduler, steps, guidance, k):
    import diffusers

    pipeline = tiny_pipelines["lcm" if scheduler == "LCMScheduler" else "sd"]
    own = pipeline._pipe.scheduler
    pipeline._pipe.scheduler = getattr(diffusers, scheduler).from_config(own.config)
    try:
        request = ImageRequest("a lighthouse at dusk", "fog", 64, 64, steps, guidance, 11)
        whole = _png(pipeline.generate(request))
        state = _interrupted_at(pipeline, request, k)
        seen = []
        resumed = pipeline.generate(dataclasses.replace(request, resume=state), lambda s, n: seen.append(s))
        assert _png(resumed) == whole
        assert seen == list(range(k, steps + 1))  # it went on from step k: the steps before were not run again
        # nothing to resume from after the last step
        last = []
        pipeline.generate(request, lambda s, n: last.append(pipeline.snapshot()) if s == n else None)
        assert last == [None]
    finally:
        pipeline._pipe.scheduler = own


def test_a_snapshot_the_pipeline_cannot_use_is_refused_with_the_reason(tiny_pipelines):
    import diffusers

    pipeline = tiny_pipelines["sd"]
    request = ImageRequest("a lighthouse", None, 64, 64, 6, 7.5, 3)
    state = _interrupted_at(pipeline, request, 2)
    with pytest.raises(CheckpointError, match="unreadable"):
        pipeline.generate(dataclasses.replace(request, resume=state[: len(state) // 2]))  # truncated
    with pytest.raises(CheckpointError, match="unreadable"):
        pipeline.generate(dataclasses.replace(request, resume=b"not a checkpoint at all"))
    with pytest.raises(CheckpointError, match="latents of"):  # another size's
        pipeline.generate(dataclasses.replace(request, width=96, resume=state))
    own = pipeline._pipe.scheduler
    pipeline._pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(own.config)
    try:
        with pytest.raises(CheckpointError, match="EulerDiscreteScheduler"):
            pipeline.generate(dataclasses.replace(request, resume=state))
    finally:
        pipeline._pipe.scheduler = own
    # the pipeline is left as it was: the next run is the uninterrupted image
    assert _png(pipeline.generate(request)) == _png(pipeline.generate(request))


# -- real workers ----------------------------------------------------------------------------------------

JOB = dict(width=64, height=64, guidance_scale=7.5, seed=2024)


def _sql(stack, query: str, **params):
    engine = create_engine(stack.database_url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(query), params)
            return result.fetchall() if result.returns_rows else result.rowcount
    finally:
        engine.dispose()


def _wait(check, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)
    return value


@pytest.mark.one_database
def test_a_job_whose_pool_child_is_killed_at_step_k_resumes_there_and_a_bad_checkpoint_is_passed_over(
        stack, spawn_worker):
    """One worker, three jobs of one seed killed at a step: resumed from the checkpoint, then with the checkpoint
    damaged while the next pool child loads (corrupt bytes; another runtime's): started again, never failed.
    Each image is that of the uninterrupted job."""
    model, proc = spawn_worker("resume-kill", SDFLEET_BACKEND="tests.fakes:faulty", SDFLEET_CHECKPOINT_INTERVAL_S=0)
    reference = stack.api.wait(stack.api.submit(prompt="a lighthouse", model=model, steps=12, **JOB)["id"])
    job = stack.api.submit(prompt="KILL_AT=7 a lighthouse", model=model, steps=12, **JOB)
    done = stack.api.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert stack.api.image(done["id"], 0) == stack.api.image(reference["id"], 0)
    assert done["attempts"] == 2 and [h["error"]["code"] for h in done["history"]] == ["worker_lost"]
    (resume,) = done["resumes"]
    assert resume["resumed"] and resume["step"] == 7 and resume["steps"] == 12 and resume["attempt"] == 2
    assert resume["note"].startswith("resumed from step 7 of 12 on ")
    # the checkpoint went with the job's end
    assert _sql(stack, "SELECT count(*) FROM job_checkpoints WHERE job_id = :j", j=done["id"]) == [(0,)]

    for damage, words in [("state", "not usable (unreadable"), ("runtime", "another runtime")]:
        child = pool_child(proc)
        job = stack.api.submit(prompt=f"KILL_AT=4 a lighthouse {damage}", model=model, steps=12, **JOB)
        _wait(lambda: not os.path.exists(f"/proc/{child}"), "the pool child to die")
        # while the next pool child loads its model: damage the checkpoint
        value = b"\x00garbage" if damage == "state" else "other-model|genai/f32"
        assert _sql(stack, f"UPDATE job_checkpoints SET {damage} = :v WHERE job_id = :j", v=value, j=job["id"]) == 1
        done = stack.api.wait(job["id"], timeout=120)
        assert done["status"] == "succeeded", done
        (resume,) = done["resumes"]
        assert not resume["resumed"] and resume["step"] == 0 and words in resume["note"], resume
        again = stack.api.wait(stack.api.submit(prompt=f"a lighthouse {damage}", model=model, steps=12, **JOB)["id"])
        assert stack.api.image(done["id"], 0) == stack.api.image(again["id"], 0)
    assert proc.poll() is None


@pytest.mark.one_database
def test_sigterm_hands_the_job_back_at_once_and_another_worker_resumes_it(stack, spawn_worker):
    """A worker stopped mid-job (systemd stop, docker stop): it checkpoints within a step, hands the job back
    without counting an attempt, and exits; another worker goes on from the checkpoint, the image kept of a
    two-image job included, and the images are those of an uninterrupted run."""
    model, first = spawn_worker("resume-term", SDFLEET_BACKEND="tests.fakes:faulty")
    params = dict(model=model, steps=30, num_images=2, **JOB)
    reference = stack.api.wait(stack.api.submit(prompt="SLOW=40 a harbour", **params)["id"], timeout=120)
    job = stack.api.submit(prompt="SLOW=40 a harbour", **params)
    # the second image is denoising (the first was kept with the checkpoint at its end)
    _wait(lambda: (p := stack.api.job(job["id"])["progress"]) and p["image"] == 1 and p["step"] >= 5,
          "the second image's 5th step")
    t0 = time.monotonic()
    first.send_signal(signal.SIGTERM)  # the main process only, as docker stop does
    first.wait(timeout=30)
    left_in = time.monotonic() - t0
    record = stack.api.job(job["id"])
    assert record["status"] == "queued", record
    assert record["attempts"] == 1 and [h["error"]["code"] for h in record["history"]] == ["worker_left"]
    assert "not counted" in record["history"][0]["error"]["message"]
    ((image, step, steps),) = _sql(stack, "SELECT image, step, steps FROM job_checkpoints WHERE job_id = :j",
                                   j=job["id"])
    assert image == 1 and 5 <= step < steps == 30
    assert left_in < 20  # a stop timeout's worth (docker's default is 10 s): one step and the hand-back here
    spawn_worker(model=model, SDFLEET_BACKEND="tests.fakes:faulty")  # another host of the same model
    done = stack.api.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    for i in range(2):
        assert stack.api.image(done["id"], i) == stack.api.image(reference["id"], i)
    (resume,) = done["resumes"]
    assert resume["resumed"] and resume["image"] == 1 and resume["step"] == step and resume["images_kept"] == 1
    assert f"step {step} of 30 of image 2 of 2" in resume["note"]


