"""Least privilege for workers on hosts that belong to someone else: the PostgreSQL role a worker connects as
(`worker_role_sql`, printed by `sdfleet db worker-role`) and the Redis ACL user it authenticates as
(`worker_acl`, printed by `sdfleet redis-acl`). What each allows and refuses, and what a stolen worker host can
still do: docs/security.md, "A stolen worker host"."""

from __future__ import annotations

import hashlib
import re

from shared.db import head_revision
from shared.models import Job, Worker

WORKER_ROLE = "sdfleet_worker"
_ROLE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")  # no quoting needed, and under PostgreSQL's 63 bytes

# The columns of a job a worker writes: claiming it (start_attempt), its progress and memory reading
# (sync_running, note_peak), how it started (note_resume) and in which lever set (note_levers), ending it (finish_*: the webhook marked pending),
# handing it back (hand_back, take_back of its own dead pool child's job) or on (hand_on).
JOB_COLUMNS_WRITTEN = (
    "status", "attempts", "started_at", "finished_at", "generation_s", "worker_host", "worker_name",
    "error_code", "error_message", "peak_rss_bytes", "peak_rss_anon_bytes", "peak_rss_file_bytes",
    "rss_before_bytes", "peak_rss_method", "progress_step", "progress_steps", "progress_image", "history",
    "resumes", "leaves", "delivery_id", "enqueued_at", "memory_class_bytes", "handoffs", "webhook_status",
    "webhook_delivery_id", "lever_set", "lever_reason", "lever_predicted_bytes",
)

# Every table of the schema: the role is granted exactly what follows on them, nothing else. A table a later
# release adds is refused to workers until it is named here.
TABLES = ("jobs", "job_images", "job_inputs", "job_checkpoints", "job_checkpoint_images", "job_previews",
          "job_memory", "job_tombstones", "workers", "memory_profiles", "api_keys", "job_counts",
          "job_count_deltas", "job_histograms", "job_histogram_deltas", "alembic_version")


def _columns(table, leave_out=()) -> str:
    return ", ".join(c.name for c in table.columns if c.name not in leave_out)


def worker_role_sql(role: str = WORKER_ROLE) -> str:
    """SQL that creates (or brings up to date) the group role `role`, NOLOGIN, with what a worker needs and
    nothing else, and the row-level security that confines it. Run by a superuser in the sdfleet database, at
    this release's schema revision; safe to run again (after each upgrade). Login roles join it:
    `CREATE ROLE host21 LOGIN PASSWORD '...' IN ROLE sdfleet_worker`."""
    from shared.jobstore import WORKER_HIDDEN_COLUMNS

    if not _ROLE_RE.match(role):
        raise ValueError(f"{role!r}: a role name here is lower-case letters, digits and _, at most 63")
    head = head_revision()
    jobs_read = _columns(Job.__table__, WORKER_HIDDEN_COLUMNS)
    workers_written = _columns(Worker.__table__, ("db_role",))
    # a job whose status this login role changed last and which is not queued: the running job it claimed
    # (or one it just ended: its checkpoint is dropped and its timeline written in the same transaction)
    held = ("EXISTS (SELECT FROM jobs j WHERE j.id = {t}.job_id AND j.status <> 'queued' "
            "AND j.status_by = session_user)")
    policies = [
        # a job it may see: a queued one (it claims any of those) or one whose status it changed last
        ("jobs", "read", "SELECT", "USING (status = 'queued' OR status_by = session_user)"),
        # a job it may change: a queued one (to claim it, or hand it on), or the running job it claimed; a claim
        # sets status_by to this login role (the trigger of migration 0012), which nothing it writes can
        # change. A job running on another login role, or ended, is out of reach.
        ("jobs", "write", "UPDATE", "USING (status = 'queued' OR (status = 'running' AND status_by = session_user)) "
                                    "WITH CHECK (status = 'queued' OR status_by = session_user)"),
        ("job_images", "write", "INSERT", "WITH CHECK (EXISTS (SELECT FROM jobs j WHERE j.id = job_images.job_id "
                                          "AND j.status = 'succeeded' AND j.status_by = session_user))"),
        *((t, "held", "ALL", f"USING ({held.format(t=t)}) WITH CHECK ({held.format(t=t)})")
          for t in ("job_checkpoints", "job_checkpoint_images", "job_previews", "job_memory")),
        ("job_inputs", "held", "SELECT", f"USING ({held.format(t='job_inputs')})"),
        ("workers", "insert", "INSERT", "WITH CHECK (db_role = session_user)"),
        ("workers", "update", "UPDATE", "USING (db_role = session_user) WITH CHECK (db_role = session_user)"),
    ]
    confined = sorted({p[0] for p in policies})
    lines = [
        f"-- sdfleet: the worker's database role {role}, for schema revision {head} (`sdfleet db worker-role`).",
        "-- Run as a superuser in the sdfleet database (psql -v ON_ERROR_STOP=1); run it again after upgrades.",
        "BEGIN;",
        "DO $$",
        "BEGIN",
        f"  IF (SELECT version_num FROM alembic_version) IS DISTINCT FROM '{head}' THEN",
        f"    RAISE EXCEPTION 'the schema is at revision %, this needs {head}: run `sdfleet db upgrade` first',",
        "      (SELECT version_num FROM alembic_version);",
        "  END IF;",
        f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN",
        f"    CREATE ROLE {role} NOLOGIN;",
        "  END IF;",
        "  EXECUTE format('GRANT CONNECT ON DATABASE %I TO " + role + "', current_database());",
        "  EXECUTE format('GRANT USAGE ON SCHEMA %I TO " + role + "', current_schema());",
        "  -- PostgreSQL before 15 let every role create tables in the schema public: only the tables' owner may",
        "  IF has_schema_privilege('public', current_schema(), 'CREATE') THEN",
        "    EXECUTE format('GRANT CREATE ON SCHEMA %I TO %I', current_schema(), (SELECT tableowner FROM pg_tables",
        "                   WHERE schemaname = current_schema() AND tablename = 'jobs'));",
        "    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', current_schema());",
        "  END IF;",
        "END $$;",
        f"REVOKE ALL ON {', '.join(TABLES)} FROM {role};",
        "",
        "-- jobs: every column but whose job it is and where its webhook goes; it writes a running job's columns",
        f"GRANT SELECT ({jobs_read}) ON jobs TO {role};",
        f"GRANT UPDATE ({', '.join(JOB_COLUMNS_WRITTEN)}) ON jobs TO {role};",
        "-- a succeeded job's images: written, never read",
        f"GRANT INSERT ON job_images TO {role};",
        "-- the images the job it runs was given: read, never written",
        f"GRANT SELECT ON job_inputs TO {role};",
        "-- checkpoints, previews and the memory timeline of the job it runs; heartbeats; the fleet's memory profiles",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON job_checkpoints, job_checkpoint_images, job_previews TO {role};",
        f"GRANT SELECT, INSERT, UPDATE ON job_memory, memory_profiles TO {role};",
        f"GRANT SELECT ON workers TO {role};",
        f"GRANT INSERT ({workers_written}), UPDATE ({workers_written}) ON workers TO {role};",
        "-- whether the schema is current (a worker checks at start; it cannot migrate)",
        f"GRANT SELECT ON alembic_version TO {role};",
        "",
        "-- Row-level security: restrictive policies for this role alone; every other role sees what its grants",
        "-- allow, as before (the permissive sdfleet_any policy). The tables' owner is not subject to it.",
    ]
    for table in confined:
        lines += [f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;",
                  f"DROP POLICY IF EXISTS sdfleet_any ON {table};",
                  f"CREATE POLICY sdfleet_any ON {table} AS PERMISSIVE FOR ALL TO PUBLIC "
                  "USING (true) WITH CHECK (true);"]
    for table, name, command, clauses in policies:
        lines += [f"DROP POLICY IF EXISTS {role}_{name} ON {table};",
                  f"CREATE POLICY {role}_{name} ON {table} AS RESTRICTIVE FOR {command} TO {role} {clauses};"]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


