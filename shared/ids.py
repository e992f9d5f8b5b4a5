"""Random UUIDs from os.urandom drawn 4 KiB at a time: one system call per 256 IDs instead of one each. (On the
submit path a system call releases the GIL, and getting it back from the thread that stores jobs cost more
than the call.) A forked child starts with an empty pool: it never repeats its parent's IDs."""

from __future__ import annotations

import os
import threading
import uuid

_CHUNK = 4096
_lock = threading.Lock()
_pool = {"buf": b"", "pos": 0}


def _reset() -> None:
    _pool.update(buf=b"", pos=0)


os.register_at_fork(after_in_child=_reset)


def _take(n: int) -> bytes:
    with _lock:
        pos = _pool["pos"]
        if pos + n > len(_pool["buf"]):
            _pool["buf"], pos = os.urandom(_CHUNK), 0
        _pool["pos"] = pos + n
        return _pool["buf"][pos:pos + n]


def uuid4() -> str:
    """A random (version 4) UUID as a string, like str(uuid.uuid4())."""
    return str(uuid.UUID(bytes=_take(16), version=4))
