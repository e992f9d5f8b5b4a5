"""The per-job meter: the kernel high-water mark reset per job, and the sampler fallback."""

from __future__ import annotations

import mmap
import time

import numpy as np

from worker import meter
from worker.meter import JobMeter

MB = 2**20


def _hold(mb: int, seconds: float = 0.2):
    """`mb` of fresh anonymous memory, every page written (so resident): its own mapping, never heap the
    process freed before and kept (what ran earlier in this test process would decide the RSS it adds)."""
    a = mmap.mmap(-1, mb * MB)
    for _ in range(mb):
        a.write(b"\x01" * MB)
    time.sleep(seconds)
    return a


def test_peak_is_the_jobs_own_not_the_processes_history():
    big = _hold(400)
    del big  # the process's high-water mark is now at least 400 MB above the current RSS
    with JobMeter() as m:
        _hold(100)
    r = m.reading
    assert r.method == "vmhwm"
    assert r.peak_rss_bytes - r.rss_before_bytes >= 95 * MB
    assert r.peak_rss_bytes - r.rss_before_bytes < 300 * MB
    assert r.peak_rss_anon_bytes - (r.rss_before_bytes - r.peak_rss_file_bytes) >= 90 * MB


def test_kernel_mark_catches_a_spike_shorter_than_the_sampling_interval():
    with JobMeter(interval_s=5) as m:
        a = np.ones(200 * MB // 8)
        del a
    assert m.reading.peak_rss_bytes - m.reading.rss_before_bytes >= 190 * MB


def test_sampler_is_the_fallback_where_clear_refs_is_refused(monkeypatch):
    monkeypatch.setattr(meter, "reset_high_water_mark", lambda: False)
    with JobMeter(interval_s=0.01) as m:
        _hold(150)
    assert m.reading.method == "sampler"
    assert m.reading.peak_rss_bytes - m.reading.rss_before_bytes >= 140 * MB
