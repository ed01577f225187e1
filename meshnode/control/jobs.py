"""Jobs that must run once per tailnet, not once per replica: removing offline ephemeral nodes,
noting expired logins, pruning the audit, change and flow logs past their retention.

On PostgreSQL each job has a session advisory lock of its own (`pg_try_advisory_lock(key)`), taken on
a connection kept for the purpose. The replica that takes a job's lock keeps the job while that
connection lives; a replica that dies (kill -9, a lost network) loses its connection, PostgreSQL
releases its locks, and the next replica to try takes the job over at its next tick. The others skip
the job. One connection per replica for all jobs, so the jobs of a dead replica move together.

The lock decides who does the work; it is not what keeps the work correct. Every job's writes run
under the store's one writer lock and are idempotent (a node already deleted is not deleted twice, a
retention cut already made removes nothing), so even two replicas that both believe they hold a job
(a partition PostgreSQL has not yet noticed) leave one result and one audit entry.

On SQLite there is one server per database: every job runs there, as before.
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import Any

log = logging.getLogger("meshnode.control.jobs")


class Job(enum.Enum):
    EPHEMERAL = "ephemeral-removal"
    KEY_EXPIRY = "key-expiry"
    RETENTION = "retention"   # audit log, change log and flow logs past their retention


# Advisory lock keys: "mesh" in the high 32 bits (as sqldb.WRITE_LOCK, which is ...0001), a number per job.
KEYS: dict[Job, int] = {Job.EPHEMERAL: 0x6D65736800000101, Job.KEY_EXPIRY: 0x6D65736800000102,
                        Job.RETENTION: 0x6D65736800000103}

# Held already (a row of ours in pg_locks), else try to take it. A session lock taken again would stack
# another count; this checks first, so one count is ever held. The query doubles as a ping.
_HOLD = ("SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
         " AND pid = pg_backend_pid() AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1)"
         " THEN true ELSE pg_try_advisory_lock(%s) END")


class JobLocks:
    """Which once-per-tailnet jobs this server may run now (`holds`). Blocking: call it from a thread."""

    def __init__(self, url: str | None, connect_timeout: float = 5.0) -> None:
        self.url = url            # None: SQLite, one server per database, every job is ours
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        self._lock = threading.Lock()
        self.held: set[Job] = set()

    def holds(self, job: Job) -> bool:
        if self.url is None:
            return True
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._connect()
                key = KEYS[job]
                row = self._conn.execute(_HOLD, (key >> 32, key & 0xFFFFFFFF, key)).fetchone()
                have = bool(row and row[0])
            except Exception as exc:   # psycopg.Error, OSError: no connection, no lock (fail safe)
                if self.held:
                    log.warning("job locks: connection lost (%s); this replica runs no job until it is back",
                                str(exc).strip())
                self.held.clear()
                self._drop()
                return False
            if have and job not in self.held:
                log.info("job %s: this replica runs it now", job.value)
                self.held.add(job)
            elif not have and job in self.held:
                self.held.discard(job)
            return have

    def _connect(self) -> None:
        import psycopg   # only PostgreSQL deployments need it
        self._drop()
        self.held.clear()   # a new session holds nothing
        self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=int(self.connect_timeout),
                                     application_name="meshnode-jobs")

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def close(self) -> None:
        """Release every job (closing the session releases its advisory locks)."""
        with self._lock:
            self._drop()
            self.held.clear()
