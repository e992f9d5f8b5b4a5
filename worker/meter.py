"""A job's own peak memory in a long-lived worker process, its timeline, and the runtime guard.

The kernel keeps a high-water mark of the resident set (VmHWM); writing "5" to /proc/self/clear_refs resets
it to the current RSS, so the mark read after the job is the job's own peak, spikes included. A psutil
sampler runs beside it: it splits anonymous memory (heap, OpenVINO's compiled weights) from file-backed
(mmapped IR weights, which the kernel may drop), records the timeline with phase marks, watches the budget,
and is the measure where clear_refs is not allowed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

import psutil

from shared.memory import fmt_size
from shared.jobstore import MemoryReading

MAX_TIMELINE_POINTS = 600


class MemoryBudgetExceeded(Exception):
    """Raised at the next denoising step after the sampler saw the RSS cross the budget, or the host's
    available memory fall below the floor the owner's programs need."""

    def __init__(self, rss: int, budget: int, available: int | None = None, floor: int | None = None):
        if available is None:
            message = f"resident memory reached {fmt_size(rss)}, past this worker's budget of {fmt_size(budget)}"
        else:
            message = (f"the host's available memory fell to {fmt_size(available)}, below "
                       f"{fmt_size(floor)} (SDFLEET_PAUSE_AVAILABLE_BYTES: the owner's programs need it), "
                       f"with this job at {fmt_size(rss)}")
        super().__init__(message)
        self.rss, self.budget, self.available = rss, budget, available


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


MADV_DONTNEED = 4
if _LIBC is not None:
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def drop_file_pages(roots: list[str], check_rss: bool = True) -> int:
    """Drop this process's resident pages of read-only file mappings under `roots` (the IR's weights, mmapped
    by read_model, and the compiled blobs): after the first inference OpenVINO works from its own repacked
    copy and does not touch them again, yet they count in RSS. The mapping stays; a page that is touched
    again is read back from the page cache. Only never-writable mappings are dropped, so nothing of the
    process's own is lost. Returns the bytes dropped (resident before the call), or 0 without `check_rss`
    (then /proc/self/maps is read, which is much cheaper than smaps)."""
    if _LIBC is None:
        return 0
    roots = [os.path.realpath(r) + os.sep for r in roots]
    dropped = 0
    with open("/proc/self/smaps" if check_rss else "/proc/self/maps") as f:
        current = None
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                current = None
                path = head[5] if len(head) > 5 else ""
                if head[1].startswith("r-") and any(path.startswith(r) for r in roots):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    if not check_rss:
                        _LIBC.madvise(lo, hi - lo, MADV_DONTNEED)
                    else:
                        current = (lo, hi)
            elif current and head[0] == "Rss:" and int(head[1]) > 0:
                lo, hi = current
                if _LIBC.madvise(lo, hi - lo, MADV_DONTNEED) == 0:
                    dropped += int(head[1]) * 1024
                current = None
    return dropped


