"""The command line: `sdfleet submit/status/jobs/cancel/workers/plan` against a running stack (progress on
stderr, JSON or tables on stdout, one sentence when the API is down), `worker`/`ops` arguments handed to
Celery, and `sdfleet up`, the local stack that README's first command runs (bundled Redis, SQLite, API, one
worker), which refuses a busy port and leaves nothing running, also when stopped by SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from sdfleet import cli
from sdfleet.client import ApiError
from sdfleet.stack import redis_answers
from shared import fleet
from shared.fleet_contract import WorkerState
from tests.conftest import ROOT, free_port, wait_for

GB = 1 << 30
# the client and the processes, not SQL: with PostgreSQL available the stack tests run on it alone
pytestmark = pytest.mark.one_database


def sdfleet(*args, env=None, timeout=300, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sdfleet", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what()
        time.sleep(0.1)
    return result


def test_submit_wait_out_and_status(stack, tmp_path):
    out = tmp_path / "cat.png"
    r = sdfleet("submit", "a cat", "--api", stack.api_url, "--width", "128", "--height", "64", "--steps", "2",
                "--num-images", "2", "--seed", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["status"] == "succeeded"
    assert Image.open(out).size == (128, 64)
    assert Image.open(tmp_path / "cat-1.png").size == (128, 64)

    r = sdfleet("status", record["id"], "--api", stack.api_url)
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == record["id"]


def test_submit_with_an_image_inpaints_and_upscales(stack, tmp_path):
    import numpy as np

    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.tile(np.arange(96, dtype=np.uint8)[None, :, None] * 2, (64, 1, 3))).save(source)
    holes = np.zeros((64, 96), dtype=np.uint8)
    holes[8:24, 8:40] = 255
    Image.fromarray(holes).save(mask)
    out = tmp_path / "out.png"
    r = sdfleet("submit", "a cat", "--api", stack.api_url, "--image", str(source), "--mask", str(mask), "--steps",
                "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["parameters"]["kind"] == "inpaint"
    made, given = np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(source))
    assert made.shape == given.shape and np.array_equal(made[holes == 0], given[holes == 0])
    r = sdfleet("submit", "", "--api", stack.api_url, "--image", str(source), "--upscale", "2", "--steps", "4",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (192, 128)
    r = sdfleet("submit", "a cat", "--api", stack.api_url, "--image", str(tmp_path / "missing.png"))
    assert r.returncode != 0 and "missing.png" in r.stderr

    r = sdfleet("submit", "a cat", "--api", stack.api_url, "--width", "100")
    assert r.returncode == 2
    assert "width" in r.stderr and "multiple of 8" in r.stderr


def test_wait_shows_progress_and_jobs_lists_and_cancel_stops_a_running_job(stack, tmp_path):
    """A job queued behind a running one: `submit --wait` shows its queue position, then image i of N and
    step k of n, then how it ended with its peak; `jobs` lists both; `cancel` stops the running one."""
    blocker = stack.api.submit(prompt="a long job", width=256, height=256, steps=150, num_images=4,
                               priority="high")
    wait_for(stack, blocker["id"], "status", "running")
    err = tmp_path / "submit.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdfleet", "submit", "a lighthouse", "--wait", "--width", "256", "--height", "256",
         "--steps", "30", "--num-images", "2", "--priority", "low", "--api", stack.api_url],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=open(err, "w"),
        text=True)
    try:
        until(lambda: "queued, position 1" in err.read_text(), 60, err.read_text)

        r = sdfleet("jobs", "--status", "queued", "--status", "running", "--api", stack.api_url)
        assert r.returncode == 0, r.stderr
        rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
        assert "running" in rows[blocker["id"]] and "image" in rows[blocker["id"]]
        assert any("queued" in row and "position 1" in row and "a lighthouse" in row for row in rows.values())

        r = sdfleet("cancel", blocker["id"], "--api", stack.api_url)  # running: 202, stops at its next step
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{blocker['id']} cancel requested")
        wait_for(stack, blocker["id"], "status", "cancelled")

        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.read_text()
    record = json.loads(stdout)  # stdout is the record alone
    assert record["status"] == "succeeded" and record["parameters"]["num_images"] == 2
    lines = err.read_text().splitlines()
    short = record["id"][:8]
    assert lines[0] == f"job {short}: queued, position 1 for {stack.model}"
    running = rf"job {short}: running on \S+: image [12] of 2, step \d+ of 30"
    assert any(re.fullmatch(running, ln) for ln in lines), lines
    done = f"job {short}: succeeded: 2 images in "
    assert any(ln.startswith(done) and "peak RSS " in ln for ln in lines), lines
    assert len(lines) == len(set(lines))  # a plain line per change, not per poll
    assert Image.open(tmp_path / f"{record['id']}.png").size == (256, 256)  # --wait writes the PNGs
    assert Image.open(tmp_path / f"{record['id']}-1.png").size == (256, 256)

    r = sdfleet("jobs", "--api", stack.api_url)
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "succeeded" in rows[record["id"]] and "cancelled" in rows[blocker["id"]]
    listed = json.loads(sdfleet("jobs", "--json", "--limit", "2", "--api", stack.api_url).stdout)
    assert [j["id"] for j in listed["jobs"]] == [record["id"], blocker["id"]]  # newest first

    r = sdfleet("cancel", record["id"], "--api", stack.api_url)  # finished: 409, said in one line
    assert r.returncode == 1 and "already succeeded" in r.stderr and len(r.stderr.splitlines()) == 1


def test_submit_preview_keeps_the_latest_preview_in_a_file_while_it_waits(stack, tmp_path):
    """`submit --preview FILE` (implies --wait): FILE holds the job's latest preview while the job runs (a JPEG of
    its latents' size), replaced whole as it goes on; it stays when the job has ended, and stderr says which."""
    live = tmp_path / "live.jpg"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdfleet", "submit", "a lighthouse", "--preview", str(live), "--width", "256",
         "--height", "192", "--steps", "120", "--guidance-scale", "7.5", "--api", stack.api_url, "-q"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        until(lambda: live.exists(), 60, lambda: "no preview file while the job runs")
        running = [j for j in stack.api.jobs(status=["running"])["jobs"] if j["parameters"]["prompt"] == "a lighthouse"]
        assert running, "the file was written while the job ran"
        first = Image.open(live)
        assert first.format == "JPEG" and first.size == (32, 24)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    record = json.loads(stdout)
    assert record["status"] == "succeeded" and record["preview"] is None  # ended: its image is the result
    last = Image.open(live)
    assert last.format == "JPEG" and last.size == (32, 24)
    said = re.search(rf"wrote {re.escape(str(live))}: the last preview, image 1, step (\d+) of 120", stderr)
    assert said, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["live.jpg", f"{record['id']}.png"])  # no part file
    assert Image.open(tmp_path / f"{record['id']}.png").size == (256, 192)


