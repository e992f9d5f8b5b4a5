"""What the page, the CLI and the OpenAI route stand on: the job list (paged, a key's own, by status), the
plan (admission's own prediction, worker by worker), the 202's queue position, the memory timeline's
prediction and budget, and an API process that carries no model stack."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from sqlalchemy import select

from sdfleet.client import ApiError
from shared import fleet
from shared.fleet_contract import WorkerState
from shared.memory import GB
from shared.models import MemoryProfile, Worker
from tests.conftest import ROOT
from tests.helpers import assert_error_shape
from tests.helpers import BODY, auth, secured  # noqa: F401 (a fixture)


def test_job_list_pages_newest_first_filters_by_status_and_refuses_bad_cursors(stack):
    ids = [stack.api.submit(prompt=f"page {i}", width=64, height=64, steps=1)["id"] for i in range(3)]
    for job_id in ids:
        assert stack.api.wait(job_id, timeout=120)["status"] == "succeeded"

    seen, cursor = [], None
    while True:  # every page of 2, newest first, no job twice
        r = stack.api.http.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200
        page = r.json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    mine = [i for i in seen if i in ids]
    assert mine == ids[::-1]
    first = stack.api.http.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]
    assert first["images"] and first["parameters"]["prompt"]  # whole records, images linked

    done = stack.api.http.get("/v1/jobs", params={"status": ["succeeded", "failed"], "limit": 200}).json()["jobs"]
    assert set(ids) <= {j["id"] for j in done} and {j["status"] for j in done} <= {"succeeded", "failed"}
    queued = stack.api.http.get("/v1/jobs", params={"status": "queued"}).json()["jobs"]
    assert not set(ids) & {j["id"] for j in queued}

    assert_error_shape(stack.api.http.get("/v1/jobs", params={"cursor": "not-a-cursor"}), 422, "invalid_request")
    assert_error_shape(stack.api.http.get("/v1/jobs", params={"status": "done"}), 422, "invalid_request")
    assert_error_shape(stack.api.http.get("/v1/jobs", params={"limit": 0}), 422, "invalid_request")


def test_the_memory_timeline_carries_the_prediction_and_the_workers_budget(stack):
    job = stack.api.wait(stack.api.submit(prompt="a plot", width=64, height=64, steps=2)["id"], timeout=120)
    # The budget follows the host's available memory, so it may change with any heartbeat: the timeline's
    # budget is the worker's as announced now, i.e. between two reads of /v1/workers that agree.
    for _ in range(20):
        before = _budget(stack)
        memory = stack.api.memory(job["id"])
        if _budget(stack) == before:
            break
    assert memory["worker_budget_bytes"] == before > 0
    assert memory["predicted_peak_bytes"] == job["predicted_peak_bytes"] > 0
    assert {s["phase"] for s in memory["samples"]} >= {"encode", "denoise", "decode"}


def _budget(stack) -> int:
    (worker,) = [w for w in stack.api.workers() if w["model"] == stack.model]
    return worker["budget_bytes"]


def test_a_finished_job_cannot_be_cancelled_and_says_so(stack):
    job = stack.api.wait(stack.api.submit(prompt="done", width=64, height=64, steps=1)["id"], timeout=120)
    r = stack.api.http.delete(f"/v1/jobs/{job['id']}")
    error = assert_error_shape(r, 409, "conflict")
    assert error["message"] == f"job {job['id']} has already succeeded; there is nothing to cancel"


def _plan(stack, **shape) -> dict:
    r = stack.api.http.post("/v1/plan", json=shape)
    assert r.status_code == 200, r.text
    return r.json()


def _fleet_state(stack, model: str) -> tuple:
    """What admission reads for a model: its workers' announced memory and its profiles."""
    with stack.sessions() as s:
        workers = s.execute(select(Worker.name, Worker.budget_bytes, Worker.resident_bytes, Worker.memory_mode)
                            .where(Worker.model == model).order_by(Worker.name)).all()
        profiles = s.execute(select(MemoryProfile.memory_mode, MemoryProfile.width, MemoryProfile.height,
                                    MemoryProfile.peak_bytes, MemoryProfile.base_bytes, MemoryProfile.samples)
                             .where(MemoryProfile.model == model)).all()
    return tuple(workers), tuple(sorted(profiles))