class FilePageTrimmer:
    """While in use, drop the resident pages of the weight files under `roots` every `interval_s` (a thread):
    memory that OpenVINO reads once while it repacks weights does not stay resident beside the copy."""

    def __init__(self, roots: list[str], interval_s: float = 0.05):
        self.roots, self.interval_s = roots, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "FilePageTrimmer":
        if self.roots:
            self._thread = threading.Thread(target=self._run, name="sdfleet-trim", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            drop_file_pages(self.roots, check_rss=False)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            drop_file_pages(self.roots, check_rss=False)


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class JobMeter:
    """Context manager around one job: `reading` holds its peak once the block exits, `timeline()` the
    samples. Given a budget, `check()` raises MemoryBudgetExceeded once a sample has crossed it."""

    def __init__(self, interval_s: float = 0.02, budget_bytes: int | None = None,
                 min_available_bytes: int | None = None):
        self.interval_s = interval_s
        self.budget_bytes = budget_bytes
        self.min_available_bytes = min_available_bytes or None
        self.reading: MemoryReading | None = None
        self.exceeded_at: int | None = None
        self.starved: tuple[int, int] | None = None  # (available, rss) when available memory fell too low
        self.phase, self.image = "start", 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[tuple] = []
        self._peak_rss = self._peak_anon = self._peak_file = 0
        self._t0 = time.monotonic()

    def _sample(self) -> None:
        m = self._proc.memory_info()
        # On Linux psutil's `shared` is RssFile + RssShmem: the file-backed part of the resident set.
        anon, file = m.rss - m.shared, m.shared
        with self._lock:
            self._peak_rss = max(self._peak_rss, m.rss)
            self._peak_anon = max(self._peak_anon, anon)
            self._peak_file = max(self._peak_file, file)
            self._samples.append((round(time.monotonic() - self._t0, 3), m.rss, anon, file, self.phase, self.image))
        if self.budget_bytes is not None and m.rss > self.budget_bytes and self.exceeded_at is None:
            self.exceeded_at = m.rss
        if self.min_available_bytes and self.starved is None:
            available = psutil.virtual_memory().available
            if available < self.min_available_bytes:
                self.starved = (available, m.rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def mark(self, phase: str, image: int | None = None) -> None:
        """Start a phase (encode, denoise, decode) of image `image`: the timeline carries the marks."""
        self.phase = phase
        if image is not None:
            self.image = image
        self._sample()

    def check(self) -> None:
        if self.exceeded_at is not None:
            raise MemoryBudgetExceeded(self.exceeded_at, self.budget_bytes)
        if (reason := self.starved_reason()) is not None:
            raise MemoryBudgetExceeded(*reason)

    def starved_reason(self) -> tuple[int, int, int, int] | None:
        """(rss, budget, available, floor) once the host's available memory fell below the floor."""
        if self.starved is None:
            return None
        available, rss = self.starved
        return rss, self.budget_bytes, available, self.min_available_bytes

    @property
    def peak_so_far(self) -> int:
        hwm = high_water_mark_bytes() if self._hwm else None
        return max(hwm or 0, self._peak_rss)

    def __enter__(self) -> "JobMeter":
        self._t0 = time.monotonic()
        self._rss_before = self._proc.memory_info().rss
        self._hwm = reset_high_water_mark()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="sdfleet-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mark("end")
        hwm = high_water_mark_bytes() if self._hwm else None
        self.reading = MemoryReading(
            peak_rss_bytes=max(hwm, self._peak_rss) if hwm else self._peak_rss,
            peak_rss_anon_bytes=self._peak_anon,
            peak_rss_file_bytes=self._peak_file,
            rss_before_bytes=self._rss_before,
            method="vmhwm" if hwm else "sampler",
        )

    def phase_peak(self, phase: str) -> int | None:
        """The highest RSS sampled during a phase (encode, denoise, decode) of any image, or None."""
        with self._lock:
            return max((s[1] for s in self._samples if s[4] == phase), default=None)

    def first_image_phases(self) -> tuple[int | None, int | None]:
        """The first image's highest RSS during its steps (and its init image's encode) and during its decode:
        what a profile scales by the UNet's work and by the decoded pixels; the prompt's encode is the same for
        every shape. (None, None) without both (a job that ended before its first decode)."""
        with self._lock:
            mine = [s for s in self._samples if s[5] == 0]
        steps = max((s[1] for s in mine if s[4] in ("denoise", "encode_image")), default=None)
        decode = max((s[1] for s in mine if s[4] == "decode"), default=None)
        return (steps, decode) if steps is not None and decode is not None else (None, None)

    def timeline(self, max_points: int = MAX_TIMELINE_POINTS) -> list[dict]:
        """The samples, thinned to at most about `max_points`: in each run of samples the highest is kept,
        and so is every phase change, so the peak and the marks survive."""
        with self._lock:
            samples = list(self._samples)
        step = max(1, -(-len(samples) // max_points))
        kept = []
        for i in range(0, len(samples), step):
            chunk = samples[i:i + step]
            starts = [s for j, s in enumerate(chunk) if (i + j) == 0 or samples[i + j - 1][4:] != s[4:]]
            kept.extend(starts)
            top = max(chunk, key=lambda s: s[1])
            if top not in starts:
                kept.append(top)
        kept.sort(key=lambda s: s[0])
        keys = ("t", "rss", "anon", "file", "phase", "image")
        return [dict(zip(keys, s)) for s in kept]
