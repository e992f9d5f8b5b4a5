"""The web page (api/static) in a real headless browser: Debian's chromium driven by playwright, against a live
API + worker on the tiny model. Submit from the form and watch the progress, the image in the gallery, the job
page's memory plot drawn from the timeline's own points, a running job's live preview (job view and list),
cancelling a queued and a running job, the fleet page,
a refused job's hints resubmitting, and API keys (asked for, a wrong one refused, only the key's own jobs).

Screenshots of each view go to tmp_path and are checked (not one colour, the generated image visible); with
SDFLEET_TEST_SCREENSHOT_DIR set they are also written there, small (docs/screenshots holds the committed ones).
No browser: skipped with the reason, or failed when SDFLEET_TEST_REQUIRE_BROWSER=1 (CI sets it)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from sdfleet.client import Client
from shared.db import engine_for, migrate
from shared.memory import GB, fmt_size
from tests.conftest import ROOT, free_port, kill_tree, stack_env, start_worker, wait_for, wait_worker_ready

pytestmark = pytest.mark.one_database  # the page is not about SQL: on PostgreSQL alone when it is there

CHROMIUM = os.environ.get("SDFLEET_TEST_CHROMIUM", "/usr/bin/chromium")
KEY_STORE = "sdfleet.apiKey"  # the page's localStorage item
VIEWPORT = {"width": 1280, "height": 860}
MAX_DOC_SCREENSHOT = 150 * 1024


def no_browser(reason: str):
    if os.environ.get("SDFLEET_TEST_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SDFLEET_TEST_REQUIRE_BROWSER=1 and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        no_browser("the playwright package is not installed (the test extra: pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        no_browser(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium; never `playwright install`)")
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=20_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              # nothing but loopback resolves, and no proxy: the browser reaches no other host
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (empty localStorage); JavaScript errors fail the test."""
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


# ---------- screenshots ----------

def check_not_blank(img: Image.Image, what: str, min_colours: int = 20, min_stddev: float = 8.0) -> None:
    rgb = img.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 20)
    n = len(colours) if colours is not None else 1 << 20
    stddev = max(ImageStat.Stat(rgb).stddev)
    assert n >= min_colours and stddev >= min_stddev, f"{what} looks blank: {n} colours, stddev {stddev:.1f}"


