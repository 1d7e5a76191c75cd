"""The job store: one SQLite table of job records, and the only code that changes a job's status.

Every change is one transaction (``BEGIN IMMEDIATE``) that reads the record, checks the move
against :data:`TRANSITIONS` and writes it; each write bumps ``seq`` so watchers (the SSE route)
see every change in order. Workers never write here directly: the embedded worker calls these
methods, remote workers send events through Redis that :meth:`JobStore.apply_event` applies
(with the stream position stored in the same transaction, so an event is applied exactly once).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("talkgen.service.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# queued -> running -> succeeded | failed | cancelled; running -> queued when its worker stops or
# dies (taken up again); running -> running when a new attempt starts after a worker died unseen.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    RUNNING: frozenset({RUNNING, QUEUED, SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    params TEXT NOT NULL,
    inputs TEXT NOT NULL,
    progress TEXT,
    result TEXT,
    chunks TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    dispatched INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class TransitionError(Exception):
    """A move the state machine does not allow (e.g. a late event for a finished job)."""


@dataclass
class Job:
    id: str
    status: str
    created_at: float
    updated_at: float
    params: dict
    inputs: dict[str, str]
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict | None = None
    result: dict | None = None
    chunks: list[dict] = field(default_factory=list)
    error: str | None = None
    attempts: int = 0
    worker: str | None = None
    cancel_requested: bool = False
    dispatched: bool = False
    seq: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        for key in ("params", "inputs", "progress", "result", "chunks"):
            values[key] = json.loads(values[key]) if values[key] is not None else None
        values["cancel_requested"] = bool(values["cancel_requested"])
        values["dispatched"] = bool(values["dispatched"])
        return cls(**values)


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """Job records in SQLite (WAL mode: readers never wait for the writer)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._listeners: list[Callable[[Job, str], None]] = []
        self._local = threading.local()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    # -- plumbing --------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def subscribe(self, listener: Callable[[Job, str], None]) -> None:
        """``listener(job, status_before)`` is called after every committed change of a job."""
        self._listeners.append(listener)

    def _changed(self, job: Job | None, before: str) -> None:
        if job is None:
            return
        for listener in self._listeners:
            try:
                listener(job, before)
            except Exception:  # a watcher's failure must never undo a state change
                log.exception("job change listener failed")

    def _get(self, db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def _update(self, db: sqlite3.Connection, job: Job, **values) -> Job:
        values["updated_at"] = time.time()
        columns = ", ".join(f"{k} = ?" for k in values)
        encoded = [json.dumps(v) if k in ("params", "inputs", "progress", "result", "chunks") and v is not None else v
                   for k, v in values.items()]
        db.execute(f"UPDATE jobs SET {columns}, seq = seq + 1 WHERE id = ?", (*encoded, job.id))
        return self._get(db, job.id)  # type: ignore[return-value]

    def _move(self, db: sqlite3.Connection, job: Job, status: str, **values) -> Job:
        if status not in TRANSITIONS[job.status]:
            raise TransitionError(f"job {job.id}: {job.status} -> {status} is not allowed")
        now = time.time()
        if status == RUNNING and job.status != RUNNING:
            values.setdefault("started_at", now)
        if status in TERMINAL:
            values["finished_at"] = now
        return self._update(db, job, status=status, **values)

    # -- reads -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self._get(self._connect(), job_id)

    def list(self, status: str | None = None, limit: int = 50, offset: int = 0) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        if status:
            query += " WHERE status = ?"
            args.append(status)
        query += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        rows = self._connect().execute(query, (*args, limit, offset)).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._connect().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        found = {status: count for status, count in rows}
        return {status: found.get(status, 0) for status in STATUSES}

    def unfinished(self) -> list[Job]:
        """Queued and running jobs, oldest first (what a restarted server takes up again)."""
        rows = self._connect().execute(
            "SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY created_at, id", (QUEUED, RUNNING)).fetchall()
        return [Job.from_row(r) for r in rows]

    def meta(self, key: str) -> str | None:
        row = self._connect().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -- the state machine ------------------------------------------------------------------------

    def create(self, params: dict, inputs: dict[str, str], job_id: str | None = None) -> Job:
        now = time.time()
        job_id = job_id or new_job_id()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, status, created_at, updated_at, params, inputs) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, QUEUED, now, now, json.dumps(params), json.dumps(inputs)),
            )
            job = self._get(db, job_id)
        self._changed(job, "")
        return job  # type: ignore[return-value]

    def mark_dispatched(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET dispatched = 1 WHERE id = ?", (job_id,))

    def start(self, job_id: str, worker: str, max_attempts: int) -> Job | None:
        """A worker takes the job up. Returns the running job, or None when it must not run
        (finished, cancelled meanwhile, or out of attempts, which fails it)."""
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job is None or job.terminal:
                return None
            before = job.status
            if job.cancel_requested:
                after = self._move(db, job, CANCELLED, error="cancelled before it started")
            elif job.attempts >= max_attempts:
                after = self._move(db, job, FAILED, error=gave_up_message(job.attempts))
            else:
                after = self._move(db, job, RUNNING, attempts=job.attempts + 1, worker=worker,
                                   progress=None, error=None)
        self._changed(after, before)
        return after if after.status == RUNNING else None

    def record(self, job_id: str, kind: str, data: dict | None = None) -> Job | None:
        """Apply one thing a worker reports; returns the job, or None when it no longer applies."""
        with self._transaction() as db:
            job, before = self._apply(db, job_id, kind, data or {})
        self._changed(job, before)
        return job

    def apply_event(self, stream_id: str, job_id: str, kind: str, data: dict) -> None:
        """A remote worker's event, applied together with the stream position (exactly once)."""
        with self._transaction() as db:
            job, before = self._apply(db, job_id, kind, data)
            db.execute("INSERT INTO meta (key, value) VALUES ('events_last_id', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (stream_id,))
        self._changed(job, before)

    def _apply(self, db: sqlite3.Connection, job_id: str, kind: str, data: dict) -> tuple[Job | None, str]:
        job = self._get(db, job_id)
        if job is None:
            log.warning("event %s for unknown job %s ignored", kind, job_id)
            return None, ""
        return self._event(db, job, kind, data), job.status

    def _event(self, db: sqlite3.Connection, job: Job, kind: str, data: dict) -> Job | None:
        try:
            if kind == "started":  # a remote worker decided to run it (attempts counted there)
                return self._move(db, job, RUNNING, attempts=data.get("attempt", job.attempts + 1),
                                  worker=data.get("worker"), progress=None, error=None)
            if kind == "progress":
                return self._update(db, job, progress=data) if job.status == RUNNING else None
            if kind == "chunk":
                if job.status != RUNNING:
                    return None
                chunks = [c for c in job.chunks if c["index"] != data["index"]] + [data]
                return self._update(db, job, chunks=sorted(chunks, key=lambda c: c["index"]))
            if kind == "succeeded":
                return self._move(db, job, SUCCEEDED, result=data, progress=_done(job.progress))
            if kind == "failed":
                return self._move(db, job, FAILED, error=data.get("error") or "failed")
            if kind == "cancelled":
                return self._move(db, job, CANCELLED, error="cancelled")
            if kind == "requeued":  # the worker stopped (shutdown, or found dead): take it up again
                attempts = job.attempts - 1 if data.get("graceful") else job.attempts
                return self._move(db, job, QUEUED, attempts=max(attempts, 0), worker=None,
                                  error=data.get("reason"))
        except TransitionError as exc:
            log.info("ignored: %s (%s)", exc, kind)
            return None
        raise ValueError(f"unknown job event {kind!r}")

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel: a queued job ends now; a running one is flagged and stops at its next step."""
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job is None or job.terminal:
                return job
            before = job.status
            if job.status == QUEUED:
                job = self._move(db, job, CANCELLED, cancel_requested=1, error="cancelled before it started")
            else:
                job = self._update(db, job, cancel_requested=1)
        self._changed(job, before)
        return job


def gave_up_message(attempts: int) -> str:
    return (f"The job was started {attempts} times and its worker stopped each time (killed, out of memory, or "
            "the server restarted) before finishing; it is not tried again. Check the worker's log, then submit it again.")


def _done(progress: dict | None) -> dict | None:
    if progress is None:
        return None
    return {**progress, "eta_s": 0.0}
