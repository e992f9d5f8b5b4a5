"""A job's own peak memory in a long-lived worker process.

The kernel keeps a high-water mark of the resident set (VmHWM); writing "5" to /proc/self/clear_refs resets
it to the current RSS, so the mark read after the job is the job's own peak, spikes included. A psutil
sampler runs beside it: it splits anonymous memory (heap, OpenVINO's compiled weights) from file-backed
(mmapped IR weights, which the kernel may drop), and it is the measure where clear_refs is not allowed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import psutil

from shared.store import MemoryReading


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel or the sandbox does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def high_water_mark_bytes() -> int | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_free_memory() -> None:
    """Hand the heap that a job freed back to the kernel (glibc keeps it otherwise, and the worker's RSS
    would stay at its largest job's peak). OpenVINO's own buffers for the largest shape seen stay."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class JobMeter:
    """Context manager around one job: `reading` holds its peak once the block exits."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.reading: MemoryReading | None = None
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._peak_rss = self._peak_anon = self._peak_file = 0

    def _sample(self) -> None:
        m = self._proc.memory_info()
        # On Linux psutil's `shared` is RssFile + RssShmem: the file-backed part of the resident set.
        self._peak_rss = max(self._peak_rss, m.rss)
        self._peak_anon = max(self._peak_anon, m.rss - m.shared)
        self._peak_file = max(self._peak_file, m.shared)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "JobMeter":
        self._rss_before = self._proc.memory_info().rss
        self._hwm = reset_high_water_mark()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="sdfleet-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        hwm = high_water_mark_bytes() if self._hwm else None
        self.reading = MemoryReading(
            peak_rss_bytes=max(hwm, self._peak_rss) if hwm else self._peak_rss,
            peak_rss_anon_bytes=self._peak_anon,
            peak_rss_file_bytes=self._peak_file,
            rss_before_bytes=self._rss_before,
            method="vmhwm" if hwm else "sampler",
        )
