"""A worker's states as the fleet sees them, each with a real worker process: `loading` while its pool child
loads the model again (its model keeps being served), and on a desktop, yielding to the owner's memory (its
budget drops, then it pauses) and coming back. Apart from the other fleet tests, so that the two files run in
parallel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shared.memory import GB
from tests.conftest import pool_child
from tests.helpers import assert_error_shape


HOG = (
    "import sys, time, psutil\n"
    "path, chunk, held, said = sys.argv[1], 128 << 20, [], False\n"
    "while True:\n"
    "    t = int(open(path).read() or 0)\n"
    "    avail = psutil.virtual_memory().available\n"
    "    if t <= 0:\n"
    "        held.clear(); time.sleep(0.05)\n"
    "    elif avail > t + chunk:\n"
    "        b = bytearray(chunk); [b.__setitem__(i, 1) for i in range(0, chunk, 4096)]; held.append(b)\n"
    "    elif avail < t - 2 * chunk and held:\n"
    "        held.pop()\n"
    "    else:\n"
    "        if not said: print('held', flush=True); said = True\n"
    "        time.sleep(0.05)\n")


@pytest.mark.one_database
def test_a_worker_reloading_its_model_stays_alive_as_loading_and_its_model_keeps_taking_jobs(stack, spawn_worker):
    model, proc = spawn_worker("reload", SDFLEET_BACKEND="tests.fakes:slow_loading", SDFLEET_HEARTBEAT_S=1)
    os.kill(pool_child(proc), signal.SIGKILL)  # a new pool child loads the model again: 6 s
    deadline = time.monotonic() + 30
    while not any(w["model"] == model and w["state"] == "loading" for w in stack.api.workers()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (w,) = [w for w in stack.api.workers() if w["model"] == model]
    assert w["alive"] and "loading" in w["state_reason"]
    job = stack.api.submit(prompt="queued while the model loads", model=model, width=64, height=64, steps=1)
    assert job["status"] == "queued"  # admitted: the model did not flap to 503
    assert stack.api.wait(job["id"], timeout=120)["status"] == "succeeded"
    (w,) = [w for w in stack.api.workers() if w["model"] == model]
    assert w["state"] == "ready" and w["alive"]


@pytest.mark.one_database
def test_a_worker_yields_to_the_owners_memory_and_comes_back(stack, spawn_worker, tmp_path):
    """A memory hog beside a real worker: the budget it announces drops, a job that no longer fits is refused
    with the reason, then with more taken the worker pauses; nothing is OOM-killed, and all comes back when
    the hog exits. Thresholds are set relative to this machine's free memory now (a few GiB of headroom)."""
    import psutil

    available = psutil.virtual_memory().available
    # The worker may use what is available now less 10 GiB, and pauses once 7 GiB more is taken. The margins
    # (2 GiB and more) leave room for what the suite's other processes take and give back meanwhile.
    model, proc = spawn_worker("desktop", SDFLEET_HEARTBEAT_S=1, SDFLEET_MEMORY_RESERVE=available - 10 * GB,
                               SDFLEET_PAUSE_AVAILABLE_BYTES=available - 7 * GB)
    child = pool_child(proc)

    def me() -> dict:
        (w,) = [w for w in stack.api.workers() if w["model"] == model]
        return w

    def until(check, timeout=60):
        deadline = time.monotonic() + timeout
        while not check(w := me()):
            assert time.monotonic() < deadline, w
            time.sleep(0.3)
        return w

    before = until(lambda w: w["budget_bytes"] > int(9.5 * GB))
    # the prior predicts ~7.3 GiB for it: the 8 GiB class, which only a budget of 8 GiB or more covers
    big = dict(prompt="a wide view", model=model, width=1152, height=1152, guidance_scale=7.5, steps=1)
    # The owner: a process that holds what is available at a target (read from a file), taking or giving back
    # 128 MiB at a time as the suite's other processes take and give back memory meanwhile.
    target = tmp_path / "target"
    target.write_text(str(available - 4 * GB))
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(target)], stdout=subprocess.PIPE)
    try:
        assert hog.stdout.readline().strip() == b"held"
        # squeezed below the big job's 8 GiB class (the hog's hold leaves ~6 GiB and the worker's own RSS)
        unfit = min(before["budget_bytes"] - 2 * GB, 8 * GB - GB // 4)
        squeezed = until(lambda w: w["budget_bytes"] < unfit)
        assert squeezed["state"] == "ready"
        # /v1/workers reads the database; admission admits on the API's fleet view, which may be up to
        # SDFLEET_API_CACHE_S (1 s) older: past that age, the view it admits on is the squeezed one too
        time.sleep(1.5)
        assert me()["budget_bytes"] < unfit
        r = stack.api.http.post("/v1/jobs", json=big)
        error = assert_error_shape(r, 422, "insufficient_memory")
        assert "budget" in error["message"]
        target.write_text(str(available - 8 * GB))  # below the pause line, a budget of ~2.6 GiB left
        paused = until(lambda w: w["state"] == "paused")
        assert "available memory" in paused["state_reason"]
        queued = stack.api.submit(prompt="waits for the owner", model=model, width=64, height=64, steps=1)
        time.sleep(3)
        assert stack.api.job(queued["id"])["status"] == "queued"  # a paused worker takes no job
        target.write_text("0")  # the owner gives it all back
        until(lambda w: w["state"] == "ready")
        assert stack.api.wait(queued["id"], timeout=120)["status"] == "succeeded"
    finally:
        hog.kill()
        hog.wait()
    until(lambda w: w["budget_bytes"] > int(9.5 * GB))
    assert stack.api.http.post("/v1/jobs", json=big).status_code == 202
    assert proc.poll() is None and pool_child(proc) == child  # nothing was killed


@pytest.mark.one_database
def test_a_job_running_through_a_long_owners_pause_is_handed_back_and_resumed(stack, spawn_worker, tmp_path):
    """The owner's programs take memory back while a job runs: the worker pauses; after SDFLEET_PAUSE_HANDBACK_S
    it hands the job back with its checkpoint (not counted as an attempt), and once the owner gives the memory
    back the job goes on from the checkpoint: the image of an uninterrupted run."""
    import psutil

    available = psutil.virtual_memory().available
    model, proc = spawn_worker("owner-back", SDFLEET_BACKEND="tests.fakes:faulty", SDFLEET_HEARTBEAT_S=0.5,
                               SDFLEET_MEMORY_RESERVE=available - 10 * GB, SDFLEET_PAUSE_AVAILABLE_BYTES=available - 7 * GB,
                               SDFLEET_PAUSE_HANDBACK_S=2, SDFLEET_CHECKPOINT_INTERVAL_S=0)
    params = dict(model=model, width=64, height=64, steps=150, guidance_scale=7.5, seed=77)  # 30 s at SLOW=200
    reference = stack.api.wait(stack.api.submit(prompt="a quarry", **params)["id"], timeout=120)
    job = stack.api.submit(prompt="SLOW=200 a quarry", **params)
    deadline = time.monotonic() + 60
    while not ((p := stack.api.job(job["id"])["progress"]) and p["step"] >= 5):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    target = tmp_path / "target"
    target.write_text(str(available - 8 * GB))  # below the pause line, far above the guard's floor
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(target)], stdout=subprocess.PIPE)
    try:
        assert hog.stdout.readline().strip() == b"held"
        deadline = time.monotonic() + 60
        while (record := stack.api.job(job["id"]))["status"] == "running":
            assert time.monotonic() < deadline, record
            time.sleep(0.2)
        assert record["status"] == "queued" and record["attempts"] == 1, record
        (left,) = record["history"]
        assert left["error"]["code"] == "worker_left" and "paused by the host's owner" in left["error"]["message"]
        assert "available memory" in left["error"]["message"]
        target.write_text("0")  # the owner gives it all back: the worker takes the job again
        done = stack.api.wait(job["id"], timeout=120)
    finally:
        hog.kill()
        hog.wait()
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert stack.api.image(done["id"], 0) == stack.api.image(reference["id"], 0)
    (resume,) = done["resumes"]
    assert resume["resumed"] and 5 <= resume["step"] < 150