def screenshot(page, tmp_path: Path, name: str, full_page: bool = False) -> Image.Image:
    """The page as it is: written to tmp_path and checked; a small copy for the docs when asked for."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    img = Image.open(path).convert("RGB")
    check_not_blank(img, f"screenshot {name}")
    out = os.environ.get("SDFLEET_TEST_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        small = img
        while True:  # a palette PNG keeps the docs small; shrink further if it is still too big
            buf = io.BytesIO()
            small.quantize(colors=256).save(buf, format="PNG", optimize=True)
            if buf.tell() < MAX_DOC_SCREENSHOT:
                break
            small = small.resize((int(small.width * 0.85), int(small.height * 0.85)), Image.LANCZOS)
        (Path(out) / f"{name}.png").write_bytes(buf.getvalue())
    return img


def element_image(locator, tmp_path: Path, name: str) -> Image.Image:
    path = tmp_path / f"{name}.png"
    locator.screenshot(path=str(path))
    return Image.open(path).convert("RGB")


def shown_pixels(page, selector: str) -> Image.Image:
    """The pixels an <img> shows, read in one step in the page (drawn to a canvas at its natural size): an element
    the page re-renders on every poll, as the live preview is, can be replaced between two steps of a screenshot."""
    url = page.wait_for_function(
        "(sel) => { const i = document.querySelector(sel); if (!i || !i.complete || !i.naturalWidth) return null;"
        " const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;"
        " c.getContext('2d').drawImage(i, 0, 0); return c.toDataURL('image/png'); }", arg=selector).json_value()
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def wait_image_loaded(page, img_locator, width: int) -> None:
    page.wait_for_function("([img, w]) => img.complete && img.naturalWidth === w",
                           arg=[img_locator.element_handle(), width])


# ---------- the page against the session's stack ----------

def open_page(page, url: str, model: str) -> None:
    page.goto(url + "/")
    expect(page.locator("#submit-button")).to_be_enabled()
    page.wait_for_selector(f'#f-model option[value="{model}"]', state="attached")


def fill_form(page, **fields) -> None:
    for name, value in fields.items():
        if name in ("model", "priority"):
            page.select_option(f"#f-{name}", str(value))
        else:
            page.fill(f"#f-{name}", str(value))


def row(page, job_id: str):
    return page.locator(f'[data-testid="job-row"][data-job-id="{job_id}"]')


def test_form_takes_its_limits_and_defaults_from_the_api_schema(stack, page):
    schema = stack.api.http.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]

    def bounds(name):
        p = schema[name]
        p = next((x for x in p.get("anyOf", []) if x.get("type") != "null"), p)
        return p

    served_before = {m["name"] for m in stack.api.models()}
    open_page(page, stack.api_url, stack.model)
    for name in ("width", "height", "steps", "guidance_scale", "num_images", "seed"):
        b = bounds(name)
        assert float(page.get_attribute(f"#f-{name}", "min")) == b["minimum"], name
        assert float(page.get_attribute(f"#f-{name}", "max")) == b["maximum"], name
        if schema[name].get("default") is not None:
            assert float(page.input_value(f"#f-{name}")) == schema[name]["default"], name
    assert int(page.get_attribute("#f-prompt", "maxlength")) == schema["prompt"]["maxLength"]
    assert page.eval_on_selector_all("#f-priority option", "os => os.map(o => o.value)") == schema["priority"]["enum"]
    assert page.input_value("#f-priority") == schema["priority"]["default"]
    options = page.eval_on_selector_all("#f-model option", "os => os.map(o => o.value)")
    assert stack.model in options and set(options) <= served_before | {m["name"] for m in stack.api.models()}
    # steps, guidance and size left empty are the model's own (its workers announce them): shown as placeholders
    page.select_option("#f-model", stack.model)
    defaults = next(m for m in stack.api.models() if m["name"] == stack.model)["defaults"]
    for name in ("width", "height", "steps", "guidance_scale"):
        assert page.input_value(f"#f-{name}") == ""
        assert page.get_attribute(f"#f-{name}", "placeholder") == f"{defaults[name]:g} (model's)", name
    expect(page.locator("#model-defaults")).to_contain_text(f"{defaults['family']} · {defaults['pipeline']}")

    # a value the API refuses shows the API's own message beside the field
    fill_form(page, prompt="a cat", model=stack.model, width=500)
    page.click("#submit-button")
    expect(page.locator("#submit-error")).to_have_attribute("data-code", "invalid_request")
    expect(page.locator("#submit-error-message")).to_contain_text("width: must be a multiple of 8")
    expect(page.locator("#f-width")).to_have_class(re.compile("invalid"))


def test_submit_see_progress_image_in_gallery_and_the_memory_plot(stack, page, tmp_path):
    prompt = f"a lighthouse in a storm {uuid.uuid4().hex[:6]}"
    open_page(page, stack.api_url, stack.model)
    fill_form(page, prompt=prompt, model=stack.model, width=128, height=128, steps=150, num_images=2, seed=1234)
    page.click("#submit-button")
    expect(page.locator("#submit-ok")).to_be_visible()
    job_id = page.locator("#submit-ok a").get_attribute("href").removeprefix("#/job/")
    r = row(page, job_id)
    expect(r).to_contain_text(prompt)

    # progress while it runs: image i of N, step k of n
    expect(r.locator('[data-testid="progress"]')).to_contain_text(re.compile(r"image [12] of 2 · step [1-9]\d* of 150"))
    expect(r).to_have_attribute("data-status", "succeeded", timeout=60_000)
    record = stack.api.job(job_id)
    assert record["status"] == "succeeded" and record["parameters"]["seed"] == 1234
    expect(r.locator('[data-testid="elapsed"]')).to_have_text(re.compile(r"^\d+\.\d s$"))
    expect(r.locator('[data-testid="wait"]')).to_have_text(re.compile(r"^\d+\.\d s$"))

    # the gallery shows both images
    page.click("#nav-gallery")
    items = page.locator(f'[data-testid="gallery-item"][data-job-id="{job_id}"]')
    expect(items).to_have_count(2)
    first = items.first.locator("img")
    wait_image_loaded(page, first, 128)
    screenshot(page, tmp_path, "gallery")
    shown = element_image(first, tmp_path, "gallery-image")
    check_not_blank(shown, "the generated image in the gallery", min_colours=200, min_stddev=20)

    # the job page: parameters, images, and the plot drawn from the timeline's points
    items.first.locator("a").click()
    expect(page).to_have_url(re.compile(f"#/job/{job_id}$"))
    detail = page.locator("#job-detail")
    expect(detail.locator('[data-testid="job-prompt"]')).to_have_text(prompt)
    expect(detail).to_contain_text("1234")
    expect(detail).to_contain_text("128×128")
    expect(detail.locator('[data-testid="job-image"]')).to_have_count(2)
    plot = page.locator("#memory-plot")
    expect(plot).to_have_attribute("data-job-id", job_id)
    memory = stack.api.memory(job_id)
    samples = memory["samples"]
    assert int(plot.get_attribute("data-samples")) == len(samples) > 5
    geo = {k: float(plot.get_attribute(f"data-{k}")) for k in ("x0", "x1", "y0", "y1", "tmax", "vmax")}
    assert geo["tmax"] == pytest.approx(max(s["t"] for s in samples))
    for series in ("rss", "anon", "file"):
        points = [tuple(map(float, p.split(","))) for p in
                  plot.locator(f'polyline[data-series="{series}"]').get_attribute("points").split()]
        expected = [(geo["x0"] + s["t"] / geo["tmax"] * (geo["x1"] - geo["x0"]),
                     geo["y0"] - s[series] / geo["vmax"] * (geo["y0"] - geo["y1"])) for s in samples]
        assert len(points) == len(expected)
        assert all(abs(a - c) < 0.02 and abs(b - d) < 0.02 for (a, b), (c, d) in zip(points, expected)), series
    for phase in ("encode", "denoise", "decode"):
        for image in (0, 1):
            assert plot.locator(f'rect[data-phase="{phase}"][data-image="{image}"]').count() >= 1, (phase, image)
    predicted, peak = memory["predicted_peak_bytes"], memory["peak_rss_bytes"]
    assert predicted == record["predicted_peak_bytes"] and peak == record["peak_rss_bytes"]
    assert int(plot.locator('line[data-ref="predicted"]').get_attribute("data-value")) == predicted
    assert int(plot.locator('line[data-ref="peak"]').get_attribute("data-value")) == peak
    budget = memory.get("worker_budget_bytes")
    if budget is not None:  # drawn as a line, or named above the plot when far off its scale
        assert plot.locator('[data-ref="budget"], [data-ref="budget-offscale"]').count() == 1
    summary = page.locator("#memory-summary")
    expect(summary).to_contain_text(f"predicted {fmt_size(predicted)}")
    expect(summary).to_contain_text(f"measured peak {fmt_size(peak)}")
    wait_image_loaded(page, detail.locator('[data-testid="job-image"]').first, 128)
    screenshot(page, tmp_path, "job", full_page=True)
    drawn = element_image(plot, tmp_path, "plot")
    check_not_blank(drawn, "the memory plot", min_colours=10)
    dark = sum(drawn.convert("L").histogram()[:70])
    assert dark > 200, "the RSS line is not drawn"


def test_a_running_job_shows_its_live_preview_in_the_job_view_and_the_list(stack, page, tmp_path):
    """While a long job denoises, the job view shows its latest preview (the latents' size, 32x24 here) and
    replaces it with a newer one; the jobs list shows it as a thumbnail; once the job has ended, neither."""
    job = stack.api.submit(prompt="a preview while it runs", model=stack.model, width=256, height=192, steps=150,
                           num_images=4, guidance_scale=7.5)
    try:
        wait_for(stack, job["id"], "status", "running", timeout=30)
        page.goto(f"{stack.api_url}/#/job/{job['id']}")
        img = page.locator('[data-testid="job-preview"]')
        expect(img).to_be_visible(timeout=30_000)
        # by selector, never by element handle: the view is re-rendered on every poll, the <img> with it
        loaded = ("([sel, w]) => { const img = document.querySelector(sel);"
                  " return !!img && img.complete && img.naturalWidth === w && !!img.dataset.shown; }")
        page.wait_for_function(loaded, arg=['[data-testid="job-preview"]', 32])
        first = img.get_attribute("data-shown")
        image, step = map(int, first.split("/"))
        assert 0 <= image < 4 and 1 <= step <= 150
        expect(page.locator('[data-testid="job-preview-caption"]')).to_contain_text(
            re.compile(r"image [1-4] of 4 · step \d+ of 150"))
        shown = shown_pixels(page, '[data-testid="job-preview"]')
        check_not_blank(shown, "the preview in the job view", min_colours=20, min_stddev=5)
        screenshot(page, tmp_path, "job-preview", full_page=True)
        # refreshed: a newer preview (every SDFLEET_PREVIEW_INTERVAL_S) replaces it while the job runs
        page.wait_for_function(
            "(first) => { const i = document.querySelector('[data-testid=job-preview]');"
            " return !!i && !!i.dataset.shown && i.dataset.shown !== first && i.complete && i.naturalWidth === 32; }",
            arg=first, timeout=30_000)
        newer = tuple(map(int, page.locator('[data-testid="job-preview"]').get_attribute("data-shown").split("/")))
        assert newer > (image, step)

        # the jobs list: a thumbnail in the job's row
        page.goto(stack.api_url + "/")
        thumb = row(page, job["id"]).locator('[data-testid="preview-thumb"]')
        expect(thumb).to_be_visible()
        thumb_sel = '[data-testid="job-row"][data-job-id="%s"] [data-testid="preview-thumb"]' % job["id"]
        page.wait_for_function(loaded, arg=[thumb_sel, 32])
        screenshot(page, tmp_path, "jobs-preview")
    finally:
        stack.api.http.delete(f"/v1/jobs/{job['id']}")
    r = row(page, job["id"])
    expect(r).to_have_attribute("data-status", "cancelled", timeout=30_000)
    expect(r.locator('[data-testid="preview-thumb"]')).to_have_count(0)
    page.goto(f"{stack.api_url}/#/job/{job['id']}")
    expect(page.locator('[data-testid="job-prompt"]')).to_have_text("a preview while it runs")
    expect(page.locator('[data-testid="job-preview-card"]')).to_have_count(0)


def test_fleet_page_shows_workers_and_model_profiles(stack, page, tmp_path):
    page.goto(stack.api_url + "/#/fleet")
    worker = next(w for w in stack.api.workers() if w["model"] == stack.model and w["alive"])
    r = page.locator(f'[data-testid="worker-row"][data-worker="{worker["name"]}"]')
    expect(r).to_have_attribute("data-alive", "true")
    for text in (worker["model"], worker["backend"], worker["precision"], worker["memory_mode"], "ready"):
        expect(r).to_contain_text(text)
    expect(r.locator('[data-testid="resident"]')).to_have_text(re.compile(r"^\d+(\.\d)? (GiB|MiB)$"))
    expect(r.locator('[data-testid="budget"]')).to_contain_text("GiB")
    model = page.locator(f'[data-testid="model"][data-model="{stack.model}"]')
    (m,) = [m for m in stack.api.models() if m["name"] == stack.model]
    assert m["profiles"], "the earlier job measured a profile"
    expect(model.locator('[data-testid="profile-row"]')).to_have_count(len(m["profiles"]))
    expect(model).to_contain_text(f"largest budget {fmt_size(m['largest_budget_bytes'])}")
    screenshot(page, tmp_path, "fleet")


def test_the_job_view_shows_its_history_attempts_and_resumes_in_order(stack, page):
    """The history of a job taken back twice (a lost worker, then one that left) and resumed from its checkpoint
    (its record's entries, as the worker writes them; the resume itself is tested in tests/worker)."""
    from sqlalchemy import text

    job = stack.api.wait(stack.api.submit(prompt="a resumed job", model=stack.model, width=64, height=64,
                                          steps=2)["id"])
    lost = {"attempt": 1, "worker_host": "host-a", "started_at": None, "ended_at": "2026-12-03T10:00:00Z",
            "error": {"code": "worker_lost", "message": "the worker process running attempt 1 died"},
            "peak_rss_bytes": None}
    left = {**lost, "attempt": 2, "error": {"code": "worker_left", "message": "the worker is stopping (SIGTERM); "
                                            "handed back, not counted as an attempt"}}
    resumes = [{"attempt": n, "worker_host": host, "resumed": True, "image": 0, "step": step, "steps": 20,
                "images_kept": 0, "checkpoint_host": "host-a", "note": f"resumed from step {step} of 20 on {host} "
                "(checkpoint written on host-a)"} for n, step, host in ((2, 7, "host-b"), (3, 13, "host-c"))]
    with engine_for(stack.database_url).begin() as conn:
        conn.execute(text("UPDATE jobs SET history = :h, resumes = :r WHERE id = :j"),
                     {"h": json.dumps([lost, left]), "r": json.dumps(resumes), "j": job["id"]})
    page.goto(f"{stack.api_url}/#/job/{job['id']}")
    items = page.locator('[data-testid^="history-"]')
    expect(items).to_have_count(4)
    assert [t.split(":")[0] for t in items.all_inner_texts()] == ["attempt 1 on host-a", "attempt 2 on host-a",
                                                                  "attempt 2", "attempt 3"]
    expect(items.nth(2)).to_have_text("attempt 2: resumed from step 7 of 20 on host-b (checkpoint written on host-a)")
    expect(items.nth(1)).to_contain_text("worker_left")


def test_the_job_view_shows_an_inpainting_jobs_kind_and_what_it_was_given(stack, page):
    import base64

    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (40, 90, 200)).save(buf, format="JPEG")
    mask = io.BytesIO()
    Image.new("L", (96, 64), 255).save(mask, format="PNG")
    job = stack.api.wait(stack.api.submit(prompt="a boat", model=stack.model, steps=2,
                                          image=base64.b64encode(buf.getvalue()).decode(),
                                          mask=base64.b64encode(mask.getvalue()).decode())["id"])
    assert job["status"] == "succeeded", job["error"]
    page.goto(f"{stack.api_url}/#/job/{job['id']}")
    expect(page.get_by_test_id("job-kind")).to_have_text("inpainting")
    given = page.get_by_test_id("job-input-item")
    expect(given).to_have_count(2)
    expect(given.first).to_contain_text("image · 96×64 · JPEG")
    # the stored input is served to the page, as stored (PNG, its size kept)
    img = page.get_by_test_id("job-input").first
    expect(img).to_have_attribute("src", re.compile(r"/inputs/image\.png$"))
    img.scroll_into_view_if_needed()
    page.wait_for_function("(img) => img.complete && img.naturalWidth === 96", arg=img.element_handle())


def test_cancel_a_queued_and_a_running_job_from_the_list(stack, page, tmp_path):
    # keep the worker busy, then queue one behind it
    busy = stack.api.submit(prompt="a very long job", model=stack.model, width=256, height=256, steps=150,
                            num_images=8)
    try:
        wait_for(stack, busy["id"], "status", "running", timeout=30)
        queued = stack.api.submit(prompt="waiting its turn", model=stack.model, width=128, height=128, steps=2)
        page.goto(stack.api_url + "/")
        q, b = row(page, queued["id"]), row(page, busy["id"])
        expect(q).to_have_attribute("data-status", "queued")
        expect(q.locator('[data-testid="queue-position"]')).to_have_text("#1 in queue")
        progress = re.compile(r"image \d of 8 · step [1-9]\d+ of 150")
        expect(b.locator('[data-testid="progress"]')).to_contain_text(progress)
        screenshot(page, tmp_path, "jobs")
        q.locator('[data-testid="cancel"]').click()
        expect(q).to_have_attribute("data-status", "cancelled")
        record = stack.api.job(queued["id"])
        assert record["status"] == "cancelled" and record["started_at"] is None

        b.locator('[data-testid="cancel"]').click()  # running: stops at its next step
        expect(b).to_have_attribute("data-status", "cancelled", timeout=30_000)
        assert stack.api.job(busy["id"])["status"] == "cancelled"
    finally:
        stack.api.http.delete(f"/v1/jobs/{busy['id']}")


def test_a_queued_job_shows_its_expected_start_why_it_waits_and_the_predicted_time(stack, page, tmp_path):
    small = dict(model=stack.model, width=128, height=128, steps=4)
    stack.api.wait(stack.api.submit(prompt="measures its time", **small)["id"])
    time.sleep(1.2)  # the API's view of the fleet (SDFLEET_API_CACHE_S) holds what it measured
    busy = stack.api.submit(prompt="a very long job", model=stack.model, width=256, height=256, steps=150,
                            num_images=8)
    queued = None
    try:
        wait_for(stack, busy["id"], "status", "running", timeout=30)
        queued = stack.api.submit(prompt="waiting its turn", **small)
        page.goto(stack.api_url + "/")
        q = row(page, queued["id"])
        expect(q).to_have_attribute("data-status", "queued")
        expect(q.locator('[data-testid="waiting-reason"]')).to_have_text(
            "the worker that can take it is busy: 1 job(s) running, 0 queued ahead of it")
        start = re.compile(r"^starts in ~(\d+\.\d s|\d+m \d\ds)$")
        expect(q.locator('[data-testid="expected-start"]')).to_have_text(start)
        expect(q.locator('[data-testid="predicted"]')).to_have_text(re.compile(r"^~\d+\.\d s predicted$"))
        expect(row(page, busy["id"]).locator('[data-testid="predicted"]')).to_have_text(
            re.compile(r"^~(\d+\.\d s|\d+m \d\ds) predicted$"))
        record = stack.api.job(queued["id"])
        assert record["expected_start_s"] > 0 and record["predicted_generation_s"] > 0

        page.goto(f"{stack.api_url}/#/job/{queued['id']}")
        expect(page.locator('[data-testid="job-waiting"]')).to_contain_text("is busy: 1 job(s) running")
        expect(page.locator('[data-testid="job-expected-start"]')).to_have_text(start)
        expect(page.locator('[data-testid="job-waiting-reason"]')).to_have_text(record["waiting_reason"])
        expect(page.locator('[data-testid="job-predicted-time"]')).to_have_text(re.compile(r"^\d+\.\d s$"))
        screenshot(page, tmp_path, "waiting")
    finally:
        for j in (queued, busy):
            if j:
                stack.api.http.delete(f"/v1/jobs/{j['id']}")


# ---------- API keys, and a refusal's hints, on an API that requires keys ----------

@dataclass
class KeyedStack:
    url: str
    model: str
    keys: dict


@pytest.fixture(scope="module")
def keyed(redis_url, tiny_model, tmp_path_factory):
    """An API with SDFLEET_AUTH=required on its own fresh SQLite database (keys created in the session's stack
    would make every other test need one), two keys, and one worker with a 2 GiB budget (so a large job is
    refused with hints)."""
    tmp = tmp_path_factory.mktemp("keyed")
    database_url = f"sqlite:///{tmp / 'keyed.db'}"
    model = f"tiny-keys-{uuid.uuid4().hex[:6]}"
    env = stack_env(database_url, redis_url, SDFLEET_MODEL=str(tiny_model), SDFLEET_MODEL_NAME=model,
                    SDFLEET_DEFAULT_MODEL=model, SDFLEET_AUTH="required", SDFLEET_MEMORY_BUDGET=str(2 * GB))
    migrate(engine_for(database_url))
    worker = start_worker(env, tmp / "worker.log")
    procs = [worker]
    try:
        makers = {name: subprocess.Popen([sys.executable, "-m", "sdfleet", "keys", "create", name], cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for name in ("alice", "bob")}
        keys = {}
        for name, proc in makers.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            keys[name] = json.loads(out)["key"]
        port = free_port()
        api = subprocess.Popen([sys.executable, "-m", "sdfleet", "api", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=open(tmp / "api.log", "ab"), stderr=subprocess.STDOUT)
        procs.append(api)
        url = f"http://127.0.0.1:{port}"
        client = Client(url)
        deadline = time.monotonic() + 60
        while not client.healthy():
            assert api.poll() is None and time.monotonic() < deadline, (tmp / "api.log").read_text()
            time.sleep(0.1)
        wait_worker_ready(worker, tmp / "worker.log", database_url, model)
        yield KeyedStack(url, model, keys)
    finally:
        kill_tree(procs)


def test_a_refused_job_shows_the_apis_message_and_hints_that_resubmit(browser, keyed, page, tmp_path):
    # first on this worker: no job of its model measured yet, admission predicts from its prior (generous)
    key = keyed.keys["alice"]
    page.add_init_script(f"localStorage.setItem({json.dumps(KEY_STORE)}, {json.dumps(key)})")
    open_page(page, keyed.url, keyed.model)
    big = dict(prompt="a huge mural", model=keyed.model, width=2048, height=2048, guidance_scale=7.5, steps=2,
               num_images=1)
    fill_form(page, **big)
    page.click("#submit-button")
    box = page.locator("#submit-error")
    expect(box).to_have_attribute("data-code", "insufficient_memory")
    r = Client(keyed.url, api_key=key).http.post("/v1/jobs", json=big)
    assert r.status_code == 422
    error = r.json()["error"]
    expect(page.locator("#submit-error-message")).to_have_text(error["message"])
    fitting = [h for h in error["details"]["hints"] if h["fits"]]
    assert fitting, error
    buttons = page.locator('[data-testid="hint"]')
    expect(buttons).to_have_count(len(fitting))
    assert buttons.all_inner_texts() == [h["message"] for h in fitting]
    screenshot(page, tmp_path, "refused")

    buttons.first.click()  # resubmits the same form with the hint's change
    expect(page.locator("#submit-ok")).to_be_visible()
    expect(box).to_be_hidden()
    job_id = page.locator("#submit-ok a").get_attribute("href").removeprefix("#/job/")
    params = Client(keyed.url, api_key=key).job(job_id)["parameters"]
    expected = {**{k: v for k, v in big.items() if k != "model"}, **fitting[0]["change"]}
    assert {k: params[k] for k in expected} == expected
    for field, value in fitting[0]["change"].items():
        assert float(page.input_value(f"#f-{field}")) == value


def test_keys_asked_for_wrong_one_refused_and_only_the_keys_own_jobs(browser, keyed, page, tmp_path):
    alice, bob = Client(keyed.url, api_key=keyed.keys["alice"]), Client(keyed.url, api_key=keyed.keys["bob"])
    bobs = bob.submit(prompt="bob's private prompt", model=keyed.model, width=128, height=128, steps=2)

    sent = []
    page.on("request", lambda req: sent.append((req.url, req.headers.get("authorization")))
            if "/v1/" in req.url or req.url.endswith("/openapi.json") else None)
    page.goto(keyed.url + "/")
    panel = page.locator("#key-panel")
    expect(panel).to_be_visible()  # the API answered 401: the page asks for a key
    expect(page.locator("#key-status")).to_have_text("key needed")
    # the schema needs the key too: the form waits for it, with no error of its own
    expect(page.locator("#submit-button")).to_be_disabled()
    expect(page.locator("#submit-error")).to_be_hidden()
    screenshot(page, tmp_path, "key")

    page.fill("#key-input", "sdf_not-a-key")
    page.click("#key-save")
    expect(page.locator("#key-error")).to_contain_text("unknown or revoked API key")
    expect(panel).to_be_visible()
    assert page.evaluate(f"localStorage.getItem('{KEY_STORE}')") is None

    page.fill("#key-input", keyed.keys["alice"])
    page.click("#key-save")
    expect(panel).to_be_hidden()
    assert page.evaluate(f"localStorage.getItem('{KEY_STORE}')") == keyed.keys["alice"]
    expect(page.locator("#key-status")).to_have_text(f"key …{keyed.keys['alice'][-4:]}")

    # with the key, the schema is read and the form takes its limits from it
    schema = alice.http.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]
    expect(page.locator("#submit-button")).to_be_enabled()
    assert float(page.get_attribute("#f-steps", "max")) == schema["steps"]["anyOf"][0]["maximum"]
    assert f"Bearer {keyed.keys['alice']}" in {h for u, h in sent if u.endswith("/openapi.json")}
    page.wait_for_selector(f'#f-model option[value="{keyed.model}"]', state="attached")
    fill_form(page, prompt="alice's own job", model=keyed.model, width=128, height=128, steps=2)
    page.click("#submit-button")
    expect(page.locator("#submit-ok")).to_be_visible()
    job_id = page.locator("#submit-ok a").get_attribute("href").removeprefix("#/job/")
    expect(row(page, job_id)).to_have_attribute("data-status", "succeeded", timeout=30_000)
    assert alice.job(job_id)["parameters"]["prompt"] == "alice's own job"
    listed = page.eval_on_selector_all('[data-testid="job-row"]', "rs => rs.map(r => r.dataset.jobId)")
    alices = [j["id"] for j in alice.http.get("/v1/jobs").json()["jobs"]]
    assert job_id in listed and listed == alices and bobs["id"] not in listed
    assert "bob's private prompt" not in page.content()

    # the image is fetched with the key (a blob: URL), and the key stays across a reload
    page.click("#nav-gallery")
    img = page.locator(f'[data-testid="gallery-item"][data-job-id="{job_id}"] img')
    wait_image_loaded(page, img, 128)
    assert img.get_attribute("src").startswith("blob:")
    page.reload()
    expect(page.locator(f'[data-testid="gallery-item"][data-job-id="{job_id}"]')).to_have_count(1)
    expect(panel).to_be_hidden()

    # another key's job is no job here
    page.goto(f"{keyed.url}/#/job/{bobs['id']}")
    expect(page.locator('[data-testid="job-error"]')).to_contain_text("no job")
    assert "bob's private prompt" not in page.content()

    after_key = [(u, h) for u, h in sent if h is not None]
    assert after_key and all(h in (f"Bearer {keyed.keys['alice']}", "Bearer sdf_not-a-key") for _, h in after_key)
    assert {h for u, h in sent if "/images/" in u} == {f"Bearer {keyed.keys['alice']}"}