def test_status_says_when_a_queued_job_may_start_why_it_waits_and_its_predicted_time(stack):
    small = dict(width=128, height=128, steps=4)
    stack.api.wait(stack.api.submit(prompt="measures its time", **small)["id"])
    time.sleep(1.2)  # the API's view of the fleet (SDFLEET_API_CACHE_S) holds what it measured
    blocker = stack.api.submit(prompt="a long job", width=256, height=256, steps=150, num_images=4)
    queued = None
    try:
        wait_for(stack, blocker["id"], "status", "running")
        queued = stack.api.submit(prompt="waits its turn", **small)
        until(lambda: "busy" in (stack.api.job(queued["id"])["waiting_reason"] or ""), 30,
              lambda: stack.api.job(queued["id"]))
        r = sdfleet("status", queued["id"], "--api", stack.api_url)
        assert r.returncode == 0, r.stderr
        record = json.loads(r.stdout)  # stdout is the record alone
        assert record["status"] == "queued" and record["expected_start_s"] > 0 and record["predicted_generation_s"] > 0
        (line,) = r.stderr.splitlines()  # and a line for a person on stderr
        assert re.fullmatch(rf"job {queued['id'][:8]}: queued, position 1 for {stack.model}: the worker that can "
                            r"take it is busy: 1 job\(s\) running, 0 queued ahead of it; expected to start in "
                            r"~\d+(\.\d s| min); predicted generation \d+\.\d s", line), line
    finally:
        for j in (queued, blocker):
            if j:
                stack.api.http.delete(f"/v1/jobs/{j['id']}")
    done = stack.api.wait(stack.api.submit(prompt="predicted and measured", **small)["id"])
    r = sdfleet("status", done["id"], "--api", stack.api_url)
    (line,) = r.stderr.splitlines()
    assert re.fullmatch(rf"job {done['id'][:8]}: succeeded: 1 image in \d+\.\d s \(predicted \d+\.\d s\), "
                        r"peak RSS .+", line), line


