"""Time, as memory is: what a job's step intervals teach its profile, a job's predicted generation seconds from
the profiles (its own shape's, or along latent pixels from the others), guidance run as two passes, a profile's
moving average on each database, the queue ahead of a queued job in one statement per page, and why a job
waits. How close the predictions come on a real worker is measured in bench/timing.py, not asserted here."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from shared import fleet, jobstore
from shared.jobs import FALLBACK_DEFAULTS, JobParameters
from shared.memory import GB, Profile, Shape
from shared.models import Job, MemoryProfile, utcnow
from shared.timing import Server, StepTiming, expected_start, measured, predict_time, unet_passes, waiting
from tests.helpers import database_url, db  # noqa: F401 (fixtures)


def timed(width: int, height: int, guidance: bool, step_s: float, overhead_s: float, samples: int = 1,
          job_s: float | None = None) -> Profile:
    return Profile(Shape(width, height, guidance), 2 * GB, GB, samples, step_s, overhead_s, job_s)


def test_a_job_teaches_its_median_step_without_each_images_first_the_rest_per_image_and_per_job():
    # two images of 4 steps: each image's first interval also encoded the prompt, and is left out
    t = measured([0.10, 0.11, 0.30, 0.10, 0.12, 0.11], [0.50, 0.45], [1.10, 1.15], elapsed_s=2.4, steps=4,
                 passes=1, known_step_s=None)
    assert t.step_s == pytest.approx(0.14)  # the mean: a slow step is time the job took
    assert t.image_overhead_s == pytest.approx(1.125 - 4 * 0.14)
    assert t.job_overhead_s == pytest.approx(2.4 - 2.25)
    # guidance run as two passes: the step is kept per pass
    assert measured([0.2, 0.2], [0.4], [0.9], 1.0, 3, 2, None).step_s == pytest.approx(0.1)


def test_a_one_step_job_splits_its_time_with_the_known_step_else_its_first_step():
    known = measured([], [0.3], [0.9], elapsed_s=1.0, steps=1, passes=1, known_step_s=0.2)
    assert known == StepTiming(None, pytest.approx(0.7), pytest.approx(0.1))  # the profile's step stays
    unknown = measured([], [0.3, 0.3], [0.7, 0.7], elapsed_s=1.6, steps=1, passes=1, known_step_s=None)
    assert unknown == StepTiming(pytest.approx(0.3), pytest.approx(0.4), pytest.approx(0.2))


def test_nothing_measured_is_no_prediction():
    assert predict_time(Shape(512, 512, True), 20, 1, []) is None
    untimed = Profile(Shape(512, 512, True), 2 * GB, GB, 3)  # a profile from before time was measured
    assert predict_time(Shape(512, 512, True), 20, 1, [untimed]) is None


def test_its_own_shape_is_the_jobs_overhead_plus_images_times_overhead_plus_steps_times_step():
    p = predict_time(Shape(512, 512, True), 20, 3, [timed(512, 512, True, 0.1, 0.5, samples=4, job_s=0.05)])
    assert (p.source, p.seconds) == ("profile", pytest.approx(0.05 + 3 * (0.5 + 20 * 0.1)))
    assert "4 job(s)" in p.detail
    # split guidance: the same memory shape as guidance 1, two passes a step
    assert predict_time(Shape(512, 512, False), 20, 1, [timed(512, 512, False, 0.1, 0.5)], passes=2).seconds == \
        pytest.approx(0.5 + 20 * 0.2)


def test_other_shapes_are_followed_along_latent_pixels():
    small, large = timed(256, 256, True, 0.04, 0.2, job_s=0.02), timed(768, 768, True, 0.5, 1.0, job_s=0.04)
    mid = predict_time(Shape(512, 512, True), 10, 1, [small, large])
    assert mid.source == "scaled" and "256x256 with guidance" in mid.detail
    assert mid.job_overhead_s == pytest.approx(0.03)  # the job's own: the median of the measured ones
    # between the two measured sizes, in step and in the time around the steps
    assert 0.03 + 10 * 0.04 + 0.2 < mid.seconds < 0.03 + 10 * 0.5 + 1.0
    # past the largest: along the line through the two nearest (a fixed part per step is its intercept)
    far = predict_time(Shape(1024, 1024, True), 10, 1, [small, large])
    assert far.step_s == pytest.approx(0.5 + (0.5 - 0.04) / (9216 - 1024) * (16384 - 9216))
    # from one size only: in proportion to latent pixels
    alone = predict_time(Shape(512, 512, True), 10, 1, [small])
    assert alone.step_s == pytest.approx(0.16) and alone.image_overhead_s == pytest.approx(0.8)
    # below the smallest measured, where the line through the two smallest would fall below what the size's
    # share gives: between that share (no fixed part) and the smallest's own (all fixed), geometrically
    middle = timed(384, 384, True, 0.07, 0.3)
    tiny = predict_time(Shape(128, 128, True), 10, 1, [timed(256, 256, True, 0.021, 0.2), middle])
    assert tiny.step_s == pytest.approx((0.021 * 0.25 * 0.021) ** 0.5)


def test_guidance_from_the_other_batchs_curve():
    g1 = [timed(256, 256, False, 0.02, 0.2), timed(512, 512, False, 0.1, 0.4)]
    # no guidance profile: a batch of two, twice the work of the same size without
    assert predict_time(Shape(512, 512, True), 10, 1, g1).step_s == pytest.approx(0.2)
    # one guidance profile: as the other batch's curve changes from its size to this one
    with_one = predict_time(Shape(512, 512, True), 10, 1, [*g1, timed(256, 256, True, 0.03, 0.2)])
    assert with_one.step_s == pytest.approx(0.03 * 0.1 / 0.02)


def test_guidance_is_a_second_pass_only_where_it_is_split():
    split = FALLBACK_DEFAULTS.model_copy(update={"guidance_doubles_batch": False})
    lcm = FALLBACK_DEFAULTS.model_copy(update={"family": "lcm", "guidance_doubles_batch": False})
    assert unet_passes(7.5, split) == 2 and unet_passes(1.0, split) == 1
    assert unet_passes(7.5, FALLBACK_DEFAULTS) == 1  # one batch-2 pass: the shape's guidance counts it
    assert unet_passes(8.0, lcm) == 1  # an embedding


def test_why_a_queued_job_waits():
    ready = Server("a:1", "ready", None, 0.0, False)
    assert waiting([ready], 0, 0.0, "m").reason.startswith("starting")
    assert waiting([ready], 0, 0.0, "m").expected_start_s == 0
    assert waiting([ready], 2, 3.0, "m").reason == \
        "2 job(s) queued ahead of it, for 1 worker(s) that can take it (0 busy)"
    busy = [Server("a:1", "ready", None, 3.0, True), Server("b:1", "ready", None, 1.0, True)]
    w = waiting(busy, 2, 4.0, "m")  # b is free at 1 s, takes the first ahead (2 s), a at 3 s the second
    assert w.expected_start_s == pytest.approx(3.0)
    assert w.reason == "all 2 workers that can take it are busy: 2 job(s) running, 2 queued ahead of it"
    assert waiting(busy, 2, None, "m").expected_start_s is None  # some work ahead has no measurement
    paused = Server("c:1", "paused", "other programs use 87% of the CPUs, above 50%", 0.0, False)
    w = waiting([paused], 0, 0.0, "m")
    assert w.expected_start_s is None
    assert w.reason == "the only worker that can take it is paused (c:1: other programs use 87% of the CPUs, above 50%)"
    assert "1 more is paused" in waiting([busy[0], paused], 0, 0.0, "m").reason
    loading = Server("d:1", "loading", "the pool child is loading the model", None, False)
    assert waiting([loading], 0, 0.0, "m").reason == \
        "its worker is loading the model (the pool child is loading the model)"
    assert waiting([paused, loading], 0, 0.0, "m").reason.startswith("no worker that can take it is ready (c:1 paused")
    # a free worker takes it at once, whatever the busy one has left
    assert waiting([busy[0], ready], 0, 0.0, "m").expected_start_s == 0
    # three jobs of 2 s ahead on a free worker and one free in 5 s: the free one takes all three
    assert expected_start([0.0, 5.0], 3, 6.0) == pytest.approx(5.0)
    assert expected_start([0.0, 5.0], 4, 8.0) == pytest.approx(6.0)
    assert waiting([], 0, 0.0, "m").reason == "no live worker serves model 'm': it waits for one"
    assert waiting([], 0, 0.0, "m", "no live worker of 'm' takes its memory class").reason.startswith("no live")


def test_a_profiles_time_is_a_moving_average_each_figure_kept_by_a_job_that_did_not_measure_it(db):
    model, shape = f"t-{uuid.uuid4().hex[:6]}", Shape(512, 512, True)

    def record(timing):
        with db.begin() as s:
            fleet.record_profile(s, model, "optimum", "bf16", "balanced", shape, GB, GB, 0.2, timing)

    def row():
        with db() as s:
            (p,) = fleet.profiles(s, model, "optimum", "bf16", "balanced")
            return p

    record(None)  # a job that measured no time (resumed): memory only
    assert (row().step_s, row().image_overhead_s) == (None, None)
    record(StepTiming(0.1, 0.4, 0.02))
    assert (row().step_s, row().image_overhead_s) == (pytest.approx(0.1), pytest.approx(0.4))
    record(StepTiming(0.2, None))
    assert (row().step_s, row().image_overhead_s) == (pytest.approx(0.15), pytest.approx(0.4))
    record(StepTiming(None, 0.8))
    assert (row().step_s, row().image_overhead_s) == (pytest.approx(0.15), pytest.approx(0.6))
    assert row().job_overhead_s == pytest.approx(0.02)
    assert row().samples == 4
    with db() as s:
        assert s.get(MemoryProfile, (model, "optimum", "bf16", "balanced", 512, 512, 1, True, False)).max_step_s == 0.2


def test_the_queue_ahead_of_a_page_of_jobs(db):
    model = f"q-{uuid.uuid4().hex[:6]}"
    params = JobParameters(prompt="p", negative_prompt=None, width=64, height=64, steps=1, guidance_scale=1.0,
                           seed=1, num_images=1, model=model)
    made = []
    now = utcnow()
    # (priority, memory class, predicted seconds), enqueued in this order
    for n, (priority, klass, seconds) in enumerate([("normal", GB, 2.0), ("normal", 4 * GB, 5.0),
                                                    ("high", GB, None), ("normal", GB, 1.0), ("low", GB, 3.0)]):
        with db.begin() as s:
            job = jobstore.create_job(s, jobstore.NewJob(params, priority=priority, memory_class_bytes=klass,
                                                         predicted_generation_s=seconds))
            job.enqueued_at = now + timedelta(seconds=n)
            made.append(job.id)
    with db() as s:
        jobs = [s.get(Job, i) for i in made]
        # workers that take classes up to 2 GiB: the 4 GiB job ahead is not theirs
        ahead = jobstore.queue_ahead(s, jobs, {i: 2 * GB for i in made})
        assert [ahead[i].position for i in made] == [2, 3, 1, 4, 5]
        assert jobstore.queue_positions(s, [jobs[3]])[made[3]] == ahead[made[3]].position
        fourth = ahead[made[3]]  # behind the high one (no prediction), the first (2 s) and the 4 GiB one
        assert (fourth.ahead, fourth.predicted_s, fourth.predicted) == (2, pytest.approx(2.0), 1)
        assert (ahead[made[2]].ahead, ahead[made[2]].predicted_s) == (0, 0.0)
        last = ahead[made[4]]
        assert (last.ahead, last.predicted_s, last.predicted) == (3, pytest.approx(3.0), 2)
        # no worker takes its class: nothing ahead is theirs
        assert jobstore.queue_ahead(s, jobs[:1], {made[0]: None})[made[0]].ahead == 0
