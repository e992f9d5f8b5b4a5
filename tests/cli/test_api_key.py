"""The command-line client sends SDFLEET_API_KEY to an API that requires keys."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from shared import fleet, keys
from shared.db import engine_for, migrate, session_factory
from shared.fleet_contract import WorkerState
from shared.memory import GB
from shared.models import utcnow
from tests.conftest import ROOT, free_port


def test_the_cli_sends_sdfleet_api_key(tmp_path, redis_url):
    url = f"sqlite:///{tmp_path / 'keyed.db'}"
    migrate(engine_for(url))
    model = f"cli-{uuid.uuid4().hex[:6]}"
    with session_factory(url).begin() as s:
        fleet.beat(s, WorkerState(name="h:1", host="h", model=model, backend="optimum", precision="bf16",
                                  memory_mode="fast", budget_bytes=8 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=16 * GB, available_bytes=12 * GB, resident_bytes=GB,
                                  current_job_id=None), utcnow())
        key = keys.create_key(s, "cli")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDFLEET_DATABASE_URL": url, "SDFLEET_REDIS_URL": redis_url,
           "SDFLEET_DEFAULT_MODEL": model, "SDFLEET_WORKER_STALE_S": "3600"}
    api = subprocess.Popen([sys.executable, "-m", "sdfleet", "api", "--port", str(port)], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cli = [sys.executable, "-m", "sdfleet", "submit", "a cat", "--width", "64", "--height", "64",
               "--api", f"http://127.0.0.1:{port}"]
        deadline = time.monotonic() + 60
        while (r := subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, text=True)).returncode != 2 \
                or "HTTP 401" not in r.stderr:
            assert time.monotonic() < deadline and api.poll() is None, r.stderr
            time.sleep(0.3)
        r = subprocess.run(cli, env={**env, "SDFLEET_API_KEY": key.token}, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert '"status": "queued"' in r.stdout
    finally:
        api.terminate()
        api.wait(20)
