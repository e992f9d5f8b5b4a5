"""Engines, sessions and migrations: every process reaches the database through here."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy import ColumnCollection, Engine, Table, create_engine, event, inspect, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from shared.retry import retrying
from shared.settings import DB_MAX_OVERFLOW, DB_POOL_SIZE, DB_POOL_TIMEOUT_S, Settings

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK_ID = 0x5DF1EE7  # a PostgreSQL advisory lock: hosts starting together migrate one at a time


@dataclass(frozen=True)
class Pool:
    """A PostgreSQL engine's connection pool: `size` connections kept open, up to `max_overflow` more opened
    under load, and `timeout_s` for a checkout to wait for a free one before SQLAlchemy raises its
    TimeoutError (the API answers that 503). The API passes its settings (Pool.of); other processes, which
    hold a handful of connections each, take the defaults."""

    size: int = DB_POOL_SIZE
    max_overflow: int = DB_MAX_OVERFLOW
    timeout_s: float = DB_POOL_TIMEOUT_S

    @classmethod
    def of(cls, settings: Settings) -> "Pool":
        return cls(settings.db_pool_size, settings.db_max_overflow, settings.db_pool_timeout_s)


def make_engine(url: str, pool: Pool = Pool()) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL lets the API read while a worker writes; the API and the worker are separate processes
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # with WAL, NORMAL syncs at checkpoints, not at every commit: still never corrupt, and a worker's
            # few commits per job stop costing a disk flush each
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # No server-side prepared statements (psycopg prepares a query from its 5th run on a connection): through
    # PgBouncer in transaction mode (before 1.21) the next transaction may find another server connection,
    # without them. Planning the small queries here costs microseconds.
    return create_engine(url, pool_pre_ping=True, pool_size=pool.size, max_overflow=pool.max_overflow,
                         pool_timeout=pool.timeout_s, connect_args={"prepare_threshold": None})


# A model worker holds one connection between jobs (its heartbeat, progress and task threads take turns, a
# few milliseconds each) and opens up to two more only when they collide: ~1 per host, so one PostgreSQL's
# max_connections of 100 carries ~85 hosts beside the API and ops (docs/deploy.md, "How far one server goes").
WORKER_POOL = Pool(size=1, max_overflow=2, timeout_s=30.0)
_process_pool = Pool()


def use_pool(pool: Pool) -> None:
    """The pool this process's engines take unless given one (set at a program's start, before any engine)."""
    global _process_pool
    _process_pool = pool


def engine_for(url: str, pool: Pool | None = None) -> Engine:
    """The process's engine for this URL and pool (one per pair: the same arguments, the same engine)."""
    return _engine(url, pool or _process_pool)


@functools.lru_cache(maxsize=8)
def _engine(url: str, pool: Pool) -> Engine:
    return make_engine(url, pool)


engine_for.cache_clear = _engine.cache_clear  # forget every engine of the process (tests, a database dropped)


def session_factory(url: str, pool: Pool | None = None) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url, pool), expire_on_commit=False)


def wait_for_database(engine: Engine, timeout_s: float = 30.0) -> None:
    def ping() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        retrying(ping, patience_s=timeout_s, max_wait_s=1.0)
    except OperationalError as exc:
        raise RuntimeError(f"database {engine.url.render_as_string(hide_password=True)} unreachable: {exc}") from exc


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine):
    """Processes starting together on one SQLite file migrate one at a time (PostgreSQL: an advisory lock)."""
    path = engine.url.database
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}.migrate.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _ToRootHandlers(logging.Handler):
    """Hands a record to the root logger's handlers, where the process's warnings and errors go."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


@contextlib.contextmanager
def _alembic_logs_to(log_file: Path | None):
    """While migrating: alembic's INFO lines (a few per revision, each with its docstring) go to log_file
    alone, for a command whose terminal shows only its own lines; warnings and errors still go where the
    process's other warnings go. Without log_file, alembic logs as any library does."""
    if log_file is None:
        yield
        return
    alembic_log = logging.getLogger("alembic")
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    to_root = _ToRootHandlers(logging.WARNING)
    saved = alembic_log.level, alembic_log.propagate
    alembic_log.setLevel(logging.INFO)
    alembic_log.propagate = False
    alembic_log.addHandler(to_file)
    alembic_log.addHandler(to_root)
    try:
        yield
    finally:
        alembic_log.removeHandler(to_file)
        alembic_log.removeHandler(to_root)
        to_file.close()
        alembic_log.setLevel(saved[0])
        alembic_log.propagate = saved[1]


class MigrationRefused(RuntimeError):
    """The schema is behind and this process's database role may not change it (a worker's role never may)."""


def migrate(engine: Engine, revision: str = "head", log_file: Path | None = None) -> None:
    """Bring the schema to the newest revision (a no-op when it is there already), or to `revision`.
    `log_file`: alembic's INFO lines go there instead (see _alembic_logs_to)."""
    with _alembic_logs_to(log_file):  # around the import too: importing alembic logs its plugins
        try:
            _upgrade(engine, revision)
        except ProgrammingError as exc:
            if getattr(exc.orig, "sqlstate", None) != "42501":  # insufficient_privilege
                raise
            raise MigrationRefused(
                f"the schema is at revision {schema_revision(engine)}, this release needs {head_revision()}, and "
                f"the database role {engine.url.username!r} may not migrate it (a worker's role never may): run "
                f"`sdfleet db upgrade` as the tables' owner first ({str(exc.orig).strip()})") from exc


def _upgrade(engine: Engine, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    lock = _sqlite_file_lock(engine) if engine.dialect.name == "sqlite" else contextlib.nullcontext()
    with lock, engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def head_revision() -> str:
    """The newest revision of this release's migrations."""
    alembic_log = logging.getLogger("alembic")
    saved = alembic_log.level
    alembic_log.setLevel(logging.WARNING)  # importing alembic logs its plugins at INFO: not a command's output
    try:
        from alembic.script import ScriptDirectory

        return ScriptDirectory(str(MIGRATIONS)).get_current_head()
    finally:
        alembic_log.setLevel(saved)


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upsert(session: Session, table: Table, values: dict, keys: list[str],
           update: Callable[[ColumnCollection, ColumnCollection], dict]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET update(existing columns, excluded values), in the session's
    dialect: one statement, so two writers of the same new key both count and neither fails."""
    insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(table).values(**values)
    session.execute(stmt.on_conflict_do_update(index_elements=keys, set_=update(table.c, stmt.excluded)))
