"""Fit rather than refuse, end to end: a job no live worker fits, submitted with `fit: auto`, is admitted with
the refusal's first hint that fits and runs on a real worker (the tiny model, a 2 GiB budget), its images of
the changed size and its record saying what changed and why; the same through `sdfleet submit --fit auto`
(the change said on stderr), `sdfleet plan` (what --fit auto would do) and OpenAI's images route. The API's
side on both databases, with heartbeats, is tests/api/test_fit.py."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
from PIL import Image

from sqlalchemy import text

from shared.db import engine_for
from shared.memory import GB
from tests.cli.test_cli import sdfleet
from tests.helpers import assert_error_shape

# processes and a client: the SQL under them (the `fitted` column) runs on both databases in tests/api/test_fit.py
pytestmark = pytest.mark.one_database

HUGE = {"prompt": "a huge mural", "width": 2048, "height": 2048, "guidance_scale": 7.5, "steps": 2}


def test_a_job_no_worker_fits_runs_fitted_with_fit_auto_and_says_what_changed(stack, spawn_worker, tmp_path):
    model, _ = spawn_worker("fit", SDFLEET_MEMORY_BUDGET=2 * GB)

    def unmeasured() -> None:
        """Back to the prior: the tiny model's measured jobs rise a few MiB above their base, and scaled from
        them even a 2048x2048 job would fit 2 GiB. What is tested is what admission does with a job predicted
        past every budget, whatever made the prediction."""
        with engine_for(stack.database_url).begin() as conn:
            conn.execute(text("DELETE FROM memory_profiles WHERE model = :m"), {"m": model})

    body = {**HUGE, "model": model}
    refused = assert_error_shape(stack.api.http.post("/v1/jobs", json=body), 422, "insufficient_memory")
    hint = next(h for h in refused["details"]["hints"] if h["fits"])

    r = stack.api.http.post("/v1/jobs", json={**body, "fit": "auto"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["fitted"] == {"changes": hint["change"], "original": {k: body[k] for k in hint["change"]},
                             "reason": refused["message"], "hint": hint["message"]}
    done = stack.api.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    assert done["fitted"] == job["fitted"] and done["peak_rss_bytes"] <= 2 * GB
    p = done["parameters"]
    assert {k: p[k] for k in hint["change"]} == hint["change"] and p["steps"] == 2
    (image,) = done["images"]
    assert Image.open(io.BytesIO(stack.api.image(image["url"]))).size == (p["width"], p["height"]) != (2048, 2048)

    # the command line: the plan says what --fit auto would do; submit --fit auto says what it did
    unmeasured()
    r = sdfleet("plan", "--model", model, "--size", "2048x2048", "--guidance", "7.5", "--api", stack.api_url)
    assert r.returncode == 1 and "with --fit auto: admitted as " in r.stdout, r.stdout
    out = tmp_path / "mural.png"
    r = sdfleet("submit", "a huge mural", "--model", model, "--width", "2048", "--height", "2048",
                "--guidance-scale", "7.5", "--steps", "2", "--fit", "auto", "--out", str(out), "--api", stack.api_url)
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["status"] == "succeeded" and record["fitted"]["original"]["width"] == 2048
    assert "fitted: width 2048 -> " in r.stderr and record["fitted"]["hint"] in r.stderr
    assert Image.open(out).size == (record["parameters"]["width"], record["parameters"]["height"])
    unmeasured()
    r = sdfleet("submit", "a huge mural", "--model", model, "--width", "2048", "--height", "2048",
                "--guidance-scale", "7.5", "--api", stack.api_url)
    assert r.returncode == 2 and "HTTP 422: this job is predicted to need" in r.stderr  # without --fit: refused
    assert "would fit: " in r.stderr and "--fit auto runs it with the first that would fit" in r.stderr

    # OpenAI's images route, `fit` as an sdfleet field beside steps and seed
    client = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    unmeasured()
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a huge mural", model=model, size="2048x2048", extra_body={"steps": 2})
    assert e.value.code == "insufficient_memory"
    result = client.images.generate(prompt="a huge mural", model=model, size="2048x2048", response_format="b64_json",
                                    extra_body={"steps": 2, "guidance_scale": 7.5, "fit": "auto"})
    fitted = result.model_extra["sdfleet"]["fitted"]
    assert fitted["original"]["width"] == 2048 and fitted["changes"]["width"] < 2048
    (data,) = result.data
    side = fitted["changes"]["width"]
    assert Image.open(io.BytesIO(base64.b64decode(data.b64_json))).size == (side, fitted["changes"]["height"])