def _plan_and_submit(stack, model: str, shape: dict):
    """A plan and a submission of the same shape against the same fleet. A live worker's heartbeat may change
    its announced resident set (kept buffers given back when idle) or a profile between the two: then the
    pair is taken again. The API's fleet view may be up to SDFLEET_API_CACHE_S old, so the fleet must stay as
    it was from that long before the plan until after the submission."""
    for _ in range(10):
        before = _fleet_state(stack, model)
        time.sleep(1.1)  # the API's cache (1 s): its view is read after `before`
        plan = _plan(stack, model=model, **shape)
        job = exc = None
        try:
            job = stack.api.submit(prompt="plan", model=model, steps=1, **shape)
        except ApiError as e:
            exc = e
        if _fleet_state(stack, model) == before:
            return plan, job, exc
        if job is not None:  # the fleet changed in between: take the job back (or let it finish) and again
            stack.api.http.delete(f"/v1/jobs/{job['id']}")
    raise AssertionError(f"the fleet of {model} changed between every plan and submission")


def test_plan_is_what_admission_decides(stack):
    """For each shape, the plan's verdict, class and prediction are what a submission of it gets."""
    model = stack.model
    small = f"{model}-small"  # a worker of 1.5 GiB (a heartbeat row; admission reads only the rows)
    with stack.sessions.begin() as s:
        fleet.beat(s, WorkerState(name=f"small:{small}", host="small-host", model=small, backend="optimum",
                                  precision="bf16", memory_mode="balanced", budget_bytes=int(1.5 * GB),
                                  cgroup_limit_bytes=None, total_ram_bytes=2 * GB, available_bytes=2 * GB,
                                  resident_bytes=GB // 2, current_job_id=None), fleet.db_now(s))
    verdicts = set()
    for name, shape in [(model, {"width": 64, "height": 64}), (small, {"width": 64, "height": 64}),
                        (small, {"width": 1024, "height": 1024, "guidance_scale": 7.5})]:
        plan, job, exc = _plan_and_submit(stack, name, shape)
        (w,) = plan["workers"]
        assert w["predicted_peak_bytes"] > 0 and w["fits"] == plan["admitted"]
        if exc is not None:
            assert not plan["admitted"] and exc.code == "insufficient_memory"
            assert exc.body["error"]["details"]["predicted_bytes"] == w["predicted_peak_bytes"]
            assert plan["hints"] == exc.body["error"]["details"]["hints"] and plan["message"].startswith("refused")
            verdicts.add("refused")
            continue
        assert plan["admitted"] and plan["message"].startswith("admitted")
        assert job["predicted_peak_bytes"] == w["predicted_peak_bytes"]
        assert job["memory_class_bytes"] == plan["memory_class_bytes"] == w["memory_class_bytes"]
        if name == small:  # no worker consumes that queue: take it back
            assert job["status"] == "queued" and job["queue_position"] >= 1
            stack.api.http.delete(f"/v1/jobs/{job['id']}")
        verdicts.add("admitted")
    assert verdicts == {"admitted", "refused"}
    # once the stack's model has run jobs, its runtime's measured profiles predict on their own
    assert _plan(stack, model=model, width=64, height=64)["modes"]
    assert_error_shape(stack.api.http.post("/v1/plan", json={"model": "nobody-serves-this"}), 503,
                       "model_unavailable")
    assert_error_shape(stack.api.http.post("/v1/plan", json={"width": 100}), 422, "invalid_request")


def test_a_key_lists_only_its_own_jobs_and_the_202_says_where_a_job_waits(secured):  # noqa: F811
    client, _sessions, alice, bob = secured
    answers = [client.post("/v1/jobs", json=BODY, headers=auth(alice)) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202]
    assert [a.json()["queue_position"] for a in answers] == [1, 2]  # no worker takes that model's queue
    theirs = client.post("/v1/jobs", json=BODY, headers=auth(bob)).json()
    listed = client.get("/v1/jobs", headers=auth(alice)).json()
    assert [j["id"] for j in listed["jobs"]] == [a.json()["id"] for a in answers][::-1]
    assert [j["queue_position"] for j in listed["jobs"]] == [2, 1] and listed["next_cursor"] is None
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth(bob)).json()["jobs"]] == [theirs["id"]]
    assert_error_shape(client.get("/v1/jobs"), 401, "unauthorized")
    assert_error_shape(client.post("/v1/plan", json={}), 401, "unauthorized")


def test_the_api_process_imports_no_model_stack(tmp_path):
    code = ("import sys; from api.app import create_app; create_app(); "
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'openvino', 'openvino_tokenizers', 'optimum', 'diffusers', 'transformers', 'nncf'))))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SDFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
