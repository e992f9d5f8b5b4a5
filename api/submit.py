"""The submit path's two shared pieces, one of each per API process:

- `FleetCache`: the fleet as admission sees it (`FleetView`), read at most once per SDFLEET_API_CACHE_S by
  one request while the others wait for that read, never by each request.
- `Submitter`: group commit. Submissions hand their new job to one writer thread, which stores every job
  waiting at that moment in one transaction, publishes their messages to Redis on one producer, counts their
  queue positions once per model and priority, and answers each. A client hears 202 only once its job is
  committed and its message is in Redis, exactly as with one transaction per job; under load, many jobs
  share the commit (one round trip, one fsync on PostgreSQL) instead of queueing for one each.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from celery import Celery
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api.admission import FleetView
from shared import jobstore
from shared.errors import ServiceUnavailable
from shared.models import Job, JobInput
from shared.queue import send_generate

log = logging.getLogger(__name__)

MAX_BATCH = 256  # jobs in one transaction at most


class FleetCache:
    def __init__(self, read: Callable[[], FleetView], max_age_s: float):
        self._read, self.max_age_s = read, max_age_s
        self._view: FleetView | None = None
        self._pending: asyncio.Future | None = None

    async def get(self, fresh: bool = False) -> FleetView:
        """The cached view while it is younger than max_age_s; else (or `fresh`) a new read, shared by every
        request that asks while it runs."""
        view = self._view
        if not fresh and view is not None and time.monotonic() - view.read_at <= self.max_age_s:
            return view
        loop = asyncio.get_running_loop()
        if self._pending is None or self._pending.get_loop() is not loop:  # (a test client's loop per request)
            self._pending = asyncio.ensure_future(loop.run_in_executor(None, self._read))
            self._pending.add_done_callback(self._keep_read)
        return await asyncio.shield(self._pending)

    def _keep_read(self, future: asyncio.Future) -> None:
        """The read is done: keep its view (a failed read keeps the old one), and let the next miss read again."""
        if self._pending is future:
            self._pending = None
        if not future.cancelled() and future.exception() is None:
            self._view = future.result()


@dataclass
class _Pending:
    values: dict  # the job's row (jobstore.new_job_values)
    inputs: list[dict]  # the rows of its input images (job_inputs)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class Submitter:
    def __init__(self, sessions: sessionmaker[Session], celery: Celery):
        self.sessions, self.celery = sessions, celery
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def submit(self, values: dict, inputs: list[dict] = ()) -> int | None:
        """Store and enqueue one job (with whatever others are waiting at that moment): its queue position
        (None if it could not be counted). Raises IntegrityError (its Idempotency-Key was taken meanwhile),
        ServiceUnavailable (Redis is unreachable: nothing was kept) or the database's error."""
        self._start()
        loop = asyncio.get_running_loop()
        pending = _Pending(values, list(inputs), loop, loop.create_future())
        self._queue.put(pending)
        return await pending.future

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="sdfleet-submitter", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception as exc:  # the database is away, or anything else: every job of the batch hears it
                log.warning("storing %d submitted job(s) failed: %s", len(batch), exc)
                for p in batch:
                    _answer(p, exc=exc)

    def _write(self, batch: list[_Pending]) -> None:
        stored = self._store(batch)
        if not stored:
            return
        try:  # one producer, one Redis round trip for the batch (kombu's publish batch)
            with self.celery.producer_or_acquire() as producer, producer.batch(max_size=MAX_BATCH):
                for p in stored:
                    v = p.values
                    send_generate(self.celery, v["id"], v["delivery_id"], v["model"], v["priority"],
                                  v["memory_class_bytes"], producer=producer)
        except Exception as exc:  # keep nothing the client was not told about
            with self.sessions.begin() as session:
                ids = [p.values["id"] for p in stored]
                session.execute(delete(JobInput).where(JobInput.job_id.in_(ids)))
                session.execute(delete(Job).where(Job.id.in_(ids)))
            for p in stored:
                _answer(p, exc=ServiceUnavailable(
                    f"the job queue is unreachable ({type(exc).__name__}); nothing was stored"))
            return
        try:
            with self.sessions() as session:
                positions = jobstore.queue_positions(session, [jobstore.as_record(p.values) for p in stored])
        except Exception as exc:  # the jobs are stored and queued: answer them without a position
            log.warning("counting queue positions failed: %s", exc)
            positions = {}
        for p in stored:
            _answer(p, result=positions.get(p.values["id"]))

    def _store(self, batch: list[_Pending]) -> list[_Pending]:
        """Insert the batch in one transaction (one executemany: one round trip); if one of them breaks a
        constraint (an Idempotency-Key that another request took meanwhile), each in its own, and that one
        hears it."""
        try:
            with self.sessions.begin() as session:
                _insert(session, batch)
            return batch
        except IntegrityError as exc:
            if len(batch) == 1:
                _answer(batch[0], exc=exc)
                return []
        stored = []
        for p in batch:
            try:
                with self.sessions.begin() as session:
                    _insert(session, [p])
                stored.append(p)
            except IntegrityError as exc:
                _answer(p, exc=exc)
        return stored


def _insert(session: Session, batch: list[_Pending]) -> None:
    session.execute(Job.__table__.insert(), [p.values for p in batch])
    rows = [row for p in batch for row in p.inputs]
    if rows:
        session.execute(JobInput.__table__.insert(), rows)


def _answer(p: _Pending, result=None, exc: BaseException | None = None) -> None:
    def resolve_future() -> None:
        if p.future.done():  # the request went away
            return
        if exc is not None:
            p.future.set_exception(exc)
        else:
            p.future.set_result(result)

    try:
        p.loop.call_soon_threadsafe(resolve_future)
    except RuntimeError:  # its event loop is closed: nobody waits for the answer any more
        pass
