"""The command line: `sdfleet submit/status` against a running stack, and `sdfleet up`, the local stack that
README's first command runs (bundled Redis, SQLite, API, one worker), leaving nothing running."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
from PIL import Image

from sdfleet.stack import redis_answers
from tests.conftest import ROOT, free_port


def sdfleet(*args, env=None, timeout=300, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sdfleet", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


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

    r = sdfleet("submit", "a cat", "--api", stack.api_url, "--width", "100")
    assert r.returncode == 2
    assert "width" in r.stderr and "multiple of 8" in r.stderr


def test_up_runs_the_whole_local_stack_and_leaves_nothing_running(tiny_model, tmp_path):
    redis_port, api_port = free_port(), free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "SDFLEET_CACHE_DIR": str(tiny_model.parents[1]),  # reuse the tiny model built for the session
           "SDFLEET_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}  # nothing answers there
    out = tmp_path / "demo.png"
    r = sdfleet("up", "--port", str(api_port), "--submit", "a lighthouse in a storm", "--out", str(out),
                "--width", "128", "--height", "128", "--steps", "2", "--log-dir", str(tmp_path),
                env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "started the bundled redis-server" in r.stderr
    record = json.loads(r.stdout)
    assert record["status"] == "succeeded" and record["parameters"]["model"] == "tiny-sd"
    assert record["peak_rss_bytes"] > 0 and record["worker_host"]
    assert Image.open(out).size == (128, 128)
    assert (tmp_path / "sdfleet.db").exists()  # SQLite in the working directory, the default
    assert not redis_answers(f"redis://127.0.0.1:{redis_port}/0")
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline", "cwd"]) if p.info["cwd"] == str(tmp_path)]
    assert left == []  # no API, worker, pool child or Redis left behind