def test_workers_and_plan_agree_with_admission(stack):
    """`workers` shows the stack's worker; `plan` predicts on each live worker with the prediction admission
    uses: what it says fits is admitted, what it says fits nowhere is refused, and `cancel` takes back a
    queued job."""
    r = sdfleet("workers", "--api", stack.api_url)
    assert r.returncode == 0, r.stderr
    (ours,) = [w for w in json.loads(sdfleet("workers", "--json", "--api", stack.api_url).stdout)
               if w["model"] == stack.model]
    row = next(line for line in r.stdout.splitlines() if line.startswith(ours["name"]))
    assert stack.model in row and "ready" in row and ours["host"] in row

    # the stack's own worker fits a small job
    r = sdfleet("plan", "--size", "128x128", "--guidance", "1", "--api", stack.api_url)
    assert r.returncode == 0, r.stderr
    assert any(line.startswith(ours["name"]) and line.rstrip().endswith("class)") for line in r.stdout.splitlines())
    assert f"fits on: {ours['host']}" in r.stdout
    assert stack.api.submit(prompt="a plan that fits", width=128, height=128, guidance_scale=1.0, steps=1)

    # a worker of another model with a 2 GiB budget (a heartbeat: no process needed to be planned for)
    model, name = f"small-{uuid.uuid4().hex[:6]}", f"small-host-{uuid.uuid4().hex[:4]}"
    with stack.sessions.begin() as s:
        fleet.beat(s, WorkerState(name=f"{name}:1", host=name, model=model, backend="optimum", precision="bf16",
                                  memory_mode="low", budget_bytes=2 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=4 * GB, available_bytes=3 * GB, resident_bytes=GB,
                                  current_job_id=None), fleet.db_now(s))

    r = sdfleet("plan", "--model", model, "--size", "1024x1024", "--api", stack.api_url)
    assert r.returncode == 1, r.stderr  # fits nowhere
    assert any(line.startswith(f"{name}:1") and line.rstrip().endswith(" no") for line in r.stdout.splitlines())
    assert "fits on no live host" in r.stdout and "would fit: " in r.stdout
    plan = json.loads(sdfleet("plan", "--model", model, "--size", "1024x1024", "--json", "--api", stack.api_url).stdout)
    with pytest.raises(ApiError) as refused:
        stack.api.submit(prompt="a plan that does not fit", model=model, width=1024, height=1024)
    assert refused.value.status == 422 and refused.value.code == "insufficient_memory"
    assert refused.value.details["predicted_bytes"] == plan["workers"][0]["predicted_peak_bytes"]

    r = sdfleet("plan", "--model", model, "--size", "128x128", "--images", "2", "--guidance", "1",
                "--api", stack.api_url)
    assert r.returncode == 0 and f"fits on: {name}" in r.stdout
    queued = stack.api.submit(prompt="queued for a worker that never comes", model=model, width=128, height=128,
                              num_images=2, guidance_scale=1.0)
    assert queued["status"] == "queued" and queued["queue_position"] == 1

    r = sdfleet("cancel", queued["id"], "--api", stack.api_url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{queued['id']} cancelled"
    assert stack.api.job(queued["id"])["status"] == "cancelled"


def test_api_down_is_one_sentence(tmp_path):
    port = free_port()  # nothing listens there
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "SDFLEET_API_URL": f"http://127.0.0.1:{port}"}
    for args in (["jobs"], ["submit", "a cat", "--wait"], ["status", str(uuid.uuid4())], ["workers"], ["plan"]):
        r = sdfleet(*args, env=env, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stdout == ""
        (line,) = r.stderr.splitlines()
        assert "Traceback" not in line and f"http://127.0.0.1:{port}" in line and "sdfleet up" in line


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_describes_every_option_with_its_default():
    for parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{parser.prog} {action.dest}: no help text"
    top = sdfleet("--help").stdout
    first_paragraph = " ".join(cli.__doc__.split("\n\n")[0].split())
    assert first_paragraph.endswith(".") and first_paragraph in " ".join(top.split())  # whole, not cut off
    submit = " ".join(sdfleet("submit", "--help").stdout.split())
    assert "seconds to wait for the job (default: 600.0)" in submit and "(API default 1)" in submit
    assert "denoising steps, 1..150 (default: the model's own, as `sdfleet models` shows)" in submit
    assert "--priority {low,normal,high}" in submit and "--webhook-url URL" in submit
    assert "at most this many (default: 20)" in " ".join(sdfleet("jobs", "--help").stdout.split())


def test_worker_and_ops_hand_their_arguments_to_celery(monkeypatch, tmp_path):
    for argv, expected in ((["worker", "--loglevel", "DEBUG"], ["--loglevel", "DEBUG"]),
                           (["worker", "--", "-E"], ["-E"]),
                           (["ops", "-Q", "extra", "--concurrency=2"], ["-Q", "extra", "--concurrency=2"])):
        seen = []
        module = types.ModuleType("fake")
        module.main = seen.append
        monkeypatch.setitem(sys.modules, "worker.app" if argv[0] == "worker" else "ops.app", module)
        assert cli.main(argv) == 0
        assert seen == [expected]
    assert cli.parse_args(["submit", "x"]).command == "submit"
    with pytest.raises(SystemExit):
        cli.parse_args(["submit", "x", "--loglevel", "DEBUG"])  # only worker and ops pass arguments on

    # and Celery really reads them: an ops worker (light: no model) told a bad log level is refused by Celery
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "SDFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'ops.db'}",
           "SDFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    r = sdfleet("ops", "--loglevel", "NOISY", env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "Invalid value for '-l' / '--loglevel': 'NOISY'" in r.stderr


def _up_env(tiny_model: Path, tmp_path: Path) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "SDFLEET_CACHE_DIR": str(tiny_model.parents[1]),  # reuse the tiny model built for the session
            "SDFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing answers there


def _left_behind(cwd: Path) -> list:
    left = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if p.info["cwd"] == str(cwd):
            left.append(p.info["cmdline"])
    return left


def test_up_refuses_a_busy_port(tiny_model, tmp_path):
    env = _up_env(tiny_model, tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = sdfleet("up", "--port", str(port), env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    assert f"port {port} is in use" in line and "--port" in line
    assert not redis_answers(env["SDFLEET_REDIS_URL"]) and _left_behind(tmp_path) == []  # nothing started


def test_up_runs_the_whole_local_stack_and_sigterm_leaves_nothing_running(tiny_model, tmp_path):
    """`sdfleet up --submit ... --keep`: starts Redis, the API (8000 is busy: on a free port, said so), a
    worker and an ops worker, runs the job, keeps running; SIGTERM stops all of it."""
    env = _up_env(tiny_model, tmp_path)
    hold = socket.socket()
    try:
        hold.bind(("127.0.0.1", 8000))  # 8000 busy: held here, or already in use by someone else
        hold.listen()
    except OSError:
        pass
    out, log_out, log_err = tmp_path / "demo.png", tmp_path / "up.out", tmp_path / "up.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdfleet", "up", "--submit", "a lighthouse in a storm", "--out", str(out),
         "--keep", "--width", "128", "--height", "128", "--steps", "2", "--log-dir", str(tmp_path)],
        cwd=tmp_path, env=env, stdout=open(log_out, "w"), stderr=open(log_err, "w"))
    try:
        until(lambda: "the stack keeps running" in log_err.read_text() or proc.poll() is not None, 300,
              lambda: log_err.read_text()[-3000:])
        err = log_err.read_text()
        assert proc.poll() is None, err[-3000:]
        assert "started the bundled redis-server" in err
        port = int(re.search(r"port 8000 is in use .*listens on port (\d+) instead", err).group(1))
        assert f"API http://127.0.0.1:{port}" in err
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        record = json.loads(log_out.read_text())
        assert record["status"] == "succeeded" and record["parameters"]["model"] == "tiny-sd"
        assert record["peak_rss_bytes"] > 0 and record["worker_host"]
        assert f"job {record['id'][:8]}: succeeded" in err  # --submit shows the job's progress too
        assert Image.open(out).size == (128, 128)
        assert (tmp_path / "sdfleet.db").exists()  # SQLite in the working directory, the default
        assert len(_left_behind(tmp_path)) >= 5  # up, Redis, API, worker (+ its pool child), ops

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        hold.close()
        if proc.poll() is None:
            proc.kill()
    assert "SIGTERM: stopping" in log_err.read_text()
    assert not redis_answers(env["SDFLEET_REDIS_URL"])
    assert _left_behind(tmp_path) == []  # no API, worker, pool child, ops or Redis left behind