# ---- Redis ------------------------------------------------------------------------------------------------

# What Celery and kombu's Redis transport send for a worker that consumes its model's queues and acknowledges
# late (BRPOP, then the delivered message kept in its model's unacked keys until the ack; restored after the
# visibility timeout under a lock, in a transaction), publishes to its model's queues and the webhooks queue,
# and answers (and sends) remote-control commands (pub/sub, kombu's binding tables and their scripts). Nothing
# that lists keys, reads the server's state or configuration, or touches keys and channels beyond the rules.
WORKER_COMMANDS = (
    "ping", "select", "brpop", "rpop", "lpush", "rpush", "llen", "sadd", "smembers", "srem", "hset", "hget",
    "hdel", "zadd", "zrem", "zrange", "zrangebyscore", "set", "get", "del", "exists", "watch", "unwatch",
    "multi", "exec", "discard", "publish", "psubscribe", "punsubscribe", "evalsha", "script|load",
    "script|exists", "time", "pexpire",
)


def worker_acl_rules(model: str, db: int = 0) -> list[str]:
    """The ACL rules of a worker serving `model` (Redis 6.2 and later), for a fleet on Redis database `db`."""
    from shared.queue import (
        MEMORY_CLASSES, PIDBOX_EXCHANGE, WEBHOOK_QUEUE, priority_keys, queue_name, unacked_keys,
    )
    from shared.settings import MODEL_NAME_RE

    if not MODEL_NAME_RE.match(model):
        raise ValueError(f"{model!r} is not a model name")
    # exact key names (a model name holds no glob character): another model's keys never match, even one
    # whose name starts with this one's
    keys = [k for c in MEMORY_CLASSES for k in priority_keys(queue_name(model, c))]
    keys += [*unacked_keys(model).values(), *priority_keys(WEBHOOK_QUEUE)]
    # kombu's binding tables (any exchange: its sweep of expired ones may meet any), the reply queues of
    # remote-control commands (answered, or awaited: `celery inspect ping`, the container's health check), and
    # the worker's own remote-control queue (its node, sdfleet@HOST.PID, declares it: LLEN)
    patterns = ["_kombu.binding.*", "_kombu.binding_permanent.*", "_kombu.binding_deadlines",
                f"*.reply.{PIDBOX_EXCHANGE}*", f"sdfleet@*.{PIDBOX_EXCHANGE}*"]
    channels = [f"/{db}.{PIDBOX_EXCHANGE}", f"/{db}.celeryev/*"]
    return (["resetkeys", *(f"~{k}" for k in keys + patterns), "resetchannels", *(f"&{c}" for c in channels),
             "-@all", *(f"+{c}" for c in WORKER_COMMANDS)])


def worker_acl(model: str, user: str, password: str, db: int = 0) -> str:
    """`ACL SETUSER` for a worker's Redis user: its whole definition (reset first), the password as its SHA-256."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", user):
        raise ValueError(f"{user!r}: a user name here is letters, digits and ._-, at most 64")
    digest = hashlib.sha256(password.encode()).hexdigest()
    return " ".join(["ACL", "SETUSER", user, "reset", "on", f"#{digest}", *worker_acl_rules(model, db)])
