"""A node's outbox of measurement events: one SQLite file shared by the SuperNode process
(transfer timings, the telemetry sender) and the ClientApp processes it starts (phase
timings, resource samples).

An event is delivered once, by whichever path takes it first: the telemetry sender
(``claim(SENDING)``, then ``mark(..., TELEMETRY)`` or ``release`` on failure) or the
ClientApp mod, which puts what is still undelivered into its reply (``claim(REPLY)``).
A claim is one SQLite transaction, so two processes never take the same event.
Written by hand: nothing in the ecosystem gives a cross-process outbox this small.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path

from .events import Event, dumps, loads

ENV_VAR = "STAMEN_SPOOL"  # set by stamen-supernode; inherited by the ClientApp processes
SENDING = "sending"
TELEMETRY = "telemetry"
REPLY = "reply"
_KEEP_DELIVERED_S = 24 * 3600.0


class Spool:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, "
            "body TEXT NOT NULL, state TEXT, added REAL NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        # the telemetry key the server gave this node for a run (measurements/auth.py)
        self._db.execute("CREATE TABLE IF NOT EXISTS run_keys (run_id TEXT PRIMARY KEY, key TEXT NOT NULL, added REAL NOT NULL)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('spool-id', ?)", (uuid.uuid4().hex[:12],))
        self.spool_id = self._db.execute("SELECT value FROM meta WHERE key = 'spool-id'").fetchone()[0]

    @classmethod
    def from_env(cls) -> Spool | None:
        """The spool of the stamen-supernode this process runs under, or None."""
        path = os.environ.get(ENV_VAR)
        return cls(path) if path else None

    def add(self, event: Event) -> int:
        cur = self._db.execute(
            "INSERT INTO events (run_id, body, state, added) VALUES (?, ?, NULL, ?)",
            (str(event.run_id), dumps([event]), time.time()),  # Flower's ids are uint64: beyond SQLite INTEGER
        )
        return int(cur.lastrowid)

    def claim(self, state: str, *, run_id: int | None = None, limit: int = 10_000) -> list[Event]:
        """Take undelivered events (oldest first), marking them with ``state``."""
        where = "state IS NULL" + ("" if run_id is None else " AND run_id = ?")
        args: tuple = () if run_id is None else (str(run_id),)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._db.execute(f"SELECT seq, body FROM events WHERE {where} ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
            self._db.executemany("UPDATE events SET state = ? WHERE seq = ?", [(state, seq) for seq, _ in rows])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        events = []
        for seq, body in rows:
            (event,) = loads(body)
            event.seq, event.spool_id = seq, self.spool_id
            events.append(event)
        return events

    def mark(self, seqs: list[int], state: str) -> None:
        self._db.executemany("UPDATE events SET state = ? WHERE seq = ?", [(state, s) for s in seqs])

    def release(self, seqs: list[int]) -> None:
        """Give claimed events back (their delivery failed): the next path takes them."""
        self._db.executemany("UPDATE events SET state = NULL WHERE seq = ?", [(s,) for s in seqs])

    def recover(self) -> None:
        """Release claims of a sender that died mid-delivery (call when a sender starts)."""
        self._db.execute("UPDATE events SET state = NULL WHERE state = ?", (SENDING,))

    def pending(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events WHERE state IS NULL").fetchone()[0])

    def prune(self) -> None:
        """Forget delivered events older than a day (the spool would otherwise grow forever)."""
        self._db.execute(
            "DELETE FROM events WHERE state IN (?, ?) AND added < ?", (TELEMETRY, REPLY, time.time() - _KEEP_DELIVERED_S)
        )

    def set_key(self, run_id: int, key: str) -> None:
        """Keep the telemetry key of run ``run_id`` (the ClientApp mod, from a message)."""
        self._db.execute("INSERT OR REPLACE INTO run_keys VALUES (?, ?, ?)", (str(run_id), str(key), time.time()))

    def run_keys(self) -> dict[int, str]:
        """{run id: key} of the runs this node holds a key for, the newest last."""
        return {int(r): k for r, k in self._db.execute("SELECT run_id, key FROM run_keys ORDER BY added")}

    def close(self) -> None:
        self._db.close()
