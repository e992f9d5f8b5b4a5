"""Run a command under a memory and time guard: its process tree is sampled every 0.2 s and killed (SIGTERM,
then SIGKILL) past the limit, before the kernel's OOM killer picks a victim of its own.

    python bench/watchdog.py --limit-gb 21 --timeout 3600 -- CMD ARGS...

Prints one JSON line at the end: the largest single process's peak RSS (the kernel's ru_maxrss over every
waited-for descendant, exact), the sampled peak of the whole tree, the elapsed time, and whether it was
killed. A process seen for the first time is not counted in that sample: just after a fork a child shows
its parent's pages, which would count them twice.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

MB = 1 << 20


def run(cmd: list[str], limit_bytes: int, timeout_s: float, interval_s: float = 0.2) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)
    root = psutil.Process(proc.pid)
    seen: set[int] = set()
    tree_peak, killed = 0, None
    while proc.poll() is None:
        try:
            kids = root.children(recursive=True)
            total = root.memory_info().rss
        except psutil.NoSuchProcess:
            break
        now_seen = set()
        for kid in kids:
            now_seen.add(kid.pid)
            if kid.pid in seen:
                try:
                    total += kid.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        seen = now_seen
        tree_peak = max(tree_peak, total)
        elapsed = time.monotonic() - t0
        if total > limit_bytes or elapsed > timeout_s:
            killed = f"rss {total / MB:.0f} MB" if total > limit_bytes else f"timeout {elapsed:.0f} s"
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            break
        time.sleep(interval_s)
    rc = proc.wait()
    return {"rc": rc, "killed": killed, "elapsed_s": round(time.monotonic() - t0, 1),
            "peak_process_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "peak_tree_sampled_mb": round(tree_peak / MB)}


def guarded(cmd: list[str], limit_gb: float, log: Path, timeout_s: float = 3600, cwd: Path | None = None) -> dict:
    """Run `cmd` under this watchdog in a child process, its output to `log`; returns the verdict."""
    log.parent.mkdir(parents=True, exist_ok=True)  # (a new machine has no bench cache folder yet)
    with open(log, "w") as f:
        subprocess.run([sys.executable, __file__, "--limit-gb", str(limit_gb), "--timeout", str(timeout_s), "--",
                        *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=cwd, check=False)
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("WATCHDOG "):
            return json.loads(line[len("WATCHDOG "):])
    raise RuntimeError(f"no verdict in {log}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-gb", type=float, required=True)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command")
    result = run(cmd, int(args.limit_gb * (1 << 30)), args.timeout)
    print("WATCHDOG " + json.dumps(result), flush=True)
    return 0 if result["rc"] == 0 and not result["killed"] else 1


if __name__ == "__main__":
    sys.exit(main())
